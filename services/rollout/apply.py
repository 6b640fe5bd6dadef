"""Carry out a `Step` of `decide`: compare-and-set writes, in the order the step says.

The rollout record goes first (on the revision the decision was made from): if someone else changed it
meanwhile, nothing else of the step is applied, and the next pass decides again from what the store
holds. Executions are created with deterministic ids (a repeated step finds them there), desired-state
changes and links are compare-and-set loops on each record, and the job's state is changed only as
`decide.job_state_change` allows.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from shared import subjects as s
from shared.codec import to_msgpack
from shared.durations import utcnow
from shared.errors import Conflict
from shared.models import Execution, Job
from shared.store import Bucket, Store
from shared.transport import Bus

from . import decide as rules
from .model import Rollout, Timer

T = TypeVar("T")


async def gather_bounded(coros: Iterable[Awaitable[T]], limit: int = 256) -> list[T]:
    """Await many writes at once, at most `limit` in flight; results in order."""
    gate = asyncio.Semaphore(limit)

    async def one(coro: Awaitable[T]) -> T:
        async with gate:
            return await coro

    return list(await asyncio.gather(*(one(c) for c in coros)))


class Applier:
    def __init__(self, bus: Bus, store: Store, rollouts: Bucket[Rollout]) -> None:
        self.bus = bus
        self.store = store
        self.rollouts = rollouts

    async def apply(self, job: Job, revision: int, step: rules.Step,
                    written: Callable[[Execution], None] | None = None) -> bool:
        """Apply `step`, decided from the rollout record at `revision`; False if that record changed
        meanwhile (nothing after it was applied). `written` hears of every execution as written (so that
        an owner's memory of the job follows its own writes at once)."""
        heard = written or (lambda e: None)
        key = s.rollout_key(job.namespace, job.id)
        if step.rollout is not None and step.rollout_first:
            try:
                await self.rollouts.update(key, step.rollout, last=revision)
            except Conflict:
                return False
        for execution in await gather_bounded(self._create(c, heard) for c in step.creates):
            heard(execution)
        for record in await gather_bounded(self.store.mutate_execution(
                stop.execution, lambda e, stop=stop: rules.desire_stop(e, stop.reason, stop.next_id))
                for stop in step.stops):
            if record is not None:
                heard(record.value)
        if step.rollout is not None and not step.rollout_first:
            stopped = step.rollout
            await self.rollouts.mutate(key, lambda r: _become(r, stopped))
        now = utcnow()
        if step.job_state is not None:
            change = step.job_state
            await self.store.jobs.mutate(s.job_key(job.namespace, job.id),
                                         lambda j: rules.job_state_change(j, change, now))
        if step.mark_stable:
            version = step.mark_stable
            await self.store.jobs.mutate(s.job_key(job.namespace, job.id), lambda j: rules.mark_stable(j, version, now))
        for due, reason in step.timers:
            await self.schedule(job.namespace, job.id, due, reason)
        return True

    async def _create(self, create: rules.Create, heard: Callable[[Execution], None]) -> Execution:
        """Create it (if another pass or replica already did, ids being deterministic, that one is the
        truth), then point the execution it replaces at it."""
        execution = create.execution
        try:
            await self.store.executions.create(execution.key, execution)
        except Conflict:
            existing = await self.store.executions.get(execution.key)
            if existing is not None:
                execution = existing.value
        if create.replaces is not None:
            next_id = execution.id
            linked = await self.store.mutate_execution(create.replaces, lambda e: rules.link(e, next_id))
            if linked is not None:
                heard(linked.value)
        return execution

    async def schedule(self, namespace: str, job_id: str, due: dt.datetime, reason: str) -> None:
        """A durable wake-up for the job at `due` (deduplicated: the same wake-up set twice is one)."""
        timer = Timer(namespace=namespace, job_id=job_id, due=due, reason=reason)
        msg_id = f"{job_id}:{reason}:{int(due.timestamp() * 1000)}"
        await self.bus.js_publish(s.timer(namespace), to_msgpack(timer), msg_id=msg_id)


def _become(current: Rollout, wanted: Rollout) -> bool:
    """Change `current` in place to the state of `wanted` (a rollout stopping), unless it already is."""
    if current.state == wanted.state:
        return False
    current.state = wanted.state
    current.message = wanted.message
    current.updated_at = wanted.updated_at
    current.finished_at = wanted.finished_at
    return True

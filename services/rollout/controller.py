"""The rollout controller: make a job's executions match its rollout record, one idempotent pass at a time.

`reconcile(job)` reads the job, its rollout record and all its executions, and moves them one step
toward the goal: create executions for nodes whose wave has started, count failures against the
budget (and roll back when it is exceeded), restart exited executions by the restart policy (with
backoff), stop superseded executions once their replacement is healthy, start the next wave when the
current one is healthy, and derive the job's state. It is triggered by plans, by execution events and
by timers, may run on any replica at any time, and converges: execution ids are derived from the
deployment, node and predecessor, creates are compare-and-set, so a repeated pass changes nothing.
See docs/ROLLOUTS.md for the rules and the choices behind them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from collections.abc import Awaitable, Iterable
from typing import TypeVar

from shared import subjects as s
from shared.codec import to_msgpack
from shared.durations import parse_rfc3339, utcnow
from shared.errors import Conflict
from shared.models import (
    ENDED_JOB_STATES,
    ONE_SHOT_JOB_TYPES,
    TERMINAL_STATES,
    DesiredState,
    Execution,
    ExecutionStatus,
    Job,
    JobSpec,
    JobState,
    ObservedState,
    Plan,
)
from shared.settings import Settings
from shared.store import Bucket, Store
from shared.transport import Bus

from .model import IN_PROGRESS, Rollout, Timer
from .waves import plan_waves

log = logging.getLogger(__name__)

T = TypeVar("T")
HEALTH_VERDICTS = frozenset({"unhealthy", "deadline"})
# Failures that say something about the node, not about the version: they are restarted by the restart
# policy and never spend the failure budget (an operator restarting agents must not roll back a release).
NODE_TROUBLE = frozenset({"agent-restart", "agent-shutdown"})


def derived_id(*parts: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "shoal:" + ":".join(parts)))


async def gather_bounded(coros: Iterable[Awaitable[T]], limit: int = 256) -> list[T]:
    """Await many writes at once, at most `limit` in flight; results in order."""
    gate = asyncio.Semaphore(limit)

    async def one(coro: Awaitable[T]) -> T:
        async with gate:
            return await coro

    return list(await asyncio.gather(*(one(c) for c in coros)))


def budget_exceeded(failed: int, targets: int, max_nodes: int, max_percent: float) -> bool:
    """The rollout stops as soon as failed nodes exceed the count or the percentage of the targets."""
    if failed > max_nodes:
        return True
    return targets > 0 and failed * 100 > max_percent * targets


def settled(execution: Execution | None) -> bool:
    """Done with validation: stable, finished successfully, or failed (counted against the budget)."""
    if execution is None:
        return False
    return execution.status.stable_at is not None or execution.observed in ("completed", "failed")


class Controller:
    def __init__(self, bus: Bus, store: Store, settings: Settings) -> None:
        self.bus = bus
        self.store = store
        self.settings = settings
        self.rollouts: Bucket[Rollout] = Bucket(bus, s.BUCKET_ROLLOUTS, Rollout)

    # -- plans -------------------------------------------------------------------------------------

    async def apply_plan(self, plan: Plan) -> None:
        if plan.kind == "deploy":
            await self._deploy(plan)
        elif plan.kind == "add-nodes":
            await self._add_nodes(plan)
        elif plan.kind == "stop":
            await self.rollouts.mutate(s.rollout_key(plan.namespace, plan.job_id), _mark_stopped)
        await self.reconcile(plan.namespace, plan.job_id)

    async def _deploy(self, plan: Plan) -> None:
        key = s.rollout_key(plan.namespace, plan.job_id)
        job = await self.store.jobs.get(s.job_key(plan.namespace, plan.job_id))
        if job is None or job.value.version != plan.job_version or job.value.state.state_type == "stopped":
            return
        spec = (await self.store.job_version(plan.namespace, plan.job_id, plan.job_version)).spec
        while True:
            existing = await self.rollouts.get(key)
            if existing is not None and existing.value.deployment_id == plan.eval_id:
                return  # a redelivered plan: the rollout exists, reconcile carries it on
            now = utcnow()
            targets = list(plan.node_ids)
            rollout = Rollout(
                namespace=plan.namespace,
                job_id=plan.job_id,
                deployment_id=plan.eval_id,
                job_version=plan.job_version,
                source_version=plan.job_version,
                strategy=spec.rollout.strategy,
                state="deploying" if targets else "queued",
                targets=targets,
                wave_sizes=plan_waves(spec.rollout, len(targets)),
                current_wave=1 if targets and spec.rollout.strategy != "immediate" else 0,
                previous_version=existing.value.job_version if existing is not None else 0,
                message=plan.reason,
                created_at=now,
                updated_at=now,
                queued_since=None if targets else now,
            )
            try:
                if existing is None:
                    await self.rollouts.create(key, rollout)
                else:
                    await self.rollouts.update(key, rollout, last=existing.revision)
            except Conflict:
                continue
            break
        if spec.timeouts.total_timeout:
            await self.schedule(rollout, now + dt.timedelta(seconds=spec.timeouts.total_timeout), "total_timeout")
        if not targets and spec.timeouts.queue_timeout:
            await self.schedule(rollout, now + dt.timedelta(seconds=spec.timeouts.queue_timeout), "queue_timeout")

    async def _add_nodes(self, plan: Plan) -> None:
        key = s.rollout_key(plan.namespace, plan.job_id)
        record = await self.rollouts.get(key)
        if record is None:
            return
        spec = (await self.store.job_version(plan.namespace, plan.job_id, record.value.job_version)).spec

        def add(rollout: Rollout) -> bool:
            if rollout.state == "stopped" or (rollout.state == "failed" and not rollout.rollback_of):
                return False
            new = [n for n in plan.node_ids if n not in rollout.targets]
            if not new:
                return False
            rollout.targets.extend(new)
            if rollout.state == "queued":
                rollout.state = "deploying"
                rollout.queued_since = None
                rollout.wave_sizes = plan_waves(spec.rollout, len(rollout.targets))
                rollout.current_wave = 1 if rollout.gated else 0
            elif rollout.wave_sizes:
                rollout.wave_sizes[-1] += len(new)
            else:
                rollout.wave_sizes = [len(new)]
            rollout.updated_at = utcnow()
            return True

        await self.rollouts.mutate(key, add)

    async def schedule(self, rollout: Rollout, due: dt.datetime, reason: str) -> None:
        timer = Timer(namespace=rollout.namespace, job_id=rollout.job_id, due=due, reason=reason)
        msg_id = f"{rollout.job_id}:{reason}:{int(due.timestamp() * 1000)}"
        await self.bus.js_publish(s.timer(rollout.namespace), to_msgpack(timer), msg_id=msg_id)

    # -- reconcile ---------------------------------------------------------------------------------

    async def reconcile(self, namespace: str, job_id: str) -> None:
        for _ in range(8):
            if await self._pass(namespace, job_id):
                return
        log.info("reconcile of %s/%s did not settle in 8 passes; the next trigger continues", namespace, job_id)

    async def _pass(self, namespace: str, job_id: str) -> bool:
        """One pass; False when it changed the rollout record and another pass should follow."""
        job_record = await self.store.jobs.get(s.job_key(namespace, job_id))
        if job_record is None:
            return True
        job = job_record.value
        key = s.rollout_key(namespace, job_id)
        record = await self.rollouts.get(key)
        executions = [r.value for r in await self.store.executions_of_job(namespace, job_id)]
        if job.state.state_type == "stopped" or (record is not None and record.value.state == "stopped"):
            await self._stop_all(executions, "job stopped")
            if record is not None and record.value.state != "stopped":
                await self.rollouts.mutate(key, _mark_stopped)
            await self._set_job_state(job, "stopped", job.state.message or "stopped", None)
            return True
        if record is None:
            return True
        rollout = record.value
        spec = (await self.store.job_version(namespace, job_id, rollout.job_version)).spec
        now = utcnow()

        if await self._timed_out(job, rollout, record.revision, spec, executions, now):
            return False
        if rollout.state == "queued":
            await self._set_job_state(job, "queued", "waiting for eligible nodes", rollout)
            return True

        latest = latest_by_node(executions, rollout)
        started = rollout.started_targets()
        in_rollout = rollout.state in IN_PROGRESS

        # 1. Executions for every node whose wave has started (written concurrently: a wave may be thousands).
        if not (rollout.state == "failed" and not rollout.rollback_of):
            missing = [(index, node_id) for index, node_id in enumerate(started) if node_id not in latest]
            created = await gather_bounded(
                self._create(job, rollout, spec, node_id, rollout.wave_number(index), executions, now)
                for index, node_id in missing)
            for (_, node_id), execution in zip(missing, created):
                latest[node_id] = execution

        # 2. Failures against the budget (node trouble is not the version's failure), and stalls.
        newly_failed = [
            n for n in started
            if n not in rollout.failed_nodes and latest.get(n) is not None
            and latest[n].observed == "failed" and latest[n].status.stable_at is None
            and latest[n].status.details.get("reason") not in NODE_TROUBLE
        ]
        if in_rollout and newly_failed:
            await self._count_failures(job, rollout, record.revision, spec, newly_failed, executions)
            return False
        if rollout.state == "deploying" and await self._stalled(job, rollout, record.revision, spec, started,
                                                                 latest, executions, now):
            return False

        # 3. Restarts by policy: the rolled-out version where its wave has started, and whatever still
        #    runs on the targets it has not reached yet (they must not be left bare meanwhile).
        keep: set[str] = set()  # ended executions the policy will still restart (they stay desired running)
        for node_id in started:
            execution = latest.get(node_id)
            if execution is None or not restartable(execution, spec, rollout):
                continue
            keep.add(execution.id)
            if self._needs_restart(execution, spec, rollout):
                successor = await self._restart(job, rollout, spec, execution, executions, now)
                if successor is not None:
                    latest[node_id] = successor
        unreached = set(rollout.targets) - set(started)
        for execution in _current_elsewhere(executions, unreached, rollout.job_version):
            if execution.job_spec is not None and restartable(execution, execution.job_spec, rollout):
                keep.add(execution.id)
                if self._needs_restart(execution, execution.job_spec, rollout):
                    await self._restart(job, rollout, execution.job_spec, execution, executions, now)

        # 4. Stop what is superseded (older versions once the new one is stable, non-targets) and say of
        #    what has ended that it is no longer meant to run.
        await self._retire(executions, latest, set(rollout.targets), rollout, keep)

        # 5. Waves.
        if rollout.state == "deploying" and await self._advance(rollout, record.revision, spec, latest):
            return False

        await self._derive_job_state(job, rollout, spec, latest)
        return True

    async def _create(self, job: Job, rollout: Rollout, spec: JobSpec, node_id: str, wave: int,
                      executions: list[Execution], now: dt.datetime) -> Execution:
        previous = _active_other(executions, node_id, rollout.job_version)
        execution = _new_execution(
            derived_id(rollout.deployment_id, node_id), job, spec, rollout.job_version, node_id, wave,
            rollout.deployment_id, previous.id if previous else "", 0, now,
        )
        execution = await self._write_new(execution)
        if previous is not None:
            await self._link(previous, execution.id)
        executions.append(execution)
        return execution

    async def _write_new(self, execution: Execution) -> Execution:
        """Create it; if another pass or replica already did (ids are deterministic), that one is the truth."""
        try:
            await self.store.executions.create(execution.key, execution)
        except Conflict:
            existing = await self.store.executions.get(execution.key)
            if existing is not None:
                return existing.value
        return execution

    async def _link(self, previous: Execution, next_id: str) -> None:
        """previous.next = next (the newest attempt to replace an execution is the one it points to)."""

        def link(e: Execution) -> bool:
            if e.status.next_execution_id == next_id:
                return False
            e.status.next_execution_id = next_id
            return True

        await self.store.mutate_execution(previous, link)

    def _needs_restart(self, execution: Execution, spec: JobSpec, rollout: Rollout) -> bool:
        """Restart it now (once its backoff has passed)."""
        if not restartable(execution, spec, rollout):
            return False
        if execution.status.details.get("reason") in HEALTH_VERDICTS and rollout.state in IN_PROGRESS:
            return False  # a health verdict during a rollout is the rollout's signal, not a crash
        return True

    async def _restart(self, job: Job, rollout: Rollout, spec: JobSpec, execution: Execution,
                       executions: list[Execution], now: dt.datetime) -> Execution | None:
        """Create the execution that replaces an exited one, once its backoff has passed."""
        restarts = int(execution.status.details.get("restarts", 0))
        delay = min(self.settings.restart_backoff_max, self.settings.restart_backoff_base * 2 ** restarts)
        due = finished_at(execution) + dt.timedelta(seconds=delay)
        if now < due:
            await self.schedule(rollout, due, f"restart-{execution.id}")
            return None
        successor = _new_execution(
            derived_id(execution.id, "restart"), job, spec, execution.job_version, execution.node_id,
            execution.rollout_wave, rollout.deployment_id, execution.id, restarts + 1, now,
        )
        successor = await self._write_new(successor)
        await self._link(execution, successor.id)
        executions.append(successor)
        return successor

    async def _retire(self, executions: list[Execution], latest: dict[str, Execution], targets: set[str],
                      rollout: Rollout, keep: set[str]) -> None:
        changes = []
        for execution in executions:
            if execution.desired == "stopped":
                continue
            if execution.observed in TERMINAL_STATES:
                # Ended, and not waiting for a restart: no longer meant to run (so no node ever shows two
                # executions of a job desired running, nor an ended one that says it should run).
                if execution.id not in keep:
                    reason = f"ended: {execution.observed}"
                    changes.append(self.store.mutate_execution(
                        execution, lambda e, reason=reason: _desire_stop(e, reason, "")))
                continue
            if execution.job_version == rollout.job_version and latest.get(execution.node_id) is execution:
                continue
            replacement = latest.get(execution.node_id)
            if execution.node_id not in targets:
                reason = "node no longer selected"
            elif execution.job_version != rollout.job_version and replacement is not None and (
                replacement.status.stable_at is not None or replacement.observed == "completed"
            ):
                reason = f"replaced by version {rollout.job_version}"
            elif execution.job_version == rollout.job_version and execution is not replacement:
                reason = "superseded by a restart"
            else:
                continue
            next_id = replacement.id if replacement is not None else ""
            changes.append(self.store.mutate_execution(
                execution, lambda e, reason=reason, next_id=next_id: _desire_stop(e, reason, next_id)))
        await gather_bounded(changes)

    async def _advance(self, rollout: Rollout, revision: int, spec: JobSpec, latest: dict[str, Execution]) -> bool:
        """Start the next wave, await promotion, or finish; True if the record changed."""
        started = rollout.started_targets()
        if not all(settled(latest.get(n)) or n in rollout.failed_nodes for n in started):
            return False
        if rollout.gated and rollout.current_wave < len(rollout.wave_sizes):
            if rollout.strategy == "canary" and rollout.current_wave == 1 and not spec.rollout.auto_promote:
                return await self._set_rollout(rollout, revision, state="awaiting_promotion",
                                               message="canary healthy; waiting for promotion")
            return await self._set_rollout(rollout, revision, current_wave=rollout.current_wave + 1,
                                           message=f"wave {rollout.current_wave} healthy")
        changed = await self._set_rollout(rollout, revision, state="succeeded", finished=True,
                                          message=_finished_message(rollout))
        if changed and not rollout.rollback_of:
            await self._mark_stable(rollout)
        return changed

    async def _set_rollout(self, rollout: Rollout, revision: int, *, state: str | None = None,
                           current_wave: int | None = None, message: str | None = None,
                           finished: bool = False) -> bool:
        if state is not None:
            rollout.state = state  # type: ignore[assignment]
        if current_wave is not None:
            rollout.current_wave = current_wave
        if message is not None:
            rollout.message = message
        now = utcnow()
        rollout.updated_at = now
        if finished:
            rollout.finished_at = now
        try:
            await self.rollouts.update(s.rollout_key(rollout.namespace, rollout.job_id), rollout, last=revision)
        except Conflict:
            pass  # someone else moved it; the next pass re-reads
        return True

    async def _mark_stable(self, rollout: Rollout) -> None:
        def change(job: Job) -> bool:
            if job.stable_version >= rollout.job_version:
                return False
            job.stable_version = rollout.job_version
            job.revision += 1
            job.modified_at = utcnow()
            return True

        await self.store.jobs.mutate(s.job_key(rollout.namespace, rollout.job_id), change)

    # -- failure budget and rollback ---------------------------------------------------------------

    async def _count_failures(self, job: Job, rollout: Rollout, revision: int, spec: JobSpec,
                              newly_failed: list[str], executions: list[Execution]) -> None:
        rollout.failed_nodes.extend(newly_failed)
        budget = spec.rollout
        if rollout.rollback_of or not budget_exceeded(len(rollout.failed_nodes), len(rollout.targets),
                                                      budget.max_failed_nodes, budget.max_failed_nodes_percent):
            await self._set_rollout(rollout, revision)
            return
        reason = (f"{len(rollout.failed_nodes)} of {len(rollout.targets)} nodes failed, more than the budget "
                  f"(max_failed_nodes {budget.max_failed_nodes}, max_failed_nodes_percent "
                  f"{budget.max_failed_nodes_percent:g})")
        await self.fail(job, rollout, revision, spec, reason, executions)

    async def fail(self, job: Job, rollout: Rollout, revision: int, spec: JobSpec, reason: str,
                   executions: list[Execution]) -> None:
        """Stop the rollout and, unless disabled, restore the last stable version on the affected nodes."""
        outcome = await self._rollback(job, rollout, revision, spec, reason, executions)
        if outcome is None:
            return  # lost a race; the next pass decides again
        await self._set_job_state(job, "rollout_failed", outcome, None, force=True)

    async def _rollback(self, job: Job, rollout: Rollout, revision: int, spec: JobSpec, reason: str,
                        executions: list[Execution]) -> str | None:
        key = s.rollout_key(rollout.namespace, rollout.job_id)
        stable = job.stable_version
        if spec.rollout.no_auto_rollback:
            message = f"{reason}; automatic rollback disabled"
        elif rollout.rollback_of:
            message = f"{reason}; this was already a rollback, so it stops here"
        elif stable == 0 or stable == rollout.job_version:
            message = f"{reason}; no earlier stable version, version {rollout.job_version} stopped"
            await self._stop_all([e for e in executions if e.job_version == rollout.job_version], message)
        else:
            stable_spec = await self.store.job_version(rollout.namespace, rollout.job_id, stable)
            current = await self.store.job_version(rollout.namespace, rollout.job_id, rollout.job_version)
            if stable_spec.spec_hash == current.spec_hash:
                message = f"{reason}; version {stable} has the same spec, so there is nothing to roll back to"
            else:
                message = f"{reason}; rolling back to version {stable}"
                restore = _rollback_targets(rollout)
                now = utcnow()
                replacement = Rollout(
                    namespace=rollout.namespace, job_id=rollout.job_id,
                    deployment_id=derived_id(rollout.deployment_id, "rollback"),
                    job_version=stable, source_version=rollout.source_version, strategy="immediate",
                    state="deploying", targets=restore, wave_sizes=[len(restore)] if restore else [],
                    rollback_of=rollout.job_version, cause=reason, previous_version=rollout.job_version,
                    message=message,
                    created_at=now, updated_at=now,
                )
                try:
                    await self.rollouts.update(key, replacement, last=revision)
                except Conflict:
                    return None
                log.info("%s/%s: %s", rollout.namespace, rollout.job_id, message)
                return message
        rollout.state = "failed"
        rollout.message = message
        rollout.updated_at = rollout.finished_at = utcnow()
        try:
            await self.rollouts.update(key, rollout, last=revision)
        except Conflict:
            return None
        log.info("%s/%s: %s", rollout.namespace, rollout.job_id, message)
        return message

    async def _timed_out(self, job: Job, rollout: Rollout, revision: int, spec: JobSpec,
                         executions: list[Execution], now: dt.datetime) -> bool:
        """Queue and total timeouts; True if one fired (the job fails and its executions stop)."""
        if job.state.state_type in ENDED_JOB_STATES or rollout.state in ("failed", "stopped"):
            return False
        timeouts = spec.timeouts
        message = ""
        if rollout.state == "queued" and timeouts.queue_timeout and rollout.queued_since is not None:
            if now >= rollout.queued_since + dt.timedelta(seconds=timeouts.queue_timeout):
                message = f"no eligible nodes within queue_timeout ({timeouts.queue_timeout}s)"
        if not message and timeouts.total_timeout:
            if now >= rollout.created_at + dt.timedelta(seconds=timeouts.total_timeout):
                message = f"total_timeout ({timeouts.total_timeout}s) exceeded"
        if not message:
            return False
        rollout.state = "failed"
        rollout.timed_out = True
        rollout.message = message
        rollout.updated_at = rollout.finished_at = now
        try:
            await self.rollouts.update(s.rollout_key(rollout.namespace, rollout.job_id), rollout, last=revision)
        except Conflict:
            return True
        await self._stop_all(executions, message)
        await self._set_job_state(job, "failed", message, None, force=True)
        return True

    # -- job state ---------------------------------------------------------------------------------

    async def _derive_job_state(self, job: Job, rollout: Rollout, spec: JobSpec,
                                latest: dict[str, Execution]) -> None:
        state = rollout.state
        if rollout.timed_out:
            await self._set_job_state(job, "failed", rollout.message, rollout)
            return
        if rollout.rollback_of or state == "failed":
            if state == "succeeded":
                message = f"rolled back to version {rollout.job_version} after: {rollout.cause}"
            else:
                message = rollout.message
            await self._set_job_state(job, "rollout_failed", message, rollout)
            return
        if state in ("paused", "awaiting_promotion"):
            await self._set_job_state(job, "rollout_paused", rollout.message, rollout)
            return
        if state == "deploying":
            waves = f" (wave {rollout.current_wave} of {len(rollout.wave_sizes)})" if rollout.gated else ""
            await self._set_job_state(job, "deploying", f"deploying version {rollout.job_version}{waves}", rollout)
            return
        current = [latest[n] for n in rollout.targets if n in latest]
        if job.type in ONE_SHOT_JOB_TYPES and current and all(e.observed in TERMINAL_STATES and not self._needs_restart(e, spec, rollout)
                                        for e in current):
            failed = [e for e in current if e.observed != "completed"]
            if failed:
                await self._set_job_state(job, "failed", f"{len(failed)} of {len(current)} executions failed", rollout)
            else:
                await self._set_job_state(job, "completed", f"completed on {len(current)} nodes", rollout)
            return
        troubled = [e for e in current if e.observed in ("degraded", "lost", "failed")]
        if troubled:
            await self._set_job_state(job, "degraded", f"{len(troubled)} of {len(current)} executions degraded, "
                                                       "lost or failed", rollout)
        else:
            await self._set_job_state(job, "running", f"version {rollout.job_version} on {len(current)} nodes",
                                      rollout)

    async def _set_job_state(self, job: Job, state: str, message: str, rollout: Rollout | None,
                             *, force: bool = False) -> None:
        def change(current: Job) -> bool:
            if current.state.state_type == "stopped" and state != "stopped":
                return False
            if rollout is not None and current.version != rollout.source_version and not force:
                return False  # a newer version was submitted; its own plan sets the state
            if current.state.state_type == state and current.state.message == message:
                return False
            current.state = JobState(state_type=state, message=message)  # type: ignore[arg-type]
            current.modified_at = utcnow()
            current.revision += 1
            return True

        await self.store.jobs.mutate(s.job_key(job.namespace, job.id), change)

    async def _stop_all(self, executions: list[Execution], reason: str) -> None:
        await gather_bounded(
            self.store.mutate_execution(execution, lambda e: _desire_stop(e, reason, ""))
            for execution in executions
            if execution.desired != "stopped"
        )

    async def _stalled(self, job: Job, rollout: Rollout, revision: int, spec: JobSpec, started: list[str],
                       latest: dict[str, Execution], executions: list[Execution], now: dt.datetime) -> bool:
        """Count executions of a gated wave that never settle (pending, starting or unjudged long past
        their health deadline) as failed nodes, stop them, and say so; otherwise wake up when the next
        one could stall. True if the rollout record changed."""
        check = spec.rollout.health_check
        if not rollout.gated or check is None:
            return False
        # Stalled: it never started, or nothing can judge it. Counted as failed rather than waited for.
        limit = dt.timedelta(microseconds=check.deadline // 1000, seconds=self.settings.stall_grace)
        stalled: list[Execution] = []
        soonest: dt.datetime | None = None
        for node_id in started:
            execution = latest.get(node_id)
            if (execution is None or node_id in rollout.failed_nodes or settled(execution)
                    or execution.observed == "lost" or execution.desired != "running"):
                continue
            due = execution.status.created_at + limit
            if now >= due:
                stalled.append(execution)
            elif soonest is None or due < soonest:
                soonest = due
        if not stalled:
            if soonest is not None:
                await self.schedule(rollout, soonest, "stall-check")
            return False
        reason = f"stalled: still {{}} {limit.total_seconds():g}s after it was created (health deadline + grace)"
        await gather_bounded(
            self.store.mutate_execution(e, lambda x, e=e: _desire_stop(x, reason.format(e.observed), ""))
            for e in stalled)
        names = ", ".join(f"{e.node_id} ({e.observed})" for e in stalled[:5])
        more = f" and {len(stalled) - 5} more" if len(stalled) > 5 else ""
        log.info("%s/%s: wave %d stalled on %s%s", rollout.namespace, rollout.job_id, rollout.current_wave,
                 names, more)
        rollout.message = f"wave {rollout.current_wave}: {names}{more} never settled; counted as failed"
        await self._count_failures(job, rollout, revision, spec, [e.node_id for e in stalled], executions)
        return True


# -- helpers -----------------------------------------------------------------------------------------


def restartable(execution: Execution, spec: JobSpec, rollout: Rollout) -> bool:
    """An ended execution that the restart policy replaces (now, or once its rollout allows it)."""
    if execution.desired != "running" or execution.status.next_execution_id:
        return False
    if rollout.state == "failed" and not rollout.rollback_of:
        return False  # a failed rollout is not kept alive by restarts
    observed = execution.observed
    if observed == "completed":
        return spec.restart_policy == "always"
    if observed in ("failed", "stopped"):
        return spec.restart_policy in ("on-failure", "always")
    return False


def finished_at(execution: Execution) -> dt.datetime:
    """When the execution reached its terminal state (recorded by the health service)."""
    return parse_rfc3339(execution.status.details.get("finished_at")) or execution.status.updated_at


def _mark_stopped(rollout: Rollout) -> bool:
    if rollout.state == "stopped":
        return False
    rollout.state = "stopped"
    rollout.message = "job stopped"
    rollout.updated_at = rollout.finished_at = utcnow()
    return True


def _desire_stop(execution: Execution, reason: str, next_id: str) -> bool:
    if execution.desired == "stopped":
        return False
    execution.status.desired_state = DesiredState(state_type="stopped", message=reason)
    if next_id and not execution.status.next_execution_id:
        execution.status.next_execution_id = next_id
    return True


def latest_by_node(executions: list[Execution], rollout: Rollout) -> dict[str, Execution]:
    """Per node, the newest execution of the rolled-out version that belongs to this rollout.

    That is one this deployment created (restarts make chains; the head is the newest), or one of an
    earlier deployment of the same version that is still meant to run (a rollback keeps those).
    """
    latest: dict[str, Execution] = {}
    for execution in executions:
        if execution.job_version != rollout.job_version:
            continue
        if execution.eval_id != rollout.deployment_id and (
            execution.desired != "running" or execution.observed in TERMINAL_STATES
        ):
            continue
        held = latest.get(execution.node_id)
        if held is None or (execution.status.created_at, execution.id) > (held.status.created_at, held.id):
            latest[execution.node_id] = execution
    return latest


def _active_other(executions: list[Execution], node_id: str, version: int) -> Execution | None:
    """The execution of another version that a new one on this node replaces: the newest one still
    running there, else the newest one meant to run that nothing follows yet (a failed version that a
    rollback undoes)."""
    meant = [e for e in executions if e.node_id == node_id and e.job_version != version and e.desired == "running"]
    live = [e for e in meant if e.observed not in TERMINAL_STATES]
    candidates = live or [e for e in meant if not e.status.next_execution_id]
    return max(candidates, key=lambda e: (e.status.created_at, e.id), default=None)


def _rollback_targets(rollout: Rollout) -> list[str]:
    """Every target of the failed rollout: the stable version must run on all of them again. Where it
    still runs it is kept as it is; where it does not (the failed version replaced it, or it ended while
    the rollout had not reached the node yet) it is started again: no node is left bare."""
    return list(rollout.targets)


def _current_elsewhere(executions: list[Execution], nodes: set[str], version: int) -> list[Execution]:
    """On each of `nodes`, the newest execution of another version than `version` that is meant to run
    and that nothing replaces yet: what a rollout that has not reached the node leaves running there."""
    current: dict[str, Execution] = {}
    for e in executions:
        if (e.node_id in nodes and e.job_version != version and e.desired == "running"
                and not e.status.next_execution_id):
            held = current.get(e.node_id)
            if held is None or (e.status.created_at, e.id) > (held.status.created_at, held.id):
                current[e.node_id] = e
    return list(current.values())


def _finished_message(rollout: Rollout) -> str:
    if rollout.rollback_of:
        return f"rolled back to version {rollout.job_version} on {len(rollout.targets)} nodes after: {rollout.cause}"
    failed = f", {len(rollout.failed_nodes)} failed" if rollout.failed_nodes else ""
    return f"version {rollout.job_version} rolled out to {len(rollout.targets)} nodes{failed}"


def _new_execution(execution_id: str, job: Job, spec: JobSpec, version: int, node_id: str, wave: int,
                   eval_id: str, previous_id: str, restarts: int, now: dt.datetime) -> Execution:
    details: dict[str, object] = {"restarts": restarts} if restarts else {}
    return Execution(
        id=execution_id,
        eval_id=eval_id,
        job_id=job.id,
        job_type=spec.type,
        job_version=version,
        namespace=job.namespace,
        node_id=node_id,
        rollout_wave=wave,
        status=ExecutionStatus(
            created_at=now,
            updated_at=now,
            revision=1,
            desired_state=DesiredState(state_type="running"),
            observed_state=ObservedState(state_type="pending"),
            previous_execution_id=previous_id,
            details=details,
        ),
        job_spec=spec,
    )

"""The rollout controller: the triggers of a job's reconcile, and plans turned into rollout records.

`reconcile(job)` reads the job, its rollout record, the spec it rolls out and the job's executions,
asks `decide` for one step and has `apply` carry it out, pass after pass until a step leaves the
rollout record as it was (at most 8 passes; the next trigger carries on). It is triggered by plans, by
execution events, by timers and by the rollout API, may run on any replica at any time, and
converges: decisions are pure, writes are compare-and-set and execution ids are deterministic, so a
repeated pass changes nothing. See docs/ROLLOUTS.md for the rules.
"""

from __future__ import annotations

import datetime as dt
import logging

from shared import subjects as s
from shared.durations import utcnow
from shared.errors import Conflict
from shared.models import JobVersion, Plan
from shared.settings import Settings
from shared.store import Bucket, Store
from shared.transport import Bus

from . import decide as rules
from .apply import Applier
from .archive import Archiver
from .jobstate import JobState
from .model import Rollout
from .waves import plan_waves

log = logging.getLogger(__name__)

MAX_PASSES = 8
VERSIONS_KEPT = 10_000


class Controller:
    def __init__(self, bus: Bus, store: Store, settings: Settings) -> None:
        self.bus = bus
        self.store = store
        self.settings = settings
        self.rollouts: Bucket[Rollout] = Bucket(bus, s.BUCKET_ROLLOUTS, Rollout)
        self.applier = Applier(bus, store, self.rollouts)
        self.archiver = Archiver(store)
        self.policy = rules.Policy(restart_backoff_base=settings.restart_backoff_base,
                                   restart_backoff_max=settings.restart_backoff_max,
                                   stall_grace=settings.stall_grace)
        self.passes = 0  # reconcile passes run by this replica (benchmarks read it)
        self.record_reads = 0  # rollout records read by its passes
        self._versions: dict[tuple[str, str, int], JobVersion] = {}

    # -- plans -------------------------------------------------------------------------------------

    async def apply_plan(self, plan: Plan) -> None:
        if plan.kind == "deploy":
            await self._deploy(plan)
        elif plan.kind == "add-nodes":
            await self._add_nodes(plan)
        elif plan.kind == "stop":
            now = utcnow()
            await self.rollouts.mutate(s.rollout_key(plan.namespace, plan.job_id),
                                       lambda r: r.state != "stopped" and _stop(r, now))
        # The record's change reaches the owner of the job's partition as an event: it reconciles.

    async def wake(self, namespace: str, job_id: str) -> None:
        """A timer of the job fell due: touch its rollout record so that the partition's owner reconciles."""
        def bump(rollout: Rollout) -> bool:
            rollout.wakes += 1
            return True

        await self.rollouts.mutate(s.rollout_key(namespace, job_id), bump)

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
        timeouts = spec.timeouts
        if timeouts.total_timeout:
            await self.applier.schedule(plan.namespace, plan.job_id,
                                        now + dt.timedelta(seconds=timeouts.total_timeout), "total_timeout")
        if not targets and timeouts.queue_timeout:
            await self.applier.schedule(plan.namespace, plan.job_id,
                                        now + dt.timedelta(seconds=timeouts.queue_timeout), "queue_timeout")

    async def _add_nodes(self, plan: Plan) -> None:
        key = s.rollout_key(plan.namespace, plan.job_id)
        record = await self.rollouts.get(key)
        if record is None:
            return
        spec = (await self.store.job_version(plan.namespace, plan.job_id, record.value.job_version)).spec
        now = utcnow()
        await self.rollouts.mutate(key, lambda r: add_nodes(r, plan.node_ids, spec.rollout, now))

    # -- reconcile ---------------------------------------------------------------------------------

    async def reconcile(self, namespace: str, job_id: str, state: JobState | None = None) -> None:
        """Passes until the job is where its rollout wants it. With `state` (the partition owner's memory of
        the job, and its per-node index) a pass reads two records and what changed, not every execution of
        the job."""
        for _ in range(MAX_PASSES):
            loaded = await self.view(namespace, job_id, state)
            if loaded is None:
                return
            view, revision = loaded
            self.passes += 1
            step = rules.decide(view)
            if step.empty:
                return
            applied = await self.applier.apply(view.job, revision, step, state.offer if state is not None else None)
            if state is not None and (step.rollout is not None or not applied):
                state.record = None  # written (or changed by someone else): read it again
            if applied and not step.again:
                return
        log.info("reconcile of %s/%s did not settle in %d passes; the next trigger continues",
                 namespace, job_id, MAX_PASSES)

    async def view(self, namespace: str, job_id: str, state: JobState | None = None) -> tuple[rules.View, int] | None:
        """What a pass decides from, and the revision of the rollout record it read (0: none)."""
        job_record = await self.store.jobs.get(s.job_key(namespace, job_id))
        if job_record is None:
            return None
        job = job_record.value
        record = state.record if state is not None else None
        if record is None:
            record = await self.rollouts.get(s.rollout_key(namespace, job_id))
            self.record_reads += 1
            if state is not None:
                state.record = record
        if state is None:
            executions = [r.value for r in await self.store.executions_of_job(namespace, job_id)]
            specs = {e.job_version: e.job_spec for e in executions if e.job_spec is not None}
        else:
            if not state.loaded:
                await state.load(self.store)
            executions, specs = [], state.specs
        rollout = record.value if record is not None else None
        spec = None
        hashes: dict[int, str] = {}
        if rollout is not None:
            current = await self.version(namespace, job_id, rollout.job_version)
            spec = current.spec
            specs.setdefault(rollout.job_version, spec)
            hashes[rollout.job_version] = current.spec_hash
            stable = job.stable_version
            if stable and stable != rollout.job_version:
                hashes[stable] = (await self.version(namespace, job_id, stable)).spec_hash
        nodes = None
        if state is not None:
            if (gone := state.prune(rollout)) and rollout is not None:
                self.archiver.add(rollout, gone)
            if rollout is not None and spec is not None:
                nodes = state.nodes(rollout, spec)  # a pass reads what changed, not every execution
            else:
                executions = list(state.executions.values())
        view = rules.View(job=job, rollout=rollout, spec=spec, executions=rules.relevant(executions, rollout),
                          now=utcnow(), policy=self.policy, spec_hashes=hashes, specs=specs, nodes=nodes)
        return view, record.revision if record is not None else 0

    async def version(self, namespace: str, job_id: str, version: int) -> JobVersion:
        """A job version (they never change once written: kept once read)."""
        key = (namespace, job_id, version)
        found = self._versions.get(key)
        if found is None:
            found = self._versions[key] = await self.store.job_version(namespace, job_id, version)
            while len(self._versions) > VERSIONS_KEPT:
                self._versions.pop(next(iter(self._versions)))
        return found

    async def fail(self, namespace: str, job_id: str, reason: str) -> bool:
        """Fail a rollout in progress by hand (abort): roll back as a failure past the budget would. False
        if the record changed meanwhile (the caller may try again)."""
        loaded = await self.view(namespace, job_id)
        if loaded is None or loaded[0].rollout is None:
            return False
        view, revision = loaded
        assert view.rollout is not None
        step = rules.Step()
        rules.fail(view, rules._copy(view.rollout), reason, step)
        return await self.applier.apply(view.job, revision, step)


def add_nodes(rollout: Rollout, node_ids: list[str], spec_rollout, now: dt.datetime) -> bool:
    """Nodes that joined (or came back) and match: appended to the last wave, or the first of a queued
    rollout. False if nothing changes (a stopped or failed rollout takes none)."""
    if rollout.state == "stopped" or (rollout.state == "failed" and not rollout.rollback_of):
        return False
    new = [n for n in node_ids if n not in rollout.targets]
    if not new:
        return False
    rollout.targets.extend(new)
    if rollout.state == "queued":
        rollout.state = "deploying"
        rollout.queued_since = None
        rollout.wave_sizes = plan_waves(spec_rollout, len(rollout.targets))
        rollout.current_wave = 1 if rollout.gated else 0
    elif rollout.wave_sizes:
        rollout.wave_sizes[-1] += len(new)
    else:
        rollout.wave_sizes = [len(new)]
    rollout.updated_at = now
    return True


def _stop(rollout: Rollout, now: dt.datetime) -> bool:
    stopped = rules.stopped(rollout, now)
    rollout.state, rollout.message = stopped.state, stopped.message
    rollout.updated_at, rollout.finished_at = stopped.updated_at, stopped.finished_at
    return True

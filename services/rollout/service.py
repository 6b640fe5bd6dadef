"""The rollout service: turns plans into executions, wave by wave, and answers the rollout API.

Plans, timers and the rollout API are taken by any replica and only write the job's rollout record (a
plan makes it, a due timer bumps its `wakes`, the API changes its state). Every change of a job, of its
rollout record or of one of its executions then reaches, as an event of the job's partition, the one
replica that owns the partition (`partitions.py`): it keeps the job's executions in memory and
reconciles the job (`Partition`, `Controller.reconcile`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

from shared import metrics
from shared import subjects as s
from shared import telemetry
from shared.api import RollbackStory, RolloutRequest, RolloutStatus, WaveStatus, node_failure
from shared.codec import decode_message, from_json, from_msgpack_or_none, to_json
from shared.durations import rfc3339, utcnow
from shared.errors import Conflict, NotFound
from shared.models import Execution, Plan, details
from shared.runtime import Component
from shared.store import Record, Store
from shared.transport import ApiRequest, ApiService, Bus, Consumer, ConsumerSpec, Delivery, is_delete
from shared.validation import check_namespace

from .controller import Controller
from .decide import NODE_TROUBLE, latest_by_node
from .jobstate import JobState
from .partitions import Ownership
from .model import IN_PROGRESS, Rollout, Timer

log = logging.getLogger(__name__)

VERSION = "0.1.0"
LEGACY_EVENTS_CONSUMER = "rollout-events"
FAILURES_SHOWN = 10  # failed nodes a rollout status describes one by one (all are listed by id)
ROLLOUT_EVENT = s.EVENTS_ROLLOUT + "."
# Events of a partition taken at once: each touched job is reconciled once per batch.
EVENTS_BATCH = 2048


def first_failures(executions: Sequence[Execution], version: int) -> dict[str, Execution]:
    """Per node, the first execution of `version` that failed the node in its rollout: failed before it
    was stable (node trouble aside, as the budget counts), or stopped because it stalled."""
    first: dict[str, Execution] = {}
    for execution in executions:
        if execution.job_version != version:
            continue
        failed = (execution.observed == "failed" and execution.status.stable_at is None
                  and details(execution).reason not in NODE_TROUBLE)
        stalled = (execution.desired == "stopped"
                   and execution.status.desired_state.message.startswith("stalled"))
        if not (failed or stalled):
            continue
        held = first.get(execution.node_id)
        if held is None or (execution.status.created_at, execution.id) < (held.status.created_at, held.id):
            first[execution.node_id] = execution
    return first


class Partition:
    """One owned partition: its events consumer, and the state of its jobs in memory.

    Each batch of events updates the jobs' states, then every job it touched is reconciled once
    (coalescing), one job after another (a job's passes never overlap), and the batch is acked after
    that. A job whose reconcile fails fails only its own events (retried, then dead letters).
    """

    def __init__(self, bus: Bus, controller: Controller, k: int, *, jobs_kept: int = 10_000) -> None:
        self.controller = controller
        self.k = k
        self.jobs: OrderedDict[tuple[str, str], JobState] = OrderedDict()
        self.jobs_kept = jobs_kept
        self.consumer = Consumer(bus, ConsumerSpec(stream=s.STREAM_EVENTS, durable=s.consumer_rollout_partition(k),
                                                   filter_subject=s.partition_filter(k),
                                                   max_ack_pending=8192), batch=EVENTS_BATCH)
        self.gauges = metrics.RolloutGauges()  # metrics: what this partition's rollouts add to the gauges

    async def start(self) -> None:
        await self.consumer.start_batch(self.on_events)

    async def stop(self) -> None:
        await self.consumer.stop()
        await self.controller.archiver.drain()
        self.jobs.clear()
        self.gauges.clear()

    def state(self, namespace: str, job_id: str) -> JobState:
        key = (namespace, job_id)
        state = self.jobs.get(key)
        if state is None:
            state = self.jobs[key] = JobState(namespace, job_id)
            while len(self.jobs) > self.jobs_kept:
                self.jobs.popitem(last=False)  # the least recently touched: loaded again if needed
        self.jobs.move_to_end(key)
        return state

    async def on_events(self, deliveries: Sequence[Delivery]) -> dict[Delivery, Exception]:
        touched: dict[tuple[str, str], list[Delivery]] = {}
        traces: dict[tuple[str, str], dict[str, str]] = {}
        rollouts: dict[tuple[str, str], Delivery] = {}  # metrics: each job's latest rollout record
        for d in deliveries:
            namespace, job_id = s.event_job(d.subject)
            if d.subject.startswith(ROLLOUT_EVENT):
                rollouts[(namespace, job_id)] = d
            if s.archived(d.headers):  # history moved to the archive: nothing to decide
                if (held := self.jobs.get((namespace, job_id))) is not None:
                    held.forget(d.subject.rsplit(".", 1)[-1])
                continue
            state = self.state(namespace, job_id)
            if d.subject.startswith(ROLLOUT_EVENT):
                state.record = None  # it changed: the next pass reads it
            touched.setdefault((namespace, job_id), []).append(d)
            if trace := telemetry.trace_headers(d.headers):
                traces[(namespace, job_id)] = trace  # the job's trace: what its reconcile writes carries on
            if d.subject.startswith(s.EVENTS_EXECUTION + ".") and state.loaded:
                if is_delete(d.headers):
                    state.forget(d.subject.rsplit(".", 1)[-1])
                elif (execution := from_msgpack_or_none(d.data, Execution, d.subject)) is not None:
                    state.offer(execution)
        await self._observe(rollouts)
        failures: dict[Delivery, Exception] = {}
        for (namespace, job_id), events in touched.items():
            try:
                with telemetry.span("reconcile", headers=traces.get((namespace, job_id)),
                                    attributes={"shoal.namespace": namespace, "shoal.job_id": job_id}):
                    await self.controller.reconcile(namespace, job_id, self.state(namespace, job_id))
            except Exception as exc:
                log.warning("reconcile of %s/%s failed: %s", namespace, job_id, exc)
                self.jobs.pop((namespace, job_id), None)  # load it afresh next time
                failures.update((d, exc) for d in events)
        return failures

    async def _observe(self, latest: dict[tuple[str, str], Delivery]) -> None:
        """metrics: each rollout's wave, and its failed nodes against its budget, from its latest record
        (a rollback spends no budget: it counts as in progress only)."""
        for key, d in latest.items():
            rollout = None if is_delete(d.headers) else from_msgpack_or_none(d.data, Rollout, d.subject)
            if rollout is None:
                self.gauges.forget(key)
                continue
            in_progress = rollout.state in IN_PROGRESS
            budget = failed = 0
            if in_progress and not rollout.rollback_of:
                failed = len(rollout.failed_nodes)
                try:
                    limits = (await self.controller.version(key[0], key[1], rollout.job_version)).spec.rollout
                    budget = metrics.allowed_failures(len(rollout.targets), limits.max_failed_nodes,
                                                      limits.max_failed_nodes_percent)
                except Exception as exc:  # cannot be read now: the budget counts from the next change on
                    log.debug("budget of %s/%s unknown: %s", key[0], key[1], exc)
            self.gauges.observe(key, strategy=rollout.strategy, in_progress=in_progress, wave=rollout.current_wave,
                                failed=failed, budget=budget, state=rollout.state)


class RolloutService(Component):
    name = "rollout"

    async def start(self) -> None:
        self.store = Store(self.bus)
        self.controller = Controller(self.bus, self.store, self.settings)

        await ApiService.start(self.bus, s.SERVICE_ROLLOUT, VERSION, "Rollouts: waves, canaries, rollback",
                               queue_group=s.QUEUE_GROUP, endpoints=[
                                   (op.replace(".", "-"), s.api("*", op), handler) for op, handler in (
                                       (s.ROLLOUT_STATUS, self.status),
                                       (s.ROLLOUT_PROMOTE, self.promote),
                                       (s.ROLLOUT_PAUSE, self.pause),
                                       (s.ROLLOUT_RESUME, self.resume),
                                       (s.ROLLOUT_ABORT, self.abort),
                                   )])

        await Consumer(self.bus, ConsumerSpec(stream=s.STREAM_PLANS, durable=s.CONSUMER_ROLLOUT_PLANS),
                       concurrency=8).start_single(self.on_plan)
        await Consumer(self.bus, ConsumerSpec(stream=s.STREAM_TIMERS, durable=s.CONSUMER_ROLLOUT_TIMERS),
                       concurrency=4).start_single(self.on_timer)
        # Events go to the owner of their job's partition, which keeps the job's executions in memory.
        await self.bus.delete_consumer(s.STREAM_EVENTS, LEGACY_EVENTS_CONSUMER)  # shared by all, before partitions
        self.partitions: dict[int, Partition] = {}
        self.ownership = Ownership(self.bus, self._gained, self._lost)
        self.spawn(lambda: self.ownership.run(self.stopping), "partitions")

    # -- triggers ----------------------------------------------------------------------------------

    async def on_plan(self, delivery: Delivery) -> None:
        await self.controller.apply_plan(decode_message(delivery.data, Plan, f"plan on {delivery.subject}"))

    async def _gained(self, k: int) -> None:
        partition = Partition(self.bus, self.controller, k)
        await partition.start()
        self.partitions[k] = partition

    async def _lost(self, k: int) -> None:
        partition = self.partitions.pop(k, None)
        if partition is not None:
            await partition.stop()

    async def on_timer(self, delivery: Delivery) -> None:
        timer = decode_message(delivery.data, Timer, f"timer on {delivery.subject}")
        remaining = (timer.due - utcnow()).total_seconds()
        if remaining > 0:
            await delivery.nak(delay=remaining + 0.05)
            return
        await self.controller.wake(timer.namespace, timer.job_id)

    # -- API ---------------------------------------------------------------------------------------

    async def _target(self, req: ApiRequest) -> tuple[RolloutRequest, Record, Record[Rollout]]:
        namespace = check_namespace(req.token(2))
        body = from_json(req.data, RolloutRequest)
        job = await self.store.find_job(namespace, body.job)
        rollout = await self.controller.rollouts.get(s.rollout_key(namespace, job.value.id))
        if rollout is None:
            raise NotFound(f"job {body.job!r} has no rollout yet", field="job")
        return body, job, rollout

    async def status(self, req: ApiRequest) -> bytes:
        _, job_record, record = await self._target(req)
        return to_json(await self._status(job_record, record.value))

    async def _status(self, job_record: Record, rollout: Rollout) -> RolloutStatus:
        job = job_record.value
        executions = [r.value for r in await self.store.executions_of_job(rollout.namespace, rollout.job_id)]
        latest = latest_by_node(executions, rollout)
        spec = (await self.store.job_version(rollout.namespace, rollout.job_id, rollout.job_version)).spec
        waves: list[WaveStatus] = []
        sizes = rollout.wave_sizes if rollout.gated else [len(rollout.targets)]
        edge = 0
        for number, size in enumerate(sizes, start=1):
            nodes = rollout.targets[edge: edge + size]
            edge += size
            states: dict[str, int] = {}
            for node in nodes:
                execution = latest.get(node)
                state = execution.observed if execution is not None else "not started"
                states[state] = states.get(state, 0) + 1
            waves.append(WaveStatus(wave=number if rollout.gated else 0, nodes=size,
                                    started=not rollout.gated or number <= rollout.current_wave, states=states))
        failed_here = first_failures(executions, rollout.job_version)
        story = None
        if rollout.rollback_of:
            # The rollback replaced the failed rollout's record: its failed nodes are where the failed
            # version's executions failed, and its budget is the failed version's own.
            failed_spec = (await self.store.job_version(rollout.namespace, rollout.job_id, rollout.rollback_of)).spec
            failed = first_failures(executions, rollout.rollback_of)
            story = RollbackStory(
                version=rollout.rollback_of, cause=rollout.cause, target_nodes=len(rollout.targets),
                failed_nodes=sorted(failed),
                failures=[node_failure(n, failed[n]) for n in sorted(failed, key=lambda n: (
                    failed[n].status.created_at, n))[:FAILURES_SHOWN]],
                max_failed_nodes=failed_spec.rollout.max_failed_nodes,
                max_failed_nodes_percent=failed_spec.rollout.max_failed_nodes_percent,
            )
        return RolloutStatus(
            job_id=job.id, job_name=job.name, job_version=rollout.job_version, job_state=job.state.state_type,
            strategy=rollout.strategy, state=rollout.state, current_wave=rollout.current_wave,
            total_waves=len(rollout.wave_sizes) if rollout.gated else (1 if rollout.targets else 0),
            target_nodes=len(rollout.targets), waves=waves, failed_nodes=list(rollout.failed_nodes),
            max_failed_nodes=spec.rollout.max_failed_nodes,
            max_failed_nodes_percent=spec.rollout.max_failed_nodes_percent,
            rollback_of=rollout.rollback_of, previous_version=rollout.previous_version, message=rollout.message,
            started_at=rfc3339(rollout.created_at), finished_at=rfc3339(rollout.finished_at),
            failures=[node_failure(n, failed_here.get(n)) for n in rollout.failed_nodes[:FAILURES_SHOWN]],
            rollback=story,
        )

    async def _transition(self, req: ApiRequest, allowed: set[str], change) -> bytes:
        body, job_record, record = await self._target(req)
        rollout = record.value
        if rollout.state not in allowed:
            raise Conflict(f"rollout of {body.job!r} is {rollout.state}; this needs it to be "
                           f"{' or '.join(sorted(allowed))}", field="job", retryable=False)
        change(rollout, body)
        rollout.updated_at = utcnow()
        try:
            await self.controller.rollouts.update(record.key, rollout, last=record.revision)
        except Conflict:
            raise Conflict("the rollout changed while this request was applied; try again", field="job") from None
        fresh = await self.controller.rollouts.get(record.key)
        job = await self.store.jobs.get(job_record.key)
        return to_json(await self._status(job or job_record, fresh.value if fresh else rollout))

    async def promote(self, req: ApiRequest) -> bytes:
        def change(r: Rollout, body: RolloutRequest) -> None:
            r.state = "deploying"
            r.current_wave += 1
            r.message = body.reason or "canary promoted"

        return await self._transition(req, {"awaiting_promotion"}, change)

    async def pause(self, req: ApiRequest) -> bytes:
        def change(r: Rollout, body: RolloutRequest) -> None:
            r.state = "paused"
            r.message = body.reason or "paused by request"

        return await self._transition(req, {"deploying"}, change)

    async def resume(self, req: ApiRequest) -> bytes:
        def change(r: Rollout, body: RolloutRequest) -> None:
            r.state = "deploying"
            r.message = body.reason or "resumed"

        return await self._transition(req, {"paused"}, change)

    async def abort(self, req: ApiRequest) -> bytes:
        body, job_record, record = await self._target(req)
        rollout = record.value
        if rollout.state not in IN_PROGRESS:
            raise Conflict(f"rollout of {body.job!r} is {rollout.state}; only a rollout in progress can be aborted",
                           field="job", retryable=False)
        if not await self.controller.fail(rollout.namespace, rollout.job_id, f"aborted: {body.reason or 'by request'}"):
            raise Conflict("the rollout changed while this request was applied; try again", field="job")
        fresh = await self.controller.rollouts.get(record.key)
        job = await self.store.jobs.get(job_record.key)
        return to_json(await self._status(job or job_record, fresh.value if fresh else rollout))


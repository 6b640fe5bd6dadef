"""Health service: registration rules, heartbeats, disconnects, lost executions and their grace period."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest

from shared import subjects as s
from shared.api import ListNodesRequest
from shared.codec import convert, to_json
from shared.errors import InvalidInput
from shared.models import DesiredState, Execution, ExecutionStatus, JobSpec, ObservedState, ObservedStateType

pytestmark = pytest.mark.nats


def gated(id: str, observed: ObservedStateType, created: dt.datetime, **check: Any) -> Execution:
    """An execution of job "j" on node n1 in a rolling rollout with a health check (deadline 30 s and
    interval 1 s unless `check` says otherwise), created at `created`."""
    health_check = {"deadline": "30s", "interval": "1s", **check}
    spec = convert({"name": "x", "type": "pipeline", "config": {"simulate": {}},
                    "rollout": {"strategy": "rolling", "health_check": health_check}}, JobSpec)
    return Execution(id=id, job_id="j", job_type="pipeline", job_version=1, namespace="default", node_id="n1",
                     status=ExecutionStatus(created_at=created, updated_at=created, revision=1,
                                            desired_state=DesiredState(state_type="running"),
                                            observed_state=ObservedState(state_type=observed)),
                     job_spec=spec)


async def test_registration_validates_input_and_keeps_serving(cluster) -> None:
    await cluster.start("health")
    api = await cluster.api()
    bus = api.bus
    for body, field in (
        ({"node_id": "bad id!", "labels": {}}, "node_id"),
        ({"node_id": "n1", "labels": {"Bad Key": "x"}}, "labels.Bad Key"),
        ({"node_id": "n1", "labels": {"k": "v" * 64}}, "labels.k"),
        ({"node_id": "n1", "labels": {}, "extra": 1}, "extra"),
        ({"labels": {}}, "node_id"),
    ):
        subject = s.node_register("n1", s.labels_digest(body.get("labels", {})))
        with pytest.raises(InvalidInput) as err:
            await bus.request(subject, to_json(body))
        assert err.value.field == field, body
    labels = {"zone": "a"}
    reply = await bus.request(s.node_register("n1", s.labels_digest(labels)), to_json({"node_id": "n1", "labels": labels}))
    assert b'"state_type":"ready"' in reply and b'"consumer":"assign-n1"' in reply


async def test_the_subject_names_the_node_and_its_labels(cluster) -> None:
    """What NATS permissions confine (the subject) must be what the body says: node id and labels."""
    await cluster.start("health")
    bus = (await cluster.api()).bus
    labels = {"zone": "a"}
    with pytest.raises(InvalidInput) as err:  # registering another node on one's own subject
        await bus.request(s.node_register("n1", s.labels_digest(labels)), to_json({"node_id": "n2", "labels": labels}))
    assert err.value.field == "node_id"
    with pytest.raises(InvalidInput) as err:  # claiming other labels than the subject's digest
        await bus.request(s.node_register("n1", s.labels_digest(labels)),
                          to_json({"node_id": "n1", "labels": {"zone": "b"}}))
    assert err.value.field == "labels"
    assert s.labels_digest({"a": "1", "b": "2"}) == s.labels_digest({"b": "2", "a": "1"}) != s.labels_digest({})


async def _node_state(api, node_id: str) -> str:
    _, page = await api.list_nodes(ListNodesRequest(selector=None, limit=1000))
    return next((n.state.state_type for n in page.items if n.id == node_id), "")


async def _execution_states(api, job: str) -> dict[str, str]:
    return {e.node_id: e.observed for e in await api.all_executions(job)}


async def test_short_outage_recovers_long_outage_fails(cluster, wait_for) -> None:
    """A node that misses heartbeats is disconnected and its executions lost; back within the grace they
    resume; a node that stays away longer than the grace has its executions failed."""
    await cluster.start_services()
    fleet = await cluster.start("agent", simulate=3)
    api = await cluster.api()
    await api.wait_ready(3)
    assert (await api.submit({"name": "keepalive", "type": "pipeline", "config": {"simulate": {}},
                              "restart_policy": "never"})).accepted
    await wait_for(lambda: _all_are(api, "keepalive", "running", 3))
    loop = asyncio.get_running_loop()

    # Short outage: shorter than lost_grace (3 s), longer than node_timeout (1 s).
    fleet.nodes["sim-0001"].offline_until = loop.time() + 1.8
    await wait_for(lambda: _equals(_node_state(api, "sim-0001"), "disconnected"))
    await wait_for(lambda: _equals(_state_of(api, "keepalive", "sim-0001"), "lost"))
    await wait_for(lambda: _equals(_node_state(api, "sim-0001"), "ready"))
    await wait_for(lambda: _equals(_state_of(api, "keepalive", "sim-0001"), "running"))
    _, job = await api.get_job("keepalive")
    assert job.state.state_type in ("running", "degraded")
    assert len(await api.all_executions("keepalive")) == 3  # resumed, not replaced

    # Long outage: past the grace, the lost execution counts as failed.
    fleet.nodes["sim-0002"].offline_until = loop.time() + 30
    await wait_for(lambda: _equals(_state_of(api, "keepalive", "sim-0002"), "lost"))
    await wait_for(lambda: _equals(_state_of(api, "keepalive", "sim-0002"), "failed"), timeout=15)
    failed = next(e for e in await api.all_executions("keepalive") if e.node_id == "sim-0002")
    assert failed.status.details.get("reason") == "lost"
    assert (await _execution_states(api, "keepalive"))["sim-0003"] == "running"


async def _state_of(api, job: str, node: str) -> str:
    return (await _execution_states(api, job)).get(node, "")


async def _equals(awaitable, expected) -> bool:
    return await awaitable == expected


async def _all_are(api, job: str, state: str, count: int) -> bool:
    states = await _execution_states(api, job)
    return len(states) == count and set(states.values()) == {state}


async def test_agent_restart_reports_lost_runs_and_restart_policy_replaces_them(cluster, wait_for) -> None:
    await cluster.start_services()
    fleet = await cluster.start("agent", simulate=1)
    api = await cluster.api()
    await api.wait_ready(1)
    assert (await api.submit({"name": "svc", "type": "pipeline", "config": {"simulate": {}}})).accepted
    await wait_for(lambda: _all_are(api, "svc", "running", 1))
    await cluster.stop(fleet)  # the agent goes away and reports its run failed (agent shut down)
    await cluster.start("agent", simulate=1)  # and comes back

    async def replaced() -> bool:
        items = await api.all_executions("svc")
        failed = [e for e in items if e.observed == "failed"]
        running = [e for e in items if e.observed == "running"]
        return bool(failed and running and running[0].status.previous_execution_id == failed[0].id
                    and failed[0].status.next_execution_id == running[0].id
                    and running[0].status.details.get("restarts") == 1)

    await wait_for(replaced)


async def test_a_validating_execution_lost_past_its_deadline_still_fails_by_it(cluster) -> None:
    from services.health import windows
    from services.health.transitions import mark_lost
    from shared.durations import utcnow
    from shared.models import StateReport

    health = await cluster.start("health")
    e = gated("e1", "validating", utcnow() - dt.timedelta(seconds=60))  # its 30 s deadline passes while away
    await health.store.executions.create(e.key, e)
    await health.windows.create(e.key, windows.new_window(e))
    await health.store.mutate_execution(e, lambda x: mark_lost(x, utcnow(), "n1"))
    for _ in range(100):  # the sweep reads the windows as its watch has them
        if e.key in health.window_mirror.items:
            break
        await asyncio.sleep(0.05)
    await health.check_deadlines()  # a sweep while the node is away
    # The node comes back within the grace; its agent says the process is still up.
    await health.apply_state(StateReport(namespace="default", job_id="j", node_id="n1", execution_id="e1",
                                         state="running", message="node reconnected; still running", at=utcnow()))
    await health.check_deadlines()
    record = await health.store.executions.get(e.key)
    assert record is not None and record.value.observed == "failed"
    assert record.value.status.details["reason"] == "deadline"


async def test_an_execution_ends_with_a_window_write_only_if_it_had_a_window(cluster) -> None:
    """Ending drops the execution's health window; one that never validated has none, and its end writes
    nothing to the health bucket (an immediate job's thousands of executions cost no write each)."""
    from services.health import windows
    from shared.durations import utcnow
    from shared.models import StateReport

    health = await cluster.start("health")
    now = utcnow()
    validating, plain = gated("e1", "validating", now), gated("e2", "running", now)
    for e in (validating, plain):
        await health.store.executions.create(e.key, e)
    await health.windows.create(validating.key, windows.new_window(validating))
    for _ in range(100):
        if validating.key in health.window_mirror.items:
            break
        await asyncio.sleep(0.05)

    async def writes() -> int:
        return (await health.bus.stream_info(s.kv_stream(s.BUCKET_HEALTH)))["last_seq"]

    before = await writes()
    await health.apply_state(StateReport(namespace="default", job_id="j", node_id="n1", execution_id="e2",
                                         state="stopped", message="stopped", at=utcnow()))
    assert await writes() == before
    await health.apply_state(StateReport(namespace="default", job_id="j", node_id="n1", execution_id="e1",
                                         state="stopped", message="stopped", at=utcnow()))
    assert await writes() == before + 1 and await health.windows.get(validating.key) is None


async def test_a_healthy_interval_applied_before_the_state_report_still_makes_it_stable(cluster) -> None:
    """Replicas take reports in parallel, so an execution's first health report can be applied before the
    state report that makes it validating. The agent sends no more healthy intervals than the threshold
    (success_threshold: 1 here), so the interval already counted must settle it when it starts validating."""
    from shared.durations import utcnow
    from shared.models import HealthReport, StateReport

    health = await cluster.start("health")
    now = utcnow()
    e = gated("e1", "pending", now, success_threshold=1)
    await health.store.executions.create(e.key, e)
    await health.apply_health(HealthReport(namespace="default", job_id="j", node_id="n1", execution_id="e1",
                                           interval_start=now, interval_end=utcnow(), total=10, errors=0, at=utcnow()))
    record = await health.store.executions.get(e.key)
    assert record is not None and record.value.observed == "pending"  # counted, but not validating yet
    await health.apply_state(StateReport(namespace="default", job_id="j", node_id="n1", execution_id="e1",
                                         state="running", message="running", at=utcnow()))
    record = await health.store.executions.get(e.key)
    assert record is not None and record.value.observed == "running" and record.value.status.stable_at is not None


async def test_an_interval_counted_by_a_replica_that_died_before_applying_it_is_applied_on_redelivery(
        cluster) -> None:
    """A report is applied in two writes: its interval into the window, then the window's verdict onto the
    execution. A replica that dies (or loses its connection) between them leaves the interval counted and
    the execution not moved; the agent sends no more healthy intervals than the threshold, so the
    redelivered report must apply the window it finds, not drop itself as a replay."""
    from services.health import windows
    from shared.durations import utcnow
    from shared.models import HealthReport

    health = await cluster.start("health")
    now = utcnow()
    e = gated("e1", "validating", now, success_threshold=2)
    await health.store.executions.create(e.key, e)
    report = HealthReport(namespace="default", job_id="j", node_id="n1", execution_id="e1", interval_start=now,
                          interval_end=utcnow(), total=10, errors=0, at=utcnow(), streak=2)
    window = windows.new_window(e)
    window.healthy_streak, window.intervals, window.last_interval_end = 2, 2, report.interval_end
    await health.windows.create(e.key, window)  # the first write of the replica that died
    await health.apply_health(report)  # the report again, redelivered to any replica
    record = await health.store.executions.get(e.key)
    assert record is not None and record.value.observed == "running" and record.value.status.stable_at is not None
    revision = record.revision
    await health.apply_health(report)  # once more: nothing left to change, nothing written
    record = await health.store.executions.get(e.key)
    assert record is not None and record.revision == revision


async def test_a_health_service_that_falls_behind_is_sent_no_more_intervals_than_it_needs(cluster, wait_for,
                                                                                         tmp_path) -> None:
    """While the health service is away (or behind), an agent's validating execution reports its first
    success_threshold healthy intervals and then nothing: reports do not pile up, one per execution per
    interval, in front of a service that has to read them all. Back, the service makes it stable."""
    from shared.codec import from_msgpack
    from shared.models import HealthReport, Report

    await cluster.start_services()
    await cluster.start("agent", simulate=1, work_dir=str(tmp_path / "agent"))
    api = await cluster.api()
    await api.wait_ready(1)
    health = next(c for c in cluster.components if c.name == "health")
    watcher = next(c for c in cluster.components if c.name == "scheduler")
    intervals: list[HealthReport] = []

    async def heard(msg) -> None:
        report = from_msgpack(msg.data, Report)  # type: ignore[arg-type]
        if isinstance(report, HealthReport):
            intervals.append(report)

    await watcher.bus.subscribe(s.report("*"), heard, traced=False)
    await cluster.stop(health)
    check = {"interval": "200ms", "success_threshold": 2, "failure_threshold": 3, "deadline": "30s"}
    assert (await api.submit({"name": "gated", "type": "pipeline", "config": {"simulate": {}},
                              "rollout": {"strategy": "rolling", "max_parallel": 100, "health_check": check}})).accepted
    await wait_for(lambda: _equals(_count(intervals), 2))
    await asyncio.sleep(1.5)  # seven more intervals of 200 ms
    assert len(intervals) == 2 and len({r.execution_id for r in intervals}) == 1
    assert [r.streak for r in intervals] == [1, 2]  # the agent's count, whatever order they are applied in

    await cluster.start("health")
    await wait_for(lambda: _all_are(api, "gated", "running", 1))
    items = await api.all_executions("gated")
    assert items[0].status.stable_at is not None and len(intervals) == 2


async def _count(items: list) -> int:
    return len(items)


async def test_a_deadline_waits_for_the_reports_sent_before_it(cluster) -> None:
    """A health service that is behind must not fail an execution by its deadline while the healthy
    interval that came in time is still waiting to be applied; once nothing sent before the deadline is
    waiting, the deadline holds."""
    from services.health import windows
    from shared.codec import to_msgpack
    from shared.durations import utcnow
    from shared.models import HealthReport
    from shared.transport import Consumer, ConsumerSpec

    health = await cluster.start("health")
    await health.reports.stop()  # the service falls behind: reports wait in the stream
    created = utcnow() - dt.timedelta(seconds=1)  # the deadlines are 1 s away
    healthy, silent = (gated(id, "validating", created, deadline="2s", success_threshold=1) for id in ("e1", "e2"))
    for e in (healthy, silent):
        await health.store.executions.create(e.key, e)
        await health.windows.create(e.key, windows.new_window(e))
    report = HealthReport(namespace="default", job_id="j", node_id="n1", execution_id="e1",
                          interval_start=utcnow() - dt.timedelta(seconds=1), interval_end=utcnow(),
                          total=10, errors=0, at=utcnow())
    await health.bus.js_publish(s.report("n1"), to_msgpack(report))  # sent before the deadline
    for _ in range(100):
        if healthy.key in health.window_mirror.items and silent.key in health.window_mirror.items:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.2)  # both deadlines pass
    await health.check_deadlines()

    async def state(e: Execution) -> str:
        record = await health.store.executions.get(e.key)
        assert record is not None
        return record.value.observed

    assert await state(healthy) == "validating" and await state(silent) == "validating"
    # The service catches up: the interval sent in time makes e1 stable; e2 had nothing and fails.
    catching_up = Consumer(health.bus, ConsumerSpec(stream=s.STREAM_REPORTS, durable=s.CONSUMER_HEALTH_REPORTS))
    await catching_up.start_single(health.on_report)
    for _ in range(100):
        if await state(healthy) == "running":
            break
        await asyncio.sleep(0.05)
    await health.check_deadlines()
    assert await state(healthy) == "running" and await state(silent) == "failed"

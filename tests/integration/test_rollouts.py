"""Rollouts with the real services, a real nats-server and simulated (or real) agents.

Health intervals are fractions of a second here so each scenario takes seconds; the rules are the
same at any interval.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shared.api import RolloutStatus
from shared.errors import Conflict

pytestmark = pytest.mark.nats

HEALTH = {"interval": "200ms", "success_threshold": 2, "failure_threshold": 2, "deadline": "5s"}


def job(name: str, *, strategy: str = "rolling", simulate: dict | None = None, extra: dict | None = None,
        **rollout: Any) -> dict:
    body: dict[str, Any] = {
        "name": name, "type": "pipeline", "restart_policy": "never",
        "config": {"simulate": simulate or {}},
        "rollout": {"strategy": strategy, "health_check": dict(HEALTH), **rollout},
    }
    if strategy == "immediate":
        body["rollout"].pop("health_check")
    body.update(extra or {})
    return body


async def start(cluster, nodes: int, **fleet: Any):
    await cluster.start_services()
    fleet_component = await cluster.start("agent", simulate=nodes, **fleet)
    api = await cluster.api()
    await api.wait_ready(nodes)
    return api, fleet_component


async def submit(api, body: dict, **kw: Any):
    outcome = await api.submit(body, **kw)
    assert outcome.accepted, outcome
    return outcome


async def status(api, name: str) -> RolloutStatus:
    _, st = await api.rollout("rollouts.status", name)
    return st


async def until(wait_for, api, name: str, predicate, timeout: float = 20.0) -> RolloutStatus:
    seen: list[RolloutStatus] = []

    async def check() -> RolloutStatus | None:
        st = await status(api, name)
        seen.append(st)
        return st if predicate(st) else None

    try:
        return await wait_for(check, timeout=timeout)
    except AssertionError:
        last = seen[-1] if seen else None
        raise AssertionError(f"rollout of {name} never matched; last status: {last}") from None


def running_version(items, version: int) -> set[str]:
    return {e.node_id for e in items if e.job_version == version and e.observed == "running"}


async def test_wave_sizes_follow_max_parallel_and_canary_settings(cluster, wait_for) -> None:
    api, _ = await start(cluster, 7)
    await submit(api, job("roll30", max_parallel=30))
    await submit(api, job("canary", strategy="canary", max_parallel=50, auto_promote=True,
                          canary={"canary_percent": 20}))
    await submit(api, job("count", strategy="canary", max_parallel=100, auto_promote=True,
                          canary={"canary_count": 3}))
    await submit(api, job("now", strategy="immediate"))
    for name, sizes in (("roll30", [3, 3, 1]), ("canary", [2, 4, 1]), ("count", [3, 4]), ("now", [7])):
        st = await until(wait_for, api, name, lambda s: s.state == "succeeded")
        assert [w.nodes for w in st.waves] == sizes, name
        waves = sorted(e.rollout_wave for e in await api.all_executions(name))
        expected = [0] * 7 if name == "now" else [i + 1 for i, n in enumerate(sizes) for _ in range(n)]
        assert waves == expected, name


async def test_update_replaces_old_executions_wave_by_wave_and_links_them(cluster, wait_for) -> None:
    api, _ = await start(cluster, 4)
    await submit(api, job("svc", max_parallel=50))
    await until(wait_for, api, "svc", lambda s: s.state == "succeeded")
    await submit(api, job("svc", max_parallel=50, extra={"description": "v2"}))
    st = await until(wait_for, api, "svc", lambda s: s.job_version == 2 and s.current_wave == 1
                     and s.waves[0].states.get("validating", 0) + s.waves[0].states.get("running", 0) == 2)
    items = await api.all_executions("svc", all_job_versions=True)
    # While wave 1 validates, wave 2's nodes still run version 1.
    assert running_version(items, 1) >= set(["sim-0003", "sim-0004"])
    await until(wait_for, api, "svc", lambda s: s.job_version == 2 and s.state == "succeeded")

    async def settled() -> list:
        items = await api.all_executions("svc", all_job_versions=True)
        done = running_version(items, 2) == {"sim-0001", "sim-0002", "sim-0003", "sim-0004"} and all(
            e.observed == "stopped" for e in items if e.job_version == 1)
        return items if done else []

    items = await wait_for(settled)
    by_id = {e.id: e for e in items}
    for new in (e for e in items if e.job_version == 2):
        old = by_id[new.status.previous_execution_id]
        assert old.job_version == 1 and old.node_id == new.node_id
        assert old.status.next_execution_id == new.id
        assert old.desired == "stopped"
        assert new.status.stable_at is not None
    assert {e.rollout_wave for e in items if e.job_version == 2} == {1, 2}
    _, j = await api.get_job("svc")
    assert j.state.state_type == "running" and j.stable_version == 2


async def test_healthy_canary_auto_promotes_through_all_waves(cluster, wait_for) -> None:
    api, _ = await start(cluster, 5)
    await submit(api, job("fw", strategy="canary", auto_promote=True, max_parallel=40, canary={"canary_count": 1}))
    st = await until(wait_for, api, "fw", lambda s: s.state == "succeeded")
    assert [w.nodes for w in st.waves] == [1, 2, 2]
    assert all(w.started and w.states == {"running": w.nodes} for w in st.waves)


async def test_manual_promote_pause_resume(cluster, wait_for) -> None:
    api, _ = await start(cluster, 4)
    await submit(api, job("manual", strategy="canary", max_parallel=25, canary={"canary_count": 1}))
    st = await until(wait_for, api, "manual", lambda s: s.state == "awaiting_promotion")
    assert st.job_state == "rollout_paused" and st.current_wave == 1
    await asyncio.sleep(1.0)
    assert (await status(api, "manual")).current_wave == 1  # it really waits
    with pytest.raises(Conflict):
        await api.rollout("rollouts.resume", "manual")  # not paused: nothing to resume
    _, promoted = await api.rollout("rollouts.promote", "manual")
    assert promoted.state == "deploying" and promoted.current_wave == 2
    _, paused = await api.rollout("rollouts.pause", "manual", "maintenance window")
    assert paused.state == "paused"
    await asyncio.sleep(1.5)
    held = await status(api, "manual")
    assert held.state == "paused" and held.current_wave == 2 and held.job_state == "rollout_paused"
    await api.rollout("rollouts.resume", "manual")
    done = await until(wait_for, api, "manual", lambda s: s.state == "succeeded")
    assert done.current_wave == 4 and done.job_state == "running"


async def test_failing_canary_rolls_back_and_leaves_previous_version_running(cluster, wait_for) -> None:
    api, _ = await start(cluster, 4)
    await submit(api, job("app", max_parallel=100))
    await until(wait_for, api, "app", lambda s: s.state == "succeeded")
    before = {e.node_id: e.id for e in await api.all_executions("app")}
    bad = job("app", strategy="canary", canary={"canary_count": 1}, auto_promote=True, max_failed_nodes=0,
              simulate={"error_rate": 0.5})
    await submit(api, bad)
    st = await until(wait_for, api, "app", lambda s: s.rollback_of == 2 and s.state == "succeeded")
    assert st.job_version == 1 and st.job_state == "rollout_failed" and st.current_wave == 0
    items = await api.all_executions("app", all_job_versions=True)
    v2 = [e for e in items if e.job_version == 2]
    # Only the canary ever ran version 2, and it failed its health check.
    assert len(v2) == 1 and v2[0].observed == "failed" and v2[0].status.details["reason"] == "unhealthy"
    assert v2[0].status.previous_execution_id == before[v2[0].node_id]
    # Version 1 never stopped anywhere (make before break): the same executions still run.
    assert {e.node_id: e.id for e in items if e.job_version == 1 and e.observed == "running"} == before
    async def job_says_rolled_back():
        _, j = await api.get_job("app")
        return j if "rolled back to version 1" in j.state.message else None

    j = await wait_for(job_says_rolled_back)
    assert j.state.state_type == "rollout_failed" and j.version == 2 and j.stable_version == 1
    # Nothing else happens afterwards: no second rollback, no new executions.
    await asyncio.sleep(1.0)
    assert len(await api.all_executions("app", all_job_versions=True)) == len(items)


async def test_failure_in_a_later_wave_restores_earlier_waves_with_new_linked_executions(cluster, wait_for) -> None:
    api, _ = await start(cluster, 4)
    await submit(api, job("pipe", max_parallel=100))
    await until(wait_for, api, "pipe", lambda s: s.state == "succeeded")
    await submit(api, job("pipe", max_parallel=50, max_failed_nodes=0,
                          simulate={"error_rate": 1.0, "only_nodes": ["sim-0003"]}))
    st = await until(wait_for, api, "pipe", lambda s: s.rollback_of == 2 and s.state == "succeeded", timeout=30)
    assert st.job_version == 1

    async def restored() -> list:
        items = await api.all_executions("pipe", all_job_versions=True)
        everywhere = running_version(items, 1) == {"sim-0001", "sim-0002", "sim-0003", "sim-0004"}
        v2_done = all(e.observed in ("stopped", "failed") for e in items if e.job_version == 2)
        return items if everywhere and v2_done else []

    items = await wait_for(restored)
    by_id = {e.id: e for e in items}
    for node in ("sim-0001", "sim-0002"):  # wave 1 had switched to version 2: new version-1 executions
        chain = sorted((e for e in items if e.node_id == node), key=lambda e: e.status.created_at)
        assert [e.job_version for e in chain] == [1, 2, 1]
        first, second, third = chain
        assert second.status.previous_execution_id == first.id and first.status.next_execution_id == second.id
        assert third.status.previous_execution_id == second.id and second.status.next_execution_id == third.id
        assert second.status.stable_at is not None and second.desired == "stopped"
    failed = next(e for e in items if e.job_version == 2 and e.node_id == "sim-0003")
    assert failed.observed == "failed" and by_id[failed.status.previous_execution_id].observed == "running"


async def test_abort_stops_and_rolls_back(cluster, wait_for) -> None:
    api, _ = await start(cluster, 3)
    await submit(api, job("abortable", max_parallel=100))
    await until(wait_for, api, "abortable", lambda s: s.state == "succeeded")
    slow = job("abortable", max_parallel=34, simulate={"hang": True})  # never healthy: wave 1 waits
    await submit(api, slow)
    await until(wait_for, api, "abortable", lambda s: s.job_version == 2 and s.state == "deploying")
    _, aborted = await api.rollout("rollouts.abort", "abortable", "changed my mind")
    assert aborted.rollback_of == 2 and "aborted: changed my mind" in aborted.message
    done = await until(wait_for, api, "abortable", lambda s: s.state == "succeeded" and s.rollback_of == 2)
    assert "rolled back to version 1" in done.message and "changed my mind" in done.message
    with pytest.raises(Conflict):
        await api.rollout("rollouts.abort", "abortable")  # nothing in progress any more
    items = await api.all_executions("abortable", all_job_versions=True)
    assert running_version(items, 1) == {"sim-0001", "sim-0002", "sim-0003"}
    assert all(e.desired == "stopped" for e in items if e.job_version == 2)


@pytest.mark.parametrize(("failing", "tripped"), [(2, False), (3, True)])
async def test_budget_count_trips_only_when_exceeded(cluster, wait_for, failing: int, tripped: bool) -> None:
    api, _ = await start(cluster, 10)
    bad_nodes = [f"sim-{i:04d}" for i in range(1, failing + 1)]
    await submit(api, job("budget", max_parallel=100, max_failed_nodes=2, max_failed_nodes_percent=100,
                          simulate={"error_rate": 1.0, "only_nodes": bad_nodes}))
    st = await until(wait_for, api, "budget", lambda s: s.state in ("succeeded", "failed"))
    assert sorted(st.failed_nodes) == bad_nodes
    assert (st.state == "failed") is tripped
    assert st.job_state == ("rollout_failed" if tripped else "degraded")
    if tripped:
        assert "no earlier stable version" in st.message  # nothing to roll back to: the version is stopped


@pytest.mark.parametrize(("failing", "tripped"), [(2, False), (3, True)])
async def test_budget_percent_trips_only_when_exceeded(cluster, wait_for, failing: int, tripped: bool) -> None:
    api, _ = await start(cluster, 10)
    bad_nodes = [f"sim-{i:04d}" for i in range(1, failing + 1)]
    await submit(api, job("pct", max_parallel=100, max_failed_nodes=100, max_failed_nodes_percent=20,
                          simulate={"error_rate": 1.0, "only_nodes": bad_nodes}))
    st = await until(wait_for, api, "pct", lambda s: s.state in ("succeeded", "failed"))
    assert len(st.failed_nodes) == failing
    assert (st.state == "failed") is tripped


@pytest.mark.parametrize(("max_error_rate", "healthy"), [(None, True), (0.0, False)])
async def test_unset_and_explicit_zero_max_error_rate(cluster, wait_for, max_error_rate, healthy) -> None:
    api, _ = await start(cluster, 2)
    body = job("rate", max_parallel=100, max_failed_nodes=0, simulate={"error_rate": 0.05})
    if max_error_rate is not None:
        body["rollout"]["health_check"]["max_error_rate"] = max_error_rate
    await submit(api, body)
    st = await until(wait_for, api, "rate", lambda s: s.state in ("succeeded", "failed"))
    assert (st.state == "succeeded") is healthy
    if not healthy:
        failed = [e for e in await api.all_executions("rate") if e.observed == "failed"]
        assert failed and all(e.status.details["reason"] == "unhealthy" for e in failed)


async def test_no_data_is_never_healthy_and_the_deadline_fails_it(cluster, wait_for) -> None:
    api, _ = await start(cluster, 2)
    body = job("silent", max_parallel=100, max_failed_nodes=5, max_failed_nodes_percent=100,
               simulate={"hang": True, "only_nodes": ["sim-0001"]})
    body["rollout"]["health_check"]["deadline"] = "2s"
    await submit(api, body)
    await asyncio.sleep(1.2)  # several no-data intervals: still validating, not running
    items = {e.node_id: e for e in await api.all_executions("silent")}
    assert items["sim-0001"].observed == "validating" and items["sim-0001"].status.stable_at is None
    st = await until(wait_for, api, "silent", lambda s: s.state in ("succeeded", "failed"))
    items = {e.node_id: e for e in await api.all_executions("silent")}
    assert items["sim-0001"].observed == "failed" and items["sim-0001"].status.details["reason"] == "deadline"
    assert items["sim-0002"].observed == "running"
    assert st.failed_nodes == ["sim-0001"]

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
    await until(wait_for, api, "svc", lambda s: s.job_version == 2 and s.current_wave == 1
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
    await wait_for(lambda: _job_matches(api, "svc", lambda j: j.state.state_type == "running" and j.stable_version == 2))


async def test_healthy_canary_auto_promotes_through_all_waves(cluster, wait_for) -> None:
    api, _ = await start(cluster, 5)
    await submit(api, job("fw", strategy="canary", auto_promote=True, max_parallel=40, canary={"canary_count": 1}))
    st = await until(wait_for, api, "fw", lambda s: s.state == "succeeded")
    assert [w.nodes for w in st.waves] == [1, 2, 2]
    assert all(w.started and w.states == {"running": w.nodes} for w in st.waves)


async def test_manual_promote_pause_resume(cluster, wait_for) -> None:
    api, _ = await start(cluster, 4)
    await submit(api, job("manual", strategy="canary", max_parallel=25, canary={"canary_count": 1}))
    st = await until(wait_for, api, "manual",
                     lambda s: s.state == "awaiting_promotion" and s.job_state == "rollout_paused")
    assert st.current_wave == 1
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
    done = await until(wait_for, api, "manual", lambda s: s.state == "succeeded" and s.job_state == "running")
    assert done.current_wave == 4


async def test_failing_canary_rolls_back_and_leaves_previous_version_running(cluster, wait_for) -> None:
    api, _ = await start(cluster, 4)
    await submit(api, job("app", max_parallel=100))
    await until(wait_for, api, "app", lambda s: s.state == "succeeded")
    before = {e.node_id: e.id for e in await api.all_executions("app")}
    bad = job("app", strategy="canary", canary={"canary_count": 1}, auto_promote=True, max_failed_nodes=0,
              simulate={"error_rate": 0.5})
    await submit(api, bad)
    st = await until(wait_for, api, "app", lambda s: s.rollback_of == 2 and s.state == "succeeded"
                     and s.job_state == "rollout_failed")
    assert st.job_version == 1 and st.current_wave == 0
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
    expected_job_state = "rollout_failed" if tripped else "degraded"
    st = await until(wait_for, api, "budget", lambda s: s.state in ("succeeded", "failed")
                     and s.job_state == expected_job_state)
    assert sorted(st.failed_nodes) == bad_nodes
    assert (st.state == "failed") is tripped
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


# -- restarts, timeouts, degradation, loops ----------------------------------------------------------


def one_shot(name: str, *, policy: str, simulate: dict, job_type: str = "query", **extra: Any) -> dict:
    return {"name": name, "type": job_type, "restart_policy": policy, "config": {"simulate": simulate}, **extra}


async def chain(api, name: str) -> list:
    return sorted(await api.all_executions(name, all_job_versions=True), key=lambda e: e.status.created_at)


@pytest.mark.parametrize(
    ("policy", "exit_code", "restarts", "final"),
    [("on-failure", 1, True, None), ("on-failure", 0, False, "completed"), ("always", 0, True, None),
     ("never", 1, False, "failed")],
)
async def test_restart_policies(cluster, wait_for, policy, exit_code, restarts, final) -> None:
    api, _ = await start(cluster, 1)
    await submit(api, one_shot("task", policy=policy, simulate={"duration": 0.1, "exit_code": exit_code}))
    if restarts:
        async def restarted_twice() -> list:
            items = await chain(api, "task")
            return items if len(items) >= 3 else []

        items = await wait_for(restarted_twice)
        for earlier, later in zip(items, items[1:]):
            assert later.status.previous_execution_id == earlier.id
            assert earlier.status.next_execution_id == later.id
            assert later.node_id == earlier.node_id
        assert [e.status.details.get("restarts", 0) for e in items[:3]] == [0, 1, 2]
        # Exponential backoff: the second gap is longer than the first.
        from services.rollout.decide import finished_at

        gaps = [(b.status.created_at - finished_at(a)).total_seconds() for a, b in zip(items, items[1:3])]
        assert gaps[0] >= 0.1 and gaps[1] >= 0.2 and gaps[1] > gaps[0], gaps
    else:
        await wait_for(lambda: _job_is(api, "task", final))
        await asyncio.sleep(0.8)
        items = await chain(api, "task")
        assert len(items) == 1 and items[0].observed == final


async def _job_is(api, name: str, state: str) -> bool:
    _, j = await api.get_job(name)
    return j.state.state_type == state


async def _job_matches(api, name: str, predicate) -> bool:
    _, j = await api.get_job(name)
    return predicate(j)


async def test_execution_timeout_kills_and_fails_with_reason_timeout(cluster, wait_for) -> None:
    api, _ = await start(cluster, 1)
    await submit(api, one_shot("slow", policy="never", simulate={}, timeouts={"execution_timeout": 1}))
    await wait_for(lambda: _job_is(api, "slow", "failed"), timeout=10)
    (execution,) = await chain(api, "slow")
    assert execution.observed == "failed" and execution.status.details["reason"] == "timeout"
    assert "execution_timeout" in execution.status.observed_state.message


async def test_queue_timeout_fails_a_job_nobody_can_run(cluster, wait_for) -> None:
    api, _ = await start(cluster, 1)
    await submit(api, one_shot("nowhere", policy="never", simulate={"duration": 0.1},
                               selector={"match_labels": {"zone": "moon"}}, timeouts={"queue_timeout": 1}))
    await wait_for(lambda: _job_is(api, "nowhere", "queued"))
    await wait_for(lambda: _job_is(api, "nowhere", "failed"), timeout=10)
    _, j = await api.get_job("nowhere")
    assert "queue_timeout" in j.state.message
    assert await chain(api, "nowhere") == []


async def test_queued_job_starts_when_a_matching_node_joins(cluster, wait_for) -> None:
    api, _ = await start(cluster, 1)
    await submit(api, one_shot("later", policy="never", simulate={"duration": 0.1},
                               selector={"match_labels": {"zone": "moon"}}, timeouts={"queue_timeout": 30}))
    await wait_for(lambda: _job_is(api, "later", "queued"))
    await cluster.start("agent", simulate=1, sim_prefix="moon-{i}", sim_labels=["zone=moon"])
    await wait_for(lambda: _job_is(api, "later", "completed"))
    assert [e.node_id for e in await chain(api, "later")] == ["moon-1"]


async def test_total_timeout_stops_everything(cluster, wait_for) -> None:
    api, _ = await start(cluster, 2)
    await submit(api, one_shot("bounded", job_type="pipeline", policy="always", simulate={},
                               timeouts={"total_timeout": 2}))
    await wait_for(lambda: _job_is(api, "bounded", "running"))
    await wait_for(lambda: _job_is(api, "bounded", "failed"), timeout=10)
    _, j = await api.get_job("bounded")
    assert "total_timeout" in j.state.message

    async def all_stopped() -> bool:
        return all(e.desired == "stopped" and e.observed == "stopped" for e in await chain(api, "bounded"))

    await wait_for(all_stopped)


@pytest.mark.parametrize("after_start", [False, True])
async def test_short_disconnect_during_a_rollout_spends_no_budget(cluster, wait_for, after_start: bool) -> None:
    """Offline before its execution started (it is lost while pending) or after (lost while validating):
    either way it comes back within the grace and the rollout succeeds with no failed node."""
    api, fleet = await start(cluster, 3)
    body = job("edge", max_parallel=100, max_failed_nodes=0, max_failed_nodes_percent=0)
    body["rollout"]["health_check"]["deadline"] = "20s"
    await submit(api, body)
    if after_start:
        await until(wait_for, api, "edge", lambda s: s.waves[0].states.get("validating") == 3)
    fleet.nodes["sim-0002"].offline_until = asyncio.get_running_loop().time() + 1.8

    async def lost() -> bool:
        return any(e.observed == "lost" for e in await chain(api, "edge"))

    await wait_for(lost)
    st = await until(wait_for, api, "edge", lambda s: s.state in ("succeeded", "failed"), timeout=30)
    assert st.state == "succeeded" and st.failed_nodes == []
    assert len(await chain(api, "edge")) == 3


# -- real processes: the health file channel ---------------------------------------------------------


async def start_real(cluster, tmp_path, nodes: int = 2):
    await cluster.start_services()
    agents = []
    for i in range(1, nodes + 1):
        agents.append(await cluster.start("agent", node_id=f"edge-{i}", labels={"tier": "edge"},
                                          work_dir=str(tmp_path / f"edge-{i}")))
    api = await cluster.api()
    await api.wait_ready(nodes)
    return api


def real_job(name: str, command: str, **rollout: Any) -> dict:
    return {"name": name, "type": "pipeline", "restart_policy": "never", "config": {"command": ["sh", "-c", command]},
            "rollout": {"strategy": "rolling", "max_parallel": 100, "health_check": dict(HEALTH), **rollout}}


async def test_stable_execution_that_degrades_never_rolls_back(cluster, wait_for, tmp_path) -> None:
    api = await start_real(cluster, tmp_path)
    await submit(api, real_job("steady", "exec sleep 600"))
    await until(wait_for, api, "steady", lambda s: s.state == "succeeded")
    await submit(api, real_job("steady", "exec sleep 601", max_failed_nodes=0, max_failed_nodes_percent=0))
    await until(wait_for, api, "steady", lambda s: s.job_version == 2 and s.state == "succeeded")
    items = await api.all_executions("steady")
    target = next(e for e in items if e.node_id == "edge-1")
    health_file = tmp_path / "edge-1" / "executions" / target.id / "health"

    async def erroring() -> None:
        while True:
            with open(health_file, "a") as fh:
                fh.write("ok 1\nerror 9\n")
            await asyncio.sleep(0.05)

    writer = asyncio.create_task(erroring())
    try:
        async def degraded() -> bool:
            e = next(x for x in await api.all_executions("steady") if x.id == target.id)
            return e.observed == "degraded"

        await wait_for(degraded)
        await wait_for(lambda: _job_is(api, "steady", "degraded"))
        await asyncio.sleep(1.0)
        st = await status(api, "steady")
        assert st.state == "succeeded" and st.rollback_of == 0 and st.job_version == 2
        assert all(e.job_version == 2 for e in await api.all_executions("steady", all_job_versions=True)
                   if e.desired == "running")
    finally:
        writer.cancel()

    async def recovered() -> bool:
        e = next(x for x in await api.all_executions("steady") if x.id == target.id)
        return e.observed == "running"

    await wait_for(recovered)  # liveness alone is healthy again
    await wait_for(lambda: _job_is(api, "steady", "running"))


async def test_rollback_to_an_identical_spec_is_a_no_op_so_it_cannot_loop(cluster, wait_for, tmp_path) -> None:
    api = await start_real(cluster, tmp_path)
    marker = tmp_path / "broken"
    spec = real_job("loop", f"test -f {marker} && exit 3; exec sleep 600", max_failed_nodes=0)
    await submit(api, spec)
    await until(wait_for, api, "loop", lambda s: s.state == "succeeded")
    marker.write_text("the world changed under the same spec")
    await submit(api, spec, force=True)  # version 2, identical spec, now failing
    st = await until(wait_for, api, "loop", lambda s: s.job_version == 2 and s.state == "failed")
    assert "same spec" in st.message and st.rollback_of == 0
    before = await api.all_executions("loop", all_job_versions=True)
    await asyncio.sleep(1.5)
    after = await api.all_executions("loop", all_job_versions=True)
    assert len(after) == len(before)  # no rollback executions, no second attempt
    assert {e.node_id for e in after if e.job_version == 1 and e.observed == "running"} == {"edge-1", "edge-2"}
    _, j = await api.get_job("loop")
    assert j.state.state_type == "rollout_failed" and j.stable_version == 1

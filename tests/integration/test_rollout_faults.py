"""Rollouts under faults: what must hold once a rollout has settled, whatever happened on the way.

- every targeted node runs exactly one live execution of the version the job intends (or the job's
  state and message say why not): a rollback leaves no node bare;
- an agent that restarted is not a verdict on the version: it spends no failure budget;
- an execution that never settles does not hold its wave for ever;
- an ended execution is no longer desired running, and no node has two executions desired running.
"""

from __future__ import annotations

import asyncio
import pytest

from shared.models import TERMINAL_STATES
from shared.store import Store
from tests.invariants import placement_problems
from tests.integration.test_rollouts import job, start, status, submit, until

pytestmark = pytest.mark.nats

FAST_HEALTH = {"interval": "200ms", "success_threshold": 1, "failure_threshold": 1, "deadline": "3s"}


async def fail_as_agent_restart(store: Store, job_id: str, node_id: str, version: int | None = None) -> int:
    """What the health service writes when a restarted agent has no trace of an execution (of `version`,
    if given); returns how many it failed."""
    failed = 0
    for record in await store.executions_of_job("default", job_id):
        e = record.value
        if e.node_id == node_id and e.observed not in TERMINAL_STATES and version in (None, e.job_version):
            failed += 1
            def fail(x):
                x.status.observed_state.state_type = "failed"
                x.status.observed_state.message = "the agent restarted and the execution was lost with it"
                x.status.details["reason"] = "agent-restart"
            await store.mutate_execution(e, fail)
    return failed


async def invariants(api, name: str, version: int, nodes: set[str]) -> list[str]:
    """Problems with what runs where, once settled: [] when every rule holds."""
    return placement_problems(await api.all_executions(name, all_job_versions=True), version, nodes)


async def settled_with(api, name: str, version: int, nodes: set[str], wait_for) -> None:
    async def ok() -> bool:
        return not await invariants(api, name, version, nodes)

    try:
        await wait_for(ok, timeout=30)
    except AssertionError:
        raise AssertionError(f"never settled: {await invariants(api, name, version, nodes)}") from None


async def test_a_rollback_restores_every_target_even_those_the_failed_version_never_reached(cluster,
                                                                                           wait_for) -> None:
    api, _ = await start(cluster, 6)
    store = Store(cluster.components[0].bus)
    nodes = {f"sim-000{i}" for i in range(1, 7)}
    v1 = await submit(api, job("svc", max_parallel=50, health_check=FAST_HEALTH, extra={"restart_policy": "on-failure"}))
    await until(wait_for, api, "svc", lambda st: st.state == "succeeded")
    # Version 2 hangs (no health data) on its first wave of three, so it fails by its deadline; meanwhile
    # an agent restart takes version 1 down on two nodes version 2 has not reached.
    bad = {"hang": True, "only_nodes": ["sim-0001", "sim-0002", "sim-0003"]}
    await submit(api, job("svc", max_parallel=50, health_check=FAST_HEALTH, extra={"restart_policy": "on-failure"},
                          simulate=bad, max_failed_nodes=0))
    await until(wait_for, api, "svc", lambda st: st.job_version == 2 and st.state == "deploying")
    await fail_as_agent_restart(store, v1.job_id, "sim-0005")
    await fail_as_agent_restart(store, v1.job_id, "sim-0006")
    final = await until(wait_for, api, "svc", lambda st: st.rollback_of == 2 and st.state == "succeeded",
                        timeout=30)
    assert final.job_version == 1 and final.target_nodes == 6
    await settled_with(api, "svc", 1, nodes, wait_for)

    async def told() -> bool:
        _, j = await api.get_job("svc")
        return j.state.state_type == "rollout_failed" and "rolled back to version 1" in j.state.message

    await wait_for(told, timeout=10)


async def test_an_agent_restart_during_a_rollout_spends_no_failure_budget(cluster, wait_for) -> None:
    api, _ = await start(cluster, 4)
    store = Store(cluster.components[0].bus)
    await submit(api, job("steady", max_parallel=25, health_check=FAST_HEALTH, extra={"restart_policy": "on-failure"}))
    await until(wait_for, api, "steady", lambda st: st.state == "succeeded")
    v2 = await submit(api, job("steady", max_parallel=25, extra={"restart_policy": "on-failure"}, max_failed_nodes=0,
                               health_check={**FAST_HEALTH, "success_threshold": 5}, simulate={"duration": 600}))
    await until(wait_for, api, "steady", lambda st: st.job_version == 2 and st.current_wave >= 1)
    # The first wave's node, still validating version 2 (once its execution exists: the rollout record
    # says wave 1 before the wave's executions are written).
    await wait_for(lambda: fail_as_agent_restart(store, v2.job_id, "sim-0001", version=2))
    final = await until(wait_for, api, "steady", lambda st: st.job_version == 2 and st.state != "deploying",
                        timeout=30)
    assert final.state == "succeeded" and final.failed_nodes == [] and not final.rollback_of
    await settled_with(api, "steady", 2, {f"sim-000{i}" for i in range(1, 5)}, wait_for)
    restarted = [e for e in await api.all_executions("steady") if e.node_id == "sim-0001" and e.observed == "running"]
    assert restarted and restarted[0].status.details.get("restarts") == 1


async def test_an_execution_that_never_starts_does_not_hold_its_wave_for_ever(cluster, wait_for) -> None:
    api, fleet = await start(cluster, 3)
    # sim-0003's agent ignores its assignments from now on (it is alive, it heartbeats, it never starts
    # anything): its execution would stay pending for ever.
    fleet.nodes["sim-0003"].agent.on_execution = lambda execution, headers: None
    await submit(api, job("stuck", max_parallel=34, health_check=FAST_HEALTH, max_failed_nodes=1,
                                max_failed_nodes_percent=50))
    final = await until(wait_for, api, "stuck", lambda st: st.state in ("succeeded", "failed"), timeout=30)
    assert final.state == "succeeded" and final.failed_nodes == ["sim-0003"]
    items = await api.all_executions("stuck")
    stuck = [e for e in items if e.node_id == "sim-0003"]
    assert stuck[0].desired == "stopped" and "stalled" in stuck[0].status.desired_state.message
    st = await status(api, "stuck")
    assert st.state == "succeeded"


async def test_ended_executions_are_no_longer_desired_running(cluster, wait_for) -> None:
    api, _ = await start(cluster, 2)
    await submit(api, {"name": "once", "type": "query", "config": {"simulate": {"exit_code": 0}}})

    async def completed() -> bool:
        _, j = await api.get_job("once")
        return j.state.state_type == "completed"

    await wait_for(completed, timeout=20)

    async def all_stopped() -> bool:
        items = await api.all_executions("once")
        return len(items) == 2 and all(e.desired == "stopped" and e.observed == "completed" for e in items)

    await wait_for(all_stopped, timeout=20)
    await asyncio.sleep(0.5)
    _, j = await api.get_job("once")
    assert j.state.state_type == "completed"

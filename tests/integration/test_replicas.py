"""Horizontal scaling: several replicas of every service share the work, and losing one loses nothing."""

from __future__ import annotations

import asyncio

import pytest

pytestmark = pytest.mark.nats


async def test_replicas_share_work_and_survive_losing_one(cluster, wait_for) -> None:
    replicas = {}
    for kind in ("health", "scheduler", "rollout"):
        replicas[kind] = [await cluster.start(kind), await cluster.start(kind)]
    await cluster.start("query")
    await cluster.start("agent", simulate=6)
    api = await cluster.api()
    await api.wait_ready(6)

    async def submit(i: int) -> None:
        body = {"name": f"job-{i}", "type": "query", "config": {"simulate": {"duration": 0.05}}}
        outcome = await api.submit(body)
        assert outcome.accepted, outcome

    await asyncio.gather(*(submit(i) for i in range(10)))
    # Kill one replica of each service while the work is in flight.
    for kind in ("scheduler", "rollout", "health"):
        await cluster.stop(replicas[kind][0])
    await asyncio.gather(*(submit(i) for i in range(10, 20)))

    async def all_completed() -> bool:
        for i in range(20):
            _, job = await api.get_job(f"job-{i}")
            if job.state.state_type != "completed":
                return False
        return True

    await wait_for(all_completed, timeout=45)
    for i in range(20):
        items = await api.all_executions(f"job-{i}")
        assert sorted(e.node_id for e in items) == [f"sim-{n:04d}" for n in range(1, 7)], f"job-{i}"


async def test_simulated_nodes_drop_off_and_come_back_without_failing_work(cluster, wait_for) -> None:
    await cluster.start_services()
    # Each heartbeat a node may drop off for 1.5 s: longer than node_timeout (1 s), shorter than the grace (3 s).
    await cluster.start("agent", simulate=6, disconnect_rate=0.15, disconnect_duration=1.5, seed=7)
    api = await cluster.api()
    await api.wait_ready(6)
    assert (await api.submit({"name": "flaky-net", "type": "pipeline", "restart_policy": "never",
                              "config": {"simulate": {}}})).accepted

    async def placed() -> bool:  # the query view follows the buckets a moment behind
        return len(await api.all_executions("flaky-net")) == 6

    await wait_for(placed)
    saw_lost = False
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 6
    while loop.time() < deadline:
        states = [e.observed for e in await api.all_executions("flaky-net")]
        saw_lost = saw_lost or "lost" in states
        assert "failed" not in states
        await asyncio.sleep(0.1)
    assert saw_lost, "no simulated node ever dropped off"
    items = await api.all_executions("flaky-net")
    assert len(items) == 6  # resumed, never replaced

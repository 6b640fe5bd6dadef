"""Fleets at scale against a real server: what a big fleet costs must follow what it does, not its size.

A fleet whose registration outlasts the node timeout keeps every node connected (each beats from its
own registration on); two simulated fleets each read only their own nodes' assignments; a pinned job's
evaluation reads its node, not the fleet; a burst of joins is one add-nodes plan per job.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from services.agent import service as agent_service
from services.agent.service import FLEET_SHARD_NODES, fleet_shards
from services.health.nodes import CONSUMER_REQUEST_ROOM, MAX_FLEET_FILTERS, NodeRegistry, fleet_filters
from shared import subjects as s
from shared.codec import from_msgpack_or_none
from shared.models import Plan
from shared.store import Store
from shared.transport import Consumer, ConsumerSpec

SIM = {"simulate": {}}


# --- the fleet's filter subjects (no server) ----------------------------------------------------------


def test_a_fleet_filters_its_own_nodes_or_everything_when_they_do_not_fit() -> None:
    assert fleet_filters(["a", "b"], 1 << 20) == ["shoal.assign.a.>", "shoal.assign.b.>"]
    assert fleet_filters([], 1 << 20) == ["shoal.assign.>"]  # an agent that names no node
    nodes = [f"sim-{i:05d}" for i in range(MAX_FLEET_FILTERS)]
    needed = sum(len(s.assignments(n)) + 4 for n in nodes) + CONSUMER_REQUEST_ROOM
    assert fleet_filters(nodes, needed) == [s.assignments(n) for n in nodes]
    assert fleet_filters(nodes, needed - 1) == ["shoal.assign.>"]
    assert fleet_filters(nodes + ["sim-99999"], 1 << 20) == ["shoal.assign.>"]  # one consumer too many


def test_a_large_fleet_opens_one_consumer_per_thousand_nodes() -> None:
    nodes = [f"sim-{i:04d}" for i in range(1, 2501)]
    shards, named = fleet_shards("f1", nodes, 1 << 20)
    assert named and [(sh.name, len(sh.node_ids)) for sh in shards] == [("f1-0", 1000), ("f1-1", 1000), ("f1-2", 500)]
    assert [n for sh in shards for n in sh.node_ids] == nodes
    assert FLEET_SHARD_NODES <= MAX_FLEET_FILTERS  # the health service takes each shard's list
    [one], named = fleet_shards("f1", nodes[:FLEET_SHARD_NODES], 1 << 20)
    assert named and one.name == "f1" and one.node_ids == nodes[:FLEET_SHARD_NODES]  # the consumer it always had
    # A server whose max_payload cannot carry a shard's list: one consumer of every node's assignments.
    [every], named = fleet_shards("f1", nodes, 32 * 1024)
    assert not named and every.name == "f1" and every.node_ids == nodes


# --- against a server --------------------------------------------------------------------------------


async def _running(api, name: str, count: int) -> bool:
    items = await api.all_executions(name)
    return len(items) == count and all(e.observed == "running" for e in items)


async def _one_job_running(cluster, wait_for, name: str, nodes: int) -> None:
    """The services, a simulated fleet of `nodes`, and job `name` running on all of them."""
    await cluster.start_services()
    await cluster.start("agent", simulate=nodes)
    api = await cluster.api()
    await api.wait_ready(nodes)
    assert (await api.submit({"name": name, "type": "pipeline", "config": SIM})).accepted
    await wait_for(lambda: _running(api, name, nodes), timeout=30)


@pytest.mark.nats
async def test_a_fleet_slower_to_register_than_the_node_timeout_keeps_every_node_connected(
        cluster, monkeypatch) -> None:
    """Registrations answered after 400 ms (a distant health service): 300 nodes take longer than the 1 s
    node timeout to register, and still no node is ever disconnected."""
    register = NodeRegistry.register

    async def slow(self, req):
        await asyncio.sleep(0.4)
        return await register(self, req)

    monkeypatch.setattr(NodeRegistry, "register", slow)
    await cluster.start_services()
    started = time.monotonic()
    await cluster.start("agent", simulate=300)
    took = time.monotonic() - started
    assert took > cluster.settings.node_timeout  # the case at hand: registration outlasts the timeout
    api = await cluster.api()
    await api.wait_ready(300)
    await asyncio.sleep(3 * cluster.settings.node_timeout)  # time for any silent node to be disconnected
    records = await Store(api.bus).nodes.scan(">")
    assert len(records) == 300
    # Revision 1 is the registration: a disconnect (and the reconnect after it) would have bumped it.
    assert [r.value.id for r in records if r.value.revision != 1 or r.value.state.state_type != "ready"] == []


@pytest.mark.nats
async def test_two_fleets_each_read_only_their_own_nodes_assignments(cluster, wait_for, monkeypatch) -> None:
    await cluster.start_services()
    first = await cluster.start("agent", simulate=30, sim_prefix="a-{i:03d}")
    monkeypatch.setattr(agent_service, "FLEET_SHARD_NODES", 12)  # the second reads through 3 consumers
    second = await cluster.start("agent", simulate=30, sim_prefix="b-{i:03d}")
    assert [len(shard.node_ids) for shard in second.shards] == [12, 12, 6]
    api = await cluster.api()
    await api.wait_ready(60)
    assert (await api.submit({"name": "both", "type": "pipeline", "config": SIM})).accepted
    await wait_for(lambda: _running(api, "both", 60), timeout=30)
    for fleet in (first, second):
        assert fleet.assignments_read >= 30  # at least one state of each of its executions
        assert fleet.foreign_assignments == 0
    # The server's consumer filters the fleet's nodes, so the other's assignments never reach it.
    info = await api.bus.js.consumer_info(s.STREAM_ASSIGNMENTS, s.fleet_consumer(first.fleet_name))
    assert sorted(info.config.filter_subjects) == [s.assignments(f"a-{i:03d}") for i in range(1, 31)]


@pytest.mark.nats
async def test_a_pinned_job_is_evaluated_on_its_node_alone(cluster, wait_for) -> None:
    await cluster.start_services()
    await cluster.start("agent", simulate=60)
    api = await cluster.api()
    await api.wait_ready(60)
    scheduler = next(c for c in cluster.components if c.name == "scheduler")
    before = scheduler.evaluations.nodes_examined
    pinned = {"name": "pinned", "type": "query", "config": {"simulate": {"duration": 0.1}},
              "selector": {"match_ids": ["sim-0042"]}}
    assert (await api.submit(pinned)).accepted

    async def completed() -> bool:
        items = await api.all_executions("pinned")
        return [(e.node_id, e.observed) for e in items] == [("sim-0042", "completed")]

    await wait_for(completed)
    assert scheduler.evaluations.nodes_examined - before == 1
    # A label it requires: the nodes that carry it (zone-{i%3}: 20 of 60), not the fleet.
    before = scheduler.evaluations.nodes_examined
    zoned = {"name": "zoned", "type": "pipeline", "config": SIM, "selector": {"match_labels": {"zone": "zone-1"}}}
    assert (await api.submit(zoned)).accepted
    await wait_for(lambda: _running(api, "zoned", 20))
    assert scheduler.evaluations.nodes_examined - before == 20


@pytest.mark.nats
async def test_a_burst_of_joins_is_one_add_nodes_plan_per_job(cluster, wait_for, tmp_path) -> None:
    """A fleet registers while the scheduler is away (its joins wait in the evaluations stream); when it
    is back, the joins of one fetch are one plan listing every node the job gets."""
    await cluster.start_services()
    await cluster.start("agent", simulate=5)
    api = await cluster.api()
    await api.wait_ready(5)
    assert (await api.submit({"name": "daemon", "type": "pipeline", "config": SIM})).accepted
    await wait_for(lambda: _running(api, "daemon", 5))
    plans: list[Plan] = []

    async def heard(msg) -> None:
        plan = from_msgpack_or_none(msg.data, Plan, "plan")
        if plan is not None and plan.kind == "add-nodes":
            plans.append(plan)

    await api.bus.subscribe(s.plan("default"), heard)
    scheduler = next(c for c in cluster.components if c.name == "scheduler")
    await cluster.stop(scheduler)
    # Its own work dir: the default one is numbered by the components running, as the first fleet's was.
    await cluster.start("agent", simulate=200, sim_prefix="late-{i:03d}", work_dir=str(tmp_path / "late"))
    await cluster.start("scheduler")
    await wait_for(lambda: _running(api, "daemon", 205), timeout=60)
    assert sorted(n for plan in plans for n in plan.node_ids) == [f"late-{i:03d}" for i in range(1, 201)]
    assert len(plans) <= 2, [len(plan.node_ids) for plan in plans]


@pytest.mark.nats
async def test_the_owner_reads_the_rollout_record_again_only_once_it_may_have_changed(cluster, wait_for) -> None:
    """The owner of a job keeps its rollout record between passes (its target list grows with the job): passes
    read it again only after a rollout event of the job (here a wake-up bumps the record) or their own write."""
    await _one_job_running(cluster, wait_for, "kept-record", 20)
    service = next(c for c in cluster.components if c.name == "rollout")
    job = (await (await cluster.api()).get_job("kept-record"))[1]
    key = (job.namespace, job.id)
    state = next(p.jobs[key] for p in service.partitions.values() if key in p.jobs)
    controller = service.controller
    await controller.reconcile(job.namespace, job.id, state)
    before = controller.record_reads
    for _ in range(3):
        await controller.reconcile(job.namespace, job.id, state)
    assert controller.record_reads == before and state.record is not None
    await controller.wake(job.namespace, job.id)  # another replica may have done this: it is an event
    await wait_for(lambda: _forgotten(state), timeout=10)
    await controller.reconcile(job.namespace, job.id, state)
    assert controller.record_reads >= before + 1 and state.record is not None
    assert state.record.value.wakes == 1


async def _forgotten(state) -> bool:
    return state.record is None or state.record.value.wakes == 1


@pytest.mark.nats
async def test_a_partition_consumer_made_with_three_filters_takes_the_one_filter_and_its_events(cluster, wait_for,
                                                                                                bus) -> None:
    """An older release made each partition's durable with one filter subject per kind of event; the rollout
    service now updates it in place to the one wildcard filter, and the partition still gets every event of
    its jobs (the job below runs)."""
    older = [f"{kind}.{k}.>" for k in range(s.PARTITIONS) for kind in (s.EVENTS_EXECUTION, s.EVENTS_JOB,
                                                                         s.EVENTS_ROLLOUT)]
    for k in range(s.PARTITIONS):
        await Consumer(bus, ConsumerSpec(stream=s.STREAM_EVENTS, durable=s.consumer_rollout_partition(k),
                                         filter_subjects=tuple(older[3 * k:3 * k + 3])))._bind()
    await _one_job_running(cluster, wait_for, "after-upgrade", 5)
    for k in range(s.PARTITIONS):
        info = await bus.js.consumer_info(s.STREAM_EVENTS, s.consumer_rollout_partition(k))
        assert info.config.filter_subject == s.partition_filter(k) and not info.config.filter_subjects

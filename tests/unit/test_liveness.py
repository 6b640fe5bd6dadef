"""The liveness sweep reads what changed: the nodes silent past the timeout and the nodes away, not the
fleet. Pure bookkeeping, tested without a bus: the writes a sweep would make are recorded instead."""

from __future__ import annotations

import asyncio
import datetime as dt
from types import SimpleNamespace
from typing import Any, cast

import pytest

from services.health.nodes import Liveness
from shared.codec import to_msgpack
from shared.models import FleetHeartbeat, Heartbeat, Node, NodeState, NodeStateType

TIMEOUT = 5.0
NOW = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.timezone.utc)


class Recorded(Liveness):
    """A liveness whose writes are recorded, not made."""

    def __init__(self) -> None:
        self.evals: list[str] = []

        async def js_publish(subject: str, data: bytes, **kw: Any) -> None:
            self.evals.append(kw.get("msg_id", ""))

        bus = SimpleNamespace(on_reconnect=lambda cb: None, connected=True, js_publish=js_publish)
        super().__init__(cast(Any, bus), cast(Any, SimpleNamespace(nodes=None)), node_timeout=TIMEOUT,
                         lost_grace=60.0)
        self.listening = True
        self.mirror.ready.set()
        self.writes: list[tuple[str, str]] = []
        self.lost: list[str] = []

    async def _set_node_state(self, node_id: str, state: NodeStateType, message: str) -> Node | None:
        self.writes.append((node_id, state))
        node = self.nodes[node_id]
        node.state = NodeState(state_type=state)
        node.revision += 1
        self.known(node_id, node)
        return node

    async def _lose_executions(self, node_id: str) -> None:
        self.lost.append(node_id)

    async def _fail_long_lost(self, node_id: str) -> int:
        return 0


def node(node_id: str, state: NodeStateType = "ready") -> Node:
    now = dt.datetime.now(dt.timezone.utc)
    return Node(id=node_id, state=NodeState(state_type=state), registered_at=now, updated_at=now, revision=1)


def fleet(live: Recorded, count: int) -> list[str]:
    ids = [f"n{i:05d}" for i in range(count)]
    for i in ids:
        live.nodes[i] = node(i)
        live.known(i, live.nodes[i])
    return ids


def msg(subject: str, data: bytes) -> Any:
    return SimpleNamespace(subject=subject, data=data)


async def test_a_sweep_of_a_quiet_fleet_writes_nothing_and_a_silent_node_is_disconnected() -> None:
    live = Recorded()
    ids = fleet(live, 1000)
    await live.sweep()
    assert live.writes == [] and live.lost == []
    now = asyncio.get_running_loop().time()
    live.last_seen[ids[7]] = now - TIMEOUT - 1  # silent past the timeout (the order says when it was heard)
    live.last_seen.move_to_end(ids[7], last=False)
    await live.sweep()
    assert live.writes == [(ids[7], "disconnected")] and live.lost == [ids[7]]
    assert live.away == {ids[7]}
    await live.sweep()  # disconnected already: nothing again
    assert len(live.writes) == 1
    # It is heard again: the next sweep brings it back.
    live.saw(ids[7], asyncio.get_running_loop().time())
    await live.sweep()
    assert live.writes[1:] == [(ids[7], "ready")] and live.away == set()
    assert len(live.evals) == 1  # a node back is a node join: the scheduler looks at it again


async def test_a_heartbeat_moves_its_node_behind_every_node_heard_before() -> None:
    live = Recorded()
    ids = fleet(live, 3)
    await live._heard(msg(f"shoal.heartbeat.{ids[0]}", to_msgpack(Heartbeat(node_id=ids[0], at=NOW))))
    assert list(live.last_seen) == [ids[1], ids[2], ids[0]]
    # Another node's id in the body is not a heartbeat of the sender.
    await live._heard(msg(f"shoal.heartbeat.{ids[1]}", to_msgpack(Heartbeat(node_id=ids[2], at=NOW))))
    assert list(live.last_seen) == [ids[1], ids[2], ids[0]]


async def test_a_fleet_heartbeat_counts_for_each_known_node_it_names() -> None:
    live = Recorded()
    ids = fleet(live, 4)
    beat = FleetHeartbeat(fleet="f1", node_ids=[ids[1], ids[0], "unknown"], at=NOW)
    await live._heard_fleet(msg("shoal.fleetbeat.f1", to_msgpack(beat)))
    assert list(live.last_seen) == [ids[2], ids[3], ids[1], ids[0]]  # no node made up
    await live._heard_fleet(msg("shoal.fleetbeat.f2", to_msgpack(beat)))  # not its own fleet's subject
    assert list(live.last_seen) == [ids[2], ids[3], ids[1], ids[0]]


async def test_a_deleted_node_is_no_longer_followed() -> None:
    live = Recorded()
    ids = fleet(live, 2)
    live.known(ids[0], node(ids[0], "disconnected"))
    assert live.away == {ids[0]}
    del live.nodes[ids[0]]
    live.known(ids[0], None)
    assert list(live.last_seen) == [ids[1]] and live.away == set()


@pytest.mark.parametrize("count", [10, 10_000])
async def test_a_sweep_reads_only_the_silent_front(count: int) -> None:
    """The sweep stops at the first node heard within the timeout, however many follow."""
    live = Recorded()
    ids = fleet(live, count)
    now = asyncio.get_running_loop().time()
    for i in ids[:3]:
        live.last_seen[i] = now - TIMEOUT - 1
    read: list[str] = []

    class Counting(dict):
        def get(self, key: str, default: Any = None) -> Any:
            read.append(key)
            return super().get(key, default)

    live.nodes = Counting(live.nodes)
    await live.sweep()
    assert set(read) == set(ids[:3]) and len(read) <= 6  # each at most twice: silent, then away
    assert [w for w, _ in live.writes] == ids[:3]

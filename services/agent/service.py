"""The node agent process: one real node, or a fleet of simulated ones for scale tests.

It registers each node (retrying until the health service answers), writes heartbeats for each node from
its registration on, reads the executions assigned to its nodes and hands each version of each execution
to that node's `NodeAgent`. A simulated fleet shares one connection, one heartbeat loop and a consumer per
thousand nodes that filters just its own, so thousands of nodes fit in one process and fleets in one
cluster do not read each other's work; with `disconnect_rate` its nodes drop off the network now and
then, as edge nodes do.

What the agent runs survives the agent: real runs in their run dirs, a simulated fleet's in one file
(fleetstate.py), so a restarted agent re-adopts them (see node.py). `crash()` simulates kill -9 for tests.
What the executions print goes to SHOAL_OUTPUT in chunks, next to the reports (output.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import re
import socket
from collections import OrderedDict
from pathlib import Path

from shared import subjects as s
from shared.api import OpenFleetRequest, OpenFleetResponse, RegisterNodeRequest, RegisterNodeResponse
from shared.codec import from_json, from_msgpack_or_none, to_json, to_msgpack
from shared.durations import utcnow
from shared.errors import InvalidInput, NotFound, ShoalError
from shared.models import FLEET_HEARTBEAT_NODES, Execution, FleetHeartbeat, Heartbeat
from shared.runtime import Component
from shared.settings import Settings
from shared.transport import Bus, PullReader, StreamMessage, is_delete
from shared.validation import parse_labels

from .fleetstate import FleetJournal
from .node import NodeAgent
from .output import OutputShipper
from .reporter import Reporter

log = logging.getLogger(__name__)

AGENT_VERSION = "0.1.0"
HEARTBEAT_BATCH = 200
# Registrations awaiting a reply at once. A health replica serves 64 at a time; more in flight keeps it
# (or a second replica) busy: one health process registered 2,000 nodes in 0.65 s with 128 in flight,
# 0.8-1.0 s with 32 or 64, no faster with 256.
REGISTER_IN_FLIGHT = 128
# Nodes per consumer of a simulated fleet: nats-server checks each filter subject of a consumer against
# every other when it creates one, so one of 4,000 filters took 2 s, one of 10,000 would outlast the
# request; shards of 1,000 take 0.07 s each.
FLEET_SHARD_NODES = 1000
# Bytes of max_payload for the rest of the health service's consumer request, and our headers.
FLEET_REQUEST_ROOM = 8192
DEFAULT_SIM_LABELS = ("simulated=true", "zone=zone-{i%3}")
_TEMPLATE = re.compile(r"\{i(?::(\d+)d|%(\d+))?\}")


def expand(template: str, i: int) -> str:
    """`{i}` -> 7, `{i:04d}` -> 0007, `{i%3}` -> 1: labels and ids of simulated nodes."""

    def sub(m: re.Match[str]) -> str:
        if m.group(1):
            return str(i).zfill(int(m.group(1)))
        if m.group(2):
            return str(i % int(m.group(2)))
        return str(i)

    return _TEMPLATE.sub(sub, template)


class FleetNode:
    def __init__(self, node_id: str, labels: dict[str, str], agent: NodeAgent) -> None:
        self.node_id = node_id
        self.labels = labels
        self.agent = agent
        self.offline_until = 0.0
        self.backlog: dict[str, tuple[Execution, dict[str, str]]] = {}
        self.registered = False  # heartbeats start with the registration


class Shard:
    """One consumer of this agent's assignments and the nodes it filters: a real node's own consumer, or
    one of a simulated fleet's (named `<fleet>` when the fleet fits in one, `<fleet>-<k>` otherwise)."""

    __slots__ = ("name", "node_ids", "consumer", "caught_up")

    def __init__(self, name: str, node_ids: list[str]) -> None:
        self.name = name
        self.node_ids = node_ids
        self.consumer = ""  # of SHOAL_ASSIGNMENTS, named by the health service
        self.caught_up = False


def fleet_shards(fleet: str, node_ids: list[str], max_payload: int) -> tuple[list[Shard], bool]:
    """A simulated fleet's consumers, FLEET_SHARD_NODES nodes each, and whether they name their nodes.

    A fleet whose shard would not fit in one request (a server with a small max_payload) is one consumer
    that names no node: it reads every node's assignments and drops the others'."""
    chunks = [node_ids[i:i + FLEET_SHARD_NODES] for i in range(0, len(node_ids), FLEET_SHARD_NODES)] or [[]]
    # The health service's request lists `shoal.assign.<node>.>` for each: larger than ours.
    if max(sum(len(s.assignments(n)) + 4 for n in chunk) for chunk in chunks) + FLEET_REQUEST_ROOM > max_payload:
        return [Shard(fleet, list(node_ids))], False
    if len(chunks) == 1:
        return [Shard(fleet, chunks[0])], True
    return [Shard(f"{fleet}-{k}", chunk) for k, chunk in enumerate(chunks)], True


class Revisions:
    """The newest revision seen of each execution, so that a late, older state is not acted on."""

    def __init__(self, memory: int = 100_000) -> None:
        self.memory = memory
        self.seen: OrderedDict[str, int] = OrderedDict()

    def newer(self, execution_id: str, revision: int) -> bool:
        held = self.seen.get(execution_id)
        if held is not None and revision <= held:
            return False
        self.seen[execution_id] = revision
        self.seen.move_to_end(execution_id)
        while len(self.seen) > self.memory:
            self.seen.popitem(last=False)
        return True


class AgentService(Component):
    name = "agent"
    # An edge agent's identity may not touch the JetStream API: it creates no stream or bucket.
    ensures_topology = False

    def __init__(self, bus: Bus, settings: Settings, *, node_id: str = "", labels: dict[str, str] | None = None,
                 work_dir: str = ".shoal-agent", simulate: int = 0, sim_prefix: str = "sim-{i:04d}",
                 sim_labels: list[str] | None = None, disconnect_rate: float = 0.0,
                 disconnect_duration: float = 5.0, stop_grace: float = 10.0, seed: int | None = None) -> None:
        super().__init__(bus, settings)
        self.reporter = Reporter(bus)
        self.output = OutputShipper(bus)  # what executions print, into SHOAL_OUTPUT
        self.nodes: dict[str, FleetNode] = {}
        self.simulated = simulate > 0
        self.disconnect_rate = disconnect_rate
        self.disconnect_duration = disconnect_duration
        self.random = random.Random(seed)
        self.heartbeat_interval = settings.heartbeat_interval
        root = Path(work_dir)
        # A fleet's name is stable for one work dir (so a restarted fleet finds its consumer again) and
        # differs between fleets (two fleets must not share one consumer).
        self.fleet_name = "f" + hashlib.sha256(f"{socket.gethostname()}:{root.resolve()}".encode()).hexdigest()[:12]
        self.revisions = Revisions()
        # Assignment messages read, and how many of them were for nodes this agent does not run (a fleet's
        # consumer filters its own nodes; these are what another fleet's would cost it).
        self.assignments_read = 0
        self.foreign_assignments = 0
        self.fleet = FleetJournal(root) if simulate else None
        if simulate:
            templates = [*DEFAULT_SIM_LABELS, *(sim_labels or ())]  # a given key's template replaces the default
            for i in range(1, simulate + 1):
                nid = expand(sim_prefix, i)
                agent = NodeAgent(nid, self.reporter, work_dir=root / nid, simulate=True, stop_grace=stop_grace,
                                  fleet=self.fleet, output=self.output)
                self.nodes[nid] = FleetNode(nid, parse_labels([expand(t, i) for t in templates]), agent)
        else:
            nid = node_id or socket.gethostname().split(".")[0]
            agent = NodeAgent(nid, self.reporter, work_dir=root, stop_grace=stop_grace, output=self.output)
            self.nodes[nid] = FleetNode(nid, dict(labels or {}), agent)
        self.named = True  # whether the consumers filter this agent's nodes (a fleet too large for that: not)
        self.shards = [Shard(self.fleet_name, list(self.nodes))]

    async def start(self) -> None:
        if self.fleet is not None:
            self.fleet.load()
            self.spawn(lambda: self.fleet.run(self.stopping), "fleet-state")
        self.reporter.start()
        self.output.start()
        if self.simulated:
            await self._open_fleet()
        # Each node beats from its registration on: a fleet that takes longer to register than the node
        # timeout must not see its first nodes disconnected while the last still register.
        self.spawn(self._heartbeat_loop, "heartbeats")
        await self._register_all()
        self.spawn(self._follow_assignments, "assignments")

    # -- registration ------------------------------------------------------------------------------

    async def _ask(self, subject: str, body: bytes, what: str) -> bytes:
        """A request the health service answers, retried until it does (the agent may start first)."""
        delay = 0.2
        while True:
            try:
                return await self.bus.request(subject, body, timeout=5)
            except InvalidInput:
                raise
            except ShoalError as exc:
                if self.stopping.is_set():
                    raise
                log.info("%s not answered yet (%s); retrying", what, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _open_fleet(self) -> None:
        """A simulated fleet reads its nodes' assignments from consumers the health service keeps, each
        filtering the nodes it names (`fleet_shards`), so that it never reads another fleet's."""
        self.shards, self.named = fleet_shards(self.fleet_name, list(self.nodes), self.bus.max_payload)
        if not self.named:
            log.warning("fleet %s has %d nodes, too many to name in one request (max_payload %d): it reads "
                        "every node's assignments", self.fleet_name, len(self.nodes), self.bus.max_payload)
        for shard in self.shards:
            await self._open_shard(shard)

    async def _open_shard(self, shard: Shard) -> None:
        body = to_json(OpenFleetRequest(nodes=shard.node_ids if self.named else []))
        reply = from_json(await self._ask(s.fleet_open(shard.name), body, f"fleet {shard.name}"), OpenFleetResponse)
        shard.consumer = reply.consumer
        self.heartbeat_interval = reply.heartbeat_interval

    async def _register_all(self) -> None:
        gate = asyncio.Semaphore(REGISTER_IN_FLIGHT)

        async def one(node: FleetNode) -> None:
            async with gate:
                await self._register(node)

        await asyncio.gather(*(one(n) for n in self.nodes.values()))
        log.info("registered %d node(s)", len(self.nodes))

    async def _register(self, node: FleetNode) -> None:
        """Register on the node's own subject (its id and the digest of its labels: what its identity may
        publish), which also resets the node's assignments consumer to its whole current assignment."""
        request = RegisterNodeRequest(node_id=node.node_id, labels=node.labels, hostname=socket.gethostname(),
                                      agent_version=AGENT_VERSION, simulated=self.simulated,
                                      fleet=self.fleet_name if self.simulated else "")
        subject = s.node_register(node.node_id, s.labels_digest(node.labels))
        reply = from_json(await self._ask(subject, to_json(request), f"registration of {node.node_id}"),
                          RegisterNodeResponse)
        self.heartbeat_interval = reply.heartbeat_interval
        if reply.consumer:
            self.shards[0].consumer = reply.consumer
        node.registered = True
        if not self.simulated:
            await self._beat(node, 0)

    async def _beat(self, node: FleetNode, seq: int) -> None:
        await self.bus.publish(s.heartbeat(node.node_id),
                               to_msgpack(Heartbeat(node_id=node.node_id, at=utcnow(), seq=seq)))

    async def _beat_fleet(self, online: list[FleetNode], seq: int) -> None:
        """A simulated fleet beats for its nodes together: one message per FLEET_HEARTBEAT_NODES nodes."""
        at = utcnow()
        for i in range(0, len(online), FLEET_HEARTBEAT_NODES):
            share = [n.node_id for n in online[i:i + FLEET_HEARTBEAT_NODES]]
            beat = FleetHeartbeat(fleet=self.fleet_name, node_ids=share, at=at, seq=seq)
            try:
                await self.bus.publish(s.fleet_heartbeat(self.fleet_name), to_msgpack(beat))
            except ShoalError as exc:
                log.info("%d heartbeats not sent: %s", len(online) - i, exc)
                return

    async def _heartbeat_loop(self) -> None:
        seq = 0
        loop = asyncio.get_running_loop()
        while not await self.sleep(self.heartbeat_interval):
            seq += 1
            now = loop.time()
            online = [node for node in self.nodes.values() if node.registered and not self._offline(node, now)]
            if self.simulated:
                await self._beat_fleet(online, seq)
                continue
            for i in range(0, len(online), HEARTBEAT_BATCH):
                results = await asyncio.gather(*(self._beat(n, seq) for n in online[i:i + HEARTBEAT_BATCH]),
                                               return_exceptions=True)
                errors = [r for r in results if isinstance(r, BaseException)]
                if errors:
                    log.info("%d heartbeats not sent: %s", len(errors), errors[0])
                    break

    def _offline(self, node: FleetNode, now: float) -> bool:
        """Simulated network trouble: a node drops off for a while, then replays what it missed."""
        if node.offline_until:
            if now < node.offline_until:
                return True
            node.offline_until = 0.0
            backlog, node.backlog = node.backlog, {}
            log.info("simulated node %s is back (%d assignment updates waiting)", node.node_id, len(backlog))
            for execution, headers in backlog.values():
                node.agent.on_execution(execution, headers)
            return False
        if self.disconnect_rate and self.random.random() < self.disconnect_rate:
            node.offline_until = now + self.disconnect_duration
            log.info("simulated node %s drops off for %.1fs", node.node_id, self.disconnect_duration)
            return True
        return False

    async def _follow_assignments(self) -> None:
        """Read this agent's assignments (the executions of its node, or of a fleet's nodes, newest state
        of each) from the consumers the health service keeps for it, and hand each to its node.

        The first batches are the whole current assignment (a consumer starts from the last state of
        every execution it filters); when it is delivered, each node may tidy what it no longer needs. A
        redelivered older state of an execution (after an ack was lost) is ignored: revisions only move
        forward. A consumer that has gone (expired while the agent was away) is asked for again.
        """
        for shard in self.shards:
            shard.caught_up = False
        async with asyncio.TaskGroup() as shards:  # one crashing stops all: the loop is started again
            for shard in self.shards:
                shards.create_task(self._follow(shard))

    async def _follow(self, shard: Shard) -> None:
        loop = asyncio.get_running_loop()
        reader = PullReader(self.bus, s.STREAM_ASSIGNMENTS, shard.consumer, batch=512)
        try:
            while not self.stopping.is_set():
                try:
                    batch = await reader.next_batch()
                except NotFound:
                    log.warning("assignments consumer %s is gone; asking for it again", shard.consumer)
                    await (self._open_shard(shard) if self.simulated else self._register_all())
                    shard.caught_up = False
                    reader = PullReader(self.bus, s.STREAM_ASSIGNMENTS, shard.consumer, batch=512)
                    continue
                for msg in batch:
                    self._assigned(msg, loop.time())
                if not shard.caught_up and (not batch or batch[-1].pending == 0):
                    shard.caught_up = True  # the current assignment is all here; changes follow
                    for node_id in shard.node_ids:
                        self.nodes[node_id].agent.assignment_seen()
                    if self.fleet is not None and all(other.caught_up for other in self.shards):
                        self.fleet.assignment_seen()
        finally:
            await reader.close()

    def _assigned(self, msg: StreamMessage, now: float) -> None:
        self.assignments_read += 1
        node = self.nodes.get(msg.subject.split(".")[2])  # shoal.assign.<node>.<ns>.<job>.<execution>
        if node is None:
            self.foreign_assignments += 1
            return
        if is_delete(msg.headers):
            return
        execution = from_msgpack_or_none(msg.data, Execution, f"assignment {msg.subject}")
        if execution is None or not self.revisions.newer(execution.id, execution.status.revision):
            return
        if node.offline_until and now < node.offline_until:
            node.backlog[execution.id] = (execution, msg.headers)
            return
        node.agent.on_execution(execution, msg.headers)

    async def stop(self) -> None:
        self.stopping.set()
        for node in self.nodes.values():
            await node.agent.shutdown()
        if self.fleet is not None:
            await self.fleet.flush()
        await asyncio.gather(self.reporter.drain(), self.output.drain())
        await super().stop()

    async def crash(self) -> None:
        """Go away as kill -9 would, for tests of re-adoption: stop no run, send no report, write no state.

        Processes keep running, reports still queued are lost, the fleet file stays as last written and
        the connection is closed without draining. The component is unusable afterwards (do not stop() it).
        """
        self.stopping.set()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        reporter = self.reporter.abandon()
        if reporter is not None:
            tasks.append(reporter)
        for node in self.nodes.values():
            node.agent.abandon()
        await self.output.abandon()
        if tasks:
            await asyncio.wait(tasks, timeout=2)
        self.bus.closing = True  # closed on purpose: not a connection lost to the server
        await self.bus.nc.close()

"""The node agent process: one real node, or a fleet of simulated ones for scale tests.

It registers each node (retrying until the health service answers), writes heartbeats, watches the
executions assigned to its nodes and hands each version of each execution to that node's `NodeAgent`.
A simulated fleet shares one connection, one watch and one heartbeat loop, so thousands of nodes fit in
one process; with `disconnect_rate` its nodes drop off the network now and then, as edge nodes do.

What the agent runs survives the agent: real runs in their run dirs, a simulated fleet's in one file
(fleetstate.py), so a restarted agent re-adopts them (see node.py). `crash()` simulates kill -9 for tests.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import socket
from pathlib import Path

from shared import subjects as s
from shared.api import RegisterNodeRequest, RegisterNodeResponse
from shared.codec import from_json, from_msgpack_or_none, to_json, to_msgpack
from shared.durations import utcnow
from shared.errors import InvalidInput, ShoalError
from shared.models import Execution, Heartbeat
from shared.runtime import Component
from shared.settings import Settings
from shared.transport import Bus, Kv

from .fleetstate import FleetJournal
from .node import NodeAgent
from .reporter import Reporter

log = logging.getLogger(__name__)

AGENT_VERSION = "0.1.0"
HEARTBEAT_BATCH = 200
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


def parse_labels(pairs: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise InvalidInput(f"label {pair!r} must be key=value", field="label")
        labels[key] = value
    return labels


class FleetNode:
    def __init__(self, node_id: str, labels: dict[str, str], agent: NodeAgent) -> None:
        self.node_id = node_id
        self.labels = labels
        self.agent = agent
        self.offline_until = 0.0
        self.backlog: dict[str, tuple[Execution, dict[str, str]]] = {}


class AgentService(Component):
    name = "agent"

    def __init__(self, bus: Bus, settings: Settings, *, node_id: str = "", labels: dict[str, str] | None = None,
                 work_dir: str = ".shoal-agent", simulate: int = 0, sim_prefix: str = "sim-{i:04d}",
                 sim_labels: list[str] | None = None, disconnect_rate: float = 0.0,
                 disconnect_duration: float = 5.0, stop_grace: float = 10.0, seed: int | None = None) -> None:
        super().__init__(bus, settings)
        self.reporter = Reporter(bus)
        self.nodes: dict[str, FleetNode] = {}
        self.simulated = simulate > 0
        self.disconnect_rate = disconnect_rate
        self.disconnect_duration = disconnect_duration
        self.random = random.Random(seed)
        self.heartbeat_interval = settings.heartbeat_interval
        root = Path(work_dir)
        self.fleet = FleetJournal(root) if simulate else None
        if simulate:
            templates = sim_labels or list(DEFAULT_SIM_LABELS)
            for i in range(1, simulate + 1):
                nid = expand(sim_prefix, i)
                agent = NodeAgent(nid, self.reporter, work_dir=root / nid, simulate=True, stop_grace=stop_grace,
                                  fleet=self.fleet)
                self.nodes[nid] = FleetNode(nid, parse_labels([expand(t, i) for t in templates]), agent)
        else:
            nid = node_id or socket.gethostname().split(".")[0]
            agent = NodeAgent(nid, self.reporter, work_dir=root, stop_grace=stop_grace)
            self.nodes[nid] = FleetNode(nid, dict(labels or {}), agent)

    async def start(self) -> None:
        if self.fleet is not None:
            self.fleet.load()
            self.spawn(lambda: self.fleet.run(self.stopping), "fleet-state")
        self.reporter.start()
        self.heartbeats = Kv(self.bus, s.BUCKET_HEARTBEATS)
        await self._register_all()
        self.spawn(self._heartbeat_loop, "heartbeats")
        self.spawn(self._watch, "assignments")

    async def _register_all(self) -> None:
        gate = asyncio.Semaphore(32)

        async def one(node: FleetNode) -> None:
            async with gate:
                await self._register(node)

        await asyncio.gather(*(one(n) for n in self.nodes.values()))
        log.info("registered %d node(s)", len(self.nodes))

    async def _register(self, node: FleetNode) -> None:
        request = RegisterNodeRequest(node_id=node.node_id, labels=node.labels, hostname=socket.gethostname(),
                                      agent_version=AGENT_VERSION, simulated=self.simulated)
        delay = 0.2
        while True:
            try:
                reply = await self.bus.request(s.NODES_REGISTER, to_json(request), timeout=5)
                break
            except InvalidInput:
                raise
            except ShoalError as exc:
                if self.stopping.is_set():
                    raise
                log.info("registration of %s not answered yet (%s); retrying", node.node_id, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self.heartbeat_interval = from_json(reply, RegisterNodeResponse).heartbeat_interval
        await self._beat(node, 0)

    async def _beat(self, node: FleetNode, seq: int) -> None:
        await self.heartbeats.put(node.node_id, to_msgpack(Heartbeat(node_id=node.node_id, at=utcnow(), seq=seq)))

    async def _heartbeat_loop(self) -> None:
        seq = 0
        loop = asyncio.get_running_loop()
        while not await self.sleep(self.heartbeat_interval):
            seq += 1
            now = loop.time()
            online = [node for node in self.nodes.values() if not self._offline(node, now)]
            # A fleet's heartbeats go out together, not one round trip after another.
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

    async def _watch(self) -> None:
        executions = Kv(self.bus, s.BUCKET_EXECUTIONS)
        pattern = s.executions_of_node(next(iter(self.nodes))) if len(self.nodes) == 1 else ">"
        loop = asyncio.get_running_loop()
        async with executions.watch(pattern) as watch:
            async for entry in watch:
                if entry is None:  # the current assignment is all here; changes follow
                    for node in self.nodes.values():
                        node.agent.assignment_seen()
                    if self.fleet is not None:
                        self.fleet.assignment_seen()
                    continue
                if entry.deleted:
                    continue
                node_id = entry.key.split(".")[2]
                node = self.nodes.get(node_id)
                if node is None:
                    continue
                execution = from_msgpack_or_none(entry.value, Execution, f"assignment {entry.key}")
                if execution is None:
                    continue
                if node.offline_until and loop.time() < node.offline_until:
                    node.backlog[execution.id] = (execution, entry.headers)
                    continue
                node.agent.on_execution(execution, entry.headers)

    async def stop(self) -> None:
        self.stopping.set()
        for node in self.nodes.values():
            await node.agent.shutdown()
        if self.fleet is not None:
            await self.fleet.flush()
        await self.reporter.drain()
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
        if tasks:
            await asyncio.wait(tasks, timeout=2)
        self.bus.closing = True  # closed on purpose: not a connection lost to the server
        await self.bus.nc.close()

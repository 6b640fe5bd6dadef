"""Node registration and liveness.

Agents register through a request-reply endpoint (validated, so a bad agent gets a structured error)
and then write a heartbeat into the heartbeats bucket every interval. Every health replica watches
that bucket; the replica holding the sweep lease marks a node that has been silent for `node_timeout`
disconnected and its executions `lost`, resumes them when the node comes back, and fails them once
they have been lost for longer than `lost_grace` (edge nodes go offline often: a short outage must not
fail a job).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict

from shared import subjects as s
from shared.api import OpenFleetRequest, OpenFleetResponse, RegisterNodeRequest, RegisterNodeResponse
from shared.codec import from_json, from_msgpack_or_none, to_json, to_msgpack
from shared.durations import format_duration, utcnow
from shared.errors import Conflict, InvalidInput
from shared.models import (
    TERMINAL_STATES,
    Evaluation,
    Execution,
    FleetHeartbeat,
    Heartbeat,
    Node,
    NodeState,
    NodeStateType,
)
from shared.store import Bucket, Mirror, Store
from shared.transport import ApiRequest, Bus, Entry, Message
from shared.validation import check_hostname, check_labels, check_node_id, check_token

from .transitions import lost_since, mark_lost, set_observed

log = logging.getLogger(__name__)


class NodeRegistry:
    def __init__(self, bus: Bus, store: Store, heartbeat_interval: float) -> None:
        self.bus = bus
        self.store = store
        self.heartbeat_interval = heartbeat_interval

    async def register(self, req: ApiRequest) -> bytes:
        """`shoal.v1.nodes.register.<node id>.<labels digest>`: the subject names the node and its labels,
        so that NATS permissions can confine a node identity to itself and to its pinned labels; the body
        must say the same. Resets the node's assignments consumer, so that a restarted agent reads its
        whole current assignment again."""
        body = from_json(req.data, RegisterNodeRequest)
        check_node_id(body.node_id)
        check_labels(body.labels, "labels")
        check_hostname(body.hostname)
        if req.token(4) != body.node_id:
            raise InvalidInput(f"node_id {body.node_id!r} is not the node this subject registers ({req.token(4)!r})",
                               field="node_id")
        if req.token(5) != s.labels_digest(body.labels):
            raise InvalidInput("labels do not match the digest in the subject (shoal.v1.nodes.register.<node id>."
                               "<labels digest>)", field="labels")
        consumer = ""
        if not body.fleet:
            consumer = s.assign_consumer(body.node_id)
            await self.bus.reset_pull_consumer(s.STREAM_ASSIGNMENTS, consumer, s.assignments(body.node_id))
        now = utcnow()
        key = body.node_id
        joined = False
        while True:
            record = await self.store.nodes.get(key)
            if record is None:
                node = Node(
                    id=body.node_id,
                    labels=dict(body.labels),
                    state=NodeState(state_type="ready", message="registered"),
                    registered_at=now,
                    updated_at=now,
                    revision=1,
                    hostname=body.hostname,
                    agent_version=body.agent_version,
                    simulated=body.simulated,
                )
                try:
                    await self.store.nodes.create(key, node)
                except Conflict:
                    continue
                joined = True
                break
            node = record.value
            changed = (
                node.labels != body.labels
                or node.state.state_type != "ready"
                or node.hostname != body.hostname
                or node.agent_version != body.agent_version
            )
            joined = node.labels != body.labels or node.state.state_type != "ready"
            if not changed:
                break
            node.labels = dict(body.labels)
            node.hostname = body.hostname
            node.agent_version = body.agent_version
            node.simulated = body.simulated
            node.state = NodeState(state_type="ready", message="registered")
            node.updated_at = now
            node.revision += 1
            try:
                await self.store.nodes.update(key, node, last=record.revision)
            except Conflict:
                continue
            break
        if joined:
            await publish_node_eval(self.bus, node)
        return to_json(RegisterNodeResponse(node=node, heartbeat_interval=self.heartbeat_interval,
                                            consumer=consumer))

    async def open_fleet(self, req: ApiRequest) -> bytes:
        """`shoal.v1.fleets.open.<fleet>`: a simulated fleet's consumer of its nodes' assignments (reset to
        their current assignment); its nodes then register with `fleet` set.

        The body names the nodes, and the consumer filters just theirs: two fleets in one cluster must not
        each read (and drop) the other's. A fleet larger than MAX_FLEET_FILTERS opens one consumer per
        share of its nodes (`<fleet>-<k>`). One that names none (an older agent, or a server whose
        max_payload cannot carry the list), or too many, reads every node's, which this logs."""
        fleet = check_token(req.token(4), "fleet", "fleet name")
        body = from_json(req.data, OpenFleetRequest) if req.data.strip() else OpenFleetRequest()
        nodes = sorted({check_node_id(node_id, f"nodes[{i}]") for i, node_id in enumerate(body.nodes)})
        filters = fleet_filters(nodes, self.bus.max_payload)
        if not nodes:
            log.info("fleet %s names no nodes: it reads every node's assignments", fleet)
        elif len(filters) == 1 and filters[0] == f"{s.ASSIGN_PREFIX}.>":
            log.warning("fleet %s names %d nodes, too many for one consumer (at most %d, and one request): it "
                        "reads every node's assignments", fleet, len(nodes), MAX_FLEET_FILTERS)
        consumer = s.fleet_consumer(fleet)
        await reset_assignments_consumer(self.bus, consumer, filters)
        return to_json(OpenFleetResponse(consumer=consumer, heartbeat_interval=self.heartbeat_interval))


# Bytes of a consumer create request besides its filter subjects (stream, name, policies, timings).
CONSUMER_REQUEST_ROOM = 2048
# Filter subjects of one consumer: nats-server checks each against every other when it creates the
# consumer (1,000 took 0.07 s, 4,000 took 2 s); agents split larger fleets into several consumers.
MAX_FLEET_FILTERS = 1000


def fleet_filters(nodes: list[str], max_payload: int) -> list[str]:
    """The filter subjects of a fleet's consumer: its nodes' assignments, or all of them when it names no
    node, more than MAX_FLEET_FILTERS, or more than one request to the server can carry (as JSON)."""
    filters = [s.assignments(node_id) for node_id in nodes]
    if (not filters or len(filters) > MAX_FLEET_FILTERS
            or sum(len(f) + 4 for f in filters) + CONSUMER_REQUEST_ROOM > max_payload):
        return [f"{s.ASSIGN_PREFIX}.>"]
    return filters


async def reset_assignments_consumer(bus: Bus, consumer: str, filters: list[str]) -> None:
    """(Re)create an assignments consumer on one or several filter subjects."""
    await bus.reset_pull_consumer(s.STREAM_ASSIGNMENTS, consumer, filters[0],
                                  filter_subjects=filters if len(filters) > 1 else ())


async def publish_node_eval(bus: Bus, node: Node) -> None:
    """Ask the scheduler to place long-running and queued jobs on a node that joined or came back."""
    evaluation = Evaluation(
        id=str(uuid.uuid4()), namespace="", trigger="node-join", node_id=node.id, created_at=utcnow()
    )
    await bus.js_publish(s.NODE_EVAL, to_msgpack(evaluation), msg_id=f"node-{node.id}-{node.revision}")


class Liveness:
    """Watches heartbeats and nodes; the sweep (leader only) turns silence into disconnects and losses.

    A sweep costs what changed, not the fleet: nodes are kept in the order they were last heard (a
    heartbeat moves its node to the end), so a sweep reads from the front only the nodes silent for
    longer than the timeout, and then the nodes that are away (disconnected) for their return or their
    losses. A fleet of 100,000 quiet nodes costs a sweep one comparison.
    """

    def __init__(self, bus: Bus, store: Store, node_timeout: float, lost_grace: float) -> None:
        self.bus = bus
        self.store = store
        self.node_timeout = node_timeout
        self.lost_grace = lost_grace
        self.last_seen: OrderedDict[str, float] = OrderedDict()  # least recently heard first
        self.away: set[str] = set()  # nodes the bucket holds as disconnected
        self.mirror = NodesMirror(store.nodes, self)
        self.nodes = self.mirror.items
        self._settled: dict[str, int] = {}
        # While this replica could not hear NATS it heard no heartbeat either: after a reconnect every
        # node gets a full timeout again; otherwise a server restart would disconnect the whole fleet.
        self.listening = False
        bus.on_reconnect(self.forgive_silence)

    def forgive_silence(self) -> None:
        now = asyncio.get_running_loop().time()
        for node_id in self.last_seen:
            self.last_seen[node_id] = now

    def _deaf(self) -> bool:
        """Whether this replica cannot judge silence now (it cannot hear heartbeats)."""
        return not (self.listening and self.bus.connected)

    async def listen(self) -> None:
        """Every health replica hears every heartbeat (core NATS, no queue group), so whichever holds the
        sweep lease knows when each node was last heard."""
        await self.bus.subscribe(s.heartbeat("*"), self._heard, traced=False)
        await self.bus.subscribe(s.fleet_heartbeat("*"), self._heard_fleet, traced=False)
        self.listening = True

    def saw(self, node_id: str, now: float) -> None:
        """A node was heard at `now` (receipt time on our clock: edge clocks drift, and a new leader gives
        everyone a full timeout). Only known nodes are followed: a heartbeat cannot make up a node."""
        if node_id in self.nodes:
            self.last_seen[node_id] = now
            self.last_seen.move_to_end(node_id)

    async def _heard(self, msg: Message) -> None:
        sender = msg.subject.rsplit(".", 1)[-1]
        beat = from_msgpack_or_none(msg.data, Heartbeat, f"heartbeat on {msg.subject}")
        if beat is not None and beat.node_id == sender:
            self.saw(sender, asyncio.get_running_loop().time())

    async def _heard_fleet(self, msg: Message) -> None:
        """A simulated fleet's heartbeat for many of its nodes (only a fleet identity may send one)."""
        beat = from_msgpack_or_none(msg.data, FleetHeartbeat, f"fleet heartbeat on {msg.subject}")
        if beat is None or beat.fleet != msg.subject.rsplit(".", 1)[-1]:
            return
        now = asyncio.get_running_loop().time()
        for node_id in beat.node_ids:
            self.saw(node_id, now)

    def known(self, node_id: str, node: Node | None) -> None:
        """The nodes bucket changed (`node` None: deleted): a new node's clock starts now."""
        if node is None:
            self.last_seen.pop(node_id, None)
            self.away.discard(node_id)
            return
        if node_id not in self.last_seen:
            self.last_seen[node_id] = asyncio.get_running_loop().time()
        if node.state.state_type == "disconnected":
            self.away.add(node_id)
        else:
            self.away.discard(node_id)

    async def sweep(self) -> None:
        """One pass: disconnect silent nodes, reconnect returning ones, fail executions lost too long."""
        if not self.mirror.ready.is_set() or self._deaf():
            return
        now_mono = asyncio.get_running_loop().time()
        silent_nodes: list[str] = []
        for node_id, seen in self.last_seen.items():
            if now_mono - seen <= self.node_timeout:
                break
            silent_nodes.append(node_id)
        for node_id in silent_nodes:
            node = self.nodes.get(node_id)
            if node is None:
                self.last_seen.pop(node_id, None)  # deleted while the mirror reloaded
            elif node.state.state_type == "ready":
                silent = now_mono - self.last_seen[node_id]
                await self._set_node_state(node_id, "disconnected",
                                           f"no heartbeat for {format_duration(int(silent * 1e9))}")
                await self._lose_executions(node_id)
        for node_id in list(self.away):
            node = self.nodes.get(node_id)
            if node is None or node.state.state_type != "disconnected":
                self.away.discard(node_id)
                continue
            if now_mono - self.last_seen.get(node_id, 0.0) <= self.node_timeout:
                updated = await self._set_node_state(node_id, "ready", "heartbeats resumed")
                if updated is not None:
                    await publish_node_eval(self.bus, updated)
            if self._settled.get(node_id) != node.revision:
                lost_for = (utcnow() - node.updated_at).total_seconds()
                if lost_for >= self.lost_grace and await self._fail_long_lost(node_id) == 0:
                    self._settled[node_id] = node.revision  # nothing left to fail until it changes again

    async def _set_node_state(self, node_id: str, state: NodeStateType, message: str) -> Node | None:
        def change(node: Node) -> bool:
            if node.state.state_type == state:
                return False
            node.state = NodeState(state_type=state, message=message)
            node.updated_at = utcnow()
            node.revision += 1
            return True

        record = await self.store.nodes.mutate(node_id, change)
        if record is None:
            return None
        log.info("node %s is %s: %s", node_id, state, message)
        self.nodes[node_id] = record.value
        self.known(node_id, record.value)
        return record.value

    async def _executions_of(self, node_id: str) -> list[Execution]:
        return [r.value for r in await self.store.executions.scan(s.executions_of_node(node_id))]

    async def _lose_executions(self, node_id: str) -> None:
        now = utcnow()
        for execution in await self._executions_of(node_id):
            if execution.observed not in TERMINAL_STATES:
                await self.store.mutate_execution(execution, lambda e: mark_lost(e, now, node_id))

    async def _fail_long_lost(self, node_id: str) -> int:
        """Fail executions lost for longer than the grace; returns how many are still lost."""
        now = utcnow()
        still_lost = 0
        for execution in await self._executions_of(node_id):
            since = lost_since(execution)
            if since is None:
                continue
            if (now - since).total_seconds() < self.lost_grace:
                still_lost += 1
                continue

            def fail(e: Execution) -> bool:
                if e.observed != "lost":
                    return False
                set_observed(e, "failed", f"node {node_id} lost for more than {format_duration(int(self.lost_grace * 1e9))}")
                e.status.details["reason"] = "lost"
                return True

            await self.store.mutate_execution(execution, fail)
        return still_lost


class NodesMirror(Mirror[Node]):
    """The nodes bucket in memory, telling the liveness of every change (which nodes to follow, which are
    away)."""

    def __init__(self, bucket: Bucket[Node], liveness: Liveness) -> None:
        super().__init__(bucket)
        self.liveness = liveness

    async def applied(self, entry: Entry | None, loading: bool) -> None:
        if entry is not None:
            self.liveness.known(entry.key, self.items.get(entry.key))

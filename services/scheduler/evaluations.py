"""Evaluations: decide which nodes a job version should run on, and hand that plan to the rollout service.

Triggers: a job registered or updated (place it on every ready node its selector matches: `place`,
called by the submission handler with the job it has just written, so this costs no trip through the
evaluations stream), a job stopped, or a node that joined or came back (give it every running pipeline
and config job it matches, and let queued jobs of any type start). The scheduler only decides *where*;
the rollout service decides *when* (waves) and writes executions.

The cost of an evaluation follows what it names, not the size of the fleet or of the job list: a job
pinned to nodes by id reads just those nodes, a job that requires a label value reads the nodes that
carry it (`NodeTable`, an index the nodes mirror keeps current), and a node join looks only at the jobs
that want new nodes (`WantingJobs`, kept by a mirror of the jobs bucket that reads its changes in
batches, `JobsMirror`). Node joins that arrive in one
fetch are decided together: a fleet of a thousand nodes coming back is one add-nodes plan per job that
wants them, not a thousand.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from shared import subjects as s
from shared import telemetry
from shared.codec import decode_message, to_msgpack
from shared.durations import utcnow
from shared.errors import ShoalError
from shared.models import DAEMON_JOB_TYPES, Evaluation, Job, JobSpec, Node, Plan, PlanKind
from shared.selector import CompiledSelector, Requirement, SelectorError, compile_selector
from shared.store import Bucket, Mirror, Store
from shared.transport import Bus, Delivery, Entry

log = logging.getLogger(__name__)
T = TypeVar("T")

# Job states in which a newly joined node should get the job.
ACTIVE_JOB_STATES = frozenset(
    {"pending", "deploying", "running", "degraded", "rollout_paused", "rollout_failed", "completed"}
)
# Evaluations of jobs handled at once within one fetch (each waits on a few JetStream round trips).
EVAL_CONCURRENCY = 8
# Joined nodes read at once from the nodes bucket.
NODE_READS = 64
# Seconds the jobs mirror waits, once caught up, before it fetches the jobs written meanwhile.
JOBS_PACE = 0.25
# Seconds a node join waits for the jobs mirror to hold every job written before it.
CATCH_UP_WAIT = 5.0


class _Table(dict[str, T]):
    """A dict whose every change goes through `__setitem__` and `__delitem__` (a plain dict's update, pop
    and the like do not call them), so that a subclass can keep what it derives from its entries."""

    def pop(self, key: str, *default: Any) -> Any:  # type: ignore[override]
        if key in self:
            value = self[key]
            del self[key]
            return value
        if default:
            return default[0]
        raise KeyError(key)

    def popitem(self) -> tuple[str, T]:
        if not self:
            raise KeyError("popitem(): table is empty")
        key = next(reversed(self))
        return key, self.pop(key)

    def setdefault(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        if key not in self:
            self[key] = default
        return self.get(key, default)

    def update(self, *args: Any, **kwargs: T) -> None:  # type: ignore[override]
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other: Any) -> _Table[T]:  # type: ignore[override,misc]
        self.update(other)
        return self

    def clear(self) -> None:
        for key in list(self):
            del self[key]


class NodeTable(_Table[Node]):
    """The nodes mirror's table (node id -> Node), with an inverted index of labels kept by the same writes.

    `by_label[(key, value)]` holds the ids of the nodes carrying that label. Every change of the table
    goes through `__setitem__` and `__delitem__`, so the index is always the table's; a selector that
    requires a label value (`match_labels`, `=` and `in` expressions) then reads the nodes that carry it
    instead of the fleet. States are not indexed: readiness changes often and is checked on the few
    candidates.
    """

    def __init__(self, items: Mapping[str, Node] | None = None) -> None:
        super().__init__()
        self.by_label: dict[tuple[str, str], set[str]] = {}
        self.update(items or {})

    def __setitem__(self, node_id: str, node: Node) -> None:
        old = self.get(node_id)
        if old is not None:
            self._unindex(node_id, old)
        super().__setitem__(node_id, node)
        for pair in node.labels.items():
            self.by_label.setdefault(pair, set()).add(node_id)

    def __delitem__(self, node_id: str) -> None:
        node = self[node_id]
        super().__delitem__(node_id)
        self._unindex(node_id, node)

    def _unindex(self, node_id: str, node: Node) -> None:
        for pair in node.labels.items():
            ids = self.by_label.get(pair)
            if ids is not None:
                ids.discard(node_id)
                if not ids:
                    del self.by_label[pair]

    def with_label_in(self, requirements: Iterable[Requirement]) -> Collection[str] | None:
        """Ids of the nodes that can meet every `=` and `in` requirement: those holding one of the allowed
        values of the requirement with the fewest such nodes. None when nothing requires a value."""
        best: list[set[str]] | None = None
        best_size = 0
        for req in requirements:
            if req.op not in ("=", "in"):
                continue
            sets = [ids for value in req.values if (ids := self.by_label.get((req.key, value)))]
            size = sum(map(len, sets))  # a node has one value per key: the sets are disjoint
            if best is None or size < best_size:
                best, best_size = sets, size
                if not size:
                    break
        if best is None:
            return None
        return best[0] if len(best) == 1 else set().union(*best)


def candidates(selector: CompiledSelector, pinned: Sequence[str], nodes: Mapping[str, Node]) -> Collection[Node]:
    """The nodes a selector could match, without reading the others: the nodes it pins by id, else those
    holding its rarest required label (when `nodes` is an indexed `NodeTable`), else every node."""
    if pinned:
        return [node for node_id in set(pinned) if (node := nodes.get(node_id)) is not None]
    if isinstance(nodes, NodeTable):
        ids = nodes.with_label_in(selector.requirements)
        if ids is not None:
            return [nodes[node_id] for node_id in ids]
    return nodes.values()


def select(selector: CompiledSelector, pool: Iterable[Node]) -> list[str]:
    """Ready nodes of `pool` the selector matches, sorted by id (a stable order for waves)."""
    return sorted(
        node.id for node in pool
        if node.state.state_type == "ready" and selector.matches(node.id, node.labels)
    )


def compile_spec_selector(spec: JobSpec) -> CompiledSelector:
    sel = spec.selector
    return compile_selector(sel.match_labels, sel.match_expressions, sel.match_ids)


def eligible_nodes(spec: JobSpec, nodes: Mapping[str, Node]) -> list[str]:
    """Ready nodes matching the job's selector, sorted by id; reads only the `candidates`."""
    selector = compile_spec_selector(spec)
    return select(selector, candidates(selector, spec.selector.match_ids, nodes))


def wants_new_node(job: Job) -> bool:
    """Queued jobs of any type, and pipeline and config jobs that are deployed (a config push that has
    completed everywhere still belongs on a node that joins later; a failed rollout's rollback too)."""
    state = job.state.state_type
    if state == "queued":
        return True
    return job.type in DAEMON_JOB_TYPES and state in ACTIVE_JOB_STATES


class WantingJobs(_Table[Job]):
    """The jobs mirror's table, holding only the jobs that want new nodes (job key -> Job).

    A write of a job that does not want new nodes (a finished query, a stopped job) drops its key, so a
    node join reads these few instead of every job ever submitted. Each job's compiled selector is kept
    until its next version.
    """

    def __init__(self, items: Mapping[str, Job] | None = None) -> None:
        super().__init__()
        self._selectors: dict[str, tuple[int, CompiledSelector | None]] = {}
        self.update(items or {})

    def __setitem__(self, key: str, job: Job) -> None:
        if wants_new_node(job):
            super().__setitem__(key, job)
        elif key in self:
            del self[key]

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._selectors.pop(key, None)

    def selector(self, key: str) -> CompiledSelector | None:
        """The compiled selector of the job at `key` (None if it cannot be compiled: it matches nothing)."""
        job = self[key]
        cached = self._selectors.get(key)
        if cached is not None and cached[0] == job.version:
            return cached[1]
        try:
            compiled: CompiledSelector | None = compile_spec_selector(job.spec)
        except SelectorError as exc:
            log.warning("job %s has a selector that cannot be compiled (%s): it gets no new nodes", key, exc)
            compiled = None
        self._selectors[key] = (job.version, compiled)
        return compiled


def joined_placements(jobs: WantingJobs, joined: Mapping[str, Node]) -> list[tuple[Job, list[str]]]:
    """For each job that wants new nodes, the joined nodes it should get (sorted by id); jobs that get
    none are left out. Jobs in key order, so the same joins always make the same plans."""
    out: list[tuple[Job, list[str]]] = []
    for key in sorted(jobs):
        selector = jobs.selector(key)
        if selector is None:
            continue
        job = jobs[key]
        node_ids = select(selector, candidates(selector, job.spec.selector.match_ids, joined))
        if node_ids:
            out.append((job, node_ids))
    return out


def join_key(eval_ids: Sequence[str]) -> str:
    """What identifies one set of node-join evaluations decided together: the id of a single one, a digest
    of them all otherwise (plan message ids are made from it, so a redelivered set is deduplicated)."""
    if len(eval_ids) == 1:
        return eval_ids[0]
    return "joins-" + hashlib.sha256("\n".join(sorted(eval_ids)).encode()).hexdigest()[:32]


def nodes_mirror(store: Store) -> Mirror[Node]:
    """The scheduler's live copy of the nodes bucket, label-indexed."""
    mirror = Mirror(store.nodes)
    mirror.items = NodeTable()
    return mirror


class JobsMirror(Mirror[Job]):
    """The scheduler's copy of the jobs that want new nodes, fed by a watch of the whole jobs bucket that
    takes the changes in batches.

    Every job write reaches every scheduler replica (a job's life is several: created, deploying, running,
    completed), yet only node joins read this copy. Read one change at a time, each write would cost a
    replica a fetch of its own; so once the watch has caught up, it waits `pace` seconds before fetching
    again, and what was written meanwhile comes in one fetch. A reader that needs the copy current (a node
    join must see every job written before it) calls `catch_up()`, which ends the wait at once and returns
    when the copy holds the bucket's last write.
    """

    def __init__(self, bucket: Bucket[Job], pace: float = JOBS_PACE) -> None:
        super().__init__(bucket)
        self.items = WantingJobs()
        self.pace = pace
        self.revision = 0  # stream sequence of the latest write applied
        self.batches = 0  # times the watch caught up (about one fetch each)
        self._hurry = asyncio.Event()
        self._moved = asyncio.Event()

    async def applied(self, entry: Entry | None, loading: bool) -> None:
        if entry is None:
            self._moved.set()
            return
        self.revision = max(self.revision, entry.revision)
        if entry.pending or loading:
            return
        self.batches += 1
        self._moved.set()
        if not self._hurry.is_set():
            try:
                await asyncio.wait_for(self._hurry.wait(), self.pace)
            except asyncio.TimeoutError:
                pass
        self._hurry.clear()

    async def catch_up(self, timeout: float = CATCH_UP_WAIT) -> bool:
        """Until the copy holds the last write the bucket had when called; False (the copy as it is) if that
        takes longer than `timeout` or the bucket cannot be asked."""
        await self.wait_ready()
        kv = self.bucket.kv
        try:
            last = int((await kv.bus.stream_info(kv.stream))["last_seq"])
        except ShoalError as exc:
            log.warning("jobs mirror: cannot read where the bucket is (%s); using the copy as it is", exc)
            return False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.revision < last:
            left = deadline - loop.time()
            if left <= 0:
                log.warning("jobs mirror: at %d, not at the bucket's %d after %.1fs; using the copy as it is",
                            self.revision, last, timeout)
                return False
            self._moved.clear()
            self._hurry.set()
            try:
                await asyncio.wait_for(self._moved.wait(), min(left, 0.1))
            except asyncio.TimeoutError:
                pass
        return True


def wanting_jobs_mirror(store: Store) -> JobsMirror:
    """The scheduler's live copy of the jobs that want new nodes (of the whole jobs bucket)."""
    return JobsMirror(store.jobs)


class Evaluations:
    def __init__(self, bus: Bus, store: Store, nodes: Mirror[Node], jobs: Mirror[Job]) -> None:
        self.bus = bus
        self.store = store
        self.nodes = nodes
        self.jobs = jobs
        # Nodes whose labels job evaluations read (what a selector costs; the fleet size is not).
        self.nodes_examined = 0

    async def handle_batch(self, deliveries: Sequence[Delivery]) -> dict[Delivery, Exception]:
        """Every evaluation of one fetch: job evaluations each on its own (EVAL_CONCURRENCY at once), node
        joins together. Returns the deliveries that failed, with why (they are retried)."""
        failures: dict[Delivery, Exception] = {}
        joins: list[tuple[Delivery, Evaluation]] = []
        others: list[tuple[Delivery, Evaluation]] = []
        for delivery in deliveries:
            try:
                evaluation = decode_message(delivery.data, Evaluation, f"evaluation on {delivery.subject}")
            except Exception as exc:
                failures[delivery] = exc
                continue
            (joins if evaluation.trigger == "node-join" else others).append((delivery, evaluation))
        gate = asyncio.Semaphore(EVAL_CONCURRENCY)

        async def one(delivery: Delivery, evaluation: Evaluation) -> None:
            async with gate:
                try:
                    with telemetry.span(f"process {delivery.subject}", kind=telemetry.CONSUMER,
                                        headers=delivery.headers, subject=delivery.subject):
                        await self.evaluate(evaluation)
                except Exception as exc:
                    failures[delivery] = exc

        async def together() -> None:
            if not joins:
                return
            try:
                with telemetry.span(f"process {s.NODE_EVAL}", kind=telemetry.CONSUMER, headers=joins[0][0].headers,
                                    subject=s.NODE_EVAL, attributes={"shoal.evaluations": len(joins)}):
                    await self.nodes_joined([evaluation for _, evaluation in joins])
            except Exception as exc:
                failures.update((delivery, exc) for delivery, _ in joins)

        await asyncio.gather(together(), *(one(d, e) for d, e in others))
        return failures

    async def evaluate(self, evaluation: Evaluation) -> None:
        if evaluation.trigger == "node-join":
            await self.nodes_joined([evaluation])
            return
        await self.nodes.wait_ready()
        if evaluation.trigger == "job-stop":
            await self._plan(evaluation, "stop", [], "job stopped")
        else:
            await self._job_changed(evaluation)

    async def _job_changed(self, evaluation: Evaluation) -> None:
        record = await self.store.jobs.get(s.job_key(evaluation.namespace, evaluation.job_id))
        if record is None:
            log.info("evaluation %s: job %s is gone", evaluation.id, evaluation.job_id)
            return
        job = record.value
        if job.version != evaluation.job_version:
            log.info("evaluation %s is for version %d, job is at %d: superseded",
                     evaluation.id, evaluation.job_version, job.version)
            return
        await self.place(evaluation, job)

    async def place(self, evaluation: Evaluation, job: Job) -> None:
        """The deploy plan of a job registered or updated, from the job as it was just written: the ready
        nodes its selector matches now. The plan's message id is the evaluation's, so placing twice (a
        redelivered submission) publishes one plan."""
        await self.nodes.wait_ready()
        selector = compile_spec_selector(job.spec)
        pool = candidates(selector, job.spec.selector.match_ids, self.nodes.items)
        self.nodes_examined += len(pool)
        targets = select(selector, pool)
        await self._plan(evaluation, "deploy", targets, f"{len(targets)} eligible nodes")

    async def nodes_joined(self, evaluations: Sequence[Evaluation]) -> None:
        """Give nodes that joined (or came back) the jobs that want them: one add-nodes plan per job,
        listing every joined node it matches."""
        await self.jobs.wait_ready()
        if isinstance(self.jobs, JobsMirror):
            await self.jobs.catch_up()  # every job written before these joins
        # Read the nodes themselves: the mirror may not have seen the writes that triggered these yet.
        gate = asyncio.Semaphore(NODE_READS)

        async def read(node_id: str) -> Node | None:
            async with gate:
                record = await self.store.nodes.get(node_id)
            return record.value if record is not None else None

        node_ids = sorted({e.node_id for e in evaluations if e.node_id})
        joined = {node.id: node for node in await asyncio.gather(*map(read, node_ids))
                  if node is not None and node.state.state_type == "ready"}
        if not joined:
            return
        key = join_key([e.id for e in evaluations])
        first = min(e.id for e in evaluations)
        jobs = self.jobs.items
        wanting = jobs if isinstance(jobs, WantingJobs) else WantingJobs(jobs)
        for job, targets in joined_placements(wanting, joined):
            reason = f"node {targets[0]} joined" if len(targets) == 1 else f"{len(targets)} nodes joined"
            plan = Plan(eval_id=first, namespace=job.namespace, job_id=job.id, job_version=job.version,
                        kind="add-nodes", node_ids=targets, reason=reason, created_at=utcnow())
            await self.bus.js_publish(s.plan(job.namespace), to_msgpack(plan), msg_id=f"{key}:{job.id}")

    async def _plan(self, evaluation: Evaluation, kind: PlanKind, node_ids: list[str], reason: str) -> None:
        plan = Plan(eval_id=evaluation.id, namespace=evaluation.namespace, job_id=evaluation.job_id,
                    job_version=evaluation.job_version, kind=kind, node_ids=node_ids,
                    reason=reason, created_at=utcnow())
        await self.bus.js_publish(s.plan(evaluation.namespace), to_msgpack(plan), msg_id=evaluation.id)

"""The scheduler's placement rules, without a server (services/scheduler/evaluations.py).

Which nodes a job goes to must not depend on how they are found: looking up a pinned job's ids, reading
the nodes that carry a required label from the index, and scanning the whole fleet give the same sorted
list. And what a placement reads follows its selector, not the fleet: a pinned job reads its nodes, a
labelled job the nodes with that label. A node join reads the jobs that want new nodes, and joins that
arrive together make one plan per job.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.scheduler.evaluations import (
    ACTIVE_JOB_STATES,
    Evaluations,
    NodeTable,
    WantingJobs,
    eligible_nodes,
    join_key,
    joined_placements,
    wants_new_node,
)
from shared.codec import convert, from_msgpack
from shared.models import Evaluation, Job, JobSpec, JobState, Node, NodeState, Plan
from shared.selector import compile_selector

NOW = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.timezone.utc)
# Fast and reproducible: the same examples on every run, and no example database.
RULES = settings(derandomize=True, database=None, deadline=None, max_examples=300)

KEYS = ("zone", "tier", "example.com/app")
VALUES = ("a", "b", "c", "")
IDS = tuple(f"n{i}" for i in range(12))


def node(node_id: str, labels: dict[str, str] | None = None, state: str = "ready") -> Node:
    return Node(id=node_id, labels=dict(labels or {}), state=NodeState(state_type=state),  # type: ignore[arg-type]
                registered_at=NOW, updated_at=NOW, revision=1)


def spec(*, labels: dict[str, str] | None = None, expressions: list[str] | None = None,
         ids: list[str] | None = None, type: str = "pipeline") -> JobSpec:
    selector = {"match_labels": labels or {}, "match_expressions": expressions or [], "match_ids": ids or []}
    return convert({"name": "x", "type": type, "config": {"simulate": {}}, "selector": selector}, JobSpec)


def job(job_id: str, state: str = "running", *, type: str = "pipeline", version: int = 1, **selector: Any) -> Job:
    return Job(id=job_id, name=job_id, namespace="default", type=type, version=version,  # type: ignore[arg-type]
               state=JobState(state_type=state), spec=spec(type=type, **selector),  # type: ignore[arg-type]
               created_at=NOW, modified_at=NOW, revision=1)


def scanned(job_spec: JobSpec, nodes: Mapping[str, Node]) -> list[str]:
    """The rule itself, as a plain scan of every node."""
    sel = job_spec.selector
    selector = compile_selector(sel.match_labels, sel.match_expressions, sel.match_ids)
    return sorted(n.id for n in nodes.values() if n.state.state_type == "ready" and selector.matches(n.id, n.labels))


def rebuilt_index(table: Mapping[str, Node]) -> dict[tuple[str, str], set[str]]:
    index: dict[tuple[str, str], set[str]] = {}
    for node_id, n in table.items():
        for pair in n.labels.items():
            index.setdefault(pair, set()).add(node_id)
    return index


# --- strategies ---------------------------------------------------------------------------------

label_maps = st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=3)
nodes_st = st.dictionaries(
    st.sampled_from(IDS),
    st.tuples(label_maps, st.sampled_from(("ready", "ready", "disconnected"))),
    max_size=len(IDS),
).map(lambda found: {i: node(i, labels, state) for i, (labels, state) in found.items()})


@st.composite
def requirement_text(draw: st.DrawFn) -> str:
    key = draw(st.sampled_from(KEYS))
    op = draw(st.sampled_from(("=", "==", "!=", "in", "notin", "exists", "!")))
    if op == "exists":
        return key
    if op == "!":
        return f"!{key}"
    if op in ("in", "notin"):
        values = draw(st.lists(st.sampled_from(VALUES), min_size=1, max_size=3))
        return f"{key} {op} ({','.join(values)})"
    return f"{key}{op}{draw(st.sampled_from(VALUES))}"


specs_st = st.builds(
    lambda labels, expressions, ids: spec(labels=labels, expressions=expressions, ids=ids),
    label_maps,
    st.lists(requirement_text(), max_size=3),
    st.lists(st.sampled_from(IDS + ("ghost",)), max_size=4),
)


# --- placement: the same nodes however they are found ----------------------------------------------


@RULES
@given(nodes_st, specs_st)
def test_placement_through_the_index_or_the_ids_equals_the_plain_scan(nodes: dict[str, Node],
                                                                       job_spec: JobSpec) -> None:
    expected = scanned(job_spec, nodes)
    assert eligible_nodes(job_spec, NodeTable(nodes)) == expected
    assert eligible_nodes(job_spec, nodes) == expected  # a plain mapping: ids looked up, or scanned


class Reads(dict[str, Node]):
    """A plain mapping that counts the nodes handed out, however they are asked for."""

    def __init__(self, items: Mapping[str, Node]) -> None:
        super().__init__(items)
        self.read = 0

    def __getitem__(self, key: str) -> Node:
        self.read += 1
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        if key in self:
            self.read += 1
        return super().get(key, default)

    def values(self) -> Iterator[Node]:  # type: ignore[override]
        for value in super().values():
            self.read += 1
            yield value

    def items(self) -> Iterator[tuple[str, Node]]:  # type: ignore[override]
        for key, value in super().items():
            self.read += 1
            yield key, value


class CountingTable(NodeTable):
    """A NodeTable that counts the nodes handed out (filled before counting starts)."""

    read = 0

    def __getitem__(self, key: str) -> Node:
        self.read += 1
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        if key in self:
            self.read += 1
        return super().get(key, default)

    def values(self) -> Any:
        self.read += len(self)
        return super().values()

    def items(self) -> Any:
        self.read += len(self)
        return super().items()


def fleet(size: int) -> dict[str, Node]:
    return {f"sim-{i:05d}": node(f"sim-{i:05d}", {"zone": f"zone-{i % 100}", "simulated": "true"})
            for i in range(size)}


def test_a_pinned_job_reads_only_its_nodes() -> None:
    nodes = Reads(fleet(2000))
    pinned = spec(ids=["sim-00007", "sim-01234", "ghost"], labels={"simulated": "true"})
    assert eligible_nodes(pinned, nodes) == ["sim-00007", "sim-01234"]
    assert nodes.read == 2


def test_a_job_that_requires_a_label_reads_only_the_nodes_that_carry_it() -> None:
    table = CountingTable(fleet(2000))
    table.read = 0
    # zone=zone-7 is on 20 nodes, simulated=true on all 2000: the rarer one is read.
    assert eligible_nodes(spec(labels={"zone": "zone-7", "simulated": "true"}), table) == \
        [f"sim-{i:05d}" for i in range(7, 2000, 100)]
    assert table.read == 20
    table.read = 0
    assert len(eligible_nodes(spec(expressions=["zone in (zone-1,zone-2)", "simulated"]), table)) == 40
    assert table.read == 40
    table.read = 0
    assert eligible_nodes(spec(labels={"zone": "nowhere"}), table) == []
    assert table.read == 0
    # Nothing to look up (only exclusions): every node is read, as it must be.
    table.read = 0
    assert len(eligible_nodes(spec(expressions=["zone notin (zone-1)"]), table)) == 1980
    assert table.read == 2000


def test_the_index_follows_disconnects_relabels_and_removals() -> None:
    table = NodeTable({"a": node("a", {"zone": "z1"}), "b": node("b", {"zone": "z1"})})
    by_zone = spec(labels={"zone": "z1"})
    assert eligible_nodes(by_zone, table) == ["a", "b"]
    table["a"] = node("a", {"zone": "z1"}, state="disconnected")
    assert eligible_nodes(by_zone, table) == ["b"]
    table["b"] = node("b", {"zone": "z2"})
    assert eligible_nodes(by_zone, table) == []
    assert table.by_label == {("zone", "z1"): {"a"}, ("zone", "z2"): {"b"}}
    assert table.pop("a").id == "a"
    assert table.pop("a", None) is None
    with pytest.raises(KeyError):
        table.pop("a")
    del table["b"]
    assert table == {} and table.by_label == {}


operations = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.sampled_from(IDS), label_maps),
        st.tuples(st.just("pop"), st.sampled_from(IDS), st.none()),
        st.tuples(st.just("del"), st.sampled_from(IDS), st.none()),
        st.tuples(st.just("update"), st.sampled_from(IDS), label_maps),
        st.tuples(st.just("setdefault"), st.sampled_from(IDS), label_maps),
        st.tuples(st.just("popitem"), st.none(), st.none()),
        st.tuples(st.just("clear"), st.none(), st.none()),
    ),
    max_size=40,
)


@RULES
@given(operations)
def test_the_label_index_is_always_the_tables(ops: list[tuple[str, Any, Any]]) -> None:
    """Whatever the mirror (or anyone) does to the table, the index is the one built from scratch."""
    table, plain = NodeTable(), {}
    for op, key, labels in ops:
        if op == "set":
            table[key] = plain[key] = node(key, labels)
        elif op == "pop":
            assert table.pop(key, None) == plain.pop(key, None)
        elif op == "del" and key in plain:
            del table[key], plain[key]
        elif op == "update":
            table.update({key: node(key, labels)})
            plain.update({key: node(key, labels)})
        elif op == "setdefault":
            assert table.setdefault(key, node(key, labels)) == plain.setdefault(key, node(key, labels))
        elif op == "popitem" and plain:
            assert table.popitem() == plain.popitem()
        elif op == "clear":
            table.clear()
            plain.clear()
        assert table == plain
        assert table.by_label == rebuilt_index(plain)


# --- node joins: the jobs that want new nodes --------------------------------------------------------


JOB_STATES = ("pending", "queued", "deploying", "running", "degraded", "rollout_paused", "rollout_failed",
              "completed", "failed", "stopped")


@RULES
@given(st.lists(st.tuples(st.sampled_from(("j1", "j2", "j3")), st.sampled_from(JOB_STATES),
                          st.sampled_from(("pipeline", "config", "query", "update"))), max_size=30))
def test_the_wanting_table_holds_exactly_the_jobs_that_want_new_nodes(writes: list[tuple[str, str, str]]) -> None:
    table, latest = WantingJobs(), {}
    for key, state, job_type in writes:
        written = job(key, state, type=job_type)
        table[key] = latest[key] = written
        assert table == {k: j for k, j in latest.items() if wants_new_node(j)}


@pytest.mark.parametrize("state", JOB_STATES)
@pytest.mark.parametrize("job_type", ["pipeline", "config", "query", "update"])
def test_which_jobs_want_new_nodes(state: str, job_type: str) -> None:
    wanted = state == "queued" or (job_type in ("pipeline", "config") and state in ACTIVE_JOB_STATES)
    assert wants_new_node(job("j", state, type=job_type)) is wanted


def test_a_job_leaves_the_table_when_it_stops_wanting_and_its_selector_follows_its_version() -> None:
    table = WantingJobs({"default.j": job("j", "running", labels={"zone": "a"})})
    joined = {"x": node("x", {"zone": "a"}), "y": node("y", {"zone": "b"})}
    assert [(j.id, ids) for j, ids in joined_placements(table, joined)] == [("j", ["x"])]
    table["default.j"] = job("j", "running", version=2, labels={"zone": "b"})
    assert [(j.id, ids) for j, ids in joined_placements(table, joined)] == [("j", ["y"])]
    table["default.j"] = job("j", "stopped", version=2, labels={"zone": "b"})
    assert "default.j" not in table and joined_placements(table, joined) == []


def test_joined_nodes_go_together_to_each_job_that_wants_them() -> None:
    table = WantingJobs({
        "default.all": job("all", "running"),
        "default.zoned": job("zoned", "deploying", labels={"zone": "a"}),
        "default.pinned": job("pinned", "queued", type="query", ids=["n2"]),
        "default.none": job("none", "running", labels={"zone": "nowhere"}),
        "default.done": job("done", "completed", type="query"),  # a finished one-shot job: not kept
    })
    joined = {i: node(i, {"zone": "a" if i != "n2" else "b"}) for i in ("n3", "n1", "n2")}
    joined["n4"] = node("n4", {"zone": "a"}, state="disconnected")
    placements = {j.id: ids for j, ids in joined_placements(table, joined)}
    assert placements == {"all": ["n1", "n2", "n3"], "zoned": ["n1", "n3"], "pinned": ["n2"]}


def test_a_set_of_joins_has_one_key_whatever_its_order() -> None:
    assert join_key(["e1"]) == "e1"
    assert join_key(["e1", "e2"]) == join_key(["e2", "e1"]) != join_key(["e1", "e3"])
    assert join_key(["e1", "e2"]).startswith("joins-") and len(join_key(["e1", "e2"])) <= 64


# --- node joins through Evaluations, with stand-ins for the bus and the buckets -----------------------


class Record:
    def __init__(self, value: Any) -> None:
        self.value = value


class NodesBucket:
    def __init__(self, nodes: Mapping[str, Node]) -> None:
        self.nodes = nodes
        self.gets = 0

    async def get(self, key: str) -> Record | None:
        self.gets += 1
        return Record(self.nodes[key]) if key in self.nodes else None


class JobsBucket:
    async def scan(self, pattern: str = ">") -> list[Any]:
        raise AssertionError("a node join must not scan every job")


class Store:
    def __init__(self, nodes: Mapping[str, Node]) -> None:
        self.nodes = NodesBucket(nodes)
        self.jobs = JobsBucket()


class Bus:
    def __init__(self) -> None:
        self.published: list[tuple[str, Plan, str]] = []

    async def js_publish(self, subject: str, data: bytes, *, msg_id: str = "", **_: Any) -> None:
        self.published.append((subject, from_msgpack(data, Plan), msg_id))


class ReadyMirror:
    def __init__(self, items: dict[str, Any]) -> None:
        self.items = items

    async def wait_ready(self, timeout: float = 10.0) -> None:
        return None


def test_a_burst_of_joins_is_one_plan_per_job_and_reads_no_job_bucket() -> None:
    joined = {f"n{i:04d}": node(f"n{i:04d}", {"zone": "a" if i % 2 else "b"}) for i in range(1000)}
    joined["gone"] = node("gone", {"zone": "a"}, state="disconnected")
    jobs = WantingJobs({f"default.{j.id}": j for j in (
        job("all", "running"), job("odd", "running", labels={"zone": "a"}), job("idle", "stopped"))})
    bus, store = Bus(), Store(joined)
    evaluations = Evaluations(bus, store, ReadyMirror(NodeTable()), ReadyMirror(jobs))  # type: ignore[arg-type]
    joins = [Evaluation(id=f"e{i}", namespace="", trigger="node-join", node_id=i, created_at=NOW) for i in joined]
    asyncio.run(evaluations.nodes_joined(joins))
    plans = {plan.job_id: (subject, plan, msg_id) for subject, plan, msg_id in bus.published}
    assert sorted(plans) == ["all", "odd"]
    assert plans["all"][1].node_ids == sorted(i for i in joined if i != "gone")
    assert plans["odd"][1].node_ids == [f"n{i:04d}" for i in range(1, 1000, 2)]
    assert all(p.kind == "add-nodes" and s == "shoal.plan.default" for s, p, _ in plans.values())
    key = join_key([e.id for e in joins])
    assert {m for _, _, m in plans.values()} == {f"{key}:all", f"{key}:odd"}
    assert store.nodes.gets == len(joined)


def test_a_single_join_keeps_its_evaluations_id() -> None:
    bus = Bus()
    evaluations = Evaluations(bus, Store({"n1": node("n1")}), ReadyMirror(NodeTable()),  # type: ignore[arg-type]
                              ReadyMirror(WantingJobs({"default.j": job("j")})))
    asyncio.run(evaluations.nodes_joined([Evaluation(id="e1", namespace="", trigger="node-join", node_id="n1",
                                                     created_at=NOW)]))
    [(subject, plan, msg_id)] = bus.published
    assert (plan.eval_id, plan.node_ids, plan.reason, msg_id) == ("e1", ["n1"], "node n1 joined", "e1:j")

"""The per-node index a rollout pass reads (`services.rollout.nodes`): kept as events arrive, it is the index
built at once, and `decide` reading it decides what it decides from the executions themselves.

The views are those of tests/unit/test_decide.py (every rule's inputs, drawn). The owner of a job keeps its
index from an earlier record of the same rollout (fewer waves started, fewer failed nodes, fewer targets)
while executions arrive in any order, some first as an older revision, some only to be archived, and moves
it on to the view's record at a drawn moment."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import msgspec
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from services.rollout.decide import Step, decide
from services.rollout.model import Rollout
from services.rollout.nodes import Facts, NodeIndex, basis
from shared.models import DesiredState, Execution, ObservedState
from tests.builders import NOW, execution, job, nodes, old, plain, rollout, seconds, spec, view
from tests.unit.test_decide import RULES, views


def summary(index: NodeIndex) -> Any:
    """Everything a pass reads of an index, as plain data."""
    def ident(e: Execution | None) -> tuple[str, int] | None:
        return None if e is None else (e.id, e.status.revision)

    facts = {n: (ident(f.latest), f.wave, f.started, f.failing, f.restartable, ident(f.elsewhere), f.blocks,
                 f.retiring, f.live, f.tally.astuple(), f.stall) for n, f in index.facts.items()}
    return {
        "facts": facts,
        "latest": {n: ident(e) for n, e in index.latest.items()},
        "unplaced": {w: sorted(s) for w, s in index.unplaced.items() if s},
        "sets": (sorted(index.failing), sorted(index.restartable), sorted(index.retiring), sorted(index.live)),
        "elsewhere": {n: ident(e) for n, e in index.elsewhere.items()},
        "blocking": index.blocking,
        "tally": index.tally.astuple(),
        "stalls": [e.id for e in index.may_stall(NOW + dt.timedelta(days=1))[0]],
        "position": index.position, "failed": index.failed, "started": index.started,
        "waiting": index.waiting(),
    }


def canon(step: Step) -> Any:
    """A step, its lists in a fixed order (the index walks nodes in rollout order, a scan in stored order)."""
    return (plain(step.rollout), step.rollout_first,
            sorted((repr(plain(c.execution)), c.replaces.id if c.replaces else "") for c in step.creates),
            sorted((s.execution.id, s.reason, s.next_id) for s in step.stops),
            step.job_state, step.mark_stable, sorted(step.timers), step.again)


def earlier(draw: st.DrawFn, record: Rollout) -> Rollout:
    """A record the same rollout may have had before `record`."""
    fewer = 0
    if record.wave_sizes and record.wave_sizes[-1] > 1:
        fewer = draw(st.integers(0, record.wave_sizes[-1] - 1))
    sizes = [*record.wave_sizes[:-1], record.wave_sizes[-1] - fewer] if record.wave_sizes else []
    wave = draw(st.integers(1, record.current_wave)) if record.current_wave > 1 else record.current_wave
    failed = record.failed_nodes[: draw(st.integers(0, len(record.failed_nodes)))]
    return msgspec.structs.replace(record, targets=record.targets[: len(record.targets) - fewer], wave_sizes=sizes,
                                   current_wave=wave, failed_nodes=failed)


def older_revision(e: Execution) -> Execution:
    """What the owner may have heard of `e` first: just created."""
    status = msgspec.structs.replace(e.status, revision=1, stable_at=None, next_execution_id="",
                                     desired_state=DesiredState(state_type="running"),
                                     observed_state=ObservedState(state_type="pending"), details={})
    return msgspec.structs.replace(e, status=status)


@RULES
@given(views(timeouts=True, stopping=True), st.data())
def test_an_index_kept_as_events_arrive_is_the_index_built_at_once(v: Any, data: st.DataObject) -> None:
    record, the_spec = v.rollout, v.spec
    assume(record is not None and the_spec is not None)
    draw = data.draw
    kept = NodeIndex(earlier(draw, record), the_spec, v.specs)
    arrivals = draw(st.permutations(v.executions))
    moved_at = draw(st.integers(0, len(arrivals)))
    stray = execution("n7", id="stray", observed="failed", reason="exit")
    for i, e in enumerate(arrivals):
        if i == moved_at:
            assert kept.follow(record)
        if draw(st.booleans()):
            kept.put(older_revision(e))
        kept.put(e)
        if i == 0:
            kept.put(stray)
    if moved_at == len(arrivals):
        assert kept.follow(record)
    kept.remove(stray)
    built = NodeIndex(record, the_spec, v.specs, v.executions)
    assert summary(kept) == summary(built)
    assert canon(decide(dataclasses.replace(v, nodes=kept))) == canon(decide(v))


class Counting(NodeIndex):
    """An index that notes the nodes it derives again."""

    refreshed: list[str] | None = None

    def derive(self, node: str) -> Facts:
        if self.refreshed is not None:
            self.refreshed.append(node)
        return super().derive(node)


def test_a_record_that_moved_on_by_a_wave_refreshes_only_that_wave() -> None:
    record = rollout(6, waves=[2, 2, 2], current_wave=1)
    executions = [execution(n, stable=True) for n in nodes(2)] + [old(n) for n in nodes(6)]
    kept = Counting(record, spec(), {}, executions)
    assert kept.waiting() == 0 and kept.unplaced_started(record) == []
    refreshed: list[str] = []
    kept.refreshed = refreshed
    second = msgspec.structs.replace(record, current_wave=2)
    assert kept.follow(second)
    assert sorted(refreshed) == ["n3", "n4"]
    assert kept.unplaced_started(second) == ["n3", "n4"] and kept.waiting() == 2
    assert summary(kept) == summary(NodeIndex(second, spec(), {}, executions))


@pytest.mark.parametrize("change", [
    {"deployment_id": "another"}, {"job_version": 1}, {"state": "succeeded"}, {"rollback_of": 1},
    {"timed_out": True}, {"strategy": "canary"},
    {"targets": ["n1", "n2", "n3"]},  # fewer
    {"targets": ["n1", "n2", "n3", "n9"]},  # not appended
    {"wave_sizes": [1, 3]},  # other waves
    {"targets": ["n1", "n2", "n3", "n4", "n5"], "wave_sizes": [3, 2]},  # appended, but an earlier wave changed
    {"failed_nodes": []},  # fewer
    {"failed_nodes": ["n2", "n1"]},  # not appended
])
def test_a_record_that_changed_more_than_waves_targets_and_failures_has_the_index_built_again(
        change: dict[str, Any]) -> None:
    record = rollout(4, failed=["n1"])
    kept = NodeIndex(record, spec(), {}, [execution("n1")])
    assert not kept.follow(msgspec.structs.replace(record, **change))
    assert kept.rollout is record


@pytest.mark.parametrize("change", [
    {"current_wave": 2}, {"failed_nodes": ["n1", "n2"]}, {"message": "x", "wakes": 3},
    {"targets": ["n1", "n2", "n3", "n4", "n5"], "wave_sizes": [2, 3]},
])
def test_a_record_that_moved_on_is_followed(change: dict[str, Any]) -> None:
    record = rollout(4, failed=["n1"])
    executions = [execution("n1", observed="failed"), execution("n2"), old("n5")]
    kept = NodeIndex(record, spec(), {}, executions)
    newer = msgspec.structs.replace(record, **change)
    assert kept.follow(newer) and kept.rollout is newer
    assert summary(kept) == summary(NodeIndex(newer, spec(), {}, executions))
    assert basis(newer) == basis(record)


def test_started_targets_count_by_waves_for_gated_rollouts_and_all_for_the_others() -> None:
    assert rollout(6, waves=[1, 2, 3], current_wave=2).started_count() == 3
    assert rollout(6, waves=[1, 2, 3], current_wave=0).started_count() == 0
    assert rollout(6, strategy="immediate", waves=[6], current_wave=0).started_count() == 6


def test_the_stall_heap_skips_what_changed_and_keeps_what_it_did_not_take() -> None:
    record = rollout(4, waves=[4], current_wave=1)
    first = execution("n1", observed="pending", created=NOW - seconds(100))
    second = execution("n2", observed="starting", created=NOW - seconds(50))
    kept = NodeIndex(record, spec(), {}, [first, second, execution("n3", observed="running", created=NOW)])
    stalled, soonest = kept.may_stall(NOW - seconds(60))
    assert [e.id for e in stalled] == [first.id] and soonest == NOW - seconds(50)
    assert [e.id for e in kept.may_stall(NOW - seconds(60))[0]] == [first.id]  # still there: nothing changed
    kept.put(msgspec.structs.replace(first, status=msgspec.structs.replace(first.status, stable_at=NOW)))
    stalled, soonest = kept.may_stall(NOW)
    assert [e.id for e in stalled] == [second.id, execution("n3").id] and soonest is None
    assert decide(view(job(), record, spec(), [])).creates  # (an empty index places every target)


# -- the owner's memory of a job -------------------------------------------------------------------


def test_the_owner_keeps_its_index_as_executions_arrive_and_prunes_only_what_arrived() -> None:
    from services.rollout.jobstate import JobState

    record = rollout(4, waves=[2, 2], current_wave=1)
    state = JobState("default", "job-svc")
    for e in [old(n) for n in nodes(4)]:
        state.offer(e)
    index = state.nodes(record, spec())
    assert index.unplaced_started(record) == ["n1", "n2"]
    first = [execution("n1", stable=True), execution("n2", stable=True)]
    for e in first:
        state.offer(e)
    assert state.nodes(record, spec()) is index  # kept, not built again
    assert index.waiting() == 0 and index.latest.keys() == {"n1", "n2"}
    stale = msgspec.structs.replace(first[0], status=msgspec.structs.replace(first[0].status, revision=1,
                                                                           stable_at=None))
    state.offer(stale)  # an older revision changes nothing
    assert index.facts["n1"].latest is first[0]
    assert state.prune(record) == []  # in progress: nothing is archived
    done = msgspec.structs.replace(record, state="succeeded", current_wave=2)
    ended = old("n1", desired="stopped", observed="stopped", id="ended")
    state.offer(ended)
    assert state.nodes(done, spec()) is not index  # another state: built again
    assert [e.id for e in state.prune(done)] == ["ended"]
    assert state.index is not None and "ended" not in state.index.by_node["n1"] and "ended" not in state.executions
    later = old("n2", desired="stopped", observed="stopped", id="later")
    state.offer(later)
    assert [e.id for e in state.prune(done)] == ["later"]  # only what arrived since the last prune
    state.executions["sneaked"] = old("n3", desired="stopped", observed="stopped", id="sneaked")
    assert state.prune(done) == []  # not arrived through offer: not looked at under the same record
    assert [e.id for e in state.prune(msgspec.structs.replace(done, rollback_of=3))] == ["sneaked"]


def test_the_stall_heap_holds_one_entry_per_execution_however_often_it_changes() -> None:
    record = rollout(4, waves=[4], current_wave=1)
    kept = NodeIndex(record, spec(), {}, [])
    first = execution("n1", observed="pending", created=NOW - seconds(100))
    for revision in range(2, 1000):
        kept.put(msgspec.structs.replace(first, status=msgspec.structs.replace(first.status, revision=revision)))
    assert len(kept.stalls) == 1 and kept.stalling == 1
    for attempt in range(500):  # another execution on the node each time (restarts): old entries go stale
        kept.put(execution("n1", observed="pending", id=f"attempt-{attempt}", created=NOW - seconds(50) + seconds(attempt)))
    assert kept.stalling == 1 and len(kept.stalls) <= 2 * 1 + 64
    assert [e.id for e in kept.may_stall(NOW + dt.timedelta(days=1))[0]] == ["attempt-499"]


def test_a_gated_record_without_waves_has_nothing_started_and_finishes() -> None:
    record = rollout(2, waves=[], current_wave=0)
    step = decide(view(job(), record, spec(), [old("n1"), old("n2")]))
    assert not step.creates and step.rollout is not None and step.rollout.state == "succeeded"


def test_a_job_without_a_record_keeps_no_list_of_what_arrived() -> None:
    from services.rollout.jobstate import JobState

    state = JobState("default", "job-svc")
    state.offer(old("n1"))
    assert state.recent and state.prune(None) == [] and not state.recent

"""Per node, what a pass of `decide` reads of a job's executions, kept so that a pass costs what changed.

The rules of a pass are per node, but for two that count (the wave rule: is every started target
settled? and the job's state: how many current executions ended, failed, are in trouble?). `NodeIndex`
holds, under one rollout record, each node's facts: its newest execution of the rollout
(`decide.latest_by_node`), whether that failed the version, whether the restart policy replaces it, what
runs there of another version while the rollout has not reached it, whether anything on it is to be
stopped (`decide.retire`), whether its wave waits for it; and from them what a pass asks: the nodes with
work (sets), how many started targets their wave waits for, the counts of the job's state,
and the executions that may stall (a heap by creation time). A pass of `decide` reads those and the
nodes it changes itself, never every execution.

`decide` without an index builds one from the view's executions. The owner of a job's partition keeps
one (`JobState`): an execution event refreshes that execution's node; a record that moved on by a wave,
by failed nodes or by appended targets refreshes just those nodes (`follow`); any other change (a new
deployment, a new state) has it built again, which is what the change costs anyway. Built one way or
the other, the index is the same (tests/unit/test_nodes.py).
"""

from __future__ import annotations

import datetime as dt
import heapq
from collections.abc import Iterable, Iterator, Mapping

from shared.models import Execution, JobSpec, details

from .decide import (
    NODE_TROUBLE,
    Tally,
    awaits_restart,
    current_elsewhere,
    history,
    latest_by_node,
    restartable,
    retire,
    settled,
    tally_of,
)
from .model import Rollout
from .waves import wave_at, wave_edges

NO_TALLY = Tally()


def _flip(into: set[str], node: str, present: bool) -> None:
    if present:
        into.add(node)
    else:
        into.discard(node)


def _edges(rollout: Rollout) -> list[int] | None:
    """The waves' `wave_edges` for gated rollouts with waves; None for the others (whose targets are all of
    wave 0: `Rollout.wave_number`)."""
    if not rollout.gated or not rollout.wave_sizes:
        return None
    return wave_edges(rollout.wave_sizes)


class Facts:
    """What the rules derive from one node's executions under one rollout record."""

    __slots__ = ("latest", "wave", "started", "failing", "restartable", "elsewhere", "blocks", "retiring", "live",
                 "tally", "stall")

    def __init__(self) -> None:
        self.latest: Execution | None = None  # `latest_by_node`
        self.wave = -1  # of the target (-1: not a target)
        self.started = False  # a target whose wave has started
        self.failing = False  # its latest failed the version (not node trouble, never stable)
        self.restartable = False  # started, and the policy replaces its latest (`restartable`)
        self.elsewhere: Execution | None = None  # not reached yet: what runs there, which the policy replaces
        self.blocks = False  # a started target its wave waits for (unsettled, or awaiting a restart; not failed)
        self.retiring = False  # `retire` stops something on it
        self.live = False  # has an execution meant to run
        self.tally = NO_TALLY  # its part of the job's state
        self.stall: dt.datetime | None = None  # created_at of its latest, if that may stall


NO_FACTS = Facts()


def basis(rollout: Rollout) -> tuple[object, ...]:
    """What of the record every node's facts depend on: when it changes, the index is built again."""
    return (rollout.deployment_id, rollout.job_version, rollout.state, rollout.rollback_of, rollout.timed_out,
            rollout.strategy)


class NodeIndex:
    def __init__(self, rollout: Rollout, spec: JobSpec, specs: Mapping[int, JobSpec],
                 executions: Iterable[Execution] = ()) -> None:
        self.rollout = rollout
        self.spec = spec
        self.specs = specs  # the spec of every version seen (read when a node is refreshed)
        self.position: dict[str, int] = {node: i for i, node in enumerate(rollout.targets)}
        self.failed: set[str] = set(rollout.failed_nodes)
        self.started = rollout.started_count()
        self.edges = _edges(rollout)
        # Only a gated rollout with a health check stalls (`decide.stalled_executions`).
        self.stalls_kept = rollout.gated and spec.rollout.health_check is not None
        self.by_node: dict[str, dict[str, Execution]] = {}
        self.facts: dict[str, Facts] = {}
        self.latest: dict[str, Execution] = {}
        self.unplaced: dict[int, set[str]] = {}  # per wave, its targets without an execution of the rollout
        self.failing: set[str] = set()
        self.restartable: set[str] = set()
        self.elsewhere: dict[str, Execution] = {}
        self.retiring: set[str] = set()
        self.live: set[str] = set()
        self.blocking = 0  # started targets their wave waits for
        self.tally = Tally()
        self.stalls: list[tuple[dt.datetime, int, str, str]] = []  # (created_at, position, node, execution id)
        self.stalling = 0  # nodes whose facts say they may stall (the heap holds at least these)
        for execution in executions:
            self._hold(execution)
        for node in {*self.by_node, *rollout.targets}:
            self.refresh(node)

    # -- keeping it -------------------------------------------------------------------------------

    def put(self, execution: Execution) -> None:
        """An execution, new or changed: its node's facts again."""
        self._hold(execution)
        self.refresh(execution.node_id)

    def _hold(self, execution: Execution) -> None:
        held = self.by_node.get(execution.node_id)
        if held is None:
            held = self.by_node[execution.node_id] = {}
        held[execution.id] = execution

    def remove(self, execution: Execution) -> None:
        held = self.by_node.get(execution.node_id)
        if held is not None and held.pop(execution.id, None) is not None:
            if not held:
                del self.by_node[execution.node_id]
            self.refresh(execution.node_id)

    def follow(self, rollout: Rollout) -> bool:
        """Move on to a newer record of the same rollout, refreshing only the nodes it changed (a wave that
        started, targets appended, failed nodes added). False if it changed more (another basis, fewer
        targets or failed nodes, other waves): build the index again. Targets are taken as appended when
        the last one held is still in its place (a rollout's targets only ever grow at the end:
        `controller.add_nodes`)."""
        held = self.rollout
        if basis(rollout) != basis(held):
            return False
        old_targets, new_targets = len(held.targets), len(rollout.targets)
        old_failed = len(held.failed_nodes)
        if (new_targets < old_targets or rollout.targets[old_targets - 1: old_targets] != held.targets[-1:]
                or rollout.wave_sizes[:-1] != held.wave_sizes[:-1]
                or (old_targets == new_targets and rollout.wave_sizes != held.wave_sizes)
                or len(rollout.failed_nodes) < old_failed or rollout.failed_nodes[:old_failed] != held.failed_nodes):
            return False
        before = self.started
        self.rollout = rollout
        self.started = rollout.started_count()
        self.edges = _edges(rollout)
        changed: list[str] = rollout.targets[min(before, self.started): max(before, self.started)]
        for i in range(old_targets, new_targets):
            self.position[rollout.targets[i]] = i
        changed += rollout.targets[old_targets:]
        added = rollout.failed_nodes[old_failed:]
        self.failed.update(added)
        for node in {*changed, *added}:
            self.refresh(node)
        return True

    def refresh(self, node: str) -> None:
        """Derive the node's facts again and move what changed in the sets and counters."""
        old = self.facts.get(node, NO_FACTS)
        new = self.derive(node)
        if new.latest is None and new.wave < 0 and not new.live and not new.retiring:
            self.facts.pop(node, None)
        else:
            self.facts[node] = new
        if old.latest is not new.latest:
            if new.latest is not None:
                self.latest[node] = new.latest
            elif old.latest is not None:
                del self.latest[node]
        was_unplaced, is_unplaced = old.latest is None and old.wave >= 0, new.latest is None and new.wave >= 0
        if was_unplaced != is_unplaced or old.wave != new.wave:
            if was_unplaced:
                self.unplaced[old.wave].discard(node)
            if is_unplaced:
                self.unplaced.setdefault(new.wave, set()).add(node)
        if old.failing != new.failing:
            _flip(self.failing, node, new.failing)
        if old.restartable != new.restartable:
            _flip(self.restartable, node, new.restartable)
        if old.retiring != new.retiring:
            _flip(self.retiring, node, new.retiring)
        if old.live != new.live:
            _flip(self.live, node, new.live)
        if old.elsewhere is not new.elsewhere:
            if new.elsewhere is not None:
                self.elsewhere[node] = new.elsewhere
            else:
                self.elsewhere.pop(node, None)
        if old.blocks != new.blocks:
            self.blocking += 1 if new.blocks else -1
        if old.tally != new.tally:
            self.tally.add(old.tally, -1)
            self.tally.add(new.tally)
        self._track_stall(node, old, new)

    def _track_stall(self, node: str, old: Facts, new: Facts) -> None:
        """Push the node's execution on the stall heap when it becomes one that may stall (a new revision
        of the same execution keeps its entry); entries of executions that changed since are dropped as
        `may_stall` meets them, and all at once when they outnumber the live ones."""
        self.stalling += (new.stall is not None) - (old.stall is not None)
        if new.stall is not None and new.latest is not None and (
                old.stall != new.stall or old.latest is None or old.latest.id != new.latest.id):
            heapq.heappush(self.stalls, (new.stall, self.position[node], node, new.latest.id))
        if len(self.stalls) > 2 * self.stalling + 64:
            self.stalls = [entry for entry in self.stalls if self._current(entry)]
            heapq.heapify(self.stalls)

    def _current(self, entry: tuple[dt.datetime, int, str, str]) -> bool:
        created, _, node, execution_id = entry
        facts = self.facts.get(node)
        return (facts is not None and facts.stall == created and facts.latest is not None
                and facts.latest.id == execution_id)

    # -- the rules of one node --------------------------------------------------------------------

    def relevant(self, node: str) -> list[Execution]:
        """The node's executions a decision reads (not history)."""
        return [e for e in self.by_node.get(node, {}).values() if not history(e, self.rollout)]

    def derive(self, node: str) -> Facts:
        rollout, spec = self.rollout, self.spec
        executions = self.relevant(node)
        facts = Facts()
        latest = facts.latest = latest_by_node(executions, rollout).get(node)
        position = self.position.get(node)
        target = position is not None
        failed = node in self.failed
        if position is not None:
            facts.wave = 0 if self.edges is None else wave_at(position, self.edges)  # `Rollout.wave_number`
            facts.started = position < self.started
        if latest is not None:
            facts.failing = (latest.observed == "failed" and latest.status.stable_at is None
                             and details(latest).reason not in NODE_TROUBLE)
            facts.restartable = facts.started and restartable(latest, spec, rollout)
            if target:
                facts.tally = tally_of(latest, spec, rollout)
            if (self.stalls_kept and facts.started and not failed and not settled(latest)
                    and latest.observed != "lost" and latest.desired == "running"):
                facts.stall = latest.status.created_at
        facts.blocks = facts.started and self.blocks(node, latest)
        if target and not facts.started:
            for other in current_elsewhere(executions, {node}, rollout.job_version):
                own = self.specs.get(other.job_version) or other.job_spec
                if own is not None and restartable(other, own, rollout):
                    facts.elsewhere = other
        keep = {latest.id} if facts.restartable and latest is not None else set()
        if facts.elsewhere is not None:
            keep.add(facts.elsewhere.id)
        facts.retiring = bool(retire(executions, {node: latest} if latest is not None else {},
                                     {node} if target else set(), rollout, keep))
        for execution in executions:
            if execution.desired != "stopped":
                facts.live = True
                break
        return facts

    def blocks(self, node: str, latest: Execution | None) -> bool:
        """Whether the wave of target `node` waits for it with `latest` as its newest execution."""
        if node not in self.position or node in self.failed:
            return False
        return not (latest is not None and settled(latest) and not awaits_restart(latest, self.spec, self.rollout))

    # -- what a pass asks -------------------------------------------------------------------------

    def in_order(self, nodes: Iterable[str]) -> list[str]:
        """Nodes in rollout order (targets first, by position; then the others by name)."""
        position = self.position
        far = len(position)
        return sorted(nodes, key=lambda n: (position.get(n, far), n))

    def unplaced_started(self, rollout: Rollout) -> list[str]:
        """Targets whose wave has started in `rollout` (this record, or the pass's copy of it that started
        the next wave) without an execution of the rollout, in rollout order."""
        started = rollout.started_count()
        waves = [w for w in self.unplaced if w <= rollout.current_wave] if rollout.gated else [0]
        found = [n for w in waves for n in self.unplaced.get(w, ()) if self.position[n] < started]
        return self.in_order(found)

    def waiting(self) -> int:
        """Started targets their wave waits for."""
        return self.blocking

    def may_stall(self, before: dt.datetime) -> tuple[list[Execution], dt.datetime | None]:
        """The executions that may stall created at or before `before` (in rollout order), and the creation
        time of the next one after them (None: none)."""
        heap = self.stalls
        taken: list[tuple[dt.datetime, int, str, str]] = []
        found: dict[str, Execution] = {}
        soonest: dt.datetime | None = None
        while heap:
            entry = heap[0]
            if not self._current(entry):
                heapq.heappop(heap)  # stale: the node changed since
                continue
            created, _, node, _ = entry
            if created > before:
                soonest = created
                break
            taken.append(heapq.heappop(heap))
            latest = self.facts[node].latest
            assert latest is not None  # (`_current`)
            found[node] = latest
        for entry in taken:
            heapq.heappush(heap, entry)
        return [found[n] for n in self.in_order(found)], soonest

    def live_executions(self) -> Iterator[Execution]:
        for node in self.in_order(self.live):
            for execution in self.relevant(node):
                if execution.desired != "stopped":
                    yield execution

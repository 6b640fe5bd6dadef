"""What one reconcile pass of a job's rollout decides, as a pure function: no bus, no clock, no I/O.

`decide(view)` looks at a job, its rollout record, the spec it rolls out and the job's executions, and
returns one `Step`: the executions to create (and the ones they replace), the ones to stop,
the new rollout record, the job's state, the timers to set and the version to mark stable. It is the
rule book of docs/ROLLOUTS.md in one place, unit-tested without a server (tests/unit/test_decide.py);
`apply.py` carries a step out with compare-and-set writes, and the controller keeps the triggers.

A pass reads the executions through a `nodes.NodeIndex`: each node's facts under the record (its newest
execution of the rollout, and what the rules say of it), the nodes that have work, and counters for the
rules that count. The owner of a job keeps the index as events arrive, so a pass costs what changed, not
the number of executions; without one, `decide` builds it from `view.executions`.

A step that changes the rollout record ends the pass: the record is written first (compare-and-set
on the revision `decide` saw), and if that fails nothing after it is applied and the next pass decides
again from what the store holds. Everything else a step does is idempotent: execution ids derive from
what caused them, and a repeated step changes nothing.
"""

from __future__ import annotations

import datetime as dt
from collections import ChainMap
from collections.abc import Container, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from shared.durations import parse_rfc3339
from shared.ids import derived_id
from shared.models import (
    ENDED_JOB_STATES,
    ONE_SHOT_JOB_TYPES,
    TERMINAL_STATES,
    DesiredState,
    Execution,
    ExecutionStatus,
    Job,
    JobSpec,
    JobStateType,
    ObservedState,
    details,
)

from .model import IN_PROGRESS, Rollout

if TYPE_CHECKING:
    from .nodes import NodeIndex

HEALTH_VERDICTS = frozenset({"unhealthy", "deadline"})
# Failures that say something about the node, not about the version: they are restarted by the restart
# policy and never spend the failure budget (an operator restarting agents must not roll back a release).
NODE_TROUBLE = frozenset({"agent-restart", "agent-shutdown"})
TROUBLE = frozenset({"degraded", "lost", "failed"})


@dataclass(frozen=True)
class Policy:
    """The settings a decision depends on."""

    restart_backoff_base: float = 1.0
    restart_backoff_max: float = 60.0
    stall_grace: float = 30.0


@dataclass
class View:
    """Everything one pass decides from."""

    job: Job
    rollout: Rollout | None
    spec: JobSpec | None  # of the rolled-out version (None without a rollout)
    executions: list[Execution]
    now: dt.datetime
    policy: Policy = field(default_factory=Policy)
    # spec hashes of the versions a rollback compares (the stable one and the rolled-out one)
    spec_hashes: dict[int, str] = field(default_factory=dict)
    # the spec of every version the executions run (an execution's own copy may be left out)
    specs: dict[int, JobSpec] = field(default_factory=dict)
    # the executions per node under `rollout`, kept by the job's owner (None: built from `executions`)
    nodes: NodeIndex | None = None

    def live(self) -> Iterable[Execution]:
        """The executions meant to run (what stopping everything stops)."""
        return self.nodes.live_executions() if self.nodes is not None else self.executions


@dataclass(frozen=True)
class Create:
    execution: Execution
    replaces: Execution | None = None  # its previous_execution_id; that one's next is linked to it


@dataclass(frozen=True)
class Stop:
    execution: Execution
    reason: str
    next_id: str = ""


@dataclass(frozen=True)
class JobStateChange:
    state: JobStateType
    message: str
    source_version: int | None  # None: whatever version the job is at
    force: bool = False


@dataclass
class Step:
    """One pass's decisions, in the order they are applied."""

    rollout: Rollout | None = None  # the new record, written first (compare-and-set)
    rollout_first: bool = True  # False: the other effects go before the record (stopping everything)
    creates: list[Create] = field(default_factory=list)
    stops: list[Stop] = field(default_factory=list)
    job_state: JobStateChange | None = None
    mark_stable: int = 0
    timers: list[tuple[dt.datetime, str]] = field(default_factory=list)
    again: bool = False  # another pass should follow (the rollout record changed)

    @property
    def empty(self) -> bool:
        return (self.rollout is None and not self.creates and not self.stops and self.job_state is None
                and not self.mark_stable and not self.timers)


class Tally:
    """The job's current executions (the newest of the rollout on each target), as its state counts them."""

    __slots__ = ("current", "ended", "unsuccessful", "troubled")

    def __init__(self, current: int = 0, ended: int = 0, unsuccessful: int = 0, troubled: int = 0) -> None:
        self.current = current  # targets with an execution of the rollout
        self.ended = ended  # of those, ended and not to be restarted
        self.unsuccessful = unsuccessful  # of those, not completed
        self.troubled = troubled  # of those, degraded, lost or failed

    def add(self, other: Tally, sign: int = 1) -> None:
        self.current += sign * other.current
        self.ended += sign * other.ended
        self.unsuccessful += sign * other.unsuccessful
        self.troubled += sign * other.troubled

    def copy(self) -> Tally:
        return Tally(self.current, self.ended, self.unsuccessful, self.troubled)

    def astuple(self) -> tuple[int, int, int, int]:
        return (self.current, self.ended, self.unsuccessful, self.troubled)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tally) and self.astuple() == other.astuple()

    def __repr__(self) -> str:
        return f"Tally{self.astuple()}"


# -- the pass --------------------------------------------------------------------------------------


def decide(view: View) -> Step:
    step = _decide(view)
    if step.rollout is not None and view.rollout is not None and step.rollout.targets is view.rollout.targets:
        step.rollout = _copy(step.rollout)  # the new record shares nothing with the view
    return step


def _decide(view: View) -> Step:
    job, record, now = view.job, view.rollout, view.now
    step = Step()
    if record is not None and record.state == "stopped" and record.source_version < job.version \
            and job.state.state_type != "stopped":
        return step  # a stopped rollout of an earlier version: the new version's own plan comes next
    if job.state.state_type == "stopped" or (record is not None and record.state == "stopped"):
        step.stops = stop_all(view.live(), "job stopped")
        if record is not None and record.state != "stopped":
            step.rollout = stopped(record, now)
            step.rollout_first = False
        step.job_state = JobStateChange("stopped", job.state.message or "stopped", None)
        return step
    if record is None or view.spec is None:
        return step
    # A pass changes its own copy of the record (sharing the lists, which it never changes in place:
    # `decide` copies them for the new record it returns; a pass that changes nothing copies nothing).
    rollout, spec = msgspec.structs.replace(record), view.spec
    nodes = view.nodes
    if nodes is None:
        from .nodes import NodeIndex  # (it reads the rules of this module)

        nodes = NodeIndex(record, spec, view.specs, view.executions)

    if timed_out(job, rollout, spec, now, step):
        step.stops = stop_all(nodes.live_executions(), rollout.message)
        step.job_state = JobStateChange("failed", rollout.message, None, force=True)
        return step
    if rollout.state == "queued":
        step.job_state = JobStateChange("queued", "waiting for eligible nodes", rollout.source_version)
        return step

    # The pass's own changes to each node's newest execution (creates) go in front of the index's.
    latest: ChainMap[str, Execution] = ChainMap({}, nodes.latest)
    in_rollout = rollout.state in IN_PROGRESS

    # 1. Executions for every node whose wave has started (not once the rollout failed, nor ever again
    #    once it timed out).
    if not (rollout.state == "failed" and not rollout.rollback_of) and not rollout.timed_out:
        place(view, nodes, rollout, spec, nodes.unplaced_started(rollout), latest, step)

    # 2. Failures against the budget (node trouble is not the version's failure), and stalls.
    newly_failed = nodes.in_order(n for n in nodes.failing if nodes.facts[n].started and n not in nodes.failed)
    if in_rollout and newly_failed:
        count_failures(view, rollout, newly_failed, step)
        return step
    if rollout.state == "deploying":
        stalled = stalled_executions(rollout, spec, nodes, step, now, view.policy)
        if stalled:
            reason = "stalled: still {} {:g}s after it was created (health deadline + grace)"
            limit = _stall_limit(spec, view.policy).total_seconds()
            step.stops += [Stop(e, reason.format(e.observed, limit)) for e in stalled]
            names = ", ".join(f"{e.node_id} ({e.observed})" for e in stalled[:5])
            more = f" and {len(stalled) - 5} more" if len(stalled) > 5 else ""
            rollout.message = f"wave {rollout.current_wave}: {names}{more} never settled; counted as failed"
            count_failures(view, rollout, [e.node_id for e in stalled], step)
            return step

    # 3. Restarts by policy: the rolled-out version where its wave has started, and whatever still runs
    #    on the targets it has not reached yet (they must not be left bare meanwhile).
    keep: set[str] = set()  # ended executions the policy will still restart (they stay desired running)
    for node_id in nodes.in_order(nodes.restartable):
        execution = latest.get(node_id)
        if execution is None or not restartable(execution, spec, rollout):
            continue
        keep.add(execution.id)
        if needs_restart(execution, spec, rollout):
            successor = restart(job, rollout, spec, execution, now, view.policy, step)
            if successor is not None:
                latest[node_id] = successor
    for node_id in nodes.in_order(nodes.elsewhere):
        execution = nodes.elsewhere[node_id]
        own = view.specs.get(execution.job_version) or execution.job_spec
        if own is not None and restartable(execution, own, rollout):
            keep.add(execution.id)
            if needs_restart(execution, own, rollout):
                restart(job, rollout, own, execution, now, view.policy, step)

    # 4. Stop what is superseded (older versions once the new one is stable, non-targets), and say of
    #    what has ended that it is no longer meant to run: on the nodes the index says so of, and on those
    #    this pass changed.
    touched = {c.execution.node_id for c in step.creates}
    changed = latest.maps[0]  # node -> its newest execution of the rollout, made by this pass
    retiring = nodes.in_order(nodes.retiring | touched)
    step.stops += retire([e for n in retiring for e in nodes.relevant(n)], latest, nodes.position, rollout, keep)

    # 5. Waves. The next wave's executions go in the same step as the record that starts it (the record
    #    is written first: if that fails, none are created).
    if rollout.state == "deploying":
        waiting = nodes.waiting() + sum(nodes.blocks(n, e) - nodes.facts[n].blocks
                                        for n, e in changed.items() if nodes.facts[n].started)
        if advance(rollout, spec, waiting == 0, now, step):
            if rollout.state == "deploying":
                place(view, nodes, rollout, spec, nodes.unplaced_started(rollout), latest, step)
            return step

    tally = nodes.tally.copy()
    for node_id, execution in changed.items():
        if node_id in nodes.position:
            tally.add(nodes.facts[node_id].tally, -1)
            tally.add(tally_of(execution, spec, rollout))
    step.job_state = job_state_from(job, rollout, tally)
    return step


# -- the rules -------------------------------------------------------------------------------------


def place(view: View, nodes: NodeIndex, rollout: Rollout, spec: JobSpec, candidates: list[str],
          latest: MutableMapping[str, Execution], step: Step) -> None:
    """An execution for every started target among `candidates` that has none of the rolled-out
    deployment, replacing what else runs there (including a restart made earlier in this step)."""
    made: dict[str, list[Execution]] = {}
    for c in step.creates:
        made.setdefault(c.execution.node_id, []).append(c.execution)
    for node_id in candidates:
        if node_id in latest:
            continue
        previous = active_other([*nodes.relevant(node_id), *made.get(node_id, ())], node_id, rollout.job_version)
        created = new_execution(derived_id(rollout.deployment_id, node_id), view.job, spec, rollout.job_version,
                                node_id, rollout.wave_number(nodes.position[node_id]), rollout.deployment_id,
                                previous.id if previous else "", 0, view.now)
        step.creates.append(Create(created, previous))
        latest[node_id] = created


def history(execution: Execution, rollout: Rollout) -> bool:
    """Whether an execution ended, is no longer meant to run and belongs to an earlier deployment than
    the job's current one: nothing decides from it."""
    return (execution.eval_id != rollout.deployment_id and execution.desired == "stopped"
            and execution.observed in TERMINAL_STATES)


def relevant(executions: list[Execution], rollout: Rollout | None) -> list[Execution]:
    """The executions a decision can depend on: all but history (so a job updated many times costs a
    pass what one update does)."""
    if rollout is None:
        return executions
    return [e for e in executions if not history(e, rollout)]


def archivable(execution: Execution, rollout: Rollout) -> bool:
    """History that may leave the executions bucket for the archive: all of it once the rollout that made
    it history has finished (no archive work competes with a wave), except the executions of the version
    a rollback undoes (the rollback's status tells their failures from them)."""
    return (rollout.state not in IN_PROGRESS and history(execution, rollout)
            and execution.job_version != rollout.rollback_of)


def budget_exceeded(failed: int, targets: int, max_nodes: int, max_percent: float) -> bool:
    """The rollout stops as soon as failed nodes exceed the count or the percentage of the targets."""
    if failed > max_nodes:
        return True
    return targets > 0 and failed * 100 > max_percent * targets


def settled(execution: Execution | None) -> bool:
    """Done with validation: stable, finished successfully, or failed (counted against the budget)."""
    if execution is None:
        return False
    return execution.status.stable_at is not None or execution.observed in ("completed", "failed")


def restartable(execution: Execution, spec: JobSpec, rollout: Rollout) -> bool:
    """An ended execution that the restart policy replaces (now, or once its rollout allows it)."""
    if execution.desired != "running" or execution.status.next_execution_id:
        return False
    if (rollout.state == "failed" and not rollout.rollback_of) or rollout.timed_out:
        return False  # a failed (or timed out) rollout is not kept alive by restarts
    observed = execution.observed
    if observed == "completed":
        return spec.restart_policy == "always"
    if observed in ("failed", "stopped"):
        return spec.restart_policy in ("on-failure", "always")
    return False


def awaits_restart(execution: Execution, spec: JobSpec, rollout: Rollout) -> bool:
    """Node trouble that the policy replaces: not settled until the replacement is (its wave waits)."""
    return (execution.observed == "failed" and details(execution).reason in NODE_TROUBLE
            and restartable(execution, spec, rollout))


def needs_restart(execution: Execution, spec: JobSpec, rollout: Rollout) -> bool:
    """Restart it now (once its backoff has passed)."""
    if not restartable(execution, spec, rollout):
        return False
    if details(execution).reason in HEALTH_VERDICTS and rollout.state in IN_PROGRESS:
        return False  # a health verdict during a rollout is the rollout's signal, not a crash
    return True


def restart(job: Job, rollout: Rollout, spec: JobSpec, execution: Execution, now: dt.datetime, policy: Policy,
            step: Step) -> Execution | None:
    """The execution that replaces an exited one, once its backoff has passed (else a timer for then)."""
    restarts = details(execution).restarts
    delay = min(policy.restart_backoff_max, policy.restart_backoff_base * 2 ** restarts)
    due = finished_at(execution) + dt.timedelta(seconds=delay)
    if now < due:
        step.timers.append((due, f"restart-{execution.id}"))
        return None
    successor = new_execution(derived_id(execution.id, "restart"), job, spec, execution.job_version,
                              execution.node_id, execution.rollout_wave, rollout.deployment_id, execution.id,
                              restarts + 1, now)
    step.creates.append(Create(successor, execution))
    return successor


def count_failures(view: View, rollout: Rollout, newly_failed: list[str], step: Step) -> None:
    """Add failed nodes to the record; past the budget, fail the rollout (and roll back)."""
    assert view.spec is not None
    rollout.failed_nodes = [*rollout.failed_nodes, *newly_failed]
    budget = view.spec.rollout
    if rollout.rollback_of or not budget_exceeded(len(rollout.failed_nodes), len(rollout.targets),
                                                  budget.max_failed_nodes, budget.max_failed_nodes_percent):
        rollout.updated_at = view.now
        step.rollout, step.again = rollout, True
        return
    reason = (f"{len(rollout.failed_nodes)} of {len(rollout.targets)} nodes failed, more than the budget "
              f"(max_failed_nodes {budget.max_failed_nodes}, max_failed_nodes_percent "
              f"{budget.max_failed_nodes_percent:g})")
    fail(view, rollout, reason, step)


def fail(view: View, rollout: Rollout, reason: str, step: Step) -> None:
    """Stop the rollout and, unless disabled, restore the last stable version on every target."""
    assert view.spec is not None
    job, now = view.job, view.now
    stable = job.stable_version
    if view.spec.rollout.no_auto_rollback:
        message = f"{reason}; automatic rollback disabled"
    elif rollout.rollback_of:
        message = f"{reason}; this was already a rollback, so it stops here"
    elif stable == 0 or stable == rollout.job_version:
        message = f"{reason}; no earlier stable version, version {rollout.job_version} stopped"
        step.stops += stop_all([e for e in view.live() if e.job_version == rollout.job_version], message)
    elif view.spec_hashes.get(stable) == view.spec_hashes.get(rollout.job_version):
        message = f"{reason}; version {stable} has the same spec, so there is nothing to roll back to"
    else:
        message = f"{reason}; rolling back to version {stable}"
        targets = list(rollout.targets)  # every target: none is left bare
        step.rollout = Rollout(
            namespace=rollout.namespace, job_id=rollout.job_id,
            deployment_id=derived_id(rollout.deployment_id, "rollback"),
            job_version=stable, source_version=rollout.source_version, strategy="immediate",
            state="deploying", targets=targets, wave_sizes=[len(targets)] if targets else [],
            rollback_of=rollout.job_version, cause=reason, previous_version=rollout.job_version,
            message=message, created_at=now, updated_at=now,
        )
        step.again = True
        step.job_state = JobStateChange("rollout_failed", message, None, force=True)
        return
    rollout.state = "failed"
    rollout.message = message
    rollout.updated_at = rollout.finished_at = now
    step.rollout, step.again = rollout, True
    step.job_state = JobStateChange("rollout_failed", message, None, force=True)


def timed_out(job: Job, rollout: Rollout, spec: JobSpec, now: dt.datetime, step: Step) -> bool:
    """Queue and total timeouts; True if one fired (the rollout fails; the caller stops everything)."""
    if job.state.state_type in ENDED_JOB_STATES or rollout.state in ("failed", "stopped"):
        return False
    timeouts = spec.timeouts
    message = ""
    if rollout.state == "queued" and timeouts.queue_timeout and rollout.queued_since is not None:
        if now >= rollout.queued_since + dt.timedelta(seconds=timeouts.queue_timeout):
            message = f"no eligible nodes within queue_timeout ({timeouts.queue_timeout}s)"
    if not message and timeouts.total_timeout:
        if now >= rollout.created_at + dt.timedelta(seconds=timeouts.total_timeout):
            message = f"total_timeout ({timeouts.total_timeout}s) exceeded"
    if not message:
        return False
    rollout.state = "failed"
    rollout.timed_out = True
    rollout.message = message
    rollout.updated_at = rollout.finished_at = now
    step.rollout, step.again = rollout, True
    return True


def _stall_limit(spec: JobSpec, policy: Policy) -> dt.timedelta:
    check = spec.rollout.health_check
    assert check is not None
    return dt.timedelta(microseconds=check.deadline // 1000, seconds=policy.stall_grace)


def stalled_executions(rollout: Rollout, spec: JobSpec, nodes: NodeIndex, step: Step, now: dt.datetime,
                       policy: Policy) -> list[Execution]:
    """Executions of a gated wave that never settle (pending, starting or unjudged) long past their health
    deadline (those the index holds, and those this step creates); otherwise a timer for when the next one
    could stall."""
    if not rollout.gated or spec.rollout.health_check is None:
        return []
    limit = _stall_limit(spec, policy)
    stalled, next_created = nodes.may_stall(now - limit)
    soonest = next_created + limit if next_created is not None else None
    for create in step.creates:  # placed in this pass (on targets without one, so not in the index's)
        execution = create.execution
        if execution.node_id in nodes.failed:
            continue
        due = execution.status.created_at + limit
        if now >= due:
            stalled.append(execution)
        elif soonest is None or due < soonest:
            soonest = due
    if not stalled and soonest is not None:
        step.timers.append((soonest, "stall-check"))
    return sorted(stalled, key=lambda e: nodes.position[e.node_id])  # (started targets only)


def retire(executions: list[Execution], latest: Mapping[str, Execution], targets: Container[str], rollout: Rollout,
           keep: set[str]) -> list[Stop]:
    stops: list[Stop] = []
    for execution in executions:
        if execution.desired == "stopped":
            continue
        if execution.observed in TERMINAL_STATES:
            # Ended, and not waiting for a restart: no longer meant to run (so no node ever shows two
            # executions of a job desired running, nor an ended one that says it should run).
            if execution.id not in keep:
                stops.append(Stop(execution, f"ended: {execution.observed}"))
            continue
        replacement = latest.get(execution.node_id)
        if execution.job_version == rollout.job_version and replacement is execution:
            continue
        if execution.node_id not in targets:
            reason = "node no longer selected"
        elif execution.job_version != rollout.job_version and replacement is not None and (
            replacement.status.stable_at is not None or replacement.observed == "completed"
        ):
            reason = f"replaced by version {rollout.job_version}"
        elif execution.job_version == rollout.job_version and execution is not replacement:
            reason = "superseded by a restart"
        else:
            continue
        stops.append(Stop(execution, reason, replacement.id if replacement is not None else ""))
    return stops


def advance(rollout: Rollout, spec: JobSpec, ready: bool, now: dt.datetime, step: Step) -> bool:
    """Start the next wave, await promotion, or finish once every started target is `ready` (settled and
    not awaiting a restart, or failed); True if the record changes."""
    if not ready:
        return False
    rollout.updated_at = now
    if rollout.gated and rollout.current_wave < len(rollout.wave_sizes):
        if rollout.strategy == "canary" and rollout.current_wave == 1 and not spec.rollout.auto_promote:
            rollout.state = "awaiting_promotion"
            rollout.message = "canary healthy; waiting for promotion"
        else:
            rollout.message = f"wave {rollout.current_wave} healthy"
            rollout.current_wave += 1
    else:
        rollout.state = "succeeded"
        rollout.finished_at = now
        rollout.message = finished_message(rollout)
        if not rollout.rollback_of:
            step.mark_stable = rollout.job_version
    step.rollout, step.again = rollout, True
    return True


def tally_of(execution: Execution, spec: JobSpec, rollout: Rollout) -> Tally:
    """One current execution's part of the job's state."""
    ended = execution.observed in TERMINAL_STATES and not needs_restart(execution, spec, rollout)
    return Tally(1, int(ended), int(execution.observed != "completed"), int(execution.observed in TROUBLE))


def job_state_of(job: Job, rollout: Rollout, spec: JobSpec, latest: Mapping[str, Execution]) -> JobStateChange:
    """The job's state as its rollout and its current executions (`latest`, per node) say."""
    tally = Tally()
    for node_id in rollout.targets:
        if node_id in latest:
            tally.add(tally_of(latest[node_id], spec, rollout))
    return job_state_from(job, rollout, tally)


def job_state_from(job: Job, rollout: Rollout, tally: Tally) -> JobStateChange:
    """The job's state as its rollout and the count of its current executions say."""
    state = rollout.state
    source = rollout.source_version
    if rollout.timed_out:
        return JobStateChange("failed", rollout.message, source)
    if rollout.rollback_of or state == "failed":
        if state == "succeeded":
            message = f"rolled back to version {rollout.job_version} after: {rollout.cause}"
        else:
            message = rollout.message
        return JobStateChange("rollout_failed", message, source)
    if state in ("paused", "awaiting_promotion"):
        return JobStateChange("rollout_paused", rollout.message, source)
    if state == "deploying":
        waves = f" (wave {rollout.current_wave} of {len(rollout.wave_sizes)})" if rollout.gated else ""
        return JobStateChange("deploying", f"deploying version {rollout.job_version}{waves}", source)
    current = tally.current
    if job.type in ONE_SHOT_JOB_TYPES and current and tally.ended == current:
        if tally.unsuccessful:
            return JobStateChange("failed", f"{tally.unsuccessful} of {current} executions failed", source)
        return JobStateChange("completed", f"completed on {current} nodes", source)
    if tally.troubled:
        return JobStateChange("degraded", f"{tally.troubled} of {current} executions degraded, lost or failed",
                              source)
    return JobStateChange("running", f"version {rollout.job_version} on {current} nodes", source)


def job_state_change(job: Job, change: JobStateChange, now: dt.datetime) -> bool:
    """Apply `change` to `job` in place unless it must not: a stopped job stays stopped, a newer version's
    own rollout sets its state (unless forced), and an unchanged state is no change. True if changed."""
    if job.state.state_type == "stopped" and change.state != "stopped":
        return False
    if change.source_version is not None and job.version != change.source_version and not change.force:
        return False
    if job.state.state_type == change.state and job.state.message == change.message:
        return False
    job.state = msgspec.structs.replace(job.state, state_type=change.state, message=change.message)
    job.modified_at = now
    job.revision += 1
    return True


def mark_stable(job: Job, version: int, now: dt.datetime) -> bool:
    if job.stable_version >= version:
        return False
    job.stable_version = version
    job.revision += 1
    job.modified_at = now
    return True


def stop_all(executions: Iterable[Execution], reason: str) -> list[Stop]:
    return [Stop(e, reason) for e in executions if e.desired != "stopped"]


def stopped(rollout: Rollout, now: dt.datetime) -> Rollout:
    record = _copy(rollout)
    record.state = "stopped"
    record.message = "job stopped"
    record.updated_at = record.finished_at = now
    return record


def desire_stop(execution: Execution, reason: str, next_id: str) -> bool:
    """Set desired stopped in place (and the successor link if none yet); False if already stopped."""
    if execution.desired == "stopped":
        return False
    execution.status.desired_state = DesiredState(state_type="stopped", message=reason)
    if next_id and not execution.status.next_execution_id:
        execution.status.next_execution_id = next_id
    return True


def link(execution: Execution, next_id: str) -> bool:
    """previous.next = next (the newest attempt to replace an execution is the one it points to)."""
    if execution.status.next_execution_id == next_id:
        return False
    execution.status.next_execution_id = next_id
    return True


def finished_at(execution: Execution) -> dt.datetime:
    """When the execution reached its terminal state (recorded by the health service)."""
    return parse_rfc3339(details(execution).finished_at) or execution.status.updated_at


def latest_by_node(executions: list[Execution], rollout: Rollout) -> dict[str, Execution]:
    """Per node, the newest execution of the rolled-out version that belongs to this rollout.

    That is one this deployment created (restarts make chains; the head is the newest), or one of an
    earlier deployment of the same version that is still meant to run (a rollback keeps those).
    """
    latest: dict[str, Execution] = {}
    for execution in executions:
        if execution.job_version != rollout.job_version:
            continue
        if execution.eval_id != rollout.deployment_id and (
            execution.desired != "running" or execution.observed in TERMINAL_STATES
        ):
            continue
        held = latest.get(execution.node_id)
        if held is None or (execution.status.created_at, execution.id) > (held.status.created_at, held.id):
            latest[execution.node_id] = execution
    return latest


def active_other(executions: list[Execution], node_id: str, version: int) -> Execution | None:
    """The execution of another version that a new one on this node replaces: the newest one still
    running there, else the newest one meant to run that nothing follows yet (a failed version that a
    rollback undoes)."""
    meant = [e for e in executions if e.node_id == node_id and e.job_version != version and e.desired == "running"]
    live = [e for e in meant if e.observed not in TERMINAL_STATES]
    candidates = live or [e for e in meant if not e.status.next_execution_id]
    return max(candidates, key=lambda e: (e.status.created_at, e.id), default=None)


def current_elsewhere(executions: list[Execution], nodes: set[str], version: int) -> list[Execution]:
    """On each of `nodes`, the newest execution of another version than `version` that is meant to run
    and that nothing replaces yet: what a rollout that has not reached the node leaves running there."""
    current: dict[str, Execution] = {}
    for e in executions:
        if (e.node_id in nodes and e.job_version != version and e.desired == "running"
                and not e.status.next_execution_id):
            held = current.get(e.node_id)
            if held is None or (e.status.created_at, e.id) > (held.status.created_at, held.id):
                current[e.node_id] = e
    return list(current.values())


def finished_message(rollout: Rollout) -> str:
    if rollout.rollback_of:
        return f"rolled back to version {rollout.job_version} on {len(rollout.targets)} nodes after: {rollout.cause}"
    failed = f", {len(rollout.failed_nodes)} failed" if rollout.failed_nodes else ""
    return f"version {rollout.job_version} rolled out to {len(rollout.targets)} nodes{failed}"


def new_execution(execution_id: str, job: Job, spec: JobSpec, version: int, node_id: str, wave: int,
                  eval_id: str, previous_id: str, restarts: int, now: dt.datetime) -> Execution:
    extra: dict[str, object] = {"restarts": restarts} if restarts else {}
    return Execution(
        id=execution_id, eval_id=eval_id, job_id=job.id, job_type=spec.type, job_version=version,
        namespace=job.namespace, node_id=node_id, rollout_wave=wave,
        status=ExecutionStatus(created_at=now, updated_at=now, revision=1,
                               desired_state=DesiredState(state_type="running"),
                               observed_state=ObservedState(state_type="pending"),
                               previous_execution_id=previous_id, details=extra),
        job_spec=spec,
    )


def _copy(rollout: Rollout) -> Rollout:
    """A copy `decide` may change (the view's record stays as it was read)."""
    return msgspec.structs.replace(rollout, targets=list(rollout.targets), wave_sizes=list(rollout.wave_sizes),
                                   failed_nodes=list(rollout.failed_nodes))


"""The rollout rule book (docs/ROLLOUTS.md), read as rules: `services.rollout.decide` without a server.

Each test builds one view (a job, its rollout record, the spec it rolls out, every execution of the job and
a fixed clock) and states what one reconcile pass must decide from it: the executions to create and the
ones they replace, the ones to stop and why, the new rollout record, the job's state, the timers and the
version to mark stable. The world of `tests.builders`: job "svc" at version 2, rolling out over the
stable version 1 (deployment `OLD_DEPLOYMENT`) by deployment `DEPLOYMENT`, on nodes "n1".."n9"; by
default four targets in rolling waves of two, the first wave started, a health deadline of 60 s, a stall
grace of 30 s, a restart backoff of 1 s doubling up to 60 s.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.rollout.decide import (
    Create,
    JobStateChange,
    Policy,
    Step,
    Stop,
    active_other,
    budget_exceeded,
    current_elsewhere,
    decide,
    desire_stop,
    fail,
    finished_at,
    finished_message,
    job_state_change,
    job_state_of,
    latest_by_node,
    link,
    mark_stable,
    needs_restart,
    new_execution,
    restartable,
    settled,
    stop_all,
    stopped,
    timed_out,
)
from services.rollout.model import Rollout
from services.rollout.waves import plan_waves
from shared.ids import derived_id
from shared.models import (
    Canary,
    DesiredState,
    Execution,
    ExecutionStatus,
    JobState,
    ObservedState,
    RolloutSpec,
)
from tests.builders import (
    DEPLOYMENT,
    JOB_ID,
    NOW,
    OLD_DEPLOYMENT,
    applied,
    execution,
    job,
    nodes,
    old,
    plain,
    rollout,
    seconds,
    snapshot,
    spec,
    view,
)

# Fast and reproducible: the same examples on every run, and no example database.
RULES = settings(derandomize=True, database=None, deadline=None, max_examples=150)

ROLLBACK = derived_id(DEPLOYMENT, "rollback")


def stops(step: Step) -> dict[str, tuple[str, str]]:
    """Execution id -> (reason, next id) of every stop in the step."""
    return {s.execution.id: (s.reason, s.next_id) for s in step.stops}


def made(step: Step) -> dict[str, Create]:
    """Node -> the create of the step on that node (one per node in these tests)."""
    result = {c.execution.node_id: c for c in step.creates}
    assert len(result) == len(step.creates)
    return result


def with_record(record: Rollout, **changes: Any) -> Rollout:
    return msgspec.structs.replace(record, **changes)


# -- stopping --------------------------------------------------------------------------------------


def test_a_stopped_job_stops_every_execution_and_then_its_rollout_record() -> None:
    record = rollout(4)
    gone = old("n3", desired="stopped", observed="stopped")
    executions = [old("n1"), old("n2"), execution("n1"), gone]
    step = decide(view(job(state="stopped", message="stopped by request"), record, spec(), executions))
    assert stops(step) == {e.id: ("job stopped", "") for e in executions if e is not gone}
    assert step.rollout == with_record(record, state="stopped", message="job stopped", updated_at=NOW, finished_at=NOW)
    assert step.rollout_first is False  # everything stops before the record says so
    assert step.job_state == JobStateChange("stopped", "stopped by request", None)
    assert not step.creates and not step.timers and not step.mark_stable and step.again is False


def test_a_stopped_job_without_a_message_says_stopped_and_needs_no_rollout() -> None:
    step = decide(view(job(state="stopped"), None, None, [old("n1")]))
    assert stops(step) == {old("n1").id: ("job stopped", "")}
    assert step.rollout is None and step.rollout_first is True
    assert step.job_state == JobStateChange("stopped", "stopped", None)


def test_a_stopped_rollout_stops_the_job_without_writing_the_record_again() -> None:
    record = rollout(4, state="stopped")
    step = decide(view(job(state="running", message="stopping"), record, spec(), [execution("n1")]))
    assert stops(step) == {execution("n1").id: ("job stopped", "")}
    assert step.rollout is None
    assert step.job_state == JobStateChange("stopped", "stopping", None)


def test_without_a_rollout_or_its_spec_nothing_is_decided() -> None:
    assert decide(view(job(), None, spec(), [old("n1")])).empty
    assert decide(view(job(), rollout(4), None, [old("n1")])).empty


@pytest.mark.parametrize("part", ["rollout", "creates", "stops", "job_state", "mark_stable", "timers"])
def test_a_step_is_empty_only_without_any_effect(part: str) -> None:
    effects: dict[str, Any] = {
        "rollout": rollout(1), "creates": [Create(execution("n1"))], "stops": [Stop(execution("n1"), "x")],
        "job_state": JobStateChange("running", "", None), "mark_stable": 2, "timers": [(NOW, "x")],
    }
    assert Step().empty and Step(again=True, rollout_first=False).empty
    assert not Step(**{part: effects[part]}).empty


# -- queued and timeouts ---------------------------------------------------------------------------


def queued(**kw: Any) -> Rollout:
    kw.setdefault("queued_since", NOW - seconds(100))
    return rollout([], state="queued", created_at=NOW - seconds(100), **kw)


def test_a_queued_rollout_waits_for_eligible_nodes() -> None:
    step = decide(view(job(state="queued"), queued(source_version=3), spec(queue_timeout=101, total_timeout=101),
                       [old("n1")]))
    assert step.job_state == JobStateChange("queued", "waiting for eligible nodes", 3)
    assert step.rollout is None and not step.stops and not step.creates and not step.timers


def test_the_queue_timeout_fails_the_job_once_it_has_passed() -> None:
    record = queued()
    executions = [old("n1"), old("n2", desired="stopped")]
    step = decide(view(job(state="queued"), record, spec(queue_timeout=100), executions))
    message = "no eligible nodes within queue_timeout (100s)"
    assert step.rollout == with_record(record, state="failed", timed_out=True, message=message, updated_at=NOW,
                                       finished_at=NOW)
    assert step.again is True and step.rollout_first is True
    assert stops(step) == {old("n1").id: (message, "")}
    assert step.job_state == JobStateChange("failed", message, None, force=True)
    assert not step.creates


def test_the_queue_timeout_wins_over_the_total_timeout_when_both_have_passed() -> None:
    step = decide(view(job(state="queued"), queued(), spec(queue_timeout=50, total_timeout=50)))
    assert step.rollout is not None and step.rollout.message == "no eligible nodes within queue_timeout (50s)"


def test_the_queue_timeout_needs_a_queued_rollout_that_knows_since_when() -> None:
    step = decide(view(job(state="queued"), queued(queued_since=None), spec(queue_timeout=1)))
    assert step.rollout is None and step.job_state == JobStateChange("queued", "waiting for eligible nodes", 2)
    deploying = rollout(4, queued_since=NOW - seconds(1000))
    assert decide(view(job(), deploying, spec(queue_timeout=1), [old("n1")])).rollout is None


def test_the_total_timeout_counts_from_the_creation_of_the_rollout() -> None:
    record = rollout(4, created_at=NOW - seconds(300))
    executions = [old("n1"), execution("n1"), old("n3", desired="stopped", observed="stopped")]
    step = decide(view(job(), record, spec(total_timeout=300), executions))
    message = "total_timeout (300s) exceeded"
    assert step.rollout == with_record(record, state="failed", timed_out=True, message=message, updated_at=NOW,
                                       finished_at=NOW)
    assert stops(step) == {old("n1").id: (message, ""), execution("n1").id: (message, "")}
    assert step.job_state == JobStateChange("failed", message, None, force=True)
    assert not step.creates and not step.timers


def test_no_timeout_before_its_time() -> None:
    step = decide(view(job(), rollout(4, created_at=NOW - seconds(300)), spec(total_timeout=301),
                       [execution("n1"), execution("n2")]))
    assert step.rollout is None and not step.stops
    step = decide(view(job(state="queued"), queued(queued_since=NOW - seconds(99)), spec(queue_timeout=100)))
    assert step.rollout is None and not step.stops


def test_a_succeeded_rollout_of_a_long_running_job_still_times_out() -> None:
    record = rollout(2, waves=[2], state="succeeded", created_at=NOW - seconds(60))
    step = decide(view(job(state="running"), record, spec(total_timeout=60), [execution("n1", stable=True)]))
    assert step.rollout is not None and step.rollout.timed_out and step.rollout.state == "failed"


@pytest.mark.parametrize("state", ["failed", "stopped"])
def test_a_failed_or_stopped_rollout_never_times_out(state: str) -> None:
    record = rollout(2, waves=[2], state=state, created_at=NOW - seconds(600))
    step = Step()
    assert timed_out(job(state="running"), record, spec(total_timeout=60), NOW, step) is False
    assert step.empty and record.timed_out is False


@pytest.mark.parametrize("state", ["completed", "failed"])
def test_an_ended_job_does_not_time_out(state: str) -> None:
    record = rollout(2, waves=[2], state="succeeded", created_at=NOW - seconds(600))
    step = decide(view(job(state=state), record, spec(total_timeout=60), [execution("n1", stable=True)]))
    assert step.rollout is None and not step.stops


def test_a_failed_rollout_does_not_time_out_again() -> None:
    record = rollout(2, waves=[2], state="failed", message="earlier", created_at=NOW - seconds(600))
    step = decide(view(job(state="rollout_failed"), record, spec(total_timeout=60), [old("n1")]))
    assert step.rollout is None and not step.stops
    assert step.job_state == JobStateChange("rollout_failed", "earlier", 2)


# -- executions for started waves ------------------------------------------------------------------


def test_every_node_of_a_started_wave_gets_an_execution_that_replaces_what_runs_there() -> None:
    olds = [old(n) for n in nodes(4)]
    the_spec = spec()
    step = decide(view(job(), rollout(4), the_spec, olds))
    creates = made(step)
    assert set(creates) == {"n1", "n2"}  # the first wave only
    for index, node in enumerate(("n1", "n2")):
        assert creates[node].replaces == olds[index]
        assert creates[node].execution == Execution(
            id=derived_id(DEPLOYMENT, node), eval_id=DEPLOYMENT, job_id=JOB_ID, job_type="pipeline", job_version=2,
            namespace="default", node_id=node, rollout_wave=1,
            status=ExecutionStatus(created_at=NOW, updated_at=NOW, revision=1,
                                   desired_state=DesiredState(state_type="running"),
                                   observed_state=ObservedState(state_type="pending"),
                                   previous_execution_id=olds[index].id, details={}),
            job_spec=the_spec)
    # Nothing else yet: the old version runs on until the new one is stable; the wave is being validated.
    assert not step.stops and step.rollout is None and not step.mark_stable
    assert step.timers == [(NOW + seconds(90), "stall-check")]
    assert step.job_state == JobStateChange("deploying", "deploying version 2 (wave 1 of 2)", 2)


def test_a_node_without_an_earlier_version_gets_an_execution_that_replaces_nothing() -> None:
    step = decide(view(job(stable_version=0), rollout(["n1"], strategy="immediate"), spec("immediate")))
    (create,) = step.creates
    assert create.replaces is None and create.execution.status.previous_execution_id == ""
    assert create.execution.rollout_wave == 0 and create.execution.id == derived_id(DEPLOYMENT, "n1")
    assert step.job_state == JobStateChange("deploying", "deploying version 2", 2)
    assert not step.timers  # an immediate rollout has no stall check


def test_later_waves_number_their_executions() -> None:
    executions = [execution("n1", stable=True), execution("n2", stable=True)]
    step = decide(view(job(), rollout(4, current_wave=2), spec(), executions))
    assert {n: c.execution.rollout_wave for n, c in made(step).items()} == {"n3": 2, "n4": 2}
    step = decide(view(job(), rollout(5, strategy="canary", waves=[1, 2, 2], current_wave=3), spec("canary"),
                       [execution(n, stable=True) for n in nodes(3)]))
    assert {n: c.execution.rollout_wave for n, c in made(step).items()} == {"n4": 3, "n5": 3}


def test_a_node_with_an_execution_of_the_rollout_gets_no_other() -> None:
    executions = [execution("n1", observed="pending"), execution("n2", observed="failed", desired="stopped")]
    step = decide(view(job(), rollout(4, failed=["n2"]), spec(), executions))
    assert not step.creates


def test_a_failed_rollout_creates_nothing_but_a_failed_rollback_still_restores() -> None:
    failed = rollout(4, state="failed", message="budget")
    assert not decide(view(job(state="rollout_failed"), failed, spec(), [old("n1")])).creates
    aborted = rollout(2, strategy="immediate", version=1, source_version=2, deployment=ROLLBACK, rollback_of=2,
                      state="failed", message="aborted")
    step = decide(view(job(state="rollout_failed"), aborted, spec("immediate"), [execution("n1", observed="failed")]))
    assert {n: c.execution.id for n, c in made(step).items()} == {"n1": derived_id(ROLLBACK, "n1"),
                                                                  "n2": derived_id(ROLLBACK, "n2")}
    assert made(step)["n1"].replaces == execution("n1", observed="failed")


# -- the failure budget ----------------------------------------------------------------------------


def wide(failed: Sequence[str] = (), **kw: Any) -> Rollout:
    """Ten targets in one started rolling wave."""
    return rollout(10, waves=[10], failed=failed, **kw)


def test_failures_up_to_the_count_are_recorded_and_the_rollout_goes_on() -> None:
    record = wide(["n1"])
    executions = [execution("n1", observed="failed"), execution("n2", observed="failed", reason="exit"),
                  execution("n3", observed="running")]
    step = decide(view(job(), record, spec(max_failed_nodes=2), executions))
    assert step.rollout == with_record(record, failed_nodes=["n1", "n2"], updated_at=NOW)
    assert step.again is True
    # The pass ends with the record: nothing is stopped, restarted or judged yet.
    assert not step.stops and step.job_state is None and not step.timers
    assert set(made(step)) == set(nodes(10)) - {"n1", "n2", "n3"}  # the wave's missing executions go first


def test_one_failure_past_the_count_fails_the_rollout_and_rolls_back() -> None:
    record = wide(["n1"])
    executions = [execution("n2", observed="failed"), execution("n3", observed="failed")]
    step = decide(view(job(), record, spec(max_failed_nodes=2), executions))
    reason = ("3 of 10 nodes failed, more than the budget (max_failed_nodes 2, max_failed_nodes_percent 100)")
    assert step.rollout is not None and step.rollout.rollback_of == 2 and step.rollout.cause == reason
    assert step.job_state == JobStateChange("rollout_failed", f"{reason}; rolling back to version 1", None, force=True)


def test_failures_up_to_the_percentage_are_recorded_and_one_more_fails() -> None:
    budget = spec(max_failed_nodes=100, max_failed_nodes_percent=20)
    two = decide(view(job(), wide(["n1"]), budget, [execution("n2", observed="failed")]))
    assert two.rollout is not None and two.rollout.failed_nodes == ["n1", "n2"] and two.rollout.state == "deploying"
    three = decide(view(job(), wide(["n1", "n2"]), budget, [execution("n3", observed="failed")]))
    assert three.rollout is not None and three.rollout.rollback_of == 2
    assert three.rollout.cause == ("3 of 10 nodes failed, more than the budget (max_failed_nodes 100, "
                                   "max_failed_nodes_percent 20)")


def test_max_failed_nodes_zero_makes_any_failure_fatal() -> None:
    step = decide(view(job(), wide(), spec(max_failed_nodes=0), [execution("n4", observed="failed")]))
    assert step.rollout is not None and step.rollout.rollback_of == 2


@pytest.mark.parametrize("reason", ["agent-restart", "agent-shutdown"])
def test_node_trouble_spends_no_budget_and_is_restarted(reason: str) -> None:
    failed = execution("n1", observed="failed", reason=reason, finished=NOW - seconds(5))
    step = decide(view(job(), rollout(4), spec(max_failed_nodes=0), [failed, execution("n2", stable=True)]))
    assert step.rollout is None
    assert made(step)["n1"].execution.id == derived_id(failed.id, "restart")


@pytest.mark.parametrize("case", ["stable", "counted", "not started", "succeeded"])
def test_what_does_not_spend_budget(case: str) -> None:
    """A failure after the execution was stable, a node already counted, a node whose wave has not
    started, or a rollout that is over."""
    record = rollout(4)
    failed = execution("n1", observed="failed", reason="exit", finished=NOW - seconds(0.5))
    if case == "stable":
        failed = execution("n1", observed="failed", stable=True, finished=NOW - seconds(0.5))
    elif case == "counted":
        record = rollout(4, failed=["n1"])
    elif case == "not started":
        failed = execution("n3", observed="failed", finished=NOW - seconds(0.5))
    else:
        record = rollout(4, waves=[4], state="succeeded")
    step = decide(view(job(), record, spec(max_failed_nodes=0), [failed, execution("n2")]))
    assert step.rollout is None  # nothing counted, nothing failed (with a budget of zero)


@pytest.mark.parametrize("state", ["paused", "awaiting_promotion"])
def test_a_paused_rollout_still_counts_failures(state: str) -> None:
    step = decide(view(job(), rollout(4, state=state), spec(), [execution("n1", observed="failed")]))
    assert step.rollout is not None and step.rollout.failed_nodes == ["n1"] and step.rollout.state == state


def test_a_rollback_counts_failures_but_never_fails_for_them() -> None:
    record = rollout(2, strategy="immediate", version=1, source_version=2, deployment=ROLLBACK, rollback_of=2)
    executions = [execution("n1", version=1, deployment=ROLLBACK, observed="failed"),
                  execution("n2", version=1, deployment=ROLLBACK, observed="failed")]
    step = decide(view(job(state="rollout_failed"), record, spec("immediate", max_failed_nodes=0), executions))
    assert step.rollout == with_record(record, failed_nodes=["n1", "n2"], updated_at=NOW)
    assert step.job_state is None


@pytest.mark.parametrize(
    ("failed", "targets", "max_nodes", "max_percent", "tripped"),
    [(2, 10, 2, 100.0, False), (3, 10, 2, 100.0, True), (1, 10, 10, 10.0, False), (2, 10, 10, 10.0, True),
     (0, 10, 0, 0.0, False), (1, 10, 0, 100.0, True), (1, 0, 10, 0.0, False), (0, 0, 0, 0.0, False),
     (1, 1000, 10, 0.0, True), (5, 50, 100, 10.0, False), (6, 50, 100, 10.0, True)],
)
def test_the_budget_trips_when_exceeded_not_when_reached(failed, targets, max_nodes, max_percent, tripped) -> None:
    assert budget_exceeded(failed, targets, max_nodes, max_percent) is tripped


@RULES
@given(st.integers(0, 60), st.integers(0, 60), st.integers(0, 60), st.integers(0, 100), st.integers(0, 5))
def test_the_budget_is_monotone(failed: int, targets: int, max_nodes: int, percent: int, more: int) -> None:
    """More failures never un-trip it; a larger budget never trips sooner; at the count it holds, one past it trips."""
    tripped = budget_exceeded(failed, targets, max_nodes, percent)
    assert not tripped or budget_exceeded(failed + more, targets, max_nodes, percent)
    assert not budget_exceeded(failed, targets, max_nodes + more, min(100, percent + more)) or tripped
    assert budget_exceeded(max_nodes + 1, targets, max_nodes, 100)
    assert not budget_exceeded(max_nodes, max(targets, max_nodes), max_nodes, 100)
    assert budget_exceeded(failed, targets, max_nodes, percent) is (
        failed > max_nodes or (targets > 0 and failed * 100 > percent * targets))


# -- stalls ----------------------------------------------------------------------------------------


def test_an_execution_that_never_settles_past_deadline_and_grace_is_stalled_and_counted() -> None:
    record = rollout(4)
    stuck = execution("n1", observed="pending", created=NOW - seconds(90))
    fresh = execution("n2", observed="running", created=NOW - seconds(90) + dt.timedelta(microseconds=1))
    step = decide(view(job(), record, spec(), [stuck, fresh, old("n1"), old("n2")]))
    assert stops(step) == {stuck.id: ("stalled: still pending 90s after it was created (health deadline + grace)", "")}
    assert step.rollout == with_record(record, failed_nodes=["n1"], updated_at=NOW,
                                       message="wave 1: n1 (pending) never settled; counted as failed")
    assert step.again is True and not step.timers and step.job_state is None


def test_stalls_use_the_deadline_to_the_microsecond_and_the_policy_grace() -> None:
    the_spec = spec(deadline=60.5)
    policy = Policy(stall_grace=10)
    stuck = execution("n1", observed="validating", created=NOW - seconds(70.5))
    waiting = execution("n2", observed="starting", created=NOW - seconds(70.5) + dt.timedelta(microseconds=1))
    step = decide(view(job(), rollout(4), the_spec, [stuck, waiting], policy=policy))
    assert stops(step) == {stuck.id: ("stalled: still validating 70.5s after it was created (health deadline + grace)",
                                      "")}


@pytest.mark.parametrize(("count", "more"), [(5, ""), (6, " and 1 more"), (7, " and 2 more")])
def test_stalls_are_named_five_at_most(count: int, more: str) -> None:
    executions = [execution(n, observed="pending" if n < "n5" else "running", created=NOW - seconds(100))
                  for n in nodes(count)]
    step = decide(view(job(), rollout(8, waves=[8]), spec(), executions))
    assert step.rollout is not None and step.rollout.failed_nodes == nodes(count)
    assert step.rollout.message == ("wave 1: n1 (pending), n2 (pending), n3 (pending), n4 (pending), n5 (running)"
                                    f"{more} never settled; counted as failed")


def test_stalls_past_the_budget_fail_the_rollout() -> None:
    stuck = [execution(n, observed="pending", created=NOW - seconds(100)) for n in ("n1", "n2")]
    step = decide(view(job(), rollout(4), spec(max_failed_nodes=1), stuck))
    assert step.rollout is not None and step.rollout.rollback_of == 2
    assert step.rollout.cause.startswith("2 of 4 nodes failed, more than the budget")
    assert set(stops(step)) == {e.id for e in stuck}


def test_stalls_past_the_budget_without_a_stable_version_stop_the_version_and_say_why_each_stalled() -> None:
    stuck = execution("n1", observed="pending", created=NOW - seconds(100))
    waiting = execution("n2", observed="validating")
    step = decide(view(job(stable_version=0), rollout(4), spec(max_failed_nodes=0), [stuck, waiting]))
    stalled = "stalled: still pending 90s after it was created (health deadline + grace)"
    stopped_version = ("1 of 4 nodes failed, more than the budget (max_failed_nodes 0, max_failed_nodes_percent 100); "
                       "no earlier stable version, version 2 stopped")
    # in order: the stall first (the reason an execution keeps is the first it is given)
    assert [(s.execution.id, s.reason) for s in step.stops] == [
        (stuck.id, stalled), (stuck.id, stopped_version), (waiting.id, stopped_version)]
    assert step.rollout is not None and step.rollout.state == "failed" and step.rollout.failed_nodes == ["n1"]


def test_until_an_execution_could_stall_there_is_a_timer_for_the_first_that_could() -> None:
    executions = [execution("n1", created=NOW - seconds(20)), execution("n2", created=NOW - seconds(50)),
                  execution("n3", created=NOW - seconds(80))]  # n3's wave has not started
    step = decide(view(job(), rollout(4), spec(), executions))
    assert step.timers == [(NOW + seconds(40), "stall-check")] and not step.stops and step.rollout is None


@pytest.mark.parametrize("case", ["lost", "stable", "completed", "desired stopped", "counted"])
def test_what_never_stalls(case: str) -> None:
    """Lost (its node has a grace to come back), settled, no longer meant to run, or already counted."""
    long_ago = NOW - seconds(1000)
    record = rollout(4)
    if case == "lost":
        e = execution("n1", observed="lost", created=long_ago)
    elif case == "stable":
        e = execution("n1", stable=True, created=long_ago)
    elif case == "completed":
        e = execution("n1", observed="completed", created=long_ago)
    elif case == "desired stopped":
        e = execution("n1", observed="stopping", desired="stopped", created=long_ago)
    else:
        e = execution("n1", observed="pending", created=long_ago)
        record = rollout(4, failed=["n1"])
    step = decide(view(job(), record, spec(), [e, execution("n2", stable=True)]))
    assert not stops(step).get(e.id, ("",))[0].startswith("stalled")
    assert step.rollout is None or step.rollout.failed_nodes == record.failed_nodes
    assert not step.timers
    # nor does it hide a stall on a node after it
    behind = execution("n2", observed="starting", created=long_ago)
    step = decide(view(job(), record, spec(), [e, behind]))
    assert step.rollout is not None and step.rollout.failed_nodes == [*record.failed_nodes, "n2"]


@pytest.mark.parametrize("case", ["immediate", "no health check", "paused"])
def test_stalls_are_judged_only_in_gated_deploying_rollouts(case: str) -> None:
    stuck = execution("n1", observed="pending", created=NOW - seconds(1000))
    if case == "immediate":
        record, the_spec = rollout(2, strategy="immediate"), spec("immediate", health=True)
    elif case == "no health check":
        record, the_spec = rollout(4), spec(health=False)
    else:
        record, the_spec = rollout(4, state="paused"), spec()
    step = decide(view(job(), record, the_spec, [stuck]))
    assert step.rollout is None and not step.stops and not step.timers


# -- restarts --------------------------------------------------------------------------------------


def settled_rollout(count: int = 2, **kw: Any) -> Rollout:
    return rollout(count, waves=[count], state="succeeded", **kw)


@pytest.mark.parametrize(
    ("observed", "policy", "restarted"),
    [("failed", "on-failure", True), ("failed", "always", True), ("failed", "never", False),
     ("stopped", "on-failure", True), ("stopped", "always", True), ("stopped", "never", False),
     ("completed", "on-failure", False), ("completed", "always", True), ("completed", "never", False)],
)
def test_restart_policies(observed: str, policy: str, restarted: bool) -> None:
    ended = execution("n1", observed=observed, finished=NOW - seconds(10), wave=1)
    the_spec = spec(restart_policy=policy)
    step = decide(view(job(state="running"), settled_rollout(), the_spec, [ended, execution("n2", stable=True)]))
    if restarted:
        assert step.creates == [Create(new_execution(derived_id(ended.id, "restart"), job(), the_spec, 2, "n1", 1,
                                                     DEPLOYMENT, ended.id, 1, NOW), ended)]
        assert not step.stops  # it stays desired running until the restart has linked to it
    else:
        assert not step.creates
        assert stops(step) == {ended.id: (f"ended: {observed}", "")}


def test_a_restart_follows_its_predecessor_and_counts_the_restarts_of_the_chain() -> None:
    ended = execution("n1", observed="failed", finished=NOW - seconds(16), restarts=3, wave=2, version=2)
    the_spec = spec()
    step = decide(view(job(state="running"), settled_rollout(1), the_spec, [ended],
                       policy=Policy(restart_backoff_base=2)))
    (create,) = step.creates
    assert create.replaces == ended
    assert create.execution == Execution(
        id=derived_id(ended.id, "restart"), eval_id=DEPLOYMENT, job_id=JOB_ID, job_type="pipeline", job_version=2,
        namespace="default", node_id="n1", rollout_wave=2,
        status=ExecutionStatus(created_at=NOW, updated_at=NOW, revision=1,
                               desired_state=DesiredState(state_type="running"),
                               observed_state=ObservedState(state_type="pending"),
                               previous_execution_id=ended.id, details={"restarts": 4}),
        job_spec=the_spec)


def test_a_restart_waits_for_its_backoff_with_a_timer() -> None:
    ended = execution("n1", observed="failed", finished=NOW - seconds(15), restarts=3)
    step = decide(view(job(state="running"), settled_rollout(1), spec(), [ended],
                       policy=Policy(restart_backoff_base=2)))
    assert not step.creates and not step.stops  # still due: it stays desired running
    assert step.timers == [(NOW + seconds(1), f"restart-{ended.id}")]


def test_the_backoff_is_capped() -> None:
    policy = Policy(restart_backoff_base=1, restart_backoff_max=60)
    waiting = execution("n1", observed="failed", finished=NOW - seconds(59), restarts=10)
    step = decide(view(job(state="running"), settled_rollout(1), spec(), [waiting], policy=policy))
    assert step.timers == [(NOW + seconds(1), f"restart-{waiting.id}")] and not step.creates
    due = execution("n1", observed="failed", finished=NOW - seconds(60), restarts=10)
    step = decide(view(job(state="running"), settled_rollout(1), spec(), [due], policy=policy))
    assert [c.execution.status.details for c in step.creates] == [{"restarts": 11}] and not step.timers


def test_the_backoff_counts_from_the_last_update_when_the_end_was_not_recorded() -> None:
    ended = execution("n1", observed="failed", updated=NOW - seconds(0.5))
    step = decide(view(job(state="running"), settled_rollout(1), spec(), [ended]))
    assert step.timers == [(NOW + seconds(0.5), f"restart-{ended.id}")]


@pytest.mark.parametrize("reason", ["unhealthy", "deadline"])
def test_a_health_verdict_during_a_rollout_is_not_restarted_but_stays_desired_running(reason: str) -> None:
    judged = execution("n1", observed="failed", reason=reason, finished=NOW - seconds(100))
    step = decide(view(job(), rollout(4, failed=["n1"]), spec(), [judged, execution("n2")]))
    assert not step.creates and not step.stops and step.rollout is None
    step = decide(view(job(state="running"), settled_rollout(failed=["n1"]), spec(), [judged, execution("n2")]))
    assert [c.replaces for c in step.creates] == [judged]  # after the rollout it is a failure like any other


def test_a_counted_failure_by_exit_is_restarted_during_the_rollout() -> None:
    crashed = execution("n1", observed="failed", reason="exit", finished=NOW - seconds(100))
    step = decide(view(job(), rollout(4, failed=["n1"]), spec(), [crashed, execution("n2")]))
    assert [c.replaces for c in step.creates] == [crashed]


@pytest.mark.parametrize("case", ["desired stopped", "linked", "failed rollout"])
def test_what_is_never_restarted(case: str) -> None:
    record = settled_rollout(1)
    if case == "desired stopped":
        ended = execution("n1", observed="failed", desired="stopped", finished=NOW - seconds(100))
    elif case == "linked":
        ended = execution("n1", observed="failed", next_id="later", finished=NOW - seconds(100))
    else:
        ended = execution("n1", observed="failed", finished=NOW - seconds(100))
        record = rollout(1, waves=[1], state="failed", failed=["n1"])
    step = decide(view(job(state="running"), record, spec(restart_policy="always"), [ended]))
    assert not step.creates and not step.timers


def test_a_failed_rollback_keeps_restarting_the_stable_version() -> None:
    record = rollout(["n1"], strategy="immediate", version=1, source_version=2, deployment=ROLLBACK, rollback_of=2,
                     state="failed")
    ended = execution("n1", version=1, deployment=ROLLBACK, observed="failed", finished=NOW - seconds(100))
    step = decide(view(job(state="rollout_failed"), record, spec("immediate"), [ended]))
    assert [c.replaces for c in step.creates] == [ended]


def test_what_runs_on_targets_not_reached_yet_is_restarted_by_its_own_policy() -> None:
    own = spec(restart_policy="always", name="v1")
    ended = old("n3", observed="completed", finished=NOW - seconds(10), job_spec=own, wave=1)
    step = decide(view(job(), rollout(4), spec(restart_policy="never"),
                       [execution("n1"), execution("n2"), ended, old("n4")]))
    assert step.creates == [Create(new_execution(derived_id(ended.id, "restart"), job(), own, 1, "n3", 1, DEPLOYMENT,
                                                 ended.id, 1, NOW), ended)]
    assert not step.stops


@pytest.mark.parametrize("case", ["never", "no spec", "backoff", "health verdict"])
def test_what_runs_on_targets_not_reached_yet_is_kept_or_retired_by_its_own_policy(case: str) -> None:
    if case == "never":
        ended = old("n3", observed="failed", finished=NOW - seconds(10), job_spec=spec(restart_policy="never"))
    elif case == "no spec":
        ended = msgspec.structs.replace(old("n3", observed="failed", finished=NOW - seconds(10)), job_spec=None)
    elif case == "backoff":
        ended = old("n3", observed="failed", finished=NOW - seconds(0.25))
    else:
        ended = old("n3", observed="failed", reason="unhealthy", finished=NOW - seconds(10))
    step = decide(view(job(), rollout(4), spec(restart_policy="always"), [execution("n1"), execution("n2"), ended]))
    assert not step.creates
    if case in ("never", "no spec"):
        assert stops(step) == {ended.id: ("ended: failed", "")}
    else:
        assert not step.stops
        restarts = [t for t in step.timers if t[1].startswith("restart-")]
        assert restarts == ([(NOW + seconds(0.75), f"restart-{ended.id}")] if case == "backoff" else [])


def test_the_spec_of_a_version_known_to_the_view_wins_over_an_execution_s_own_copy() -> None:
    kept = spec(restart_policy="always", name="v1 as stored")
    bare = msgspec.structs.replace(old("n3", observed="completed", finished=NOW - seconds(10)), job_spec=None)
    stale = old("n4", observed="completed", finished=NOW - seconds(10), job_spec=spec(restart_policy="never"))
    step = decide(view(job(), rollout(4), spec(restart_policy="never"), [execution("n1"), execution("n2"), bare, stale],
                       specs={1: kept}))
    assert {c.replaces.id: c.execution.job_spec for c in step.creates if c.replaces} == {bare.id: kept, stale.id: kept}


def test_what_the_rolled_out_version_left_on_a_target_not_reached_yet_is_retired_not_restarted() -> None:
    leftover = execution("n3", deployment="earlier", observed="failed", finished=NOW - seconds(100))
    step = decide(view(job(), rollout(4), spec(restart_policy="always"), [execution("n1"), execution("n2"), leftover]))
    assert not step.creates and stops(step) == {leftover.id: ("ended: failed", "")}


def test_only_the_newest_of_another_version_on_a_target_not_reached_yet_is_restarted() -> None:
    older = old("n3", observed="failed", finished=NOW - seconds(100), id="a-older", created=NOW - seconds(600))
    newer = old("n3", observed="failed", finished=NOW - seconds(100), id="b-newer", created=NOW - seconds(500))
    step = decide(view(job(), rollout(4), spec(), [execution("n1"), execution("n2"), older, newer]))
    assert [c.replaces for c in step.creates] == [newer]
    assert stops(step) == {older.id: ("ended: failed", "")}


# -- retiring ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("new_state", "stable", "replaced"),
                         [("running", True, True), ("completed", False, True), ("running", False, False),
                          ("validating", False, False), ("pending", False, False), ("failed", False, False)])
def test_the_old_version_is_stopped_only_once_the_new_one_is_stable_or_completed(new_state, stable, replaced) -> None:
    new = execution("n1", observed=new_state, stable=stable, finished=NOW - seconds(0.5))
    previous = old("n1")
    step = decide(view(job(), rollout(4, failed=["n1"] if new_state == "failed" else []), spec(),
                       [previous, new, old("n3")]))
    expected = {previous.id: ("replaced by version 2", new.id)} if replaced else {}
    assert {k: v for k, v in stops(step).items() if k == previous.id} == expected
    assert old("n3").id not in stops(step)  # its wave has not started


def test_an_ended_execution_is_no_longer_desired_running_unless_its_restart_is_due() -> None:
    done = execution("n1", observed="completed", finished=NOW - seconds(10))
    crashed_old = old("n2", observed="failed", finished=NOW - seconds(10), next_id="x")
    stopped_already = old("n3", observed="stopped", desired="stopped")
    step = decide(view(job(state="running"), settled_rollout(), spec(), [done, crashed_old, stopped_already]))
    assert stops(step) == {done.id: ("ended: completed", ""), crashed_old.id: ("ended: failed", "")}


def test_a_node_no_longer_selected_stops_what_runs_there() -> None:
    elsewhere = old("n9")
    step = decide(view(job(), rollout(4), spec(), [execution("n1"), execution("n2"), elsewhere]))
    assert stops(step) == {elsewhere.id: ("node no longer selected", "")}
    older = execution("n9", id="a", created=NOW - seconds(20))
    newer = execution("n9", id="b", created=NOW - seconds(10))
    step = decide(view(job(), rollout(4), spec(), [execution("n1"), execution("n2"), older, newer]))
    assert stops(step) == {"a": ("node no longer selected", "b")}


def test_an_execution_superseded_by_a_restart_is_stopped_and_points_at_it() -> None:
    first = execution("n1", id="a", created=NOW - seconds(20), stable=True)
    second = execution("n1", id="b", created=NOW - seconds(10), stable=True)
    step = decide(view(job(state="running"), settled_rollout(), spec(), [first, second, execution("n2", stable=True)]))
    assert stops(step) == {"a": ("superseded by a restart", "b")}


def test_on_an_equal_creation_time_the_greater_id_is_the_newest() -> None:
    first = execution("n1", id="a", stable=True)
    second = execution("n1", id="b", stable=True)
    for order in ([first, second], [second, first]):
        step = decide(view(job(state="running"), settled_rollout(), spec(), [*order, execution("n2", stable=True)]))
        assert stops(step) == {"a": ("superseded by a restart", "b")}


# -- waves -----------------------------------------------------------------------------------------


def test_a_settled_wave_starts_the_next() -> None:
    record = rollout(4)
    step = decide(view(job(), record, spec(), [execution("n1", stable=True), execution("n2", observed="completed"),
                                               old("n1"), old("n2")]))
    assert step.rollout == with_record(record, current_wave=2, message="wave 1 healthy", updated_at=NOW)
    assert step.again is True and step.job_state is None and not step.mark_stable
    # the old version is retired in the same pass (and n2's completed execution is no longer meant to run)
    assert stops(step) == {old("n1").id: ("replaced by version 2", execution("n1").id),
                           old("n2").id: ("replaced by version 2", execution("n2").id),
                           execution("n2").id: ("ended: completed", "")}
    # the second wave's executions come with the record that starts it, in the rollout's order
    assert [c.execution.node_id for c in step.creates] == ["n3", "n4"]
    assert all(c.execution.rollout_wave == 2 and c.replaces is None for c in step.creates)
    assert step.rollout_first


def test_the_next_wave_replaces_what_runs_on_its_nodes() -> None:
    record = rollout(4)
    step = decide(view(job(), record, spec(), [execution("n1", stable=True), execution("n2", stable=True),
                                               old("n3"), old("n4", desired="stopped"), old("n2")]))
    assert step.rollout is not None and step.rollout.current_wave == 2
    assert {n: c.replaces for n, c in made(step).items()} == {"n3": old("n3"), "n4": None}
    assert made(step)["n3"].execution.status.previous_execution_id == old("n3").id


def test_the_next_wave_replaces_a_restart_made_in_the_same_step() -> None:
    # n4 has not been reached: its version 1 execution failed and is restarted by policy, then the wave
    # that reaches n4 starts in the same step and replaces that restart (never the failed one).
    failed = old("n4", observed="failed", finished=NOW - seconds(100))
    step = decide(view(job(), rollout(4), spec(), [execution("n1", stable=True), execution("n2", stable=True),
                                                   old("n3"), failed]))
    restart, *wave = step.creates
    assert restart.replaces is failed and restart.execution.job_version == 1
    assert [(c.execution.node_id, c.replaces) for c in wave] == [("n3", old("n3")), ("n4", restart.execution)]


def test_the_last_wave_settled_creates_nothing_more() -> None:
    record = rollout(4, current_wave=2)
    step = decide(view(job(), record, spec(), [execution(n, stable=True) for n in ("n1", "n2", "n3", "n4")]))
    assert step.rollout is not None and step.rollout.state == "succeeded" and not step.creates


def test_a_wave_waits_for_every_node_to_settle() -> None:
    unsettled = [execution("n1", stable=True), execution("n2", observed="validating")]
    step = decide(view(job(), rollout(4), spec(), unsettled))
    assert step.rollout is None
    assert step.job_state == JobStateChange("deploying", "deploying version 2 (wave 1 of 2)", 2)


def test_a_failed_node_does_not_hold_its_wave_while_it_restarts() -> None:
    record = rollout(4, failed=["n2"])
    crashed = execution("n2", observed="failed", finished=NOW - seconds(100))
    step = decide(view(job(), record, spec(), [execution("n1", stable=True), crashed]))
    assert [c.replaces for c in step.creates] == [crashed, None, None]  # the restart, then wave 2's
    assert [c.execution.node_id for c in step.creates] == ["n2", "n3", "n4"]
    assert step.rollout is not None and step.rollout.current_wave == 2


def test_a_healthy_canary_awaits_promotion() -> None:
    record = rollout(4, strategy="canary", waves=[1, 3])
    step = decide(view(job(), record, spec("canary"), [execution("n1", stable=True)]))
    assert step.rollout == with_record(record, state="awaiting_promotion", updated_at=NOW,
                                       message="canary healthy; waiting for promotion")
    assert step.again is True


def test_an_auto_promoted_canary_goes_on_and_later_waves_of_a_canary_need_no_promotion() -> None:
    record = rollout(4, strategy="canary", waves=[1, 3])
    step = decide(view(job(), record, spec("canary", auto_promote=True), [execution("n1", stable=True)]))
    assert step.rollout is not None and (step.rollout.state, step.rollout.current_wave) == ("deploying", 2)
    record = rollout(5, strategy="canary", waves=[1, 2, 2], current_wave=2)
    step = decide(view(job(), record, spec("canary"), [execution(n, stable=True) for n in nodes(3)]))
    assert step.rollout is not None and (step.rollout.state, step.rollout.current_wave) == ("deploying", 3)
    assert step.rollout.message == "wave 2 healthy"


def test_the_last_settled_wave_succeeds_and_marks_the_version_stable() -> None:
    record = rollout(4, current_wave=2, failed=["n4"])
    executions = [execution(n, stable=True) for n in nodes(3)] + [execution("n4", observed="failed", desired="stopped")]
    step = decide(view(job(), record, spec(), executions))
    assert step.rollout == with_record(record, state="succeeded", finished_at=NOW, updated_at=NOW,
                                       message="version 2 rolled out to 4 nodes, 1 failed")
    assert step.mark_stable == 2 and step.again is True and step.job_state is None


def test_an_immediate_rollout_succeeds_in_one_step() -> None:
    record = rollout(2, strategy="immediate")
    step = decide(view(job(), record, spec("immediate"), [execution("n1", stable=True, wave=0),
                                                         execution("n2", stable=True, wave=0)]))
    assert step.rollout == with_record(record, state="succeeded", finished_at=NOW, updated_at=NOW,
                                       message="version 2 rolled out to 2 nodes")
    assert step.mark_stable == 2


def test_a_finished_rollback_marks_nothing_stable() -> None:
    record = rollout(2, strategy="immediate", version=1, source_version=2, deployment=ROLLBACK, rollback_of=2,
                     cause="budget")
    step = decide(view(job(state="rollout_failed"), record, spec("immediate"), [old("n1"), old("n2")]))
    assert step.rollout == with_record(record, state="succeeded", finished_at=NOW, updated_at=NOW,
                                       message="rolled back to version 1 on 2 nodes after: budget")
    assert step.mark_stable == 0 and not step.creates  # the nodes still running version 1 keep it


@pytest.mark.parametrize("state", ["paused", "awaiting_promotion"])
def test_a_paused_rollout_starts_no_wave(state: str) -> None:
    record = rollout(4, state=state, message="paused by hand")
    step = decide(view(job(), record, spec(), [execution("n1", stable=True), execution("n2", stable=True)]))
    assert step.rollout is None
    assert step.job_state == JobStateChange("rollout_paused", "paused by hand", 2)


# -- failing and rolling back ----------------------------------------------------------------------


def test_a_rollback_keeps_what_still_runs_the_stable_version_and_restores_every_other_target() -> None:
    record = rollout(3, strategy="immediate", version=1, source_version=2, deployment=ROLLBACK, rollback_of=2,
                     cause="budget", message="rolling back")
    kept = old("n1")
    failed_new = execution("n1", observed="failed", finished=NOW - seconds(100))
    replaced = old("n2", desired="stopped", observed="stopped", next_id=execution("n2").id)
    stable_new = execution("n2", stable=True)
    ended = old("n3", observed="failed", reason="agent-restart", finished=NOW - seconds(100))
    step = decide(view(job(state="rollout_failed"), record, spec("immediate"),
                       [kept, failed_new, replaced, stable_new, ended]))
    creates = made(step)
    assert set(creates) == {"n2", "n3"}
    assert creates["n2"].execution.id == derived_id(ROLLBACK, "n2") and creates["n2"].replaces == stable_new
    assert creates["n2"].execution.job_version == 1 and creates["n2"].execution.rollout_wave == 0
    assert creates["n3"].replaces is None
    # version 2 runs on n2 until version 1 is stable there again; what has ended is retired
    assert stops(step) == {failed_new.id: ("ended: failed", ""), ended.id: ("ended: failed", "")}
    assert step.job_state == JobStateChange("rollout_failed", "rolling back", 2) and step.rollout is None




def failing(the_spec: Any = None, *, record: Rollout | None = None, stable_version: int = 1,
            hashes: dict[int, str] | None = None, executions: list[Execution] | None = None) -> tuple[Step, Rollout]:
    record = record or rollout(4, failed=["n1"])
    v = view(job(stable_version=stable_version), record, the_spec or spec(), executions or [], hashes=hashes)
    step = Step()
    copy = msgspec.structs.replace(record, targets=list(record.targets), failed_nodes=list(record.failed_nodes))
    fail(v, copy, "too many failures", step)
    return step, copy


def failed_record(record: Rollout, message: str) -> Rollout:
    return with_record(record, state="failed", message=message, updated_at=NOW, finished_at=NOW)


def test_a_failed_rollout_rolls_back_on_every_target_to_the_stable_version() -> None:
    record = rollout(4, failed=["n1"], source_version=3)
    step, _ = failing(record=record, executions=[execution("n1"), old("n1")])
    message = "too many failures; rolling back to version 1"
    assert step.rollout == Rollout(
        namespace="default", job_id=JOB_ID, deployment_id=ROLLBACK, job_version=1, source_version=3,
        strategy="immediate", state="deploying", targets=nodes(4), wave_sizes=[4], rollback_of=2,
        cause="too many failures", previous_version=2, message=message, created_at=NOW, updated_at=NOW)
    assert step.again is True and step.rollout_first is True and not step.stops
    assert step.job_state == JobStateChange("rollout_failed", message, None, force=True)


def test_a_rollback_of_a_rollout_without_targets_has_no_waves() -> None:
    step, _ = failing(record=rollout([], state="queued"))
    assert step.rollout is not None and step.rollout.targets == [] and step.rollout.wave_sizes == []


def test_without_automatic_rollback_the_rollout_just_fails() -> None:
    step, record = failing(spec(no_auto_rollback=True), executions=[execution("n1")])
    message = "too many failures; automatic rollback disabled"
    assert step.rollout == failed_record(rollout(4, failed=["n1"]), message) and step.rollout is record
    assert step.again is True and not step.stops
    assert step.job_state == JobStateChange("rollout_failed", message, None, force=True)


def test_a_rollback_that_fails_stops_there() -> None:
    record = rollout(2, strategy="immediate", version=1, source_version=2, deployment=ROLLBACK, rollback_of=2)
    step, _ = failing(record=record, stable_version=1)
    message = "too many failures; this was already a rollback, so it stops here"
    assert step.rollout == failed_record(record, message) and not step.stops
    assert step.job_state == JobStateChange("rollout_failed", message, None, force=True)


@pytest.mark.parametrize("stable_version", [0, 2])
def test_without_an_earlier_stable_version_the_failed_version_is_stopped(stable_version: int) -> None:
    executions = [execution("n1"), execution("n2", observed="failed"), execution("n3", desired="stopped"), old("n4")]
    step, _ = failing(stable_version=stable_version, executions=executions)
    message = "too many failures; no earlier stable version, version 2 stopped"
    assert step.rollout == failed_record(rollout(4, failed=["n1"]), message)
    assert stops(step) == {execution("n1").id: (message, ""), execution("n2").id: (message, "")}
    assert step.job_state == JobStateChange("rollout_failed", message, None, force=True)


def test_a_stable_version_with_the_same_spec_leaves_nothing_to_roll_back_to() -> None:
    step, _ = failing(hashes={1: "same", 2: "same"}, executions=[execution("n1")])
    message = "too many failures; version 1 has the same spec, so there is nothing to roll back to"
    assert step.rollout == failed_record(rollout(4, failed=["n1"]), message) and not step.stops
    assert step.job_state == JobStateChange("rollout_failed", message, None, force=True)


def test_a_failed_rollout_creates_no_more_and_retires_its_ended_executions() -> None:
    record = rollout(4, state="failed", failed=["n1"], message="budget")
    crashed = execution("n1", observed="failed", finished=NOW - seconds(100))
    step = decide(view(job(state="rollout_failed"), record, spec(restart_policy="always"),
                       [crashed, execution("n2"), old("n1"), old("n2")]))
    assert not step.creates and step.rollout is None
    assert stops(step) == {crashed.id: ("ended: failed", "")}  # the old version keeps running where it ran
    assert step.job_state == JobStateChange("rollout_failed", "budget", 2)


# -- the job's state -------------------------------------------------------------------------------


def state_of(record: Rollout, executions: list[Execution], *, type: str = "pipeline", policy: str = "on-failure"):
    the_spec = spec(type=type, restart_policy=policy)
    return job_state_of(job(type=type), record, the_spec, latest_by_node(executions, record))


def test_the_job_state_follows_the_rollout() -> None:
    assert state_of(rollout(4, timed_out=True, state="failed", message="late", source_version=5), []) == \
        JobStateChange("failed", "late", 5)
    assert state_of(rollout(4, state="failed", message="budget"), []) == JobStateChange("rollout_failed", "budget", 2)
    rollback = dict(version=1, source_version=2, rollback_of=2, cause="budget", message="rolling back")
    assert state_of(rollout(4, **rollback), []) == JobStateChange("rollout_failed", "rolling back", 2)
    assert state_of(rollout(4, state="succeeded", **rollback), []) == \
        JobStateChange("rollout_failed", "rolled back to version 1 after: budget", 2)
    assert state_of(rollout(4, state="paused", message="p"), []) == JobStateChange("rollout_paused", "p", 2)
    assert state_of(rollout(4, state="awaiting_promotion", message="c"), []) == JobStateChange("rollout_paused", "c", 2)
    assert state_of(rollout(4, current_wave=2), []) == \
        JobStateChange("deploying", "deploying version 2 (wave 2 of 2)", 2)
    assert state_of(rollout(4, strategy="immediate"), []) == JobStateChange("deploying", "deploying version 2", 2)


def test_a_finished_long_running_job_is_running_or_degraded() -> None:
    record = rollout(4, waves=[4], state="succeeded")
    running = [execution(n, stable=True) for n in nodes(3)] + [execution("n9", observed="lost")]
    assert state_of(record, running) == JobStateChange("running", "version 2 on 3 nodes", 2)
    for trouble in ("degraded", "lost", "failed"):
        executions = [*running, execution("n4", observed=trouble, stable=True)]
        assert state_of(record, executions) == \
            JobStateChange("degraded", "1 of 4 executions degraded, lost or failed", 2)
    # a long-running job whose executions all completed is not "completed"
    assert state_of(record, [execution(n, observed="completed") for n in nodes(4)]).state == "running"


@pytest.mark.parametrize("job_type", ["query", "update", "config"])
def test_a_one_shot_job_completes_or_fails_once_every_execution_has_ended_for_good(job_type: str) -> None:
    record = rollout(2, waves=[2], state="succeeded")
    done = [execution("n1", observed="completed"), execution("n2", observed="completed")]
    assert state_of(record, done, type=job_type) == JobStateChange("completed", "completed on 2 nodes", 2)
    one_failed = [done[0], execution("n2", observed="failed")]
    assert state_of(record, one_failed, type=job_type, policy="never") == \
        JobStateChange("failed", "1 of 2 executions failed", 2)
    # a failure that its policy still restarts is not the end: the job is degraded meanwhile
    assert state_of(record, one_failed, type=job_type).state == "degraded"
    # with "always" a completed execution runs again
    assert state_of(record, done, type=job_type, policy="always") == \
        JobStateChange("running", "version 2 on 2 nodes", 2)
    assert state_of(record, [done[0], execution("n2")], type=job_type).state == "running"
    assert state_of(record, [], type=job_type) == JobStateChange("running", "version 2 on 0 nodes", 2)


def test_decide_completes_a_one_shot_job_and_retires_its_executions() -> None:
    done = [execution(n, observed="completed", finished=NOW - seconds(5)) for n in ("n1", "n2")]
    step = decide(view(job(type="query", state="running"), settled_rollout(), spec(type="query"), done))
    assert step.job_state == JobStateChange("completed", "completed on 2 nodes", 2)
    assert stops(step) == {e.id: ("ended: completed", "") for e in done} and not step.creates


def test_decide_reports_the_job_state_of_a_settled_rollout() -> None:
    step = decide(view(job(state="deploying"), settled_rollout(), spec(),
                       [execution("n1", stable=True), execution("n2", stable=True, observed="degraded")]))
    assert step.job_state == JobStateChange("degraded", "1 of 2 executions degraded, lost or failed", 2)
    assert step.rollout is None and not step.stops and not step.creates


# -- changing the job ------------------------------------------------------------------------------


def test_a_job_state_change_is_written_with_a_new_revision() -> None:
    j = job(state="deploying", message="deploying version 2", revision=7)
    j.state = JobState(state_type="deploying", message="deploying version 2", details={"k": 1})
    assert job_state_change(j, JobStateChange("running", "version 2 on 4 nodes", 2), NOW) is True
    assert j.state == JobState(state_type="running", message="version 2 on 4 nodes", details={"k": 1})
    assert j.revision == 8 and j.modified_at == NOW


@pytest.mark.parametrize(
    ("state", "message", "change", "applies"),
    [("stopped", "bye", JobStateChange("running", "x", None, force=True), False),
     ("stopped", "bye", JobStateChange("stopped", "bye", None), False),
     ("stopped", "bye", JobStateChange("stopped", "by request", None), True),
     ("running", "x", JobStateChange("degraded", "y", 1), False),
     ("running", "x", JobStateChange("degraded", "y", 1, force=True), True),
     ("running", "x", JobStateChange("degraded", "y", None), True),
     ("running", "x", JobStateChange("running", "x", 2), False),
     ("running", "x", JobStateChange("running", "y", 2), True),
     ("running", "x", JobStateChange("degraded", "x", 2), True)],
)
def test_what_a_job_state_change_may_not_do(state: str, message: str, change: JobStateChange, applies: bool) -> None:
    """A stopped job stays stopped; another version's rollout does not set this version's state unless
    forced; an unchanged state is no change."""
    j = job(version=2, state=state, message=message)
    before = plain(j)
    assert job_state_change(j, change, NOW) is applies
    if applies:
        assert (j.state.state_type, j.state.message) == (change.state, change.message)
        assert (j.revision, j.modified_at) == (8, NOW)
    else:
        assert plain(j) == before


def test_mark_stable_only_moves_forward() -> None:
    j = job(stable_version=1, revision=7)
    assert mark_stable(j, 2, NOW) is True and (j.stable_version, j.revision, j.modified_at) == (2, 8, NOW)
    before = plain(j)
    assert mark_stable(j, 2, NOW + seconds(1)) is False and mark_stable(j, 1, NOW) is False
    assert plain(j) == before


def test_desire_stop_says_why_and_links_the_successor_once() -> None:
    e = execution("n1")
    assert desire_stop(e, "replaced", "next") is True
    assert e.status.desired_state == DesiredState(state_type="stopped", message="replaced")
    assert e.status.next_execution_id == "next"
    assert desire_stop(e, "again", "other") is False and e.status.desired_state.message == "replaced"
    linked = execution("n1", next_id="first")
    assert desire_stop(linked, "ended", "second") is True and linked.status.next_execution_id == "first"
    plain = execution("n1")
    assert desire_stop(plain, "ended: failed", "") is True and plain.status.next_execution_id == ""


def test_link_points_an_execution_at_its_newest_successor() -> None:
    e = execution("n1", next_id="a")
    assert link(e, "b") is True and e.status.next_execution_id == "b"
    assert link(e, "b") is False and e.status.next_execution_id == "b"


# -- the helpers the rules are made of -------------------------------------------------------------


def test_stop_all_skips_what_is_already_desired_stopped() -> None:
    a, b = execution("n1"), execution("n2", desired="stopped")
    assert stop_all([a, b], "why") == [Stop(a, "why")]


def test_a_stopped_record_is_a_copy() -> None:
    record = rollout(4)
    before = plain(record)
    result = stopped(record, NOW)
    assert result == with_record(record, state="stopped", message="job stopped", updated_at=NOW, finished_at=NOW)
    assert plain(record) == before


def test_finished_at_reads_the_recorded_end_else_the_last_update() -> None:
    assert finished_at(execution("n1", finished=NOW - seconds(3), updated=NOW)) == NOW - seconds(3)
    assert finished_at(execution("n1", updated=NOW - seconds(2))) == NOW - seconds(2)
    broken = execution("n1", updated=NOW - seconds(2))
    broken.status.details["finished_at"] = "yesterday"
    assert finished_at(broken) == NOW - seconds(2)


def test_settled_means_stable_completed_or_failed() -> None:
    assert settled(None) is False
    assert settled(execution("n1", stable=True)) is True
    assert settled(execution("n1", observed="completed")) is True
    assert settled(execution("n1", observed="failed")) is True
    for state in ("pending", "starting", "validating", "running", "lost", "stopped", "stopping"):
        assert settled(execution("n1", observed=state)) is False


def test_restartable_and_needs_restart() -> None:
    deploying, done = rollout(4), settled_rollout()
    policy = spec(restart_policy="on-failure")
    crashed = execution("n1", observed="failed")
    assert restartable(crashed, policy, deploying) and needs_restart(crashed, policy, deploying)
    judged = execution("n1", observed="failed", reason="deadline")
    assert restartable(judged, policy, deploying) and not needs_restart(judged, policy, deploying)
    assert needs_restart(judged, policy, done)
    for state in ("running", "pending", "lost", "degraded"):
        assert not restartable(execution("n1", observed=state), spec(restart_policy="always"), done)
    rollback_failed = rollout(4, state="failed", rollback_of=3)
    assert restartable(crashed, policy, rollback_failed)
    assert not restartable(crashed, policy, rollout(4, state="failed"))


def test_latest_by_node_is_the_newest_execution_of_the_rolled_out_version() -> None:
    record = rollout(4)
    mine_old = execution("n1", id="a", created=NOW - seconds(20))
    mine_new = execution("n1", id="b", created=NOW - seconds(10), observed="failed", desired="stopped")
    earlier_live = execution("n2", deployment="earlier", id="c")
    earlier_ended = execution("n3", deployment="earlier", id="d", observed="completed")
    earlier_unwanted = execution("n4", deployment="earlier", id="e", desired="stopped")
    other_version = old("n4")
    latest = latest_by_node([mine_new, mine_old, earlier_live, earlier_ended, earlier_unwanted, other_version], record)
    assert {n: e.id for n, e in latest.items()} == {"n1": "b", "n2": "c"}
    tie = latest_by_node([execution("n1", id="y"), execution("n1", id="x")], record)
    assert tie["n1"].id == "y"


def test_active_other_prefers_what_runs_then_what_nothing_follows() -> None:
    live = old("n1", id="live", created=NOW - seconds(900))
    ended_newer = old("n1", id="ended", observed="failed", created=NOW - seconds(100))
    assert active_other([live, ended_newer], "n1", 2) is live
    linked = old("n1", id="linked", observed="failed", next_id="x", created=NOW - seconds(50))
    assert active_other([ended_newer, linked], "n1", 2) is ended_newer
    assert active_other([linked], "n1", 2) is None
    assert active_other([old("n1", desired="stopped"), old("n2"), execution("n1")], "n1", 2) is None
    a, b = old("n1", id="a"), old("n1", id="b")
    assert active_other([b, a], "n1", 2) is b and active_other([a, b], "n1", 2) is b
    newest = old("n1", id="a-newest", created=NOW - seconds(1))
    assert active_other([a, newest, b], "n1", 2) is newest


def test_current_elsewhere_is_the_newest_unreplaced_execution_of_another_version_per_node() -> None:
    older = old("n3", id="b", created=NOW - seconds(900))
    newer = old("n3", id="a", created=NOW - seconds(800), observed="failed")
    linked = old("n4", id="c", next_id="z")
    unwanted = old("n4", id="d", desired="stopped")
    same_version = execution("n4", id="e")
    outside = old("n5", id="f")
    found = current_elsewhere([older, newer, linked, unwanted, same_version, outside], {"n3", "n4"}, 2)
    assert [e.id for e in found] == ["a"]
    assert [e.id for e in current_elsewhere([old("n3", id="y"), old("n3", id="x")], {"n3"}, 2)] == ["y"]
    assert [e.id for e in current_elsewhere([old("n3", id="x"), old("n3", id="y")], {"n3"}, 2)] == ["y"]


def test_finished_messages() -> None:
    assert finished_message(rollout(4)) == "version 2 rolled out to 4 nodes"
    assert finished_message(rollout(4, failed=["n1", "n2"])) == "version 2 rolled out to 4 nodes, 2 failed"
    assert finished_message(rollout(3, version=1, rollback_of=2, cause="c", failed=["n1"])) == \
        "rolled back to version 1 on 3 nodes after: c"


def test_a_restart_carries_its_count_in_details_and_a_first_execution_carries_none() -> None:
    the_spec = spec(type="query")
    first = new_execution("x", job(), the_spec, 2, "n1", 1, "d", "", 0, NOW)
    assert first.status.details == {} and first.job_type == "query" and first.job_spec is the_spec
    assert new_execution("x", job(), the_spec, 2, "n1", 1, "d", "p", 2, NOW).status.details == {"restarts": 2}


# -- properties of a whole pass --------------------------------------------------------------------

OBSERVED = ("pending", "starting", "validating", "running", "degraded", "completed", "failed", "lost", "stopped")
REASONS = (None, "exit", "unhealthy", "deadline", "agent-restart", "lost")
AGO = (0.5, 10, 50, 95, 400)


@st.composite
def executions_on(draw: st.DrawFn, node: str, version: int, deployment: str) -> list[Execution]:
    found: list[Execution] = []
    for index in range(draw(st.integers(0, 2))):
        created = NOW - seconds(draw(st.sampled_from(AGO)) + 10 * (2 - index))
        found.append(execution(
            node, version=version, deployment=draw(st.sampled_from([deployment, "earlier"])),
            observed=draw(st.sampled_from(OBSERVED)), desired=draw(st.sampled_from(["running", "running", "stopped"])),
            stable=draw(st.booleans()), created=created, reason=draw(st.sampled_from(REASONS)),
            finished=NOW - seconds(draw(st.sampled_from(AGO))), restarts=draw(st.integers(0, 3)),
            id=f"{node}-v{version}-{index}", wave=1,
            job_spec=spec(restart_policy=draw(st.sampled_from(["on-failure", "always", "never"])))))
    return found


@st.composite
def views(draw: st.DrawFn, timeouts: bool = False, stopping: bool = False) -> Any:
    strategy = draw(st.sampled_from(["immediate", "rolling", "canary"]))
    count = draw(st.integers(0, 5))
    targets = nodes(count)
    sizes = plan_waves(RolloutSpec(strategy=strategy, max_parallel=50, canary=Canary(canary_count=1)), count)
    rollback = draw(st.booleans())
    states = ["queued", "deploying", "deploying", "paused", "awaiting_promotion", "succeeded", "failed"]
    if stopping:
        states.append("stopped")
    version = 1 if rollback else 2
    record = rollout(
        targets, strategy="immediate" if rollback else strategy, waves=[count] if rollback and count else sizes,
        current_wave=draw(st.integers(1, len(sizes))) if sizes and strategy != "immediate" and not rollback else 0,
        state=draw(st.sampled_from(states)), version=version, source_version=2,
        deployment=ROLLBACK if rollback else DEPLOYMENT, failed=draw(st.lists(st.sampled_from(targets), unique=True))
        if targets else [], rollback_of=2 if rollback else 0, cause="budget" if rollback else "",
        queued_since=NOW - seconds(100), created_at=NOW - seconds(draw(st.sampled_from([100, 1000]))),
    )
    the_spec = spec(strategy if not rollback else "immediate", type=draw(st.sampled_from(["pipeline", "query"])),
                    restart_policy=draw(st.sampled_from(["on-failure", "always", "never"])),
                    max_failed_nodes=draw(st.integers(0, 2)),
                    max_failed_nodes_percent=draw(st.sampled_from([0, 50, 100])),
                    auto_promote=draw(st.booleans()), no_auto_rollback=draw(st.booleans()),
                    queue_timeout=draw(st.sampled_from([0, 50, 200])) if timeouts else 0,
                    total_timeout=draw(st.sampled_from([0, 500, 2000])) if timeouts else 0)
    executions: list[Execution] = []
    for node in [*targets, "n9"]:
        executions += draw(executions_on(node, 1, OLD_DEPLOYMENT))
        executions += draw(executions_on(node, 2, DEPLOYMENT))
    job_states = ["deploying", "running", "rollout_failed", "queued"] + (["stopped", "completed"] if stopping else [])
    the_job = job(state=draw(st.sampled_from(job_states)), stable_version=draw(st.sampled_from([0, 1, 2])))
    hashes = draw(st.sampled_from([{1: "a", 2: "b"}, {1: "a", 2: "a"}]))
    return view(the_job, record, the_spec, draw(st.permutations(executions)), hashes=hashes)


@RULES
@given(views(timeouts=True, stopping=True))
def test_a_decision_never_changes_the_view_it_was_made_from(v: Any) -> None:
    before = snapshot(v)
    step = decide(v)
    assert snapshot(v) == before
    if step.rollout is not None:  # the new record is a copy: changing it later leaves the view as it was read
        step.rollout.targets.append("n0")
        step.rollout.wave_sizes.append(1)
        step.rollout.failed_nodes.append("n0")
        assert snapshot(v) == before


@pytest.mark.parametrize("record", [rollout(4, current_wave=2), rollout(4, failed=["n3"], current_wave=2)])
def test_the_record_of_a_step_shares_nothing_with_the_view(record: Rollout) -> None:
    v = view(job(), record, spec(), [execution(n, stable=True) for n in nodes(4)])
    before = snapshot(v)
    step = decide(v)
    assert step.rollout is not None and step.rollout.state == "succeeded"
    step.rollout.targets.append("n0")
    step.rollout.wave_sizes.append(1)
    step.rollout.failed_nodes.append("n0")
    assert snapshot(v) == before


@RULES
@given(views(timeouts=True, stopping=True))
def test_a_step_stops_only_what_is_meant_to_run_and_creates_only_what_is_not_there(v: Any) -> None:
    step = decide(v)
    ids = {e.id for e in v.executions}
    assert all(s.execution.desired == "running" and s.execution.id in ids for s in step.stops)
    created = [c.execution.id for c in step.creates]
    assert len(created) == len(set(created)) and not set(created) & ids
    assert all(c.replaces is None or c.replaces.id == c.execution.status.previous_execution_id for c in step.creates)
    assert all(c.execution.status.created_at == NOW and c.execution.desired == "running" for c in step.creates)


@RULES
@given(views())
def test_a_pass_carried_out_and_asked_again_creates_nothing_new_for_those_nodes(v: Any) -> None:
    first = decide(v)
    again = decide(applied(v, first))
    assert not {c.execution.id for c in again.creates} & {e.id for e in applied(v, first).executions}
    if first.rollout is None:
        # the same record: whatever this pass created is there for the next, which creates nothing more
        assert not again.creates


# -- faults of the rules found by these tests, fixed ---------------------------------------------------------------------


@pytest.mark.parametrize("current_wave", [1, 2])
def test_a_wave_waits_for_the_replacement_of_node_trouble_during_its_backoff(current_wave: int) -> None:
    node = "n1" if current_wave == 1 else "n3"
    others = [execution(n, stable=True) for n in nodes(2 * current_wave) if n != node]
    trouble = execution(node, observed="failed", reason="agent-restart", finished=NOW - seconds(0.5))
    step = decide(view(job(), rollout(4, current_wave=current_wave), spec(), [*others, trouble]))
    assert step.timers == [(NOW + seconds(0.5), f"restart-{trouble.id}")]
    assert step.rollout is None and not step.mark_stable


def test_a_timed_out_rollback_starts_nothing_again() -> None:
    record = rollout(2, strategy="immediate", version=1, source_version=2, deployment=ROLLBACK, rollback_of=2,
                     created_at=NOW - seconds(100), cause="budget")
    v = view(job(state="rollout_failed"), record, spec("immediate", total_timeout=50),
             [old("n1"), old("n2"), execution("n1", observed="failed", desired="stopped")])
    first = decide(v)
    assert first.rollout is not None and first.rollout.timed_out
    assert first.job_state == JobStateChange("failed", "total_timeout (50s) exceeded", None, force=True)
    assert set(stops(first)) == {old("n1").id, old("n2").id}
    after = applied(v, first)
    after.job = job(state="rollout_failed")
    assert job_state_change(after.job, first.job_state, NOW)
    again = decide(after)
    assert not again.creates


def test_a_stopped_rollout_of_an_earlier_version_does_not_stop_a_new_submission() -> None:
    record = rollout(2, state="stopped", version=1, deployment=OLD_DEPLOYMENT)
    resubmitted = job(version=2, state="pending", message="version 2 submitted")
    step = decide(view(resubmitted, record, spec(), [old("n1", desired="stopped", observed="stopped")]))
    if step.job_state is not None:
        job_state_change(resubmitted, step.job_state, NOW)
    assert resubmitted.state.state_type == "pending"


def test_history_is_not_what_a_decision_reads() -> None:
    """Ended, no longer meant to run, of an earlier deployment: nothing decides from it."""
    from services.rollout.decide import relevant

    record = rollout(2)
    history = old("n1", observed="completed", desired="stopped")
    kept = [
        old("n2", observed="completed", desired="running"),  # ended, but still said to run: retire stops it
        old("n3", observed="running", desired="stopped"),  # told to stop, still running
        execution("n1", observed="failed", desired="stopped"),  # this deployment's: it is the node's latest
    ]
    assert relevant([history, *kept], record) == kept
    assert relevant([history], None) == [history]


def test_history_is_archived_except_the_version_a_rollback_undoes() -> None:
    """What may leave the executions bucket: history, but not the failed version's executions while its
    rollback is the job's rollout (the rollback's status tells their failures)."""
    from services.rollout.decide import archivable

    record = rollout(2, state="succeeded")
    assert archivable(old("n1", observed="completed", desired="stopped"), record)
    for state in ("queued", "deploying", "paused", "awaiting_promotion"):  # not while a wave may be under way
        assert not archivable(old("n1", observed="completed", desired="stopped"), with_record(record, state=state))
    for state in ("failed", "stopped"):
        assert archivable(old("n1", observed="completed", desired="stopped"), with_record(record, state=state))
    assert archivable(old("n1", observed="stopped", desired="stopped"), record)
    assert not archivable(old("n1", observed="completed", desired="running"), record)
    assert not archivable(old("n1", observed="running", desired="stopped"), record)
    assert not archivable(old("n1", observed="lost", desired="stopped"), record)  # its node may come back
    assert not archivable(execution("n1", observed="failed", desired="stopped"), record)
    undoing = rollout(2, version=1, rollback_of=2, deployment=ROLLBACK, state="succeeded")
    failed = execution("n1", version=2, observed="failed", desired="stopped")
    assert not archivable(failed, undoing)
    assert archivable(failed, with_record(undoing, rollback_of=3))
    assert archivable(old("n2", observed="completed", desired="stopped"), undoing)


def test_a_job_state_prunes_what_may_be_archived_and_keeps_the_rest() -> None:
    from services.rollout.jobstate import JobState

    state = JobState("default", JOB_ID)
    gone = old("n1", observed="completed", desired="stopped")
    undone = execution("n2", observed="failed", desired="stopped")
    live = execution("n1")
    for e in (gone, undone, live):
        state.offer(e)
    undoing = rollout(2, version=1, rollback_of=2, deployment=ROLLBACK, state="succeeded")
    assert state.prune(with_record(undoing, state="deploying")) == []
    assert state.prune(undoing) == [gone]
    assert set(state.executions) == {undone.id, live.id}
    assert state.prune(undoing) == []


class CountedReads(list):  # type: ignore[type-arg]
    """A list of executions that counts how often a pass reads it through."""

    reads = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        CountedReads.reads += 1
        return super().__iter__()


@pytest.mark.parametrize("size", [8, 400])
def test_starting_a_wave_reads_the_executions_a_bounded_number_of_times(size: int) -> None:
    # A wave of N nodes replacing N old executions must cost O(executions), not O(N x executions): the
    # executions are grouped by node once, not searched once per node.
    names = nodes(size)
    half = size // 2
    record = rollout(names, waves=[half, size - half])
    executions = CountedReads([*(execution(n, stable=True) for n in names[:half]), *(old(n) for n in names)])
    the_view = view(job(), record, spec())
    the_view.executions = executions
    CountedReads.reads = 0
    step = decide(the_view)
    assert len(step.creates) == size - half and all(c.replaces is not None for c in step.creates)
    assert CountedReads.reads <= 8

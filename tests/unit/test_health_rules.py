"""The pure health rules, read as rules (docs/ROLLOUTS.md, "Health" and "Lost nodes").

`services.health.transitions`: how an execution's observed state may move on an agent's report, when its
node falls silent and when the node comes back. `services.health.windows`: how health intervals are
counted into streaks and what the streaks and the deadline do to a health-gated execution.

Every check looks at the whole outcome: the return value (changed or not), the exact state and message,
the details (`reason`, `exit_code`, `finished_at`, `lost_from`, `lost_at`) and `stable_at`; a report that
is ignored must leave the execution exactly as it was.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.health.transitions import apply_report, health_gated, lost_since, mark_lost, set_observed
from services.health.windows import HealthWindow, apply_window, deadline_passed, new_window, record_interval
from shared.codec import convert, to_builtins
from shared.durations import parse_rfc3339, rfc3339, utcnow
from shared.models import (
    TERMINAL_STATES,
    DesiredState,
    Execution,
    ExecutionStatus,
    HealthReport,
    JobSpec,
    ObservedState,
    StateReport,
)

NOW = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.timezone.utc)
EARLIER = NOW - dt.timedelta(minutes=5)
LATER = NOW + dt.timedelta(minutes=1)

# Fast and reproducible: the same examples on every run, and no example database.
RULES = settings(derandomize=True, database=None, deadline=None, max_examples=150)

TERMINAL = ("completed", "failed", "stopped")
# What an agent reports (services/agent/node.py) plus "pending", which costs nothing to cover.
REPORTED = ("pending", "starting", "running", "stopping", "completed", "failed", "stopped")
# Progress as the docs order it; validating, running and degraded are one step ("the process is up").
PROGRESS = {"pending": 0, "starting": 1, "validating": 2, "running": 2, "degraded": 2, "stopping": 3,
            "completed": 4, "failed": 4, "stopped": 4}


def job_spec(strategy: str = "rolling", *, gate: bool = True, **health: Any) -> JobSpec:
    rollout: dict[str, Any] = {"strategy": strategy}
    if gate:
        rollout["health_check"] = {"deadline": "30s", "interval": "1s", **health}
    return convert({"name": "x", "type": "pipeline", "config": {"simulate": {}}, "rollout": rollout}, JobSpec)


def execution(state: str = "validating", *, message: str = "", stable_at: dt.datetime | None = None,
              spec: JobSpec | None | str = "gated", details: dict[str, Any] | None = None,
              **health: Any) -> Execution:
    """An execution of a rolling rollout with a health check ("gated"), of an immediate one, or without spec."""
    if spec == "gated":
        spec = job_spec(**health)
    elif spec == "immediate":
        spec = job_spec("immediate", gate=False)
    assert spec is None or isinstance(spec, JobSpec)
    return Execution(
        id="e1", job_id="j", job_type="pipeline", job_version=1, namespace="default", node_id="n7",
        status=ExecutionStatus(created_at=NOW, updated_at=NOW, revision=1,
                               desired_state=DesiredState(state_type="running"),
                               observed_state=ObservedState(state_type=state, message=message),
                               details=dict(details or {}), stable_at=stable_at),
        job_spec=spec,
    )


def stable(state: str = "running", **kw: Any) -> Execution:
    """A gated execution that passed validation earlier."""
    return execution(state, stable_at=EARLIER, **kw)


def report(state: str, message: str = "", **kw: Any) -> StateReport:
    return StateReport(namespace="default", job_id="j", node_id="n7", execution_id="e1", state=state,
                       message=message, at=NOW, **kw)


def snapshot(e: Execution) -> Any:
    return to_builtins(e)


def message(e: Execution) -> str:
    return e.status.observed_state.message


def assert_ignored(e: Execution, event) -> None:
    """The event returns False and leaves every field of the execution as it was."""
    before = snapshot(e)
    assert event(e) is False
    assert snapshot(e) == before


def assert_finished_now(e: Execution, before: dt.datetime) -> None:
    finished = parse_rfc3339(e.status.details["finished_at"])
    assert finished is not None and before <= finished <= utcnow()


# ==================================================================================================
# Which executions are health-gated
# ==================================================================================================


@pytest.mark.parametrize(("spec", "gated"), [
    (job_spec("rolling"), True),
    (job_spec("canary"), True),
    (job_spec("rolling", gate=False), False),  # rejected by the API; here it simply means "no gate"
    (job_spec("canary", gate=False), False),
    (job_spec("immediate"), False),  # the health check of an immediate rollout is ignored
    (job_spec("immediate", gate=False), False),
    (None, False),
])
def test_only_rolling_and_canary_rollouts_with_a_health_check_are_gated(spec, gated) -> None:
    assert health_gated(execution(spec=spec)) is gated


# ==================================================================================================
# Agent reports: forward only
# ==================================================================================================

# For each state the server holds, the reports that are stale (or mean nothing new) and are ignored.
IGNORED = {
    "pending": set(),
    "starting": {"pending"},
    "validating": {"pending", "starting", "running"},
    "running": {"pending", "starting", "running"},
    "degraded": {"pending", "starting", "running"},
    "stopping": {"pending", "starting", "running"},
}


@pytest.mark.parametrize("reported", REPORTED)
@pytest.mark.parametrize("current", list(IGNORED))
def test_a_report_moves_an_execution_forward_or_is_ignored(current: str, reported: str) -> None:
    e = execution(current, message="as it was", stable_at=EARLIER if current in ("running", "degraded") else None)
    before = dt.datetime.now(dt.timezone.utc)
    if reported in IGNORED[current]:
        assert_ignored(e, lambda e: apply_report(e, report(reported, "news", exit_code=3, details={"k": 1}), NOW))
        return
    assert apply_report(e, report(reported, "news", exit_code=3, details={"k": 1}), NOW) is True
    # "running" only says the process is up: a gated execution that is not stable starts validating.
    assert e.observed == ("validating" if reported == "running" else reported)
    assert message(e) == "news"
    if reported != "running":
        assert e.status.details["exit_code"] == 3 and e.status.details["k"] == 1
    if reported in TERMINAL:
        assert_finished_now(e, before)
    else:
        assert "finished_at" not in e.status.details
    assert e.status.stable_at == (EARLIER if current in ("running", "degraded") else None)


@pytest.mark.parametrize("reported", REPORTED)
@pytest.mark.parametrize("current", TERMINAL)
def test_a_terminal_state_is_final(current: str, reported: str) -> None:
    e = execution(current, message="ended", details={"finished_at": rfc3339(EARLIER), "exit_code": 1})
    assert_ignored(e, lambda e: apply_report(e, report(reported, "late", exit_code=0), NOW))


def test_a_stale_report_is_ignored() -> None:
    e = execution("stopping", message="stopping")
    assert apply_report(e, report("starting", "starting"), NOW) is False
    assert e.observed == "stopping" and message(e) == "stopping"


def test_a_repeated_report_is_a_duplicate_and_changes_nothing() -> None:
    e = execution("starting", message="starting")
    assert_ignored(e, lambda e: apply_report(e, report("starting", "starting"), NOW))


def test_the_same_state_with_a_new_message_updates_the_message() -> None:
    e = execution("starting", message="starting")
    assert apply_report(e, report("starting", "pulling the image"), NOW) is True
    assert e.observed == "starting" and message(e) == "pulling the image"
    e = execution("stopping", message="")
    assert apply_report(e, report("stopping", "draining"), NOW) is True
    assert e.observed == "stopping" and message(e) == "draining"


@pytest.mark.parametrize(("current", "reported"), [("starting", "stopping"), ("starting", "failed"),
                                                    ("pending", "starting"), ("validating", "completed")])
def test_a_new_state_with_the_same_message_is_not_a_duplicate(current: str, reported: str) -> None:
    for text in ("", "same words"):
        e = execution(current, message=text)
        assert apply_report(e, report(reported, text), NOW) is True
        assert e.observed == reported and message(e) == text


def test_exit_code_and_details_of_a_report_are_kept() -> None:
    e = execution("running", stable_at=EARLIER, details={"reason": "old", "other": "kept"})
    assert apply_report(e, report("completed", "exited", exit_code=0, details={"reason": "done", "n": 2}), NOW)
    assert e.observed == "completed" and message(e) == "exited"
    assert e.status.details["exit_code"] == 0  # an exit code of 0 is still recorded
    assert e.status.details["reason"] == "done" and e.status.details["n"] == 2 and e.status.details["other"] == "kept"


def test_a_report_without_exit_code_leaves_no_exit_code() -> None:
    e = execution("running", stable_at=EARLIER)
    assert apply_report(e, report("failed", "killed", details={"reason": "agent-restart"}), NOW)
    assert e.observed == "failed" and "exit_code" not in e.status.details
    assert e.status.details["reason"] == "agent-restart"


# -- "running" from an agent -----------------------------------------------------------------------


@pytest.mark.parametrize("current", ["pending", "starting"])
def test_running_makes_a_gated_execution_validate_first(current: str) -> None:
    e = execution(current, message="starting")
    assert apply_report(e, report("running"), NOW) is True
    assert e.observed == "validating" and message(e) == "validating health"
    assert e.status.stable_at is None and "finished_at" not in e.status.details
    e = execution(current)
    assert apply_report(e, report("running", "process up"), NOW) is True
    assert e.observed == "validating" and message(e) == "process up" and e.status.stable_at is None


@pytest.mark.parametrize("spec", ["immediate", None, job_spec("rolling", gate=False)])
@pytest.mark.parametrize("current", ["pending", "starting"])
def test_running_makes_an_ungated_execution_stable_at_once(current: str, spec) -> None:
    e = execution(current, message="starting", spec=spec)
    assert apply_report(e, report("running", "process up"), NOW) is True
    assert e.observed == "running" and message(e) == "process up" and e.status.stable_at == NOW
    e = execution(current, message="starting", spec=spec)
    assert apply_report(e, report("running"), NOW) is True
    assert e.observed == "running" and message(e) == "" and e.status.stable_at == NOW


def test_running_does_not_move_stable_at_of_an_execution_that_was_stable_before() -> None:
    e = stable("starting")
    assert apply_report(e, report("running", "up again"), NOW) is True
    assert e.observed == "running" and message(e) == "up again" and e.status.stable_at == EARLIER
    e = execution("starting", spec="immediate", stable_at=EARLIER)
    assert apply_report(e, report("running"), NOW) is True
    assert e.observed == "running" and e.status.stable_at == EARLIER


def test_a_validating_execution_is_not_made_stable_by_a_running_report() -> None:
    e = execution("validating", message="validating health")
    assert_ignored(e, lambda e: apply_report(e, report("running", "running"), NOW))


def test_a_running_execution_ignores_another_running_report() -> None:
    e = stable("running", message="healthy for 2 consecutive intervals")
    assert_ignored(e, lambda e: apply_report(e, report("running", "running"), NOW))
    e = execution("running", spec="immediate", stable_at=EARLIER)
    assert_ignored(e, lambda e: apply_report(e, report("running", "running"), NOW))


def test_a_degraded_execution_is_not_lifted_by_a_plain_running_report() -> None:
    e = stable("degraded", message="unhealthy for 3 consecutive intervals (error rate 50.0%)")
    assert_ignored(e, lambda e: apply_report(e, report("running", "running"), NOW))


# ==================================================================================================
# Terminal bookkeeping
# ==================================================================================================


@pytest.mark.parametrize("state", TERMINAL)
def test_entering_a_terminal_state_stamps_finished_at_with_the_wall_clock(state: str) -> None:
    e = execution("running", stable_at=EARLIER)
    before = dt.datetime.now(dt.timezone.utc)
    set_observed(e, state, "over")
    assert e.observed == state and message(e) == "over"
    assert_finished_now(e, before)


@pytest.mark.parametrize("state", ["pending", "starting", "validating", "running", "degraded", "lost", "stopping"])
def test_a_live_state_has_no_finished_at(state: str) -> None:
    e = execution("starting")
    set_observed(e, state, "on")
    assert e.observed == state and message(e) == "on" and "finished_at" not in e.status.details


def test_a_new_state_without_a_message_clears_the_old_message() -> None:
    e = execution("running", message="healthy for 2 consecutive intervals")
    set_observed(e, "stopping")
    assert e.observed == "stopping" and message(e) == ""


# ==================================================================================================
# Lost nodes
# ==================================================================================================


@pytest.mark.parametrize("state", ["pending", "starting", "validating", "running", "degraded", "stopping"])
def test_an_unfinished_execution_of_a_silent_node_is_lost(state: str) -> None:
    e = execution(state, message="before", stable_at=EARLIER if state in ("running", "degraded") else None)
    assert mark_lost(e, NOW, "n7") is True
    assert e.observed == "lost" and message(e) == "node n7 stopped sending heartbeats"
    assert e.status.details["lost_from"] == state and e.status.details["lost_at"] == rfc3339(NOW)
    assert lost_since(e) == NOW
    assert "finished_at" not in e.status.details


@pytest.mark.parametrize("state", [*TERMINAL, "lost"])
def test_an_ended_or_already_lost_execution_is_not_lost_again(state: str) -> None:
    e = execution(state, message="as it was", details={"lost_from": "running", "lost_at": rfc3339(EARLIER)})
    assert_ignored(e, lambda e: mark_lost(e, NOW, "n7"))


def test_lost_since_only_for_a_lost_execution_with_a_time() -> None:
    assert lost_since(execution("running", details={"lost_at": rfc3339(NOW)})) is None
    assert lost_since(execution("lost", details={"lost_at": rfc3339(EARLIER)})) == EARLIER
    assert lost_since(execution("lost")) is None
    assert lost_since(execution("lost", details={"lost_at": "yesterday"})) is None


# What a lost execution is once a plain "running" report (the agent's "still running") arrives.
RESUMED = {
    "pending": ("validating", "validating health"),  # lost before it ran: it still has to pass validation
    "starting": ("validating", "validating health"),
    "validating": ("validating", "node reconnected"),
    "running": ("running", "node reconnected"),
    "degraded": ("degraded", "node reconnected"),  # a degraded execution is not lifted by coming back
    "stopping": ("stopping", "node reconnected"),  # "running" is older than stopping
}


@pytest.mark.parametrize("lost_from", list(RESUMED))
def test_a_node_that_comes_back_resumes_its_executions_where_they_were(lost_from: str) -> None:
    was_stable = lost_from in ("running", "degraded")
    e = execution(lost_from, stable_at=EARLIER if was_stable else None)
    assert mark_lost(e, NOW, "n7")
    assert apply_report(e, report("running"), LATER) is True
    state, text = RESUMED[lost_from]
    assert e.observed == state and message(e) == text
    assert "lost_from" not in e.status.details and "lost_at" not in e.status.details
    assert e.status.stable_at == (EARLIER if was_stable else None)
    assert lost_since(e) is None and "finished_at" not in e.status.details


@pytest.mark.parametrize("lost_from", list(RESUMED))
def test_a_node_that_comes_back_with_a_message_shows_that_message(lost_from: str) -> None:
    e = execution(lost_from, stable_at=EARLIER if lost_from in ("running", "degraded") else None)
    assert mark_lost(e, NOW, "n7")
    assert apply_report(e, report("running", "node reconnected; still running"), LATER) is True
    assert e.observed == RESUMED[lost_from][0] and message(e) == "node reconnected; still running"


def test_a_stale_report_still_brings_a_lost_execution_back() -> None:
    e = stable("running")
    assert mark_lost(e, NOW, "n7")
    # "starting" is older than where the execution was, but the node is back: it is no longer lost.
    assert apply_report(e, report("starting"), LATER) is True
    assert e.observed == "running" and message(e) == "node reconnected" and e.status.stable_at == EARLIER
    assert "lost_from" not in e.status.details and "lost_at" not in e.status.details


def test_a_replayed_report_of_the_state_it_was_lost_in_brings_it_back() -> None:
    e = execution("starting", message="starting")
    assert mark_lost(e, NOW, "n7")
    assert apply_report(e, report("starting", "starting"), LATER) is True
    assert e.observed == "starting" and message(e) == "starting"
    assert "lost_from" not in e.status.details and "lost_at" not in e.status.details


def test_a_pending_execution_of_a_node_that_comes_back_is_started() -> None:
    e = execution("pending")
    assert mark_lost(e, NOW, "n7")
    assert apply_report(e, report("starting", "starting"), LATER) is True
    assert e.observed == "starting" and message(e) == "starting" and "lost_from" not in e.status.details


def test_an_execution_that_ended_while_its_node_was_silent_ends_on_return() -> None:
    e = stable("running")
    assert mark_lost(e, NOW, "n7")
    before = dt.datetime.now(dt.timezone.utc)
    assert apply_report(e, report("failed", "exit 2", exit_code=2, details={"reason": "exit"}), LATER) is True
    assert e.observed == "failed" and message(e) == "exit 2"
    assert e.status.details["exit_code"] == 2 and e.status.details["reason"] == "exit"
    assert "lost_from" not in e.status.details and "lost_at" not in e.status.details
    assert_finished_now(e, before)


# A lost record whose lost_from is missing or makes no sense (written by an older version, or by hand)
# resumes as running: never as lost again, never as an ended execution.
@pytest.mark.parametrize("lost_from", [None, "lost", "failed", "completed", "stopped", "exploded", 3])
def test_a_lost_execution_without_a_usable_lost_from_resumes_as_running(lost_from: Any) -> None:
    details = {} if lost_from is None else {"lost_from": lost_from}  # and no lost_at either
    e = stable("lost", message="node n7 stopped sending heartbeats", details=details)
    assert apply_report(e, report("running"), LATER) is True
    assert e.observed == "running" and message(e) == "node reconnected" and e.status.stable_at == EARLIER
    assert "lost_from" not in e.status.details and "finished_at" not in e.status.details
    e = stable("lost", details=details)
    assert apply_report(e, report("stopped", "stopped"), LATER) is True
    assert e.observed == "stopped" and "lost_from" not in e.status.details


# ==================================================================================================
# Properties of report sequences
# ==================================================================================================

EVENTS = st.lists(
    st.one_of(st.tuples(st.sampled_from(REPORTED), st.sampled_from(["", "a", "b"])), st.just("silent")),
    max_size=12,
)


def progress(e: Execution) -> int:
    """How far an execution got; a lost one counts where it was lost."""
    state = e.observed
    if state == "lost":
        state = e.status.details["lost_from"]
    return PROGRESS[state]


def run(e: Execution, event: Any) -> bool:
    if event == "silent":
        return mark_lost(e, NOW, "n7")
    state, text = event
    return apply_report(e, report(state, text), NOW)


@RULES
@given(events=EVENTS, gated=st.booleans())
def test_reports_only_move_forward_and_say_whether_they_changed_anything(events, gated: bool) -> None:
    e = execution("pending", spec="gated" if gated else "immediate")
    for event in events:
        before, was, ended = snapshot(e), progress(e), e.observed in TERMINAL_STATES
        changed = run(e, event)
        assert changed is (snapshot(e) != before)
        assert progress(e) >= was
        if ended:
            assert not changed
        if e.observed != "lost":
            assert "lost_from" not in e.status.details and "lost_at" not in e.status.details
        if gated:
            # Only the health window makes a gated execution stable; no report can.
            assert e.status.stable_at is None and e.observed not in ("running", "degraded")
        elif e.observed == "running":
            assert e.status.stable_at == NOW


# ==================================================================================================
# Health windows: counting intervals
# ==================================================================================================


def interval(i: int, total: int, errors: int) -> HealthReport:
    start = NOW + dt.timedelta(seconds=i)
    return HealthReport(namespace="default", job_id="j", node_id="n7", execution_id="e1", interval_start=start,
                        interval_end=start + dt.timedelta(seconds=1), total=total, errors=errors, at=start)


def check_of(e: Execution):
    assert e.job_spec is not None and e.job_spec.rollout.health_check is not None
    return e.job_spec.rollout.health_check


def test_a_window_opens_with_the_deadline_counted_from_creation() -> None:
    e = execution("validating")
    assert new_window(e) == HealthWindow(execution_id="e1", deadline_at=NOW + dt.timedelta(seconds=30))
    w = new_window(e)
    assert (w.healthy_streak, w.unhealthy_streak, w.intervals, w.last_interval_end, w.last_error_rate) == (
        0, 0, 0, None, None)


@pytest.mark.parametrize("spec", ["immediate", None])
def test_an_ungated_execution_has_a_window_without_deadline(spec) -> None:
    assert new_window(execution("running", spec=spec)) == HealthWindow(execution_id="e1", deadline_at=None)
    assert new_window(execution("running", spec=spec)).deadline_at is None


def test_the_deadline_is_never_extended_by_rounding_to_microseconds() -> None:
    e = execution("validating", spec=job_spec(deadline="30.0000019s"))
    assert new_window(e).deadline_at == NOW + dt.timedelta(seconds=30, microseconds=1)


@pytest.mark.parametrize(("total", "errors", "verdict", "rate"), [
    (20, 0, "healthy", 0.0),
    (20, 2, "healthy", 0.1),  # exactly at the default limit of 10 %: not above it
    (20, 3, "unhealthy", 0.15),
    (10, 50, "unhealthy", 1.0),  # more errors than work counts as 100 %
    (0, 0, "no-data", None),
    (0, 4, "no-data", None),
])
def test_an_interval_is_judged_by_its_error_rate(total: int, errors: int, verdict: str, rate) -> None:
    e = execution("validating")
    w = new_window(e)
    assert record_interval(w, interval(0, total, errors), check_of(e)) == verdict
    assert w.last_error_rate == rate and w.intervals == 1
    assert w.last_interval_end == NOW + dt.timedelta(seconds=1)


@pytest.mark.parametrize(("limit", "errors", "verdict"), [
    (0.25, 5, "healthy"), (0.25, 6, "unhealthy"), (0.0, 0, "healthy"), (0.0, 1, "unhealthy"), (1.0, 20, "healthy"),
])
def test_an_explicit_error_rate_limit_is_inclusive_and_zero_means_any_error(limit: float, errors: int,
                                                                             verdict: str) -> None:
    e = execution("validating", max_error_rate=limit)
    assert record_interval(new_window(e), interval(0, 20, errors), check_of(e)) == verdict


def streaks(w: HealthWindow) -> tuple[int, int, int]:
    return w.healthy_streak, w.unhealthy_streak, w.intervals


def test_streaks_count_consecutive_verdicts_and_no_data_breaks_both() -> None:
    e = execution("validating")
    w, check = new_window(e), check_of(e)
    seen = []
    for i, (total, errors) in enumerate([(10, 0), (10, 0), (10, 5), (10, 5), (10, 5), (0, 0), (10, 5), (0, 0),
                                         (10, 0), (10, 9), (10, 0)]):
        seen.append((record_interval(w, interval(i, total, errors), check), *streaks(w)))
    assert seen == [
        ("healthy", 1, 0, 1), ("healthy", 2, 0, 2),
        ("unhealthy", 0, 1, 3), ("unhealthy", 0, 2, 4), ("unhealthy", 0, 3, 5),
        ("no-data", 0, 0, 6),
        ("unhealthy", 0, 1, 7), ("no-data", 0, 0, 8),
        ("healthy", 1, 0, 9), ("unhealthy", 0, 1, 10), ("healthy", 1, 0, 11),
    ]
    assert w.last_error_rate == 0.0 and w.last_interval_end == NOW + dt.timedelta(seconds=11)


@pytest.mark.parametrize("end", [0, -1, -5])
def test_a_replayed_or_older_interval_is_not_counted(end: int) -> None:
    e = execution("validating")
    w, check = new_window(e), check_of(e)
    assert record_interval(w, interval(5, 10, 0), check) == "healthy"
    before = to_builtins(w)
    assert record_interval(w, interval(5 + end, 10, 9), check) is None
    assert to_builtins(w) == before
    assert record_interval(w, interval(6, 10, 9), check) == "unhealthy"
    assert streaks(w) == (0, 1, 2) and w.last_error_rate == 0.9


# ==================================================================================================
# Health windows: what the streaks do
# ==================================================================================================


def window(healthy: int = 0, unhealthy: int = 0, rate: float | None = None) -> HealthWindow:
    return HealthWindow(execution_id="e1", deadline_at=NOW + dt.timedelta(seconds=30), healthy_streak=healthy,
                        unhealthy_streak=unhealthy, intervals=healthy + unhealthy, last_error_rate=rate)


def test_a_validating_execution_becomes_stable_after_success_threshold_healthy_intervals() -> None:
    e = execution("validating", message="validating health", success_threshold=3)
    assert_ignored(e, lambda e: apply_window(e, window(healthy=2, rate=0.0), LATER))
    assert apply_window(e, window(healthy=3, rate=0.0), LATER) is True
    assert e.observed == "running" and message(e) == "healthy for 3 consecutive intervals"
    assert e.status.stable_at == LATER and "finished_at" not in e.status.details and "reason" not in e.status.details


def test_a_validating_execution_fails_after_failure_threshold_unhealthy_intervals() -> None:
    e = execution("validating", message="validating health", failure_threshold=2)
    assert_ignored(e, lambda e: apply_window(e, window(unhealthy=1, rate=0.5), LATER))
    before = dt.datetime.now(dt.timezone.utc)
    assert apply_window(e, window(unhealthy=2, rate=0.5), LATER) is True
    assert e.observed == "failed"
    assert message(e) == "unhealthy for 2 consecutive intervals (error rate 50.0%, limit 10.0%)"
    assert e.status.details["reason"] == "unhealthy" and e.status.stable_at is None
    assert_finished_now(e, before)


def test_the_failure_message_shows_an_explicit_limit_and_a_missing_rate() -> None:
    e = execution("validating", failure_threshold=1, max_error_rate=0.25)
    assert apply_window(e, window(unhealthy=1, rate=0.375), LATER) is True
    assert message(e) == "unhealthy for 1 consecutive intervals (error rate 37.5%, limit 25.0%)"
    # A window record stored without last_error_rate (omit_defaults) still gives a readable verdict.
    e = execution("validating", failure_threshold=1)
    assert apply_window(e, window(unhealthy=4), LATER) is True
    assert message(e) == "unhealthy for 4 consecutive intervals (error rate n/a, limit 10.0%)"


def test_a_stable_execution_degrades_after_failure_threshold_unhealthy_intervals() -> None:
    e = stable("running", message="healthy for 2 consecutive intervals", failure_threshold=3)
    assert_ignored(e, lambda e: apply_window(e, window(unhealthy=2, rate=0.9), LATER))
    assert apply_window(e, window(unhealthy=3, rate=0.9), LATER) is True
    assert e.observed == "degraded" and message(e) == "unhealthy for 3 consecutive intervals (error rate 90.0%)"
    assert e.status.stable_at == EARLIER and "reason" not in e.status.details and "finished_at" not in e.status.details
    e = stable("running", failure_threshold=1)
    assert apply_window(e, window(unhealthy=1), LATER) is True
    assert message(e) == "unhealthy for 1 consecutive intervals (error rate n/a)"


def test_a_degraded_execution_recovers_after_success_threshold_healthy_intervals() -> None:
    e = stable("degraded", message="unhealthy", success_threshold=2)
    assert_ignored(e, lambda e: apply_window(e, window(healthy=1, rate=0.0), LATER))
    assert apply_window(e, window(healthy=2, rate=0.0), LATER) is True
    assert e.observed == "running" and message(e) == "healthy again" and e.status.stable_at == EARLIER
    assert "finished_at" not in e.status.details


@pytest.mark.parametrize("state", ["running", "degraded"])
def test_a_stable_execution_is_never_failed_by_its_health(state: str) -> None:
    e = stable(state, message="as it was", failure_threshold=1)
    if state == "degraded":
        assert_ignored(e, lambda e: apply_window(e, window(unhealthy=50, rate=1.0), LATER))
    else:
        assert apply_window(e, window(unhealthy=50, rate=1.0), LATER) is True
        assert e.observed == "degraded" and "reason" not in e.status.details
    assert_ignored(e, lambda e: deadline_passed(e, window(), LATER))


def test_a_healthy_running_execution_stays_as_it_is() -> None:
    e = stable("running", message="healthy for 2 consecutive intervals", success_threshold=1)
    assert_ignored(e, lambda e: apply_window(e, window(healthy=9, rate=0.0), LATER))


@pytest.mark.parametrize("state", ["pending", "starting", "lost", "stopping", *TERMINAL])
def test_windows_only_move_validating_running_and_degraded_executions(state: str) -> None:
    e = execution(state, message="as it was", success_threshold=1, failure_threshold=1)
    assert_ignored(e, lambda e: apply_window(e, window(healthy=9, rate=0.0), LATER))
    assert_ignored(e, lambda e: apply_window(e, window(unhealthy=9, rate=1.0), LATER))


@pytest.mark.parametrize("spec", ["immediate", None, job_spec("canary", gate=False)])
@pytest.mark.parametrize("state", ["validating", "running", "degraded"])
def test_windows_do_nothing_to_an_ungated_execution(state: str, spec) -> None:
    e = execution(state, message="as it was", spec=spec)
    assert_ignored(e, lambda e: apply_window(e, window(healthy=9, rate=0.0), LATER))
    assert_ignored(e, lambda e: apply_window(e, window(unhealthy=9, rate=1.0), LATER))


def feed(e: Execution, samples: list[tuple[int, int]]) -> list[tuple[str, bool]]:
    """Each interval through record_interval and apply_window: (state after it, whether it changed)."""
    w, check = new_window(e), check_of(e)
    seen = []
    for i, (total, errors) in enumerate(samples):
        assert record_interval(w, interval(i, total, errors), check) is not None
        changed = apply_window(e, w, NOW + dt.timedelta(seconds=i + 1))
        seen.append((e.observed, changed))
    return seen


def test_a_gated_execution_goes_through_validation_degradation_and_recovery() -> None:
    e = execution("validating", success_threshold=2, failure_threshold=2)
    assert feed(e, [(10, 0), (0, 0), (10, 0), (10, 0), (10, 9), (10, 9), (10, 9), (0, 0), (10, 0), (10, 0),
                    (10, 0)]) == [
        ("validating", False), ("validating", False), ("validating", False), ("running", True),
        ("running", False), ("degraded", True), ("degraded", False), ("degraded", False), ("degraded", False),
        ("running", True), ("running", False),
    ]
    assert e.status.stable_at == NOW + dt.timedelta(seconds=4)


def test_an_unhealthy_validating_execution_fails_and_stays_failed() -> None:
    e = execution("validating", success_threshold=1, failure_threshold=2)
    assert feed(e, [(10, 5), (0, 0), (10, 5), (10, 5), (10, 0)]) == [
        ("validating", False), ("validating", False), ("validating", False), ("failed", True), ("failed", False)]
    assert e.status.details["reason"] == "unhealthy" and e.status.stable_at is None


# -- the deadline ----------------------------------------------------------------------------------


def test_the_deadline_fails_a_validating_execution_from_the_instant_it_is_reached() -> None:
    e = execution("validating", message="validating health")
    w = new_window(e)
    assert_ignored(e, lambda e: deadline_passed(e, w, NOW + dt.timedelta(seconds=30) - dt.timedelta(microseconds=1)))
    before = dt.datetime.now(dt.timezone.utc)
    assert deadline_passed(e, w, NOW + dt.timedelta(seconds=30)) is True
    assert e.observed == "failed" and message(e) == "not healthy within the deadline of 30s"
    assert e.status.details["reason"] == "deadline" and e.status.stable_at is None
    assert_finished_now(e, before)
    e = execution("validating")
    assert deadline_passed(e, w, NOW + dt.timedelta(hours=1)) is True and e.observed == "failed"


@pytest.mark.parametrize(("deadline", "text"), [("90s", "90s"), ("1.5s", "1.5s"), ("2m", "120s")])
def test_the_deadline_message_gives_the_deadline_in_seconds(deadline: str, text: str) -> None:
    e = execution("validating", spec=job_spec(deadline=deadline))
    assert deadline_passed(e, new_window(e), NOW + dt.timedelta(hours=1)) is True
    assert message(e) == f"not healthy within the deadline of {text}"


def test_a_window_deadline_outlives_a_spec_that_is_gone() -> None:
    e = execution("validating", spec=None)
    assert deadline_passed(e, window(), LATER) is True
    assert e.observed == "failed" and message(e) == "not healthy within the deadline of ?"
    assert e.status.details["reason"] == "deadline"


@pytest.mark.parametrize("state", ["pending", "starting", "running", "degraded", "lost", "stopping", *TERMINAL])
def test_the_deadline_only_concerns_a_validating_execution(state: str) -> None:
    e = execution(state, message="as it was", stable_at=EARLIER if state in ("running", "degraded") else None)
    assert_ignored(e, lambda e: deadline_passed(e, window(), NOW + dt.timedelta(hours=1)))


def test_a_window_without_deadline_fails_nothing() -> None:
    e = execution("validating", message="validating health")
    assert_ignored(e, lambda e: deadline_passed(e, HealthWindow(execution_id="e1"), NOW + dt.timedelta(days=9)))


# ==================================================================================================
# Properties of interval sequences
# ==================================================================================================

SAMPLES = st.lists(st.tuples(st.integers(0, 20), st.integers(0, 25)), max_size=15)


@RULES
@given(samples=SAMPLES, order=st.lists(st.integers(-3, 2), max_size=15),
       success=st.integers(1, 4), failure=st.integers(1, 4), limit=st.sampled_from([None, 0.0, 0.1, 0.25, 1.0]))
def test_a_gated_execution_follows_the_documented_health_rules(samples, order, success: int, failure: int,
                                                               limit) -> None:
    extra = {} if limit is None else {"max_error_rate": limit}
    e = execution("validating", success_threshold=success, failure_threshold=failure, **extra)
    w, check = new_window(e), check_of(e)
    allowed = 0.10 if limit is None else limit
    # The model, straight from the docs.
    state, healthy, unhealthy, counted = "validating", 0, 0, 0
    last_end: int | None = None
    end = 0
    for i, (total, errors) in enumerate(samples):
        end = end + (order[i] if i < len(order) else 1)  # steps of 0 or below are replays
        verdict = record_interval(w, interval(end, total, errors), check)
        if last_end is not None and end <= last_end:
            assert verdict is None
        else:
            last_end, counted = end, counted + 1
            expected = "no-data" if total == 0 else "unhealthy" if min(1.0, errors / total) > allowed else "healthy"
            assert verdict == expected
            healthy = healthy + 1 if expected == "healthy" else 0
            unhealthy = unhealthy + 1 if expected == "unhealthy" else 0
        assert (w.healthy_streak, w.unhealthy_streak, w.intervals) == (healthy, unhealthy, counted)
        was, stable_at = state, e.status.stable_at
        if state == "validating" and healthy >= success:
            state = "running"
        elif state == "validating" and unhealthy >= failure:
            state = "failed"
        elif state == "running" and unhealthy >= failure:
            state = "degraded"
        elif state == "degraded" and healthy >= success:
            state = "running"
        at = NOW + dt.timedelta(seconds=i)
        assert apply_window(e, w, at) is (state != was)
        assert e.observed == state
        if was == "validating" and state == "running":
            assert e.status.stable_at == at
        elif stable_at is not None:
            assert e.status.stable_at == stable_at  # never moved once set, never failed once set
            assert state != "failed"


def test_the_agents_streak_counts_when_its_reports_arrive_out_of_order() -> None:
    # The agent reported three healthy intervals (its count: 1, 2, 3) and then, the threshold reached,
    # nothing more. They are applied 1, 3, 2: the third says three in a row, the second is older than
    # what was counted and changes nothing, and the execution becomes stable.
    e = execution("validating", success_threshold=3)
    w, check = new_window(e), check_of(e)
    first, second, third = (msgspec.structs.replace(interval(i, 10, 0), streak=i + 1) for i in range(3))
    assert record_interval(w, first, check) == "healthy" and streaks(w) == (1, 0, 1)
    assert record_interval(w, third, check) == "healthy" and streaks(w) == (3, 0, 2)
    assert record_interval(w, second, check) is None and streaks(w) == (3, 0, 2)
    assert apply_window(e, w, NOW) and e.observed == "running"


def test_the_agents_unhealthy_streak_wins_over_counting_here() -> None:
    e = execution("validating", failure_threshold=2)
    w, check = new_window(e), check_of(e)
    assert record_interval(w, msgspec.structs.replace(interval(4, 10, 9), streak=2), check) == "unhealthy"
    assert streaks(w) == (0, 2, 1)
    assert apply_window(e, w, NOW) and e.observed == "failed"
    # without a count (an older agent), the interval counts as one more
    w = new_window(e)
    w.unhealthy_streak = 1
    assert record_interval(w, interval(4, 10, 9), check) == "unhealthy" and streaks(w) == (0, 2, 1)

"""Pure rules of rollouts and health: wave sizes, the failure budget, health windows, state transitions."""

from __future__ import annotations

import datetime as dt

import pytest

from services.health.transitions import apply_report, mark_lost
from services.health.windows import HealthWindow, apply_window, deadline_passed, new_window, record_interval
from services.rollout.controller import budget_exceeded
from services.rollout.waves import canary_size, percent_of, plan_waves, wave_size
from shared.codec import convert
from shared.models import (
    Canary,
    DesiredState,
    Execution,
    ExecutionStatus,
    HealthReport,
    JobSpec,
    ObservedState,
    RolloutSpec,
    StateReport,
)

NOW = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.timezone.utc)


@pytest.mark.parametrize(
    ("nodes", "percent", "expected"),
    [(1, 10, [1]), (10, 10, [1] * 10), (10, 25, [3, 3, 3, 1]), (30, 10, [3] * 10), (7, 50, [4, 3]),
     (100, 33, [33, 33, 33, 1]), (5, 100, [5]), (3, 1, [1, 1, 1]), (10, 0, [1] * 10)],
)
def test_rolling_waves(nodes: int, percent: int, expected: list[int]) -> None:
    sizes = plan_waves(RolloutSpec(strategy="rolling", max_parallel=percent), nodes)
    assert sizes == expected and sum(sizes) == nodes


@pytest.mark.parametrize(
    ("nodes", "canary", "max_parallel", "expected"),
    [(10, Canary(canary_percent=20), 50, [2, 5, 3]), (10, Canary(canary_count=3), 50, [3, 5, 2]),
     (10, None, 100, [1, 9]), (4, Canary(canary_count=10), 25, [4]), (50, Canary(canary_percent=5), 20, [3, 10, 10, 10, 10, 7]),
     (3, Canary(canary_percent=0.5), 100, [1, 2])],
)
def test_canary_waves(nodes, canary, max_parallel, expected) -> None:
    spec = RolloutSpec(strategy="canary", canary=canary, max_parallel=max_parallel)
    assert plan_waves(spec, nodes) == expected


def test_immediate_is_one_wave_and_no_nodes_no_waves() -> None:
    assert plan_waves(RolloutSpec(strategy="immediate", max_parallel=10), 42) == [42]
    assert plan_waves(RolloutSpec(strategy="rolling"), 0) == []


def test_percent_rounding_is_exact_for_integral_percents() -> None:
    assert percent_of(10, 30) == 3  # 0.1 * 30 in floating point is 3.0000000000000004
    assert percent_of(10, 31) == 4
    assert percent_of(12.5, 8) == 1 and percent_of(12.5, 9) == 2
    assert wave_size(RolloutSpec(max_parallel=0), 100) == 10  # 0 reads as the default
    assert canary_size(RolloutSpec(strategy="canary"), 100) == 10


@pytest.mark.parametrize(
    ("failed", "targets", "max_nodes", "max_percent", "tripped"),
    [(2, 10, 2, 100.0, False), (3, 10, 2, 100.0, True), (2, 10, 100, 20.0, False), (3, 10, 100, 20.0, True),
     (1, 10, 10, 10.0, False), (2, 10, 10, 10.0, True), (0, 10, 0, 0.0, False), (1, 10, 0, 100.0, True),
     (1, 1000, 10, 0.0, True), (0, 0, 0, 0.0, False)],
)
def test_budget_trips_when_exceeded_not_when_reached(failed, targets, max_nodes, max_percent, tripped) -> None:
    assert budget_exceeded(failed, targets, max_nodes, max_percent) is tripped


def gated_execution(**health) -> Execution:
    spec = convert({"name": "x", "type": "pipeline", "config": {"simulate": {}},
                    "rollout": {"strategy": "rolling", "health_check": {"deadline": "30s", "interval": "1s", **health}}},
                   JobSpec)
    return Execution(
        id="e1", job_id="j", job_type="pipeline", job_version=1, namespace="default", node_id="n",
        status=ExecutionStatus(created_at=NOW, updated_at=NOW, revision=1,
                               desired_state=DesiredState(state_type="running"),
                               observed_state=ObservedState(state_type="validating")),
        job_spec=spec,
    )


def interval(i: int, total: int, errors: int) -> HealthReport:
    start = NOW + dt.timedelta(seconds=i)
    return HealthReport(namespace="default", job_id="j", node_id="n", execution_id="e1", interval_start=start,
                        interval_end=start + dt.timedelta(seconds=1), total=total, errors=errors, at=start)


def feed(execution: Execution, samples: list[tuple[int, int]]) -> list[str]:
    window = new_window(execution)
    check = execution.job_spec.rollout.health_check
    states = []
    for i, (total, errors) in enumerate(samples):
        record_interval(window, interval(i, total, errors), check)
        apply_window(execution, window, NOW)
        states.append(execution.observed)
    return states


def test_success_threshold_consecutive_healthy_intervals_make_it_stable() -> None:
    e = gated_execution(success_threshold=3)
    assert feed(e, [(10, 0), (10, 0), (10, 0)]) == ["validating", "validating", "running"]
    assert e.status.stable_at == NOW


def test_no_data_never_counts_as_success_and_breaks_the_streak() -> None:
    e = gated_execution(success_threshold=2)
    assert feed(e, [(10, 0), (0, 0), (10, 0), (0, 0), (0, 0)]) == ["validating"] * 5
    assert e.status.stable_at is None


def test_failure_threshold_consecutive_unhealthy_intervals_fail_it() -> None:
    e = gated_execution(failure_threshold=2)
    assert feed(e, [(10, 5), (10, 0), (10, 5), (10, 5)]) == ["validating"] * 3 + ["failed"]
    assert e.status.details["reason"] == "unhealthy"


@pytest.mark.parametrize(("rate", "errors", "state"), [(None, 1, "running"), (None, 2, "running"),
                                                       (None, 3, "failed"), (0.0, 1, "failed"), (0.0, 0, "running")])
def test_max_error_rate_unset_is_ten_percent_and_zero_means_any_error(rate, errors, state) -> None:
    extra = {} if rate is None else {"max_error_rate": rate}
    e = gated_execution(success_threshold=1, failure_threshold=1, **extra)
    # 20 units of work per interval: 2 errors = 10 % (not above 0.10), 3 = 15 %.
    assert feed(e, [(20, errors)])[-1] == state


def test_stable_execution_degrades_and_recovers_but_never_fails_by_health() -> None:
    e = gated_execution(success_threshold=1, failure_threshold=2)
    states = feed(e, [(10, 0), (10, 9), (10, 9), (10, 9), (10, 9), (10, 0)])
    assert states == ["running", "running", "degraded", "degraded", "degraded", "running"]


def test_deadline_fails_only_a_validating_execution_after_it_passed() -> None:
    e = gated_execution()
    window = new_window(e)
    assert window.deadline_at == NOW + dt.timedelta(seconds=30)
    assert not deadline_passed(e, window, NOW + dt.timedelta(seconds=29))
    assert deadline_passed(e, window, NOW + dt.timedelta(seconds=30))
    assert e.observed == "failed" and e.status.details["reason"] == "deadline"
    stable = gated_execution()
    stable.status.observed_state = ObservedState(state_type="running")
    assert not deadline_passed(stable, HealthWindow(execution_id="e1", deadline_at=NOW), NOW)


def test_replayed_interval_is_not_counted_twice() -> None:
    e = gated_execution(success_threshold=2)
    window = new_window(e)
    check = e.job_spec.rollout.health_check
    assert record_interval(window, interval(0, 10, 0), check) == "healthy"
    assert record_interval(window, interval(0, 10, 0), check) is None
    assert window.healthy_streak == 1


def state_report(state: str, **kw) -> StateReport:
    return StateReport(namespace="default", job_id="j", node_id="n", execution_id="e1", state=state, at=NOW, **kw)


def test_reports_only_move_forward() -> None:
    e = gated_execution()
    e.status.observed_state = ObservedState(state_type="pending")
    assert apply_report(e, state_report("running"), NOW) and e.observed == "validating"  # gated
    assert not apply_report(e, state_report("starting"), NOW)  # late report: ignored
    assert apply_report(e, state_report("failed", exit_code=2), NOW) and e.observed == "failed"
    assert e.status.details["exit_code"] == 2 and "finished_at" in e.status.details
    assert not apply_report(e, state_report("completed"), NOW)  # terminal is final


def test_lost_execution_resumes_where_it_was() -> None:
    e = gated_execution()
    e.status.observed_state = ObservedState(state_type="running")
    e.status.stable_at = NOW
    assert mark_lost(e, NOW, "n") and e.observed == "lost" and e.status.details["lost_from"] == "running"
    assert not mark_lost(e, NOW, "n")
    assert apply_report(e, state_report("running"), NOW) and e.observed == "running"
    assert "lost_from" not in e.status.details and "lost_at" not in e.status.details


@pytest.mark.parametrize("lost_from", ["pending", "starting"])
def test_an_execution_lost_before_it_ran_must_still_pass_validation(lost_from: str) -> None:
    e = gated_execution()
    e.status.observed_state = ObservedState(state_type=lost_from)
    assert mark_lost(e, NOW, "n") and e.observed == "lost"
    assert apply_report(e, state_report("running"), NOW)
    assert e.observed == "validating" and e.status.stable_at is None
    assert "lost_from" not in e.status.details


@pytest.mark.parametrize("lost_from", ["validating", "degraded"])
def test_a_lost_validating_or_degraded_execution_resumes_as_such(lost_from: str) -> None:
    e = gated_execution()
    e.status.observed_state = ObservedState(state_type=lost_from)
    assert mark_lost(e, NOW, "n")
    assert apply_report(e, state_report("running"), NOW) and e.observed == lost_from


def test_a_stale_report_still_brings_a_lost_execution_back() -> None:
    e = gated_execution()
    e.status.observed_state = ObservedState(state_type="running")
    e.status.stable_at = NOW
    assert mark_lost(e, NOW, "n")
    # "starting" is older than where the execution was, but the node is back: it is no longer lost.
    assert apply_report(e, state_report("starting"), NOW) and e.observed == "running"

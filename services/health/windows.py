"""Health gating of executions, interval by interval.

Agents report, per execution and per `health_check.interval`, how much work was done and how many
errors. An interval is unhealthy when errors/total > max_error_rate (0.10 when unset; an explicit 0
makes any error unhealthy), healthy otherwise, and an interval with no data is neither: it counts
toward nothing and breaks both streaks, so silence can never make an execution healthy.

- validating -> running (stable_at set) after `success_threshold` consecutive healthy intervals;
  validating -> failed after `failure_threshold` consecutive unhealthy ones, or when `deadline` passes
  (measured from the execution's creation) before it became stable.
- running -> degraded after `failure_threshold` consecutive unhealthy intervals, degraded -> running
  after `success_threshold` healthy ones. A stable execution is never failed by its health: it is
  never the cause of an automatic rollback.

The streak counters live in the health bucket (one record per gated execution, compare-and-set), so
any replica can take the next report.
"""

from __future__ import annotations

import datetime as dt

import msgspec

from shared.models import Execution, HealthCheck, HealthReport, Timestamp

from .transitions import health_gated, set_observed


class HealthWindow(msgspec.Struct, kw_only=True, omit_defaults=True):
    execution_id: str
    deadline_at: Timestamp | None = None
    healthy_streak: int = 0
    unhealthy_streak: int = 0
    intervals: int = 0
    last_interval_end: Timestamp | None = None
    last_error_rate: float | None = None


def new_window(execution: Execution) -> HealthWindow:
    check = _check(execution)
    deadline = None
    if check is not None:
        deadline = execution.status.created_at + dt.timedelta(microseconds=check.deadline // 1000)
    return HealthWindow(execution_id=execution.id, deadline_at=deadline)


def record_interval(window: HealthWindow, report: HealthReport, check: HealthCheck) -> str | None:
    """Count one interval into the streaks; None if it is a replay of an interval already counted, or
    older than one counted (applied out of order: the newer one's streak already tells of it).

    The report's own `streak` (the agent's count of consecutive intervals with its verdict) wins over
    counting here: reports can be applied out of order, and an agent does not report the healthy intervals
    that are not news, so only it knows how long the streak is."""
    if window.last_interval_end is not None and report.interval_end <= window.last_interval_end:
        return None
    window.last_interval_end = report.interval_end
    window.intervals += 1
    result, rate = check.judge(report.total, report.errors)
    window.last_error_rate = rate
    if result == "healthy":
        window.healthy_streak = report.streak or window.healthy_streak + 1
        window.unhealthy_streak = 0
    elif result == "unhealthy":
        window.unhealthy_streak = report.streak or window.unhealthy_streak + 1
        window.healthy_streak = 0
    else:
        window.healthy_streak = 0
        window.unhealthy_streak = 0
    return result


def apply_window(execution: Execution, window: HealthWindow, now: dt.datetime) -> bool:
    """Move the execution's observed state as the streaks say; True if it changed."""
    check = _check(execution)
    if check is None:
        return False
    state = execution.observed
    details = execution.status.details
    if state == "validating":
        if window.healthy_streak >= check.success_threshold:
            set_observed(execution, "running", f"healthy for {window.healthy_streak} consecutive intervals")
            execution.status.stable_at = now
            return True
        if window.unhealthy_streak >= check.failure_threshold:
            set_observed(execution, "failed", f"unhealthy for {window.unhealthy_streak} consecutive intervals"
                         f" (error rate {_pct(window.last_error_rate)}, limit {_pct(check.error_rate_limit)})")
            details["reason"] = "unhealthy"
            return True
        return False
    if state == "running" and window.unhealthy_streak >= check.failure_threshold:
        set_observed(execution, "degraded", f"unhealthy for {window.unhealthy_streak} consecutive intervals"
                     f" (error rate {_pct(window.last_error_rate)})")
        return True
    if state == "degraded" and window.healthy_streak >= check.success_threshold:
        set_observed(execution, "running", "healthy again")
        return True
    return False


def deadline_passed(execution: Execution, window: HealthWindow, now: dt.datetime) -> bool:
    """Fail a validating execution whose deadline passed before it became healthy."""
    if execution.observed != "validating" or window.deadline_at is None or now < window.deadline_at:
        return False
    check = _check(execution)
    set_observed(execution, "failed", f"not healthy within the deadline of {_seconds(check)}")
    execution.status.details["reason"] = "deadline"
    return True


def _check(execution: Execution) -> HealthCheck | None:
    if not health_gated(execution):
        return None
    assert execution.job_spec is not None
    return execution.job_spec.rollout.health_check


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f}%"


def _seconds(check: HealthCheck | None) -> str:
    return "?" if check is None else f"{check.deadline / 1e9:g}s"

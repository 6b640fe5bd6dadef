"""How an execution's observed state may change, in one place.

Reports from agents can arrive out of order (replicas of the health service take them in parallel,
agents replay after a reconnect), so a transition is accepted only if it moves forward: an execution
never leaves a terminal state, and never goes back from running to starting. "running" from an agent
means "the process is up"; whether the execution is `validating` or `running` is decided here, by the
job's rollout strategy and health gate.
"""

from __future__ import annotations

import datetime as dt

from shared.durations import parse_rfc3339, rfc3339, utcnow
from shared.models import TERMINAL_STATES, Execution, StateReport

# Order of progress; a report that would move an execution to a lower rank is stale and ignored.
_RANK = {
    "pending": 0,
    "starting": 1,
    "validating": 2,
    "running": 2,
    "degraded": 2,
    "lost": 2,
    "stopping": 3,
    "completed": 4,
    "failed": 4,
    "stopped": 4,
}


def health_gated(execution: Execution) -> bool:
    """Rolling and canary rollouts validate each execution against the health check before it is stable."""
    spec = execution.job_spec
    if spec is None:
        return False
    return spec.rollout.strategy in ("rolling", "canary") and spec.rollout.health_check is not None


def apply_report(execution: Execution, report: StateReport, now: dt.datetime) -> bool:
    """Apply an agent's state report in place; False if it changes nothing (stale or duplicate)."""
    status = execution.status
    current = status.observed_state.state_type
    wanted = report.state
    if current in TERMINAL_STATES:
        return False
    changed = False
    if current == "lost":
        # The node is back: the execution resumes where it was when the node fell silent, and the
        # report then applies as to any execution in that state (a run lost while starting still has to
        # pass validation).
        restored = str(status.details.pop("lost_from", "running"))
        status.details.pop("lost_at", None)
        current = restored if restored in _RANK and restored not in TERMINAL_STATES and restored != "lost" else "running"
        set_observed(execution, current, report.message or "node reconnected")
        changed = True
    if _RANK[wanted] < _RANK[current]:
        return changed
    if wanted == "running":
        if current in ("validating", "running", "degraded"):
            return changed
        if health_gated(execution) and status.stable_at is None:
            set_observed(execution, "validating", report.message or "validating health")
        else:
            set_observed(execution, "running", report.message)
            if status.stable_at is None:
                status.stable_at = now
        return True
    if wanted == current and report.message == status.observed_state.message:
        return changed
    set_observed(execution, wanted, report.message)
    if report.exit_code is not None:
        status.details["exit_code"] = report.exit_code
    for key, value in report.details.items():
        status.details[key] = value
    return True


def set_observed(execution: Execution, state: str, message: str = "") -> None:
    observed = execution.status.observed_state
    observed.state_type = state  # type: ignore[assignment]
    observed.message = message
    if state in TERMINAL_STATES:
        # When it ended (updated_at moves on with later bookkeeping): restart backoff counts from here.
        execution.status.details["finished_at"] = rfc3339(utcnow())


def mark_lost(execution: Execution, now: dt.datetime, node_id: str) -> bool:
    status = execution.status
    current = status.observed_state.state_type
    if current in TERMINAL_STATES or current == "lost":
        return False
    status.details["lost_from"] = current
    status.details["lost_at"] = rfc3339(now)
    set_observed(execution, "lost", f"node {node_id} stopped sending heartbeats")
    return True


def lost_since(execution: Execution) -> dt.datetime | None:
    if execution.status.observed_state.state_type != "lost":
        return None
    return parse_rfc3339(execution.status.details.get("lost_at"))

"""Which health intervals an agent reports, and the streak each report carries: pure rules.

The agent measures every `health_check.interval` of a health-gated execution (work done, errors) and
judges it as the health service would (`HealthCheck.judge`). It reports only the intervals that can
change something there, and with each the length of the streak it ends, which the health service takes
over its own count (reports are applied in parallel, so not always in order).
"""

from __future__ import annotations

from shared.models import Execution


def next_streak(previous: str, streak: int, verdict: str) -> int:
    """Consecutive intervals with `verdict`, this one included, after `streak` intervals of `previous`.
    An interval with no data counts toward nothing and breaks every streak."""
    if verdict == "no-data":
        return 0
    return streak + 1 if verdict == previous else 1


def interval_is_news(execution: Execution, verdict: str, healthy_reported: int, success_threshold: int) -> bool:
    """Whether reporting an interval with this verdict can change anything at the health service.

    `healthy_reported`: consecutive healthy intervals reported so far. A validating or degraded execution
    moves once `success_threshold` consecutive healthy intervals are counted, a stable running one needs
    only one healthy interval after trouble: once that many are reported, more healthy ones are not news
    (while the health service catches up with them, they would only add to its backlog). Anything but a
    healthy interval breaks the streak and is always news.
    """
    if verdict != "healthy":
        return True
    stable = execution.status.stable_at is not None and execution.observed == "running"
    return healthy_reported < (1 if stable else success_threshold)

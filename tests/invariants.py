"""What must hold of a job's executions once its rollout has settled, whatever faults came before.

Every targeted node runs exactly one live execution of the version the job intends, running; no node
has two executions of the job desired running; no ended execution is desired running.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from shared.models import TERMINAL_STATES, Execution


def placement_problems(executions: Iterable[Execution], version: int, nodes: Iterable[str]) -> list[str]:
    """Every way `executions` (all versions of one job) break the rules on `nodes`; [] if none."""
    problems: list[str] = []
    desired: dict[str, list[Execution]] = defaultdict(list)
    for e in executions:
        if e.desired == "running":
            desired[e.node_id].append(e)
            if e.observed in TERMINAL_STATES:
                problems.append(f"{e.node_id}: ended execution {e.id[:8]} ({e.observed}) is desired running")
    for node in sorted(nodes):
        live = [e for e in desired[node] if e.observed not in TERMINAL_STATES]
        if len(desired[node]) > 1:
            problems.append(f"{node}: {len(desired[node])} executions desired running")
        if not live:
            problems.append(f"{node}: bare")
        elif len(live) > 1 or live[0].job_version != version or live[0].observed != "running":
            problems.append(f"{node}: runs {[(e.job_version, e.observed) for e in live]}, not version {version} "
                            "running")
    return problems

"""What a dry run says: why a selector matches no node, and what changes against the current version.

Pure functions of a spec and the fleet, used by the scheduler's dry run (`DryRunPlan`). The explanation
is answered to whoever may submit in the namespace, tenants included, so it speaks of the fleet only in
counts of the selector's own terms: how many ready nodes there are, and how many carry the label a
requirement names. It never lists other nodes' label values or keys (`shoal node list`, for those who may
read the fleet, shows them).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from .durations import Duration, format_duration
from .models import JobSpec, Node, SpecChange
from .selector import Requirement, compile_selector

PLAN_NODE_IDS = 10  # target ids a dry run names (it counts them all)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _value(value: str) -> str:
    return value if value else '""'


def _requirement_text(req: Requirement) -> str:
    if req.op in ("=", "!="):
        return f"label {req.key}={_value(req.values[0])}"
    if req.op in ("exists", "!exists"):
        return f"label {req.key}"
    return f"{req.key} in ({','.join(req.values)})"


def _unmet(req: Requirement, pool: Sequence[Node], of: str) -> str:
    """One requirement that no node of `pool` (the ready nodes, `of` saying which) meets, and how many of
    them carry its label at all."""
    wants = _requirement_text(req)
    scope = f"ready node{of}"
    line = (f"no {scope} has {wants}" if req.op in ("=", "in", "exists")
            else f"every {scope} has {wants}")
    having = sum(1 for node in pool if req.key in node.labels)
    if req.op == "exists" or having == 0:
        return f"{line}; none of the {_plural(len(pool), scope)} has a {req.key} label"
    return f"{line}; {having} of the {_plural(len(pool), scope)} {'has' if having == 1 else 'have'} a {req.key} label"


def explain_no_match(spec: JobSpec, nodes: Iterable[Node]) -> list[str]:
    """Why the spec's selector matches no ready node, one line per cause: each selector requirement that
    no ready node meets, or that they meet only apart."""
    known = list(nodes)
    ready = [node for node in known if node.state.state_type == "ready"]
    if not ready:
        return [f"no node is ready ({_plural(len(known), 'node')} known, all disconnected)" if known
                else "no node has registered"]
    sel = spec.selector
    selector = compile_selector(sel.match_labels, sel.match_expressions, sel.match_ids)
    pool, of = ready, ""
    pinned = sorted(set(sel.match_ids))
    if pinned:
        by_id = {node.id: node for node in known}
        pool = [by_id[i] for i in pinned if i in by_id and by_id[i].state.state_type == "ready"]
        if not pool:
            why = [f"{i} is {'disconnected' if i in by_id else 'unknown'}" for i in pinned[:PLAN_NODE_IDS]]
            more = f" and {len(pinned) - PLAN_NODE_IDS} more" if len(pinned) > PLAN_NODE_IDS else ""
            return [f"no ready node has one of the ids of match_ids: {', '.join(why)}{more}"]
        of = " of match_ids"
    reasons = [_unmet(req, pool, of) for req in selector.requirements
               if not any(req.matches(node.labels) for node in pool)]
    if not reasons and selector.requirements:
        each = ", ".join(f"{req} ({_plural(sum(req.matches(n.labels) for n in pool), 'node')})"
                         for req in selector.requirements)
        reasons.append(f"no ready node{of} meets all of: {each}")
    return reasons


def _builtins(spec: JobSpec) -> dict[str, Any]:
    """The spec as plain data, durations as people write them ("10s")."""
    return msgspec.to_builtins(spec, enc_hook=lambda o: format_duration(o) if isinstance(o, Duration) else o)


def spec_changes(old: JobSpec, new: JobSpec) -> list[SpecChange]:
    """The fields added, removed and changed from `old` to `new`, by dotted path, sorted. Maps on both
    sides are compared key by key; a block only one side has (a health check) is one change; lists and
    other values compare whole (`config.command`). Nulls, empty strings, lists and maps count as absent
    (a description taken out is removed, not changed to "")."""
    changes: list[SpecChange] = []

    def absent(value: Any) -> bool:
        return value is None or value == {} or value == [] or value == ""

    def walk(before: Any, after: Any, path: str) -> None:
        if isinstance(before, dict) and isinstance(after, dict):
            for key in sorted(before.keys() | after.keys(), key=str):
                walk(before.get(key), after.get(key), f"{path}.{key}" if path else str(key))
        elif absent(before) and absent(after):
            return
        elif absent(before):
            changes.append(SpecChange(path=path, change="added", new=after))
        elif absent(after):
            changes.append(SpecChange(path=path, change="removed", old=before))
        elif before != after:
            changes.append(SpecChange(path=path, change="changed", old=before, new=after))

    walk(_builtins(old), _builtins(new), "")
    return changes


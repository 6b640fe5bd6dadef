"""Wave sizes of a rollout: pure arithmetic, kept apart so it can be tested for many node counts.

- immediate: one wave with every target (numbered 0: "no wave").
- rolling: waves of `max_parallel` percent of the targets, rounded up, at least one node (0 reads as 10).
- canary: a first wave of `canary_count` nodes, or `canary_percent` (default 10) of the targets rounded
  up, at least one and at most all; then rolling waves over the rest.
"""

from __future__ import annotations

import bisect

from shared.models import RolloutSpec

DEFAULT_MAX_PARALLEL = 10
DEFAULT_CANARY_PERCENT = 10.0


def percent_of(percent: float, total: int) -> int:
    """`percent` of `total`, rounded up, at least 1 (for total > 0). Exact for integral percents."""
    if total <= 0:
        return 0
    # Integer arithmetic where possible so 10% of 30 is 3, not 3.0000000000000004 rounded up to 4.
    scaled = round(percent * 1_000_000)
    return max(1, min(total, -(-scaled * total // 100_000_000)))


def wave_size(rollout: RolloutSpec, total: int) -> int:
    return percent_of(rollout.max_parallel or DEFAULT_MAX_PARALLEL, total)


def canary_size(rollout: RolloutSpec, total: int) -> int:
    canary = rollout.canary
    if canary is not None and canary.canary_count is not None:
        return max(1, min(total, canary.canary_count))
    percent = canary.canary_percent if canary is not None and canary.canary_percent is not None else DEFAULT_CANARY_PERCENT
    return percent_of(percent, total)


def plan_waves(rollout: RolloutSpec, total: int) -> list[int]:
    """Sizes of the waves for `total` target nodes; they sum to `total`."""
    if total <= 0:
        return []
    if rollout.strategy == "immediate":
        return [total]
    sizes: list[int] = []
    remaining = total
    if rollout.strategy == "canary":
        first = canary_size(rollout, total)
        sizes.append(first)
        remaining -= first
    step = wave_size(rollout, total)
    while remaining > 0:
        take = min(step, remaining)
        sizes.append(take)
        remaining -= take
    return sizes


def wave_edges(sizes: list[int]) -> list[int]:
    """The position after the end of each wave but the last (the last wave takes every position past them:
    targets appended late join it)."""
    edges, edge = [], 0
    for size in sizes[:-1]:
        edge += size
        edges.append(edge)
    return edges


def wave_at(index: int, edges: list[int]) -> int:
    """1-indexed wave of the target at position `index`, given the waves' `wave_edges` (found by bisection:
    a rollout of many small waves asks this for every target)."""
    return bisect.bisect_right(edges, index) + 1


def wave_of(index: int, sizes: list[int]) -> int:
    """1-indexed wave of the target at position `index` (0 without waves)."""
    return wave_at(index, wave_edges(sizes)) if sizes else 0


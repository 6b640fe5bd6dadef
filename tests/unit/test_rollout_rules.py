"""Pure rules of rollouts: wave sizes and the failure budget (the health rules: test_health_rules.py)."""

from __future__ import annotations

import pytest

from services.rollout.decide import budget_exceeded
from services.rollout.waves import canary_size, percent_of, plan_waves, wave_of, wave_size
from shared.models import Canary, RolloutSpec



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


def test_small_counts_and_edges() -> None:
    assert percent_of(10, 0) == 0 and percent_of(100, 0) == 0
    assert percent_of(100, 1) == 1 and percent_of(0.001, 1) == 1 and percent_of(50, 1) == 1
    assert percent_of(100, 7) == 7 and percent_of(99, 100) == 99 and percent_of(1, 100) == 1
    assert canary_size(RolloutSpec(strategy="canary", canary=Canary(canary_count=1)), 50) == 1
    assert canary_size(RolloutSpec(strategy="canary", canary=Canary(canary_count=2)), 1) == 1
    assert canary_size(RolloutSpec(strategy="canary"), 1) == 1
    assert plan_waves(RolloutSpec(strategy="rolling", max_parallel=10), 1) == [1]
    assert plan_waves(RolloutSpec(strategy="canary"), 1) == [1]
    assert plan_waves(RolloutSpec(strategy="canary", canary=Canary(canary_count=1)), 2) == [1, 1]
    assert plan_waves(RolloutSpec(strategy="immediate"), 0) == []
    assert plan_waves(RolloutSpec(strategy="canary"), -1) == []


@pytest.mark.parametrize(("index", "wave"), [(0, 1), (1, 1), (2, 2), (4, 2), (5, 3), (5_000, 3)])
def test_wave_of_a_target(index: int, wave: int) -> None:
    assert wave_of(index, [2, 3, 1]) == wave  # past the last wave: the last (nodes appended late join it)
    assert wave_of(0, []) == 0


def _matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` is one token, `>` one or more at the end."""
    wanted, tokens = pattern.split("."), subject.split(".")
    for i, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > i
        if i >= len(tokens) or token not in ("*", tokens[i]):
            return False
    return len(wanted) == len(tokens)


def test_a_partition_filter_is_one_subject_for_its_executions_jobs_and_rollouts() -> None:
    from shared import subjects as s

    mine = s.partition_filter(3)
    assert _matches(mine, f"{s.EVENTS_EXECUTION}.3.default.job-1.node-1.exec-1")
    assert _matches(mine, f"{s.EVENTS_JOB}.3.default.job-1")
    assert _matches(mine, f"{s.EVENTS_ROLLOUT}.3.default.job-1")
    assert not _matches(mine, f"{s.EVENTS_EXECUTION}.13.default.job-1.node-1.exec-1")  # another partition
    assert not _matches(mine, f"{s.EVENTS_JOB}.4.default.job-1")
    assert not _matches(mine, f"{s.EVENTS_NODE}.3")  # a node named "3": node ids have no dot
    assert not _matches(mine, f"{s.EVENTS_NODE}.node-1")

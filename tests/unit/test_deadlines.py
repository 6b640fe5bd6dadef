"""The health windows' deadlines in time order (services/health/deadlines.py), without a server."""

from __future__ import annotations

import datetime as dt

from services.health.deadlines import Deadlines

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def test_due_returns_what_has_come_earliest_first_and_keeps_it_until_it_changes() -> None:
    d = Deadlines()
    d.set("c", at(3))
    d.set("a", at(1))
    d.set("b", at(2))
    d.set("later", at(100))
    assert d.due(at(0.5)) == []
    assert d.due(at(2)) == ["a", "b"]  # a deadline equal to now has come
    assert d.due(at(2.5)) == ["a", "b"]  # not acted on: still due
    d.set("a", None)  # its window cleared its deadline (or went)
    assert d.due(at(3)) == ["b", "c"] and len(d) == 3


def test_a_changed_deadline_replaces_the_old_one() -> None:
    d = Deadlines()
    d.set("a", at(1))
    d.set("a", at(5))  # the window was made again with a later deadline
    assert d.due(at(2)) == []
    assert d.due(at(5)) == ["a"]
    d.set("a", at(9))  # a due key that changes is no longer due
    assert d.due(at(6)) == []
    d.set("a", at(9))  # the same deadline again changes nothing
    assert d.due(at(9)) == ["a"] and len(d) == 1


def test_equal_deadlines_come_in_key_order() -> None:
    d = Deadlines()
    for key in ("b", "c", "a"):
        d.set(key, at(1))
    assert d.due(at(1)) == ["a", "b", "c"]


def test_reset_starts_over_from_the_windows() -> None:
    d = Deadlines()
    d.set("gone", at(1))
    d.set("kept", at(1))
    assert d.due(at(1)) == ["gone", "kept"]
    d.reset({"kept": at(2), "new": at(1), "stable": None})
    assert len(d) == 2
    assert d.due(at(1)) == ["new"]
    assert d.due(at(2)) == ["new", "kept"]


def test_a_sweep_of_many_windows_with_nothing_due_reads_none_of_them() -> None:
    d = Deadlines()
    d.reset({f"k{i}": at(60 + i) for i in range(10_000)})
    assert d.due(at(59)) == [] and len(d._heap) == 10_000  # nothing was popped, nothing compared but the first
    assert d.due(at(61)) == ["k0", "k1"] and len(d._heap) == 9_998

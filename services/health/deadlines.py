"""The health windows' deadlines in time order, so that a sweep reads only the windows that are due.

Every replica follows the health bucket in memory (a watch); the leader's sweep, four times a second,
used to look at every window to find the few past their deadline: 100,000 comparisons a sweep with
100,000 health-gated executions running, most of them long stable. `Deadlines` keeps them in a heap
instead: a sweep costs what is due, not what is held.

A deadline that falls due stays due (returned by every `due` call) until its window changes or goes:
the sweep may not act on it at once (its node is away, or reports sent before it are still waiting).
"""

from __future__ import annotations

import datetime as dt
import heapq


class Deadlines:
    def __init__(self) -> None:
        self._heap: list[tuple[dt.datetime, str]] = []  # may hold entries since changed (checked on pop)
        self._deadline: dict[str, dt.datetime] = {}  # the current deadline of each key that has one
        self._due: set[str] = set()  # keys whose current deadline has come, in no order

    def __len__(self) -> int:
        return len(self._deadline)

    def set(self, key: str, deadline: dt.datetime | None) -> None:
        """The window of `key` now has this deadline (None: none, or the window is gone)."""
        if self._deadline.get(key) == deadline:
            return
        self._due.discard(key)
        if deadline is None:
            self._deadline.pop(key, None)
            return
        self._deadline[key] = deadline
        heapq.heappush(self._heap, (deadline, key))

    def reset(self, deadlines: dict[str, dt.datetime | None]) -> None:
        """Start over from every window's deadline (after the watch loaded the bucket again)."""
        self._deadline = {k: d for k, d in deadlines.items() if d is not None}
        self._heap = [(d, k) for k, d in self._deadline.items()]
        heapq.heapify(self._heap)
        self._due = set()

    def due(self, now: dt.datetime) -> list[str]:
        """Keys whose deadline is `now` or earlier, earliest first."""
        while self._heap and self._heap[0][0] <= now:
            deadline, key = heapq.heappop(self._heap)
            if self._deadline.get(key) == deadline:  # not an entry the window has changed since
                self._due.add(key)
        return sorted(self._due, key=lambda k: (self._deadline[k], k))

"""A fixed CPU budget per process, with the cgroup v1 cpu controller (Linux, root): as if each process ran
on its own small machine of `cores` of a core, whatever else the machine runs.

`CpuBudget.create(pid, cores)` makes the cgroup `<root>/shoal-bench-<pid>` (root /sys/fs/cgroup/cpu),
sets cpu.cfs_quota_us = cores * cpu.cfs_period_us (period 100 ms) and moves the process (all its threads)
and its live descendants into it; `budget.throttling()` reads its cpu.stat (periods run, periods the
quota ran out, time held back); `budget.remove()` moves whatever is still in it back to the root cgroup
and removes it. `Budgets` keeps one budget per live process of a set that changes (processes started
and stopped between phases). `unusable()` says why budgets cannot be made here (or None if they can).

Only directories named shoal-bench-<pid> are ever made or removed; nothing else of the hierarchy is
touched.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from procstat import children_by_parent, descendants

CPU_ROOT = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000
PREFIX = "shoal-bench-"


class CgroupError(RuntimeError):
    """A cgroup could not be made, set, joined or removed."""


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise CgroupError(f"cannot write {value!r} to {path}: {exc}") from exc


def _pids_in(group: Path) -> list[int]:
    try:
        return [int(line) for line in (group / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def unusable(root: Path = CPU_ROOT) -> str | None:
    """Why CPU budgets cannot be made under `root` (not mounted, not writable, no CFS quota), or None:
    tries to make, set and remove a probe cgroup."""
    if not (root / "cpu.cfs_quota_us").exists():
        return f"{root} is not a cgroup v1 cpu hierarchy with CFS bandwidth control (no cpu.cfs_quota_us)"
    probe = root / f"{PREFIX}probe-{os.getpid()}"
    try:
        probe.mkdir()
    except OSError as exc:
        return f"cannot make a cgroup under {root}: {exc}"
    try:
        (probe / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (probe / "cpu.cfs_quota_us").write_text(str(PERIOD_US))
    except OSError as exc:
        return f"cannot set a CPU quota under {root}: {exc}"
    finally:
        try:
            probe.rmdir()
        except OSError:
            pass
    return None


def sweep_stale(root: Path = CPU_ROOT) -> list[str]:
    """Remove the empty shoal-bench-<pid> cgroups of processes that are gone (a run killed before it
    could remove its own); returns their names."""
    removed = []
    for path in root.glob(f"{PREFIX}*"):
        pid = path.name[len(PREFIX):]
        if path.is_dir() and pid.isdigit() and not Path(f"/proc/{pid}").exists() and not _pids_in(path):
            try:
                path.rmdir()
                removed.append(path.name)
            except OSError:
                pass
    return removed


@dataclass(frozen=True)
class Throttling:
    """What a cgroup's cpu.stat says: CFS periods in which it ran, in how many its quota ran out, and how
    long its processes were held back (seconds)."""

    periods: int
    throttled: int
    held: float

    def __sub__(self, earlier: Throttling) -> Throttling:
        return Throttling(self.periods - earlier.periods, self.throttled - earlier.throttled,
                          self.held - earlier.held)

    @property
    def share(self) -> float:
        """The fraction of its periods in which the quota ran out (0 if it did not run)."""
        return self.throttled / self.periods if self.periods else 0.0


@dataclass
class CpuBudget:
    """One process's cgroup and the cores it may use."""

    pid: int
    cores: float
    path: Path

    @classmethod
    def create(cls, pid: int, cores: float, root: Path = CPU_ROOT, period_us: int = PERIOD_US) -> CpuBudget:
        """Make `<root>/shoal-bench-<pid>` with a quota of `cores` * period and move the process (with its
        threads) and its live descendants into it."""
        if cores <= 0:
            raise ValueError(f"a CPU budget must be positive, not {cores}")
        path = root / f"{PREFIX}{pid}"
        try:
            path.mkdir(exist_ok=True)
        except OSError as exc:
            raise CgroupError(f"cannot make {path}: {exc}") from exc
        budget = cls(pid, cores, path)
        try:
            _write(path / "cpu.cfs_period_us", str(period_us))
            _write(path / "cpu.cfs_quota_us", str(max(1000, round(cores * period_us))))  # the kernel's least: 1 ms
            for member in (pid, *descendants(pid, children_by_parent())):
                _write(path / "cgroup.procs", str(member))
        except CgroupError:
            budget.remove()
            raise
        return budget

    def throttling(self) -> Throttling:
        """cpu.stat of the cgroup now (zeros once it is gone)."""
        values: dict[str, int] = {}
        try:
            for line in (self.path / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                values[key] = int(value)
        except (OSError, ValueError):
            pass
        return Throttling(values.get("nr_periods", 0), values.get("nr_throttled", 0),
                          values.get("throttled_time", 0) / 1e9)

    def remove(self) -> None:
        """Move what is still in the cgroup back to the root cgroup, then remove it (gone already: fine)."""
        if not self.path.exists():
            return
        root = self.path.parent
        for member in _pids_in(self.path):
            try:
                (root / "cgroup.procs").write_text(str(member))
            except OSError:
                pass  # it exited meanwhile
        try:
            self.path.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise CgroupError(f"cannot remove {self.path}: {exc}") from exc


class Budgets:
    """One CPU budget of `cores` per live process of a set that changes: `place(pids)` gives each new pid
    its cgroup and removes the cgroups of pids no longer in the set; `close()` removes them all."""

    def __init__(self, cores: float, root: Path = CPU_ROOT) -> None:
        self.cores = cores
        self.root = root
        self.by_pid: dict[int, CpuBudget] = {}

    def place(self, pids: Iterable[int]) -> list[int]:
        """Budgets for exactly these pids; returns the pids placed just now."""
        wanted = set(pids)
        for pid in [p for p in self.by_pid if p not in wanted]:
            self.by_pid.pop(pid).remove()
        placed = []
        for pid in sorted(wanted - set(self.by_pid)):
            self.by_pid[pid] = CpuBudget.create(pid, self.cores, self.root)
            placed.append(pid)
        return placed

    def throttling(self) -> dict[int, Throttling]:
        return {pid: budget.throttling() for pid, budget in self.by_pid.items()}

    def close(self) -> list[str]:
        """Remove every cgroup made here; returns what could not be removed (one line each)."""
        problems = []
        for pid in list(self.by_pid):
            try:
                self.by_pid.pop(pid).remove()
            except CgroupError as exc:
                problems.append(str(exc))
        return problems

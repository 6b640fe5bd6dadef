"""CPU and memory of processes, from /proc (Linux): what each kind of process spent over a phase.

`Meter(kinds)` takes a function that returns, for each kind ("scheduler", "agents", "nats-server", ...),
the pids of its processes; `meter.sample()` reads utime + stime of every such process and of its live
descendants (and cutime + cstime: children it has already reaped), and the machine's busy time from
/proc/stat. `later - earlier` of two samples is a `Span`: CPU seconds per kind, the wall time, and how
busy the whole machine was (so a reader can tell when something outside the measured processes took
the cores). Nothing here needs privileges or third-party packages.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (field 3, the state, is index 0)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def own_cpu(pid: int, reaped: bool = True) -> float | None:
    """utime + stime of one process (all its threads), plus what its reaped children used; None if gone."""
    f = _stat_fields(pid)
    if f is None:
        return None
    ticks = int(f[11]) + int(f[12])  # utime, stime
    if reaped:
        ticks += int(f[13]) + int(f[14])  # cutime, cstime
    return ticks / TICKS


def children_by_parent() -> dict[int, list[int]]:
    """Every live process, grouped by its parent pid."""
    out: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        f = _stat_fields(int(entry.name))
        if f is None:
            continue
        out.setdefault(int(f[1]), []).append(int(entry.name))
    return out


def descendants(pid: int, tree: Mapping[int, list[int]]) -> list[int]:
    out: list[int] = []
    todo = list(tree.get(pid, ()))
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(tree.get(child, ()))
    return out


def tree_cpu(pid: int, tree: Mapping[int, list[int]] | None = None) -> float | None:
    """CPU seconds of a process and of all its descendants, living or reaped; None if it is gone."""
    own = own_cpu(pid)
    if own is None:
        return None
    if tree is None:
        tree = children_by_parent()
    return own + sum(own_cpu(child, reaped=True) or 0.0 for child in descendants(pid, tree))


def memory_kib(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of a process in KiB: resident now, and its peak; None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    rss = hwm = 0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    return rss, hwm


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from the first line of /proc/stat."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return total - idle, total


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


@dataclass
class Sample:
    at: float
    cpu: dict[str, dict[int, float]]  # kind -> pid -> CPU seconds so far (of the processes alive now)
    busy: int
    total: int


@dataclass
class Span:
    """What happened between two samples."""

    wall: float
    cpu: dict[str, float]  # kind -> CPU seconds spent in the span
    machine_busy: float  # cores busy on the whole machine, on average (0..CORES)
    gone: dict[str, int] = field(default_factory=dict)  # kind -> processes that ended meanwhile (CPU lost)

    def total(self, kinds: Iterable[str] | None = None) -> float:
        return sum(v for k, v in self.cpu.items() if kinds is None or k in kinds)

    def cores(self, kind: str) -> float:
        """Average cores the kind used over the span."""
        return self.cpu.get(kind, 0.0) / self.wall if self.wall > 0 else 0.0


class Meter:
    """Samples CPU per kind of process; `kinds()` says which pids make up each kind right now."""

    def __init__(self, kinds: Callable[[], Mapping[str, Iterable[int]]]) -> None:
        self.kinds = kinds

    def sample(self) -> Sample:
        groups = {kind: set(pids) for kind, pids in self.kinds().items()}
        tree = children_by_parent()
        busy, total = machine_jiffies()
        cpu: dict[str, dict[int, float]] = {}
        for kind, pids in groups.items():
            per: dict[int, float] = {}
            for pid in pids:
                # This process: its own threads only, not the children it runs (they are measured).
                seconds = own_cpu(pid, reaped=False) if pid == os.getpid() else tree_cpu(pid, tree)
                if seconds is not None:
                    per[pid] = seconds
            cpu[kind] = per
        return Sample(time.perf_counter(), cpu, busy, total)

    @staticmethod
    def span(before: Sample, after: Sample) -> Span:
        """CPU per kind between two samples: a process started meanwhile counts from zero, one that
        ended meanwhile is lost (and counted in `gone`: only a process dying in a phase does that)."""
        cpu: dict[str, float] = {}
        gone: dict[str, int] = {}
        for kind in set(before.cpu) | set(after.cpu):
            old, new = before.cpu.get(kind, {}), after.cpu.get(kind, {})
            cpu[kind] = sum(max(0.0, seconds - old.get(pid, 0.0)) for pid, seconds in new.items())
            ended = len(set(old) - set(new))
            if ended:
                gone[kind] = ended
        total = after.total - before.total
        machine = CORES * (after.busy - before.busy) / total if total > 0 else float("nan")
        return Span(after.at - before.at, cpu, machine, gone)

    def memory(self) -> dict[str, tuple[int, int, int]]:
        """kind -> (processes, sum of VmRSS, largest VmHWM) in KiB, for the processes alive now."""
        out: dict[str, tuple[int, int, int]] = {}
        for kind, pids in self.kinds().items():
            n = rss = peak = 0
            for pid in pids:
                m = memory_kib(pid)
                if m is None:
                    continue
                n += 1
                rss += m[0]
                peak = max(peak, m[1])
            out[kind] = (n, rss, peak)
        return out


def ended(pid: int) -> bool:
    """Whether a process has exited (gone, or a zombie its parent has not reaped yet)."""
    f = _stat_fields(pid)
    return f is None or f[0] in ("Z", "X")


class ExitClock:
    """Notes, from a thread, how long after `start()` each of some processes exited: which ones are slow
    to stop while something else (a blocking shutdown) waits for them all."""

    def __init__(self, pids: Mapping[int, str], poll: float = 0.05) -> None:
        self.pids = dict(pids)
        self.poll = poll
        self.exited: dict[str, float] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="exit-clock", daemon=True)

    def start(self) -> ExitClock:
        self.t0 = time.perf_counter()
        self._thread.start()
        return self

    def _run(self) -> None:
        left = dict(self.pids)
        while left and not self._done.is_set():
            for pid, name in list(left.items()):
                if ended(pid):
                    self.exited[name] = time.perf_counter() - self.t0
                    del left[pid]
            self._done.wait(self.poll)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def slowest(self, n: int = 3) -> str:
        items = sorted(self.exited.items(), key=lambda kv: -kv[1])[:n]
        return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in items)

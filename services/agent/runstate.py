"""What an execution's run dir keeps on disk, so that an agent restarted after a crash finds its work again.

An agent can die without warning (kill -9, OOM killer, a crash); the commands it started are in their
own sessions and keep running. Like Nomad's client, which restores its allocations from local state and
re-attaches to tasks still running, the agent keeps in `<work dir>/executions/<execution id>/`:

- `shoal-run.json` (`RunState`), written by the agent before the command starts: the pid of the shim
  that supervises the command (session leader, so also the process group to signal) and that process's
  start time, which tells our process from an unrelated one that got the same pid later;
- `shoal-exit.json` (`ExitStatus`), written by the shim when the command ends: the exit code or the
  signal, the one thing a process that is not our child cannot tell us through wait();
- `shoal-output.log`: the command's stdout and stderr (the agent ships it in chunks, see output.py, and
  reports its last lines with the execution's end);
- `shoal-output.pos`: how far the agent has shipped that output (rewritten with each chunk, no fsync);
- `health`: the health channel the command appends to (see executors).

Both JSON files are replaced atomically (temporary file + rename), so a reader sees a whole old or a
whole new version, never half of one. This module needs only the standard library and msgspec, because
the shim imports it too.

Retention: a finished run dir is also the command's default working directory, so it may hold what the
command produced; the agent keeps the newest `KEEP_FINISHED_RUNS` finished ones and deletes the rest
(like Nomad's `gc_max_allocs`), so the work dir does not grow without bound. It starts deleting only
once it has seen its whole assignment after a start, so nothing a previous agent left is deleted before
it was re-adopted or reported; a dir whose process is still alive is never deleted.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import Annotated, TypeVar

import msgspec

Timestamp = Annotated[dt.datetime, msgspec.Meta(tz=True)]
T = TypeVar("T")

STATE_FILE = "shoal-run.json"
EXIT_FILE = "shoal-exit.json"
OUTPUT_FILE = "shoal-output.log"
OUTPUT_POSITION_FILE = "shoal-output.pos"
HEALTH_FILE = "health"
KEEP_FINISHED_RUNS = 50

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


class RunState(msgspec.Struct, kw_only=True):
    """How to find the process of one execution again: written once, before the command starts."""

    execution_id: str
    job_id: str
    job_version: int
    pid: int  # the shim: session leader, so its pid is also the process group id
    pid_start: int  # field 22 of /proc/<pid>/stat, in clock ticks after boot
    boot_id: str = ""  # a reboot recycles pids and start times alike
    started_at: Timestamp


class ExitStatus(msgspec.Struct, kw_only=True, omit_defaults=True):
    """How the command ended, written by the shim: an exit code, or the signal that killed it."""

    exit_code: int | None = None
    signal: int | None = None
    ended_at: Timestamp

    @property
    def returncode(self) -> int:
        """As subprocess spells it: the exit code, or minus the signal."""
        if self.signal is not None:
            return -self.signal
        return self.exit_code if self.exit_code is not None else -1


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# -- files -------------------------------------------------------------------------------------------


def write_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace `path` with `data` in one step: a reader (or a restarted agent) never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_struct(path: Path, tp: type[T]) -> T | None:
    """The record in `path`, or None if there is none (or it cannot be decoded: no use to anyone)."""
    try:
        return msgspec.json.decode(path.read_bytes(), type=tp)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def write_struct(path: Path, record: object, *, durable: bool = True) -> None:
    write_atomic(path, msgspec.json.encode(record), durable=durable)


def read_tail(path: Path, size: int) -> str:
    """The last `size` bytes of a file, decoded leniently; empty if there is no file."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - size))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


# -- process identity ---------------------------------------------------------------------------------


def boot_id() -> str:
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return ""


def process_start(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks after boot) of a process, or None if there is none.

    The command name (field 2) is in parentheses and may itself contain spaces and parentheses, so the
    fields are counted from the last ")".
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()
    try:
        return fields[0].decode(), int(fields[19])  # fields 3 and 22
    except (IndexError, ValueError):
        return None


def is_running(state: RunState) -> bool:
    """True if the process `state` describes is still there: same pid, same start time, same boot, and
    not a zombie (exited, waiting to be reaped)."""
    if state.boot_id and state.boot_id != boot_id():
        return False
    found = process_start(state.pid)
    return found is not None and found[1] == state.pid_start and found[0] not in ("Z", "X", "x")


# -- retention ---------------------------------------------------------------------------------------


def finished_run_dirs_to_delete(root: Path, busy: Collection[str], keep: int = KEEP_FINISHED_RUNS) -> list[Path]:
    """Run dirs under `root` beyond the newest `keep` finished ones.

    A dir counts as finished when no local run uses it (`busy` holds those ids) and no process of it is
    still alive; newest means the most recently changed (the exit file is written last).
    """
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    finished: list[tuple[float, Path]] = []
    for entry in entries:
        if entry.name in busy or not entry.is_dir(follow_symlinks=False):
            continue
        path = Path(entry.path)
        state = read_struct(path / STATE_FILE, RunState)
        if state is not None and is_running(state):
            continue
        finished.append((max(_mtime(path / EXIT_FILE), _mtime(path)), path))
    finished.sort(reverse=True)
    return [path for _, path in finished[keep:]]


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0

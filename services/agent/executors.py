"""How an agent runs one execution, by job type.

- pipeline, query, update: `config.command` (an argv list, no shell) as a real subprocess in its own
  session, with `config.env` and `config.working_dir`, supervised by a shim (shim.py) that records how
  it ended; its stdout and stderr go to `shoal-output.log` in the run dir. Stopping sends SIGTERM to
  the process group, then SIGKILL after a grace period. The command outlives a crashed agent, and the
  agent that comes back re-adopts it (`recover_process`, from the files described in runstate.py).
- config: `config.files` written atomically (temporary file + rename) under the agent's config root.
- simulated nodes: a fake run whose behaviour comes from `config.simulate`.

What each prints is shipped by output.py: a process's `shoal-output.log`, the files a config job wrote,
a simulated run's `config.simulate.output` line.

Health channel of a real process: the agent sets SHOAL_HEALTH_FILE; the process may append lines
`ok [N]` and `error [N]` (N defaults to 1). Each health interval the agent counts the new lines; an
interval with no lines from a live process counts as one unit of work with no errors (liveness).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from shared.errors import InvalidInput
from shared.models import Execution
from shared.workloads import Simulate, command_config, files_config, simulate_config

from .output import FileSource, LinesSource, OutputSource, TextSource
from .runstate import (EXIT_FILE, HEALTH_FILE, OUTPUT_FILE, OUTPUT_POSITION_FILE, STATE_FILE, ExitStatus, RunState,
                       boot_id, is_running, process_start, read_struct, read_tail, utcnow, write_struct)

OUTPUT_TAIL = 2048
SHIM_MODULE = "services.agent.shim"
START_TIMEOUT = 30.0  # for the shim to answer: an interpreter starting on a busy edge machine
POLL_MIN, POLL_MAX = 0.02, 0.5  # seconds between looks at a process, growing while it runs


@dataclass
class Outcome:
    exit_code: int | None
    message: str
    reason: str = ""  # "exit", "timeout", "stopped", "error"
    output: str = ""

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0 and self.reason in ("", "exit")


class Run:
    """One running execution. `wait()` returns how it ended; `stop()` ends it early."""

    async def wait(self) -> Outcome:
        raise NotImplementedError

    async def stop(self, grace: float) -> None:
        raise NotImplementedError

    def health_sample(self) -> tuple[int, int]:
        """(work done, errors) since the last sample."""
        return 1, 0

    def elapsed(self) -> float:
        """Seconds since the execution started; a re-adopted run started before this agent did."""
        return 0.0

    def output(self) -> OutputSource | None:
        """Where what the execution prints comes from (see output.py); None: it prints nothing."""
        return None


class ProcessRun(Run):
    """A command under its shim (see shim.py): started by this agent, or re-adopted after a restart.

    Both are watched the same way, by polling: the shim's pid (this agent's own child is reaped with
    waitpid; an adopted one is told from a recycled pid by its recorded start time), then the exit file
    the shim leaves. Stopping sends SIGTERM to the process group, then SIGKILL after the grace.
    """

    def __init__(self, run_dir: Path, state: RunState, *, adopted: bool = False) -> None:
        self.run_dir = run_dir
        self.state = state
        self.adopted = adopted
        self.health_file = run_dir / HEALTH_FILE
        self.output_file = run_dir / OUTPUT_FILE
        # What was written while no agent watched belongs to no interval: an adopted run counts from now.
        self._offset = _end_of_last_line(self.health_file) if adopted else 0
        self._returncode: int | None = None  # the shim's own, once reaped
        self._stopped = False
        self._killed = False

    @property
    def pid(self) -> int:
        return self.state.pid

    def elapsed(self) -> float:
        return max(0.0, (utcnow() - self.state.started_at).total_seconds())

    def output(self) -> OutputSource:
        # A re-adopted process goes on from where the previous agent's shipping got to.
        return FileSource(self.run_dir, resume=self.adopted)

    def alive(self) -> bool:
        if self._returncode is not None:
            return False
        if not self.adopted:
            return self._own_child_alive()
        if is_running(self.state):
            return True
        # An adopted shim may be our child after all (an agent that is pid 1 of its container inherits
        # orphans): reap it, or it stays a zombie.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, os.WNOHANG)
        return False

    def _own_child_alive(self) -> bool:
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped elsewhere: only the start time can tell
            return is_running(self.state)
        if info is None:
            return True
        if not (self.run_dir / EXIT_FILE).exists():
            # The shim was killed and the command may have outlived it. The zombie still holds the pid,
            # so the process group cannot belong to anyone else yet.
            self._signal(signal.SIGKILL)
        _, status = os.waitpid(self.pid, 0)
        self._returncode = os.waitstatus_to_exitcode(status)
        return False

    async def _ended(self, timeout: float | None = None) -> bool:
        """Poll until the process is gone; False if `timeout` seconds pass first."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        delay = POLL_MIN
        while self.alive():
            if deadline is not None:
                left = deadline - loop.time()
                if left <= 0:
                    return False
                delay = min(delay, left)
            await asyncio.sleep(delay)
            delay = min(delay * 2, POLL_MAX)
        return True

    async def wait(self) -> Outcome:
        await self._ended()
        status = read_struct(self.run_dir / EXIT_FILE, ExitStatus)
        if status is not None:
            code: int | None = status.returncode
        elif self._killed:
            code = -signal.SIGKILL
        else:
            code = self._returncode  # the shim's own end (None if adopted: nobody can tell)
        output = read_tail(self.output_file, OUTPUT_TAIL)
        if self._stopped:
            return Outcome(code, "stopped", reason="stopped", output=output)
        if status is None and code is None:
            return Outcome(None, "ended without an exit status (its supervisor was killed)", reason="exit",
                           output=output)
        return ended(code, output)

    async def stop(self, grace: float) -> None:
        self._stopped = True
        if not self.alive():
            return
        self._signal(signal.SIGTERM)
        if await self._ended(grace):
            return
        self._killed = True
        self._signal(signal.SIGKILL)
        await self._ended()

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def health_sample(self) -> tuple[int, int]:
        try:
            with open(self.health_file, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            return 1, 0
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        ok = errors = 0
        for line in complete.decode(errors="replace").splitlines():
            word, _, count = line.strip().partition(" ")
            n = int(count) if count.strip().isdigit() else 1
            if word == "ok":
                ok += n
            elif word == "error":
                errors += n
        if ok + errors == 0:
            return 1, 0  # alive, nothing reported: liveness counts as work done
        return ok + errors, errors


def ended(code: int | None, output: str = "", suffix: str = "") -> Outcome:
    """How a command that ended by itself is reported: its exit code, or the signal that killed it."""
    if code is not None and code < 0:
        return Outcome(code, f"killed by signal {-code}{suffix}", reason="exit", output=output)
    return Outcome(code, f"exited with code {code}{suffix}", reason="exit", output=output)


def _end_of_last_line(path: Path) -> int:
    """Where the complete lines of a file end (a line being written is counted once it is whole)."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - 4096))
            chunk = fh.read()
    except OSError:
        return 0
    newline = chunk.rfind(b"\n")
    return size if newline < 0 else size - len(chunk) + newline + 1


def job_environment() -> dict[str, str]:
    """The agent's environment without its own NATS identity: a job has no business with the node's
    seed, password or credentials (they stay readable to its user on disk, but are not handed over)."""
    secret = {"SHOAL_NATS_NKEY", "SHOAL_NATS_CREDS", "SHOAL_NATS_USER", "SHOAL_NATS_PASSWORD",
              "SHOAL_NATS_TLS_KEY", "SHOAL_NATS_TLS_CERT"}
    return {k: v for k, v in os.environ.items() if k not in secret}


async def start_process(execution: Execution, work_dir: Path) -> ProcessRun:
    """Start `config.command` under a shim (see shim.py) in the execution's run dir.

    The shim's pid and start time are on disk (`shoal-run.json`) before it starts the command, so an
    agent that dies at any point leaves either a command its successor can find or no command at all.
    A command that cannot be started raises OSError, as exec would.
    """
    spec = execution.job_spec
    assert spec is not None
    cfg = command_config(spec.config)
    if not cfg.command:
        raise InvalidInput("config.command is empty", field="spec.config.command")
    run_dir = run_dir_of(execution, work_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in (STATE_FILE, EXIT_FILE, HEALTH_FILE, OUTPUT_POSITION_FILE):  # from a start that never got going
        (run_dir / stale).unlink(missing_ok=True)
    health_file = run_dir / HEALTH_FILE
    env = {**job_environment(), **cfg.env,
           "SHOAL_EXECUTION_ID": execution.id, "SHOAL_JOB_ID": execution.job_id,
           "SHOAL_JOB_VERSION": str(execution.job_version), "SHOAL_NODE_ID": execution.node_id,
           "SHOAL_HEALTH_FILE": str(health_file)}
    cwd = cfg.working_dir or str(run_dir)
    ours, theirs = socket.socketpair()
    try:
        with theirs:
            pid = _spawn_shim(run_dir, cwd, cfg.command, env, theirs.fileno())
        started = process_start(pid)
        state = RunState(execution_id=execution.id, job_id=execution.job_id, job_version=execution.job_version,
                         pid=pid, pid_start=started[1] if started else 0, boot_id=boot_id(), started_at=utcnow())
        await asyncio.to_thread(write_struct, run_dir / STATE_FILE, state)  # fsync: not on the event loop
        run = ProcessRun(run_dir, state)
        reply = await _handshake(ours)
    finally:
        ours.close()
    if reply.startswith("started"):
        return run
    await run.stop(1.0)  # it exits on its own after an error; only a hung shim needs the signals
    (run_dir / STATE_FILE).unlink(missing_ok=True)
    if reply.startswith("error "):
        raise OSError(reply[len("error "):])
    output = read_tail(run_dir / OUTPUT_FILE, 400).strip()
    raise OSError(f"the process supervisor did not start the command{': ' + output if output else ''}")


def _spawn_shim(run_dir: Path, cwd: str, command: list[str], env: dict[str, str], control: int) -> int:
    """posix_spawn, not subprocess: no Popen object (or asyncio transport) that would kill or warn
    about a process meant to outlive this agent."""
    out = os.open(run_dir / OUTPUT_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.set_inheritable(control, True)
        argv = [sys.executable, "-I", "-m", SHIM_MODULE, "--control", str(control), "--cwd", cwd, str(run_dir),
                "--", *command]
        return os.posix_spawn(sys.executable, argv, env, setsid=True, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, out, 1),
            (os.POSIX_SPAWN_DUP2, out, 2),
        ])
    finally:
        os.close(out)


async def _handshake(control: socket.socket) -> str:
    """Say "go" to the shim and read its answer: "started <pid>", "error <message>", or "" if it died."""
    loop = asyncio.get_running_loop()
    control.setblocking(False)
    data = b""

    async def answer() -> None:
        nonlocal data
        await loop.sock_sendall(control, b"go")
        while b"\n" not in data:
            chunk = await loop.sock_recv(control, 1024)
            if not chunk:
                break
            data += chunk

    try:
        await asyncio.wait_for(answer(), START_TIMEOUT)
    except (OSError, asyncio.TimeoutError):
        pass
    return data.split(b"\n", 1)[0].decode(errors="replace")


def run_dir_of(execution: Execution, work_dir: Path) -> Path:
    return work_dir / "executions" / execution.id


def recover_process(execution: Execution, work_dir: Path) -> ProcessRun | Outcome | None:
    """What a previous agent left of an execution: its process still running (re-adopted), how it ended
    while no agent was watching, or None if there is no trace of it."""
    run_dir = run_dir_of(execution, work_dir)
    state = read_struct(run_dir / STATE_FILE, RunState)
    if state is None or state.execution_id != execution.id:
        return None
    # The exit file first: once it is there the command is over, even if its shim is still on its way out.
    status = read_struct(run_dir / EXIT_FILE, ExitStatus)
    if status is None:
        run = ProcessRun(run_dir, state, adopted=True)
        if run.alive():
            return run
        status = read_struct(run_dir / EXIT_FILE, ExitStatus)  # the shim may have written it and exited just now
    if status is not None:
        return ended(status.returncode, read_tail(run_dir / OUTPUT_FILE, OUTPUT_TAIL), " while the agent was down")
    return None  # the shim was killed too (or never got to start the command)


def leftover_output(execution: Execution, work_dir: Path) -> OutputSource:
    """The output a process printed after the last chunk a previous agent shipped (it ended meanwhile)."""
    return FileSource(run_dir_of(execution, work_dir), resume=True)


class DoneRun(Run):
    """An execution that finished while starting (config files written)."""

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome

    async def wait(self) -> Outcome:
        return self.outcome

    async def stop(self, grace: float) -> None:
        return None

    def output(self) -> OutputSource | None:
        return TextSource(self.outcome.output + "\n") if self.outcome.output else None


def write_files(execution: Execution, config_root: Path) -> DoneRun:
    spec = execution.job_spec
    assert spec is not None
    cfg = files_config(spec.config)
    root = config_root.resolve()
    written = []
    for f in cfg.files:
        target = (root / f.path).resolve()
        if root not in target.parents:
            raise InvalidInput(f"config file {f.path!r} is outside the config root", field="spec.config.files")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(f.content)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, f.mode)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        written.append(str(target))
    return DoneRun(Outcome(0, f"wrote {len(written)} file(s)", reason="exit", output="\n".join(written)))


class SimulatedRun(Run):
    """A fake execution for scale tests: behaviour from config.simulate, no process.

    `started_at` is earlier than now for a run resumed after an agent restart: it then lasts only what
    is left of `duration`.
    """

    def __init__(self, behaviour: Simulate | None, node_id: str, started_at: dt.datetime | None = None) -> None:
        applies = behaviour is not None and behaviour.applies_to(node_id)
        self.b = behaviour if applies else None
        self.started_at = started_at or utcnow()
        self._stop = asyncio.Event()
        self._stopped = False

    def elapsed(self) -> float:
        return max(0.0, (utcnow() - self.started_at).total_seconds())

    def output(self) -> OutputSource | None:
        return LinesSource(self.b.output, self.elapsed) if self.b is not None and self.b.output else None

    async def wait(self) -> Outcome:
        b = self.b
        duration = None
        if b is not None:
            duration = b.duration if b.duration is not None else (0.05 if b.exit_code is not None else None)
        try:
            await asyncio.wait_for(self._stop.wait(), None if duration is None else max(0.0, duration - self.elapsed()))
        except asyncio.TimeoutError:
            code = b.exit_code if b is not None and b.exit_code is not None else 0
            return Outcome(code, f"exited with code {code}", reason="exit")
        return Outcome(None, "stopped", reason="stopped")

    async def stop(self, grace: float) -> None:
        self._stopped = True
        self._stop.set()

    def health_sample(self) -> tuple[int, int]:
        b = self.b
        if b is None:
            return 100, 0
        if b.hang:
            return 0, 0  # no data
        return 100, round(b.error_rate * 100)


def simulated(execution: Execution, started_at: dt.datetime | None = None) -> SimulatedRun:
    spec = execution.job_spec
    behaviour = simulate_config(spec.config) if spec is not None else None
    return SimulatedRun(behaviour, execution.node_id, started_at)

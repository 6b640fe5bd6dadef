"""How an agent runs one execution, by job type.

- pipeline, query, update: `config.command` (an argv list, no shell) as a real subprocess in its own
  process group, with `config.env` and `config.working_dir`. Stopping sends SIGTERM, then SIGKILL after
  a grace period.
- config: `config.files` written atomically (temporary file + rename) under the agent's config root.
- simulated nodes: a fake run whose behaviour comes from `config.simulate`.

Health channel of a real process: the agent sets SHOAL_HEALTH_FILE; the process may append lines
`ok [N]` and `error [N]` (N defaults to 1). Each health interval the agent counts the new lines; an
interval with no lines from a live process counts as one unit of work with no errors (liveness).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

from shared.errors import InvalidInput
from shared.models import Execution
from shared.workloads import Simulate, command_config, files_config, simulate_config

OUTPUT_TAIL = 2048


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


class ProcessRun(Run):
    def __init__(self, proc: asyncio.subprocess.Process, health_file: Path) -> None:
        self.proc = proc
        self.health_file = health_file
        self._offset = 0
        self._tail = bytearray()
        self._reader = asyncio.create_task(self._read_output())
        self._stopped = False

    async def _read_output(self) -> None:
        assert self.proc.stdout is not None
        while chunk := await self.proc.stdout.read(4096):
            self._tail += chunk
            del self._tail[:-OUTPUT_TAIL]

    async def wait(self) -> Outcome:
        code = await self.proc.wait()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._reader, 2)
        output = self._tail.decode(errors="replace")
        if self._stopped:
            return Outcome(code, "stopped", reason="stopped", output=output)
        if code < 0:
            return Outcome(code, f"killed by signal {-code}", reason="exit", output=output)
        return Outcome(code, f"exited with code {code}", reason="exit", output=output)

    async def stop(self, grace: float) -> None:
        self._stopped = True
        await _terminate(self.proc, grace)

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


async def _terminate(proc: asyncio.subprocess.Process, grace: float) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


async def start_process(execution: Execution, work_dir: Path) -> ProcessRun:
    spec = execution.job_spec
    assert spec is not None
    cfg = command_config(spec.config)
    if not cfg.command:
        raise InvalidInput("config.command is empty", field="spec.config.command")
    run_dir = work_dir / "executions" / execution.id
    run_dir.mkdir(parents=True, exist_ok=True)
    health_file = run_dir / "health"
    env = {**os.environ, **cfg.env,
           "SHOAL_EXECUTION_ID": execution.id, "SHOAL_JOB_ID": execution.job_id,
           "SHOAL_JOB_VERSION": str(execution.job_version), "SHOAL_NODE_ID": execution.node_id,
           "SHOAL_HEALTH_FILE": str(health_file)}
    cwd = cfg.working_dir or str(run_dir)
    proc = await asyncio.create_subprocess_exec(
        *cfg.command, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
    )
    return ProcessRun(proc, health_file)


class DoneRun(Run):
    """An execution that finished while starting (config files written)."""

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome

    async def wait(self) -> Outcome:
        return self.outcome

    async def stop(self, grace: float) -> None:
        return None


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
    """A fake execution for scale tests: behaviour from config.simulate, no process."""

    def __init__(self, behaviour: Simulate | None, node_id: str) -> None:
        applies = behaviour is not None and behaviour.applies_to(node_id)
        self.b = behaviour if applies else None
        self._stop = asyncio.Event()
        self._stopped = False

    async def wait(self) -> Outcome:
        b = self.b
        duration = None
        if b is not None:
            duration = b.duration if b.duration is not None else (0.05 if b.exit_code is not None else None)
        try:
            await asyncio.wait_for(self._stop.wait(), duration)
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


def simulated(execution: Execution) -> SimulatedRun:
    spec = execution.job_spec
    behaviour = simulate_config(spec.config) if spec is not None else None
    return SimulatedRun(behaviour, execution.node_id)

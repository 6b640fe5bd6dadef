"""`shoal dev` and the `shoal` command as a user runs them, for the end-to-end tests: one way to start the
stack, read what it prints, stop it and check that it stopped cleanly."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

SHOAL = str(Path(sys.executable).parent / "shoal")
# Production timings made quick: a node missed for 3 s is disconnected, restarts back off from 0.2 s.
FAST_ENV = {
    "SHOAL_HEARTBEAT_INTERVAL": "0.5",
    "SHOAL_NODE_TIMEOUT": "3",
    "SHOAL_SWEEP_INTERVAL": "0.25",
    "SHOAL_RESTART_BACKOFF_BASE": "0.2",
}
T = TypeVar("T")


def until(fn: Callable[[], T], timeout: float = 60, interval: float = 0.3) -> T:
    """Call `fn` until it returns something true, and return that; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"not true within {timeout}s; last: {last!r}")


def shoal(*args: str, env: Mapping[str, str], check: bool = True, timeout: float = 60,
          stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `shoal ARGS` with `env` added to the environment (and the fast timings)."""
    full = {**os.environ, **FAST_ENV, **env}
    full.pop("SHOAL_NAMESPACE", None)
    result = subprocess.run([SHOAL, *args], env=full, capture_output=True, text=True, timeout=timeout, input=stdin)
    if check and result.returncode != 0:
        raise AssertionError(f"shoal {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


class Dev:
    """A running `shoal dev`: what it printed, matched against the patterns it was started with."""

    def __init__(self, proc: subprocess.Popen[str], data_dir: Path) -> None:
        self.proc = proc
        self.data_dir = data_dir
        self.lines: list[str] = []
        self.found: dict[str, str] = {}

    @property
    def url(self) -> str:
        return self.found["url"]


@contextlib.contextmanager
def running_dev(data_dir: Path, *args: str, wait_for: Mapping[str, str] | None = None,
                timeout: float = 120, clean_exit: bool = True) -> Iterator[Dev]:
    """`shoal dev --data-dir DATA_DIR ARGS`, until it has printed a match of every pattern of `wait_for`
    (name -> regular expression with one group; by default the NATS URL it exports, as `url`), then
    stopped with Ctrl-C; with `clean_exit`, it must exit 0."""
    patterns = {"url": r"export SHOAL_NATS_URL=(\S+)", **(wait_for or {})}
    env = {**os.environ, **FAST_ENV}
    for name in ("SHOAL_NATS_URL", "SHOAL_NATS_NKEY", "SHOAL_METRICS_PORT"):
        env.pop(name, None)
    proc = subprocess.Popen([SHOAL, "dev", "--data-dir", str(data_dir), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    dev = Dev(proc, data_dir)
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(dev.found) < len(patterns):
        line = proc.stdout.readline()
        if not line:
            break
        dev.lines.append(line)
        for name, pattern in patterns.items():
            if name not in dev.found and (match := re.search(pattern, line)):
                dev.found[name] = match.group(1)
    if len(dev.found) < len(patterns):
        proc.kill()
        proc.wait()
        dev.lines.append(proc.stdout.read())
        proc.stdout.close()
        missing = sorted(set(patterns) - set(dev.found))
        raise AssertionError(f"shoal dev did not print {missing}:\n" + "".join(dev.lines))
    try:
        yield dev
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        finally:
            rest = proc.stdout.read()
            proc.stdout.close()
        if clean_exit:
            assert code == 0, "".join(dev.lines) + rest

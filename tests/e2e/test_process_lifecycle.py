"""A shoal process is serving or gone: it waits for NATS at start, and exits non-zero when its
connection is closed for good, so that a supervisor can restart it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from services.cli.stack import shoal_command
from shared import subjects as s
from shared.errors import ShoalError
from shared.natsserver import binary, free_port
from shared.transport import Bus

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


class Server:
    """nats-server from a config file we write, so that a test can change it and reload or restart."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def write(self, *, jetstream: bool = True, extra: str = "") -> None:
        lines = [f"listen: 127.0.0.1:{self.port}"]
        if jetstream:
            lines.append(f"jetstream {{ store_dir: {json.dumps(str(self.root / 'js'))} }}")
        (self.root / "nats.conf").write_text("\n".join(lines) + "\n" + extra)

    def start(self) -> None:
        with open(self.root / "nats.log", "ab") as log:
            self.proc = subprocess.Popen([binary(), "-c", str(self.root / "nats.conf")], stdout=log,
                                         stderr=subprocess.STDOUT)
        time.sleep(0.5)

    def reload(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def serve(url: str, service: str, tmp: Path) -> subprocess.Popen[bytes]:
    args = ["serve", service] + (["--db", str(tmp / "view.db")] if service == "query" else [])
    with open(tmp / f"{service}.log", "ab") as log:
        return subprocess.Popen(shoal_command(*args), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "SHOAL_NATS_URL": url})


def reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


async def answers(url: str, service: str) -> bool:
    try:
        bus = await Bus.connect(url, name="probe", wait=1)
    except ShoalError:
        return False
    try:
        await bus.request(s.service_ping(service), b"", timeout=1)
        return True
    except ShoalError:
        return False
    finally:
        await bus.close()


async def until(check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s")
        await asyncio.sleep(0.3)


def test_a_process_whose_connection_is_closed_for_good_exits_non_zero(tmp_path) -> None:
    """Credentials revoked on a config reload: the server refuses the connection with -ERR and the client
    library gives up on it. The process must not live on deaf."""
    server = Server(tmp_path / "nats")
    server.write()
    server.start()
    proc = serve(server.url, "query", tmp_path)
    try:
        asyncio.run(until(lambda: answers(server.url, s.SERVICE_QUERY), 30))
        server.write(extra="authorization { user: someone, password: else }\n")
        server.reload()
        assert proc.wait(timeout=20) == 1
        assert "closed" in (tmp_path / "query.log").read_text()
    finally:
        reap(proc)
        server.stop()


def test_a_process_started_before_jetstream_is_ready_waits_and_then_serves(tmp_path) -> None:
    server = Server(tmp_path / "nats")
    server.write(jetstream=False)  # NATS answers, JetStream does not (yet)
    server.start()
    proc = serve(server.url, "scheduler", tmp_path)
    try:
        time.sleep(4)
        assert proc.poll() is None, (tmp_path / "scheduler.log").read_text()
        server.stop()
        time.sleep(2)  # and now not even NATS
        assert proc.poll() is None
        server.write(jetstream=True)
        server.start()
        asyncio.run(until(lambda: answers(server.url, s.SERVICE_SCHEDULER), 40))
        assert "could not start" in (tmp_path / "scheduler.log").read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        reap(proc)
        server.stop()


def test_ping_asks_exactly_the_instances_a_process_serves(tmp_path) -> None:
    """A readiness probe: `shoal ping --ready-file` answers for this process, not for any replica."""
    server = Server(tmp_path / "nats")
    server.write()
    server.start()
    ready = tmp_path / "ready.json"
    args = ["serve", "scheduler", "--ready-file", str(ready)]
    env = {**os.environ, "SHOAL_NATS_URL": server.url}
    with open(tmp_path / "scheduler.log", "ab") as log:
        proc = subprocess.Popen(shoal_command(*args), stdout=log, stderr=subprocess.STDOUT, env=env)
    other = serve(server.url, "scheduler", tmp_path)  # another replica, which keeps answering
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        written = json.loads(ready.read_text())
        assert written["service"] == s.SERVICE_SCHEDULER and len(written["ids"]) == 1

        def ping() -> int:
            return subprocess.run(shoal_command("ping", "--ready-file", str(ready)), env=env,
                                  capture_output=True).returncode

        assert ping() == 0
        proc.kill()
        proc.wait()
        asyncio.run(until(lambda: answers(server.url, s.SERVICE_SCHEDULER), 10))  # the other one answers
        assert ping() == 1  # but not for this process
    finally:
        reap(proc)
        reap(other)
        server.stop()

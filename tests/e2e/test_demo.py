"""`shoal demo` as the README promises it, and `shoal dev --simulate` beside real agents."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.cli.client import Client
from services.cli.stack import Stack
from shared.api import ListNodesRequest
from shared.transport import Bus

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]


def test_demo_exits_zero_within_a_minute() -> None:
    started = time.monotonic()
    result = subprocess.run([str(Path(sys.executable).parent / "shoal"), "demo"], cwd=REPO, capture_output=True,
                            text=True, timeout=90)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert elapsed < 60, f"demo took {elapsed:.0f}s"
    out = result.stdout
    for name in ("pipeline-logs", "query-uptime", "config-push", "update-agent-firmware"):
        assert f"job {name} version 1" in out
    assert "rollout succeeded" in out and "more results: shoal job executions" in out
    assert "Traceback" not in result.stderr


def test_dev_stack_runs_a_simulated_fleet_beside_real_agents(tmp_path) -> None:
    stack = Stack(tmp_path, nodes=1, simulate=40, env={"SHOAL_HEARTBEAT_INTERVAL": "0.5"}).start()

    async def nodes() -> list:
        bus = await Bus.connect(stack.nats_url, name="e2e", wait=10)
        try:
            client = Client(bus)
            await client.wait_ready(41)
            _, page = await client.list_nodes(ListNodesRequest(limit=1000))
            return page.items
        finally:
            await bus.close()

    try:
        items = asyncio.run(nodes())
    finally:
        stack.stop()
    simulated = [n for n in items if n.simulated]
    assert len(items) == 41 and len(simulated) == 40
    assert {n.labels["zone"] for n in simulated} == {"zone-0", "zone-1", "zone-2"}
    assert [n.id for n in items if not n.simulated] == ["node-1"]

"""Real processes under faults, and one trace across all of them."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid

import pytest

from services.cli.client import Client
from services.cli.stack import Stack
from shared import subjects as s
from shared.store import Store
from shared.transport import Bus

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

FAST_ENV = {
    "SHOAL_HEARTBEAT_INTERVAL": "0.5",
    "SHOAL_NODE_TIMEOUT": "3",
    "SHOAL_SWEEP_INTERVAL": "0.25",
    "SHOAL_RESTART_BACKOFF_BASE": "0.2",
}


@pytest.fixture
def stack(tmp_path):
    env = {**FAST_ENV, "SHOAL_TRACES_EXPORTER": "file", "SHOAL_TRACES_FILE": str(tmp_path / "traces.jsonl")}
    st = Stack(tmp_path / "stack", nodes=3, env=env).start()
    try:
        yield st
    finally:
        st.stop()


async def connect(stack: Stack) -> tuple[Bus, Client]:
    bus = await Bus.connect(stack.nats_url, name="e2e", wait=10)
    client = Client(bus, timeout=10)
    await client.wait_ready(3)
    return bus, client


async def eventually(check, timeout: float = 60.0):
    deadline = asyncio.get_running_loop().time() + timeout
    last = None
    while asyncio.get_running_loop().time() < deadline:
        try:
            last = await check()
        except Exception as exc:  # a replica restarting answers 503 for a moment
            last = exc
        else:
            if last:
                return last
        await asyncio.sleep(0.3)
    raise AssertionError(f"not true within {timeout}s; last: {last!r}")


def query_job(name: str) -> dict:
    return {"name": name, "type": "query", "config": {"command": ["sh", "-c", "echo hello from $SHOAL_NODE_ID"]}}


def test_killing_and_restarting_the_query_service_loses_and_duplicates_nothing(stack) -> None:
    async def scenario() -> None:
        bus, client = await connect(stack)
        try:
            for i in range(3):
                assert (await client.submit(query_job(f"before-{i}"))).accepted
            await eventually(lambda: _completed(client, [f"before-{i}" for i in range(3)]))
            stack.kill("query", signal.SIGKILL)
            # Work goes on while the view is down: these executions are only in the stream for now.
            for i in range(3):
                assert (await client.submit(query_job(f"during-{i}"))).accepted
            store = Store(bus)

            async def done_in_kv() -> bool:
                for i in range(3):
                    rec = await store.job_id_by_name("default", f"during-{i}")
                    if rec is None:
                        return False
                    job = await store.jobs.get(s.job_key("default", rec))
                    if job is None or job.value.state.state_type != "completed":
                        return False
                return True

            await eventually(done_in_kv)
            stack.start_service("query")
            names = [f"before-{i}" for i in range(3)] + [f"during-{i}" for i in range(3)]
            await eventually(lambda: _completed(client, names))
            everything = await client.all_executions("")
            ids = [e.id for e in everything]
            assert len(ids) == len(set(ids)) == 6 * 3
            truth = [e.id for e in await store.all_executions()]
            assert sorted(ids) == sorted(truth)
        finally:
            await bus.close()

    asyncio.run(scenario())


async def _completed(client: Client, names: list[str]) -> bool:
    for name in names:
        try:
            _, job = await client.get_job(name)
        except Exception:
            return False
        if job.state.state_type != "completed":
            return False
    return True


def test_one_trace_follows_a_job_from_submission_to_its_last_state(stack, tmp_path) -> None:
    from shared import telemetry

    telemetry.setup("e2e-submitter", "file", str(tmp_path / "traces.jsonl"))

    async def scenario() -> tuple[str, dict]:
        bus, client = await connect(stack)
        try:
            with telemetry.span("submit traced job", kind=telemetry.PRODUCER) as root:
                trace_id = format(root.get_span_context().trace_id, "032x")
                assert (await client.submit(query_job("traced"), submission_id=str(uuid.uuid4()))).accepted
            await eventually(lambda: _completed(client, ["traced"]))
            items = await client.all_executions("traced")
            store = Store(bus)
            finals = {e.id: await store.executions.get(e.key) for e in items}
            return trace_id, {k: (v.value.observed, v.headers) for k, v in finals.items()}
        finally:
            await bus.close()

    trace_id, finals = asyncio.run(scenario())
    assert len(finals) == 3
    for observed, headers in finals.values():
        # The write that recorded the execution's last state carries the submission's trace.
        assert observed == "completed"
        assert telemetry.trace_id_of(headers) == trace_id
    stack.stop()  # flush every process's spans
    spans = [json.loads(line) for line in (tmp_path / "traces.jsonl").read_text().splitlines()]
    in_trace = [sp for sp in spans if sp["trace_id"] == trace_id]
    services = {sp["service"] for sp in in_trace}
    assert {"e2e-submitter", "shoal-scheduler", "shoal-rollout", "shoal-agent", "shoal-health"} <= services
    names = {sp["name"] for sp in in_trace}
    assert "agent assignment" in names
    assert any(n.startswith("process shoal.report.") for n in names)
    assert any(n.startswith("process shoal.submit.") for n in names)

"""`shoal demo`: a local stack, the examples submitted on the bus, their progress, a page of executions."""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from shared.api import ListJobExecutionsRequest, ListJobsRequest, ListNodesRequest
from shared.errors import InvalidInput, ShoalError
from shared.models import SubmissionOutcome
from shared.settings import Settings
from shared.transport import Bus

from .client import Client, load_spec
from .commands import render_status
from .output import table, when
from .stack import Stack

NODES = 3
# Fast clocks so the whole tour takes seconds, not minutes.
DEMO_ENV = {
    "SHOAL_HEARTBEAT_INTERVAL": "1",
    "SHOAL_NODE_TIMEOUT": "5",
    "SHOAL_SWEEP_INTERVAL": "0.5",
    "SHOAL_RESTART_BACKOFF_BASE": "0.5",
    "SHOAL_LOG_LEVEL": "WARNING",
}
SETTLED = frozenset({"running", "completed", "failed", "rollout_failed", "stopped", "degraded"})
PROGRESS_LIMIT = 45.0


def demo(args: argparse.Namespace, settings: Settings) -> int:
    examples = sorted(Path(args.examples).glob("*.yaml"))
    if not examples:
        raise InvalidInput(f"no example job specs (*.yaml) in {args.examples!r}; run from the repository root "
                           "or pass --examples", field="examples")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="shoal-demo-") as tmp:
        stack = Stack(Path(args.data_dir or tmp), nodes=NODES, env=DEMO_ENV)
        print(f"starting nats-server, 4 services and {NODES} agents ...", flush=True)
        stack.start()
        try:
            code = asyncio.run(_tour(stack, examples))
        finally:
            stack.stop()
    print(f"demo finished in {time.monotonic() - started:.1f}s")
    return code


async def _tour(stack: Stack, examples: list[Path]) -> int:
    bus = await Bus.connect(stack.nats_url, name="shoal-demo", wait=10)
    client = Client(bus)
    try:
        await client.wait_ready(NODES)
        _, nodes = await client.list_nodes(ListNodesRequest())
        print(table(("NODE", "STATE", "LABELS"), [(n.id, n.state.state_type, ",".join(
            f"{k}={v}" for k, v in sorted(n.labels.items()))) for n in nodes.items]))
        print()
        names = []
        for path in examples:
            spec = load_spec(str(path))
            outcome = await client.submit(spec)
            if not isinstance(outcome, SubmissionOutcome) or not outcome.accepted:
                print(f"{path.name}: not accepted: {outcome}")
                return 1
            names.append(spec.name)
            print(f"submitted {path.name}: job {spec.name} version {outcome.job_version} ({spec.type}, "
                  f"{spec.rollout.strategy} rollout)")
        print("\nprogress:", flush=True)
        settled = await _progress(client, names)
        print()
        for name in names:
            try:
                _, status = await client.rollout("rollouts.status", name)
            except ShoalError:
                continue
            if status.strategy != "immediate":
                print(render_status(status))
                print()
        counts = {name: len(await client.all_executions(name)) for name in names}
        busiest = max(names, key=lambda n: counts[n])
        _, page = await client.list_executions(ListJobExecutionsRequest(job=busiest, limit=2))
        print(f"executions of {busiest} (first page of 2, of {counts[busiest]}):")
        print(table(("ID", "NODE", "VERSION", "WAVE", "OBSERVED", "CREATED"),
                    [(e.id, e.node_id, e.job_version, e.rollout_wave, e.observed, when(e.status.created_at))
                     for e in page.items]))
        if page.next_token:
            print(f"\nmore results: shoal job executions {busiest} --limit 2 --next-token {page.next_token}")
        for name in names:
            await client.stop_job(name, "demo finished")
        if not settled:
            print("\nsome jobs did not settle in time; see the logs above")
            return 1
        return 0
    finally:
        await bus.close()


async def _progress(client: Client, names: list[str]) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PROGRESS_LIMIT
    last: dict[str, str] = {}
    while loop.time() < deadline:
        _, page = await client.list_jobs(ListJobsRequest(limit=100))
        states = {j.name: j for j in page.items if j.name in names}
        for name in names:
            job = states.get(name)
            line = f"{job.state.state_type}: {job.state.message}" if job else "pending"
            if last.get(name) != line:
                print(f"  {name:<24} {line}", flush=True)
                last[name] = line
        if len(states) == len(names) and all(j.state.state_type in SETTLED for j in states.values()):
            return all(j.state.state_type in ("running", "completed") for j in states.values())
        await asyncio.sleep(0.5)
    return False

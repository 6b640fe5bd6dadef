"""What a fault costs: the time to hand over and to recover, measured on a deployment of real processes.

- hand-over: a replica takes a message and dies (no ack); how long until another replica handles it;
- a killed service process: from SIGKILL until its restarted process answers (supervised as `shoal dev`
  does: restarted after 0.5 s);
- a killed nats-server: from SIGKILL (restarted after 0.5 s on its port and store) until every service
  answers again and a new job has been accepted and placed;
- a killed query replica: from its restart until its view has caught up with 5,000 events written while
  it was down.

    .venv/bin/python bench/faults.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from services.cli.client import Client  # noqa: E402
from services.cli.stack import Stack  # noqa: E402
from shared import subjects as s  # noqa: E402
from shared.errors import ShoalError  # noqa: E402
from shared.store import Store  # noqa: E402
from shared.transport import Bus, Consumer, ConsumerSpec, Delivery, StreamSpec  # noqa: E402
from tests.chaos import _instances  # noqa: E402
from tests.integration.test_query import make_execution, make_job, put_job  # noqa: E402

ENV = {"SHOAL_HEARTBEAT_INTERVAL": "1", "SHOAL_NODE_TIMEOUT": "5", "SHOAL_SWEEP_INTERVAL": "0.25"}


async def handover(url: str) -> float:
    bus = await Bus.connect(url, name="bench")
    work = StreamSpec(name="BENCH_WORK", subjects=("bench.work.*",), retention="workqueue")
    await bus.delete_stream(work.name)
    await bus.ensure_stream(work)
    taken = asyncio.Event()
    done = asyncio.Event()

    async def hang(d: Delivery) -> None:
        taken.set()
        await asyncio.Event().wait()

    async def finish(d: Delivery) -> None:
        done.set()

    dying = await Bus.connect(url, name="dying")
    await Consumer(dying, ConsumerSpec(stream=work.name, durable="w")).start_single(hang)
    await bus.js_publish("bench.work.x", b"job")
    await taken.wait()
    await dying.nc.close()  # the replica dies: no ack, no nak
    died = time.monotonic()
    await Consumer(bus, ConsumerSpec(stream=work.name, durable="w")).start_single(finish)
    await done.wait()
    took = time.monotonic() - died
    await bus.close()
    return took


async def wait_until(check, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if await check():
                return
        except (ShoalError, asyncio.TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("not recovered in time")
        await asyncio.sleep(0.05)


async def supervised_until(stack: Stack, check) -> float:
    """Kill already done: supervise (restart after the backoff) until `check` holds; seconds taken."""
    began = time.monotonic()

    async def ok() -> bool:
        stack.supervise_once()
        return await check()

    await wait_until(ok)
    return time.monotonic() - began


async def service_restart(stack: Stack, bus: Bus, name: str) -> float:
    before = await _instances(bus, f"shoal-{name}")
    stack.kill(name, signal.SIGKILL)

    async def back() -> bool:
        now = await _instances(bus, f"shoal-{name}", wait=0.2)
        return bool(now) and not (now & before)

    return await supervised_until(stack, back)


async def nats_restart(stack: Stack, url: str, round_: int) -> float:
    stack.kill("nats", signal.SIGKILL)
    bus: list[Bus] = []

    async def serving() -> bool:
        if not bus:
            bus.append(await Bus.connect(url, name="bench", wait=0.5))
        client = Client(bus[0], timeout=2)
        for name in s.SERVICES:
            await bus[0].request(s.service_ping(name), b"", timeout=1)
        outcome = await client.submit({"name": f"after-restart-{round_}", "type": "pipeline",
                                       "config": {"simulate": {}}}, wait=2)
        return not isinstance(outcome, str) and outcome.accepted

    took = await supervised_until(stack, serving)
    await bus[0].close()
    return took


async def query_catch_up(stack: Stack, bus: Bus, events: int, round_: int) -> float:
    store = Store(bus)
    client = Client(bus, timeout=5)
    job = make_job("default", f"catch-up-{round_}")
    await put_job(store, job)
    stack.kill("query", signal.SIGKILL)
    for i in range(0, events, 500):
        batch = [make_execution(job, f"n{j}") for j in range(i, min(events, i + 500))]
        await asyncio.gather(*(store.executions.put(e.key, e) for e in batch))
    began = time.monotonic()

    async def caught_up() -> bool:
        stack.supervise_once()
        total = 0
        token = ""
        while True:
            from shared.api import ListJobExecutionsRequest

            _, page = await client.list_executions(ListJobExecutionsRequest(job=job.name, limit=1000,
                                                                            next_token=token))
            total += len(page.items)
            if not (token := page.next_token):
                return total == events

    await wait_until(caught_up)
    return time.monotonic() - began


async def main_async(repeat: int) -> None:
    rows: dict[str, list[float]] = {"hand-over of a dead replica's message": [],
                                    "killed scheduler process answers again": [],
                                    "killed rollout process answers again": [],
                                    "killed nats-server: every service answers and a job is accepted": [],
                                    "killed query replica catches up 5,000 events": []}
    with tempfile.TemporaryDirectory(prefix="shoal-faults-") as tmp:
        stack = Stack(Path(tmp), nodes=0, simulate=20, env=ENV, backoff_base=0.5, backoff_max=0.5).start()
        try:
            bus = await Bus.connect(stack.nats_url, name="bench", wait=30)
            await Client(bus).wait_ready(20, timeout=60)
            for i in range(repeat):
                print(f"round {i + 1} of {repeat}", file=sys.stderr)
                rows["hand-over of a dead replica's message"].append(await handover(stack.nats_url))
                rows["killed scheduler process answers again"].append(await service_restart(stack, bus, "scheduler"))
                rows["killed rollout process answers again"].append(await service_restart(stack, bus, "rollout"))
                await bus.close()
                rows["killed nats-server: every service answers and a job is accepted"].append(
                    await nats_restart(stack, stack.nats_url, i))
                bus = await Bus.connect(stack.nats_url, name="bench", wait=30)
                rows["killed query replica catches up 5,000 events"].append(
                    await query_catch_up(stack, bus, 5000, i))
            await bus.close()
        finally:
            stack.stop()
    print("| fault | median | min | max |")
    print("| --- | ---: | ---: | ---: |")
    for name, values in rows.items():
        print(f"| {name} | {statistics.median(values):.1f} s | {min(values):.1f} s | {max(values):.1f} s |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main_async(args.repeat))
    return 0


if __name__ == "__main__":
    sys.exit(main())

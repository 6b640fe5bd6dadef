"""What the NATS client costs a service per message (single process, a real nats-server): nats-py's own
calls against the transport's (shared/transport/_pull.py, _requests.py), which every service uses.

- Reading: a stream of `--messages` messages of 700 bytes (an execution record's size) read through a
  durable pull consumer with explicit acks, `--batch` at a time, each acked: `PullSubscription.fetch`
  against `Pull.fetch`.
- Writing: the same number of 700-byte JetStream publishes, each awaiting its ack, 256 at a time
  (`asyncio.gather`): `JetStreamContext.publish` against `Bus.js_publish` (which also injects the trace
  context and checks the size).
- Reading a key: `get_last_msg(direct=True)` against `Kv.get`, 256 at a time.
- Scanning a bucket of `--messages` keys (batched direct gets, 1,000 replies a request): the replies taken
  with nats-py's `next_msg` one by one (how `Kv.scan` read them before) against `Kv.scan`.

Each pair runs `--rounds` times alternately. CPU per message is this process's CPU time (the client's
side only; the server's work is the same for both); ratios are of medians measured in the same run.

    .venv/bin/python bench/client.py [--messages 20000] [--batch 256] [--rounds 3]
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from common import Result, finish, parse_args, say

from shared.natsserver import NatsServer
from shared.transport import BucketSpec, Bus, Kv, Pull, StreamSpec

STREAM = "BENCH_FETCH"
BUCKET = "bench_client"
SCANNED = "bench_scanned"


async def read_all(bus: Bus, how: str, messages: int, batch: int) -> tuple[float, float, int]:
    """CPU and wall seconds to read and ack every message of the stream through a new durable."""
    from nats.js import api

    durable = f"{how.replace('.', '-')}-{time.monotonic_ns()}"
    await bus.js.add_consumer(STREAM, api.ConsumerConfig(durable_name=durable, ack_policy=api.AckPolicy.EXPLICIT,
                                                         max_ack_pending=batch * 4))
    if how == "nats-py":
        psub = await bus.js.pull_subscribe_bind(durable=durable, stream=STREAM)

        async def fetch() -> list:
            try:
                return await psub.fetch(batch, timeout=0.5)
            except Exception:
                return []
    else:
        pull = Pull(bus, STREAM, durable)

        async def fetch() -> list:
            return await pull.fetch(batch, 0.5)

    got = fetches = 0
    c0, t0 = time.process_time(), time.perf_counter()
    while got < messages:
        msgs = await fetch()
        fetches += 1
        for msg in msgs:
            await msg.ack()
        got += len(msgs)
    return time.process_time() - c0, time.perf_counter() - t0, fetches


async def all_at_256(call, messages: int) -> tuple[float, float, int]:
    """CPU and wall seconds to make `messages` calls `call(i)`, 256 awaited together at a time."""
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(0, messages, 256):
        await asyncio.gather(*(call(j) for j in range(i, min(messages, i + 256))))
    return time.process_time() - c0, time.perf_counter() - t0, -(-messages // 256)


async def write_all(bus: Bus, how: str, messages: int) -> tuple[float, float, int]:
    """Publish `messages` messages, each awaiting its ack."""
    body = b"x" * 700
    if how == "nats-py":
        return await all_at_256(lambda i: bus.js.publish(f"bench.write.{i % 1000}", body), messages)
    return await all_at_256(lambda i: bus.js_publish(f"bench.write.{i % 1000}", body), messages)


async def get_all(bus: Bus, how: str, messages: int) -> tuple[float, float, int]:
    """Read `messages` keys (1,000 distinct)."""
    kv = Kv(bus, BUCKET)
    if how == "nats-py":
        return await all_at_256(lambda i: bus.js.get_last_msg(kv.stream, kv.subject(f"k{i % 1000}"), direct=True),
                                messages)
    return await all_at_256(lambda i: kv.get(f"k{i % 1000}"), messages)


async def scan_all(bus: Bus, how: str, messages: int) -> tuple[float, float, int]:
    """CPU and wall seconds to scan the bucket of `messages` keys."""
    import json

    kv = Kv(bus, SCANNED)
    c0, t0 = time.process_time(), time.perf_counter()
    if how == "nats-py":
        sub = await bus.nc.subscribe(inbox := bus.nc.new_inbox())
        seq, found = 0, 0
        while True:
            request = json.dumps({"seq": seq, "next_by_subj": kv.subject(">"), "batch": 1000}).encode()
            await bus.nc.publish(f"$JS.API.DIRECT.GET.{kv.stream}", request, reply=inbox)
            pending = 0
            while True:
                msg = await sub.next_msg(timeout=5.0)
                headers = dict(msg.headers or {})
                if headers.get("Status") == "204":
                    pending = int(headers.get("Nats-Num-Pending", "0"))
                    break
                if headers.get("Status"):
                    break
                found += 1
                seq = int(headers["Nats-Sequence"]) + 1
            if not pending:
                break
        await sub.unsubscribe()
    else:
        found = len(await kv.scan())
    assert found == messages, found
    return time.process_time() - c0, time.perf_counter() - t0, 1


async def pair(name: str, unit_of: str, measure, rounds: int, messages: int, ours: str) -> list[Result]:
    cpu: dict[str, list[float]] = {"nats-py": [], ours: []}
    wall: dict[str, list[float]] = {"nats-py": [], ours: []}
    for r in range(rounds):
        for how in ("nats-py", ours):
            c, w, _ = await measure(how)
            cpu[how].append(c / messages)
            wall[how].append(w)
            say(f"{name}, round {r + 1}: {how} {c / messages * 1e6:.1f} us CPU per {unit_of}, {w:.2f} s")
    old, new = statistics.median(cpu["nats-py"]), statistics.median(cpu[ours])
    runs = lambda how: ", ".join(f"{c * 1e6:.1f}" for c in cpu[how])  # noqa: E731
    return [
        Result(f"{name}: nats-py, client CPU per {unit_of}", old * 1e6, "us",
               f"median of {rounds} ({runs('nats-py')}); wall {statistics.median(wall['nats-py']):.2f} s"),
        Result(f"{name}: {ours}, client CPU per {unit_of}", new * 1e6, "us",
               f"median of {rounds} ({runs(ours)}); alternately with nats-py; "
               f"wall {statistics.median(wall[ours]):.2f} s"),
        Result(f"{name}: nats-py / {ours}", old / new, "x", "CPU per message, medians of the same run"),
    ]


async def run(url: str, messages: int, batch: int, rounds: int) -> list[Result]:
    bus = await Bus.connect(url, name="bench-fetch", wait=10)
    try:
        await bus.ensure_stream(StreamSpec(name=STREAM, subjects=("bench.fetch",), retention="limits"))
        body = b"x" * 700
        for i in range(0, messages, 1000):
            await asyncio.gather(*(bus.js_publish("bench.fetch", body) for _ in range(min(1000, messages - i))))
        rows = await pair(f"read {messages:,} messages of 700 B, batches of {batch}, each acked", "message",
                          lambda how: read_all(bus, how, messages, batch), rounds, messages, "Pull.fetch")
        await bus.ensure_stream(StreamSpec(name="BENCH_WRITE", subjects=("bench.write.>",), retention="limits",
                                           max_msgs_per_subject=1))
        rows += await pair("publish 700 B, awaiting the ack, 256 at a time", "publish",
                           lambda how: write_all(bus, how, messages), rounds, messages, "Bus.js_publish")
        await bus.ensure_bucket(BucketSpec(name=BUCKET))
        kv = Kv(bus, BUCKET)
        for i in range(0, 1000, 250):
            await asyncio.gather(*(kv.put(f"k{j}", body) for j in range(i, i + 250)))
        rows += await pair("read a key (direct get), 256 at a time", "get",
                           lambda how: get_all(bus, how, messages), rounds, messages, "Kv.get")
        await bus.ensure_bucket(BucketSpec(name=SCANNED))
        scanned = Kv(bus, SCANNED)
        for i in range(0, messages, 500):
            await asyncio.gather(*(scanned.put(f"k{j:06d}", body) for j in range(i, min(messages, i + 500))))
        rows += await pair(f"scan a bucket of {messages:,} keys", "key",
                           lambda how: scan_all(bus, how, messages), rounds, messages, "Kv.scan")
        return rows
    finally:
        await bus.close()


def main() -> None:
    def extra(p):
        p.add_argument("--messages", type=int, default=20_000)
        p.add_argument("--batch", type=int, default=256)
        p.add_argument("--rounds", type=int, default=3)

    args = parse_args(__doc__.splitlines()[0], extra)
    with tempfile.TemporaryDirectory(prefix="shoal-fetch-") as tmp:
        server = NatsServer(Path(tmp) / "nats").start()
        try:
            rows = asyncio.run(run(server.url, args.messages, args.batch, args.rounds))
        finally:
            server.stop()
    finish(rows, args, "The NATS client per message (single process)")


if __name__ == "__main__":
    main()

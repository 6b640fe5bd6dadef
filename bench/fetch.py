"""What reading a stream costs the reader, per message (single process, a real nats-server): nats-py's
`PullSubscription.fetch` against the transport's `Pull` (shared/transport/_pull.py), which every consumer,
ordered reader, watch and agent of shoal's reads with.

A stream of `--messages` messages of 700 bytes (an execution record's size) is read through a durable
pull consumer with explicit acks, `--batch` at a time, each message acked, first by one fetch and then
by the other, `--rounds` times alternately. CPU per message is this process's CPU time (the client's
side only; the server's is the same for both); the ratio is measured in the same run.

    .venv/bin/python bench/fetch.py [--messages 20000] [--batch 256] [--rounds 3]
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from common import Result, finish, parse_args, say

from shared.natsserver import NatsServer
from shared.transport import Bus, Pull, StreamSpec

STREAM = "BENCH_FETCH"


async def read_all(bus: Bus, how: str, messages: int, batch: int) -> tuple[float, float, int]:
    """CPU and wall seconds to read and ack every message of the stream through a new durable."""
    from nats.js import api

    durable = f"{how}-{time.monotonic_ns()}"
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


async def run(url: str, messages: int, batch: int, rounds: int) -> list[Result]:
    bus = await Bus.connect(url, name="bench-fetch", wait=10)
    try:
        await bus.ensure_stream(StreamSpec(name=STREAM, subjects=("bench.fetch",), retention="limits"))
        body = b"x" * 700
        for i in range(0, messages, 1000):
            await asyncio.gather(*(bus.js_publish("bench.fetch", body) for _ in range(min(1000, messages - i))))
        cpu: dict[str, list[float]] = {"nats-py": [], "Pull": []}
        wall: dict[str, list[float]] = {"nats-py": [], "Pull": []}
        for r in range(rounds):
            for how in ("nats-py", "Pull"):
                c, w, fetches = await read_all(bus, how, messages, batch)
                cpu[how].append(c / messages)
                wall[how].append(w)
                say(f"round {r + 1}: {how} {c / messages * 1e6:.1f} us CPU per message, {w:.2f} s, {fetches} fetches")
        old, new = statistics.median(cpu["nats-py"]), statistics.median(cpu["Pull"])
        runs = lambda how: ", ".join(f"{c * 1e6:.1f}" for c in cpu[how])  # noqa: E731
        return [
            Result("nats-py fetch: client CPU per message", old * 1e6, "us",
                   f"median of {rounds} ({runs('nats-py')}); {messages:,} messages of 700 B in batches of {batch}, "
                   f"each acked; wall {statistics.median(wall['nats-py']):.2f} s"),
            Result("Pull.fetch: client CPU per message", new * 1e6, "us",
                   f"median of {rounds} ({runs('Pull')}); the same messages, alternately; "
                   f"wall {statistics.median(wall['Pull']):.2f} s"),
            Result("nats-py / Pull", old / new, "x", "CPU per message, medians of the same run"),
        ]
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
    finish(rows, args, "Reading a stream (single process)")


if __name__ == "__main__":
    main()

"""Probes: two small, reproducible checks of `Kv.scan` behind the first fix in docs/BENCHMARKS.md.

Not part of `bench/run.py`'s table (they measure behaviour, not speed):

1. Consumers left behind by `Kv.scan`: scans used to be watches, each a new ordered consumer kept by
   the server for 5 minutes, and nats-server 2.15 limits a stream to 1000 consumers. The probe scans one
   bucket in a loop and reports how many consumers the server still holds and at which scan the server
   refuses (with batched direct gets: none, and never).
2. Scans that miss existing keys: 50 keys, 50 concurrent scanners of one key each; a correct scan always
   returns exactly one entry.

    .venv/bin/python bench/probes.py
"""

from __future__ import annotations

import asyncio
import time

from common import Result, Stack, finish, parse_args, say

from shared.errors import ShoalError
from shared.transport import Kv

BUCKET = "shoal_executions"


async def leak(limit: int) -> list[Result]:
    async with Stack("probe-leak") as stack:
        bus = await stack.bus()
        kv = Kv(bus, BUCKET)
        await kv.put("ns.job.node.exec", b"x")
        done = 0
        error = ""
        t0 = time.perf_counter()
        while done < limit:
            try:
                await kv.scan("ns.job.>")
            except ShoalError as exc:
                error = exc.message
                break
            done += 1
        seconds = time.perf_counter() - t0
        await asyncio.sleep(1.0)
        info = await bus.js.stream_info(f"KV_{BUCKET}")
        held = info.state.consumer_count
    return [
        Result("Kv.scan: consumers the server still holds after the scans", float(held), "consumers",
               f"after {done} scans of one key, 1 s later "),
        Result("Kv.scan: scans that succeed before the server refuses", float(done), "scans",
               (f"scan {done + 1} failed: {error}" if error else f"no failure within {limit} scans")
               + f"; {done / seconds:.0f} scans/s"),
    ]


async def race(keys: int, rounds: int) -> list[Result]:
    async with Stack("probe-race", max_consumers=1_000_000) as stack:
        bus = await stack.bus()
        kv = Kv(bus, BUCKET)
        for j in range(keys):
            await kv.put(f"ns.job{j}.node.exec", b"x" * 500)
        wrong = 0
        total = 0

        async def scanner(j: int) -> None:
            nonlocal wrong, total
            for _ in range(rounds):
                entries = await kv.scan(f"ns.job{j}.>")
                total += 1
                if len(entries) != 1:
                    wrong += 1

        await asyncio.gather(*(scanner(j) for j in range(keys)))
    return [Result("Kv.scan: concurrent scans that missed an existing key", float(wrong), "scans",
                   f"of {total} scans ({keys} concurrent scanners, 1 key each, consumer limit lifted); "
                   f"a correct scan returns exactly 1 entry")]


async def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--scans", type=int, default=1200),
        p.add_argument("--keys", type=int, default=50),
        p.add_argument("--rounds", type=int, default=40),
    ))
    rows: list[Result] = []
    say("probe: consumers left behind by Kv.scan")
    rows += await leak(args.scans)
    say("probe: concurrent scans")
    rows += await race(args.keys, args.rounds)
    finish(rows, args, "probes")


if __name__ == "__main__":
    asyncio.run(main())

"""Shared pieces of the benchmarks: a private nats-server, in-process components, percentiles, result rows.

Every benchmark starts its own nats-server (JetStream in a temporary directory) and runs the services it
needs in its own process, as the test suite's `Cluster` does, but with production-like timings
(heartbeats every second, nodes timed out after 5 s, leader sweeps every 250 ms).
Nothing here asserts on timing: benchmarks report figures, readers judge them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/x.py` from the repository root
    sys.path.insert(0, str(ROOT))

from services.agent import AgentService  # noqa: E402
from services.cli.client import Client  # noqa: E402
from services.health import HealthService  # noqa: E402
from services.query import QueryService  # noqa: E402
from services.rollout import RolloutService  # noqa: E402
from services.scheduler import SchedulerService  # noqa: E402
from shared import topology  # noqa: E402
from shared.natsserver import NatsServer  # noqa: E402
from shared.runtime import Component, start_component  # noqa: E402
from shared.settings import Settings  # noqa: E402
from shared.transport import Bus  # noqa: E402

# Production-like liveness, fast leader sweeps.
BENCH_TIMINGS = dict(heartbeat_interval=1.0, node_timeout=5.0, sweep_interval=0.25)


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass
class Result:
    """One row of the results table."""

    name: str
    figure: float
    unit: str
    notes: str = ""

    def cell(self) -> str:
        return fmt(self.figure)


def fmt(value: float) -> str:
    """A figure as people read it: 3 significant digits, thousands separated."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    a = abs(value)
    if a >= 1000:
        return f"{value:,.0f}"
    if a >= 100:
        return f"{value:.0f}"
    if a >= 10:
        return f"{value:.1f}"
    if a >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def markdown_table(rows: Sequence[Result]) -> str:
    lines = ["| benchmark | figure | unit | notes |", "| --- | ---: | --- | --- |"]
    for r in rows:
        notes = r.notes.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r.name} | {r.cell()} | {r.unit} | {notes} |")
    return "\n".join(lines)


def print_table(rows: Sequence[Result], title: str = "") -> None:
    if title:
        print(f"\n### {title}\n")
    print(markdown_table(rows))
    sys.stdout.flush()


def percentile(values: Iterable[float], p: float) -> float:
    """The p-th percentile (0-100) with linear interpolation between closest ranks."""
    data = sorted(values)
    if not data:
        return float("nan")
    if len(data) == 1:
        return data[0]
    k = (len(data) - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def ms(seconds: float) -> float:
    return seconds * 1000.0


# --------------------------------------------------------------------------------------------------
# CPU accounting: on 2 shared cores, "was the Python process saturated?" explains most figures.
# --------------------------------------------------------------------------------------------------


class CpuMeter:
    """CPU seconds of this process and of the nats-server child over a wall-clock span."""

    def __init__(self, server: NatsServer | None = None) -> None:
        self.server = server

    def _server_cpu(self) -> float:
        if self.server is None or self.server.proc is None:
            return 0.0
        try:
            fields = Path(f"/proc/{self.server.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks = os.sysconf("SC_CLK_TCK")
            return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
        except (OSError, IndexError, ValueError):
            return 0.0

    def __enter__(self) -> CpuMeter:
        self.wall0 = time.perf_counter()
        self.self0 = time.process_time()
        self.srv0 = self._server_cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.python = time.process_time() - self.self0
        self.nats = self._server_cpu() - self.srv0

    def note(self) -> str:
        if not getattr(self, "wall", 0):
            return ""
        return (f"CPU: python {100 * self.python / self.wall:.0f}%, "
                f"nats-server {100 * self.nats / self.wall:.0f}% of one core")


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{12,32}")
_NODE = re.compile(r"sim-\d+")
_NUMBER = re.compile(r"(?<![\w.])\d+(?![\w.])")


class LogCounter(logging.Handler):
    """Counts the warnings and errors the services log, by a short key, so a table row can say what broke."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.counts: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text = f"{text}: {record.exc_info[1]}"
        key = f"{record.levelname} {record.name}: {text}"
        # Ids make every message unique; keep its shape.
        key = _UUID.sub("<id>", key)
        key = _NODE.sub("<node>", key)
        key = _NUMBER.sub("<n>", key)[:240]
        self.counts[key] = self.counts.get(key, 0) + 1

    def top(self, n: int = 3) -> str:
        items = sorted(self.counts.items(), key=lambda kv: -kv[1])[:n]
        return "; ".join(f"{count}× {key}" for key, count in items)

    def total(self) -> int:
        return sum(self.counts.values())

    def __enter__(self) -> LogCounter:
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().removeHandler(self)


class ScanCounter:
    """Counts `Kv.scan` calls and the entries they read, per bucket, while active.

    Every scan is a fresh ordered consumer on the server, which is why it is worth counting. The
    wrapper only counts; it calls the original method unchanged.
    """

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.entries: dict[str, int] = {}
        self.failed: dict[str, int] = {}

    def __enter__(self) -> ScanCounter:
        from shared.transport import _kv

        self._kv = _kv
        self._original = original = _kv.Kv.scan
        counter = self

        async def scan(kv: Any, pattern: str = ">") -> Any:
            counter.calls[kv.bucket] = counter.calls.get(kv.bucket, 0) + 1
            try:
                result = await original(kv, pattern)
            except Exception:
                counter.failed[kv.bucket] = counter.failed.get(kv.bucket, 0) + 1
                raise
            counter.entries[kv.bucket] = counter.entries.get(kv.bucket, 0) + len(result)
            return result

        _kv.Kv.scan = scan  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        self._kv.Kv.scan = self._original  # type: ignore[method-assign]

    def snapshot(self) -> tuple[dict[str, int], ...]:
        return dict(self.calls), dict(self.entries), dict(self.failed)

    def since(self, before: tuple[dict[str, int], ...] = ({}, {}, {})) -> str:
        calls, entries, failed = before
        parts = []
        for bucket in sorted(self.calls):
            n = self.calls[bucket] - calls.get(bucket, 0)
            if n:
                e = self.entries.get(bucket, 0) - entries.get(bucket, 0)
                f = self.failed.get(bucket, 0) - failed.get(bucket, 0)
                parts.append(f"{bucket.removeprefix('shoal_')} {n}× ({e:,} entries"
                             + (f", {f} failed" if f else "") + ")")
        return "Kv.scan: " + (", ".join(parts) if parts else "none")


async def consumer_counts(bus: Bus, prefix: str = "KV_") -> dict[str, int]:
    """Consumers the server holds per stream (ephemeral ones included): shows leaked watch consumers."""
    out: dict[str, int] = {}
    for info in await bus.js.streams_info():
        if info.config.name.startswith(prefix) and info.state.consumer_count:
            out[info.config.name] = info.state.consumer_count
    return out


# --------------------------------------------------------------------------------------------------
# A private nats-server and in-process components
# --------------------------------------------------------------------------------------------------


class Stack:
    """A nats-server in a temporary directory and components started in this process.

    `async with Stack() as stack:` ... `await stack.start("query")`, `await stack.client()`.
    """

    def __init__(self, name: str = "bench", *, max_consumers: int | None = None, **timings: float) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix=f"shoal-{name}-")
        self.tmp = Path(self._tmp.name)
        # max_consumers lifts nats-server's default limit of 1000 consumers per stream (None keeps it).
        limits = {"default_max_consumers": max_consumers} if max_consumers is not None else None
        self.server = NatsServer(self.tmp / "nats", log_file=str(self.tmp / "nats.log"), jetstream_limits=limits)
        self.settings: Settings | None = None
        self.timings = {**BENCH_TIMINGS, **timings}
        self.components: list[Component] = []
        self.children: list[subprocess.Popen[bytes]] = []  # processes a benchmark started (agents)
        self._buses: list[Bus] = []

    async def __aenter__(self) -> Stack:
        await asyncio.to_thread(self.server.start)
        self.settings = Settings(nats_url=self.server.url, query_db=str(self.tmp / "query.db"), **self.timings)
        bus = await self.bus("bench-setup")
        await topology.ensure(bus)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def bus(self, name: str = "bench") -> Bus:
        assert self.settings is not None
        b = await Bus.connect(self.settings.nats_url, name=name, wait=10)
        self._buses.append(b)
        return b

    async def client(self, namespace: str = "default", timeout: float = 30.0, name: str = "bench-client") -> Client:
        return Client(await self.bus(name), namespace, timeout=timeout)

    async def start(self, kind: str, **kwargs: Any) -> Component:
        assert self.settings is not None
        factory = component_factory(kind, self.tmp, len(self.components), **kwargs)
        component = await start_component(factory, self.settings, kind)
        self.components.append(component)
        return component

    async def start_services(self, kinds: Sequence[str] = ("health", "scheduler", "rollout", "query")) -> None:
        for kind in kinds:
            await self.start(kind)

    async def stop(self, component: Component) -> None:
        await component.stop()
        self.components.remove(component)

    async def close(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.terminate()
                try:
                    await asyncio.to_thread(child.wait, 15)
                except subprocess.TimeoutExpired:
                    child.kill()
                    await asyncio.to_thread(child.wait)
        self.children.clear()
        for component in reversed(self.components):
            try:
                await asyncio.wait_for(component.stop(), timeout=20)
            except Exception as exc:  # shutting down: report and go on
                logging.getLogger("bench").warning("stopping %s: %r", component.name, exc)
        self.components.clear()
        for b in self._buses:
            try:
                await b.close()
            except Exception:
                pass
        self._buses.clear()
        await asyncio.to_thread(self.server.stop)
        self._tmp.cleanup()


def component_factory(kind: str, tmp: Path, index: int, **kwargs: Any) -> Callable[[Bus, Settings], Component]:
    if kind == "query":
        db = kwargs.pop("db", str(tmp / f"query-{index}.db"))
        return lambda b, s: QueryService(b, s, db_path=db)
    if kind == "agent":
        kwargs.setdefault("work_dir", str(tmp / f"agent-{index}"))
        kwargs.setdefault("stop_grace", 2.0)
        return lambda b, s: AgentService(b, s, **kwargs)
    plain: dict[str, Callable[[Bus, Settings], Component]] = {
        "scheduler": SchedulerService, "rollout": RolloutService, "health": HealthService,
    }
    return lambda b, s: plain[kind](b, s)


# --------------------------------------------------------------------------------------------------
# Command line shared by every benchmark
# --------------------------------------------------------------------------------------------------


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", help="also write the result rows as JSON to this file (used by bench/run.py)")
    parser.add_argument("--log-level", default="WARNING", help="log level of the services (default WARNING)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return args


def finish(rows: Sequence[Result], args: argparse.Namespace, title: str) -> None:
    print_table(rows, title)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))


def say(message: str) -> None:
    """Progress on stderr, so stdout stays a clean table."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

"""Shared pieces of the benchmarks: a private nats-server, in-process components, percentiles, result rows.

Every benchmark starts its own nats-server (JetStream in a temporary directory) and runs the services it
needs in its own process, exactly as the test suite's `Cluster` does, but with the production-like
timings the brief asks for (heartbeats every second, nodes timed out after 5 s, sweeps every 250 ms).
Nothing here asserts on timing: benchmarks report figures, readers judge them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import resource
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

# The timings of the brief: production-like liveness, fast leader sweeps.
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


def markdown_table(rows: Sequence[Result], *, group: str | None = None) -> str:
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


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------------------------------
# A private nats-server and in-process components
# --------------------------------------------------------------------------------------------------


class Stack:
    """A nats-server in a temporary directory and components started in this process.

    `async with Stack() as stack:` ... `await stack.start("query")`, `await stack.client()`.
    """

    def __init__(self, name: str = "bench", **timings: float) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix=f"shoal-{name}-")
        self.tmp = Path(self._tmp.name)
        self.server = NatsServer(self.tmp / "nats", log_file=str(self.tmp / "nats.log"))
        self.settings: Settings | None = None
        self.timings = {**BENCH_TIMINGS, **timings}
        self.components: list[Component] = []
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

    async def close(self) -> None:
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

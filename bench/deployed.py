"""Deployed fleet: every service its own process, the fleet in agent processes, CPU by process kind.

The stack is `services.cli.stack.Stack`, as `shoal dev` and the end-to-end tests run it: nats-server
its own process, every service its own `shoal serve ...` process (`--replicas` of each), and the
simulated fleet in `shoal agent --simulate K` processes of `--per-agent` nodes each (distinct id
templates `a01-{i:04d}`, `a02-...`, distinct work dirs, a label `group=a01` per process). Timings are
production-like (heartbeat 1 s, node timeout 5 s, sweep 250 ms: bench/common.py's BENCH_TIMINGS).
Each fleet size gets a fresh stack. For each size:

1. register: from starting the agent processes (interpreter start included) until the nodes bucket
   holds all N nodes ready (a watch in this process), then until the query service lists them all;
   CPU seconds per process kind in that span; then CPU per kind of the idle fleet (heartbeats only)
   over a few seconds, and resident memory (VmRSS) per kind.
2. immediate: one `pipeline` job, `strategy: immediate`, `config.simulate: {}`, on all N nodes; the
   time until all N executions are observed `running` (a watch on the executions bucket in this
   process keeps the latest state of each), placements/s, and CPU per placement by process kind
   (utime + stime of every process of the kind, from /proc, over the phase, divided by N; and the same
   less what the kind spends anyway at the idle fleet's rate over the phase: heartbeats); the backlog
   of the rollout service's event consumers (every durable on SHOAL_EVENTS whose name starts with
   `rollout`: pending + ack pending) at the moment all were running, and how long it took to drain.
3. rolling (by default at the smallest size only; `--rolling-at all`): version 2 of the same job,
   `strategy: rolling`, `max_parallel: 25` (4 waves), health check every 1 s (success 1, failure 3,
   deadline 60 s); the time until all N executions of version 2 are running and the rollout record
   says succeeded, against the ideal (waves x interval).
4. updates (`--updates K`, at the same sizes as rolling): a job on `--update-nodes` nodes (1,000,
   chosen by the group label) updated K times in a row, each update waiting until its rollout
   succeeded, the old version is stopped and the rollout's event backlog is empty; the rollout
   service's CPU per update, first against last (a reconcile pass should not cost more as the job's
   history grows).

Execution and rollout states are followed through watches on the executions and rollouts buckets in
this process (its CPU is reported as `bench`, apart from the stack's); `rollouts.status` is asked to
confirm, outside the measured spans (and in place of the record, should its layout change). Nothing here asserts on timing: it prints figures and ratios
measured side by side in one run.

    .venv/bin/python bench/deployed.py [--nodes 1000,5000,10000] [--per-agent 1000] [--replicas 1]
        [--phases register,immediate,rolling] [--rolling-at smallest|all] [--updates 20] [--json FILE]
    .venv/bin/python bench/deployed.py --nodes 100000 --phases register,immediate [--per-agent 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from common import BENCH_TIMINGS, Result, fmt, parse_args, percentile, print_table, say
from procstat import CORES, ExitClock, Meter, Span, loadavg

from services.cli.client import Client
from services.cli.stack import NATS, SERVICES, Stack
from shared import subjects as s
from shared.api import ListNodesRequest
from shared.errors import ShoalError
from shared.models import SubmissionOutcome
from shared.transport import Bus, Kv, OrderedReader

JOB = "deployed"
HISTORY_JOB = "deployed-history"
NAMESPACE = "default"
# The kinds of process, in the order tables list them; "total" is their sum, "bench" is this process.
KINDS = ("scheduler", "rollout", "health", "query", "agents", "nats-server")
PHASES = ("register", "immediate", "rolling", "updates")
HEALTH = {"interval": "1s", "success_threshold": 1, "failure_threshold": 3, "deadline": "60s"}
HEALTH_INTERVAL = 1.0


# --------------------------------------------------------------------------------------------------
# Following the truth: watches on the buckets, decoding only the fields needed
# --------------------------------------------------------------------------------------------------


class _State(msgspec.Struct):
    state_type: str = ""


class _ExecStatus(msgspec.Struct):
    observed_state: _State = msgspec.field(default_factory=_State)
    desired_state: _State = msgspec.field(default_factory=_State)
    stable_at: Any = None


class _Exec(msgspec.Struct):
    job_id: str = ""
    job_version: int = 0
    rollout_wave: int = 0
    status: _ExecStatus = msgspec.field(default_factory=_ExecStatus)


class _Node(msgspec.Struct):
    state: _State = msgspec.field(default_factory=_State)


class _Rollout(msgspec.Struct):
    job_id: str = ""
    job_version: int = 0
    source_version: int = 0
    state: str = ""
    current_wave: int = 0
    rollback_of: int = 0
    message: str = ""


class Follower:
    """Latest record of every key of one bucket, from a watch; subclasses keep running counts."""

    decoder: msgspec.msgpack.Decoder[Any]

    def __init__(self) -> None:
        self.changed = asyncio.Event()
        self.updates = 0
        self.undecodable = 0
        self.caught_up = asyncio.Event()

    async def run(self, kv: Kv) -> None:
        async with kv.watch(">") as watch:
            async for entry in watch:
                if entry is None:
                    self.caught_up.set()
                    continue
                if entry.deleted:
                    self.drop(entry.key)
                else:
                    try:
                        self.put(entry.key, self.decoder.decode(entry.value))
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        self.undecodable += 1
                        continue
                self.updates += 1
                self.changed.set()

    def put(self, key: str, value: Any) -> None:
        raise NotImplementedError

    def drop(self, key: str) -> None:
        raise NotImplementedError

    async def until(self, check: Callable[[], bool], timeout: float) -> float | None:
        """Seconds until check() holds (re-checked on every change, at most 20 times a second); None on
        timeout."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while not check():
            self.changed.clear()
            left = timeout - (loop.time() - t0)
            if left <= 0:
                return None
            try:
                await asyncio.wait_for(self.changed.wait(), min(left, 0.5))
            except asyncio.TimeoutError:
                pass
            await asyncio.sleep(0.05)
        return loop.time() - t0


class Nodes(Follower):
    decoder = msgspec.msgpack.Decoder(_Node)

    def __init__(self) -> None:
        super().__init__()
        self.state: dict[str, str] = {}
        self.counts: Counter[str] = Counter()

    def put(self, key: str, value: _Node) -> None:
        self.drop(key)
        self.state[key] = value.state.state_type
        self.counts[value.state.state_type] += 1

    def drop(self, key: str) -> None:
        old = self.state.pop(key, None)
        if old is not None:
            self.counts[old] -= 1

    def ready(self) -> int:
        return self.counts["ready"]


class Executions(Follower):
    """Counts of executions by (job, version, observed state), kept up to date change by change, so a
    check costs the same at 100,000 executions as at 1,000; and when each wave's first execution
    appeared."""

    decoder = msgspec.msgpack.Decoder(_Exec)

    def __init__(self) -> None:
        super().__init__()
        self.latest: dict[str, tuple[str, int, str, bool]] = {}
        self.counts: Counter[tuple[str, int, str]] = Counter()
        self.totals: Counter[tuple[str, int]] = Counter()
        self.stable: Counter[tuple[str, int]] = Counter()
        self.wave_seen: dict[tuple[str, int, int], float] = {}

    def put(self, key: str, value: _Exec) -> None:
        self.drop(key)
        st = value.status
        stable = st.observed_state.state_type == "running" and st.stable_at is not None
        record = (value.job_id, value.job_version, st.observed_state.state_type, stable)
        self.latest[key] = record
        self.counts[record[:3]] += 1
        self.totals[record[:2]] += 1
        if stable:
            self.stable[record[:2]] += 1
        self.wave_seen.setdefault((value.job_id, value.job_version, value.rollout_wave), time.perf_counter())

    def drop(self, key: str) -> None:
        old = self.latest.pop(key, None)
        if old is not None:
            self.counts[old[:3]] -= 1
            self.totals[old[:2]] -= 1
            if old[3]:
                self.stable[old[:2]] -= 1

    def count(self, job: str, version: int, observed: str | None = None) -> int:
        return self.totals[(job, version)] if observed is None else self.counts[(job, version, observed)]

    def states(self, job: str, version: int) -> dict[str, int]:
        return {k[2]: n for k, n in self.counts.items() if k[0] == job and k[1] == version and n}


class Rollouts(Follower):
    decoder = msgspec.msgpack.Decoder(_Rollout)

    def __init__(self) -> None:
        super().__init__()
        self.latest: dict[str, _Rollout] = {}

    def put(self, key: str, value: _Rollout) -> None:
        self.latest[key] = value

    def drop(self, key: str) -> None:
        self.latest.pop(key, None)

    def of(self, job: str) -> _Rollout | None:
        return self.latest.get(f"{NAMESPACE}.{job}")

    def succeeded(self, job: str, version: int) -> bool:
        r = self.of(job)
        return r is not None and r.job_version == version and r.state == "succeeded" and not r.rollback_of


# --------------------------------------------------------------------------------------------------
# The stack as deployed
# --------------------------------------------------------------------------------------------------


def kind_of(name: str) -> str:
    if name == NATS:
        return "nats-server"
    if name.startswith("fleet-"):
        return "agents"
    service = name if name in SERVICES else name.rsplit("-", 1)[0]
    return service if service in SERVICES else "other"


@dataclass
class Deployment:
    nodes: int
    per_agent: int
    replicas: int
    log_level: str
    keep: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)  # more environment for the stack's processes
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="shoal-deployed-")))
    stack: Stack | None = None
    bus: Bus | None = None
    watch_bus: Bus | None = None
    client: Client | None = None
    agents: list[str] = field(default_factory=list)  # child names of the agent processes
    groups: list[tuple[str, int]] = field(default_factory=list)  # (group label, nodes) per agent process
    execs: Executions = field(default_factory=Executions)
    node_states: Nodes = field(default_factory=Nodes)
    rollouts: Rollouts = field(default_factory=Rollouts)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.meter = Meter(self.pids)
        # One event for all followers: a wait on executions and the rollout record wakes on either.
        changed = asyncio.Event()
        for follower in (self.execs, self.node_states, self.rollouts):
            follower.changed = changed

    def pids(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {kind: [] for kind in KINDS}
        out["bench"] = [os.getpid()]
        stack = self.stack
        if stack is None:
            return out
        for name in list(stack.children):
            proc = stack.process(name)  # follows a nats-server started again
            if proc is not None and proc.poll() is None:
                out.setdefault(kind_of(name), []).append(proc.pid)
        return out

    async def start(self) -> None:
        env = {"SHOAL_HEARTBEAT_INTERVAL": str(BENCH_TIMINGS["heartbeat_interval"]),
               "SHOAL_NODE_TIMEOUT": str(BENCH_TIMINGS["node_timeout"]),
               "SHOAL_SWEEP_INTERVAL": str(BENCH_TIMINGS["sweep_interval"]),
               "SHOAL_LOG_LEVEL": self.log_level, **self.extra_env}
        self.stack = Stack(self.tmp / "stack", nodes=0, simulate=0, env=env, replicas=self.replicas)
        self.stack.start()  # in this thread: a cancel cannot leave it half-started behind our back
        self.bus = await Bus.connect(self.stack.nats_url, name="bench-deployed", wait=15)
        self.watch_bus = await Bus.connect(self.stack.nats_url, name="bench-deployed-watch", wait=15)
        self.client = Client(self.bus, NAMESPACE, timeout=30)
        deadline = time.perf_counter() + 90
        while True:  # every service answers; a process that exits on the way ends the wait at once
            dead = self.dead()
            if dead:
                raise RuntimeError(f"a process of the stack exited while starting: {dead}")
            try:
                await self.client.wait_ready(0, timeout=1)
                break
            except ShoalError as exc:
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"{exc}; {self.dead() or 'no process exited'}") from None
        await self.all_replicas_answer(max(1.0, deadline - time.perf_counter()))
        for follower, bucket in ((self.execs, s.BUCKET_EXECUTIONS), (self.node_states, s.BUCKET_NODES),
                                 (self.rollouts, s.BUCKET_ROLLOUTS)):
            self.tasks.append(asyncio.create_task(follower.run(Kv(self.watch_bus, bucket))))
            await asyncio.wait_for(follower.caught_up.wait(), 30)

    async def all_replicas_answer(self, timeout: float) -> None:
        """Until every service process answers its Services API ping (a wait_ready hears any one)."""
        assert self.bus is not None
        nc = self.bus.nc
        deadline = time.perf_counter() + timeout
        for service in s.SERVICES:
            while True:
                inbox = nc.new_inbox()
                ids: set[str] = set()

                async def got(msg: Any) -> None:
                    ids.add(msgspec.json.decode(msg.data).get("id", ""))

                sub = await nc.subscribe(inbox, cb=got)
                await nc.publish(s.service_ping(service), b"", reply=inbox)
                await asyncio.sleep(0.3)
                await sub.unsubscribe()
                if len(ids) >= self.replicas:
                    break
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"{service}: {len(ids)} of {self.replicas} replicas answer after {timeout:.0f}s")
                await asyncio.sleep(0.2)

    def start_agents(self) -> None:
        assert self.stack is not None
        count = -(-self.nodes // self.per_agent)
        width = max(2, len(str(count)))
        digits = len(str(self.per_agent))
        for k in range(1, count + 1):
            group = f"a{k:0{width}d}"
            size = min(self.per_agent, self.nodes - (k - 1) * self.per_agent)
            name = f"fleet-{group}"
            self.stack.spawn(name, "agent", "--simulate", str(size), "--sim-prefix", f"{group}-{{i:0{digits}d}}",
                             "--sim-label", "simulated=true", "--sim-label", "zone=zone-{i%3}",
                             "--sim-label", f"group={group}", "--work-dir", str(self.tmp / "agents" / name),
                             "--stop-grace", "2")
            self.agents.append(name)
            self.groups.append((group, size))

    def dead(self) -> str:
        """Children that exited, with the last lines of their logs."""
        if self.stack is None:
            return ""
        out = []
        for name in self.stack.dead():
            tail = " / ".join(self.stack.log(name).strip().splitlines()[-3:])[-400:]
            out.append(f"{name} exited ({tail})")
        return "; ".join(out)

    async def close(self) -> None:
        """Stop this process's watches and connections (each wait bounded), then the stack, whatever happens
        on the way: the stack's processes are stopped even if this is cancelled or a watch will not end."""
        t0 = time.perf_counter()
        try:
            pending = set(self.tasks)
            for _ in range(5):  # a cancel that lands as a fetch completes can be lost: cancel again
                if not pending:
                    break
                for task in pending:
                    task.cancel()
                _, pending = await asyncio.wait(pending, timeout=2)
            for b in (self.bus, self.watch_bus):
                if b is not None:
                    try:
                        await asyncio.wait_for(b.close(), 10)
                    except Exception:
                        pass
            say(f"watches and connections closed in {time.perf_counter() - t0:.1f} s"
                + (f" ({len(pending)} watch(es) would not stop)" if pending else ""))
        finally:
            if self.stack is not None:
                t0 = time.perf_counter()
                alive = {proc.pid: name for name in list(self.stack.children)
                         if (proc := self.stack.process(name)) is not None and proc.poll() is None}
                clock = ExitClock(alive).start()
                # Synchronously: nothing else needs the loop now, and a cancel cannot cut it short.
                # SIGTERM to every child, SIGKILL to those still there after 15 s, each one reaped.
                try:
                    self.stack.stop()
                finally:
                    clock.stop()
                say(f"stack stopped in {time.perf_counter() - t0:.1f} s (slowest to exit: {clock.slowest()})")
            if self.keep:
                say(f"kept {self.tmp}")
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Where a rolling update's time goes, read from the events stream
# --------------------------------------------------------------------------------------------------


async def wave_timeline(bus: Bus, start_seq: int, job_id: str, version: int) -> tuple[float, str] | None:
    """Where a rolling update's time goes, wave by wave, from the stream times of its events in
    SHOAL_EVENTS (the server's clock): when the rollout record started each wave, when the wave's
    executions were created, when they were first `validating` (their agent's start reported) and
    `running` (their first healthy interval counted). Returns the median over the waves of the time from
    a wave's start to its last `running` beyond the health interval, and the per-wave notes."""
    end_seq = (await bus.stream_info(s.STREAM_EVENTS))["last_seq"]
    reader = OrderedReader(bus, s.STREAM_EVENTS, start_seq=start_seq, batch=1024)
    starts: dict[int, float] = {}
    seen: dict[str, dict[str, float]] = {}  # execution id -> "created" / observed state -> first time
    wave_of: dict[str, int] = {}
    try:
        while reader.last_seq < end_seq:
            batch = await reader.next_batch(0.5)
            if not batch:
                break
            for msg in batch:
                if not msg.data:
                    continue
                if msg.subject.startswith(s.EVENTS_ROLLOUT + "."):
                    rollout = Rollouts.decoder.decode(msg.data)
                    if rollout.job_id == job_id and rollout.job_version == version:
                        starts.setdefault(rollout.current_wave, msg.at)
                elif msg.subject.startswith(s.EVENTS_EXECUTION + "."):
                    execution = Executions.decoder.decode(msg.data)
                    if execution.job_id != job_id or execution.job_version != version:
                        continue
                    execution_id = msg.subject.rsplit(".", 1)[-1]  # ...<node>.<execution id>
                    times = seen.setdefault(execution_id, {"created": msg.at})
                    times.setdefault(execution.status.observed_state.state_type, msg.at)
                    wave_of[execution_id] = execution.rollout_wave
    finally:
        await reader.close()
    if not starts:
        return None
    overheads, notes = [], []
    for wave, start in sorted(starts.items()):
        ids = [i for i, w in wave_of.items() if w == wave]
        created = [seen[i]["created"] - start for i in ids]
        validating = [seen[i]["validating"] - start for i in ids if "validating" in seen[i]]
        running = [seen[i]["running"] - start for i in ids if "running" in seen[i]]
        if not ids or not running:
            continue
        overheads.append(max(running) - HEALTH_INTERVAL)
        notes.append(f"wave {wave} ({len(ids)}): created {max(created):.2f} s after the record started it, "
                     f"validating {percentile(validating, 50):.2f}/{max(validating, default=0):.2f} s "
                     f"(p50/last), running {percentile(running, 50):.2f}/{max(running):.2f} s")
    if not overheads:
        return None
    return percentile(overheads, 50), "; ".join(notes)


# --------------------------------------------------------------------------------------------------
# Server-side state: consumer backlogs
# --------------------------------------------------------------------------------------------------


async def durables(bus: Bus, stream: str, prefix: str = "") -> dict[str, int]:
    """Pending + ack pending of every durable consumer of `stream` whose name starts with `prefix`."""
    out: dict[str, int] = {}
    offset = 0
    while True:
        infos = await bus.js.consumers_info(stream, offset=offset or None)
        for info in infos:
            name = info.config.durable_name or ""
            if name and name.startswith(prefix):
                out[name] = (info.num_pending or 0) + (info.num_ack_pending or 0)
        if len(infos) < 256:
            return out
        offset += len(infos)


async def rollout_backlog(bus: Bus) -> tuple[int, dict[str, int]]:
    found = await durables(bus, s.STREAM_EVENTS, "rollout")
    return sum(found.values()), found


async def settle(bus: Bus, timeout: float) -> tuple[float, dict[str, int]]:
    """Until no durable of the work streams has anything pending (timers excepted: they wait on purpose)."""
    t0 = time.perf_counter()
    while True:
        left: dict[str, int] = {}
        for stream in (s.STREAM_SUBMISSIONS, s.STREAM_EVALS, s.STREAM_PLANS, s.STREAM_REPORTS, s.STREAM_EVENTS):
            for name, n in (await durables(bus, stream)).items():
                if n:
                    left[f"{stream}/{name}"] = n
        waited = time.perf_counter() - t0
        if not left or waited > timeout:
            return waited, left
        await asyncio.sleep(0.25)


async def listed_ready(client: Client) -> int:
    count = 0
    token = ""
    while True:
        _, page = await client.list_nodes(ListNodesRequest(state="ready", limit=1000, next_token=token))
        count += len(page.items)
        if not page.next_token:
            return count
        token = page.next_token


# --------------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------------


def cpu_note(span: Span, per: int = 0, what: str = "") -> str:
    """CPU by kind over a span: seconds (and ms per item), cores, machine load."""
    parts = []
    for kind in (*KINDS, "total", "bench"):
        seconds = span.total(KINDS) if kind == "total" else span.cpu.get(kind, 0.0)
        cell = f"{kind} {seconds:.2f} s"
        if per:
            cell += f" ({1000 * seconds / per:.3g} ms/{what})"
        parts.append(cell)
    ours = span.total(KINDS) + span.cpu.get("bench", 0.0)
    other = max(0.0, span.machine_busy - ours / span.wall) if span.wall else 0.0
    note = (f"CPU: {', '.join(parts)}; over {span.wall:.1f} s the stack used {span.total(KINDS) / span.wall:.2f} "
            f"of {CORES} cores, the machine {span.machine_busy:.2f} (other processes {other:.2f})")
    if span.gone:
        note += f"; processes that ended meanwhile (their CPU is missing): {span.gone}"
    return note


def memory_note(mem: dict[str, tuple[int, int, int]]) -> tuple[float, str]:
    parts = []
    total = 0
    for kind in KINDS:
        n, rss, peak = mem.get(kind, (0, 0, 0))
        total += rss
        parts.append(f"{kind} {rss / 1024:,.0f} MiB in {n} process{'es' if n != 1 else ''}"
                     + (f" (largest peak {peak / 1024:,.0f} MiB)" if n > 1 else f" (peak {peak / 1024:,.0f} MiB)"))
    return total / 1024, "VmRSS: " + ", ".join(parts)


# --------------------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------------------


@dataclass
class Limits:
    register: float
    place: float
    rolling: float
    update: float


@dataclass
class Figures:
    """What the summary across sizes compares."""

    register_s: float = float("nan")
    immediate_s: float = float("nan")
    placements_per_s: float = float("nan")
    cpu_per_placement_ms: dict[str, float] = field(default_factory=dict)
    cpu_net_ms: dict[str, float] = field(default_factory=dict)  # less the idle fleet's rate over the phase
    idle_cores: dict[str, float] = field(default_factory=dict)
    backlog: float = float("nan")
    rolling_ratio: float = float("nan")
    rss_mib: float = float("nan")
    update_ratio: float = float("nan")


class Run:
    def __init__(self, d: Deployment, rows: list[Result], figures: Figures, limits: Limits,
                 idle_window: float) -> None:
        self.d = d
        self.rows = rows
        self.f = figures
        self.limits = limits
        self.idle_window = idle_window
        self.tag = f"deployed {d.nodes} nodes"
        self.job_id = ""

    async def wait(self, follower: Follower, check: Callable[[], bool], timeout: float) -> float | None:
        """Seconds until check() holds, None on timeout or as soon as a process of the stack has exited."""
        stack = self.d.stack

        def dead() -> bool:
            return stack is not None and bool(stack.dead())

        took = await follower.until(lambda: check() or dead(), timeout)
        return took if took is not None and check() else None

    def row(self, what: str, figure: float, unit: str, notes: str) -> None:
        self.rows.append(Result(f"{self.tag}: {what}", figure, unit, notes))

    def missed(self, what: str, unit: str, limit: float, got: str) -> None:
        dead = self.d.dead()
        self.row(what, float("nan"), unit, f"did not finish within {limit:.0f} s: got {got}"
                 + (f"; {dead}" if dead else ""))

    # -- 1 ------------------------------------------------------------------------------------------

    async def register(self) -> bool:
        d, n = self.d, self.d.nodes
        assert d.client is not None and d.bus is not None
        say(f"{self.tag}: starting {-(-n // d.per_agent)} agent process(es) of up to {d.per_agent} nodes")
        before = d.meter.sample()
        t0 = time.perf_counter()
        d.start_agents()
        ready = await self.wait(d.node_states, lambda: d.node_states.ready() >= n, self.limits.register)
        span = d.meter.span(before, d.meter.sample())
        if ready is None:
            self.missed("register all nodes", "s", self.limits.register,
                        f"{d.node_states.ready()} of {n} ready in the nodes bucket")
            return False
        listed_at = None
        listed = 0
        while time.perf_counter() - t0 < self.limits.register:
            listed = await listed_ready(d.client)
            if listed >= n:
                listed_at = time.perf_counter() - t0
                break
            await asyncio.sleep(0.25)
        listed_note = (f"the query service listed all {n} ready after {listed_at:.1f} s" if listed_at is not None
                       else f"the query service listed only {listed} of {n} ready within {self.limits.register:.0f} s")
        self.f.register_s = ready
        self.row("register all nodes", ready, "s",
                 f"{n / ready:,.0f} registrations/s: from starting {len(d.agents)} `shoal agent --simulate` "
                 f"process(es) (interpreter start and imports included) until the nodes bucket holds all {n} "
                 f"ready; {listed_note}; {cpu_note(span, n, 'node')}")
        waited, left = await settle(d.bus, 60)
        # The idle fleet: heartbeats and whatever the services do when nothing happens.
        await asyncio.sleep(1.0)
        before = d.meter.sample()
        await asyncio.sleep(self.idle_window)
        idle = d.meter.span(before, d.meter.sample())
        self.f.idle_cores = {k: idle.cores(k) for k in KINDS}
        self.f.idle_cores["total"] = idle.total(KINDS) / idle.wall
        self.row("idle fleet (heartbeats only)", idle.total(KINDS) / idle.wall, "cores",
                 f"{n:,} heartbeats/s expected; the registration settled {waited:.1f} s after all were ready"
                 + (f" (still pending: {left})" if left else "") + "; cores by kind: "
                 + ", ".join(f"{k} {idle.cores(k):.3f}" for k in KINDS)
                 + f", bench {idle.cores('bench'):.3f}; machine {idle.machine_busy:.2f} of {CORES} cores busy")
        total, note = memory_note(d.meter.memory())
        self.row("memory after registration", total, "MiB", note)
        return True

    # -- 2 ------------------------------------------------------------------------------------------

    async def immediate(self) -> bool:
        d, n = self.d, self.d.nodes
        assert d.client is not None and d.bus is not None
        waited, left = await settle(d.bus, 60)
        say(f"{self.tag}: one immediate job on every node" + (f" (not settled: {left})" if left else ""))
        spec = {"name": JOB, "type": "pipeline", "config": {"simulate": {}}, "rollout": {"strategy": "immediate"}}
        before = d.meter.sample()
        t0 = time.perf_counter()
        outcome = await d.client.submit(spec, wait=60)
        accepted = time.perf_counter() - t0
        if not (isinstance(outcome, SubmissionOutcome) and outcome.accepted):
            self.row(f"{n} executions running (immediate)", float("nan"), "s", f"submission not accepted: {outcome}")
            return False
        job = self.job_id = outcome.job_id
        limit = self.limits.place
        made, ran = Progress(n, t0), Progress(n, t0)
        # Both progress marks are taken on every change; the wait ends when all records exist.
        created = await self.wait(d.execs, lambda: [made.check(d.execs.count(job, 1)),
                                               ran.check(d.execs.count(job, 1, "running"))][0], limit)
        running = await self.wait(d.execs, lambda: ran.check(d.execs.count(job, 1, "running")),
                                      max(1.0, limit - (time.perf_counter() - t0)))
        after = d.meter.sample()
        total = time.perf_counter() - t0
        backlog, consumers = await rollout_backlog(d.bus)
        span = d.meter.span(before, after)
        if running is None:
            self.missed(f"{n} executions running (immediate)", "s", limit,
                        f"{d.execs.count(job, 1, 'running')} of {n} running (version 1 states "
                        f"{d.execs.states(job, 1)}); rollout-events backlog {backlog:,}; {cpu_note(span)}")
            return False
        created_s = accepted + (created or 0.0)
        # After the measured span: the backlog drains, the rollout record and rollouts.status say succeeded.
        drained = None
        t1 = time.perf_counter()
        while time.perf_counter() - t1 < limit:
            if (await rollout_backlog(d.bus))[0] == 0:
                drained = time.perf_counter() - t1
                break
            await asyncio.sleep(0.1)
        succeeded, said = await self.rollout_done(JOB, job, 1, max(1.0, limit - (time.perf_counter() - t1)))
        if succeeded is not None:
            succeeded += drained or 0.0
        drain = d.meter.span(after, d.meter.sample())
        status = await self.status(JOB)
        self.f.immediate_s = total
        self.f.placements_per_s = n / total
        self.f.backlog = backlog
        self.row(f"{n} executions running (immediate)", total, "s",
                 f"{n / total:,.0f} placements/s to running; submit accepted in {1000 * accepted:.0f} ms; all "
                 f"{n} execution records existed after {created_s:.1f} s ({made.note('records')}; "
                 f"{ran.note('running')}); then {said or 'the rollout'} said succeeded "
                 f"{_after(succeeded)} and rollouts.status says {status}; settled {waited:.1f} s before")
        for kind in (*KINDS, "total"):
            seconds = span.total(KINDS) if kind == "total" else span.cpu.get(kind, 0.0)
            # What the kind would have spent anyway over the phase (heartbeats, sweeps), at the idle
            # fleet's rate measured after registration: the rest is what placing cost.
            idle = self.f.idle_cores.get(kind, 0.0) * span.wall
            net = max(0.0, seconds - idle)
            self.f.cpu_per_placement_ms[kind] = 1000 * seconds / n
            self.f.cpu_net_ms[kind] = 1000 * net / n
            self.row(f"CPU per placement, {kind}", 1000 * seconds / n, "ms",
                     f"{seconds:.2f} CPU s over {span.wall:.1f} s ({seconds / span.wall:.2f} cores); net of the "
                     f"idle fleet's rate ({idle:.2f} s of it): {1000 * net / n:.3g} ms"
                     + (f"; {cpu_note(span)}" if kind == "total" else ""))
        self.f.cpu_per_placement_ms["bench"] = 1000 * span.cpu.get("bench", 0.0) / n
        self.row("rollout-events backlog when all were running", backlog, "messages",
                 f"pending + ack pending of {_consumers(consumers)} on {s.STREAM_EVENTS}; drained "
                 f"{_after(drained)}; CPU from all running until drained and "
                 f"succeeded (not in the per-placement rows): "
                 + ", ".join(f"{k} {drain.cpu.get(k, 0.0):.2f} s" for k in KINDS) + f" over {drain.wall:.1f} s")
        mem_total, note = memory_note(d.meter.memory())
        self.f.rss_mib = mem_total
        self.row("memory after placement", mem_total, "MiB", note)
        return succeeded is not None

    async def rollout_done(self, name: str, job: str, version: int, timeout: float) -> tuple[float | None, str]:
        """Seconds until the rollout of `version` succeeded, and who said so: its record in the rollouts
        bucket (followed here, no load on the service), or, if the record has not said so within 3 s (its
        layout may have changed), `rollouts.status` asked every half second."""
        d = self.d
        assert d.client is not None
        t0 = time.perf_counter()
        took = await self.wait(d.rollouts, lambda: d.rollouts.succeeded(job, version), min(3.0, timeout))
        if took is not None:
            return took, "the rollout record"
        while time.perf_counter() - t0 < timeout:
            if d.rollouts.succeeded(job, version):
                return time.perf_counter() - t0, "the rollout record"
            try:
                _, st = await d.client.rollout(s.ROLLOUT_STATUS, name)
                if st.job_version == version and st.state == "succeeded" and not st.rollback_of:
                    return time.perf_counter() - t0, "rollouts.status (the record did not say within 3 s)"
            except ShoalError:
                pass
            await asyncio.sleep(0.5)
        return None, ""

    async def status(self, job: str) -> str:
        assert self.d.client is not None
        try:
            _, st = await self.d.client.rollout(s.ROLLOUT_STATUS, job)
        except ShoalError as exc:
            return f"error {exc}"
        return f"{st.state} (version {st.job_version}, wave {st.current_wave} of {st.total_waves})"

    # -- 3 ------------------------------------------------------------------------------------------

    async def rolling(self) -> bool:
        d, n = self.d, self.d.nodes
        assert d.client is not None and d.bus is not None and self.job_id
        job = self.job_id
        waited, left = await settle(d.bus, 60)
        say(f"{self.tag}: rolling update to version 2, 4 waves of 25%, health interval 1s")
        spec = {"name": JOB, "type": "pipeline", "description": "version 2", "config": {"simulate": {}},
                "rollout": {"strategy": "rolling", "max_parallel": 25, "health_check": HEALTH}}
        events_from = (await d.bus.stream_info(s.STREAM_EVENTS))["last_seq"] + 1
        before = d.meter.sample()
        t0 = time.perf_counter()
        outcome = await d.client.submit(spec, wait=60)
        if not (isinstance(outcome, SubmissionOutcome) and outcome.accepted):
            self.row("rolling update", float("nan"), "s", f"not accepted: {outcome}")
            return False
        version = outcome.job_version
        limit = self.limits.rolling
        done = await self.wait(d.execs, lambda: d.execs.count(job, version, "running") >= n, limit)
        said = ""
        if done is not None:
            done, said = await self.rollout_done(JOB, job, version, max(1.0, limit - (time.perf_counter() - t0)))
        after = d.meter.sample()
        total = time.perf_counter() - t0
        span = d.meter.span(before, after)
        waves = sorted((w, at - t0) for (j, v, w), at in d.execs.wave_seen.items() if j == job and v == version)
        wave_note = ", ".join(f"wave {w} from {at:.1f} s" for w, at in waves)
        if done is None:
            r = d.rollouts.of(job)
            self.missed("rolling update, 4 waves of 25%", "s", limit,
                        f"{d.execs.count(job, version, 'running')} of {n} of version {version} running "
                        f"(states {d.execs.states(job, version)}); rollout record "
                        f"{(r.state, r.job_version, r.current_wave, r.message) if r else None}; {wave_note}; "
                        f"rollouts.status {await self.status(JOB)}; {cpu_note(span)}")
            return False
        stopped = await self.wait(d.execs, lambda: d.execs.count(job, 1, "running") == 0, 30)
        status = await self.status(JOB)
        n_waves = max(1, len(waves))
        ideal = n_waves * HEALTH_INTERVAL
        self.f.rolling_ratio = total / ideal
        self.row("rolling update, 4 waves of 25%", total, "s",
                 f"until all {n} of version {version} ran and {said} said succeeded ({wave_note}); "
                 f"version 1 all stopped {_after(stopped, 'then ')}; rollouts.status says {status}; ideal "
                 f"{n_waves} waves x {HEALTH_INTERVAL:.0f} s health interval = {ideal:.0f} s, measured/ideal "
                 f"{total / ideal:.1f}x; settled {waited:.1f} s before; {cpu_note(span)}")
        self.row("rolling update: measured / ideal", total / ideal, "x",
                 f"{total:.1f} s against {n_waves} x {HEALTH_INTERVAL:.0f} s")
        waves_seen = await wave_timeline(d.bus, events_from, job, version)
        if waves_seen:
            self.row("rolling update: time beyond the health interval per wave", waves_seen[0], "s",
                     f"median over the waves; {waves_seen[1]}")
        return True

    # -- 4 ------------------------------------------------------------------------------------------

    async def updates(self, count: int, size: int, strategy: str) -> bool:
        d = self.d
        assert d.client is not None and d.bus is not None
        groups, covered = [], 0
        for group, nodes in d.groups:
            if covered >= size:
                break
            groups.append(group)
            covered += nodes
        selector = {"match_expressions": [f"group in ({','.join(groups)})"]}
        rollout: dict[str, Any] = {"strategy": strategy}
        if strategy != "immediate":
            rollout.update(max_parallel=25, health_check=HEALTH)
        say(f"{self.tag}: a job on {covered} nodes (groups {groups[0]}..{groups[-1]}), then {count} updates")
        results: list[tuple[int, float, float, float]] = []  # version, wall, rollout CPU, total CPU
        rss: list[float] = []  # MiB resident in the rollout processes after each update
        job = ""
        for k in range(count + 1):
            await settle(d.bus, 60)
            spec = {"name": HISTORY_JOB, "type": "pipeline", "description": f"update {k}",
                    "config": {"simulate": {}}, "selector": selector, "rollout": rollout if k else
                    {"strategy": "immediate"}}
            before = d.meter.sample()
            t0 = time.perf_counter()
            outcome = await d.client.submit(spec, wait=60)
            if not (isinstance(outcome, SubmissionOutcome) and outcome.accepted):
                self.row(f"{count} updates of a {covered}-node job", float("nan"), "ms", f"update {k}: {outcome}")
                return False
            job, version = outcome.job_id, outcome.job_version
            done = await self.wait(d.execs, lambda: d.execs.count(job, version, "running") >= covered
                                   and d.execs.count(job, version - 1, "running") == 0, self.limits.update)
            if done is not None:
                left = max(1.0, self.limits.update - (time.perf_counter() - t0))
                done, _ = await self.rollout_done(HISTORY_JOB, job, version, left)
            if done is not None:  # the rollout service's share of the update ends when its events are handled
                while time.perf_counter() - t0 < self.limits.update and (await rollout_backlog(d.bus))[0]:
                    await asyncio.sleep(0.05)
            span = d.meter.span(before, d.meter.sample())
            wall = time.perf_counter() - t0
            if done is None:
                self.missed(f"{count} updates of a {covered}-node job", "ms", self.limits.update,
                            f"update {k} (version {version}): {d.execs.count(job, version, 'running')} of {covered} "
                            f"running, rollout {d.rollouts.of(job)}; after {len(results)} updates")
                return False
            if k:
                results.append((version, wall, span.cpu.get("rollout", 0.0), span.total(KINDS)))
                rss.append(d.meter.memory().get("rollout", (0, 0, 0))[1] / 1024)
        first, last = results[0], results[-1]
        ratio = last[2] / first[2] if first[2] else float("nan")
        self.f.update_ratio = ratio
        history = d.execs.totals
        kept = sum(n for (j, _), n in history.items() if j == job)
        series = ", ".join(f"{1000 * r[2]:.0f}" for r in results)
        self.row(f"{count} {strategy} updates of a {covered}-node job: rollout CPU, first update", 1000 * first[2],
                 "ms", f"version {first[0]}: {first[1]:.1f} s wall, all processes {first[3]:.2f} CPU s")
        self.row(f"{count} {strategy} updates of a {covered}-node job: rollout CPU, last update", 1000 * last[2],
                 "ms", f"version {last[0]}: {last[1]:.1f} s wall, all processes {last[3]:.2f} CPU s; the job has "
                       f"{kept:,} execution records by now")
        self.row(f"{count} {strategy} updates: rollout CPU last / first", ratio, "x",
                 f"rollout CPU ms per update, in order: {series}; wall s per update: "
                 + ", ".join(f"{r[1]:.1f}" for r in results)
                 + f"; rollout VmRSS after the first update {rss[0]:.0f} MiB, after the last {rss[-1]:.0f} MiB")
        return True


class Progress:
    """When a count first reached 10%, 50%, 90% of its target: the shape of a phase, not just its end."""

    MARKS = (0.1, 0.5, 0.9)

    def __init__(self, target: int, t0: float) -> None:
        self.target = target
        self.t0 = t0
        self.at: dict[float, float] = {}

    def check(self, count: int) -> bool:
        for mark in self.MARKS:
            if mark not in self.at and count >= mark * self.target:
                self.at[mark] = time.perf_counter() - self.t0
        return count >= self.target

    def note(self, what: str) -> str:
        return f"{what}: " + ", ".join(f"{100 * m:.0f}% after {self.at[m]:.1f} s" for m in self.MARKS if m in self.at)


def _consumers(found: dict[str, int]) -> str:
    """The durables found and what each held: all of them when few, else their number and the busy ones."""
    if not found:
        return "no durable named rollout*"
    if len(found) <= 3:
        return ", ".join(f"{k} {v:,}" for k, v in sorted(found.items()))
    busy = {k: v for k, v in found.items() if v}
    return (f"{len(found)} durables named rollout* ({', '.join(sorted(found)[:2])}, ...)"
            + (f", of which non-empty: {', '.join(f'{k} {v:,}' for k, v in sorted(busy.items()))}" if busy else
               ", all empty"))


def _after(seconds: float | None, prefix: str = "") -> str:
    return f"{prefix}{seconds:.1f} s later" if seconds is not None else "not within the limit"


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


async def measure(nodes: int, args: argparse.Namespace, phases: list[str], extended: bool,
                  rows: list[Result]) -> Figures:
    figures = Figures()
    scale = nodes / 100
    limits = Limits(register=args.register_limit or 60 + scale, place=args.place_limit or 60 + scale,
                    rolling=args.rolling_limit or 120 + scale, update=args.update_limit or 60 + scale / 10)
    d = Deployment(nodes, args.per_agent, args.replicas, args.service_log_level, keep=args.keep)
    run = Run(d, rows, figures, limits, args.idle_window)
    say(f"{run.tag}: starting nats-server and {len(SERVICES) * args.replicas} service processes in {d.tmp}")
    try:
        t0 = time.perf_counter()
        await d.start()
        say(f"{run.tag}: stack up in {time.perf_counter() - t0:.1f} s; load average {loadavg()}")
        ok = await run.register()
        if ok and "immediate" in phases:
            ok = await run.immediate()
        if ok and extended and "rolling" in phases:
            ok = await run.rolling()
        if ok and extended and args.updates:
            await run.updates(args.updates, args.update_nodes, args.update_strategy)
    finally:
        say(f"{run.tag}: stopping the stack; load average {loadavg()}")
        await d.close()
    return figures


def summary(sizes: list[int], figures: dict[int, Figures]) -> tuple[str, list[Result]]:
    """One table across sizes, each line with the ratio of the largest size to the smallest."""
    lo, hi = sizes[0], sizes[-1]
    lines: list[tuple[str, str, Callable[[Figures], float]]] = [
        ("register all nodes", "s", lambda f: f.register_s),
        ("all running (immediate)", "s", lambda f: f.immediate_s),
        ("placements/s", "/s", lambda f: f.placements_per_s),
    ]
    for kind in (*KINDS, "total", "bench"):
        lines.append((f"CPU per placement, {kind}", "ms",
                      lambda f, k=kind: f.cpu_per_placement_ms.get(k, float("nan"))))
    for kind in (*KINDS, "total"):
        lines.append((f"CPU per placement net of idle, {kind}", "ms",
                      lambda f, k=kind: f.cpu_net_ms.get(k, float("nan"))))
    lines.append(("rollout-events backlog when all running", "messages", lambda f: f.backlog))
    for kind in (*KINDS, "total"):
        lines.append((f"idle fleet, {kind}", "cores", lambda f, k=kind: f.idle_cores.get(k, float("nan"))))
    lines.append(("memory after placement", "MiB", lambda f: f.rss_mib))
    lines.append(("rolling update / ideal", "x", lambda f: f.rolling_ratio))
    lines.append(("rollout CPU per update, last / first", "x", lambda f: f.update_ratio))
    several = len(sizes) > 1
    head = ("| figure | unit | " + " | ".join(f"{n:,} nodes" for n in sizes)
            + (f" | {hi:,} / {lo:,} |" if several else " |"))
    out = [head, "| --- | --- | " + " | ".join("---:" for _ in sizes) + (" | ---: |" if several else " |")]
    results: list[Result] = []
    for name, unit, get in lines:
        values = [get(figures[n]) if n in figures else float("nan") for n in sizes]
        if all(v != v for v in values):  # every one NaN: the phase never ran
            continue
        first, last = values[0], values[-1]
        ratio = last / first if several and first == first and last == last and first else float("nan")
        cells = f"| {name} | {unit} | " + " | ".join(fmt(v) for v in values)
        out.append(cells + (f" | {fmt(ratio)}x |" if ratio == ratio else " | |" if several else " |"))
        if ratio == ratio:
            results.append(Result(f"deployed: {name}, {hi:,} / {lo:,} nodes", ratio, "x",
                                  ", ".join(f"{n:,}: {fmt(v)} {unit}" for n, v in zip(sizes, values))))
    return "\n".join(out), results


async def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--nodes", default="1000,5000,10000", help="fleet sizes, comma-separated; each a fresh stack"),
        p.add_argument("--per-agent", type=int, default=1000, help="simulated nodes per agent process"),
        p.add_argument("--replicas", type=int, default=1, help="processes of each service"),
        p.add_argument("--phases", default="register,immediate,rolling",
                       help=f"comma-separated subset of {','.join(PHASES)} (register always runs; updates "
                            "also runs when --updates is given)"),
        p.add_argument("--rolling-at", default="smallest", choices=("smallest", "all"),
                       help="sizes at which the rolling update and the updates run"),
        p.add_argument("--updates", type=int, default=0, help="update a job this many times in a row (0: skip)"),
        p.add_argument("--update-nodes", type=int, default=1000, help="nodes of the job that is updated"),
        p.add_argument("--update-strategy", default="immediate", choices=("immediate", "rolling")),
        p.add_argument("--idle-window", type=float, default=5.0, help="seconds of the idle-fleet measurement"),
        p.add_argument("--service-log-level", default="INFO", help="SHOAL_LOG_LEVEL of the stack's processes"),
        p.add_argument("--register-limit", type=float, default=0.0, help="seconds (default 60 + N/100)"),
        p.add_argument("--place-limit", type=float, default=0.0, help="seconds (default 60 + N/100)"),
        p.add_argument("--rolling-limit", type=float, default=0.0, help="seconds (default 120 + N/100)"),
        p.add_argument("--update-limit", type=float, default=0.0, help="seconds per update (default 60 + N/1000)"),
        p.add_argument("--keep", action="store_true", help="keep the data dirs and logs of the stacks"),
    ))
    # A SIGTERM (a CI timeout, kill) stops the stack as Ctrl-C does, instead of leaving its processes behind.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    sizes = [int(x.replace("_", "")) for x in args.nodes.split(",") if x.strip()]
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise SystemExit(f"unknown phase(s): {', '.join(sorted(unknown))}")
    if args.updates and "updates" not in phases:
        phases.append("updates")
    if "updates" in phases and not args.updates:
        args.updates = 20
    if "updates" not in phases:
        args.updates = 0
    rows: list[Result] = []
    figures: dict[int, Figures] = {}
    say(f"load average {loadavg()} on {CORES} cores")
    t0 = time.perf_counter()
    interrupted = False
    for nodes in sizes:
        size_rows: list[Result] = []
        extended = args.rolling_at == "all" or nodes == min(sizes)
        try:
            figures[nodes] = await measure(nodes, args, phases, extended, size_rows)
        except asyncio.CancelledError:  # SIGTERM: the stack is stopped; report what there is
            size_rows.append(Result(f"deployed {nodes} nodes: stopped by SIGTERM", float("nan"), "", ""))
            rows += size_rows
            print_table(size_rows, f"deployed, {nodes:,} nodes")
            interrupted = True
            break
        except Exception as exc:  # one size failing must not hide the others
            size_rows.append(Result(f"deployed {nodes} nodes: benchmark failed", float("nan"), "",
                                    f"{type(exc).__name__}: {exc}"))
        rows += size_rows
        print_table(size_rows, f"deployed, {nodes:,} nodes")
    table, ratios = summary(sizes, figures)
    say(f"deployed done in {time.perf_counter() - t0:.0f} s; load average {loadavg()}")
    if table.count("\n") > 1:  # a line beyond the header: some size measured something
        print(f"\n### deployed, across sizes\n\n{table}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows + ratios], indent=1))
    if interrupted:
        raise SystemExit(143)


if __name__ == "__main__":
    asyncio.run(main())

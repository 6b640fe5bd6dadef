"""Queries, as deployed: pages of ListJobExecutions and the view's catch-up, each against its floor.

The stack is `services.cli.stack.Stack` with nats-server and the query service only (`shoal serve query`,
each its own process: nothing else is needed to read, and nothing else then writes meanwhile). The
benchmark writes one job and `--executions` executions of it straight into the buckets (`Store`),
`--updates` more versions of each, so the events stream holds what a real fleet would have written, and
waits until the view has applied them all. Then, in one run, side by side:

1. Pages of 100 (`executions.list` of the job). One real first page is fetched and its bytes given to an
   echo: a separate process with a responder on the same transport (`shared.transport.ApiService`)
   that answers every request with those bytes. Both are asked the same requests (the query walks the
   job from page to page by next_token; the echo is sent the same request bodies), alternately, in
   rounds: serially (p50, p99) and with `--in-flight` requests outstanding (pages/s). CPU per page of
   the query process and of the echo process (utime + stime from /proc over their own rounds).
2. Materialization. A fresh query replica (`shoal serve query` on a new view file) catches up on the
   whole stream; it logs how many events it applied, in what time and CPU, once it has caught up. The
   same events are read by a plain consumer, a separate process (`--plain-consumer`): an ephemeral pull
   consumer (no acks), batches of 512, each event decoded (msgpack to the model), its JSON body encoded,
   and upserted into SQLite tables with the view's columns and indexes, one transaction per batch: what
   a view costs without snapshots, positions, metrics or the service around it. The two run back to back
   in each of `--catchup-rounds` rounds; the ratio reported is the median of the rounds' ratios (the pair
   of a round shares the machine's conditions), with the best of each and CPU per event beside it.

Nothing here asserts on timing: it prints figures and ratios measured side by side, with the load
average (other work may share the 2 cores: read the ratios and the CPU per operation).

    .venv/bin/python bench/query_deployed.py [--executions 10000] [--updates 2] [--limit 100]
        [--serial 600] [--in-flight 50] [--seconds 3] [--rounds 3] [--catchup-rounds 5] [--json FILE]
    .venv/bin/python bench/query_deployed.py --profile DIR   # the query processes under cProfile (figures
                                             # then include the profiler): DIR/query.prof, DIR/query-fresh-K.prof
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from common import Result, parse_args, percentile, print_table, say
from procstat import CORES, Meter, Span, loadavg

from services.cli.stack import Stack, shoal_command
from shared import subjects as s
from shared.durations import to_ns
from shared.models import DesiredState, Execution, ExecutionStatus, Job, JobSpec, JobState, Node, ObservedState
from shared.store import Store
from shared.transport import ApiRequest, ApiService, Bus

NAMESPACE = "default"
JOB = "bench-pages"
ECHO_SUBJECT = "bench.echo.executions.list"
BASE = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
CAUGHT_UP = re.compile(r"view caught up with the events stream: (\d+) events in ([\d.]+) s, ([\d.]+) s of CPU "
                       r"\(\d+ events/s, (\d+) batches\)")


# --------------------------------------------------------------------------------------------------
# The stack: nats-server and the query service, each its own process
# --------------------------------------------------------------------------------------------------


@dataclass
class QueryStack(Stack):
    """A stack of nats-server and the query service alone; with `profile`, the query process runs under
    cProfile and writes its profile there when it stops."""

    profile: str = ""

    def service_names(self) -> list[str]:
        return ["query"]

    def start_service(self, name: str) -> Any:
        if not self.profile:
            return super().start_service(name)
        return self.launch(name, [sys.executable, "-m", "cProfile", "-o", str(Path(self.profile) / f"{name}.prof"),
                                  "-m", "services.cli", *self.service_args(name)])


class _Tail(msgspec.Struct):
    """What a client needs of a page to go on: the items (left undecoded) and the token."""

    items: list[msgspec.Raw] = msgspec.field(default_factory=list)
    next_token: str = ""


_TAIL = msgspec.json.Decoder(_Tail)


def make_job() -> Job:
    spec = JobSpec(name=JOB, type="pipeline", namespace=NAMESPACE, config={"simulate": {}})
    return Job(id=str(uuid.uuid4()), name=JOB, namespace=NAMESPACE, type="pipeline", version=1,
               state=JobState(state_type="running"), spec=spec, created_at=BASE, modified_at=BASE, revision=1)


def make_execution(job: Job, i: int) -> Execution:
    """As a placement writes one: a running execution on its node, carrying its job spec."""
    created = BASE + dt.timedelta(milliseconds=i)
    return Execution(
        id=str(uuid.uuid4()), eval_id="eval-1", job_id=job.id, job_type="pipeline", job_version=1,
        namespace=NAMESPACE, node_id=f"sim-{i:05d}",
        status=ExecutionStatus(created_at=created, updated_at=created, revision=1,
                               desired_state=DesiredState(state_type="running"),
                               observed_state=ObservedState(state_type="starting")),
        job_spec=job.spec,
    )


@dataclass
class Bench:
    args: argparse.Namespace
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="shoal-query-deployed-")))
    stack: QueryStack | None = None
    bus: Bus | None = None
    rows: list[Result] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.meter = Meter(self.pids)

    def pids(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {"bench": [os.getpid()]}
        if self.stack is None:
            return out
        for name in list(self.stack.children):
            proc = self.stack.process(name)
            if proc is not None and proc.poll() is None:
                kind = "nats-server" if name == "nats" else name
                out.setdefault(kind, []).append(proc.pid)
        return out

    def row(self, name: str, figure: float, unit: str, notes: str) -> None:
        self.rows.append(Result(name, figure, unit, notes))

    # -- setting up --------------------------------------------------------------------------------

    async def start(self) -> None:
        env = {"SHOAL_LOG_LEVEL": "INFO"}
        profile = ""
        if self.args.profile:
            Path(self.args.profile).mkdir(parents=True, exist_ok=True)
            profile = str(Path(self.args.profile).resolve())
        self.stack = QueryStack(self.tmp / "stack", nodes=0, simulate=0, env=env, profile=profile)
        self.stack.start()
        self.bus = await Bus.connect(self.stack.nats_url, name="bench-query-deployed", wait=15)
        await self.until_answers(s.api(NAMESPACE, s.JOBS_LIST), b"{}", "query")

    async def until_answers(self, subject: str, body: bytes, name: str, timeout: float = 60.0) -> None:
        assert self.bus is not None and self.stack is not None
        deadline = time.perf_counter() + timeout
        while True:
            if self.stack.dead():
                raise RuntimeError(f"{self.stack.dead()} exited: {self.stack.log(self.stack.dead()[0])[-800:]}")
            try:
                await self.bus.nc.request(subject, body, timeout=1)
                return
            except Exception:
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"{name} does not answer on {subject} after {timeout:.0f} s") from None
                await asyncio.sleep(0.1)

    async def fill(self) -> int:
        """Write the job and its executions (and their later versions) into the buckets; wait until the
        query view has applied the whole events stream. Returns the stream's last sequence."""
        assert self.bus is not None
        store = Store(self.bus)
        job = make_job()
        await store.jobs.put(s.job_key(job.namespace, job.id), job)
        n, chunk = self.args.executions, 1000
        say(f"writing {n:,} executions and {self.args.updates} more version(s) of each into the executions bucket")
        t0 = time.perf_counter()
        executions = [make_execution(job, i) for i in range(n)]
        states = ["running", "running", "completed"]
        for version in range(self.args.updates + 1):
            for start in range(0, n, chunk):
                batch = executions[start:start + chunk]
                if version:
                    for e in batch:
                        e.status.revision += 1
                        e.status.updated_at = e.status.updated_at + dt.timedelta(seconds=1)
                        e.status.observed_state = ObservedState(state_type=states[(version - 1) % len(states)])
                await asyncio.gather(*(store.executions.put(e.key, e) for e in batch))
        written = time.perf_counter() - t0
        # The events stream sources the buckets on the server, a moment behind the writes.
        expected = 1 + n * (self.args.updates + 1)
        deadline = time.perf_counter() + 60
        while (last := (await self.bus.stream_info(s.STREAM_EVENTS))["last_seq"]) < expected:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"the events stream holds {last:,} events, not {expected:,}, after 60 s")
            await asyncio.sleep(0.05)
        applied = await self.until_applied(self.tmp / "stack" / "query.db", last, 120)
        say(f"{last:,} events written in {written:.1f} s; the view had them all {applied:.1f} s later")
        return last

    async def until_applied(self, db: Path, seq: int, timeout: float) -> float:
        """Seconds until the view file at `db` has committed stream sequence `seq` (read from its meta)."""
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if db.exists():
                try:
                    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
                        got = conn.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()
                    if got is not None and int(got[0]) >= seq:
                        return time.perf_counter() - t0
                except sqlite3.Error:
                    pass
            await asyncio.sleep(0.05)
        raise RuntimeError(f"the view at {db} did not reach sequence {seq} within {timeout:.0f} s")

    # -- 1. pages ----------------------------------------------------------------------------------

    def request(self, token: str = "") -> bytes:
        body: dict[str, Any] = {"job": JOB, "limit": self.args.limit}
        if token:
            body["next_token"] = token
        return json.dumps(body).encode()

    async def ask(self, subject: str, body: bytes) -> _Tail:
        assert self.bus is not None
        msg = await self.bus.nc.request(subject, body, timeout=30)
        if msg.headers and msg.headers.get("Nats-Service-Error-Code"):
            raise RuntimeError(f"{subject}: {msg.data[:300]!r}")
        return _TAIL.decode(msg.data)

    async def pages(self) -> None:
        assert self.bus is not None and self.stack is not None
        args = self.args
        query_subject = s.api(NAMESPACE, s.EXECUTIONS_LIST)
        first = await self.bus.nc.request(query_subject, self.request(), timeout=30)
        reply_file = self.tmp / "page.json"
        reply_file.write_bytes(first.data)
        self.stack.launch("echo", [sys.executable, str(Path(__file__).resolve()), "--echo", ECHO_SUBJECT,
                                   "--reply-file", str(reply_file), "--nats-url", self.stack.nats_url])
        await self.until_answers(ECHO_SUBJECT, b"{}", "echo")
        page_bytes = len(first.data)
        say(f"a page of {args.limit} is {page_bytes:,} bytes; load average {loadavg()}")

        # The request bodies of a walk, recorded as the query is walked, are what the echo is sent.
        bodies: list[bytes] = []
        walk = {"token": ""}

        async def query_next() -> None:
            body = self.request(walk["token"])
            tail = await self.ask(query_subject, body)
            if len(tail.items) != args.limit and tail.next_token:
                raise RuntimeError(f"a page of {len(tail.items)} items, not {args.limit}")
            walk["token"] = tail.next_token
            if len(bodies) < 1000:
                bodies.append(body)

        def echo_body(k: int) -> bytes:
            return bodies[k % len(bodies)] if bodies else self.request()

        # serial: rounds of `per_round` requests, the query first, then the echo
        per_round = max(1, args.serial // args.rounds)
        lat: dict[str, list[float]] = {"query": [], "echo": []}
        cpu: dict[str, list[Span]] = {"query": [], "echo": []}
        served = {"query": 0, "echo": 0}
        for _ in range(20):  # warm-up of both (SQLite's page cache, the connections' buffers)
            await query_next()
            await self.ask(ECHO_SUBJECT, echo_body(0))
        say(f"serial: {args.rounds} rounds of {per_round} requests to each")
        for _ in range(args.rounds):
            for target in ("query", "echo"):
                before = self.meter.sample()
                for k in range(per_round):
                    t0 = time.perf_counter()
                    if target == "query":
                        await query_next()
                    else:
                        await self.ask(ECHO_SUBJECT, echo_body(k))
                    lat[target].append(time.perf_counter() - t0)
                cpu[target].append(self.meter.span(before, self.meter.sample()))
                served[target] += per_round
        serial_cpu = {t: sum(sp.cpu.get(t, 0.0) for sp in cpu[t]) / served[t] for t in cpu}
        serial_nats = {t: sum(sp.cpu.get("nats-server", 0.0) for sp in cpu[t]) / served[t] for t in cpu}
        p50 = {t: percentile(lat[t], 50) for t in lat}
        p99 = {t: percentile(lat[t], 99) for t in lat}
        for t in ("query", "echo"):
            self.row(f"page of {args.limit}, serial: {t}", 1000 * p50[t], "ms p50",
                     f"p99 {1000 * p99[t]:.2f} ms over {len(lat[t])} requests ({page_bytes:,} bytes a reply); "
                     f"CPU per page: {t} process {1000 * serial_cpu[t]:.3f} ms, nats-server "
                     f"{1000 * serial_nats[t]:.3f} ms")
        self.row(f"page of {args.limit}, serial p50: query / echo", p50["query"] / p50["echo"], "x",
                 "target: at most 2x")

        # in flight: `in_flight` requesters for `seconds`, the query and the echo alternately
        done: dict[str, int] = {"query": 0, "echo": 0}
        wall: dict[str, float] = {"query": 0.0, "echo": 0.0}
        flight_cpu: dict[str, list[Span]] = {"query": [], "echo": []}
        flight_lat: dict[str, list[float]] = {"query": [], "echo": []}
        say(f"{args.in_flight} in flight: {args.rounds} rounds of {args.seconds:.1f} s each")

        async def requester(target: str, stop_at: float, seed: int) -> None:
            token = ""
            k = seed
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                if target == "query":
                    token = (await self.ask(query_subject, self.request(token))).next_token
                else:
                    await self.ask(ECHO_SUBJECT, echo_body(k))
                    k += 1
                flight_lat[target].append(time.perf_counter() - t0)
                done[target] += 1

        for _ in range(args.rounds):
            for target in ("query", "echo"):
                before = self.meter.sample()
                t0 = time.perf_counter()
                stop_at = t0 + args.seconds
                await asyncio.gather(*(requester(target, stop_at, 7 * k) for k in range(args.in_flight)))
                wall[target] += time.perf_counter() - t0
                flight_cpu[target].append(self.meter.span(before, self.meter.sample()))
        rate = {t: done[t] / wall[t] for t in done}
        flight_per = {t: sum(sp.cpu.get(t, 0.0) for sp in flight_cpu[t]) / done[t] for t in done}
        flight_nats = {t: sum(sp.cpu.get("nats-server", 0.0) for sp in flight_cpu[t]) / done[t] for t in done}
        flight_bench = {t: sum(sp.cpu.get("bench", 0.0) for sp in flight_cpu[t]) / done[t] for t in done}
        cores = {t: sum(sp.cpu.get(t, 0.0) for sp in flight_cpu[t]) / wall[t] for t in done}
        machine = {t: sum(sp.machine_busy * sp.wall for sp in flight_cpu[t]) / wall[t] for t in done}
        for t in ("query", "echo"):
            self.row(f"page of {args.limit}, {args.in_flight} in flight: {t}", rate[t], "pages/s",
                     f"{done[t]:,} pages in {wall[t]:.1f} s; p50 {1000 * percentile(flight_lat[t], 50):.1f} ms, "
                     f"p99 {1000 * percentile(flight_lat[t], 99):.1f} ms; CPU per page: {t} process "
                     f"{1000 * flight_per[t]:.3f} ms ({cores[t]:.2f} cores), nats-server "
                     f"{1000 * flight_nats[t]:.3f} ms, the requesting process {1000 * flight_bench[t]:.3f} ms; "
                     f"machine {machine[t]:.2f} of {CORES} cores busy")
        self.row(f"page of {args.limit}, {args.in_flight} in flight: query / echo", rate["query"] / rate["echo"], "x",
                 "throughput; target: at least 0.5x")
        all_cpu = {t: (serial_cpu[t] * served[t] + flight_per[t] * done[t]) / (served[t] + done[t]) for t in done}
        self.row(f"page of {args.limit}: CPU per page, query / echo", all_cpu["query"] / all_cpu["echo"], "x",
                 f"query {1000 * all_cpu['query']:.3f} ms, echo {1000 * all_cpu['echo']:.3f} ms per page over "
                 f"{served['query'] + done['query']:,} and {served['echo'] + done['echo']:,} pages (serial: "
                 f"{serial_cpu['query'] / serial_cpu['echo']:.2f}x, {args.in_flight} in flight: "
                 f"{flight_per['query'] / flight_per['echo']:.2f}x); target: at most 4x")
        proc = self.stack.process("echo")
        if proc is not None:
            proc.terminate()
            await asyncio.to_thread(proc.wait, 15)

    # -- 2. materialization ------------------------------------------------------------------------

    async def materialization(self, last: int) -> None:
        assert self.stack is not None
        args = self.args
        plain: list[tuple[int, float, float, int]] = []  # events, wall, CPU, batches
        replica: list[tuple[int, float, float, int]] = []
        say(f"materialization: {args.catchup_rounds} rounds of a plain consumer and a fresh query replica, "
            f"{last:,} events; load average {loadavg()}")
        for k in range(args.catchup_rounds):
            out = self.tmp / f"plain-{k}.json"
            db = self.tmp / f"plain-{k}.db"
            name = f"plain-consumer-{k}"
            proc = self.stack.launch(name, [sys.executable, str(Path(__file__).resolve()), "--plain-consumer",
                                            "--nats-url", self.stack.nats_url, "--db", str(db), "--through",
                                            str(last), "--out", str(out)])
            code = await asyncio.to_thread(proc.wait, 300)
            if code != 0 or not out.exists():
                raise RuntimeError(f"the plain consumer exited with {code}: {self.stack.log(name)[-800:]}")
            got = json.loads(out.read_text())
            plain.append((got["events"], got["wall"], got["cpu"], got["batches"]))

            name = f"query-fresh-{k}"
            db = self.tmp / f"{name}.db"
            command = shoal_command("serve", "query", "--db", str(db))
            if self.stack.profile:
                command[1:3] = ["-m", "cProfile", "-o", str(Path(self.stack.profile) / f"{name}.prof"), "-m",
                                "services.cli"]
            proc = self.stack.launch(name, command)
            t0 = time.perf_counter()
            found = None
            while time.perf_counter() - t0 < 300 and found is None:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited: {self.stack.log(name)[-800:]}")
                found = CAUGHT_UP.search(self.stack.log(name))
                await asyncio.sleep(0.05)
            proc.terminate()
            await asyncio.to_thread(proc.wait, 15)
            if found is None:
                raise RuntimeError(f"{name} did not say it caught up: {self.stack.log(name)[-800:]}")
            replica.append((int(found[1]), float(found[2]), float(found[3]), int(found[4])))
        best_plain = min(plain, key=lambda r: r[1])
        best_replica = min(replica, key=lambda r: r[1])
        for what, runs, best in (("plain consumer", plain, best_plain), ("fresh query replica", replica, best_replica)):
            self.row(f"materialization: {what}", best[0] / best[1], "events/s",
                     f"best of {len(runs)}: {best[0]:,} events in {best[1]:.2f} s, {1e6 * best[2] / best[0]:.1f} us "
                     f"CPU per event ({100 * best[2] / best[1]:.0f}% of a core), {best[3]:,} batches; runs: "
                     + ", ".join(f"{r[0] / r[1]:,.0f}/s" for r in runs))
        # Each round runs the two back to back: their ratio is the least disturbed by other work on the machine.
        paired = sorted((p[1] / p[0]) / (r[1] / r[0]) for p, r in zip(plain, replica))
        cpu_plain = sum(p[2] for p in plain) / sum(p[0] for p in plain)
        cpu_replica = sum(r[2] for r in replica) / sum(r[0] for r in replica)
        self.row("materialization: fresh replica / plain consumer", percentile(paired, 50), "x",
                 f"events/s, median of the {len(paired)} rounds' ratios ({', '.join(f'{x:.2f}' for x in paired)}); "
                 f"best against best {best_plain[1] / best_replica[1]:.2f}x; CPU per event, all rounds: replica "
                 f"{1e6 * cpu_replica:.1f} us, plain consumer {1e6 * cpu_plain:.1f} us (plain / replica "
                 f"{cpu_plain / cpu_replica:.2f}x); target: at least 0.8x")

    async def close(self) -> None:
        if self.bus is not None:
            try:
                await asyncio.wait_for(self.bus.close(), 10)
            except Exception:
                pass
        if self.stack is not None:
            self.stack.stop()
        if self.args.keep:
            say(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# The echo and the plain consumer: each run as its own process by the benchmark
# --------------------------------------------------------------------------------------------------


async def echo(args: argparse.Namespace) -> None:
    """Answer every request on `args.echo` with the bytes of `args.reply_file`, on the services' transport."""
    reply = Path(args.reply_file).read_bytes()

    async def answer(req: ApiRequest) -> bytes:
        return reply

    bus = await Bus.connect(args.nats_url, name="bench-echo", wait=15)
    await ApiService.start(bus, "bench-echo", "0.1.0", "replies with one fixed page", queue_group="bench",
                           endpoints=[("echo", args.echo, answer)])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await bus.close()


_COLUMNS = {
    "executions": "id TEXT PRIMARY KEY, namespace TEXT, job_id TEXT, job_version INTEGER, node_id TEXT, state TEXT, "
                  "created_at INTEGER, updated_at INTEGER, revision INTEGER, body BLOB",
    "jobs": "id TEXT PRIMARY KEY, namespace TEXT, name TEXT, version INTEGER, type TEXT, state TEXT, "
            "created_at INTEGER, modified_at INTEGER, revision INTEGER, body BLOB",
    "nodes": "id TEXT PRIMARY KEY, state TEXT, labels TEXT, revision INTEGER, body BLOB",
}
_INDEXES = [  # the view's
    "CREATE INDEX executions_job_created ON executions (namespace, job_id, job_version, created_at, id)",
    "CREATE INDEX executions_job_updated ON executions (namespace, job_id, job_version, updated_at, id)",
    "CREATE INDEX executions_ns_created ON executions (namespace, created_at, id)",
    "CREATE INDEX executions_ns_updated ON executions (namespace, updated_at, id)",
    "CREATE INDEX executions_node ON executions (namespace, node_id, created_at, id)",
    "CREATE INDEX jobs_name ON jobs (namespace, name)",
    "CREATE INDEX jobs_created ON jobs (namespace, created_at, id)",
    "CREATE INDEX jobs_modified ON jobs (namespace, modified_at, id)",
]


def _upsert(table: str) -> str:
    names = [c.split()[0] for c in _COLUMNS[table].split(", ")]
    return (f"INSERT INTO {table} VALUES ({', '.join('?' * len(names))}) ON CONFLICT (id) DO UPDATE SET "
            + ", ".join(f"{c} = excluded.{c}" for c in names[1:]) + f" WHERE excluded.revision > {table}.revision")


async def plain_consumer(args: argparse.Namespace) -> None:
    """Read EVENTS from the start through `args.through` with a plain pull consumer, decode each event and
    upsert it into SQLite; write the count, wall and CPU seconds (from the consumer's creation) as JSON.
    It fetches as every reader of shoal's does (`Pull`), so the comparison is of what each does with an event."""
    from nats.js import api

    from shared.transport import Pull

    db = sqlite3.connect(args.db, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    for table, columns in _COLUMNS.items():
        db.execute(f"CREATE TABLE {table} ({columns})")
    for index in _INDEXES:
        db.execute(index)
    upserts = {table: _upsert(table) for table in _COLUMNS}
    decoders = {"executions": msgspec.msgpack.Decoder(Execution), "jobs": msgspec.msgpack.Decoder(Job),
                "nodes": msgspec.msgpack.Decoder(Node)}
    json_encode = msgspec.json.Encoder().encode
    prefixes = ((s.EVENTS_EXECUTION + ".", "executions"), (s.EVENTS_JOB + ".", "jobs"), (s.EVENTS_NODE + ".", "nodes"))
    bus = await Bus.connect(args.nats_url, name="bench-plain-consumer", wait=15)
    t0, c0 = time.perf_counter(), time.process_time()
    config = api.ConsumerConfig(ack_policy=api.AckPolicy.NONE, deliver_policy=api.DeliverPolicy.ALL,
                                mem_storage=True, num_replicas=1, inactive_threshold=30.0)
    info = await bus.js.add_consumer(s.STREAM_EVENTS, config=config)
    pull = Pull(bus, s.STREAM_EVENTS, info.name)
    seen = last = batches = 0
    while last < args.through:
        msgs = await pull.fetch(512, 5.0)
        batches += 1
        rows: dict[str, list[tuple[Any, ...]]] = {"executions": [], "jobs": [], "nodes": []}
        for msg in msgs:
            last = msg.metadata.sequence.stream
            seen += 1
            for prefix, table in prefixes:
                if msg.subject.startswith(prefix):
                    value = decoders[table].decode(msg.data)
                    if table == "executions":
                        st = value.status
                        rows[table].append((value.id, value.namespace, value.job_id, value.job_version,
                                            value.node_id, st.observed_state.state_type, to_ns(st.created_at),
                                            to_ns(st.updated_at), st.revision, json_encode(value)))
                    elif table == "jobs":
                        rows[table].append((value.id, value.namespace, value.name, value.version, value.type,
                                            value.state.state_type, to_ns(value.created_at),
                                            to_ns(value.modified_at), value.revision, json_encode(value)))
                    else:
                        rows[table].append((value.id, value.state.state_type, json.dumps(value.labels, sort_keys=True),
                                            value.revision, json_encode(value)))
                    break
        db.execute("BEGIN")
        for table, batch in rows.items():
            if batch:
                db.executemany(upserts[table], batch)
        db.execute("COMMIT")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    Path(args.out).write_text(json.dumps({"events": seen, "wall": wall, "cpu": cpu, "batches": batches}))
    await bus.close()


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


async def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--executions", type=int, default=10_000, help="executions of the job"),
        p.add_argument("--updates", type=int, default=2, help="later versions written of every execution"),
        p.add_argument("--limit", type=int, default=100, help="executions per page"),
        p.add_argument("--serial", type=int, default=600, help="serial requests to each of query and echo"),
        p.add_argument("--in-flight", type=int, default=50, help="requests outstanding at once"),
        p.add_argument("--seconds", type=float, default=3.0, help="seconds of each in-flight round"),
        p.add_argument("--rounds", type=int, default=3, help="alternating rounds of query and echo"),
        p.add_argument("--catchup-rounds", type=int, default=5, help="alternating rounds of the catch-ups"),
        p.add_argument("--skip-pages", action="store_true"),
        p.add_argument("--skip-materialization", action="store_true"),
        p.add_argument("--profile", default="", help="run the query process under cProfile, profiles into DIR"),
        p.add_argument("--keep", action="store_true", help="keep the data dir and logs"),
        # the child processes' modes
        p.add_argument("--echo", default="", help=argparse.SUPPRESS),
        p.add_argument("--reply-file", default="", help=argparse.SUPPRESS),
        p.add_argument("--plain-consumer", action="store_true", help=argparse.SUPPRESS),
        p.add_argument("--nats-url", default="", help=argparse.SUPPRESS),
        p.add_argument("--db", default="", help=argparse.SUPPRESS),
        p.add_argument("--through", type=int, default=0, help=argparse.SUPPRESS),
        p.add_argument("--out", default="", help=argparse.SUPPRESS),
    ))
    if args.echo:
        return await echo(args)
    if args.plain_consumer:
        return await plain_consumer(args)
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    say(f"load average {loadavg()} on {CORES} cores")
    bench = Bench(args)
    t0 = time.perf_counter()
    try:
        await bench.start()
        last = await bench.fill()
        if not args.skip_pages:
            await bench.pages()
        if not args.skip_materialization:
            await bench.materialization(last)
    except Exception as exc:
        bench.row("query as deployed: benchmark failed", float("nan"), "", f"{type(exc).__name__}: {exc}")
        raise
    finally:
        say(f"stopping the stack; load average {loadavg()}")
        await bench.close()
        print_table(bench.rows, f"queries, as deployed (load average at the end {loadavg()}, "
                                f"{time.perf_counter() - t0:.0f} s)")
        if args.json:
            Path(args.json).write_text(json.dumps([r.__dict__ for r in bench.rows], indent=1))


if __name__ == "__main__":
    asyncio.run(main())

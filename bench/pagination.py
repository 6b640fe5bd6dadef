"""Pagination: the SQLite view alone, then ListJobExecutions over NATS.

a. View only (no NATS). 200,000 executions over 10 jobs are applied to a `View` in batches of 5,000
   (`View.apply`, the query service's own write path: msgpack decode, JSON body, upsert, one
   transaction per batch). Then a page of 50 rows is read the way `QueryService._page` builds it
   (ORDER BY created_at, id with `(created_at, id) > (?, ?)` from the token), at the first page and deep
   in the listing, against the same page read with OFFSET. Deep means the token sits at row 150,000 of
   the listing: with 10 jobs of 20,000 rows that position exists in the namespace-wide listing
   (no job filter, index executions_ns_created); inside one job the same relative depth (75%) is row
   15,000 (index executions_job_created). Both are reported. Finally the deep page is read again while
   a writer applies 50,000 more rows, to see what inserts do to readers (WAL: one writer, many readers).

b. Over NATS. A QueryService runs in this process on its own view; 100,000 executions (10 jobs of
   10,000) are written to the executions bucket with `Store.executions.put` (asyncio.gather in chunks);
   the server sources them into the EVENTS stream and the service materializes them. Then pages of 50
   through `Client.list_executions`: serially, and with 16 concurrent requesters; and a whole job
   (10,000 executions) walked with limit 1000 (`Client.all_executions`).

    .venv/bin/python bench/pagination.py [--rows 200000] [--nats-rows 100000]
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path

import msgspec
from common import CpuMeter, Result, Stack, finish, ms, parse_args, percentile, say

from services.query.view import Event, View, as_of
from shared import subjects as s
from shared.api import ListJobExecutionsRequest, ListJobExecutionsResponse
from shared.codec import from_json, to_json, to_msgpack
from shared.errors import InvalidInput
from shared.models import DesiredState, Execution, ExecutionStatus, Job, JobSpec, JobState, ObservedState
from shared.store import Store
from shared.transport import Consumer, ConsumerSpec, OrderedReader

BASE = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
NAMESPACE = "default"
PAGE = 50


def make_job(name: str) -> Job:
    spec = JobSpec(name=name, type="pipeline", namespace=NAMESPACE, config={"simulate": {}})
    return Job(id=str(uuid.uuid4()), name=name, namespace=NAMESPACE, type="pipeline", version=1,
               state=JobState(state_type="running"), spec=spec, created_at=BASE, modified_at=BASE, revision=1)


def make_execution(job: Job, node: str, created: dt.datetime) -> Execution:
    """As tests/integration/test_query.py builds them: a running execution carrying its job spec."""
    return Execution(
        id=str(uuid.uuid4()), eval_id="e", job_id=job.id, job_type="pipeline", job_version=1,
        namespace=job.namespace, node_id=node,
        status=ExecutionStatus(created_at=created, updated_at=created, revision=1,
                               desired_state=DesiredState(state_type="running"),
                               observed_state=ObservedState(state_type="running")),
        job_spec=job.spec,
    )


def execution_events(jobs: list[Job], start: int, count: int, seq0: int) -> list[Event]:
    """Events of executions start..start+count: round-robin over jobs, 1 ms apart, 1000 nodes."""
    events = []
    for i in range(start, start + count):
        job = jobs[i % len(jobs)]
        e = make_execution(job, f"node-{i % 1000:04d}", BASE + dt.timedelta(milliseconds=i))
        subject = f"{s.EVENTS_EXECUTION}.{e.key}"
        events.append(Event(subject, to_msgpack(e), False, seq0 + i))
    return events


# The reads of QueryService._page (created_at order, ascending), with and without a job filter: keyset
# pages read as of a snapshot sequence (`as_of`), and the OFFSET read they are compared with.
def page_query(job: Job | None, position: tuple | None, seq: int, offset: int | None = None) -> tuple[str, list]:
    where, params = ["namespace = ?"], [NAMESPACE]
    if job is not None:
        where += ["job_id = ?", "job_version = ?"]
        params += [job.id, 1]
    if offset is not None:
        return (f"SELECT body, created_at, id FROM executions WHERE {' AND '.join(where)} "
                f"ORDER BY created_at ASC, id ASC LIMIT ? OFFSET ?", [*params, PAGE + 1, offset])
    if position is not None:
        where.append("(created_at, id) > (?, ?)")
        params += list(position)
    return as_of("executions", "body, created_at, id", where, params, "created_at ASC, id ASC", seq, PAGE + 1)


async def timed_rows(view: View, sql: str, params: list, reps: int, budget: float) -> list[float]:
    """Latencies (s) of `reps` reads through the view's reader (aiosqlite), stopping after `budget` s."""
    out: list[float] = []
    end = time.perf_counter() + budget
    for _ in range(reps):
        t0 = time.perf_counter()
        rows = await view.rows(sql, params)
        out.append(time.perf_counter() - t0)
        assert len(rows) == PAGE + 1, (len(rows), sql)
        if time.perf_counter() > end:
            break
    return out


def direct_rows(path: str, sql: str, params: list, reps: int) -> list[float]:
    """The same read on a plain sqlite3 connection: the SQL cost without aiosqlite's thread hop."""
    conn = sqlite3.connect(path)
    try:
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            conn.execute(sql, params).fetchall()
            out.append(time.perf_counter() - t0)
        return out
    finally:
        conn.close()


async def view_only(tmp, total: int, batch: int) -> list[Result]:
    rows: list[Result] = []
    jobs = [make_job(f"job-{j}") for j in range(10)]
    path = str(tmp / "view-only.db")
    view = View(path)
    await view.open()
    try:
        # Job records first (ListJobExecutions resolves the job by name), then the executions.
        job_events = [Event(f"{s.EVENTS_JOB}.{j.namespace}.{j.id}", to_msgpack(j), False, k + 1)
                      for k, j in enumerate(jobs)]
        await view.apply(job_events)
        say(f"view only: applying {total:,} executions in batches of {batch:,}")
        apply_time = 0.0
        gen_time = 0.0
        batch_times = []
        for start in range(0, total, batch):
            g0 = time.perf_counter()
            events = execution_events(jobs, start, min(batch, total - start), seq0=100)
            t0 = time.perf_counter()
            await view.apply(events)
            t1 = time.perf_counter()
            gen_time += t0 - g0
            apply_time += t1 - t0
            batch_times.append(t1 - t0)
        first_batches = sum(batch_times[:4]) / 4
        last_batches = sum(batch_times[-4:]) / 4
        rows.append(Result(
            f"view: apply {total // 1000}k executions (batches of {batch:,})",
            total / apply_time, "rows/s",
            f"{apply_time:.1f} s in View.apply (decode + JSON body + upsert + commit); a batch of {batch:,} took "
            f"{ms(first_batches):.0f} ms at the start, {ms(last_batches):.0f} ms at the end (5 indexes grow); "
            f"building the events took another {gen_time:.1f} s, not counted"))

        # --- page latency -------------------------------------------------------------------------
        job = jobs[3]
        per_job = total // len(jobs)
        deep_job = int(per_job * 0.75)
        deep_ns = min(150_000, int(total * 0.75))
        pos_job = await view.one(
            "SELECT created_at, id FROM executions WHERE namespace = ? AND job_id = ? AND job_version = 1 "
            "ORDER BY created_at, id LIMIT 1 OFFSET ?", (NAMESPACE, job.id, deep_job - 1))
        pos_ns = await view.one(
            "SELECT created_at, id FROM executions WHERE namespace = ? ORDER BY created_at, id LIMIT 1 OFFSET ?",
            (NAMESPACE, deep_ns - 1))
        assert pos_job is not None and pos_ns is not None
        seq = view.last_seq
        cases = {
            # name: (sql, params, reps); _page asks for one more row to know whether a next page exists
            "job first": (*page_query(job, None, seq), 3000),
            "job keyset deep": (*page_query(job, pos_job, seq), 3000),
            "job offset deep": (*page_query(job, None, seq, offset=deep_job), 300),
            "ns first": (*page_query(None, None, seq), 3000),
            "ns keyset deep": (*page_query(None, pos_ns, seq), 3000),
            "ns offset deep": (*page_query(None, None, seq, offset=deep_ns), 100),
        }
        lat: dict[str, list[float]] = {}
        for name, (sql, params, reps) in cases.items():
            await timed_rows(view, sql, params, 20, 1.0)  # warm the page cache
            lat[name] = await timed_rows(view, sql, params, reps, budget=6.0)
            say(f"  {name}: p50 {ms(percentile(lat[name], 50)):.3f} ms over {len(lat[name])} reads")
        direct = {name: direct_rows(path, cases[name][0], cases[name][1], 2000)
                  for name in ("job keyset deep", "ns keyset deep")}

        def p(name: str, q: float) -> float:
            return ms(percentile(lat[name], q))

        for scope, deep_row, label in (("job", deep_job, f"one job of {per_job:,}"),
                                       ("ns", deep_ns, f"whole namespace, {total:,} rows")):
            first, deep, off = f"{scope} first", f"{scope} keyset deep", f"{scope} offset deep"
            rows.append(Result(f"view: keyset page of 50, first page ({label})", p(first, 50), "ms p50",
                               f"p99 {p(first, 99):.3f} ms; {len(lat[first])} reads through aiosqlite"))
            rows.append(Result(f"view: keyset page of 50 at row {deep_row:,} ({label})", p(deep, 50), "ms p50",
                               f"p99 {p(deep, 99):.3f} ms; same read on plain sqlite3: p50 "
                               f"{ms(percentile(direct[deep], 50)):.3f} ms"))
            rows.append(Result(f"view: OFFSET page of 50 at row {deep_row:,} ({label})", p(off, 50), "ms p50",
                               f"p99 {p(off, 99):.2f} ms; {len(lat[off])} reads"))
            rows.append(Result(f"view: ratio deep keyset / first page ({scope})",
                               percentile(lat[deep], 50) / percentile(lat[first], 50), "x", "p50 / p50; 1.0 = flat"))
            rows.append(Result(f"view: ratio OFFSET deep / keyset deep ({scope})",
                               percentile(lat[off], 50) / percentile(lat[deep], 50), "x", "p50 / p50"))

        # --- reads while a writer inserts ---------------------------------------------------------
        say("view only: deep keyset pages while 50,000 more rows are applied")
        extra = 50_000
        batches = [execution_events(jobs, total + k, batch, seq0=100) for k in range(0, extra, batch)]
        sql, params, _ = cases["job keyset deep"]
        during: list[float] = []
        writing = True

        async def writer() -> float:
            nonlocal writing
            t0 = time.perf_counter()
            for events in batches:
                await view.apply(events)
            writing = False
            return time.perf_counter() - t0

        async def reader() -> None:
            while writing:
                t0 = time.perf_counter()
                await view.rows(sql, params)
                during.append(time.perf_counter() - t0)

        write_time, _ = await asyncio.gather(writer(), reader())
        rows.append(Result(f"view: keyset page of 50 at row {deep_job:,} while inserting", ms(percentile(during, 50)),
                           "ms p50",
                           f"p99 {ms(percentile(during, 99)):.2f} ms over {len(during)} reads while {extra:,} rows "
                           f"were applied at {extra / write_time:,.0f} rows/s (WAL: readers never wait for the "
                           f"writer, but share the one Python thread and the GIL with it)"))

        # --- updates: each moves the replaced version to executions_past ----------------------------
        say("view only: 50,000 updates, then a deep page as of the snapshot before them")
        updated = 50_000
        next_seq = 100 + total + extra
        existing = await view.rows("SELECT body FROM executions ORDER BY created_at LIMIT ?", (updated,))
        events = []
        for n, (body,) in enumerate(existing):
            e = from_json(body, Execution)
            e.status.revision = 2
            e.status.observed_state = ObservedState(state_type="completed")
            events.append(Event(f"{s.EVENTS_EXECUTION}.{e.key}", to_msgpack(e), False, next_seq + n))
        update_batches = [events[k:k + batch] for k in range(0, updated, batch)]
        u0 = time.perf_counter()
        for events in update_batches:
            await view.apply(events)
        update_s = time.perf_counter() - u0
        rows.append(Result(f"view: apply {updated // 1000}k updates (batches of {batch:,})", updated / update_s,
                           "rows/s", f"{update_s:.1f} s; each update also copies the replaced version to "
                           f"executions_past, which a walk begun earlier reads"))
        before_updates = (*page_query(job, pos_job, seq_before_updates := next_seq - 1), 3000)
        await timed_rows(view, before_updates[0], before_updates[1], 20, 1.0)
        snap = await timed_rows(view, before_updates[0], before_updates[1], 3000, budget=6.0)
        rows.append(Result(f"view: keyset page of 50 at row {deep_job:,}, as of before {updated // 1000}k updates",
                           ms(percentile(snap, 50)), "ms p50",
                           f"p99 {ms(percentile(snap, 99)):.3f} ms; snapshot {seq_before_updates:,}: current rows "
                           f"and the {updated:,} versions replaced since (found by the until_seq index, then sorted): a "
                           f"page of a walk costs in proportion to the changes since the walk began"))
    finally:
        await view.close()
    return rows


async def over_nats(total: int, chunk: int, concurrency: int) -> list[Result]:
    rows: list[Result] = []
    async with Stack("pagination") as stack:
        query = await stack.start("query")
        bus = await stack.bus("bench-writer")
        store = Store(bus)
        jobs = [make_job(f"job-{j}") for j in range(10)]
        for job in jobs:
            await store.jobs.put(s.job_key(job.namespace, job.id), job)
        per_job = total // len(jobs)
        say(f"over NATS: writing {total:,} executions into the executions bucket (gather of {chunk})")

        async def count() -> int:
            row = await query.view.one("SELECT count(*) FROM executions", ())
            return row[0] if row else 0

        with CpuMeter(stack.server) as cpu:
            t0 = time.perf_counter()
            for start in range(0, total, chunk):
                batch = [make_execution(jobs[i % len(jobs)], f"node-{i % 1000:04d}",
                                        BASE + dt.timedelta(milliseconds=i))
                         for i in range(start, min(total, start + chunk))]
                await asyncio.gather(*(store.executions.put(e.key, e) for e in batch))
            t_written = time.perf_counter()
            written_count = await count()
            while (n := await count()) < total:
                await asyncio.sleep(0.02)
            t_all = time.perf_counter()
        write_s, e2e_s = t_written - t0, t_all - t0
        rows.append(Result("NATS: Store.executions.put (gather of 1000)" if chunk == 1000 else
                           f"NATS: Store.executions.put (gather of {chunk})", total / write_s, "puts/s",
                           f"{total:,} KV puts, each awaiting its JetStream ack, in {write_s:.1f} s; "
                           f"the view had {written_count:,} of them when the last ack came"))
        rows.append(Result(f"NATS: end-to-end materialization ({total // 1000}k executions)", total / e2e_s,
                           "events/s",
                           f"first put to the last row in SQLite: {e2e_s:.1f} s (bucket -> EVENTS sourcing -> "
                           f"pull consumer, batches of 512 -> View.apply); {cpu.note()}"))

        # --- what limits materialization: replay into a fresh view, and the consumer alone ---------
        say("over NATS: rebuilding a second view from the EVENTS stream")
        with CpuMeter(stack.server) as cpu:
            t0 = time.perf_counter()
            fresh = await stack.start("query")
            while (await fresh.view.one("SELECT count(*) FROM executions", ()))[0] < total:
                await asyncio.sleep(0.02)
            rebuild_s = time.perf_counter() - t0
        await stack.stop(fresh)
        rows.append(Result(f"NATS: rebuild a view from EVENTS ({total // 1000}k executions)", total / rebuild_s,
                           "events/s",
                           f"a new QueryService replaying the stream alone: {rebuild_s:.1f} s; {cpu.note()}"))
        say("over NATS: the view's reader, and a durable consumer, with a no-op handler")
        consumer_bus = await stack.bus("bench-consumer")
        reader = OrderedReader(consumer_bus, s.STREAM_EVENTS, filter_subject=f"{s.EVENTS_EXECUTION}.>", batch=512)
        got = 0
        t0 = time.perf_counter()
        while got < total:
            got += len(await reader.next_batch())
        reader_s = time.perf_counter() - t0
        await reader.close()
        rows.append(Result("NATS: the view's ordered reader with a no-op handler", total / reader_s, "msgs/s",
                           "OrderedReader (ephemeral consumer, no acks, fetch 512) without View.apply: the "
                           "transport's share of the rebuild"))
        got = 0
        all_in = asyncio.Event()

        async def noop(deliveries) -> None:
            nonlocal got
            got += len(deliveries)
            if got >= total:
                all_in.set()

        consumer = Consumer(consumer_bus, ConsumerSpec(stream=s.STREAM_EVENTS, durable="bench-noop",
                                                       filter_subject=f"{s.EVENTS_EXECUTION}.>",
                                                       max_ack_pending=10_000), batch=512)
        t0 = time.perf_counter()
        await consumer.start_batch(noop)
        await all_in.wait()
        noop_s = time.perf_counter() - t0
        await consumer.stop()
        rows.append(Result("NATS: a durable consumer with a no-op handler", total / noop_s, "msgs/s",
                           "Consumer.start_batch (fetch 512, then ack each message): what the view used "
                           "before it kept its own position"))

        client = await stack.client()
        job_names = [j.name for j in jobs]

        # --- serial pages of 50 -------------------------------------------------------------------
        say("over NATS: serial pages of 50")
        lat: list[float] = []
        deadline = time.perf_counter() + 10.0
        pages = 0
        t0 = time.perf_counter()
        k = 0
        while pages < 600 and time.perf_counter() < deadline:
            token = ""
            name = job_names[k % len(job_names)]
            k += 1
            while True:
                r0 = time.perf_counter()
                _, page = await client.list_executions(ListJobExecutionsRequest(job=name, limit=PAGE, next_token=token))
                lat.append(time.perf_counter() - r0)
                pages += 1
                token = page.next_token
                if not token or pages >= 600:
                    break
        serial_s = time.perf_counter() - t0
        # Where a page's time goes: the same request without the client's decode, and the decode alone.
        subject = s.api(NAMESPACE, s.EXECUTIONS_LIST)
        body = to_json(ListJobExecutionsRequest(job=job_names[0], limit=PAGE))
        raw_lat = []
        for _ in range(300):
            r0 = time.perf_counter()
            raw = await client.bus.request(subject, body)
            raw_lat.append(time.perf_counter() - r0)
        d0 = time.perf_counter()
        for _ in range(300):
            from_json(raw, ListJobExecutionsResponse)
        decode_ms = ms((time.perf_counter() - d0) / 300)
        sql_lat = []
        for _ in range(300):
            r0 = time.perf_counter()
            await query.view.one("SELECT id, version FROM jobs WHERE namespace = ? AND (id = ? OR name = ?) "
                                 "ORDER BY (id = ?) DESC, created_at DESC LIMIT 1", (NAMESPACE, job_names[0],
                                                                                      job_names[0], job_names[0]))
            await query.view.rows(*page_query(jobs[0], None, query.view.last_seq))
            sql_lat.append(time.perf_counter() - r0)
        rows.append(Result("NATS: ListJobExecutions page of 50, serial", pages / serial_s, "pages/s",
                           f"p50 {ms(percentile(lat, 50)):.2f} ms, p99 {ms(percentile(lat, 99)):.2f} ms over {pages} "
                           f"pages walked by token (client in the same process). Of that: reply without client "
                           f"decode p50 {ms(percentile(raw_lat, 50)):.2f} ms; client decode of 50 Executions "
                           f"{decode_ms:.2f} ms; the service's two SQL reads (resolve job + page) through aiosqlite "
                           f"p50 {ms(percentile(sql_lat, 50)):.2f} ms"))

        # --- concurrent requesters ----------------------------------------------------------------
        say(f"over NATS: {concurrency} concurrent requesters")
        clat: list[float] = []
        stop_at = time.perf_counter() + 8.0

        async def requester(i: int) -> int:
            done = 0
            token = ""
            name = job_names[i % len(job_names)]
            while time.perf_counter() < stop_at:
                r0 = time.perf_counter()
                _, page = await client.list_executions(ListJobExecutionsRequest(job=name, limit=PAGE, next_token=token))
                clat.append(time.perf_counter() - r0)
                done += 1
                token = page.next_token
            return done

        with CpuMeter(stack.server) as cpu:
            t0 = time.perf_counter()
            counts = await asyncio.gather(*(requester(i) for i in range(concurrency)))
            conc_s = time.perf_counter() - t0
        rows.append(Result(f"NATS: ListJobExecutions page of 50, {concurrency} concurrent", sum(counts) / conc_s,
                           "pages/s",
                           f"p50 {ms(percentile(clat, 50)):.1f} ms, p99 {ms(percentile(clat, 99)):.1f} ms; "
                           f"{cpu.note()}"))

        # --- a whole job with limit 1000 ----------------------------------------------------------
        say(f"over NATS: walking a job of {per_job:,} with limit 1000")
        try:
            await client.all_executions(job_names[0])
            client_walk = "Client.all_executions worked"
        except InvalidInput as exc:  # the client applies the 512 KiB request-body limit to replies
            client_walk = f"Client.all_executions itself fails here: {exc.message}"
        say(f"  {client_walk}")
        subject = s.api(NAMESPACE, s.EXECUTIONS_LIST)

        async def walk(name: str, limit: int) -> int:
            """Client.all_executions without the reply-size check: request, decode, follow next_token."""
            seen: set[str] = set()
            token = ""
            while True:
                raw = await client.bus.request(subject, to_json(ListJobExecutionsRequest(
                    job=name, limit=limit, next_token=token)), timeout=30)
                page = msgspec.json.decode(raw, type=ListJobExecutionsResponse)
                seen.update(e.id for e in page.items)
                if not page.next_token:
                    return len(seen)
                token = page.next_token

        for limit in (1000, 500):
            walks = []
            for name in job_names[:3]:
                w0 = time.perf_counter()
                n = await walk(name, limit)
                walks.append(time.perf_counter() - w0)
                assert n == per_job, (name, n)
            best = min(walks)
            note = (f"best of {len(walks)}: {per_job / best:,.0f} executions/s; runs "
                    f"{', '.join(f'{ms(w):.0f}' for w in walks)} ms; {per_job // limit} pages decoded into "
                    f"Execution structs")
            if limit == 1000:
                note += f" ({client_walk}: a page of 1000 is ~0.9 MB, so this walk decodes without that check)"
            rows.append(Result(f"NATS: walk a whole job ({per_job:,} executions, limit {limit})", ms(best), "ms",
                               note))
    return rows


async def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--rows", type=int, default=200_000, help="executions in the view-only part"),
        p.add_argument("--batch", type=int, default=5_000),
        p.add_argument("--nats-rows", type=int, default=100_000, help="executions in the NATS part"),
        p.add_argument("--chunk", type=int, default=1_000, help="puts awaited together with asyncio.gather"),
        p.add_argument("--concurrency", type=int, default=16),
        p.add_argument("--skip-view", action="store_true"),
        p.add_argument("--skip-nats", action="store_true"),
    ))
    rows: list[Result] = []
    t0 = time.perf_counter()
    if not args.skip_view:
        with tempfile.TemporaryDirectory(prefix="shoal-view-") as tmp:
            rows += await view_only(Path(tmp), args.rows, args.batch)
    if not args.skip_nats:
        rows += await over_nats(args.nats_rows, args.chunk, args.concurrency)
    say(f"pagination done in {time.perf_counter() - t0:.0f} s")
    finish(rows, args, "pagination")


if __name__ == "__main__":
    asyncio.run(main())

"""The query view's snapshots against a model, on a real SQLite file (no bus needed).

A random history of puts, updates, stale redeliveries and deletes is applied in random batches; then,
for every sequence the view still keeps, the rows read "as of" it must be exactly the rows a plain
dictionary replaying the same history held after that event.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.query.view import MAX_WAIT_LAG, SCHEMA_VERSION, WAL_CHECKPOINT_PAGES, Event, SnapshotGone, View, as_of
from shared import subjects as s
from shared.codec import to_msgpack
from shared.models import DesiredState, Execution, ExecutionStatus, JobSpec, ObservedState

BASE = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
SPEC = JobSpec(name="j", type="pipeline")
IDS = [f"00000000-0000-0000-0000-00000000000{i}" for i in range(6)]


def execution(exec_id: str, revision: int, state: str) -> Execution:
    return Execution(
        id=exec_id, eval_id="e", job_id="job", job_type="pipeline", job_version=1, namespace="default",
        node_id="n", job_spec=SPEC,
        status=ExecutionStatus(created_at=BASE, updated_at=BASE + dt.timedelta(seconds=revision), revision=revision,
                               desired_state=DesiredState(state_type="running"),
                               observed_state=ObservedState(state_type=state)),  # type: ignore[arg-type]
    )


def subject(exec_id: str) -> str:
    return f"{s.EVENTS_EXECUTION}.default.job.n.{exec_id}"


@contextlib.asynccontextmanager
async def opened(path: str, **options: Any) -> AsyncIterator[View]:
    """A view opened on `path`, closed however the test ends."""
    view = View(path, **options)
    await view.open()
    try:
        yield view
    finally:
        await view.close()


# One step of history: (which id, what happens). "put" writes the next revision, "stale" redelivers an
# older one (must change nothing), "delete" removes the key.
steps = st.lists(st.tuples(st.integers(0, len(IDS) - 1), st.sampled_from(["put", "put", "stale", "delete"])),
                 min_size=1, max_size=40)


async def replay(path: str, history: list[tuple[int, str]], cuts: list[int]) -> None:
    async with opened(path) as view:
        model: dict[str, int] = {}  # id -> revision currently stored
        revisions: dict[str, int] = {}  # id -> highest revision ever written
        states: dict[int, dict[str, int]] = {0: {}}
        events: list[Event] = []
        for seq, (index, op) in enumerate(history, start=1):
            exec_id = IDS[index]
            if op == "delete":
                events.append(Event(subject(exec_id), b"", True, seq))
                model.pop(exec_id, None)
            elif op == "stale" and exec_id in model and model[exec_id] > 1:
                events.append(Event(subject(exec_id), to_msgpack(execution(exec_id, model[exec_id] - 1, "failed")),
                                    False, seq))
            else:
                revisions[exec_id] = revisions.get(exec_id, 0) + 1
                events.append(Event(subject(exec_id), to_msgpack(execution(exec_id, revisions[exec_id], "running")),
                                    False, seq))
                model[exec_id] = revisions[exec_id]
            states[seq] = dict(model)
        # Snapshots exist at batch boundaries: apply in the batches the cuts give.
        bounds = sorted({min(c, len(events)) for c in cuts} | {len(events)})
        start = 0
        for end in bounds:
            if end > start:
                await view.apply(events[start:end])
            start = end
        # Every sequence, not only batch boundaries: a token from another replica, whose batches were cut
        # elsewhere, can name any of them.
        for seq in range(len(events) + 1):
            sql, params = as_of("executions", "id, revision", ["namespace = ?"], ["default"], "id", seq, 1000)
            got = [tuple(r) for r in await view.rows(sql, params)]
            assert got == sorted(states[seq].items()), f"as of {seq}"
            # The past half may be left out only when nothing was replaced after `seq`; then the current
            # half alone reads the same rows.
            replaced = (await view.rows("SELECT count(*) FROM executions_past WHERE until_seq > ?", (seq,)))[0][0]
            past = view.past_after("executions", seq)
            assert past or not replaced, f"as of {seq}: {replaced} versions replaced after it, past_after says none"
            sql, params = as_of("executions", "id, revision", ["namespace = ?"], ["default"], "id", seq, 1000,
                                past=past)
            assert [tuple(r) for r in await view.rows(sql, params)] == got, f"as of {seq}, past={past}"
        # The current rows are the last snapshot, and never hold two versions of one id.
        assert sorted(await view.rows("SELECT id, revision FROM executions", ())) == sorted(model.items())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=steps, cuts=st.lists(st.integers(1, 40), max_size=6))
def test_every_kept_snapshot_reads_exactly_the_rows_of_its_moment(tmp_path: Path, history, cuts) -> None:
    path = tmp_path / "view.db"
    path.unlink(missing_ok=True)
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    asyncio.run(replay(str(path), history, cuts))


async def test_snapshots_older_than_the_retention_are_gone_and_newer_ones_kept(tmp_path: Path) -> None:
    async with opened(str(tmp_path / "v.db"), retention=0.2) as view:
        await view.apply([Event(subject(IDS[0]), to_msgpack(execution(IDS[0], 1, "running")), False, 1)])
        await view.apply([Event(subject(IDS[0]), to_msgpack(execution(IDS[0], 2, "running")), False, 2)])
        assert await view.snapshot(1) == 1
        await asyncio.sleep(0.5)
        await view.apply([Event(subject(IDS[1]), to_msgpack(execution(IDS[1], 1, "running")), False, 3)])
        assert view.pruned_through == 2
        with pytest.raises(SnapshotGone):
            await view.snapshot(1)
        assert await view.snapshot(2) == 2
        past = await view.rows("SELECT count(*) FROM executions_past", ())
        assert past[0][0] == 0  # the version only snapshot 1 needed is pruned


async def test_a_snapshot_ahead_of_this_view_waits_for_it_then_gives_up(tmp_path: Path) -> None:
    async with opened(str(tmp_path / "v.db")) as view:
        waiting = asyncio.create_task(view.snapshot(5, wait=5))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await view.apply([Event(subject(IDS[0]), to_msgpack(execution(IDS[0], 1, "running")), False, 5)])
        assert await asyncio.wait_for(waiting, 2) == 5
        with pytest.raises(TimeoutError):
            await view.snapshot(9, wait=0.05)
        # Far behind (a rebuild): no wait at all, the request gets its 503 at once.
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await view.snapshot(view.last_seq + MAX_WAIT_LAG + 1, wait=30)
        assert time.monotonic() - started < 1


async def test_while_a_batch_is_written_reads_as_of_before_it_keep_their_past_half(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    """The batch's commit may land (on the writer's thread) while a read runs on the loop: until the write
    has returned, a read as of an earlier sequence must not skip the past half."""
    view = View(str(tmp_path / "v.db"))
    await view.open()
    seen: list[bool] = []
    write = view._write

    def watched(*args):  # in the writer's thread, before and after the batch's transaction
        seen.append(view.past_after("executions", view.last_seq))  # as of the last sequence committed
        out = write(*args)
        seen.append(view.past_after("executions", view.last_seq))
        return out

    try:
        await view.apply([Event(subject(IDS[0]), to_msgpack(execution(IDS[0], 1, "running")), False, 1)])
        assert not view.past_after("executions", 1)  # an insert replaces nothing
        monkeypatch.setattr(view, "_write", watched)
        await view.apply([Event(subject(IDS[0]), to_msgpack(execution(IDS[0], 2, "running")), False, 2)])
        assert seen == [True, True]
        assert view.past_after("executions", 1) and not view.past_after("executions", 2)
        assert not view.past_after("jobs", 1)  # per table
        seen.clear()
        await view.apply([Event(subject(IDS[1]), to_msgpack(execution(IDS[1], 1, "running")), False, 3)])
        assert seen == [True, True]  # conservative during the write
        assert not view.past_after("executions", 2)  # exact after it: an insert replaced nothing
        await view.apply([Event(subject(IDS[1]), b"", True, 4)])  # a delete moves the row to the past
        assert view.past_after("executions", 3) and not view.past_after("executions", 4)
    finally:
        await view.close()
    reopened = View(str(tmp_path / "v.db"))
    await reopened.open()
    try:  # known again from the file
        assert reopened.past_after("executions", 3) and not reopened.past_after("executions", 4)
    finally:
        await reopened.close()


async def test_a_read_too_long_for_the_loop_thread_is_done_on_the_reader_thread(tmp_path: Path,
                                                                                 monkeypatch) -> None:
    import services.query.view as view_module

    async with opened(str(tmp_path / "v.db")) as view:
        await view.apply([Event(subject(f"x{i:04d}"), to_msgpack(execution(f"x{i:04d}", 1, "running")), False, i + 1)
                          for i in range(300)])
        short = await view.rows("SELECT id FROM executions WHERE id = ?", ("x0005",))
        assert short == [("x0005",)] and (view.inline_reads, view.thread_reads) == (1, 0)
        monkeypatch.setattr(view_module, "INLINE_READ_STEPS", 500)  # a scan of 300 rows takes more
        scanned = await view.rows("SELECT id FROM executions WHERE state = 'running' ORDER BY id", ())
        assert [r[0] for r in scanned] == [f"x{i:04d}" for i in range(300)]
        assert (view.inline_reads, view.thread_reads) == (1, 1)
        assert await view.rows("SELECT id FROM executions WHERE id = ?", ("x0007",)) == [("x0007",)]
        assert view.inline_reads == 2  # the next short read is inline again
        assert await view.rows("SELECT id FROM executions WHERE id = ?", ("x0008",), inline=False) == [("x0008",)]
        assert (view.inline_reads, view.thread_reads) == (2, 2)  # asked for the thread: no try inline first
        # The writer checkpoints its WAL in larger steps than SQLite's default of 1,000 pages.
        assert view.writer.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == WAL_CHECKPOINT_PAGES > 1000


async def test_a_loop_of_short_reads_still_lets_other_tasks_run(tmp_path: Path) -> None:
    async with opened(str(tmp_path / "v.db")) as view:
        await view.apply([Event(subject(IDS[0]), to_msgpack(execution(IDS[0], 1, "running")), False, 1)])
        writer = asyncio.create_task(view.apply([Event(subject(IDS[1]), to_msgpack(execution(IDS[1], 1, "running")),
                                                       False, 2)]))
        reads = 0
        while not writer.done() and reads < 100_000:  # a reader beside a writer, as in one process
            await view.rows("SELECT id FROM executions WHERE id = ?", (IDS[0],))
            reads += 1
        assert writer.done() and view.inline_reads == reads
        await writer


async def test_a_view_file_of_an_older_schema_is_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
                       "INSERT INTO meta VALUES ('view_id', 'oldview'), ('last_seq', '77');"
                       "CREATE TABLE executions (id TEXT PRIMARY KEY, body BLOB);")
    conn.close()
    async with opened(str(path)) as view:
        assert view.last_seq == 0 and view.view_id != "oldview"  # a new durable replays the stream
        assert await view.rows("SELECT value FROM meta WHERE key = 'schema'", ()) == [(SCHEMA_VERSION,)]
    reopened = View(str(path))
    await reopened.open()
    try:
        assert reopened.view_id == view.view_id  # the current schema is kept as it is
    finally:
        await reopened.close()


async def test_a_view_rebuilt_from_an_old_stream_keeps_only_what_is_recent_by_stream_time(tmp_path: Path) -> None:
    async with opened(str(tmp_path / "v.db"), retention=60, prune_every=0) as view:
        long_ago = time.time() - 3600
        for r in range(1, 6):  # replayed one batch at a time, as a rebuild might
            await view.apply([Event(subject(IDS[0]), to_msgpack(execution(IDS[0], r, "running")), False, r,
                                    long_ago + r)])
        assert view.pruned_through == 5  # an hour old by the stream's clock: nothing to keep
        assert (await view.rows("SELECT count(*) FROM executions_past", ()))[0][0] == 0
        await view.apply([Event(subject(IDS[0]), to_msgpack(execution(IDS[0], 6, "running")), False, 6, time.time())])
        assert await view.snapshot(5) == 5  # replaced just now: kept for the retention
        sql, params = as_of("executions", "revision", ["1"], [], "revision", 5, 10)
        assert await view.rows(sql, params) == [(5,)]

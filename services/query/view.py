"""The query view: a SQLite (WAL) materialization of the EVENTS stream, made for paginated reads.

Each row keeps the API's JSON body ready to send, plus the columns that filters and keyset pagination
need. An event is applied only if its revision is newer than the row's, and the stream sequence of the
last applied event is committed in the same transaction, so replays and redeliveries change nothing
and a restarted replica resumes exactly where it stopped. Deleting the file and restarting rebuilds
the view (a file of an older schema is rebuilt the same way): from the stream, or from the buckets
when the stream no longer holds every event (`QueryService._fill_from_buckets`).

Reads are snapshots: a row replaced or deleted by an event is kept in `<table>_past` with the
sequence that ended it, for `retention` seconds. A listing that reads as of sequence S takes the
current rows written at or before S and the past versions that were current at S, so every page of
one walk sees the same moment, whatever changes in between. When nothing was replaced after S (a first
page, or a walk through a quiet table: `View.past_after`), the past half is left out of the read.

Reads run on the event loop's thread, with no hop to another thread, as long as they are short; one that
takes more SQLite steps than INLINE_READ_STEPS is interrupted and run again on the reader's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import aiosqlite

from shared import metrics
from shared import subjects as s
from shared.codec import from_msgpack_or_none, to_json
from shared.durations import to_ns
from shared.models import Execution, Job, Node

log = logging.getLogger(__name__)

SCHEMA_VERSION = "2"
MAX_WAIT_LAG = 5_000  # a token this many events ahead of the view is answered 503 at once
# A read runs on the event loop's thread (no hop to a reader thread, which costs nearly as much CPU as
# the read of a page of 100) unless it takes more than this many SQLite VM steps, about 1-2 ms: then it
# is interrupted and run again on the reader thread, so that an unindexed filter or a long past never
# stalls the loop.
INLINE_READ_STEPS = 20_000
_STEP_TICK = 1_000  # the progress handler runs every this many steps
INLINE_CACHE_KIB = 32 * 1024  # page cache of the inline reader (SQLite's default is 2 MiB)
# Pages of WAL after which a commit copies them into the file (SQLite's default is 1,000, about 4 MB):
# each such checkpoint syncs the file twice, and a catch-up commits a batch every few milliseconds:
# fewer, larger checkpoints cut the wall time of applying a catch-up by about a fifth. The WAL file
# grows to about 40 MB before it is copied back.
WAL_CHECKPOINT_PAGES = 10_000

# Columns of each materialized table, in row order; every table also has `seq`, the stream sequence of
# the event that wrote the row, and a `<table>_past` twin holding the versions it replaced.
COLUMNS = {
    "executions": ("id", "namespace", "job_id", "job_version", "node_id", "state", "created_at", "updated_at",
                   "revision", "body"),
    "jobs": ("id", "namespace", "name", "version", "type", "state", "created_at", "modified_at", "revision", "body"),
    "nodes": ("id", "state", "labels", "revision", "body"),
}
_TYPES = {"job_version": "INTEGER", "created_at": "INTEGER", "updated_at": "INTEGER", "modified_at": "INTEGER",
          "revision": "INTEGER", "version": "INTEGER", "body": "BLOB"}


def _schema() -> str:
    parts = [
        "PRAGMA journal_mode = WAL;",
        "PRAGMA synchronous = NORMAL;",
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
        # When each batch was committed: pruning the past keeps what was replaced within the retention.
        "CREATE TABLE IF NOT EXISTS commits (seq INTEGER PRIMARY KEY, at REAL NOT NULL);",
    ]
    for table, columns in COLUMNS.items():
        defs = ", ".join(f"{c} {_TYPES.get(c, 'TEXT')} NOT NULL" for c in columns[1:])
        parts.append(f"CREATE TABLE IF NOT EXISTS {table} (id TEXT PRIMARY KEY, {defs}, seq INTEGER NOT NULL);")
        parts.append(f"CREATE TABLE IF NOT EXISTS {table}_past (id TEXT NOT NULL, {defs}, seq INTEGER NOT NULL, "
                     "until_seq INTEGER NOT NULL);")
        # The one index of a past table: a read as of S looks only at versions replaced after S (the
        # changes since its walk began), whatever else the retention holds; and pruning goes by it.
        parts.append(f"CREATE INDEX IF NOT EXISTS {table}_past_until ON {table}_past (until_seq);")
    parts += [
        "CREATE INDEX IF NOT EXISTS executions_job_created ON executions (namespace, job_id, job_version, created_at, id);",
        "CREATE INDEX IF NOT EXISTS executions_job_updated ON executions (namespace, job_id, job_version, updated_at, id);",
        "CREATE INDEX IF NOT EXISTS executions_ns_created ON executions (namespace, created_at, id);",
        "CREATE INDEX IF NOT EXISTS executions_ns_updated ON executions (namespace, updated_at, id);",
        "CREATE INDEX IF NOT EXISTS executions_node ON executions (namespace, node_id, created_at, id);",
        "CREATE INDEX IF NOT EXISTS jobs_name ON jobs (namespace, name);",
        "CREATE INDEX IF NOT EXISTS jobs_created ON jobs (namespace, created_at, id);",
        "CREATE INDEX IF NOT EXISTS jobs_modified ON jobs (namespace, modified_at, id);",
    ]
    return "\n".join(parts)


SCHEMA = _schema()


def _upsert(table: str) -> str:
    columns = COLUMNS[table]
    keep = ("id", "namespace", "created_at", "job_id", "job_version", "node_id")  # never change for one id
    changed = [c for c in columns if c not in keep] + ["seq"]
    return (f"INSERT INTO {table} ({', '.join(columns)}, seq) VALUES ({', '.join('?' * (len(columns) + 1))}) "
            f"ON CONFLICT (id) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in changed)} "
            f"WHERE excluded.revision > {table}.revision")


def _supersede(table: str) -> str:
    """Copy the row that an upsert of a newer revision is about to replace into the past.

    (An explicit statement, not a trigger: with an UPDATE trigger on the table SQLite runs every upsert,
    inserts included, about 30% slower.)
    """
    columns = ", ".join(COLUMNS[table])
    return f"INSERT INTO {table}_past SELECT {columns}, seq, ? FROM {table} WHERE id = ? AND revision < ?"


def _retire(table: str) -> str:
    """Move a deleted row to the past (its version stays readable by snapshots taken before the delete)."""
    columns = ", ".join(COLUMNS[table])
    return f"INSERT INTO {table}_past SELECT {columns}, seq, ? FROM {table} WHERE id = ?"


_UPSERT = {table: _upsert(table) for table in COLUMNS}
_SUPERSEDE = {table: _supersede(table) for table in COLUMNS}
_RETIRE = {table: _retire(table) for table in COLUMNS}
_REVISION = {table: COLUMNS[table].index("revision") for table in COLUMNS}

_EXEC_PREFIX = s.EVENTS_EXECUTION + "."
_JOB_PREFIX = s.EVENTS_JOB + "."
_NODE_PREFIX = s.EVENTS_NODE + "."


class Event:
    """One message of the EVENTS stream, as the view needs it."""

    __slots__ = ("subject", "data", "deleted", "seq", "at")

    def __init__(self, subject: str, data: bytes, deleted: bool, seq: int, at: float = 0.0) -> None:
        self.subject = subject
        self.data = data
        self.deleted = deleted
        self.seq = seq
        self.at = at  # when the stream stored it; 0 = now

    @classmethod
    def position(cls, seq: int, at: float = 0.0) -> Event:
        """A message that changes no row, only the view's position."""
        return cls("", b"", False, seq, at)


class SnapshotGone(Exception):
    """The versions a snapshot needs were pruned (it is older than the retention)."""


class View:
    """The view's file: one writer (a plain sqlite3 connection driven from a worker thread, one hop per
    batch) and two readers: a plain connection used on the event loop's thread for short reads, and an
    aiosqlite connection (its own thread) for the reads that turn out long. WAL lets readers read while
    the writer writes."""

    def __init__(self, path: str, *, retention: float = 600.0, prune_every: float | None = None) -> None:
        self.path = path
        self.retention = retention
        self.prune_every = retention / 10 if prune_every is None else prune_every
        self.writer: sqlite3.Connection | None = None
        self.reader: aiosqlite.Connection | None = None
        self.inline: sqlite3.Connection | None = None
        self._steps_left = 0
        self.inline_reads = self.thread_reads = 0  # how reads went (a long one is counted in both)
        self.view_id = ""
        self.stream_id = ""  # the creation time of the EVENTS stream this view follows
        self.last_seq = 0
        self.pruned_through = 0  # snapshots older than this sequence can no longer be read
        self.jobs_changed = 0  # bumped whenever a batch changes the jobs table (caches of it compare this)
        # Per table, a sequence at or after which nothing was replaced or deleted: no version in its past
        # table has an until_seq above it. A read as of a sequence at or above it needs no past half. While
        # a batch is being written it covers that batch's last sequence (the batch may replace rows).
        self.past_through: dict[str, int] = {table: 0 for table in COLUMNS}
        self._past_written: dict[str, int] = {table: 0 for table in COLUMNS}  # the same, as committed
        self._replaced: set[str] = set()  # tables of which the batch being written replaced rows
        self._next_prune = 0.0
        self._writing = asyncio.Lock()
        self._caught_up = asyncio.Condition()
        self.states = metrics.StateCounts()  # executions by state, for shoal_executions
        self._tally: _StateTally | None = None

    async def open(self) -> None:
        await asyncio.to_thread(self._open)
        self.reader = await aiosqlite.connect(self.path, isolation_level=None)
        await self.reader.execute("PRAGMA query_only = ON")
        inline = self.inline = sqlite3.connect(self.path, isolation_level=None, timeout=0.05)
        inline.execute("PRAGMA query_only = ON")
        inline.execute(f"PRAGMA cache_size = -{INLINE_CACHE_KIB}")  # pages of a walk: fewer reads of the file
        inline.set_progress_handler(self._step, _STEP_TICK)
        metrics.INSTRUMENTS.add_view(self.states)

    def _open(self) -> None:
        if os.path.exists(self.path) and (found := _schema_version(self.path)) != SCHEMA_VERSION:
            log.warning("query view %s has schema %s, this build uses %s: rebuilding it",
                        self.path, found or 1, SCHEMA_VERSION)
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path + suffix)
        # Autocommit mode: transactions are explicit (BEGIN ... COMMIT) around each batch. The connection
        # is used by one thread at a time (`_writing`), whichever worker thread that is.
        db = self.writer = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.executescript(SCHEMA)
        db.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
        db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,))
        db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('view_id', ?)", (uuid.uuid4().hex[:12],))
        self.view_id = self._meta("view_id") or ""
        self.stream_id = self._meta("stream") or ""
        self.last_seq = int(self._meta("last_seq") or 0)
        self.pruned_through = int(self._meta("pruned_through") or 0)
        for table in COLUMNS:
            top = db.execute(f"SELECT max(until_seq) FROM {table}_past").fetchone()[0] or 0
            self.past_through[table] = self._past_written[table] = top
        # metrics: counted once as the file opens; from here on each batch adds what it changed
        self.states.set(dict(db.execute("SELECT state, count(*) FROM executions GROUP BY state").fetchall()))

    async def set_stream(self, stream_id: str) -> None:
        """Record which stream this view follows (see QueryService._check_stream)."""
        async with self._writing:
            await asyncio.to_thread(self._set_meta, "stream", stream_id)
        self.stream_id = stream_id

    async def reset(self) -> None:
        """Empty the view, as if its file were new: it will be filled again from the stream or the buckets."""
        def clear() -> None:
            db = self.writer
            assert db is not None
            db.execute("BEGIN")
            try:
                for table in COLUMNS:
                    db.execute(f"DELETE FROM {table}")
                    db.execute(f"DELETE FROM {table}_past")
                db.execute("DELETE FROM commits")
                db.execute("DELETE FROM meta WHERE key IN ('last_seq', 'pruned_through', 'stream')")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        async with self._writing:
            await asyncio.to_thread(clear)
        self.states.set({})
        self.last_seq = self.pruned_through = 0
        for table in COLUMNS:
            self.past_through[table] = self._past_written[table] = 0
        self.stream_id = ""

    async def close(self) -> None:
        metrics.INSTRUMENTS.remove_view(self.states)
        if self.reader is not None:
            await self.reader.close()
        if self.inline is not None:
            self.inline.close()
            self.inline = None
        if self.writer is not None:
            async with self._writing:
                self.writer.close()
        self.reader = self.writer = None

    def _meta(self, key: str) -> str | None:
        assert self.writer is not None
        row = self.writer.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    async def apply(self, events: Sequence[Event]) -> None:
        """Apply a batch in one transaction. Idempotent: an older or equal revision changes nothing.

        A row that an event replaces or deletes moves to `<table>_past` (`_SUPERSEDE`, `_RETIRE`),
        so a read as of any sequence since `pruned_through` sees exactly the rows of that moment.
        Events are decoded here; the SQL runs in a worker thread, the whole batch in one hop.
        """
        ops: list[tuple[str, Any, int]] = []  # (table, row or deleted key, seq) in stream order
        last = self.last_seq
        for event in events:
            last = max(last, event.seq)
            subject = event.subject
            if event.deleted:
                table, key = _delete_target(subject)
                if table:
                    ops.append((table, key, event.seq))
            elif subject.startswith(_EXEC_PREFIX):
                if (execution := from_msgpack_or_none(event.data, Execution, subject)) is not None:
                    ops.append(("executions", (*_execution_row(execution), event.seq), event.seq))
            elif subject.startswith(_JOB_PREFIX):
                if (job := from_msgpack_or_none(event.data, Job, subject)) is not None:
                    ops.append(("jobs", (*_job_row(job), event.seq), event.seq))
            elif subject.startswith(_NODE_PREFIX):
                if (node := from_msgpack_or_none(event.data, Node, subject)) is not None:
                    ops.append(("nodes", (*_node_row(node), event.seq), event.seq))
        now = time.time()
        # Versions are kept by stream time, so a view rebuilt from an old stream prunes what is old.
        await self._commit(ops, last, min(max((event.at for event in events), default=0.0) or now, now))
        if any(table == "jobs" for table, _, _ in ops):
            self.jobs_changed += 1  # after the commit: a cache filled from a read before it is stale from now

    async def complete_from(self, seq: int) -> None:
        """Record that this view holds everything as of `seq`, and nothing older: it was filled from the
        buckets then, not from the events before, so it follows the stream after `seq` and snapshots
        before it are gone."""
        await self._commit([], max(self.last_seq, seq), time.time(), floor=seq)

    async def _commit(self, ops: list[tuple[str, Any, int]], last: int, at: float, floor: int = 0) -> None:
        """Write `ops` in one transaction on the writer's thread, then publish the new sequence."""
        now = time.time()
        touched = {table for table, _, _ in ops}
        async with self._writing:
            for table in touched:  # until the batch is committed, it may have replaced rows up to `last`
                self.past_through[table] = max(self.past_through[table], last)
            try:
                pruned, replaced = await asyncio.to_thread(self._write, ops, last, at, now, floor)
            finally:
                for table in touched:
                    self.past_through[table] = self._past_written[table]
            for table in replaced:
                self.past_through[table] = self._past_written[table] = max(self._past_written[table], last)
        if now >= self._next_prune:
            self._next_prune = now + self.prune_every
        self.pruned_through = pruned
        self.last_seq = last
        async with self._caught_up:
            self._caught_up.notify_all()

    def _write(self, ops: list[tuple[str, Any, int]], last: int, at: float, now: float,
               floor: int) -> tuple[int, set[str]]:
        """The transaction of `_commit`; returns the oldest sequence still readable afterwards, and the
        tables of which it moved versions to the past."""
        db = self.writer
        assert db is not None
        upserts: dict[str, list[tuple[Any, ...]]] = {table: [] for table in COLUMNS}
        pruned = self.pruned_through
        replaced = self._replaced = set()  # (filled by _flush too)
        db.execute("BEGIN")
        try:
            tally = self._tally = _StateTally(db)  # metrics: executions by state
            for table, item, seq in ops:
                if isinstance(item, str):  # a delete
                    self._flush(upserts)  # a put then a delete of one key in a batch keep their order
                    if db.execute(_RETIRE[table], (seq, item)).rowcount:
                        replaced.add(table)
                    db.execute(f"DELETE FROM {table} WHERE id = ?", (item,))
                else:
                    upserts[table].append(item)
            self._flush(upserts)
            deltas = tally.deltas()
            self._set_meta("last_seq", last)
            db.execute("INSERT OR REPLACE INTO commits (seq, at) VALUES (?, ?)", (last, at))
            if now >= self._next_prune:
                pruned = self._prune(now)
            if floor > pruned:
                pruned = floor
                self._set_meta("pruned_through", pruned)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.states.apply(deltas)
        return pruned, replaced

    def _set_meta(self, key: str, value: int | str) -> None:
        assert self.writer is not None
        self.writer.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                            "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, str(value)))

    def _flush(self, upserts: dict[str, list[tuple[Any, ...]]]) -> None:
        """Write buffered upserts, each replaced row copied to the past first.

        Rows go in rounds of distinct ids (nearly always one round), so that two versions of one id in
        a batch are applied in order, each superseding the one before.
        """
        assert self.writer is not None
        for table, buffered in upserts.items():
            rows = list(buffered)
            buffered.clear()
            revision = _REVISION[table]
            while rows:
                ids: set[str] = set()
                now: list[tuple[Any, ...]] = []
                later: list[tuple[Any, ...]] = []
                for row in rows:
                    (later if row[0] in ids else now).append(row)
                    ids.add(row[0])
                changes = self.writer.total_changes
                self.writer.executemany(_SUPERSEDE[table], [(r[-1], r[0], r[revision]) for r in now])
                if self.writer.total_changes != changes:
                    self._replaced.add(table)
                changes = self.writer.total_changes  # metrics: how many of the upserts take effect
                self.writer.executemany(_UPSERT[table], now)
                if table == "executions" and self._tally is not None:
                    self._tally.upserted(now, self.writer.total_changes - changes)
                rows = later

    def _prune(self, now: float) -> int:
        """Forget versions replaced before the retention; returns the oldest sequence still readable."""
        assert self.writer is not None
        row = self.writer.execute("SELECT max(seq) FROM commits WHERE at < ?", (now - self.retention,)).fetchone()
        horizon = row[0] if row and row[0] is not None else 0
        if horizon <= self.pruned_through:
            return self.pruned_through
        for table in COLUMNS:
            self.writer.execute(f"DELETE FROM {table}_past WHERE until_seq <= ?", (horizon,))
        self.writer.execute("DELETE FROM commits WHERE seq < ?", (horizon,))
        self._set_meta("pruned_through", horizon)
        return horizon

    # -- reads -------------------------------------------------------------------------------------

    async def snapshot(self, seq: int | None, *, wait: float = 1.0) -> int:
        """The sequence a listing reads as of: now for a first page, the token's for the next ones.

        Another replica may have issued the token a moment ahead of this one: wait up to `wait` seconds
        for this view to reach it, unless it is far behind. A snapshot older than the retention is gone.
        """
        if seq is None:
            return self.last_seq
        if seq < self.pruned_through:
            raise SnapshotGone
        if seq > self.last_seq + MAX_WAIT_LAG:
            raise TimeoutError  # far behind (rebuilding): do not hold a request slot for it
        if seq > self.last_seq:
            async with self._caught_up:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._caught_up.wait_for(lambda: self.last_seq >= seq), wait)
            if seq > self.last_seq:
                raise TimeoutError
        return seq

    def past_after(self, table: str, seq: int) -> bool:
        """Whether `table` may hold versions replaced after `seq` (a read as of `seq` needs its past half)."""
        return seq < self.past_through[table]

    def _step(self) -> int:
        """SQLite's progress handler of the inline reader: non-zero interrupts the read."""
        self._steps_left -= _STEP_TICK
        return self._steps_left < 0

    async def rows(self, sql: str, params: Iterable[Any], *, inline: bool = True) -> list[tuple[Any, ...]]:
        """The rows of a read: on this thread if it is short (INLINE_READ_STEPS), else on the reader's.
        `inline=False` sends a read known to be long (a chunk of a scan) to the reader's thread at once."""
        params = tuple(params)
        if inline and self.inline is not None:
            self._steps_left = INLINE_READ_STEPS
            try:
                found = self.inline.execute(sql, params).fetchall()
            except sqlite3.OperationalError:
                pass  # interrupted (too long for this thread), or the file busy: read it on the thread
            else:
                self.inline_reads += 1
                # Still a point where other tasks run, as every read was: a loop of reads (a scan, a
                # reader beside a writer in one process) must not hold the loop.
                await asyncio.sleep(0)
                return found
        assert self.reader is not None
        self.thread_reads += 1
        # One trip to the connection's thread (execute + fetchall + close), not three.
        return list(await self.reader.execute_fetchall(sql, params))

    async def one(self, sql: str, params: Iterable[Any]) -> tuple[Any, ...] | None:
        rows = await self.rows(sql, params)
        return rows[0] if rows else None


def as_of(table: str, columns: str, where: Sequence[str], params: Sequence[Any], order: str, seq: int,
          limit: int, *, past: bool = True) -> tuple[str, list[Any]]:
    """SQL and parameters for `table`'s rows as they were at sequence `seq`: filtered, ordered, limited.

    Each half is limited on its own before they are merged. The current half reads about `limit` rows of
    a keyset index, however deep into the listing it is; the past half reads the versions replaced after
    `seq` (by the until_seq index) and sorts them, so it costs what has changed since the walk began.
    With `past=False` (the caller knows nothing was replaced after `seq`: `View.past_after`) it is the
    current half alone.
    """
    cond = " AND ".join(where) or "1"
    now = f"SELECT {columns} FROM {table} WHERE seq <= ? AND {cond} ORDER BY {order} LIMIT ?"
    if not past:
        return now, [seq, *params, limit]
    # The first term is constant: when nothing was replaced after the snapshot (a first page, mostly),
    # SQLite checks it once, on the until_seq index, and skips the past half without scanning it.
    past = (f"SELECT {columns} FROM {table}_past WHERE ? < (SELECT max(until_seq) FROM {table}_past) "
            f"AND seq <= ? AND until_seq > ? AND {cond} ORDER BY {order} LIMIT ?")
    sql = f"SELECT * FROM ({now}) UNION ALL SELECT * FROM ({past}) ORDER BY {order} LIMIT ?"
    return sql, [seq, *params, limit, seq, seq, seq, *params, limit, limit]


def _schema_version(path: str) -> str | None:
    """The schema a view file was built with; None for an empty file or the first schema (no record)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone() is None:
            return None
        row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    return row[0] if row else None


def _execution_row(e: Execution) -> tuple[Any, ...]:
    return (e.id, e.namespace, e.job_id, e.job_version, e.node_id, e.status.observed_state.state_type,
            to_ns(e.status.created_at), to_ns(e.status.updated_at), e.status.revision, to_json(e))


def _job_row(j: Job) -> tuple[Any, ...]:
    return (j.id, j.namespace, j.name, j.version, j.type, j.state.state_type, to_ns(j.created_at),
            to_ns(j.modified_at), j.revision, to_json(j))


def _node_row(n: Node) -> tuple[Any, ...]:
    return (n.id, n.state.state_type, json.dumps(n.labels, sort_keys=True), n.revision, to_json(n))


# -- metrics: executions by state, changed by what a batch writes ------------------------------------------

_EXEC_STATE = COLUMNS["executions"].index("state")
_LOOKUP_CHUNK = 500


class _StateTally:
    """How one batch changes the number of executions in each state, at a cost that follows the batch.

    The versions it replaced or deleted are the rows it added to `executions_past` (read back by rowid);
    the versions it wrote are its upserts, which all take effect unless one was older than its row
    (SQLite's change count says so; then the rows still current or replaced within the batch tell
    which did).
    """

    __slots__ = ("db", "mark", "written", "effective")

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.mark = db.execute("SELECT max(rowid) FROM executions_past").fetchone()[0] or 0
        self.written: list[tuple[str, str, int]] = []  # (id, state, seq) of every upserted execution
        self.effective = 0

    def upserted(self, rows: Sequence[tuple[Any, ...]], effective: int) -> None:
        self.effective += effective
        self.written.extend((row[0], row[_EXEC_STATE], row[-1]) for row in rows)

    def deltas(self) -> dict[str, int]:
        deltas = {state: -count for state, count in self.db.execute(
            "SELECT state, count(*) FROM executions_past WHERE rowid > ? GROUP BY state", (self.mark,))}
        if self.effective == len(self.written):
            took = self.written
        else:
            replaced = self.db.execute("SELECT id, seq FROM executions_past WHERE rowid > ?", (self.mark,))
            kept = set(replaced) | self._current({key for key, _, _ in self.written})
            took = [w for w in self.written if (w[0], w[2]) in kept]
        for _, state, _ in took:
            deltas[state] = deltas.get(state, 0) + 1
        return {state: delta for state, delta in deltas.items() if delta}

    def _current(self, ids: set[str]) -> set[tuple[str, int]]:
        keys = list(ids)
        found: set[tuple[str, int]] = set()
        for start in range(0, len(keys), _LOOKUP_CHUNK):
            chunk = keys[start:start + _LOOKUP_CHUNK]
            found.update(self.db.execute(
                f"SELECT id, seq FROM executions WHERE id IN ({','.join('?' * len(chunk))})", chunk))
        return found


def _delete_target(subject: str) -> tuple[str, str]:
    key = subject.rsplit(".", 1)[-1]
    if subject.startswith(_EXEC_PREFIX):
        return "executions", key
    if subject.startswith(_JOB_PREFIX):
        return "jobs", key
    if subject.startswith(_NODE_PREFIX):
        return "nodes", key
    return "", key

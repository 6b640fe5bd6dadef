"""The query view: a SQLite (WAL) materialization of the EVENTS stream, made for paginated reads.

Each row keeps the API's JSON body ready to send, plus the columns that filters and keyset pagination
need. An event is applied only if its revision is newer than the row's, and the stream sequence of the
last applied event is committed in the same transaction, so replays and redeliveries change nothing
and a restarted replica resumes exactly where it stopped. Deleting the file and restarting rebuilds
the view from the stream.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import aiosqlite

from shared import subjects as s
from shared.codec import from_msgpack_or_none, to_json
from shared.durations import to_ns
from shared.models import Execution, Job, Node

SCHEMA = """
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS executions (
    id TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    job_id TEXT NOT NULL,
    job_version INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    revision INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS executions_job_created ON executions (namespace, job_id, job_version, created_at, id);
CREATE INDEX IF NOT EXISTS executions_job_updated ON executions (namespace, job_id, job_version, updated_at, id);
CREATE INDEX IF NOT EXISTS executions_ns_created ON executions (namespace, created_at, id);
CREATE INDEX IF NOT EXISTS executions_ns_updated ON executions (namespace, updated_at, id);
CREATE INDEX IF NOT EXISTS executions_node ON executions (namespace, node_id, created_at, id);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    type TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    modified_at INTEGER NOT NULL,
    revision INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_name ON jobs (namespace, name);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (namespace, created_at, id);
CREATE INDEX IF NOT EXISTS jobs_modified ON jobs (namespace, modified_at, id);
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    labels TEXT NOT NULL,
    revision INTEGER NOT NULL,
    body BLOB NOT NULL
);
"""

_UPSERT_EXECUTION = """
INSERT INTO executions (id, namespace, job_id, job_version, node_id, state, created_at, updated_at, revision, body)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    state = excluded.state, updated_at = excluded.updated_at, revision = excluded.revision, body = excluded.body
WHERE excluded.revision > executions.revision
"""
_UPSERT_JOB = """
INSERT INTO jobs (id, namespace, name, version, type, state, created_at, modified_at, revision, body)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    name = excluded.name, version = excluded.version, type = excluded.type, state = excluded.state,
    modified_at = excluded.modified_at, revision = excluded.revision, body = excluded.body
WHERE excluded.revision > jobs.revision
"""
_UPSERT_NODE = """
INSERT INTO nodes (id, state, labels, revision, body) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    state = excluded.state, labels = excluded.labels, revision = excluded.revision, body = excluded.body
WHERE excluded.revision > nodes.revision
"""

_EXEC_PREFIX = s.EVENTS_EXECUTION + "."
_JOB_PREFIX = s.EVENTS_JOB + "."
_NODE_PREFIX = s.EVENTS_NODE + "."


class Event:
    """One message of the EVENTS stream, as the view needs it."""

    __slots__ = ("subject", "data", "deleted", "seq")

    def __init__(self, subject: str, data: bytes, deleted: bool, seq: int) -> None:
        self.subject = subject
        self.data = data
        self.deleted = deleted
        self.seq = seq


class View:
    def __init__(self, path: str) -> None:
        self.path = path
        self.writer: aiosqlite.Connection | None = None
        self.reader: aiosqlite.Connection | None = None
        self.view_id = ""
        self.last_seq = 0

    async def open(self) -> None:
        # Autocommit mode: transactions are explicit (BEGIN ... COMMIT) around each batch.
        self.writer = await aiosqlite.connect(self.path, isolation_level=None)
        await self.writer.executescript(SCHEMA)
        self.view_id = await self._meta("view_id") or ""
        if not self.view_id:
            self.view_id = uuid.uuid4().hex[:12]
            await self.writer.execute("INSERT INTO meta (key, value) VALUES ('view_id', ?)", (self.view_id,))
        self.last_seq = int(await self._meta("last_seq") or 0)
        self.reader = await aiosqlite.connect(self.path, isolation_level=None)
        await self.reader.execute("PRAGMA query_only = ON")

    async def close(self) -> None:
        for conn in (self.reader, self.writer):
            if conn is not None:
                await conn.close()
        self.reader = self.writer = None

    async def _meta(self, key: str) -> str | None:
        assert self.writer is not None
        async with self.writer.execute("SELECT value FROM meta WHERE key = ?", (key,)) as cur:
            row = await cur.fetchone()
        return row[0] if row else None

    async def apply(self, events: Sequence[Event]) -> int:
        """Apply a batch in one transaction; returns how many rows changed. Idempotent."""
        assert self.writer is not None
        executions: list[tuple[Any, ...]] = []
        jobs: list[tuple[Any, ...]] = []
        nodes: list[tuple[Any, ...]] = []
        deletes: list[tuple[str, str]] = []
        last = self.last_seq
        for event in events:
            last = max(last, event.seq)
            subject = event.subject
            if event.deleted:
                deletes.append(_delete_target(subject))
            elif subject.startswith(_EXEC_PREFIX):
                if (execution := from_msgpack_or_none(event.data, Execution, subject)) is not None:
                    executions.append(_execution_row(execution))
            elif subject.startswith(_JOB_PREFIX):
                if (job := from_msgpack_or_none(event.data, Job, subject)) is not None:
                    jobs.append(_job_row(job))
            elif subject.startswith(_NODE_PREFIX):
                if (node := from_msgpack_or_none(event.data, Node, subject)) is not None:
                    nodes.append(_node_row(node))
        db = self.writer
        before = db.total_changes
        await db.execute("BEGIN")
        try:
            if executions:
                await db.executemany(_UPSERT_EXECUTION, executions)
            if jobs:
                await db.executemany(_UPSERT_JOB, jobs)
            if nodes:
                await db.executemany(_UPSERT_NODE, nodes)
            for table, key in deletes:
                if table:
                    await db.execute(f"DELETE FROM {table} WHERE id = ?", (key,))
            await db.execute("INSERT INTO meta (key, value) VALUES ('last_seq', ?) "
                             "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (str(last),))
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise
        self.last_seq = last
        return db.total_changes - before - 1  # minus the meta row

    # -- reads -------------------------------------------------------------------------------------

    async def rows(self, sql: str, params: Iterable[Any]) -> list[tuple[Any, ...]]:
        assert self.reader is not None
        # One trip to the connection's thread (execute + fetchall + close), not three.
        return list(await self.reader.execute_fetchall(sql, tuple(params)))

    async def one(self, sql: str, params: Iterable[Any]) -> tuple[Any, ...] | None:
        rows = await self.rows(sql, params)
        return rows[0] if rows else None


def _execution_row(e: Execution) -> tuple[Any, ...]:
    return (e.id, e.namespace, e.job_id, e.job_version, e.node_id, e.status.observed_state.state_type,
            to_ns(e.status.created_at), to_ns(e.status.updated_at), e.status.revision, to_json(e))


def _job_row(j: Job) -> tuple[Any, ...]:
    return (j.id, j.namespace, j.name, j.version, j.type, j.state.state_type, to_ns(j.created_at),
            to_ns(j.modified_at), j.revision, to_json(j))


def _node_row(n: Node) -> tuple[Any, ...]:
    return (n.id, n.state.state_type, json.dumps(n.labels, sort_keys=True), n.revision, to_json(n))


def _delete_target(subject: str) -> tuple[str, str]:
    key = subject.rsplit(".", 1)[-1]
    if subject.startswith(_EXEC_PREFIX):
        return "executions", key
    if subject.startswith(_JOB_PREFIX):
        return "jobs", key
    if subject.startswith(_NODE_PREFIX):
        return "nodes", key
    return "", key

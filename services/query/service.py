"""The query service: keeps its SQLite view current from the EVENTS stream and answers the read API.

ListJobExecutions is keyset-paginated: a page is one SQL read ordered by (created_at|updated_at, id),
and the next_token holds the last row's (value, id). Every page of a walk reads the view as of the
stream sequence of its first page (carried in the token), so a walk returns exactly the executions
that matched at that moment, each once, whatever is inserted, updated or deleted in between.
Replies are assembled from the stored JSON bodies without decoding them. Job output is read from
SHOAL_OUTPUT itself (by subject, from a stream sequence), not from the view.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from shared import pagetoken
from shared import subjects as s
from shared.api import (
    DEFAULT_LOG_CHUNKS,
    ExecutionLogsRequest,
    GetExecutionRequest,
    GetJobRequest,
    ListJobExecutionsRequest,
    ListJobsRequest,
    ListNodesRequest,
    LogItem,
    OutputChunk,
    page_limit,
)
from shared.codec import from_json, from_msgpack, to_json
from shared.errors import Internal, InvalidInput, NotFound, Unavailable
from shared.runtime import Component
from shared.selector import SelectorError, compile_selector
from shared.settings import Settings
from shared.store import Store
from shared.transport import ApiRequest, ApiService, Bus, OrderedReader, StreamMessage, is_delete, read_batches
from shared.validation import check_namespace, check_node_id, check_token

from . import tokenkeys
from .view import Event, SnapshotGone, View, as_of

log = logging.getLogger(__name__)

VERSION = "0.1.0"
FILL_BATCH = 5_000
REPLY_ROOM = 8 * 1024
STREAM_CHECK = 5.0
JOBS_REMEMBERED = 10_000  # seconds between checks that the events stream is still the one the view follows
LOG_READ_BATCH = 64  # output chunks read from the stream at a time
LOG_EXAMINED = 1024  # chunks one request reads at most (others' versions included): `next` goes on from there
# Seconds a chunk of an execution the view does not know is held back (the view may be a moment behind);
# older ones are not of this job's executions (or not of the node that published them), and are skipped.
LOG_HOLD = 2.0
LAG_NAME = "query-view"  # the view's reader in shoal_consumer_lag


def event_of(msg: StreamMessage) -> Event:
    """An EVENTS message as the view applies it. The marker of an execution moved to the archive deletes
    no row: an archived execution stays listed as it last was."""
    if s.archived(msg.headers):
        return Event.position(msg.seq, msg.at)
    return Event(msg.subject, msg.data, is_delete(msg.headers), msg.seq, msg.at)


def fitting(sizes: Sequence[int], budget: int) -> int:
    """How many of the first items fit in `budget` bytes of reply (always at least one, if any)."""
    if sum(sizes) + len(sizes) <= budget:
        return len(sizes)  # all of them (nearly always): one sum in C instead of a loop
    total = 0
    for count, size in enumerate(sizes):
        total += size + 1
        if total > budget and count:
            return count
    return len(sizes)


def page_reply(bodies: Sequence[bytes], next_token: str) -> bytes:
    """`{"items": [...], "next_token": "..."}` from stored JSON bodies; next_token only when more exist.

    The bodies are copied once, by one join (a page of 100 is about 100 KB): the envelope goes into the
    first and last items' separators.
    """
    tail = b'],"next_token":"' + next_token.encode() + b'"}' if next_token else b"]}"
    if not bodies:
        return b'{"items":[' + tail
    return b",".join([b'{"items":[' + bodies[0], *bodies[1:-1], bodies[-1] + tail] if len(bodies) > 1
                     else [b'{"items":[' + bodies[0] + tail])


class QueryService(Component):
    name = "query"

    def __init__(self, bus: Bus, settings: Settings, db_path: str | None = None, *, numbered: bool = False) -> None:
        super().__init__(bus, settings)
        self.db_path = db_path or settings.query_db
        self.numbered = numbered  # replicas in one process each keep their own view file
        self.lag = 0  # events in the stream after the last one applied, as of the last batch
        self._jobs: dict[tuple[str, str], tuple[int, str, int]] = {}  # (ns, ref) -> (jobs_changed, id, version)
        # Catching up since the reader was opened: (wall, CPU) at its start and the events applied; None
        # once the view has caught up with the stream (then `caught_up` says how that went).
        self._catching_up: tuple[float, float] | None = None
        self._catchup_events = self._catchup_batches = 0
        self.caught_up: tuple[int, float, float] | None = None  # events, seconds, CPU seconds

    async def start(self) -> None:
        self.store = Store(self.bus)
        path = self.db_path
        if self.numbered:
            stem, dot, ext = path.rpartition(".")
            path = f"{stem}-{self.replica}.{ext}" if dot else f"{path}-{self.replica}"
        self.view = View(path, retention=self.settings.page_retention)
        await self.view.open()
        # Every replica signs with the newest key and follows the set as it rotates (see tokenkeys).
        self.page_keys = tokenkeys.KeyRing(self.bus, rotation=self.settings.page_key_rotation,
                                           retention=self.settings.page_retention)
        await self.page_keys.start(self)
        await self._check_stream()
        # The view keeps its own position (the last sequence it committed, in the same transaction as the
        # rows), so it reads the stream in order from there with no durable consumer and no acks: nothing
        # redelivered late can arrive after newer events, and nothing is skipped.
        self._catching_up = (time.perf_counter(), time.process_time())
        self._catchup_events = self._catchup_batches = 0
        self.reader = OrderedReader(self.bus, s.STREAM_EVENTS, start_seq=self.view.last_seq + 1, batch=512,
                                    lag_name=LAG_NAME)
        await self.reader.open()
        self.bus.on_close(lambda: self.reader.close())  # before the connection drains
        self.spawn(self._follow, "follow-events")

        await ApiService.start(self.bus, s.SERVICE_QUERY, VERSION, "Paginated reads of jobs, executions, nodes",
                               queue_group=s.QUEUE_GROUP, endpoints=[
                                   ("executions-list", s.api("*", s.EXECUTIONS_LIST), self.list_executions),
                                   ("executions-get", s.api("*", s.EXECUTIONS_GET), self.get_execution),
                                   ("executions-logs", s.api("*", s.EXECUTIONS_LOGS), self.execution_logs),
                                   ("jobs-get", s.api("*", s.JOBS_GET), self.get_job),
                                   ("jobs-list", s.api("*", s.JOBS_LIST), self.list_jobs),
                                   ("nodes-list", s.NODES_LIST, self.list_nodes),
                               ])

    async def stop(self) -> None:
        await super().stop()
        await self.view.close()

    @property
    def token_key(self) -> pagetoken.Key:
        """The key new page tokens are signed with (it changes as keys rotate)."""
        return self.page_keys.signing()

    async def _check_stream(self) -> None:
        """Make sure the view follows this EVENTS stream, and fill a new view.

        A view file names the stream it followed by the stream's creation time. Against another stream
        (a wiped or recreated NATS store, a data dir reused against another server) its sequence numbers
        mean nothing: events at or below its last sequence would be ignored. So it starts again from
        empty. A view ahead of the stream's last sequence is from another stream too.
        """
        info = await self.bus.stream_info(s.STREAM_EVENTS)
        view = self.view
        if view.last_seq and (view.stream_id != info["created"] or view.last_seq > info["last_seq"]):
            log.warning("query view %s followed another events stream (created %s, at sequence %d; this one was "
                        "created %s and is at %d): rebuilding it", view.path, view.stream_id or "unknown",
                        view.last_seq, info["created"], info["last_seq"])
            await view.reset()
        if view.stream_id != info["created"]:
            await view.set_stream(info["created"])
        if view.last_seq == 0:
            await self._fill_from_buckets(info)

    async def _follow(self) -> None:
        """Apply the stream to the view, batch by batch, in order. Every few seconds, make sure it is still
        the stream the view follows; if it was replaced under us, rebuild the view and start over."""
        loop = asyncio.get_running_loop()
        checked = loop.time()
        if self.reader.last_seq != self.view.last_seq:
            # Started again after a crash: the batch being applied then was read but never committed.
            await self._reopen_reader()
        while not self.stopping.is_set():
            async for batch in read_batches(self.reader, self.stopping):
                if batch:
                    await self.view.apply([event_of(m) for m in batch])
                    self.lag = batch[-1].pending
                    self._catchup_events += len(batch)
                    self._catchup_batches += 1
                if self._catching_up is not None and (not batch or not self.lag):
                    self._report_caught_up()
                if loop.time() - checked > STREAM_CHECK:
                    checked = loop.time()
                    if await self._stream_replaced():
                        break
            else:
                return
            await self._check_stream()
            await self._reopen_reader()

    async def _reopen_reader(self) -> None:
        """Read the stream again from right after the last event the view committed."""
        await self.reader.close()
        self.reader = OrderedReader(self.bus, s.STREAM_EVENTS, start_seq=self.view.last_seq + 1, batch=512,
                                    lag_name=LAG_NAME)

    def _report_caught_up(self) -> None:
        """Once after start: the view has applied everything the stream held (how long it took, what CPU)."""
        assert self._catching_up is not None
        wall, cpu = time.perf_counter() - self._catching_up[0], time.process_time() - self._catching_up[1]
        self._catching_up = None
        self.caught_up = (self._catchup_events, wall, cpu)
        log.info("view caught up with the events stream: %d events in %.3f s, %.3f s of CPU (%.0f events/s, "
                 "%d batches), at sequence %d", self._catchup_events, wall, cpu,
                 self._catchup_events / wall if wall else 0.0, self._catchup_batches, self.view.last_seq)

    async def _stream_replaced(self) -> bool:
        try:
            return (await self.bus.stream_info(s.STREAM_EVENTS))["created"] != self.view.stream_id
        except Unavailable:
            return False  # cannot tell now; the reader waits the outage out

    async def _fill_from_buckets(self, info: dict[str, Any]) -> None:
        """A new view whose stream no longer holds every event starts from the buckets' current state.

        EVENTS keeps 30 days, the buckets keep everything: replaying the stream alone would build a
        replica without the older jobs, executions and nodes. So: note the stream's last sequence, read
        every record of the buckets (archived executions too), apply them as of that sequence, and follow
        the stream from there. Records written meanwhile come again as events, and only newer revisions win.
        """
        if info["first_seq"] <= 1:
            return  # the stream still holds every event since the first: replaying it is the rebuild
        mark = info["last_seq"]
        log.info("the events stream starts at %d: filling the view from the buckets as of %d",
                 info["first_seq"], mark)
        # The archive before the live executions: a record in both (a move cut short) is the live one.
        for bucket, prefix in ((self.store.jobs, s.EVENTS_JOB), (self.store.archive, s.EVENTS_EXECUTION),
                               (self.store.executions, s.EVENTS_EXECUTION), (self.store.nodes, s.EVENTS_NODE)):
            entries = await bucket.kv.scan()
            for start in range(0, len(entries), FILL_BATCH):
                await self.view.apply([Event(f"{prefix}.{e.key}", e.value, False, mark)
                                       for e in entries[start:start + FILL_BATCH]])
        await self.view.complete_from(mark)

    # -- executions --------------------------------------------------------------------------------

    async def _resolve_job(self, namespace: str, ref: str) -> tuple[str, int]:
        """(id, latest version) of a job named by id or name; remembered until the jobs table changes, so
        that a page of a job's executions is one read of the view, not two."""
        check_token(ref, "job", "job id or name")
        key = (namespace, ref)
        known = self._jobs.get(key)
        if known is not None and known[0] == self.view.jobs_changed:
            return known[1], known[2]
        changed = self.view.jobs_changed
        row = await self.view.one(
            "SELECT id, version FROM jobs WHERE namespace = ? AND (id = ? OR name = ?) "
            "ORDER BY (id = ?) DESC, created_at DESC LIMIT 1",
            (namespace, ref, ref, ref),
        )
        if row is None:
            raise NotFound(f"job {ref!r} not found in namespace {namespace!r}", field="job")
        if len(self._jobs) >= JOBS_REMEMBERED:
            self._jobs.clear()
        self._jobs[key] = (changed, row[0], row[1])
        return row[0], row[1]

    async def list_executions(self, req: ApiRequest) -> bytes:
        namespace = check_namespace(req.token(2))
        q = from_json(req.data, ListJobExecutionsRequest)
        limit = page_limit(q.limit)
        if q.node_id:
            check_node_id(q.node_id)
        if q.job_version is not None:
            if not q.job:
                raise InvalidInput("job_version needs job", field="job_version")
            if q.all_job_versions:
                raise InvalidInput("give job_version or all_job_versions, not both", field="job_version")
            if q.job_version < 1:
                raise InvalidInput("job_version starts at 1", field="job_version")
        scope = pagetoken.scope("executions", namespace, q.job, q.job_version, q.all_job_versions, q.node_id,
                                q.state, q.order_by, q.reverse)
        position = self._position(q.next_token, scope, 5)
        job_id = ""
        version: int | None = None
        if position is not None:
            # The job as the first page resolved it: a new version submitted mid-walk changes nothing.
            job_id, version = position[3], position[4]
        elif q.job:
            job_id, latest = await self._resolve_job(namespace, q.job)
            if not q.all_job_versions:
                version = q.job_version if q.job_version is not None else latest
        where = ["namespace = ?"]
        params: list[Any] = [namespace]
        if job_id:
            where.append("job_id = ?")
            params.append(job_id)
        if version is not None:
            where.append("job_version = ?")
            params.append(version)
        if q.node_id:
            where.append("node_id = ?")
            params.append(q.node_id)
        if q.state is not None:
            where.append("state = ?")
            params.append(q.state)
        return await self._page("executions", q.order_by, where, params, limit, q.reverse, position, scope,
                                carry=[job_id, version])

    def _position(self, token: str, scope: bytes, size: int) -> list[Any] | None:
        """The position inside a next_token: [snapshot sequence, sort value, id, ...what the page carries]."""
        if not token:
            return None
        position = pagetoken.decode(self.page_keys.lookup, token, scope)
        if len(position) != size or not isinstance(position[0], int):
            raise InvalidInput("next_token is malformed", field="next_token")
        return position

    async def _snapshot(self, position: list[Any] | None) -> int:
        try:
            return await self.view.snapshot(position[0] if position is not None else None)
        except SnapshotGone:
            raise self._expired() from None
        except TimeoutError:
            raise Unavailable("this query replica has not caught up with the page before; retry") from None

    def _still_readable(self, seq: int) -> None:
        """After a read: a prune that committed while it ran may have taken versions it needed."""
        if seq < self.view.pruned_through:
            raise self._expired()

    def _expired(self) -> InvalidInput:
        return InvalidInput(f"next_token has expired: the view keeps what a listing began with for "
                            f"{self.view.retention:.0f}s; list again without it", field="next_token")

    async def _page(self, table: str, column: str, where: list[str], params: list[Any], limit: int, reverse: bool,
                    position: list[Any] | None, scope: bytes, carry: Sequence[Any] = ()) -> bytes:
        """One keyset page of `table` as of the walk's snapshot; the token carries both on."""
        seq = await self._snapshot(position)
        if position is not None:
            where = [*where, f"({column}, id) {'<' if reverse else '>'} (?, ?)"]
            params = [*params, position[1], position[2]]
        direction = "DESC" if reverse else "ASC"
        sql, sql_params = as_of(table, f"body, {column}, id", where, params,
                                f"{column} {direction}, id {direction}", seq, limit + 1,
                                past=self.view.past_after(table, seq))
        rows = await self.view.rows(sql, sql_params)
        self._still_readable(seq)
        bodies = [r[0] for r in rows]
        # A page stops early, with a next_token, rather than grow past what one reply may carry.
        kept = fitting([len(b) for b in bodies[:limit]], self._reply_budget())
        next_token = ""
        if len(rows) > kept:
            del bodies[kept:]
            last = rows[kept - 1]
            next_token = pagetoken.encode(self.token_key, scope, [seq, last[1], last[2], *carry])
        return page_reply(bodies, next_token)

    def _reply_budget(self) -> int:
        """Bytes of items a reply may hold: the server's max_payload, less room for the envelope and token."""
        return self.bus.max_payload - REPLY_ROOM

    async def get_execution(self, req: ApiRequest) -> bytes:
        namespace = check_namespace(req.token(2))
        q = from_json(req.data, GetExecutionRequest)
        check_token(q.id, "id", "execution id")
        row = await self.view.one("SELECT body FROM executions WHERE namespace = ? AND id = ?", (namespace, q.id))
        if row is None:
            raise NotFound(f"execution {q.id!r} not found in namespace {namespace!r}", field="id")
        return b'{"execution":' + row[0] + b"}"

    async def execution_logs(self, req: ApiRequest) -> bytes:
        """What a job's executions printed (SHOAL_OUTPUT), in stream order from after `after`: by default the
        latest version's executions, or one node's, or one execution's (of any version). Read by subject
        with single-message gets, so nothing is left on the server; a reply stops at `limit` chunks or
        before max_payload (or after LOG_EXAMINED chunks read), and `next` is where to continue, which may
        be past the last item (nothing more matched up to there). A chunk counts only if the view places its
        execution in this job on the node that published it (a node may publish under its own id only)."""
        namespace = check_namespace(req.token(2))
        q = from_json(req.data, ExecutionLogsRequest)
        limit = page_limit(q.limit, default=DEFAULT_LOG_CHUNKS)
        if q.node_id:
            check_node_id(q.node_id)
        if q.execution_id:
            check_token(q.execution_id, "execution_id", "execution id")
        job_id, version = await self._resolve_job(namespace, q.job)
        subjects = s.output_filter(namespace, job_id, q.node_id or "*", q.execution_id or "*")
        # Every chunk stored by now is there to be read: once they are read, `next` may skip to here.
        mark = (await self.bus.stream_info(s.STREAM_OUTPUT))["last_seq"]
        position = q.after or 0
        items: list[bytes] = []
        size, budget = 0, self._reply_budget()
        placed: dict[str, tuple[str, int]] = {}  # execution id -> (node, version), as the view has it
        examined = 0
        while examined < LOG_EXAMINED:
            want = min(LOG_READ_BATCH, limit - len(items))
            msgs = await self.bus.read_stream(s.STREAM_OUTPUT, subjects, position + 1, want)
            examined += len(msgs)
            await self._place(namespace, job_id, msgs, placed)
            stop = False
            now = time.time()
            for m in msgs:
                node_id, _, _, execution_id = s.output_parts(m.subject)
                where = placed.get(execution_id)
                if where is None and now - m.at < LOG_HOLD:
                    stop = True  # perhaps not in the view yet: continue from here next time
                    break
                chunk = None
                if where is not None and where[0] == node_id and (q.execution_id or where[1] == version):
                    chunk = self._chunk(m.subject, m.data)
                if chunk is not None:
                    item = to_json(LogItem(execution_id=execution_id, node_id=node_id, seq=chunk.seq,
                                           text=chunk.data.decode(errors="replace"), at=chunk.at,
                                           final=chunk.final))
                    if items and size + len(item) + 1 > budget:
                        stop = True
                        break
                    items.append(item)
                    size += len(item) + 1
                position = m.seq
                if len(items) == limit:
                    stop = True
                    break
            if stop:
                break
            if len(msgs) < want:  # nothing more matches: what is left up to the mark is not ours
                position = max(position, mark)
                break
        return b'{"items":[' + b",".join(items) + b'],"next":' + str(position).encode() + b"}"

    @staticmethod
    def _chunk(subject: str, data: bytes) -> OutputChunk | None:
        try:
            return from_msgpack(data, OutputChunk)
        except Internal as exc:  # (a chunk over 4 KiB, say: skipped on every read, so not logged loudly)
            log.debug("skipping output chunk on %s: %s", subject, exc)
            return None

    async def _place(self, namespace: str, job_id: str, msgs: Sequence[Any], placed: dict[str, tuple[str, int]]) -> None:
        """Learn the node and version of the executions of `msgs` that the view knows."""
        wanted = {s.output_parts(m.subject)[3] for m in msgs} - placed.keys()
        if not wanted:
            return
        marks = ", ".join("?" * len(wanted))
        rows = await self.view.rows(f"SELECT id, node_id, job_version FROM executions WHERE namespace = ? AND "
                                    f"job_id = ? AND id IN ({marks})", (namespace, job_id, *wanted))
        for execution_id, node_id, version in rows:
            placed[execution_id] = (node_id, version)

    # -- jobs --------------------------------------------------------------------------------------

    async def get_job(self, req: ApiRequest) -> bytes:
        namespace = check_namespace(req.token(2))
        q = from_json(req.data, GetJobRequest)
        job_id, _ = await self._resolve_job(namespace, q.job)
        row = await self.view.one("SELECT body FROM jobs WHERE id = ?", (job_id,))
        assert row is not None
        return b'{"job":' + row[0] + b"}"

    async def list_jobs(self, req: ApiRequest) -> bytes:
        namespace = check_namespace(req.token(2))
        q = from_json(req.data, ListJobsRequest)
        limit = page_limit(q.limit)
        where = ["namespace = ?"]
        params: list[Any] = [namespace]
        if q.state is not None:
            where.append("state = ?")
            params.append(q.state)
        if q.type is not None:
            where.append("type = ?")
            params.append(q.type)
        scope = pagetoken.scope("jobs", namespace, q.state, q.type, q.order_by, q.reverse)
        position = self._position(q.next_token, scope, 3)
        return await self._page("jobs", q.order_by, where, params, limit, q.reverse, position, scope)

    # -- nodes -------------------------------------------------------------------------------------

    async def list_nodes(self, req: ApiRequest) -> bytes:
        q = from_json(req.data, ListNodesRequest)
        limit = page_limit(q.limit)
        selector = None
        if q.selector is not None:
            try:
                selector = compile_selector(q.selector.match_labels, q.selector.match_expressions,
                                            q.selector.match_ids)
            except SelectorError as exc:
                raise InvalidInput(exc.message, field=f"selector.{exc.field}" if exc.field else "selector") from None
        scope = pagetoken.scope("nodes", json.dumps(q.selector and [q.selector.match_labels,
                                                                    q.selector.match_expressions,
                                                                    q.selector.match_ids]), q.state)
        position = self._position(q.next_token, scope, 2)
        seq = await self._snapshot(position)
        after = str(position[1]) if position is not None else ""
        bodies: list[bytes] = []
        last_id = ""
        more = False
        budget = self._reply_budget()
        size = 0
        # Labels are matched here, in Python: scan in id order, in chunks, until the page is full.
        while not more:
            rows = await self.view.rows(*as_of("nodes", "id, state, labels, body", ["id > ?"], [after], "id", seq, 1000,
                                                past=self.view.past_after("nodes", seq)), inline=False)
            self._still_readable(seq)
            if not rows:
                break
            for node_id, state, labels, body in rows:
                after = node_id
                if q.state is not None and state != q.state:
                    continue
                if selector is not None and not selector.matches(node_id, json.loads(labels)):
                    continue
                size += len(body) + 1
                if len(bodies) == limit or (bodies and size > budget):
                    more = True
                    break
                bodies.append(body)
                last_id = node_id
        next_token = pagetoken.encode(self.token_key, scope, [seq, last_id]) if more else ""
        return page_reply(bodies, next_token)

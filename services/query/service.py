"""The query service: keeps its SQLite view current from the EVENTS stream and answers the read API.

ListJobExecutions is keyset-paginated: a page is one SQL read ordered by (created_at|updated_at, id),
and the next_token holds the last row's (value, id), so walking all pages returns every execution
exactly once even while new ones are inserted. Replies are assembled from the stored JSON bodies
without decoding them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

from shared import pagetoken
from shared import subjects as s
from shared.api import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    GetExecutionRequest,
    GetJobRequest,
    ListJobExecutionsRequest,
    ListJobsRequest,
    ListNodesRequest,
)
from shared.codec import from_json
from shared.errors import InvalidInput, NotFound
from shared.runtime import Component
from shared.selector import SelectorError, compile_selector
from shared.settings import Settings
from shared.store import Store
from shared.transport import ApiRequest, ApiService, Bus, Consumer, ConsumerSpec, Delivery, is_delete
from shared.validation import check_namespace

from .view import Event, View

log = logging.getLogger(__name__)

VERSION = "0.1.0"
TOKEN_KEY = "page-token-key"


def page_limit(limit: int | None) -> int:
    if limit is None:
        return DEFAULT_PAGE_SIZE
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidInput(f"limit must be between 1 and {MAX_PAGE_SIZE}, got {limit}", field="limit")
    return limit


def page_reply(bodies: Sequence[bytes], next_token: str) -> bytes:
    """`{"items": [...], "next_token": "..."}` from stored JSON bodies; next_token only when more exist."""
    out = b'{"items":[' + b",".join(bodies) + b"]"
    if next_token:
        out += b',"next_token":"' + next_token.encode() + b'"'
    return out + b"}"


class QueryService(Component):
    name = "query"

    def __init__(self, bus: Bus, settings: Settings, db_path: str | None = None, *, numbered: bool = False) -> None:
        super().__init__(bus, settings)
        self.db_path = db_path or settings.query_db
        self.numbered = numbered  # replicas in one process each keep their own view file

    async def start(self) -> None:
        self.store = Store(self.bus)
        path = self.db_path
        if self.numbered:
            stem, dot, ext = path.rpartition(".")
            path = f"{stem}-{self.replica}.{ext}" if dot else f"{path}-{self.replica}"
        self.view = View(path)
        await self.view.open()
        self.token_key = await self.store.shared_secret(TOKEN_KEY, lambda: os.urandom(32))
        # The view's own durable; if it is gone (expired while this replica was away), resume after the last
        # event the view committed.
        await Consumer(
            self.bus,
            ConsumerSpec(
                stream=s.STREAM_EVENTS,
                durable=s.consumer_query_view(self.view.view_id),
                deliver_from_seq=self.view.last_seq + 1 if self.view.last_seq else None,
                inactive_threshold=24 * 3600.0,
                max_ack_pending=10_000,
            ),
            batch=512,
        ).start_batch(self.on_events)

        await ApiService.start(self.bus, s.SERVICE_QUERY, VERSION, "Paginated reads of jobs, executions, nodes",
                               queue_group=s.QUEUE_GROUP, endpoints=[
                                   ("executions-list", s.api("*", s.EXECUTIONS_LIST), self.list_executions),
                                   ("executions-get", s.api("*", s.EXECUTIONS_GET), self.get_execution),
                                   ("jobs-get", s.api("*", s.JOBS_GET), self.get_job),
                                   ("jobs-list", s.api("*", s.JOBS_LIST), self.list_jobs),
                                   ("nodes-list", s.NODES_LIST, self.list_nodes),
                               ])

    async def stop(self) -> None:
        await super().stop()
        await self.view.close()

    async def on_events(self, deliveries: Sequence[Delivery]) -> None:
        events = [Event(d.subject, d.data, is_delete(d.headers), d.stream_seq) for d in deliveries
                  if d.stream_seq > self.view.last_seq]
        if events:
            await self.view.apply(events)

    # -- executions --------------------------------------------------------------------------------

    async def _resolve_job(self, namespace: str, ref: str) -> tuple[str, int]:
        row = await self.view.one(
            "SELECT id, version FROM jobs WHERE namespace = ? AND (id = ? OR name = ?) "
            "ORDER BY (id = ?) DESC, created_at DESC LIMIT 1",
            (namespace, ref, ref, ref),
        )
        if row is None:
            raise NotFound(f"job {ref!r} not found in namespace {namespace!r}", field="job")
        return row[0], row[1]

    async def list_executions(self, req: ApiRequest) -> bytes:
        namespace = check_namespace(req.token(2))
        q = from_json(req.data, ListJobExecutionsRequest)
        limit = page_limit(q.limit)
        where = ["namespace = ?"]
        params: list[Any] = [namespace]
        job_id = ""
        version: int | str | None = None
        if q.job:
            job_id, latest = await self._resolve_job(namespace, q.job)
            where.append("job_id = ?")
            params.append(job_id)
            if q.all_job_versions:
                if q.job_version is not None:
                    raise InvalidInput("give job_version or all_job_versions, not both", field="job_version")
                version = "all"
            else:
                if q.job_version is not None and q.job_version < 1:
                    raise InvalidInput("job_version starts at 1", field="job_version")
                version = q.job_version if q.job_version is not None else latest
                where.append("job_version = ?")
                params.append(version)
        elif q.job_version is not None:
            raise InvalidInput("job_version needs job", field="job_version")
        if q.node_id:
            where.append("node_id = ?")
            params.append(q.node_id)
        if q.state is not None:
            where.append("state = ?")
            params.append(q.state)
        scope = pagetoken.scope("executions", namespace, job_id, version, q.node_id, q.state, q.order_by, q.reverse)
        return await self._page("executions", q.order_by, where, params, limit, q.reverse, q.next_token, scope)

    async def _page(self, table: str, column: str, where: list[str], params: list[Any], limit: int, reverse: bool,
                    token: str, scope: bytes) -> bytes:
        if token:
            position = pagetoken.decode(self.token_key, token, scope)
            if len(position) != 2:
                raise InvalidInput("next_token is malformed", field="next_token")
            where.append(f"({column}, id) {'<' if reverse else '>'} (?, ?)")
            params.extend(position)
        direction = "DESC" if reverse else "ASC"
        sql = (f"SELECT body, {column}, id FROM {table} WHERE {' AND '.join(where)} "
               f"ORDER BY {column} {direction}, id {direction} LIMIT ?")
        rows = await self.view.rows(sql, [*params, limit + 1])
        next_token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            last = rows[-1]
            next_token = pagetoken.encode(self.token_key, scope, [last[1], last[2]])
        return page_reply([r[0] for r in rows], next_token)

    async def get_execution(self, req: ApiRequest) -> bytes:
        namespace = check_namespace(req.token(2))
        q = from_json(req.data, GetExecutionRequest)
        row = await self.view.one("SELECT body FROM executions WHERE namespace = ? AND id = ?", (namespace, q.id))
        if row is None:
            raise NotFound(f"execution {q.id!r} not found in namespace {namespace!r}", field="id")
        return b'{"execution":' + row[0] + b"}"

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
        return await self._page("jobs", q.order_by, where, params, limit, q.reverse, q.next_token, scope)

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
        after = ""
        if q.next_token:
            position = pagetoken.decode(self.token_key, q.next_token, scope)
            if len(position) != 1 or not isinstance(position[0], str):
                raise InvalidInput("next_token is malformed", field="next_token")
            after = position[0]
        bodies: list[bytes] = []
        last_id = ""
        more = False
        # Labels are matched here, in Python: scan in id order, in chunks, until the page is full.
        while not more:
            rows = await self.view.rows(
                "SELECT id, state, labels, body FROM nodes WHERE id > ? ORDER BY id LIMIT 1000", (after,))
            if not rows:
                break
            for node_id, state, labels, body in rows:
                after = node_id
                if q.state is not None and state != q.state:
                    continue
                if selector is not None and not selector.matches(node_id, json.loads(labels)):
                    continue
                if len(bodies) == limit:
                    more = True
                    break
                bodies.append(body)
                last_id = node_id
        next_token = pagetoken.encode(self.token_key, scope, [last_id]) if more else ""
        return page_reply(bodies, next_token)

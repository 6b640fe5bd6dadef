"""Server-Sent Events of one job: its rollout's progress and its executions' changes, as they happen.

Every change of an execution or a rollout is already an event of SHOAL_EVENTS (the buckets are sourced
into it), so a stream is two ordered readers of that stream, filtered to the job's subjects and starting
at its current end: no polling, and nothing is missed between the first status and the first change.

- `event: execution`: the Execution as written (its `id:` is the stream sequence; a client that sends
  it back as `Last-Event-ID` resumes after it);
- `event: rollout`: a RolloutStatus, first the current one, then after changes. The status is the
  rollout service's answer (waves and their states are computed there), asked for at most every
  REFRESH seconds however fast executions change, and sent only when it differs from the last one;
- a comment every HEARTBEAT seconds, so proxies and clients know the stream is alive.

A stream ends when its client goes away, when the gateway stops, or when a reader fails for good (the
client reconnects); either way its server-side consumers are deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from shared import subjects as s
from shared.api import GetJobRequest, GetJobResponse, RolloutRequest
from shared.codec import from_json, from_msgpack_or_none, to_json
from shared.errors import InvalidInput, NotFound, ShoalError, Unavailable
from shared.models import Execution
from shared.transport import OrderedReader, StreamMessage, read_batches

from .http import Request, Send

if TYPE_CHECKING:
    from .service import GatewayService

log = logging.getLogger(__name__)

HEARTBEAT = 15.0
REFRESH = 0.3
MAX_STREAMS = 256  # each holds two ephemeral consumers on the server
QUEUE = 1024
KV_OPERATION = "KV-Operation"  # set on a deletion (DEL or PURGE) sourced from a bucket


async def open_job_events(gw: GatewayService, req: Request) -> JobEvents:
    """Check the job and open the readers before answering, so that a problem is a JSON error reply,
    not a stream that ends at once."""
    if req.query:
        raise InvalidInput("the event stream takes no query parameters", field=next(iter(req.query)))
    if gw.streams >= MAX_STREAMS:
        raise Unavailable(f"{MAX_STREAMS} event streams are open already; try again later")
    ns = req.params["ns"]
    raw = await gw.bus.request(s.api(ns, s.JOBS_GET), to_json(GetJobRequest(job=req.params["job"])),
                               timeout=gw.timeout)
    job_id = from_json(raw, GetJobResponse, max_bytes=None).job.id
    if not s.TOKEN.fullmatch(job_id):
        raise NotFound(f"job {req.params['job']!r} has an id that cannot name its events")
    end = (await gw.bus.stream_info(s.STREAM_EVENTS))["last_seq"] + 1
    start = min(_last_event_id(req) + 1, end) if _last_event_id(req) else end
    readers = [
        OrderedReader(gw.bus, s.STREAM_EVENTS, filter_subject=f"{s.EVENTS_EXECUTION}.*.{ns}.{job_id}.>",
                      start_seq=start),
        OrderedReader(gw.bus, s.STREAM_EVENTS, filter_subject=f"{s.EVENTS_ROLLOUT}.*.{ns}.{job_id}", start_seq=start),
    ]
    try:
        for reader in readers:
            await reader.open()
    except BaseException:
        for reader in readers:
            await reader.close()
        raise
    return JobEvents(gw, ns, job_id, readers)


def _last_event_id(req: Request) -> int:
    value = req.header("last-event-id") or ""
    return int(value) if value.isdigit() and len(value) < 20 else 0


class JobEvents:
    def __init__(self, gw: GatewayService, ns: str, job_id: str, readers: list[OrderedReader]) -> None:
        self.gw = gw
        self.ns = ns
        self.job_id = job_id
        self.readers = readers
        self.heartbeat = gw.heartbeat
        self._last_status = b""
        self._done = asyncio.Event()
        self._send: Send | None = None

    async def run(self, send: Send, req: Request) -> None:
        self.gw.streams += 1
        self._send = send
        queue: asyncio.Queue[tuple[str, StreamMessage]] = asyncio.Queue(maxsize=QUEUE)
        tasks = [asyncio.create_task(self._pump(reader, kind, queue))
                 for reader, kind in zip(self.readers, ("execution", "rollout"))]
        tasks.append(asyncio.create_task(self._until(req.disconnected())))
        tasks.append(asyncio.create_task(self._until(self.gw.stopping.wait())))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"), (b"x-content-type-options", b"nosniff")]})
            await self._write(b"retry: 3000\n\n")
            await self._rollout()
            await self._loop(queue)
        finally:
            self._done.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for reader in self.readers:
                await reader.close()
            self.gw.streams -= 1
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _loop(self, queue: asyncio.Queue[tuple[str, StreamMessage]]) -> None:
        clock = asyncio.get_running_loop()
        next_beat = clock.time() + self.heartbeat
        refresh_at = 0.0
        dirty = False
        while not self._done.is_set():
            now = clock.time()
            wait = next_beat - now
            if dirty:
                wait = min(wait, refresh_at - now)
            item = await self._next(queue, max(0.0, wait))
            if item is not None:
                kind, msg = item
                if kind == "execution":
                    body = _execution(msg)
                    if body is not None:
                        await self._event("execution", body, msg.seq)
                dirty = True  # an execution's change moves its wave's counts, too
            now = clock.time()
            if dirty and now >= refresh_at:
                dirty = False
                refresh_at = now + REFRESH
                await self._rollout()
            if now >= next_beat:
                await self._write(b": keep-alive\n\n")
                next_beat = now + self.heartbeat

    async def _next(self, queue: asyncio.Queue[tuple[str, StreamMessage]],
                    wait: float) -> tuple[str, StreamMessage] | None:
        get = asyncio.ensure_future(queue.get())
        done = asyncio.ensure_future(self._done.wait())
        try:
            await asyncio.wait({get, done}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        finally:
            done.cancel()
            if not get.done():
                get.cancel()
        if get.done() and not get.cancelled():
            return get.result()
        return None

    async def _pump(self, reader: OrderedReader, kind: str, queue: asyncio.Queue[tuple[str, StreamMessage]]) -> None:
        try:
            async for batch in read_batches(reader, self._done):
                for msg in batch:
                    await queue.put((kind, msg))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("event stream of %s/%s: reading %s failed (%s); ending the stream", self.ns, self.job_id,
                        kind, exc)
            self._done.set()

    async def _until(self, waiting: Any) -> None:
        await waiting
        self._done.set()

    async def _rollout(self) -> None:
        """Send the rollout's status if it changed; nothing while the job has no rollout yet."""
        try:
            raw = await self.gw.bus.request(s.api(self.ns, s.ROLLOUT_STATUS), to_json(RolloutRequest(job=self.job_id)),
                                            timeout=self.gw.timeout)
        except ShoalError as exc:
            if not isinstance(exc, (NotFound, Unavailable)):
                log.warning("event stream of %s/%s: rollout status: %s", self.ns, self.job_id, exc)
            return
        if raw != self._last_status:
            self._last_status = raw
            await self._event("rollout", raw)

    async def _event(self, kind: str, body: bytes, seq: int | None = None) -> None:
        head = f"event: {kind}\n" + (f"id: {seq}\n" if seq is not None else "")
        await self._write(head.encode() + b"data: " + body + b"\n\n")

    async def _write(self, data: bytes) -> None:
        assert self._send is not None
        try:
            await self._send({"type": "http.response.body", "body": data, "more_body": True})
        except Exception:  # the client went away mid-write
            self._done.set()


def _execution(msg: StreamMessage) -> bytes | None:
    """The JSON of an execution event; None for a deletion or a record that cannot be read."""
    if msg.headers.get(KV_OPERATION) in ("DEL", "PURGE") or not msg.data:
        return None
    execution = from_msgpack_or_none(msg.data, Execution, f"execution event {msg.seq}")
    return to_json(execution) if execution is not None else None

"""Server-Sent Events of one job: its rollout's progress and its executions' changes, as they happen.

Every change of an execution or a rollout is already an event of SHOAL_EVENTS (the buckets are sourced
into it), so a stream is two ordered readers of that stream, filtered to the job's subjects and starting
at its current end: no polling, and nothing is missed between the first status and the first change.

- `event: execution`: the Execution as written (its `id:` is the stream sequence; a client that sends
  it back as `Last-Event-ID` resumes after it);
- `event: rollout`: a RolloutStatus, first the current one, then after changes, sent only when it
  differs from the last one sent;
- a comment every HEARTBEAT seconds, so proxies and clients know the stream is alive.

The status is the rollout service's answer (`rollouts.status`, which reads every execution of the
job), so what asks for it is shared: one StatusRefresher per job in a gateway, whatever the number of
streams open on that job. A change of the rollout record is asked about at once (once, however many
streams saw it); a change of an execution only moves its wave's counts, so it is asked about at most
once every `status_every` seconds (STATUS_EVERY), and its Execution is forwarded meanwhile.

A stream ends when its client goes away, when the gateway stops, or when a reader fails for good (the
client reconnects); either way its server-side consumers are deleted. A gateway holds at most
`max_streams` streams, and one caller (a token; without tokens, a client address) at most
`max_streams_per_caller`: the slot is taken before anything is awaited, and given back on every path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shared import subjects as s
from shared.api import GetJobRequest, GetJobResponse, RolloutRequest
from shared.codec import from_json, from_msgpack_or_none, to_json
from shared.errors import InvalidInput, NotFound, ShoalError, Unavailable
from shared.models import Execution
from shared.transport import OrderedReader, StreamMessage, is_delete, read_batches

from .http import Request, Send

if TYPE_CHECKING:
    from .service import GatewayService

log = logging.getLogger(__name__)

HEARTBEAT = 15.0
STATUS_EVERY = 3.0  # seconds: the most often one job's status is asked for because its executions changed
MAX_STREAMS = 256  # each holds two ephemeral consumers on the server
MAX_STREAMS_PER_CALLER = 32
QUEUE = 1024


class TooManyRequests(ShoalError):
    """One caller holds as many event streams as it may: 429."""

    default_code = 429
    default_retryable = True


def reserve(gw: GatewayService, caller: str) -> Callable[[], None]:
    """Take a stream slot for `caller`, or refuse: no await between the check and the count, so that
    concurrent opens cannot all pass the check. Returns the release, which may be called more than once."""
    if gw.streams >= gw.max_streams:
        raise Unavailable(f"{gw.max_streams} event streams are open already; try again later")
    held = gw.caller_streams.get(caller, 0)
    if held >= gw.max_streams_per_caller:
        raise TooManyRequests(f"this caller has {held} event streams open, the most it may; close one first")
    gw.streams += 1
    gw.caller_streams[caller] = held + 1
    released = False

    def release() -> None:
        nonlocal released
        if released:
            return
        released = True
        gw.streams -= 1
        left = gw.caller_streams.get(caller, 1) - 1
        if left > 0:
            gw.caller_streams[caller] = left
        else:
            gw.caller_streams.pop(caller, None)

    return release


def caller_of(req: Request) -> str:
    """Who opens a stream: the token (by its hash), or without tokens the client's address."""
    return f"token:{req.access.key}" if req.access.key else f"address:{req.client}"


async def open_job_events(gw: GatewayService, req: Request) -> JobEvents:
    """Check the job and open the readers before answering, so that a problem is a JSON error reply,
    not a stream that ends at once."""
    if req.query:
        raise InvalidInput("the event stream takes no query parameters", field=next(iter(req.query)))
    release = reserve(gw, caller_of(req))
    readers: list[OrderedReader] = []
    try:
        ns = req.params["ns"]
        raw = await gw.bus.request(s.api(ns, s.JOBS_GET), to_json(GetJobRequest(job=req.params["job"])),
                                   timeout=gw.timeout)
        job_id = from_json(raw, GetJobResponse, max_bytes=None).job.id
        if not s.TOKEN.fullmatch(job_id):
            raise NotFound(f"job {req.params['job']!r} has an id that cannot name its events", field="job")
        end = (await gw.bus.stream_info(s.STREAM_EVENTS))["last_seq"] + 1
        resume = _last_event_id(req)
        start = min(resume + 1, end) if resume else end
        readers = [
            OrderedReader(gw.bus, s.STREAM_EVENTS, filter_subject=f"{s.EVENTS_EXECUTION}.*.{ns}.{job_id}.>",
                          start_seq=start),
            OrderedReader(gw.bus, s.STREAM_EVENTS, filter_subject=f"{s.EVENTS_ROLLOUT}.*.{ns}.{job_id}",
                          start_seq=start),
        ]
        for reader in readers:
            await reader.open()
    except BaseException:
        for reader in readers:
            await reader.close()
        release()
        raise
    return JobEvents(gw, ns, job_id, readers, release)


def _last_event_id(req: Request) -> int:
    value = req.header("last-event-id") or ""
    return int(value) if value.isdigit() and len(value) < 20 else 0


class StatusRefresher:
    """The rollout status of one job, asked for on behalf of every stream of that job in this gateway."""

    def __init__(self, gw: GatewayService, ns: str, job_id: str) -> None:
        self.gw = gw
        self.ns = ns
        self.job_id = job_id
        self.streams: set[JobEvents] = set()
        self.status: bytes | None = None  # the last answer (None: no rollout, or not asked yet)
        self.fetched_at = float("-inf")  # loop time of the last answer
        self._due: float | None = None  # when to ask next; None: nothing changed since the last answer
        self._rollout_seq = 0  # the last rollout-record event asked about
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task = asyncio.create_task(self._run(), name=f"gateway:status:{ns}/{job_id}")

    @staticmethod
    def join(gw: GatewayService, ns: str, job_id: str, stream: JobEvents) -> StatusRefresher:
        refresher = gw.refreshers.get((ns, job_id))
        if refresher is None:
            refresher = gw.refreshers[(ns, job_id)] = StatusRefresher(gw, ns, job_id)
        refresher.streams.add(stream)
        return refresher

    async def leave(self, stream: JobEvents) -> None:
        self.streams.discard(stream)
        if not self.streams and self.gw.refreshers.get((self.ns, self.job_id)) is self:
            del self.gw.refreshers[(self.ns, self.job_id)]
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def execution_changed(self) -> None:
        """An execution changed: its wave's counts may have moved; ask within `status_every`."""
        now = asyncio.get_running_loop().time()
        due = max(now, self.fetched_at + self.gw.status_every)
        if self._due is None or due < self._due:
            self._due = due
            self._wake.set()

    def rollout_changed(self, seq: int) -> None:
        """The rollout record changed (event `seq`): ask now, once for every stream that saw it."""
        if seq <= self._rollout_seq:
            return
        self._rollout_seq = seq
        self._due = asyncio.get_running_loop().time()
        self._wake.set()

    async def current(self) -> bytes | None:
        """The status for a stream that opens: the last answer while it is recent, else a new one."""
        async with self._lock:
            if asyncio.get_running_loop().time() - self.fetched_at < self.gw.status_every and self._due is None:
                return self.status
        return await self._fetch()

    async def _run(self) -> None:
        clock = asyncio.get_running_loop()
        while True:
            if self._due is None:
                await self._wake.wait()
                self._wake.clear()
                continue
            delay = self._due - clock.time()
            if delay > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                self._wake.clear()
                continue
            self._due = None
            try:
                raw = await self._fetch()
            except Exception:  # never let one failure end the refreshes of every stream of the job
                log.exception("event streams of %s/%s: rollout status failed", self.ns, self.job_id)
                continue
            if raw is not None:
                for stream in list(self.streams):
                    stream.offer_status(raw)

    async def _fetch(self) -> bytes | None:
        async with self._lock:
            self.gw.status_requests += 1
            try:
                raw: bytes | None = await self.gw.bus.request(
                    s.api(self.ns, s.ROLLOUT_STATUS), to_json(RolloutRequest(job=self.job_id)),
                    timeout=self.gw.timeout)
            except ShoalError as exc:
                if not isinstance(exc, (NotFound, Unavailable)):
                    log.warning("event streams of %s/%s: rollout status: %s", self.ns, self.job_id, exc)
                raw = None
            self.fetched_at = asyncio.get_running_loop().time()
            if raw is not None:
                self.status = raw
            return raw


class JobEvents:
    def __init__(self, gw: GatewayService, ns: str, job_id: str, readers: list[OrderedReader],
                 release: Callable[[], None]) -> None:
        self.gw = gw
        self.ns = ns
        self.job_id = job_id
        self.readers = readers
        self.release = release
        self.heartbeat = gw.heartbeat
        self._last_status = b""
        self._status: bytes | None = None  # offered by the refresher, not yet sent
        self._status_ready = asyncio.Event()
        self._done = asyncio.Event()
        self._send: Send | None = None

    def offer_status(self, raw: bytes) -> None:
        self._status = raw
        self._status_ready.set()

    async def run(self, send: Send, req: Request) -> None:
        refresher: StatusRefresher | None = None
        tasks: list[asyncio.Task[None]] = []
        try:
            refresher = StatusRefresher.join(self.gw, self.ns, self.job_id, self)
            self._send = send
            queue: asyncio.Queue[tuple[str, StreamMessage]] = asyncio.Queue(maxsize=QUEUE)
            tasks = [asyncio.create_task(self._pump(reader, kind, queue))
                     for reader, kind in zip(self.readers, ("execution", "rollout"))]
            tasks.append(asyncio.create_task(self._until(req.disconnected())))
            tasks.append(asyncio.create_task(self._until(self.gw.stopping.wait())))
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"), (b"x-content-type-options", b"nosniff")]})
            await self._write(b"retry: 3000\n\n")
            first = await refresher.current()
            if first is not None:
                await self._rollout(first)
            await self._loop(queue, refresher)
        finally:
            self._done.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if refresher is not None:
                await refresher.leave(self)
            for reader in self.readers:
                await reader.close()
            self.release()
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _loop(self, queue: asyncio.Queue[tuple[str, StreamMessage]], refresher: StatusRefresher) -> None:
        clock = asyncio.get_running_loop()
        next_beat = clock.time() + self.heartbeat
        while not self._done.is_set():
            item = await self._next(queue, max(0.0, next_beat - clock.time()))
            if item is not None:
                kind, msg = item
                if kind == "execution":
                    body = _execution(msg)
                    if body is not None:
                        await self._event("execution", body, msg.seq)
                    refresher.execution_changed()
                else:
                    refresher.rollout_changed(msg.seq)
            if self._status is not None:
                raw, self._status = self._status, None
                self._status_ready.clear()
                await self._rollout(raw)
            now = clock.time()
            if now >= next_beat:
                await self._write(b": keep-alive\n\n")
                next_beat = now + self.heartbeat

    async def _next(self, queue: asyncio.Queue[tuple[str, StreamMessage]],
                    wait: float) -> tuple[str, StreamMessage] | None:
        if not queue.empty():
            return queue.get_nowait()
        get = asyncio.ensure_future(queue.get())
        done = asyncio.ensure_future(self._done.wait())
        status = asyncio.ensure_future(self._status_ready.wait())
        try:
            await asyncio.wait({get, done, status}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        finally:
            done.cancel()
            status.cancel()
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

    async def _rollout(self, raw: bytes) -> None:
        """Send the rollout's status if it differs from the last one sent."""
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
    if is_delete(msg.headers) or not msg.data:
        return None
    execution = from_msgpack_or_none(msg.data, Execution, f"execution event {msg.seq}")
    return to_json(execution) if execution is not None else None

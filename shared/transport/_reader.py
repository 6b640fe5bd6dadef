"""Ordered reading of a stream: every message once, in stream order, across reconnects and server restarts.

A reader that keeps its own position (the query view commits the last sequence it applied in its own
file; a watch remembers the last revision it saw) needs no durable consumer and no acks: it needs the
messages after that position, in order, without a gap. `OrderedReader` gets them from an ephemeral pull
consumer (no acks, in memory on the server) and checks the consumer sequence of every message: a gap,
a fetch error, a reconnect or a consumer the server no longer knows (it restarted) makes it create a
new consumer that starts right after the last message it handed out. Nothing is skipped and nothing
is handed out twice, whatever happens to the connection.

Durable work-queue consumers (`Consumer`) are the other way of reading: shared by replicas, acked
message by message, redelivered after a crash.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import nats.errors
import nats.js.errors
from nats.js import api

from .. import metrics
from ..errors import NotFound, ShoalError, Unavailable
from ._bus import Bus, map_error
from ._pull import Pull

log = logging.getLogger(__name__)

FETCH_WAIT = 0.5
IDLE_CHECK = 3.0  # seconds without a message before the reader asks whether its consumer still exists
INACTIVE_THRESHOLD = 30.0  # the server drops a consumer nobody pulls from for this long


class StreamMessage:
    """One message of a stream as an ordered reader hands it out."""

    __slots__ = ("subject", "data", "headers", "seq", "pending", "at")

    def __init__(self, subject: str, data: bytes, headers: dict[str, str], seq: int, pending: int,
                 at: float) -> None:
        self.subject = subject
        self.data = data
        self.headers = headers
        self.seq = seq  # stream sequence
        self.pending = pending  # messages after this one that match the filter, when it was sent
        self.at = at  # when the stream stored it (seconds since the epoch)


class OrderedReader:
    """Reads `stream` (optionally one filter subject) in order from a start position.

    Start at `start_seq` (the first message wanted), or with `last_per_subject` at the last message of
    every subject (a key-value watch), or at the beginning. `next_batch()` returns the next messages
    (an empty list when none came within the wait).
    """

    def __init__(self, bus: Bus, stream: str, *, filter_subject: str | None = None, start_seq: int | None = None,
                 last_per_subject: bool = False, batch: int = 256, lag_name: str = "") -> None:
        self.bus = bus
        # With a name, the reader reports its lag (`shoal_consumer_lag{consumer=lag_name}`) until closed.
        self._lag = metrics.INSTRUMENTS.lag(stream, lag_name) if lag_name else None
        self._lag_name = lag_name
        self.stream = stream
        self.filter_subject = filter_subject
        self.batch = batch
        self.last_seq = (start_seq - 1) if start_seq else 0  # stream sequence of the last message handed out
        self._last_per_subject = last_per_subject and not start_seq
        self._sub: Pull | None = None
        self._consumer = ""
        self._cseq = 0  # consumer sequence of the last message handed out
        self._generation = -1
        self._idle_since = 0.0
        self.initial_pending: int | None = None  # messages matching when the first consumer was created
        self.recreated = 0
        # Whether the last attempt to read failed, and when reading last came back after a failure (loop
        # time): a follower that judges silence (no heartbeats) must not count what it could not hear.
        self.failing = False
        self.recovered_at = 0.0

    async def open(self) -> None:
        """Create the server-side consumer now (otherwise the first `next_batch` does)."""
        if self._sub is None:
            await self._create()

    async def _create(self) -> None:
        await self._drop()
        config = api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE,
            filter_subject=self.filter_subject,
            inactive_threshold=INACTIVE_THRESHOLD,
            mem_storage=True,
            num_replicas=1,
        )
        if self.last_seq:
            config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = self.last_seq + 1
        elif self._last_per_subject:
            config.deliver_policy = api.DeliverPolicy.LAST_PER_SUBJECT
        else:
            config.deliver_policy = api.DeliverPolicy.ALL
        generation = self.bus.generation
        try:
            info = await self.bus.js.add_consumer(self.stream, config=config)
            self._sub = Pull(self.bus, self.stream, info.name)
            await self._sub.open()
        except Exception as exc:
            raise map_error(exc, f"read {self.stream}") from None
        self._consumer = info.name
        self._cseq = 0
        self._generation = generation
        self._idle_since = asyncio.get_running_loop().time()
        if self.initial_pending is None:
            self.initial_pending = info.num_pending or 0

    async def next_batch(self, wait: float = FETCH_WAIT) -> list[StreamMessage]:
        """The next messages in order; [] if none came within `wait` or the reader had to start over.

        Raises Unavailable while the server cannot be reached (the caller backs off and calls again).
        """
        try:
            if self._sub is None or self._generation != self.bus.generation:
                await self._create()
            assert self._sub is not None
            msgs = await self._sub.fetch(self.batch, wait)
            if not msgs:
                await self._check_idle()
                self._ok()
                if self._lag is not None:
                    self._lag.pending = 0  # no acks, no limit: nothing came because nothing is left
                return []
        except ShoalError:
            self.failing = True
            raise
        except Exception as exc:
            log.info("reading %s: %s; starting over after sequence %d", self.stream, exc or type(exc).__name__,
                     self.last_seq)
            self.failing = True
            await self._drop()
            raise map_error(exc, f"read {self.stream}") from None
        self._ok()
        out: list[StreamMessage] = []
        for msg in msgs:
            meta = msg.metadata
            if meta.sequence.consumer != self._cseq + 1:
                # A message went missing between the server and us: start again after the last one we have.
                log.info("reading %s: gap after consumer sequence %d; starting over after stream sequence %d",
                         self.stream, self._cseq, self.last_seq)
                self.recreated += 1
                await self._drop()
                break
            self._cseq = meta.sequence.consumer
            self.last_seq = meta.sequence.stream
            out.append(StreamMessage(msg.subject, msg.data or b"", dict(msg.headers or {}), meta.sequence.stream,
                                     meta.num_pending, meta.timestamp.timestamp()))
        if out:
            self._idle_since = asyncio.get_running_loop().time()
            if self._lag is not None:
                self._lag.pending = out[-1].pending
        return out

    def _ok(self) -> None:
        if self.failing:
            self.failing = False
            self.recovered_at = asyncio.get_running_loop().time()

    async def _check_idle(self) -> None:
        """No message for a while: make sure the consumer still exists (a restarted server forgets it)."""
        now = asyncio.get_running_loop().time()
        if now - self._idle_since < IDLE_CHECK:
            return
        self._idle_since = now
        try:
            await self.bus.js.consumer_info(self.stream, self._consumer)
        except nats.js.errors.NotFoundError:
            log.info("reading %s: the server no longer has the consumer; starting over after sequence %d",
                     self.stream, self.last_seq)
            self.recreated += 1
            await self._drop()
        except Exception as exc:
            raise map_error(exc, f"read {self.stream}") from None

    async def _drop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is None:
            return
        await sub.close()
        if self._consumer and self.bus.connected:
            try:
                await asyncio.wait_for(self.bus.js.delete_consumer(self.stream, self._consumer), 2)
            except Exception:  # gone already, or the server is away: it expires on its own
                pass

    async def close(self) -> None:
        await self._drop()
        if self._lag is not None:
            metrics.INSTRUMENTS.release_lag(self.stream, self._lag_name)
            self._lag = None


class PullReader:
    """Reads a durable pull consumer that a service keeps for this client (an agent's assignments).

    The client only fetches from it and acks (two subjects a permission can name exactly); it never
    creates or changes a consumer. Messages are acked as they are handed out: a client that loses its
    place asks the service to reset the consumer, which starts again from the last message of every
    subject. A consumer the server no longer has is NotFound: the client asks for a new one.
    """

    def __init__(self, bus: Bus, stream: str, consumer: str, *, batch: int = 256) -> None:
        self.bus = bus
        self.stream = stream
        self.consumer = consumer
        self.batch = batch
        self._sub: Pull | None = None

    async def next_batch(self, wait: float = FETCH_WAIT) -> list[StreamMessage]:
        try:
            if self._sub is None:
                self._sub = Pull(self.bus, self.stream, self.consumer)
            msgs = await self._sub.fetch(self.batch, wait)
        except nats.js.errors.NotFoundError:
            await self.close()
            raise NotFound(f"consumer {self.consumer} of {self.stream} is gone") from None
        except Exception as exc:
            await self.close()
            raise map_error(exc, f"read {self.stream}/{self.consumer}") from None
        out = []
        for msg in msgs:
            meta = msg.metadata
            out.append(StreamMessage(msg.subject, msg.data or b"", dict(msg.headers or {}), meta.sequence.stream,
                                     meta.num_pending, meta.timestamp.timestamp()))
            try:
                await msg.ack()
            except Exception:  # redelivered after the ack wait; readers ignore older revisions
                pass
        return out

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            await sub.close()


async def read_batches(reader: OrderedReader, stopping: asyncio.Event) -> AsyncIterator[list[StreamMessage]]:
    """Yield batches until `stopping` is set, an empty one whenever none came within the fetch wait (so
    the caller can do periodic work); connection trouble is waited out with backoff."""
    delay = 0.1
    while not stopping.is_set():
        try:
            batch = await reader.next_batch()
        except ShoalError as exc:
            if not exc.retryable and not isinstance(exc, Unavailable):
                raise
            log.info("reading %s: %s; retrying in %.1fs", reader.stream, exc, delay)
            try:
                await asyncio.wait_for(stopping.wait(), delay)
            except asyncio.TimeoutError:
                pass
            delay = min(delay * 2, 5.0)
            continue
        delay = 0.1
        yield batch

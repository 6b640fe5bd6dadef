"""Durable pull consumers shared by replicas: the way every service takes work off a stream.

A handler receives a `Delivery`. Returning normally acks it; raising naks it with a growing delay, so
the message is redelivered, to this replica or another: nothing accepted is lost when a replica dies
mid-way, because an unacked message comes back after `ack_wait` (5 s; a handler that takes longer
tells the server it is still at work every `ack_wait / 3`, so a dead replica's work moves to a live
one within seconds while a slow one keeps its own). Handlers must therefore be idempotent.

Nothing is retried for ever. A message that has failed `max_attempts` times, or has been handed out
that often without ever being acknowledged (it crashes or hangs whoever takes it), is a dead letter:
it is copied with its error to the DEAD stream (`shoal.dead.<stream>`), the consumer's `on_dead` hook
answers its sender where there is one, and it is taken off the work queue.

Each consumer reports its lag (`shoal_consumer_lag`: messages of its stream that match it and are not
yet delivered) from the metadata of what it fetches, and while idle from a consumer info at most every
`LAG_CHECK` seconds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

from .. import metrics, telemetry
from ..errors import Poison, ShoalError
from ..subjects import dead_letter
from ._bus import MSG_ID_HEADER, Bus, Message, header_value, map_error, message_size
from ._pull import Pull

log = logging.getLogger(__name__)
T = TypeVar("T")


class Delivery(Message):
    """One JetStream message, with its delivery count and explicit ack controls."""

    __slots__ = ("_done",)

    def __init__(self, msg: Msg) -> None:
        super().__init__(msg)
        self._done = False

    @property
    def msg_id(self) -> str:
        return self.headers.get("Nats-Msg-Id", "")

    @property
    def num_delivered(self) -> int:
        return self._msg.metadata.num_delivered

    @property
    def stream_seq(self) -> int:
        return self._msg.metadata.sequence.stream

    @property
    def stored_at(self) -> float:
        """When the stream stored the message (seconds since the epoch), the same on every redelivery."""
        return self._msg.metadata.timestamp.timestamp()

    @property
    def done(self) -> bool:
        return self._done

    async def ack(self) -> None:
        if not self._done:
            self._done = True
            await self._msg.ack()

    async def nak(self, delay: float | None = None) -> None:
        if not self._done:
            self._done = True
            await self._msg.nak(delay=delay)

    async def term(self) -> None:
        if not self._done:
            self._done = True
            await self._msg.term()

    async def in_progress(self) -> None:
        await self._msg.in_progress()


Handler = Callable[[Delivery], Awaitable[None]]
# A batch handler returns the deliveries it could not handle, with why; every other one is acked.
BatchHandler = Callable[[Sequence[Delivery]], Awaitable[Mapping[Delivery, Exception] | None]]
DeadHandler = Callable[[Delivery, str], Awaitable[None]]

DEAD_SUBJECT = "Shoal-Dead-Subject"
DEAD_SEQ = "Shoal-Dead-Seq"
DEAD_CONSUMER = "Shoal-Dead-Consumer"
DEAD_ATTEMPTS = "Shoal-Dead-Attempts"
DEAD_ERROR = "Shoal-Dead-Error"
DEAD_SIZE = "Shoal-Dead-Size"  # the original payload's size when the copy had to be cut


@dataclass(frozen=True)
class ConsumerSpec:
    stream: str
    durable: str
    filter_subject: str | None = None
    filter_subjects: tuple[str, ...] = ()  # several filters (instead of filter_subject)
    ack_wait: float = 5.0
    max_attempts: int = 10  # deliveries before a message is a dead letter
    max_ack_pending: int = 1000
    deliver_from_seq: int | None = None  # a new durable starts here instead of at the beginning
    inactive_threshold: float | None = None  # seconds before an unused durable is removed


FETCH_WAIT = 0.5  # seconds a fetch waits for messages; also the longest a stop waits for the loop
LAG_CHECK = 5.0  # seconds between consumer infos that read the lag of an idle consumer


def retry_delay(attempt: int) -> float:
    """Backoff between redeliveries of a failing message: 0.1 s doubling to 10 s."""
    return min(10.0, 0.1 * 2 ** max(0, attempt - 1))


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, ShoalError) else f"{type(exc).__name__}: {exc}"


async def publish_dead(bus: Bus, consumer: str, delivery: Delivery, error: str) -> None:
    """The dead letter: the original payload (cut if it cannot fit beside the added headers) with where
    it came from and why it died. Deduplicated by stream and sequence, so recording it twice is harmless."""
    meta = delivery._msg.metadata
    stream = meta.stream
    headers = {k: v for k, v in delivery.headers.items() if not k.startswith("Nats-")}
    headers.update({
        DEAD_SUBJECT: header_value(delivery.subject, 512),
        DEAD_SEQ: str(delivery.stream_seq),
        DEAD_CONSUMER: consumer,
        DEAD_ATTEMPTS: str(delivery.num_delivered),
        DEAD_ERROR: header_value(error, 1024),
        MSG_ID_HEADER: f"{stream}:{delivery.stream_seq}",
    })
    data = delivery.data
    room = bus.max_payload - message_size(b"", headers) - 1024
    if len(data) > room:
        headers[DEAD_SIZE] = str(len(data))
        data = data[:max(0, room)]
    await bus.js_publish(dead_letter(stream), data, headers=headers)


class Consumer:
    """Fetches from a durable and runs handlers; `stop()` finishes in-flight work first."""

    def __init__(self, bus: Bus, spec: ConsumerSpec, *, batch: int = 32, concurrency: int = 1,
                 on_dead: DeadHandler | None = None) -> None:
        self.bus = bus
        self.spec = spec
        self.batch = batch
        self.concurrency = concurrency
        self.on_dead = on_dead
        self.dead_letters = 0
        self._pull: Pull | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._lag: metrics.Lag | None = None
        self._lag_checked = 0.0
        # Deliveries fetched and not yet settled, with when they were fetched or last said to be in progress.
        self._working: dict[int, tuple[Delivery, float]] = {}
        self._beats: asyncio.Task[None] | None = None

    async def start_single(self, handler: Handler) -> None:
        await self._bind()
        self._beats = asyncio.create_task(self._keep_working(), name=f"progress-{self.spec.durable}")
        self._task = asyncio.create_task(self._supervise(lambda: self._run_single(handler)),
                                         name=f"consume-{self.spec.durable}")
        self.bus.on_close(self.stop)

    async def start_batch(self, handler: BatchHandler) -> None:
        """The handler gets every message of a fetch at once (coalescing) and returns those it failed."""
        await self._bind()
        self._task = asyncio.create_task(self._supervise(lambda: self._run_batch(handler)),
                                         name=f"consume-{self.spec.durable}")
        self.bus.on_close(self.stop)

    async def _supervise(self, run: Callable[[], Awaitable[None]]) -> None:
        """The fetch loop must outlive anything that goes wrong in it (handlers' errors never reach it)."""
        delay = 0.1
        while not self._stopping.is_set():
            try:
                await run()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("consumer %s: its loop crashed; restarting it in %.1fs", self.spec.durable, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _bind(self) -> None:
        if self._lag is None:
            self._lag = metrics.INSTRUMENTS.lag(self.spec.stream, self.spec.durable)
        spec = self.spec
        config = api.ConsumerConfig(
            name=spec.durable,
            durable_name=spec.durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=spec.ack_wait,
            max_deliver=-1,  # counted here (max_attempts), so that the last failure becomes a dead letter
            max_ack_pending=spec.max_ack_pending,
            filter_subject=None if spec.filter_subjects else spec.filter_subject,
            filter_subjects=list(spec.filter_subjects) or None,
            inactive_threshold=spec.inactive_threshold,
        )
        if spec.deliver_from_seq is not None:
            config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = spec.deliver_from_seq
        try:
            # Create, or update an existing durable to this config (an older release may have made it with
            # another ack wait); then read from it.
            await self.bus.js.add_consumer(spec.stream, config=config)
            if self._pull is None:
                self._pull = Pull(self.bus, spec.stream, spec.durable)
            await self._pull.open()
        except Exception as exc:
            raise map_error(exc, f"consumer {spec.stream}/{spec.durable}") from None

    async def _fetch(self) -> list[Msg]:
        assert self._pull is not None
        try:
            msgs = await self._pull.fetch(self.batch, FETCH_WAIT)
            if not msgs:
                await self._check_lag()
                return []
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
            self._stopping.set()
            return []
        except nats.js.errors.ServiceUnavailableError:
            # Nothing answers the fetch: the stream has no leader for a moment, or the consumer is gone
            # (deleted, or its stream made again). Only the server can tell which.
            if await self._vanished():
                log.warning("consumer %s vanished; recreating", self.spec.durable)
                await self._rebind()
            else:
                log.warning("fetch from %s failed: JetStream unavailable", self.spec.durable)
                await asyncio.sleep(0.5)
            return []
        except Exception as exc:  # reconnecting, server restart: back off and try again
            log.warning("fetch from %s failed: %s", self.spec.durable, exc or type(exc).__name__)
            await asyncio.sleep(0.5)
            return []
        if msgs and self._lag is not None:
            self._lag.pending = msgs[-1].metadata.num_pending  # what is left after this batch
        return msgs

    async def _vanished(self) -> bool:
        """Whether the server says the durable does not exist (not merely that it cannot answer now). Asked
        on every unanswered fetch, so it waits no longer than a fetch would."""
        try:
            await self.bus.js.consumer_info(self.spec.stream, self.spec.durable, timeout=FETCH_WAIT)
        except nats.js.errors.NotFoundError:
            return True
        except Exception:  # no leader, or the server away: not known to be gone
            return False
        return False

    async def _check_lag(self) -> None:
        """An idle consumer may still have a lag (messages held back by max_ack_pending or a nak's delay):
        read it from the server now and then."""
        now = asyncio.get_running_loop().time()
        if self._lag is None or now - self._lag_checked < LAG_CHECK:
            return
        self._lag_checked = now
        try:
            info = await self.bus.js.consumer_info(self.spec.stream, self.spec.durable)
        except Exception:  # the fetch loop deals with a consumer that is gone or a server away
            return
        self._lag.pending = info.num_pending or 0

    async def _rebind(self) -> None:
        try:
            await self._bind()
        except ShoalError as exc:
            log.warning("cannot recreate consumer %s: %s", self.spec.durable, exc)
            await asyncio.sleep(1.0)

    async def _run_single(self, handler: Handler) -> None:
        gate = asyncio.Semaphore(self.concurrency)
        running: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            fetched = [Delivery(msg) for msg in await self._fetch()]
            now = loop.time()
            for delivery in fetched:  # from now on in progress, also while waiting for a free handler
                self._working[id(delivery)] = (delivery, now)
            for delivery in fetched:
                await gate.acquire()
                task = asyncio.create_task(self._handle_one(handler, delivery, gate))
                running.add(task)
                task.add_done_callback(running.discard)
        if running:
            await asyncio.gather(*running, return_exceptions=True)

    async def _keep_working(self) -> None:
        """One beat for every message in hand (not a timer each): every ack_wait/6, tell the server that
        those fetched or last beaten at least that long ago are still being handled, so that none goes
        longer than ack_wait/3 without word."""
        tick = max(0.1, self.spec.ack_wait / 6)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            for key, (delivery, since) in list(self._working.items()):
                if now - since < tick or delivery.done:
                    continue
                self._working[key] = (delivery, now)
                try:
                    await delivery.in_progress()
                except Exception:  # connection trouble: the message is redelivered if we die
                    pass

    async def _handle_one(self, handler: Handler, delivery: Delivery, gate: asyncio.Semaphore) -> None:
        try:
            if await self._exhausted(delivery):
                return
            with telemetry.span(f"process {delivery.subject}", kind=telemetry.CONSUMER,
                                headers=delivery.headers, subject=delivery.subject,
                                consumer_group=self.spec.durable, body_size=len(delivery.data)):
                await handler(delivery)
            await delivery.ack()
        except Exception as exc:
            await self._settle_failed(delivery, exc)
        finally:
            self._working.pop(id(delivery), None)
            gate.release()

    async def _run_batch(self, handler: BatchHandler) -> None:
        while not self._stopping.is_set():
            msgs = await self._fetch()
            if not msgs:
                continue
            deliveries = [d for d in (Delivery(m) for m in msgs) if not await self._exhausted(d)]
            if not deliveries:
                continue
            try:
                failures = await self._with_progress(handler(deliveries), deliveries) or {}
            except Exception as exc:
                failures = {d: exc for d in deliveries}
            for d in deliveries:
                if d in failures:
                    await self._settle_failed(d, failures[d])
                    continue
                try:
                    await d.ack()
                except Exception as exc:  # connection lost: the message will be redelivered
                    log.warning("ack failed: %s", exc)

    async def _with_progress(self, work: Awaitable[T], deliveries: Sequence[Delivery]) -> T:
        """Run `work`, telling the server every ack_wait/3 that these deliveries are still being handled."""
        task = asyncio.ensure_future(work)
        beat = max(0.2, self.spec.ack_wait / 3)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=beat)
                if done:
                    return task.result()
                for d in deliveries:
                    if not d.done:
                        try:
                            await d.in_progress()
                        except Exception:  # connection trouble: the message is redelivered if we die
                            pass
        finally:
            if not task.done():
                task.cancel()

    async def _exhausted(self, delivery: Delivery) -> bool:
        """A message handed out more than max_attempts times without an ack crashed or hung its
        handlers: it is not run again."""
        if delivery.num_delivered <= self.spec.max_attempts:
            return False
        await self._dead(delivery, f"handed out {delivery.num_delivered} times and never acknowledged "
                                   "(its handler crashed or hung)")
        return True

    async def _settle_failed(self, delivery: Delivery, exc: Exception) -> None:
        attempt = delivery.num_delivered
        if isinstance(exc, Poison):
            log.error("dead letter %s: %s", delivery.subject, exc)
            await self._dead(delivery, str(exc))
            return
        if attempt >= self.spec.max_attempts:
            log.error("giving up on %s after %d attempts: %s", delivery.subject, attempt, exc)
            await self._dead(delivery, f"failed {attempt} times; last error: {_describe(exc)}")
            return
        if isinstance(exc, ShoalError) and exc.retryable:
            log.info("retrying %s (attempt %d): %s", delivery.subject, attempt, exc)
        else:
            log.exception("handler for %s failed (attempt %d)", delivery.subject, attempt, exc_info=exc)
        try:
            await delivery.nak(delay=retry_delay(attempt))
        except Exception:  # connection lost: the server redelivers after ack_wait anyway
            pass

    async def _dead(self, delivery: Delivery, error: str) -> None:
        """Copy the message to the DEAD stream, answer its sender (on_dead), take it off the queue."""
        try:
            await publish_dead(self.bus, self.spec.durable, delivery, error)
            if self.on_dead is not None:
                await self.on_dead(delivery, error)
        except Exception as exc:  # cannot record it now (NATS away): try again later
            log.warning("cannot record dead letter %s #%d yet: %s", delivery.subject, delivery.stream_seq, exc)
            try:
                await delivery.nak(delay=5.0)
            except Exception:
                pass
            return
        self.dead_letters += 1
        try:
            await delivery.term()
        except Exception:
            pass

    async def stop(self) -> None:
        # Let the loop finish its fetch (at most FETCH_WAIT) and handle what it got: cancelling a fetch
        # could strand messages the server already sent until their ack_wait runs out.
        self._stopping.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=10)
            except asyncio.TimeoutError:
                self._task.cancel()
            except asyncio.CancelledError:
                pass
        if self._beats is not None:
            self._beats.cancel()
            self._beats = None
        if self._pull is not None:
            await self._pull.close()
            self._pull = None
        if self._lag is not None:
            metrics.INSTRUMENTS.release_lag(self.spec.stream, self.spec.durable)
            self._lag = None

"""Durable pull consumers shared by replicas: the way every service takes work off a stream.

A handler receives a `Delivery`. Returning normally acks it; raising a retryable error (or any
unexpected exception) naks it with a growing delay, so the message is redelivered, to this replica or
another, until it succeeds: nothing accepted is lost when a replica dies mid-way, because an unacked
message comes back after `ack_wait`. Handlers must therefore be idempotent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

from .. import telemetry
from ..errors import ShoalError
from ._bus import Bus, Message, map_error

log = logging.getLogger(__name__)


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
BatchHandler = Callable[[Sequence[Delivery]], Awaitable[None]]


@dataclass(frozen=True)
class ConsumerSpec:
    stream: str
    durable: str
    filter_subject: str | None = None
    ack_wait: float = 30.0
    max_deliver: int = -1
    max_ack_pending: int = 1000
    deliver_from_seq: int | None = None  # a new durable starts here instead of at the beginning
    inactive_threshold: float | None = None  # seconds before an unused durable is removed


FETCH_WAIT = 0.5  # seconds a fetch waits for messages; also the longest a stop waits for the loop


def retry_delay(attempt: int) -> float:
    """Backoff between redeliveries of a failing message: 0.1 s doubling to 10 s."""
    return min(10.0, 0.1 * 2 ** max(0, attempt - 1))


class Consumer:
    """Fetches from a durable and runs handlers; `stop()` finishes in-flight work first."""

    def __init__(self, bus: Bus, spec: ConsumerSpec, *, batch: int = 32, concurrency: int = 1) -> None:
        self.bus = bus
        self.spec = spec
        self.batch = batch
        self.concurrency = concurrency
        self._sub = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    async def start_single(self, handler: Handler) -> None:
        await self._bind()
        self._task = asyncio.create_task(self._run_single(handler), name=f"consume-{self.spec.durable}")
        self.bus.on_close(self.stop)

    async def start_batch(self, handler: BatchHandler) -> None:
        """The handler gets every message of a fetch at once (coalescing); each is acked unless it settled it."""
        await self._bind()
        self._task = asyncio.create_task(self._run_batch(handler), name=f"consume-{self.spec.durable}")
        self.bus.on_close(self.stop)

    async def _bind(self) -> None:
        spec = self.spec
        config = api.ConsumerConfig(
            durable_name=spec.durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=spec.ack_wait,
            max_deliver=spec.max_deliver,
            max_ack_pending=spec.max_ack_pending,
            filter_subject=spec.filter_subject,
            inactive_threshold=spec.inactive_threshold,
        )
        if spec.deliver_from_seq is not None:
            config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = spec.deliver_from_seq
        try:
            self._sub = await self.bus.js.pull_subscribe(
                spec.filter_subject or ">", durable=spec.durable, stream=spec.stream, config=config
            )
        except Exception as exc:
            raise map_error(exc, f"consumer {spec.stream}/{spec.durable}") from None

    async def _fetch(self) -> list[Msg]:
        assert self._sub is not None
        try:
            return await self._sub.fetch(self.batch, timeout=FETCH_WAIT)
        except (asyncio.TimeoutError, nats.errors.TimeoutError):
            return []
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
            self._stopping.set()
            return []
        except nats.js.errors.NotFoundError:
            log.warning("consumer %s vanished; recreating", self.spec.durable)
            await self._rebind()
            return []
        except Exception as exc:  # reconnecting, server restart: back off and try again
            log.warning("fetch from %s failed: %s", self.spec.durable, exc or type(exc).__name__)
            await asyncio.sleep(0.5)
            return []

    async def _rebind(self) -> None:
        try:
            await self._bind()
        except ShoalError as exc:
            log.warning("cannot recreate consumer %s: %s", self.spec.durable, exc)
            await asyncio.sleep(1.0)

    async def _run_single(self, handler: Handler) -> None:
        gate = asyncio.Semaphore(self.concurrency)
        running: set[asyncio.Task[None]] = set()
        while not self._stopping.is_set():
            for msg in await self._fetch():
                await gate.acquire()
                task = asyncio.create_task(self._handle_one(handler, Delivery(msg), gate))
                running.add(task)
                task.add_done_callback(running.discard)
        if running:
            await asyncio.gather(*running, return_exceptions=True)

    async def _handle_one(self, handler: Handler, delivery: Delivery, gate: asyncio.Semaphore) -> None:
        try:
            with telemetry.span(f"process {delivery.subject}", kind=telemetry.CONSUMER,
                                headers=delivery.headers, subject=delivery.subject):
                await handler(delivery)
            await delivery.ack()
        except Exception as exc:
            await self._settle_failed(delivery, exc)
        finally:
            gate.release()

    async def _run_batch(self, handler: BatchHandler) -> None:
        while not self._stopping.is_set():
            msgs = await self._fetch()
            if not msgs:
                continue
            deliveries = [Delivery(m) for m in msgs]
            try:
                await handler(deliveries)
            except Exception as exc:
                for d in deliveries:
                    await self._settle_failed(d, exc)
                continue
            for d in deliveries:
                try:
                    await d.ack()
                except Exception as exc:  # connection lost: the message will be redelivered
                    log.warning("ack failed: %s", exc)

    async def _settle_failed(self, delivery: Delivery, exc: Exception) -> None:
        if isinstance(exc, ShoalError) and exc.retryable:
            log.info("retrying %s (attempt %d): %s", delivery.subject, delivery.num_delivered, exc)
        else:
            log.exception("handler for %s failed (attempt %d)", delivery.subject, delivery.num_delivered,
                          exc_info=exc)
        try:
            await delivery.nak(delay=retry_delay(delivery.num_delivered))
        except Exception:  # connection lost: the server redelivers after ack_wait anyway
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
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:
                pass
            self._sub = None

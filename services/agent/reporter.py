"""Reliable, ordered delivery of an agent's reports to the REPORTS stream.

Edge links drop. Reports are queued in memory and published one by one, each awaited until the stream
acknowledges it; while NATS is unreachable the head of the queue is retried with backoff, so reports
arrive in the order they happened once the link is back. Each carries the trace context of the
execution it is about.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from shared import subjects as s
from shared import telemetry
from shared.codec import to_msgpack
from shared.models import HealthReport, StateReport
from shared.transport import Bus

if TYPE_CHECKING:
    from opentelemetry.context import Context

    Queued = tuple[str, bytes, Context]  # subject, payload, the trace context it was sent in

log = logging.getLogger(__name__)

BATCH = 128


class Reporter:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._queue: asyncio.Queue[Queued] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.sent = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="reporter")

    def send(self, report: StateReport | HealthReport) -> None:
        self._queue.put_nowait((s.report(report.node_id), to_msgpack(report), telemetry.capture()))

    async def _run(self) -> None:
        """Publish in batches of up to BATCH at once (one connection keeps them in order on the wire);
        what fails is retried before anything newer. Should a link drop in the middle of a batch, a later
        report may land before an earlier one: the health service only ever moves a state forward."""
        retry: list[Queued] = []
        delay = 0.1
        while True:
            if retry:
                batch = retry
            else:
                batch = [await self._queue.get()]
                while len(batch) < BATCH and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
            results = await asyncio.gather(*(self._publish(item) for item in batch), return_exceptions=True)
            retry = [item for item, result in zip(batch, results) if isinstance(result, BaseException)]
            for _ in range(len(batch) - len(retry)):
                self._queue.task_done()
            self.sent += len(batch) - len(retry)
            if retry:
                error = next(r for r in results if isinstance(r, BaseException))
                log.info("%d reports not delivered yet (%s); retrying in %.1fs", len(retry), error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            else:
                delay = 0.1

    async def _publish(self, item: Queued) -> None:
        subject, data, ctx = item
        with telemetry.attached(ctx):
            await self.bus.js_publish(subject, data)

    def abandon(self) -> asyncio.Task[None] | None:
        """Stop at once and drop what is queued, as a crash would (AgentService.crash); returns the task
        to await."""
        if self._task is not None:
            self._task.cancel()
        return self._task

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait until every queued report is delivered (or the timeout passes), then stop."""
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except asyncio.TimeoutError:
            log.warning("%d reports not delivered at shutdown", self._queue.qsize())
        if self._task is not None:
            self._task.cancel()

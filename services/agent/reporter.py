"""Reliable, ordered delivery of an agent's reports to the REPORTS stream.

Edge links drop. Reports are queued in memory and published one by one, each awaited until the stream
acknowledges it; while NATS is unreachable the head of the queue is retried with backoff, so reports
arrive in the order they happened once the link is back. Each carries the trace context of the
execution it is about.
"""

from __future__ import annotations

import asyncio
import logging

from shared import subjects as s
from shared import telemetry
from shared.codec import to_msgpack
from shared.errors import ShoalError
from shared.models import HealthReport, StateReport
from shared.transport import Bus

log = logging.getLogger(__name__)


class Reporter:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._queue: asyncio.Queue[tuple[str, bytes, object]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.sent = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="reporter")

    def send(self, report: StateReport | HealthReport) -> None:
        self._queue.put_nowait((s.report(report.node_id), to_msgpack(report), telemetry.capture()))

    async def _run(self) -> None:
        while True:
            subject, data, ctx = await self._queue.get()
            delay = 0.1
            while True:
                try:
                    with telemetry.attached(ctx):  # type: ignore[arg-type]
                        await self.bus.js_publish(subject, data)
                    self.sent += 1
                    break
                except ShoalError as exc:
                    log.info("report not delivered yet (%s); retrying in %.1fs", exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
            self._queue.task_done()

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait until every queued report is delivered (or the timeout passes), then stop."""
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except asyncio.TimeoutError:
            log.warning("%d reports not delivered at shutdown", self._queue.qsize())
        if self._task is not None:
            self._task.cancel()

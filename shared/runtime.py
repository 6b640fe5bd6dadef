"""How a shoal process starts, runs and stops: logging, tracing, connection, topology, signals.

Every service is a `Component`: `start()` registers its consumers, endpoints and background loops on
its own bus connection and returns; `stop()` stops them and drains the connection. `run()` does this
for a real process and waits for SIGINT/SIGTERM, so Ctrl-C or a container stop shuts down cleanly
without dropping work (unacked messages are redelivered to another replica).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from . import telemetry, topology
from .settings import Settings
from .transport import Bus

log = logging.getLogger(__name__)


class Component:
    """Base of the four services and the agents."""

    name = "component"
    replica = 0

    def __init__(self, bus: Bus, settings: Settings) -> None:
        self.bus = bus
        self.settings = settings
        self.stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        raise NotImplementedError

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """A background loop that lives until stop(); a crash is logged, not silent."""

        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s: background task %s crashed", self.name, name)

        task = asyncio.create_task(guarded(), name=f"{self.name}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def sleep(self, seconds: float) -> bool:
        """Sleep unless stopping; True if it is time to stop."""
        try:
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        self.stopping.set()
        if self._tasks:
            # Loops that sleep notice `stopping` at once; watches block on the next entry, so they are cancelled.
            _, pending = await asyncio.wait(self._tasks, timeout=0.3)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)
        await self.bus.close()


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


async def connect(settings: Settings, name: str, *, wait: float = 30.0) -> Bus:
    bus = await Bus.connect(settings.nats_url, name=name, wait=wait)
    await topology.ensure(bus)
    return bus


async def start_component(factory: Callable[[Bus, Settings], Component], settings: Settings, name: str) -> Component:
    bus = await connect(settings, name)
    component = factory(bus, settings)
    try:
        await component.start()
    except BaseException:
        await component.stop()
        raise
    return component


def run(factory: Callable[[Bus, Settings], Component], settings: Settings, name: str, *,
        replicas: int = 1) -> int:
    """Run `replicas` copies of a component in this process until SIGINT/SIGTERM. Returns the exit code.

    Each replica has its own connection and shares work with the others exactly as separate processes
    would (queue groups, shared durable consumers); `factory` may look at `Component.replica` (0-based).
    """
    setup_logging(settings.log_level)
    telemetry.setup(name, settings.traces_exporter, settings.traces_file)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        components = []
        try:
            for index in range(replicas):
                components.append(await start_component(lambda bus, s, i=index: _numbered(factory(bus, s), i),
                                                        settings, name if replicas == 1 else f"{name}-{index}"))
            log.info("%s started (%d replica(s), NATS %s)", name, replicas, settings.nats_url)
            await stop.wait()
            log.info("%s stopping", name)
        finally:
            await asyncio.gather(*(c.stop() for c in components), return_exceptions=True)

    try:
        asyncio.run(main())
    finally:
        telemetry.shutdown()
    return 0


def _numbered(component: Component, index: int) -> Component:
    component.replica = index
    return component

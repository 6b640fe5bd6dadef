"""How a shoal process starts, runs and stops: logging, tracing, metrics, connection, topology, signals.

Every service is a `Component`: `start()` registers its consumers, endpoints and background loops on
its own bus connection and returns; `stop()` stops them and drains the connection. `run()` does this
for a real process and waits for SIGINT/SIGTERM, so Ctrl-C or a container stop shuts down cleanly
without dropping work (unacked messages are redelivered to another replica).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from . import metrics, telemetry, topology
from .settings import Settings
from .transport import Bus, map_error

log = logging.getLogger(__name__)


LOOP_BACKOFF_FIRST = 0.1
LOOP_BACKOFF_MAX = 10.0
LOOP_HEALTHY_AFTER = 60.0  # a loop that ran this long before it crashed starts its backoff afresh
MAX_LOOP_CRASHES = 8  # crashes in a row, each soon after a restart, before the process gives up


class Component:
    """Base of the four services and the agents."""

    name = "component"
    replica = 0
    # Services create the streams and buckets they use at start; an edge agent may not (its identity
    # has no access to the JetStream API) and needs none.
    ensures_topology = True

    def __init__(self, bus: Bus, settings: Settings) -> None:
        self.bus = bus
        self.settings = settings
        self.stopping = asyncio.Event()
        # Set when this component cannot go on (a loop that keeps crashing): its process exits non-zero
        # so that a supervisor restarts it, rather than living on half-deaf.
        self.failed = asyncio.Event()
        self.failure = ""
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        raise NotImplementedError

    def spawn(self, loop: Callable[[], Coroutine[Any, Any, Any]] | Coroutine[Any, Any, Any],
              name: str) -> asyncio.Task[Any]:
        """A background loop that lives until stop().

        Given a coroutine function, a crash (or an unexpected return) is logged and the loop is started
        again after a growing delay (0.1 s doubling to 10 s); after MAX_LOOP_CRASHES quick crashes in a
        row the component fails. A bare coroutine cannot be started again: its crash fails the component.
        """

        async def supervised() -> None:
            crashes = 0
            delay = LOOP_BACKOFF_FIRST
            clock = asyncio.get_running_loop()
            while not self.stopping.is_set():
                began = clock.time()
                try:
                    await (loop() if callable(loop) else loop)
                    if self.stopping.is_set():
                        return
                    problem = "ended unexpectedly"
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    problem = f"crashed: {type(exc).__name__}: {exc}"
                    log.exception("%s: background task %s crashed", self.name, name)
                if self.stopping.is_set():
                    return
                if not callable(loop):
                    self.fail(f"background task {name} {problem}")
                    return
                if clock.time() - began >= LOOP_HEALTHY_AFTER:
                    crashes, delay = 0, LOOP_BACKOFF_FIRST
                crashes += 1
                if crashes >= MAX_LOOP_CRASHES:
                    self.fail(f"background task {name} {problem} ({crashes} times in a row)")
                    return
                log.warning("%s: background task %s %s; restarting it in %.1fs", self.name, name, problem, delay)
                if await self.sleep(delay):
                    return
                delay = min(delay * 2, LOOP_BACKOFF_MAX)

        task = asyncio.create_task(supervised(), name=f"{self.name}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def fail(self, reason: str) -> None:
        """This component cannot go on: its process stops and exits non-zero."""
        if not self.failed.is_set():
            log.critical("%s: %s; exiting so that a supervisor restarts it", self.name, reason)
            self.failure = reason
            self.failed.set()

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

    async def wait_failed(self) -> str:
        """Until this component fails or its connection is closed for good; returns why."""
        failed = asyncio.ensure_future(self.failed.wait())
        lost = asyncio.ensure_future(self.bus.lost.wait())
        try:
            await asyncio.wait({failed, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            failed.cancel()
            lost.cancel()
        return self.failure or f"NATS connection closed: {self.bus.lost_reason}"


def setup_logging(level: str, fmt: str = "text", service: str = "") -> None:
    """Log to stderr: plain text lines, or (`fmt="json"`) one JSON object per line carrying the service
    and, inside a span, its trace and span ids."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(telemetry.JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])


async def connect(settings: Settings, name: str, *, wait: float | None = 30.0) -> Bus:
    bus = await Bus.connect(settings.nats_url, name=name, wait=wait, credentials=settings.credentials())
    await topology.ensure(bus, replicas=settings.js_replicas)
    return bus


async def start_component(factory: Callable[[Bus, Settings], Component], settings: Settings, name: str, *,
                          patient: bool = False) -> Component:
    """Connect, create the topology and start the component.

    A patient start (a real process) waits for NATS for ever and retries everything that failed for a
    reason that may pass (timeouts, a server restarting) with a growing delay, logging each failure;
    otherwise (tests, tools) the first failure is raised.
    """
    delay = 0.5
    while True:
        bus = await Bus.connect(settings.nats_url, name=name, wait=None if patient else 30.0,
                                credentials=settings.credentials())
        component: Component | None = None
        try:
            component = factory(bus, settings)
            if component.ensures_topology:
                await topology.ensure(bus, replicas=settings.js_replicas)
            await component.start()
            return component
        except BaseException as exc:
            await (component.stop() if component is not None else bus.close())
            error = map_error(exc, f"start {name}") if isinstance(exc, Exception) else None
            if not patient or error is None or not error.retryable:
                raise
            log.warning("%s: could not start (%s); retrying in %.1fs", name, error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


def write_ready_file(path: str, components: list[Component]) -> None:
    """`{"service": ..., "ids": [...]}`: the Services API instances this process serves, for a readiness
    probe (`shoal ping --ready-file PATH` asks exactly these instances, not any replica)."""
    instances = [pair for c in components for pair in c.bus.services]
    body = {"service": instances[0][0] if instances else "", "ids": [i for _, i in instances]}
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(body, fh)
    os.replace(tmp, path)


def run(factory: Callable[[Bus, Settings], Component], settings: Settings, name: str, *,
        replicas: int = 1, ready_file: str = "") -> int:
    """Run `replicas` copies of a component in this process until SIGINT/SIGTERM. Returns the exit code:
    0 after a signal, 1 when a component failed or lost its connection for good (a process is either
    serving or gone, so that a supervisor can restart it).

    Each replica has its own connection and shares work with the others exactly as separate processes
    would (queue groups, shared durable consumers); `factory` may look at `Component.replica` (0-based).
    """
    setup_logging(settings.log_level, settings.log_format, name)
    telemetry.setup(name, settings.traces_exporter, settings.traces_file)
    metrics.setup(name, settings.metrics_port, settings.metrics_host)

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        components: list[Component] = []

        async def start_all() -> None:
            for index in range(replicas):
                components.append(await start_component(
                    lambda bus, s, i=index: _numbered(factory(bus, s), i), settings,
                    name if replicas == 1 else f"{name}-{index}", patient=True))

        waits: list[asyncio.Future[Any]] = []
        try:
            starting = asyncio.ensure_future(start_all())
            stopped = asyncio.ensure_future(stop.wait())
            waits += [starting, stopped]
            await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                return 0
            starting.result()
            log.info("%s started (%d replica(s), NATS %s)", name, replicas, settings.nats_url)
            if ready_file:
                write_ready_file(ready_file, components)
            failures = [asyncio.ensure_future(c.wait_failed()) for c in components]
            waits += failures
            done, _ = await asyncio.wait({stopped, *failures}, return_when=asyncio.FIRST_COMPLETED)
            if stopped in done:
                log.info("%s stopping", name)
                return 0
            reason = next(f.result() for f in failures if f in done)
            log.critical("%s: %s; exiting with status 1", name, reason)
            return 1
        finally:
            if ready_file:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(ready_file)
            for waiter in waits:
                waiter.cancel()
            await asyncio.gather(*(asyncio.wait_for(c.stop(), 15) for c in components), return_exceptions=True)

    try:
        return asyncio.run(main())
    finally:
        telemetry.shutdown()
        metrics.shutdown()


def _numbered(component: Component, index: int) -> Component:
    component.replica = index
    return component

"""Leader leases: one replica at a time runs a periodic sweep (node timeouts, deadlines, timers).

The lease is a key in a bucket whose entries expire after a TTL. The holder renews it with
compare-and-set; if the holder dies, the key expires and another replica takes it. Every action a
leader takes is itself a compare-and-set on the records it touches, so a brief overlap of two leaders
(a paused process waking up) cannot corrupt anything: the lease only avoids wasted work.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from . import subjects as s
from .errors import Conflict, ShoalError
from .transport import Bus, Kv

log = logging.getLogger(__name__)


class Lease:
    def __init__(self, bus: Bus, name: str, *, renew_every: float = 2.0) -> None:
        self.kv = Kv(bus, s.BUCKET_LEASES)
        self.name = name
        self.holder = uuid.uuid4().hex
        self.renew_every = renew_every
        self._revision: int | None = None

    @property
    def held(self) -> bool:
        return self._revision is not None

    async def tick(self) -> bool:
        """Acquire or renew; True while this replica is the leader."""
        try:
            if self._revision is not None:
                self._revision = await self.kv.update(self.name, self.holder.encode(), last=self._revision)
            else:
                self._revision = await self.kv.create(self.name, self.holder.encode())
                log.info("took lease %s", self.name)
        except Conflict:
            if self._revision is not None:
                log.info("lost lease %s", self.name)
            self._revision = None
        except ShoalError as exc:
            log.warning("lease %s: %s", self.name, exc)
            self._revision = None
        return self._revision is not None

    async def release(self) -> None:
        if self._revision is not None:
            try:
                await self.kv.delete(self.name, last=self._revision)
            except ShoalError:
                pass
            self._revision = None


async def run_as_leader(lease: Lease, interval: float, work, stop: asyncio.Event) -> None:
    """Call `work()` every `interval` seconds while holding `lease`, until `stop` is set."""
    last_renew = 0.0
    loop = asyncio.get_running_loop()
    try:
        while not stop.is_set():
            now = loop.time()
            if now - last_renew >= lease.renew_every or not lease.held:
                await lease.tick()
                last_renew = now
            if lease.held:
                try:
                    await work()
                except Exception:
                    log.exception("leader work for %s failed", lease.name)
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval)
            except asyncio.TimeoutError:
                pass
    finally:
        await lease.release()

"""Which partitions of the jobs this rollout replica owns.

Every event of a job carries its partition (computed by the server from the job's key), and exactly one
replica at a time owns each partition: it alone reads that partition's events, keeps its jobs' state
in memory and reconciles them, so a job's reconciles are serialized and see every change of the job.

Ownership is a lease per partition in the leases bucket (`rollout.partition.<k>`, expiring after the
bucket's TTL unless renewed), and membership a lease per replica (`rollout.member.<id>`). Each round a
replica renews what it holds, counts the members, and takes free partitions up to its fair share
(`ceil(partitions / members)`) or hands back what is over it, so partitions spread over the replicas
and move to the survivors when one dies (within the lease TTL).
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Awaitable, Callable

from shared import subjects as s
from shared.errors import Conflict, ShoalError
from shared.transport import Bus, Kv

log = logging.getLogger(__name__)

RENEW_EVERY = 2.0  # seconds; the leases bucket's TTL (10 s) is the longest a dead owner holds a partition


def plan_ownership(held: set[int], free: set[int], members: int, total: int) -> tuple[list[int], list[int]]:
    """(partitions to take, partitions to hand back) for a replica holding `held` when `free` are held by
    nobody and `members` replicas are alive: each aims at its fair share, ceil(total / members)."""
    share = math.ceil(total / max(1, members))
    if len(held) > share:
        return [], sorted(held)[share:]
    want = share - len(held)
    return sorted(free)[:want], []


class Ownership:
    """Takes, renews and hands back partition leases; calls `gained(k)` and `lost(k)` as ownership moves."""

    def __init__(self, bus: Bus, gained: Callable[[int], Awaitable[None]], lost: Callable[[int], Awaitable[None]],
                 *, total: int = s.PARTITIONS) -> None:
        self.kv = Kv(bus, s.BUCKET_LEASES)
        self.gained = gained
        self.lost = lost
        self.total = total
        self.replica = uuid.uuid4().hex[:12]
        self.held: dict[int, int] = {}  # partition -> revision of our lease

    def _partition_key(self, k: int) -> str:
        return f"{s.ROLLOUT_LEASE_PREFIX}.partition.{k}"

    async def run(self, stopping: asyncio.Event) -> None:
        try:
            while not stopping.is_set():
                try:
                    await self.round()
                except ShoalError as exc:  # NATS away for a moment: leases we cannot renew lapse on their own
                    log.info("partition leases: %s", exc)
                try:
                    await asyncio.wait_for(stopping.wait(), RENEW_EVERY)
                except asyncio.TimeoutError:
                    pass
        finally:
            await self.release_all()

    async def round(self) -> None:
        await self.kv.put(f"{s.ROLLOUT_LEASE_PREFIX}.member.{self.replica}", b"")
        for k, revision in list(self.held.items()):
            try:
                self.held[k] = await self.kv.update(self._partition_key(k), self.replica.encode(), last=revision)
            except Conflict:
                log.info("lost partition %d", k)
                del self.held[k]
                await self.lost(k)
        members = len(await self.kv.scan(f"{s.ROLLOUT_LEASE_PREFIX}.member.*"))
        taken = {int(e.key.rsplit(".", 1)[-1]) for e in await self.kv.scan(f"{s.ROLLOUT_LEASE_PREFIX}.partition.*")}
        free = set(range(self.total)) - taken
        take, release = plan_ownership(set(self.held), free, members, self.total)
        for k in release:
            await self._release(k)
        for k in take:
            try:
                self.held[k] = await self.kv.create(self._partition_key(k), self.replica.encode())
            except Conflict:
                continue  # another replica was quicker
            log.info("took partition %d", k)
            await self.gained(k)

    async def _release(self, k: int) -> None:
        revision = self.held.pop(k, None)
        if revision is None:
            return
        await self.lost(k)
        try:
            await self.kv.delete(self._partition_key(k), last=revision)
        except ShoalError:
            pass  # it lapses on its own

    async def release_all(self) -> None:
        for k in list(self.held):
            await self._release(k)
        try:
            await self.kv.delete(f"{s.ROLLOUT_LEASE_PREFIX}.member.{self.replica}")
        except ShoalError:
            pass

"""Moving a job's history out of the executions bucket, in the background of its reconciles.

What a partition owner prunes from its memory of a job (`JobState.prune`: executions that ended, are
no longer meant to run and belong to an earlier deployment) is also moved to the archive bucket, so
that what a job's load, an agent's assignment read or any scan of the bucket reads follows the job's
present, not how many times it was updated. The query view keeps listing archived executions.

A move that fails (the store unavailable, the record changed) leaves the execution where it was: the
next load of the job prunes it again, and moves it then. Nothing is retried in a loop.
"""

from __future__ import annotations

import asyncio
import logging

from shared.models import Execution
from shared.store import Store

from .apply import gather_bounded
from .decide import archivable
from .model import Rollout

log = logging.getLogger(__name__)

IN_FLIGHT = 64  # moves at once (each is three round trips)


class Archiver:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.moved = 0  # executions moved by this replica
        self._tasks: set[asyncio.Task[None]] = set()

    def add(self, rollout: Rollout, executions: list[Execution]) -> None:
        """Move `executions` (history as of `rollout`) to the archive, in the background."""
        task = asyncio.get_running_loop().create_task(self._move(rollout, executions))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _move(self, rollout: Rollout, executions: list[Execution]) -> None:
        results = await gather_bounded(
            (self._one(e.key, rollout) for e in executions), limit=IN_FLIGHT)
        moved = sum(1 for r in results if r is True)
        self.moved += moved
        if moved:
            log.info("moved %d executions of %s/%s to the archive", moved, rollout.namespace, rollout.job_id)
        failed = [r for r in results if isinstance(r, Exception)]
        if failed:
            log.info("%d of %d executions of %s/%s not archived (the next load of the job moves them): %s",
                     len(failed), len(executions), rollout.namespace, rollout.job_id, failed[0])

    async def _one(self, key: str, rollout: Rollout) -> bool | Exception:
        try:
            return await self.store.archive_execution(key, lambda current: not archivable(current, rollout))
        except Exception as exc:  # one failed move leaves that execution live; the others go on
            return exc

    async def drain(self) -> None:
        """Wait for the moves under way (a clean stop)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

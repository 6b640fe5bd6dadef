"""What a simulated fleet runs, kept on disk so that a restarted fleet resumes it.

A real node finds its runs again in their run dirs (runstate.py). A simulated fleet has no processes to
find, and can have 10,000 nodes, so it keeps one small file for the whole fleet, `<work dir>/fleet.json`
(`FleetState`): which execution each node runs and since when. Starting a run only changes a dict in
memory; the file is rewritten atomically (and off the event loop) at most every `FLUSH_INTERVAL`, when
something changed. A crash therefore forgets at most the last interval's starts: those executions are
reported failed with reason `agent-restart`, as they all were before the fleet kept any state.

A record stays until the execution's record in the cluster shows it ended (its final report arrived),
so a run whose end was still being reported when the agent died is resumed and ends again, the same way.
Records of executions the cluster no longer has are dropped once the fleet has seen its whole
assignment, so the file does not grow without bound.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from pathlib import Path

import msgspec

from shared.models import Execution

from .runstate import Timestamp, read_struct, write_atomic

log = logging.getLogger(__name__)

FLEET_FILE = "fleet.json"
FLUSH_INTERVAL = 1.0


class SimulatedRunRecord(msgspec.Struct, kw_only=True):
    execution_id: str
    node_id: str
    job_id: str
    job_version: int
    started_at: Timestamp


class FleetState(msgspec.Struct, kw_only=True):
    runs: list[SimulatedRunRecord] = []


_encoder = msgspec.json.Encoder()


class FleetJournal:
    def __init__(self, work_dir: Path, flush_interval: float = FLUSH_INTERVAL) -> None:
        self.path = work_dir / FLEET_FILE
        self.flush_interval = flush_interval
        self.runs: dict[str, SimulatedRunRecord] = {}
        self._dirty = False
        self._lock = asyncio.Lock()
        self._seen: set[str] | None = set()  # records claimed by the assignment, until it is all seen

    def load(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = read_struct(self.path, FleetState)
        self.runs = {r.execution_id: r for r in state.runs} if state is not None else {}
        if self.runs:
            log.info("%d simulated run(s) on record from before this agent started", len(self.runs))

    # -- changes (memory only; the flush loop writes them) ------------------------------------------

    def started(self, execution: Execution, started_at: dt.datetime) -> None:
        self.runs[execution.id] = SimulatedRunRecord(execution_id=execution.id, node_id=execution.node_id,
                                                     job_id=execution.job_id, job_version=execution.job_version,
                                                     started_at=started_at)
        self._dirty = True

    def forget(self, execution_id: str) -> None:
        if self.runs.pop(execution_id, None) is not None:
            self._dirty = True

    def get(self, execution_id: str) -> SimulatedRunRecord | None:
        record = self.runs.get(execution_id)
        if record is not None and self._seen is not None:
            self._seen.add(execution_id)
        return record

    def assignment_seen(self) -> None:
        """Every current execution has been seen once: records none of them claimed are stale."""
        seen, self._seen = self._seen, None
        if seen is None:
            return
        stale = [eid for eid in self.runs if eid not in seen]
        for eid in stale:
            del self.runs[eid]
        if stale:
            self._dirty = True
            log.info("dropped %d simulated run record(s) of executions that no longer exist", len(stale))

    # -- the file ----------------------------------------------------------------------------------

    def _snapshot(self) -> bytes:
        self._dirty = False
        return _encoder.encode(FleetState(runs=list(self.runs.values())))

    async def run(self, stopping: asyncio.Event) -> None:
        """Write the file whenever it changed, at most once per interval, until `stopping`."""
        while not stopping.is_set():
            try:
                await asyncio.wait_for(stopping.wait(), self.flush_interval)
            except asyncio.TimeoutError:
                pass
            if self._dirty:
                await self.flush()

    async def flush(self) -> None:
        async with self._lock:  # one write at a time, so an older snapshot never lands after a newer one
            data = self._snapshot()
            try:
                # A simulated fleet does not outlive its machine: no fsync, just atomic replacement.
                await asyncio.to_thread(write_atomic, self.path, data, durable=False)
            except OSError as exc:
                self._dirty = True
                log.warning("could not write %s: %s", self.path, exc)

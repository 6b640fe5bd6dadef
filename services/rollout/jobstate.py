"""What the owner of a partition keeps in memory of each of its jobs: the job's executions.

Loaded once from the executions bucket when the job first needs a decision, then kept current by the
partition's execution events and by the owner's own writes (as soon as they are made, so that the next
pass sees them). A record is replaced only by a newer revision, so a late or redelivered event changes
nothing. It is a cache: a replica that takes over a partition loads each job again, and a restart
loses nothing. This is what makes a reconcile pass cost what changed, not a scan of the bucket.

Executions are kept without their copy of the job spec (the state holds one spec per version), so a
job on 100,000 nodes keeps one spec, not 100,000.
"""

from __future__ import annotations

from shared.models import Execution, JobSpec
from shared.store import Store

from .decide import archivable
from .model import Rollout


class JobState:
    __slots__ = ("namespace", "job_id", "executions", "specs", "loaded")

    def __init__(self, namespace: str, job_id: str) -> None:
        self.namespace = namespace
        self.job_id = job_id
        self.executions: dict[str, Execution] = {}
        self.specs: dict[int, JobSpec] = {}
        self.loaded = False

    def offer(self, execution: Execution) -> None:
        """Keep `execution` unless a newer revision of it is already here."""
        held = self.executions.get(execution.id)
        if held is not None and held.status.revision >= execution.status.revision:
            return
        if execution.job_spec is not None:
            self.specs.setdefault(execution.job_version, execution.job_spec)
            execution.job_spec = None
        self.executions[execution.id] = execution

    def prune(self, rollout: Rollout) -> list[Execution]:
        """Drop the history that may be archived (`decide.archivable`: no decision reads it), so memory and
        passes follow the job's present, not its history; returns it, for the archive."""
        gone = [e for e in self.executions.values() if archivable(e, rollout)]
        for execution in gone:
            del self.executions[execution.id]
        return gone

    def forget(self, execution_id: str) -> None:
        self.executions.pop(execution_id, None)

    async def load(self, store: Store) -> None:
        for record in await store.executions_of_job(self.namespace, self.job_id):
            self.offer(record.value)
        self.loaded = True

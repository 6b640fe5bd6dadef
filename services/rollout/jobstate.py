"""What the owner of a partition keeps in memory of each of its jobs: the job's executions.

Loaded once from the executions bucket when the job first needs a decision, then kept current by the
partition's execution events and by the owner's own writes (as soon as they are made, so that the next
pass sees them). A record is replaced only by a newer revision, so a late or redelivered event changes
nothing. It is a cache: a replica that takes over a partition loads each job again, and a restart
loses nothing. This is what makes a reconcile pass cost what changed, not a scan of the bucket.

Executions are kept without their copy of the job spec (the state holds one spec per version), so a
job on 100,000 nodes keeps one spec, not 100,000.

Beside them it keeps the job's `NodeIndex` under its rollout record (`nodes`): each execution that arrives
refreshes its node there, so a pass of `decide` reads what changed and the counts, not every execution.
Pruning, too, looks only at the executions that arrived since the last prune, unless the record changed
what may be archived.

It keeps the job's rollout record as last read (`record`) until a rollout event of the job arrives or a
pass writes the record (either may have changed it): a pass that follows execution events reads the
record, whose target list grows with the job, only when it may have changed.
"""

from __future__ import annotations

from shared.models import Execution, JobSpec
from shared.store import Record, Store

from .decide import archivable
from .model import IN_PROGRESS, Rollout
from .nodes import NodeIndex


class JobState:
    __slots__ = ("namespace", "job_id", "executions", "specs", "loaded", "index", "recent", "pruned_under", "record")

    def __init__(self, namespace: str, job_id: str) -> None:
        self.namespace = namespace
        self.job_id = job_id
        self.executions: dict[str, Execution] = {}
        self.specs: dict[int, JobSpec] = {}
        self.loaded = False
        self.index: NodeIndex | None = None
        self.recent: set[str] = set()  # executions that arrived since the last prune
        self.pruned_under: tuple[object, ...] = ()  # what of the record the last full prune was made under
        self.record: Record[Rollout] | None = None  # the rollout record as last read (None: read it again)

    def offer(self, execution: Execution) -> None:
        """Keep `execution` unless a newer revision of it is already here."""
        held = self.executions.get(execution.id)
        if held is not None and held.status.revision >= execution.status.revision:
            return
        if execution.job_spec is not None:
            self.specs.setdefault(execution.job_version, execution.job_spec)
            execution.job_spec = None
        self.executions[execution.id] = execution
        self.recent.add(execution.id)
        if self.index is not None:
            self.index.put(execution)

    def nodes(self, rollout: Rollout, spec: JobSpec) -> NodeIndex:
        """The index under `rollout`: the one kept, moved on to this record, or built again if the record
        changed more than its waves, targets and failed nodes (`NodeIndex.follow`)."""
        if self.index is None or not self.index.follow(rollout):
            self.index = NodeIndex(rollout, spec, self.specs, self.executions.values())
        return self.index

    def prune(self, rollout: Rollout | None) -> list[Execution]:
        """Drop the history that may be archived (`decide.archivable`: no decision reads it), so memory and
        passes follow the job's present, not its history; returns it, for the archive. What may be archived
        depends on the record's deployment, state and rollback: under the same ones as last time, only the
        executions that arrived since are looked at. Without a record, or while the rollout is in progress,
        nothing is archived."""
        recent, self.recent = self.recent, set()
        if rollout is None or rollout.state in IN_PROGRESS:
            self.pruned_under = ()
            return []
        under = (rollout.deployment_id, rollout.state, rollout.rollback_of)
        if under != self.pruned_under:
            self.pruned_under = under
            candidates: list[Execution] = list(self.executions.values())
        else:
            candidates = [self.executions[i] for i in recent if i in self.executions]
        gone = [e for e in candidates if archivable(e, rollout)]
        for execution in gone:
            self.forget(execution.id)
        return gone

    def forget(self, execution_id: str) -> None:
        execution = self.executions.pop(execution_id, None)
        if execution is not None and self.index is not None:
            self.index.remove(execution)

    async def load(self, store: Store) -> None:
        for record in await store.executions_of_job(self.namespace, self.job_id):
            self.offer(record.value)
        self.loaded = True

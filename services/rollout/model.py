"""The rollout record: the desired placement of one job, kept in the rollouts bucket.

It is the only state the rollout controller needs besides the executions themselves: which version
goes where (targets, in rollout order), in which waves, how far the rollout has got, and which nodes
have failed against the budget. Every change is a compare-and-set, so replicas can reconcile the same
job concurrently without double-starting a wave.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from shared.models import Strategy, Timestamp

from .waves import wave_of

RolloutState = Literal["queued", "deploying", "paused", "awaiting_promotion", "succeeded", "failed", "stopped"]
IN_PROGRESS = frozenset({"queued", "deploying", "paused", "awaiting_promotion"})


class Rollout(msgspec.Struct, kw_only=True, omit_defaults=True):
    namespace: str
    job_id: str
    deployment_id: str  # the evaluation that started it; execution ids derive from it
    job_version: int  # version whose spec is placed (the stable one during a rollback)
    source_version: int  # job version this rollout was made for (== job_version unless a rollback)
    strategy: Strategy
    state: RolloutState
    targets: list[str] = []  # node ids in rollout order
    wave_sizes: list[int] = []
    current_wave: int = 0  # waves started so far (1-indexed); 0 for immediate
    failed_nodes: list[str] = []
    rollback_of: int = 0
    cause: str = ""  # on a rollback: why the rolled-back version failed
    timed_out: bool = False  # failed by queue_timeout or total_timeout: the job fails, nothing rolls back
    previous_version: int = 0
    message: str = ""
    created_at: Timestamp
    updated_at: Timestamp
    queued_since: Timestamp | None = None
    finished_at: Timestamp | None = None
    # Bumped when one of the job's timers falls due: the change reaches the owner of the job's partition
    # as an event, which reconciles the job (timers are taken by any replica).
    wakes: int = 0

    @property
    def gated(self) -> bool:
        return self.strategy in ("rolling", "canary")

    def started_count(self) -> int:
        """How many targets, from the first, have their wave started (all of them for immediate rollouts
        and rollbacks)."""
        if not self.gated:
            return len(self.targets)
        return sum(self.wave_sizes[: self.current_wave])

    def wave_number(self, index: int) -> int:
        """The wave of the target at position `index` (0 for immediate rollouts and rollbacks)."""
        return wave_of(index, self.wave_sizes) if self.gated else 0


class Timer(msgspec.Struct, kw_only=True):
    """A wake-up for one job: reconcile it once `due` has passed."""

    namespace: str
    job_id: str
    due: Timestamp
    reason: str

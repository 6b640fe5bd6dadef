"""Request and response bodies of the public API (JSON over NATS request-reply and the submit subject).

Requests forbid unknown fields, so a misspelt filter is a 400 instead of an unfiltered answer. Limits
use `None` for "not given" so that an explicit out-of-range value is an error rather than a default.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from .models import Execution, Job, JobSpec, JobStateType, JobType, Node, ObservedStateType, Selector

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 1000

OrderBy = Literal["created_at", "updated_at"]


class PutJobRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Published as JSON on `shoal.submit.<namespace>`; the `Nats-Msg-Id` header is the submission id."""

    spec: JobSpec
    dry_run: bool = False  # validate without applying
    force: bool = False  # apply even if the spec is unchanged


class ListJobExecutionsRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    job: str = ""  # id or name; empty lists every job of the namespace
    limit: int | None = None
    next_token: str = ""
    order_by: OrderBy = "created_at"
    reverse: bool = False
    job_version: int | None = None  # default: the job's latest version
    all_job_versions: bool = False
    node_id: str = ""
    state: ObservedStateType | None = None


class ListJobExecutionsResponse(msgspec.Struct, omit_defaults=True):
    items: list[Execution]
    next_token: str = ""


class GetExecutionRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    id: str


class GetExecutionResponse(msgspec.Struct):
    execution: Execution


class GetJobRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    job: str  # id or name


class GetJobResponse(msgspec.Struct):
    job: Job


JobsOrderBy = Literal["created_at", "modified_at", "name"]


class ListJobsRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    limit: int | None = None
    next_token: str = ""
    order_by: JobsOrderBy = "created_at"
    reverse: bool = False
    state: JobStateType | None = None
    type: JobType | None = None


class ListJobsResponse(msgspec.Struct, omit_defaults=True):
    items: list[Job]
    next_token: str = ""


class StopJobRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    job: str  # id or name
    reason: str = ""


class StopJobResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    job_id: str
    job_version: int
    eval_id: str = ""
    already_stopped: bool = False


class ListNodesRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    selector: Selector | None = None
    state: Literal["ready", "disconnected"] | None = None
    limit: int | None = None
    next_token: str = ""


class ListNodesResponse(msgspec.Struct, omit_defaults=True):
    items: list[Node]
    next_token: str = ""


class RegisterNodeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    node_id: str
    labels: dict[str, str] = {}
    hostname: str = ""
    agent_version: str = ""
    simulated: bool = False


class RegisterNodeResponse(msgspec.Struct, kw_only=True):
    node: Node
    heartbeat_interval: float


class GetSubmissionRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    submission_id: str


class RolloutRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of rollouts.status|promote|pause|resume|abort."""

    job: str  # id or name
    reason: str = ""


class WaveStatus(msgspec.Struct, kw_only=True):
    wave: int
    nodes: int
    started: bool
    states: dict[str, int]  # observed state -> executions of the rolled-out version


class RolloutStatus(msgspec.Struct, kw_only=True, omit_defaults=True):
    job_id: str
    job_name: str
    job_version: int  # the version being rolled out (the stable one during a rollback)
    job_state: str
    strategy: str
    state: str  # queued | deploying | paused | awaiting_promotion | succeeded | failed | stopped
    current_wave: int
    total_waves: int
    target_nodes: int
    waves: list[WaveStatus] = []
    failed_nodes: list[str] = []
    max_failed_nodes: int = 0  # the budget: the rollout fails when failed nodes exceed it
    max_failed_nodes_percent: float = 0.0
    rollback_of: int = 0  # set on a rollback: the version that failed
    previous_version: int = 0
    message: str = ""
    started_at: str = ""
    finished_at: str = ""

"""The public contract: the job spec and the execution, exactly as the published schema defines them.

Field names are the schema's snake_case JSON keys; enums and defaults are the schema's. Structs that a
user writes (the job spec) forbid unknown fields, so a typo like `max_paralel` is an error rather than a
silent default. Records that only services write (executions, jobs, nodes) accept unknown fields, so
replicas of different versions can share a bus during an upgrade.

Optional execution fields are omitted when empty, as in the schema's example, which therefore decodes
and re-encodes to the same keys.
"""

from __future__ import annotations

import datetime as _dt
from typing import Annotated, Any, Literal, cast, get_args

import msgspec

from .durations import SECOND, Duration
from .errors import ErrorBody

Timestamp = Annotated[_dt.datetime, msgspec.Meta(tz=True)]
Percent = Annotated[float, msgspec.Meta(ge=0, le=100)]
Fraction = Annotated[float, msgspec.Meta(ge=0, le=1)]

# Every number a user can write has a range, so that nothing downstream (a date, a SQLite column, an
# int64 on the wire) overflows. The ranges are far beyond any sensible use.
MAX_COUNT = 1_000_000  # nodes, thresholds, canaries
MAX_TIMEOUT_SECONDS = 366 * 86_400  # a year
MAX_VERSION = 2**31 - 1
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]
AtLeastOne = Annotated[int, msgspec.Meta(ge=1, le=MAX_COUNT)]
Seconds = Annotated[int, msgspec.Meta(ge=0, le=MAX_TIMEOUT_SECONDS)]
Priority = Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31 - 1)]
Version = Annotated[int, msgspec.Meta(ge=1, le=MAX_VERSION)]
Name = Annotated[str, msgspec.Meta(max_length=128)]
Text = Annotated[str, msgspec.Meta(max_length=4096)]
LabelMap = Annotated[dict[str, str], msgspec.Meta(max_length=64)]

JobType = Literal["pipeline", "query", "update", "config"]
# Long-running job types that also go to nodes that join later (a daemon in Bacalhau's words).
DAEMON_JOB_TYPES = frozenset({"pipeline", "config"})
# Job types whose executions run to completion (a config push completes once its files are written).
ONE_SHOT_JOB_TYPES = frozenset({"query", "update", "config"})

RestartPolicy = Literal["on-failure", "always", "never"]
Strategy = Literal["immediate", "rolling", "canary"]

DesiredStateType = Literal["pending", "running", "stopped"]
ObservedStateType = Literal[
    "pending", "starting", "validating", "running", "degraded", "completed", "failed", "lost", "stopping", "stopped"
]
TERMINAL_STATES = frozenset({"completed", "failed", "stopped"})

JobStateType = Literal[
    "pending",
    "queued",
    "deploying",
    "running",
    "degraded",
    "rollout_paused",
    "rollout_failed",
    "completed",
    "failed",
    "stopped",
]
# A job in one of these has finished; submitting it again runs it again, even with the same spec.
ENDED_JOB_STATES = frozenset({"stopped", "completed", "failed"})
NodeStateType = Literal["ready", "disconnected"]

DEFAULT_NAMESPACE = "default"
DEFAULT_MAX_ERROR_RATE = 0.10
RESERVED_META_PREFIXES: tuple[str, ...] = ("shoal.io/",)


# --------------------------------------------------------------------------------------------------
# Job spec
# --------------------------------------------------------------------------------------------------


class Selector(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Which nodes run the job: all of match_labels AND every match_expressions string AND match_ids."""

    match_labels: LabelMap = {}
    match_expressions: Annotated[list[Text], msgspec.Meta(max_length=64)] = []
    match_ids: Annotated[list[Annotated[str, msgspec.Meta(max_length=64)]], msgspec.Meta(max_length=10_000)] = []


class HealthCheck(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Health gate of rolling and canary rollouts; error rate is per interval, not lifetime."""

    deadline: Duration
    failure_threshold: AtLeastOne = 3
    interval: Duration = Duration(10 * SECOND)
    # None means "use the default" (0.10); an explicit 0.0 means any error is unhealthy.
    max_error_rate: Fraction | None = None
    success_threshold: AtLeastOne = 2

    @property
    def error_rate_limit(self) -> float:
        return DEFAULT_MAX_ERROR_RATE if self.max_error_rate is None else self.max_error_rate

    def judge(self, total: int, errors: int) -> tuple[str, float | None]:
        """One interval's verdict: "unhealthy" when errors/total exceeds the limit, "no-data" without work."""
        if total <= 0:
            return "no-data", None
        rate = min(1.0, errors / total)
        return ("unhealthy" if rate > self.error_rate_limit else "healthy"), rate


class Canary(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Size of the first (canary) wave: canary_count nodes when given, else canary_percent of the targets."""

    canary_percent: Annotated[float, msgspec.Meta(gt=0, le=100)] | None = None
    canary_count: AtLeastOne | None = None


class RolloutSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    strategy: Strategy = "immediate"
    # Percent of the target nodes per wave; 0 means "not specified" and reads as the default, 10.
    max_parallel: Annotated[int, msgspec.Meta(ge=0, le=100)] = 10
    auto_promote: bool = False
    canary: Canary | None = None
    health_check: HealthCheck | None = None
    max_failed_nodes: Count = 10
    max_failed_nodes_percent: Percent = 10.0
    no_auto_rollback: bool = False


class Timeouts(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Seconds; 0 means no timeout."""

    execution_timeout: Seconds = 0
    queue_timeout: Seconds = 0
    total_timeout: Seconds = 0


class JobSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Name
    type: JobType
    namespace: Annotated[str, msgspec.Meta(max_length=63)] = ""  # filled in from the subject it was submitted on
    description: Text = ""
    labels: LabelMap = {}
    meta: Annotated[dict[Annotated[str, msgspec.Meta(max_length=256)], Text], msgspec.Meta(max_length=64)] = {}
    priority: Priority = 0
    restart_policy: RestartPolicy = "on-failure"
    config: dict[str, Any] = {}
    rollout: RolloutSpec = msgspec.field(default_factory=RolloutSpec)
    selector: Selector = msgspec.field(default_factory=Selector)
    timeouts: Timeouts = msgspec.field(default_factory=Timeouts)


# --------------------------------------------------------------------------------------------------
# Execution
# --------------------------------------------------------------------------------------------------


class DesiredState(msgspec.Struct, kw_only=True):
    # "run" appears in the schema's own example although its enum says "running"; accept it, emit "running".
    state_type: Literal["pending", "running", "stopped", "run"]
    message: str = ""
    details: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET

    def __post_init__(self) -> None:
        if self.state_type == "run":
            self.state_type = "running"


class ObservedState(msgspec.Struct, kw_only=True):
    state_type: ObservedStateType
    message: str = ""
    details: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET


OUTPUT_SUMMARY_CHARS = 256  # characters of an ended execution's output its details keep (the last lines)

# Why an execution ended (status.details.reason): the agent's view of an exit, or the health service's
# verdict. The first group is node trouble (never the version's failure), the second the rollout's signals.
FailureReason = Literal["exit", "timeout", "stopped", "start-error", "agent-error", "agent-restart",
                        "agent-shutdown", "unhealthy", "deadline", "lost"]
FAILURE_REASONS: frozenset[str] = frozenset(get_args(FailureReason))


class ExecutionDetails(msgspec.Struct, kw_only=True, frozen=True):
    """The keys of `status.details` shoal itself writes, typed (the schema leaves details open, so the
    map stays a map on the wire; this is how the code reads it)."""

    reason: FailureReason | None = None
    finished_at: str = ""  # RFC 3339: when it reached a terminal state (restart backoff counts from here)
    lost_from: str = ""  # the observed state it had when its node fell silent
    lost_at: str = ""
    restarts: int = 0  # how many restarts came before it in its chain
    exit_code: int | None = None
    # The last line(s) its command printed, at most OUTPUT_SUMMARY_CHARS: what a failure says in a rollout
    # status. What it printed is job output (SHOAL_OUTPUT, `executions.logs`), not a detail.
    output: str = ""


def details(execution: Execution) -> ExecutionDetails:
    """The typed view of an execution's details; values of the wrong type read as absent."""
    d = execution.status.details
    reason = d.get("reason")
    restarts = d.get("restarts", 0)
    exit_code = d.get("exit_code")
    return ExecutionDetails(
        reason=cast(FailureReason, reason) if isinstance(reason, str) and reason in FAILURE_REASONS else None,
        finished_at=_text(d.get("finished_at")),
        lost_from=_text(d.get("lost_from")),
        lost_at=_text(d.get("lost_at")),
        restarts=restarts if isinstance(restarts, int) and not isinstance(restarts, bool) else 0,
        exit_code=exit_code if isinstance(exit_code, int) and not isinstance(exit_code, bool) else None,
        output=_text(d.get("output"))[-OUTPUT_SUMMARY_CHARS:],
    )


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


class ExecutionStatus(msgspec.Struct, kw_only=True, omit_defaults=True):
    created_at: Timestamp
    desired_state: DesiredState
    observed_state: ObservedState
    revision: int
    updated_at: Timestamp
    details: dict[str, Any] = {}
    next_execution_id: str = ""
    previous_execution_id: str = ""
    stable_at: Timestamp | None = None


class Execution(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    eval_id: str = ""
    job_id: str
    job_type: JobType
    job_version: int
    namespace: str
    node_id: str
    rollout_wave: int = 0
    status: ExecutionStatus
    job_spec: JobSpec | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}.{self.job_id}.{self.node_id}.{self.id}"

    @property
    def desired(self) -> str:
        return self.status.desired_state.state_type

    @property
    def observed(self) -> str:
        return self.status.observed_state.state_type


# --------------------------------------------------------------------------------------------------
# Jobs, versions, evaluations, plans
# --------------------------------------------------------------------------------------------------


class JobState(msgspec.Struct, kw_only=True):
    state_type: JobStateType
    message: str = ""
    details: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET


class Job(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    name: str
    namespace: str
    type: JobType
    version: int
    state: JobState
    spec: JobSpec
    created_at: Timestamp
    modified_at: Timestamp
    revision: int
    # The newest version whose rollout succeeded; the target of an automatic rollback. 0: none yet.
    stable_version: int = 0


class JobVersion(msgspec.Struct, kw_only=True, omit_defaults=True):
    job_id: str
    namespace: str
    name: str
    version: int
    spec: JobSpec
    spec_hash: str
    created_at: Timestamp
    submission_id: str = ""


EvalTrigger = Literal["job-register", "job-update", "job-stop", "node-join", "rollback"]


class Evaluation(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    namespace: str
    job_id: str = ""
    job_version: int = 0
    trigger: EvalTrigger
    node_id: str = ""
    submission_id: str = ""
    created_at: Timestamp


PlanKind = Literal["deploy", "add-nodes", "stop"]


class Plan(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What the scheduler hands to the rollout service: this job version on these nodes."""

    eval_id: str
    namespace: str
    job_id: str
    job_version: int
    kind: PlanKind
    node_ids: list[str] = []
    reason: str = ""
    created_at: Timestamp


# --------------------------------------------------------------------------------------------------
# Nodes and what agents report
# --------------------------------------------------------------------------------------------------


class NodeState(msgspec.Struct, kw_only=True):
    state_type: NodeStateType
    message: str = ""


class Node(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    labels: dict[str, str] = {}
    state: NodeState
    registered_at: Timestamp
    updated_at: Timestamp
    revision: int
    hostname: str = ""
    agent_version: str = ""
    simulated: bool = False


class Heartbeat(msgspec.Struct, kw_only=True, omit_defaults=True):
    node_id: str
    at: Timestamp
    seq: int = 0


FLEET_HEARTBEAT_NODES = 4096  # nodes one fleet heartbeat may name (about 60 KB of ids)


class FleetHeartbeat(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One heartbeat for many nodes of a simulated fleet: one message per interval instead of one per node."""

    fleet: str
    node_ids: Annotated[list[str], msgspec.Meta(max_length=FLEET_HEARTBEAT_NODES)]
    at: Timestamp
    seq: int = 0


class StateReport(msgspec.Struct, kw_only=True, omit_defaults=True, tag="state"):
    """An agent saw an execution change state (started, exited, stopped)."""

    namespace: str
    job_id: str
    node_id: str
    execution_id: str
    state: ObservedStateType
    message: str = ""
    exit_code: int | None = None
    details: dict[str, Any] = {}
    at: Timestamp
    seq: int = 0


class HealthReport(msgspec.Struct, kw_only=True, omit_defaults=True, tag="health"):
    """Work done and errors of one execution during one health interval."""

    namespace: str
    job_id: str
    node_id: str
    execution_id: str
    interval_start: Timestamp
    interval_end: Timestamp
    total: int
    errors: int
    at: Timestamp
    # Consecutive intervals with this one's verdict, this one included, as the agent counted them (0: not
    # counted, an older agent). Reports can be applied out of order and an agent leaves out healthy ones
    # that are not news, so the health service takes the agent's count rather than its own.
    streak: Annotated[int, msgspec.Meta(ge=0, le=1_000_000_000)] = 0


Report = StateReport | HealthReport


class SpecChange(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One difference between the current version's spec and a submitted one, at a dotted path
    (`rollout.max_parallel`, `labels.team`); lists are compared whole (`config.command`)."""

    path: str
    change: Literal["added", "removed", "changed"]
    old: Any = None  # absent when added
    new: Any = None  # absent when removed


class DryRunPlan(msgspec.Struct, kw_only=True):
    """What a submission would do, as a dry run works it out: the nodes the selector matches now (and,
    when none, why), the waves the rollout would use, and what changes against the current version."""

    ready_nodes: int  # ready nodes of the fleet
    matched_nodes: int  # of them, those the selector matches: the targets
    node_ids: list[str] = []  # the first few targets, sorted by id
    matched_disconnected: int = 0  # disconnected nodes the selector matches (not targets)
    no_match: list[str] = []  # when nothing matches: each selector requirement no ready node meets, and why
    strategy: Strategy = "immediate"
    waves: list[int] = []  # node count of each wave, in order
    current_version: int = 0  # 0: a new job
    current_state: JobStateType | Literal[""] = ""  # the job's state now ("" for a new job)
    changes: list[SpecChange] = []  # against the current version's spec (empty for a new job)


class SubmissionOutcome(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The answer to one published PutJobRequest, kept by submission id and published to its waiter."""

    submission_id: str
    namespace: str
    accepted: bool
    dry_run: bool = False
    job_id: str = ""
    job_version: int = 0
    eval_id: str = ""
    warnings: list[str] = []
    error: ErrorBody | None = None
    at: Timestamp
    plan: DryRunPlan | None = None  # a dry run's explanation (absent otherwise)

"""Request and response bodies of the public API (JSON over NATS request-reply and the submit subject).

Requests forbid unknown fields, so a misspelt filter is a 400 instead of an unfiltered answer. Limits
use `None` for "not given" so that an explicit out-of-range value is an error rather than a default.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from .errors import InvalidInput
from .durations import rfc3339
from .models import (
    Execution,
    FailureReason,
    Job,
    JobSpec,
    JobStateType,
    JobType,
    LabelMap,
    Node,
    ObservedStateType,
    Selector,
    Timestamp,
    Version,
    details,
)

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 1000

# Bounds of request fields, checked while decoding (a 400 naming the field).
Ref = Annotated[str, msgspec.Meta(max_length=128)]  # a job, execution or submission id, or a job name
Token = Annotated[str, msgspec.Meta(max_length=4096)]  # a next_token
Reason = Annotated[str, msgspec.Meta(max_length=1024)]
Limit = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]  # range-checked by the service (1..1000)
NodeRef = Annotated[str, msgspec.Meta(max_length=64)]

OrderBy = Literal["created_at", "updated_at"]


def page_limit(limit: int | None, *, default: int = DEFAULT_PAGE_SIZE, most: int = MAX_PAGE_SIZE) -> int:
    """The page size a request asks for: `default` when not given, a 400 outside 1..`most`."""
    if limit is None:
        return default
    if not 1 <= limit <= most:
        raise InvalidInput(f"limit must be between 1 and {most}, got {limit}", field="limit")
    return limit


class PutJobRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Published as JSON on `shoal.submit.<namespace>`; the `Nats-Msg-Id` header is the submission id."""

    spec: JobSpec
    dry_run: bool = False  # validate without applying
    force: bool = False  # apply even if the spec is unchanged


class ListJobExecutionsRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    job: Ref = ""  # id or name; empty lists every job of the namespace
    limit: Limit | None = None
    next_token: Token = ""
    order_by: OrderBy = "created_at"
    reverse: bool = False
    job_version: Version | None = None  # default: the job's latest version
    all_job_versions: bool = False
    node_id: NodeRef = ""
    state: ObservedStateType | None = None


class ListJobExecutionsResponse(msgspec.Struct, omit_defaults=True):
    items: list[Execution]
    next_token: str = ""


class GetExecutionRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    id: Ref


class GetExecutionResponse(msgspec.Struct):
    execution: Execution


# --- job output ------------------------------------------------------------------------------------

OUTPUT_CHUNK_BYTES = 4096  # bytes of output one chunk holds at most
DEFAULT_LOG_CHUNKS = 100
StreamSeq = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]  # a stream sequence


class OutputChunk(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The next piece of what one execution's command wrote (stdout and stderr, as they interleaved),
    published by its agent as msgpack on `shoal.output.<node>.<ns>.<job>.<execution>` (SHOAL_OUTPUT keeps
    the last 64 of each execution). Chunks of one execution are published one after another, so stream
    order is `seq` order; a gap in `seq` is output that was not kept (dropped while NATS was away)."""

    seq: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]  # 1, 2, ... within the execution
    data: Annotated[bytes, msgspec.Meta(max_length=OUTPUT_CHUNK_BYTES)] = b""  # utf-8, possibly cut mid-character
    at: Timestamp  # when the agent read it
    final: bool = False  # the execution ended: nothing follows


class ExecutionLogsRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of `executions.logs`: a job's output, in the order it was stored."""

    job: Ref  # id or name
    node_id: NodeRef = ""  # only this node's executions
    execution_id: Ref = ""  # only this execution (of any version of the job)
    after: StreamSeq | None = None  # the `next` of an earlier reply: continue after it
    limit: Limit | None = None  # chunks (default 100, at most 1000); a reply also stops before max_payload


class LogItem(msgspec.Struct, kw_only=True):
    execution_id: str
    node_id: str
    seq: int  # the chunk's number within its execution
    text: str  # the chunk as utf-8 (invalid bytes replaced)
    at: Timestamp
    final: bool


class ExecutionLogsResponse(msgspec.Struct, kw_only=True):
    items: list[LogItem]
    next: int  # pass as `after` to continue (a follow polls with it)


class GetJobRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    job: Ref  # id or name


class GetJobResponse(msgspec.Struct):
    job: Job


JobsOrderBy = Literal["created_at", "modified_at", "name"]


class ListJobsRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    limit: Limit | None = None
    next_token: Token = ""
    order_by: JobsOrderBy = "created_at"
    reverse: bool = False
    state: JobStateType | None = None
    type: JobType | None = None


class ListJobsResponse(msgspec.Struct, omit_defaults=True):
    items: list[Job]
    next_token: str = ""


class StopJobRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    job: Ref  # id or name
    reason: Reason = ""


class StopJobResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    job_id: str
    job_version: int
    eval_id: str = ""
    already_stopped: bool = False


class ListNodesRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    selector: Selector | None = None
    state: Literal["ready", "disconnected"] | None = None
    limit: Limit | None = None
    next_token: Token = ""


class ListNodesResponse(msgspec.Struct, omit_defaults=True):
    items: list[Node]
    next_token: str = ""


class RegisterNodeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    node_id: NodeRef
    labels: LabelMap = {}
    hostname: Annotated[str, msgspec.Meta(max_length=253)] = ""
    agent_version: Annotated[str, msgspec.Meta(max_length=64)] = ""
    simulated: bool = False
    fleet: Annotated[str, msgspec.Meta(max_length=128)] = ""  # a simulated fleet's nodes read its consumer


class RegisterNodeResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    node: Node
    heartbeat_interval: float
    consumer: str = ""  # of SHOAL_ASSIGNMENTS: where this node's assignments are read (not for a fleet's nodes)


class OpenFleetRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The fleet's node ids, so that its consumer reads only their assignments; none: every node's (a fleet
    too large to name in one request, or an agent from before fleets named their nodes)."""

    nodes: Annotated[list[NodeRef], msgspec.Meta(max_length=100_000)] = []


class OpenFleetResponse(msgspec.Struct, kw_only=True):
    consumer: str  # of SHOAL_ASSIGNMENTS: the assignments of the fleet's nodes
    heartbeat_interval: float


class GetSubmissionRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    submission_id: Ref


class ListDeadLettersRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    limit: Limit | None = None
    next_token: Token = ""


class DeadLetter(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A message given up on: where it came from, why, and the start of what it said."""

    seq: int  # in the dead-letter stream
    stream: str  # the stream it was taken from
    subject: str
    stream_seq: int  # its sequence there
    consumer: str
    attempts: int
    error: str
    at: Timestamp
    size: int  # bytes of the original payload
    preview: str = ""  # its first bytes, as text


class ListDeadLettersResponse(msgspec.Struct, omit_defaults=True):
    items: list[DeadLetter]
    next_token: str = ""


class RolloutRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of rollouts.status|promote|pause|resume|abort."""

    job: Ref  # id or name
    reason: Reason = ""


class WaveStatus(msgspec.Struct, kw_only=True):
    wave: int
    nodes: int
    started: bool
    states: dict[str, int]  # observed state -> executions of the rolled-out version


class NodeFailure(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Why one node failed in a rollout: its failed execution of the version, as the node reported it."""

    node_id: str
    execution_id: str = ""
    state: ObservedStateType | None = None  # failed; stopped for a stalled execution
    message: str = ""  # observed state's message ("exited with code 3", "could not start: ...")
    reason: FailureReason | None = None  # status.details.reason: exit, start-error, unhealthy, deadline, ...
    exit_code: int | None = None
    output: str = ""  # the last line of its output, when it left one
    at: str = ""  # RFC 3339: when it ended (or last changed)


def node_failure(node_id: str, execution: Execution | None) -> NodeFailure:
    """What one failed node's execution said: its message, reason, exit code and last line of output."""
    if execution is None:
        return NodeFailure(node_id=node_id)
    typed = details(execution)
    last = next((line.strip() for line in reversed(typed.output.splitlines()) if line.strip()), "")
    message = execution.status.observed_state.message
    if execution.observed != "failed" and execution.status.desired_state.message.startswith("stalled"):
        message = execution.status.desired_state.message
    return NodeFailure(node_id=node_id, execution_id=execution.id, state=execution.observed, message=message,
                       reason=typed.reason, exit_code=typed.exit_code, output=last[:200],
                       at=typed.finished_at or rfc3339(execution.status.updated_at))


class RollbackStory(msgspec.Struct, kw_only=True, omit_defaults=True):
    """On a rollback, the rollout that failed: which version, why, where, and against which budget (that
    version's own, not the stable version's that the rollback places)."""

    version: int  # the version that failed
    cause: str  # why its rollout failed ("3 of 5 nodes failed, more than the budget ...", "aborted: ...")
    target_nodes: int  # targets of the failed rollout
    failed_nodes: list[str]  # nodes where that version failed, sorted
    failures: list[NodeFailure] = []  # the first few of them, with what their executions said
    max_failed_nodes: int  # the failed version's budget (0 included: any failure was fatal)
    max_failed_nodes_percent: float


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
    failures: list[NodeFailure] = []  # the first few failed nodes of this rollout, with their executions' messages
    rollback: RollbackStory | None = None  # set on a rollback: the failed rollout's story

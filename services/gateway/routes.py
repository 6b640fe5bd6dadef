"""Every route of the gateway, as data: method, path, who may call it, and the NATS call behind it.

One table feeds the router, the token checks and the OpenAPI document, so a route cannot be served
without being documented, or documented with other parameters than it reads. The request struct of a
route is the NATS request body (shared/api.py): its fields come from the path (`path_fields`), and the
others from the query string (GET) or the JSON body (POST), so the HTTP parameters are the NATS API's.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from shared import api, subjects as s
from shared.api import (
    ExecutionLogsRequest,
    ExecutionLogsResponse,
    GetExecutionRequest,
    GetExecutionResponse,
    GetJobRequest,
    GetJobResponse,
    GetSubmissionRequest,
    ListDeadLettersRequest,
    ListDeadLettersResponse,
    ListJobExecutionsRequest,
    ListJobExecutionsResponse,
    ListJobsRequest,
    ListJobsResponse,
    ListNodesRequest,
    ListNodesResponse,
    PutJobRequest,
    RolloutRequest,
    RolloutStatus,
    StopJobRequest,
    StopJobResponse,
)
from shared.models import SubmissionOutcome

Access = Literal["public", "namespace", "admin"]
Source = Literal["none", "query", "body"]

API = "/api/v1"
NS = f"{API}/namespaces/{{ns}}"


class Health(msgspec.Struct):
    """The answer of /healthz while the gateway is connected to NATS."""

    status: Literal["ok"]


class Route(msgspec.Struct, frozen=True, kw_only=True):
    method: str
    path: str  # a template: `{name}` stands for one path segment
    name: str  # the OpenAPI operationId
    summary: str
    handler: str  # the name of a function in handlers.py
    access: Access = "namespace"
    tag: str = "jobs"
    request: Any = None  # the NATS request struct
    path_fields: dict[str, str] = {}  # path parameter -> field of `request`
    source: Source = "none"
    query_lists: dict[str, tuple[Any, str]] = {}  # a repeatable query parameter -> (struct, list field)
    hidden_fields: tuple[str, ...] = ()  # fields of `request` not taken from the query (set otherwise)
    operation: str = ""  # shoal.v1.<ns>.<operation>
    subject: str = ""  # or a cluster-wide subject
    reply: Any = None  # the struct of a 200 reply
    content_type: str = "application/json"
    errors: tuple[int, ...] = (400, 401, 403, 404, 500, 503)
    description: str = ""

    @property
    def segments(self) -> list[str]:
        return self.path.split("/")[1:]

    def params_in_path(self) -> list[str]:
        return [seg[1:-1] for seg in self.segments if seg.startswith("{")]


def _rollout_action(action: str, operation: str, summary: str) -> Route:
    return Route(method="POST", path=f"{NS}/jobs/{{job}}/rollout/{action}", name=f"rollout{action.title()}",
                 summary=summary, handler="forward", tag="rollouts", request=RolloutRequest,
                 path_fields={"job": "job"}, source="body", operation=operation, reply=RolloutStatus,
                 errors=(400, 401, 403, 404, 409, 500, 503))


ROUTES: tuple[Route, ...] = (
    Route(method="GET", path=f"{NS}/jobs/{{job}}/executions", name="listJobExecutions",
          summary="ListJobExecutions: a keyset page of a job's executions", handler="forward",
          request=ListJobExecutionsRequest, path_fields={"job": "job"}, source="query",
          operation=s.EXECUTIONS_LIST, reply=ListJobExecutionsResponse, tag="executions"),
    Route(method="GET", path=f"{NS}/executions/{{id}}", name="getExecution", summary="One execution",
          handler="forward", request=GetExecutionRequest, path_fields={"id": "id"},
          operation=s.EXECUTIONS_GET, reply=GetExecutionResponse, tag="executions"),
    Route(method="PUT", path=f"{NS}/jobs", name="putJob",
          summary="Submit a job spec; answers with the submission's outcome", handler="submit",
          request=PutJobRequest, source="body", reply=SubmissionOutcome,
          errors=(400, 401, 403, 404, 409, 500, 503),
          description="Published on `shoal.submit.<ns>` under a submission id derived from the namespace and the "
                      "`Idempotency-Key` header (a new key when absent): the same key in the same namespace answers "
                      "with the same outcome. The reply's `Submission-Id` header (and the outcome's "
                      "`submission_id`) is what GET .../submissions/{id} takes."),
    Route(method="GET", path=f"{NS}/jobs", name="listJobs", summary="A keyset page of the namespace's jobs",
          handler="forward", request=ListJobsRequest, source="query", operation=s.JOBS_LIST,
          reply=ListJobsResponse),
    Route(method="GET", path=f"{NS}/jobs/{{job}}", name="getJob", summary="One job (by id or name)",
          handler="forward", request=GetJobRequest, path_fields={"job": "job"}, operation=s.JOBS_GET,
          reply=GetJobResponse),
    Route(method="POST", path=f"{NS}/jobs/{{job}}/stop", name="stopJob",
          summary="Stop a job: every execution's desired state becomes stopped", handler="forward",
          request=StopJobRequest, path_fields={"job": "job"}, source="body", operation=s.JOBS_STOP,
          reply=StopJobResponse),
    Route(method="GET", path=f"{NS}/jobs/{{job}}/rollout", name="rolloutStatus",
          summary="Where the job's rollout stands", handler="forward", tag="rollouts", request=RolloutRequest,
          path_fields={"job": "job"}, hidden_fields=("reason",), source="query", operation=s.ROLLOUT_STATUS,
          reply=RolloutStatus),
    _rollout_action("promote", s.ROLLOUT_PROMOTE, "Continue after the canary wave"),
    _rollout_action("pause", s.ROLLOUT_PAUSE, "Start no new waves"),
    _rollout_action("resume", s.ROLLOUT_RESUME, "Continue a paused rollout"),
    _rollout_action("abort", s.ROLLOUT_ABORT, "Stop the rollout and roll back"),
    Route(method="GET", path=f"{NS}/submissions/{{id}}", name="getSubmission",
          summary="The outcome of one submission", handler="forward", request=GetSubmissionRequest,
          path_fields={"id": "submission_id"}, operation=s.SUBMISSIONS_GET, reply=SubmissionOutcome),
    Route(method="GET", path=f"{NS}/jobs/{{job}}/logs", name="jobLogs",
          summary="What the job's commands wrote (job output)", handler="forward", tag="executions",
          request=ExecutionLogsRequest, path_fields={"job": "job"}, source="query", operation=s.EXECUTIONS_LOGS,
          reply=ExecutionLogsResponse,
          description="Chunks of stdout and stderr as stored (the tail of each execution is kept); pass the "
                      "reply's `next` as `after` to continue, or to follow the output as it is written."),
    Route(method="GET", path=f"{NS}/jobs/{{job}}/events", name="jobEvents",
          summary="Server-Sent Events: the job's rollout progress and execution changes", handler="events",
          tag="rollouts", content_type="text/event-stream", errors=(400, 401, 403, 404, 429, 500, 503),
          description="`event: rollout` with a RolloutStatus (first the current one, then on every change), "
                      "`event: execution` with an Execution (its `id:` is the stream sequence; send it back as "
                      "`Last-Event-ID` to resume), and a comment every 15 s."),
    Route(method="GET", path=f"{API}/nodes", name="listNodes", summary="A page of nodes, by selector and state",
          handler="forward", access="admin", tag="nodes", request=ListNodesRequest, source="query",
          query_lists={"selector": (api.Selector, "match_expressions")}, hidden_fields=("selector",),
          subject=s.NODES_LIST, reply=ListNodesResponse),
    Route(method="GET", path=f"{API}/deadletters", name="listDeadLetters",
          summary="Messages given up on after repeated failures, and why", handler="forward", access="admin",
          tag="admin", request=ListDeadLettersRequest, source="query", subject=s.DEAD_LETTERS_LIST,
          reply=ListDeadLettersResponse),
    Route(method="GET", path="/healthz", name="healthz", summary="200 while the gateway is connected to NATS",
          handler="healthz", access="public", tag="gateway", reply=Health, errors=(503,)),
    Route(method="GET", path="/openapi.json", name="openapi", summary="This document (OpenAPI 3.1)",
          handler="openapi", access="public", tag="gateway", errors=()),
    Route(method="GET", path="/metrics", name="metrics", summary="Prometheus metrics of this process",
          handler="metrics", access="admin", tag="gateway", content_type="text/plain",
          errors=(401, 403, 404, 503)),
)

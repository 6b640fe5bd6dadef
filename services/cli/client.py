"""A small client of the public API, used by the CLI, the demo and the end-to-end tests.

Everything goes over NATS: submissions are published on `shoal.submit.<namespace>` (JetStream keeps
them; the `Nats-Msg-Id` header is the submission id) and answered on `shoal.submitted.<ns>.<id>`;
reads are request-reply to the query service; rollout controls to the rollout service.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import yaml

from shared import subjects as s
from shared.api import (
    ExecutionLogsRequest,
    ExecutionLogsResponse,
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
from shared.codec import convert, from_json, to_json
from shared.errors import InvalidInput, NotFound, ShoalError, Unavailable
from shared.models import Job, JobSpec, SubmissionOutcome
from shared.transport import Bus


T = TypeVar("T")


STDIN = "-"  # `shoal job run -` reads the spec from standard input


def load_spec(path: str) -> JobSpec:
    """A job spec from a YAML or JSON file (or standard input, for "-"), validated against the schema's types."""
    file = Path(path)
    shown = "standard input" if path == STDIN else path
    try:
        text = sys.stdin.read() if path == STDIN else file.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}", field="file") from None
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"cannot read {shown}: not UTF-8 text ({exc.reason} at byte {exc.start})",
                           field="file") from None
    is_json = file.suffix == ".json" or (path == STDIN and text.lstrip().startswith("{"))
    try:
        data = json.loads(text) if is_json else yaml.safe_load(text)
    except ValueError as exc:
        raise InvalidInput(f"{shown} is not valid JSON: {exc}", field="file") from None
    except yaml.YAMLError as exc:
        raise InvalidInput(f"{shown} is not valid YAML: {yaml_problem(exc)}", field="file") from None
    if isinstance(data, dict) and "spec" in data and "name" not in data:
        data = data["spec"]  # a PutJobRequest-shaped file
    if not isinstance(data, dict):
        raise InvalidInput(f"{path} must hold a job spec (a mapping)", field="file")
    return convert(data, JobSpec, prefix="spec.")


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error on one line, placed by line and column (PyYAML's own text names no file and spans
    several lines)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        text = exc.problem or exc.context or "malformed"
        context = ""
        if exc.context and exc.problem and exc.context_mark is not None:
            context = f" ({exc.context} at line {exc.context_mark.line + 1}, column {exc.context_mark.column + 1})"
        return f"{where}{text}{context}"
    return " ".join(str(exc).split())


def decode_reply(data: bytes, tp: type[T]) -> T:
    """Decode an API reply: replies may be far larger than requests (a page of 1000 executions)."""
    return from_json(data, tp, max_bytes=None)


class Client:
    def __init__(self, bus: Bus, namespace: str = "default", timeout: float = 10.0) -> None:
        self.bus = bus
        self.namespace = namespace
        self.timeout = timeout

    async def _call(self, operation: str, body: Any, namespace: str | None = None) -> bytes:
        return await self.bus.request(s.api(namespace or self.namespace, operation), to_json(body),
                                      timeout=self.timeout)

    # -- submissions -------------------------------------------------------------------------------

    async def submit(self, spec: JobSpec | dict[str, Any], *, dry_run: bool = False, force: bool = False,
                     submission_id: str | None = None, wait: float = 15.0) -> SubmissionOutcome | str:
        """Publish a PutJobRequest and wait for its outcome; returns the submission id if none came in time."""
        namespace = (spec.namespace if isinstance(spec, JobSpec) else spec.get("namespace")) or self.namespace
        submission_id = submission_id or str(uuid.uuid4())
        body = {"spec": spec, "dry_run": dry_run, "force": force}
        data = to_json(body) if not isinstance(spec, JobSpec) else to_json(PutJobRequest(spec=spec, dry_run=dry_run,
                                                                                          force=force))
        waiter = await self.bus.expect(s.submitted(namespace, submission_id))
        try:
            ack = await self.bus.js_publish(s.submit(namespace), data, msg_id=submission_id)
            reply = None if ack.duplicate else await waiter.wait(wait)
        finally:
            await waiter.close()
        if reply is None:
            try:
                reply = await self._call(s.SUBMISSIONS_GET, GetSubmissionRequest(submission_id=submission_id),
                                         namespace)
            except NotFound:
                return submission_id
        return decode_reply(reply, SubmissionOutcome)

    # -- reads -------------------------------------------------------------------------------------

    async def get_job(self, job: str) -> tuple[bytes, Job]:
        raw = await self._call(s.JOBS_GET, {"job": job})
        return raw, decode_reply(raw, _JobReply).job

    async def list_jobs(self, request: ListJobsRequest) -> tuple[bytes, ListJobsResponse]:
        raw = await self._call(s.JOBS_LIST, request)
        return raw, decode_reply(raw, ListJobsResponse)

    async def list_executions(self, request: ListJobExecutionsRequest) -> tuple[bytes, ListJobExecutionsResponse]:
        raw = await self._call(s.EXECUTIONS_LIST, request)
        return raw, decode_reply(raw, ListJobExecutionsResponse)

    async def logs(self, request: ExecutionLogsRequest) -> tuple[bytes, ExecutionLogsResponse]:
        """What a job's commands printed, from after `request.after`; `next` continues."""
        raw = await self._call(s.EXECUTIONS_LOGS, request)
        return raw, decode_reply(raw, ExecutionLogsResponse)

    async def all_executions(self, job: str, **filters: Any) -> list[Any]:
        """Every page of a job's executions."""
        items: list[Any] = []
        token = ""
        while True:
            _, page = await self.list_executions(
                ListJobExecutionsRequest(job=job, limit=1000, next_token=token, **filters))
            items.extend(page.items)
            if not page.next_token:
                return items
            token = page.next_token

    async def list_nodes(self, request: ListNodesRequest) -> tuple[bytes, ListNodesResponse]:
        raw = await self.bus.request(s.NODES_LIST, to_json(request), timeout=self.timeout)
        return raw, decode_reply(raw, ListNodesResponse)

    async def list_dead_letters(self, request: ListDeadLettersRequest) -> tuple[bytes, ListDeadLettersResponse]:
        raw = await self.bus.request(s.DEAD_LETTERS_LIST, to_json(request), timeout=self.timeout)
        return raw, decode_reply(raw, ListDeadLettersResponse)

    async def wait_ready(self, nodes: int, timeout: float = 60.0) -> None:
        """Until every service answers and at least `nodes` nodes are ready (a freshly started stack)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        missing: list[str] = list(s.SERVICES)
        while True:
            missing = [name for name in missing if not await self._answers(s.service_ping(name))]
            ready = 0
            if not missing:
                try:
                    _, page = await self.list_nodes(ListNodesRequest(state="ready", limit=1000))
                except Unavailable:  # the query replica that answered the ping went away; ask again
                    missing = [s.SERVICE_QUERY]
                else:
                    ready = len(page.items)
                    if ready >= nodes:
                        return
            if loop.time() > deadline:
                raise Unavailable(f"stack not ready after {timeout:.0f}s: services not answering {missing}, "
                                  f"{ready} of {nodes} nodes ready")
            await asyncio.sleep(0.25)

    async def _answers(self, subject: str) -> bool:
        try:
            await self.bus.request(subject, b"", timeout=1.0)
        except ShoalError:
            return False
        return True

    # -- control -----------------------------------------------------------------------------------

    async def stop_job(self, job: str, reason: str = "") -> StopJobResponse:
        return decode_reply(await self._call(s.JOBS_STOP, StopJobRequest(job=job, reason=reason)), StopJobResponse)

    async def rollout(self, operation: str, job: str, reason: str = "") -> tuple[bytes, RolloutStatus]:
        raw = await self._call(operation, RolloutRequest(job=job, reason=reason))
        return raw, decode_reply(raw, RolloutStatus)


class _JobReply(msgspec.Struct):
    job: Job


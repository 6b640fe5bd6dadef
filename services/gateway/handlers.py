"""What each route does: one NATS call, its reply passed on byte for byte.

An HTTP reply is the NATS reply itself (same JSON, same bytes) so that a client reading either sees one
API; an error reply keeps its `{"error": ...}` body and its code becomes the HTTP status.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from shared import subjects as s
from shared.api import GetSubmissionRequest, PutJobRequest
from shared.codec import from_json, to_json
from shared.errors import Conflict, ErrorBody, ErrorReply, InvalidInput, NotFound, Unavailable
from shared.models import SubmissionOutcome

from .http import Request, Response
from .params import from_body, from_query
from .routes import Health, Route

if TYPE_CHECKING:
    from .service import GatewayService

# A submission id starting with this is one the scheduler gives itself (README: "answered as seq-<N>"):
# a client's key that looks like one would be answered under another id, so it is refused here.
SCHEDULER_ID_PREFIX = "seq-"
IDEMPOTENCY_KEY = "Idempotency-Key"


async def forward(gw: GatewayService, route: Route, req: Request) -> Response:
    """The route's request struct, from path and query or body, to its subject; the reply unchanged."""
    if route.source == "body":
        request = from_body(route, req, await req.body())
    else:
        request = from_query(route, req)
    subject = s.api(req.params["ns"], route.operation) if route.operation else route.subject
    return Response(200, await gw.bus.request(subject, to_json(request), timeout=gw.timeout))


async def submit(gw: GatewayService, route: Route, req: Request) -> Response:
    """Publish the body on `shoal.submit.<ns>` and answer with its outcome.

    The body is decoded here first, exactly as the scheduler decodes it, so a malformed one is a 400 at
    once and never enters the stream; the bytes published are the client's own.

    A client's `Idempotency-Key` that already has an outcome in this namespace is answered with it, and
    nothing is published. A key the stream has seen within its duplicate window without an outcome here
    (used in another namespace: submission ids are the cluster's, not a namespace's) is a 409 naming the
    key, since the stream dropped this submission as a duplicate and nothing will ever answer it.
    """
    if req.query:
        raise InvalidInput("PUT /jobs takes no query parameters", field=next(iter(req.query)))
    ns = req.params["ns"]
    body = await req.body()
    from_json(body, PutJobRequest)
    key = req.header(IDEMPOTENCY_KEY.lower())
    submission_id = _submission_id(key)
    reply = await _stored_outcome(gw, ns, submission_id) if key is not None else None
    duplicate = False
    if reply is None:
        waiter = await gw.bus.expect(s.submitted(ns, submission_id))
        try:
            ack = await gw.bus.js_publish(s.submit(ns), body, msg_id=submission_id)
            duplicate = ack.duplicate
            reply = await _stored_outcome(gw, ns, submission_id) if duplicate else None
            if reply is None:
                reply = await waiter.wait(gw.submit_wait)
        finally:
            await waiter.close()
    if reply is None:
        reply = await _stored_outcome(gw, ns, submission_id)
    if reply is None and duplicate:
        raise Conflict(f"{IDEMPOTENCY_KEY} {submission_id!r} was used recently (within the submission stream's "
                       f"duplicate window) for a submission with no outcome in namespace {ns!r}: another namespace's, "
                       f"or one still queued; this one was dropped as its duplicate: use another key",
                       field=IDEMPOTENCY_KEY)
    if reply is None:
        raise Unavailable(f"submission {submission_id} is queued but was not processed within "
                          f"{gw.submit_wait:.0f}s; GET /api/v1/namespaces/{ns}/submissions/{submission_id} tells "
                          f"its outcome later")
    outcome = from_json(reply, SubmissionOutcome, max_bytes=None)
    if outcome.accepted:
        return Response(200, reply, headers={IDEMPOTENCY_KEY: submission_id})
    error = outcome.error or ErrorBody(code=500, message="submission rejected without an error")
    status = error.code if 400 <= error.code <= 599 else 500
    return Response(status, to_json(ErrorReply(error=error)), headers={IDEMPOTENCY_KEY: submission_id})


def _submission_id(key: str | None) -> str:
    if key is None:
        return str(uuid.uuid4())
    if not s.TOKEN.fullmatch(key) or key.startswith(SCHEDULER_ID_PREFIX):
        raise InvalidInput(f"invalid {IDEMPOTENCY_KEY}: use 1-128 letters, digits, '_' and '-', starting with a "
                           f"letter or digit and not with {SCHEDULER_ID_PREFIX!r}", field=IDEMPOTENCY_KEY)
    return key


async def _stored_outcome(gw: GatewayService, ns: str, submission_id: str) -> bytes | None:
    try:
        return await gw.bus.request(s.api(ns, s.SUBMISSIONS_GET),
                                    to_json(GetSubmissionRequest(submission_id=submission_id)), timeout=gw.timeout)
    except NotFound:
        return None


async def healthz(gw: GatewayService, route: Route, req: Request) -> Response:
    if not gw.bus.connected:
        raise Unavailable("not connected to NATS")
    return Response(200, to_json(Health(status="ok")))


async def openapi(gw: GatewayService, route: Route, req: Request) -> Response:
    return Response(200, gw.openapi)


async def metrics(gw: GatewayService, route: Route, req: Request) -> Response:
    """This process's metrics in the Prometheus text format (shared/metrics.py), as SHOAL_METRICS_PORT
    serves them."""
    from shared import metrics as shoal_metrics

    body, content_type = shoal_metrics.exposition()
    return Response(200, body, content_type=content_type)


async def events(gw: GatewayService, route: Route, req: Request):  # -> JobEvents
    from .sse import open_job_events

    return await open_job_events(gw, req)


HANDLERS = {"forward": forward, "submit": submit, "healthz": healthz, "openapi": openapi,
            "metrics": metrics, "events": events}

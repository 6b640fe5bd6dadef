"""What each route does: one NATS call, its reply passed on byte for byte.

An HTTP reply is the NATS reply itself (same JSON, same bytes) so that a client reading either sees one
API; an error reply keeps its `{"error": ...}` body and its code becomes the HTTP status.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import TYPE_CHECKING

from shared import subjects as s
from shared.api import GetSubmissionRequest, PutJobRequest
from shared.codec import from_json, to_json
from shared.errors import Conflict, ErrorBody, ErrorReply, InvalidInput, NotFound, Unavailable
from shared.ids import SEQ_PREFIX
from shared.models import SubmissionOutcome

from .http import Request, Response
from .params import from_body, from_query
from .routes import Health, Route

if TYPE_CHECKING:
    from .service import GatewayService

IDEMPOTENCY_KEY = "Idempotency-Key"
SUBMISSION_ID = "Submission-Id"
# The submission id of a PUT is derived from its namespace and its Idempotency-Key: ids are the cluster's
# (the submission stream drops a second message under an id it has seen, whatever its namespace), so a
# client's raw key would let one namespace probe and occupy another's keys.
SUBMISSION_PREFIX = "idem-"
DIGEST_CHARS = 40  # hex characters of SHA-256 kept: 160 bits
assert not SUBMISSION_PREFIX.startswith(SEQ_PREFIX)  # the scheduler's own ids stay distinct


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

    The submission id is `submission_id_of(ns, key)`, the key being the client's `Idempotency-Key` (a
    new one when absent): the same key in the same namespace is the same submission, answered with its
    outcome without publishing again; the same key in another namespace is another submission. Both the
    key and the id are in the reply's headers, and the id is the outcome's `submission_id`.
    """
    if req.query:
        raise InvalidInput("PUT /jobs takes no query parameters", field=next(iter(req.query)))
    ns = req.params["ns"]
    body = await req.body()
    from_json(body, PutJobRequest)
    given = req.header(IDEMPOTENCY_KEY.lower())
    key = _idempotency_key(given)
    submission_id = submission_id_of(ns, key)
    headers = {IDEMPOTENCY_KEY: key, SUBMISSION_ID: submission_id}
    reply = await _stored_outcome(gw, ns, submission_id) if given is not None else None
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
        raise Conflict(f"{IDEMPOTENCY_KEY} {key!r} was used moments ago in namespace {ns!r} for a submission that "
                       f"has no outcome yet; GET /api/v1/namespaces/{ns}/submissions/{submission_id} tells its "
                       f"outcome once it has one", field=IDEMPOTENCY_KEY)
    if reply is None:
        raise Unavailable(f"submission {submission_id} is queued but was not processed within "
                          f"{gw.submit_wait:.0f}s; GET /api/v1/namespaces/{ns}/submissions/{submission_id} tells "
                          f"its outcome later")
    outcome = from_json(reply, SubmissionOutcome, max_bytes=None)
    if outcome.accepted:
        return Response(200, reply, headers=headers)
    error = outcome.error or ErrorBody(code=500, message="submission rejected without an error")
    status = error.code if 400 <= error.code <= 599 else 500
    return Response(status, to_json(ErrorReply(error=error)), headers=headers)


def _idempotency_key(key: str | None) -> str:
    if key is None:
        return str(uuid.uuid4())
    if not s.TOKEN.fullmatch(key):
        raise InvalidInput(f"invalid {IDEMPOTENCY_KEY}: use 1-128 letters, digits, '_' and '-', starting with a "
                           f"letter or digit", field=IDEMPOTENCY_KEY)
    return key


def submission_id_of(namespace: str, key: str) -> str:
    """The submission id of `key` in `namespace`: `idem-` and 40 hex characters of their SHA-256."""
    return SUBMISSION_PREFIX + hashlib.sha256(f"{namespace}\n{key}".encode()).hexdigest()[:DIGEST_CHARS]


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

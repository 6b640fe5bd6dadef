"""Request-reply endpoints through the NATS Services API (`nats.micro`).

Each endpoint is discoverable with `$SRV.PING|INFO|STATS`, and replicas share requests through the
service's queue group. Every endpoint is subscribed before the discovery subjects are, so a service
that answers `$SRV.PING` answers all of its endpoints (readiness checks rely on it). Handlers return the reply body; a `ShoalError` becomes a structured JSON error
reply (with the Services API error headers), anything else a 500 — the service keeps serving. The
micro library runs one handler at a time per endpoint, so requests are handed to bounded tasks.

Each request is served in a span named by the endpoint's subject template (`serve shoal.v1.*.jobs.get`)
and its time to answer is recorded in `shoal_request_duration_seconds`, labelled by service, endpoint,
subject template and code (`ok`, or the error's code): never by namespace or node.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from nats.micro.request import Request
from nats.micro.service import Service, ServiceConfig

from .. import metrics, telemetry
from ..codec import to_json
from ..errors import ErrorReply, Internal, ShoalError
from ._bus import ERROR_CODE_HEADER, ERROR_HEADER, Bus, check_size, header_value

log = logging.getLogger(__name__)


class ApiRequest:
    __slots__ = ("subject", "data", "headers")

    def __init__(self, subject: str, data: bytes, headers: dict[str, str]) -> None:
        self.subject = subject
        self.data = data
        self.headers = headers

    def token(self, index: int) -> str:
        """A token of the subject, e.g. the namespace of `shoal.v1.<ns>.executions.list` is token(2)."""
        return self.subject.split(".")[index]


ApiHandler = Callable[[ApiRequest], Awaitable[bytes]]


def error_reply(exc: ShoalError) -> tuple[bytes, dict[str, str]]:
    """The JSON error body and the Services API error headers; both bounded, whatever caused the error."""
    body = to_json(ErrorReply(error=exc.body()))
    return body, {ERROR_HEADER: header_value(exc.message, 256), ERROR_CODE_HEADER: str(exc.code)}


class ApiService:
    def __init__(self, bus: Bus, service: Service, concurrency: int, name: str = "", queue_group: str = "") -> None:
        self.bus = bus
        self.name = name
        self.queue_group = queue_group
        self._service = service
        self._gate = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def start(cls, bus: Bus, name: str, version: str, description: str, *, queue_group: str,
                    endpoints: Sequence[tuple[str, str, ApiHandler]], concurrency: int = 64) -> ApiService:
        """Subscribe every `(name, subject, handler)` endpoint, then start answering discovery."""
        service = Service(bus.nc, ServiceConfig(name=name, version=version, description=description,
                                                queue_group=queue_group))
        api = cls(bus, service, concurrency, name, queue_group)
        for endpoint, subject, handler in endpoints:
            await api._add_endpoint(endpoint, subject, handler)
        await service.start()  # subscribes discovery after the endpoints, then one flush for all
        # nats-py writes a flush's PING straight to the socket, ahead of commands still queued: a second
        # round trip makes sure the server has every subscription before callers are told we serve.
        await bus.flush()
        await bus.flush()
        bus.on_close(api.stop)
        bus.services.append((name, service.id))
        return api

    async def _add_endpoint(self, name: str, subject: str, handler: ApiHandler) -> None:
        template = telemetry.subject_template(subject)
        timing = metrics.Endpoint(metrics.INSTRUMENTS, self.name, name, template)
        span_name = f"serve {template}"

        async def on_request(req: Request) -> None:
            began = time.perf_counter()
            await self._gate.acquire()
            task = asyncio.create_task(self._serve(req, handler, span_name, template, timing, began))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        await self._service.add_endpoint(name=name, subject=subject, handler=on_request)

    async def _serve(self, req: Request, handler: ApiHandler, span_name: str, template: str,
                     timing: metrics.Endpoint, began: float) -> None:
        code = "ok"
        try:
            headers = dict(req.headers or {})
            with telemetry.span(span_name, kind=telemetry.SERVER, headers=headers, subject=req.subject,
                                template=template, consumer_group=self.queue_group or None,
                                body_size=len(req.data)):
                try:
                    body = await handler(ApiRequest(req.subject, req.data, headers))
                except ShoalError as exc:
                    code = str(exc.code)
                    body, err_headers = error_reply(exc)
                    await req.respond(body, headers=err_headers)
                    return
                except Exception:
                    code = "500"
                    log.exception("endpoint %s failed", req.subject)
                    body, err_headers = error_reply(Internal("internal error; see the service log"))
                    await req.respond(body, headers=err_headers)
                    return
                try:
                    check_size(req.subject, body, None, self.bus.max_payload)
                except ShoalError:
                    # Handlers bound their replies (pages stop early); this is the last guard, because a
                    # reply over max_payload would make the server close this service's connection.
                    log.error("reply on %s is %d bytes, over max_payload; answering 500", req.subject, len(body))
                    code = "500"
                    body, err_headers = error_reply(Internal("reply too large; see the service log"))
                    await req.respond(body, headers=err_headers)
                    return
                await req.respond(body)
        except Exception:  # the reply itself failed (requester gone, connection closing)
            log.debug("reply on %s not sent", req.subject, exc_info=True)
        finally:
            self._gate.release()
            timing.record(time.perf_counter() - began, code)

    async def stop(self) -> None:
        try:
            await self._service.stop()
        except Exception:
            pass
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)

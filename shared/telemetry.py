"""OpenTelemetry tracing across the bus.

Trace context rides in NATS message headers (W3C `traceparent`): the transport injects it into every
publish and request and extracts it on receipt, so one trace follows a job from its submission through
scheduling, placement, the agent and every reported state. The exporter is chosen by settings:
`none` (default), `console`, `otlp` (when its package is installed) or `file` (JSON lines at
`traces_file`, which tests read).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import SpanKind, Status, StatusCode

log = logging.getLogger(__name__)

_provider: TracerProvider | None = None
_TRACER_NAME = "shoal"


class JsonLinesExporter(SpanExporter):
    """Appends one JSON object per finished span to a file; several processes may share the file."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for span in spans:
            ctx = span.get_span_context()
            parent = span.parent
            lines.append(
                json.dumps(
                    {
                        "name": span.name,
                        "service": span.resource.attributes.get("service.name", ""),
                        "trace_id": format(ctx.trace_id, "032x"),
                        "span_id": format(ctx.span_id, "016x"),
                        "parent_id": format(parent.span_id, "016x") if parent else None,
                        "kind": span.kind.name,
                        "attributes": {k: _plain(v) for k, v in (span.attributes or {}).items()},
                        "start": span.start_time,
                        "end": span.end_time,
                    }
                )
            )
        with self._lock, open(self._path, "a", encoding="utf-8") as fh:
            fh.write("".join(line + "\n" for line in lines))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def setup(service_name: str, exporter: str = "none", traces_file: str = "") -> None:
    """Install the tracer provider for this process (idempotent: the first call wins)."""
    global _provider
    if _provider is not None:
        return
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    kind = (exporter or "none").lower()
    if kind == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif kind == "file":
        if not traces_file:
            raise SystemExit("SHOAL_TRACES_EXPORTER=file needs SHOAL_TRACES_FILE")
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(traces_file)))
    elif kind == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning("otlp exporter requested but opentelemetry-exporter-otlp-proto-http is not installed")
        else:
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    elif kind != "none":
        log.warning("unknown traces exporter %r; tracing spans are not exported", exporter)
    trace.set_tracer_provider(provider)
    _provider = provider


def shutdown() -> None:
    if _provider is not None:
        _provider.shutdown()


def tracer() -> trace.Tracer:
    return trace.get_tracer(_TRACER_NAME)


def inject(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Headers carrying the current trace context (added to `headers` if given)."""
    carrier = dict(headers or {})
    propagate.inject(carrier)
    return carrier


def extract(headers: Mapping[str, str] | None) -> otel_context.Context:
    return propagate.extract(dict(headers or {}))


def trace_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """Just the trace context entries of a header map, to carry a trace across a later message."""
    if not headers:
        return {}
    return {k: v for k, v in headers.items() if k in ("traceparent", "tracestate", "baggage")}


def trace_id_of(headers: Mapping[str, str] | None) -> str | None:
    """The trace id in a `traceparent` header, or None."""
    parent = (headers or {}).get("traceparent", "")
    parts = parent.split("-")
    return parts[1] if len(parts) >= 4 else None


@contextlib.contextmanager
def span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    headers: Mapping[str, str] | None = None,
    subject: str | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[trace.Span]:
    """A span, child of the trace in `headers` when given, else of the current context."""
    ctx = extract(headers) if headers else None
    attrs: dict[str, Any] = {"messaging.system": "nats"} if subject else {}
    if subject:
        attrs["messaging.destination.name"] = subject
    if attributes:
        attrs.update(attributes)
    with tracer().start_as_current_span(name, context=ctx, kind=kind, attributes=attrs) as current:
        try:
            yield current
        except Exception as exc:
            current.set_status(Status(StatusCode.ERROR, str(exc)))
            raise


PRODUCER = SpanKind.PRODUCER
CONSUMER = SpanKind.CONSUMER
CLIENT = SpanKind.CLIENT
SERVER = SpanKind.SERVER


def capture() -> otel_context.Context:
    """The current trace context, to publish something later on behalf of the current span."""
    return otel_context.get_current()


@contextlib.contextmanager
def attached(ctx: otel_context.Context) -> Iterator[None]:
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)

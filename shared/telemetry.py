"""OpenTelemetry tracing across the bus.

Trace context rides in NATS message headers (W3C `traceparent`): the transport injects it into every
publish and request and extracts it on receipt, so one trace follows a job from its submission through
scheduling, placement, the agent and every reported state. The exporter is chosen by settings:
`none` (default), `console`, `otlp` (when its package is installed) or `file` (JSON lines at
`traces_file`, which tests read).

Spans are named by subject template (`process shoal.report.*`, `serve shoal.v1.*.jobs.get`), never by a
concrete subject: the number of span names stays fixed however many nodes, namespaces and jobs there
are. The concrete subject is the `messaging.destination.name` attribute, beside the other messaging
semantic-convention attributes. `JsonFormatter` writes log records as JSON lines that carry the trace
and span ids of the span current when they were logged.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.semconv._incubating.attributes.messaging_attributes import (
    MESSAGING_CONSUMER_GROUP_NAME,
    MESSAGING_DESTINATION_NAME,
    MESSAGING_DESTINATION_TEMPLATE,
    MESSAGING_MESSAGE_BODY_SIZE,
    MESSAGING_MESSAGE_ID,
    MESSAGING_OPERATION_NAME,
    MESSAGING_OPERATION_TYPE,
    MESSAGING_SYSTEM,
    MessagingOperationTypeValues,
)
from opentelemetry.trace import SpanKind, Status, StatusCode

from .subjects import RESERVED_NAMESPACES

log = logging.getLogger(__name__)

_provider: TracerProvider | None = None
_tracer: trace.Tracer | None = None
# Whether any span leaves this process. When none does (the default), `span` makes no span where a trace
# is already under way: the trace context still travels from message to message (one trace per job,
# trace ids in the logs), but nothing is built for nobody to read (spans and their attributes were a
# sixth of an agent's CPU and a tenth of a health replica's).
_exporting = True
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
    global _provider, _tracer, _exporting
    if _provider is not None:
        return
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    kind = (exporter or "none").lower()
    processor: SpanProcessor | None = None
    if kind == "console":
        processor = BatchSpanProcessor(ConsoleSpanExporter())
    elif kind == "file":
        if not traces_file:
            raise SystemExit("SHOAL_TRACES_EXPORTER=file needs SHOAL_TRACES_FILE")
        processor = SimpleSpanProcessor(JsonLinesExporter(traces_file))
    elif kind == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning("otlp exporter requested but opentelemetry-exporter-otlp-proto-http is not installed")
        else:
            processor = BatchSpanProcessor(OTLPSpanExporter())
    elif kind != "none":
        log.warning("unknown traces exporter %r; tracing spans are not exported", exporter)
    if processor is not None:
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    _provider = provider
    _tracer = None
    _exporting = processor is not None


def shutdown() -> None:
    if _provider is not None:
        _provider.shutdown()


def tracer() -> trace.Tracer:
    """This process's tracer (made once: making one per span was a sixth of an agent's CPU)."""
    global _tracer
    if _tracer is None:
        found = trace.get_tracer(_TRACER_NAME)
        if _provider is None:
            return found  # no provider installed yet: do not hold on to the proxy's default
        _tracer = found
    return _tracer


def inject(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Headers carrying the current trace context (added to `headers` if given)."""
    carrier = dict(headers or {})
    propagate.inject(carrier)
    return carrier


_EXTRACTED: dict[tuple[str | None, ...], otel_context.Context] = {}
_EXTRACTED_MAX = 4096
_FIELDS: tuple[object, tuple[str, ...]] = (None, ())


def _propagated_fields() -> tuple[str, ...]:
    """The headers the installed propagators read, in a fixed order."""
    global _FIELDS
    textmap = propagate.get_global_textmap()
    if _FIELDS[0] is not textmap:
        _FIELDS = (textmap, tuple(sorted(textmap.fields)))
        _EXTRACTED.clear()  # parsed by other propagators
    return _FIELDS[1]


def extract(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The trace context in `headers`. Messages of one job carry the same few contexts, so where nothing
    is current (a consumer's loop) each is parsed once (a parse is most of what a consumed message costs
    the tracing: 5 us) and the context, which nothing changes, is shared; the cache is keyed by the
    headers the propagators read, and bounded. (Some propagators build on the current context, baggage
    when it comes first: where something is current, the headers are parsed each time.)"""
    if otel_context.get_current():
        return propagate.extract(dict(headers or {}))
    fields = _propagated_fields()
    key = tuple((headers or {}).get(name) for name in fields)
    ctx = _EXTRACTED.get(key)
    if ctx is None:
        ctx = propagate.extract({name: value for name, value in zip(fields, key) if value is not None})
        if len(_EXTRACTED) >= _EXTRACTED_MAX:
            _EXTRACTED.clear()
        _EXTRACTED[key] = ctx
    return ctx


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


# -- subject templates ---------------------------------------------------------------------------------

MESSAGING_SYSTEM_NATS = "nats"  # not among the convention's well-known values: its lower-case name
MSG_ID_HEADER = "Nats-Msg-Id"

# Tokens after `shoal.<area>` kept as they are: the kind of an event (`shoal.events.execution.*...`).
_KEPT_AFTER_AREA = {"events": 1}
# `shoal.v1.<token>` that is a cluster-wide API, not a namespace (`shoal.v1.nodes.register.*.*`).
_CLUSTER_APIS = RESERVED_NAMESPACES
_API_WORD = re.compile(r"^[a-z]{1,24}$")  # an operation's noun or verb (`executions`, `list`)
_WILD = ("*", ">")


def subject_template(subject: str) -> str:
    """The subject with every token that names an instance (a node, namespace, job, execution,
    submission or fleet) replaced by `*`: a fixed set of templates, whatever the size of the fleet.

    `shoal.report.node-1` -> `shoal.report.*`; `shoal.v1.acme.jobs.get` -> `shoal.v1.*.jobs.get`;
    `shoal.v1.nodes.register.node-2.<digest>` -> `shoal.v1.nodes.register.*.*`; `_INBOX.x.y` -> `_INBOX.>`;
    a subject outside shoal keeps its first token (`other.>`).
    """
    tokens = subject.split(".")
    first = tokens[0]
    if first.startswith("$"):  # $JS.API..., $KV.<bucket>..., $SRV.PING...
        return ".".join(tokens[:2]) + (".>" if len(tokens) > 2 else "")
    if first != "shoal" or len(tokens) < 2:
        return first + (".>" if len(tokens) > 1 else "")
    area = tokens[1]
    if area == "v1" and len(tokens) > 2:
        if tokens[2] in _CLUSTER_APIS:  # shoal.v1.nodes.list, shoal.v1.nodes.register.<node>.<digest>
            return ".".join(tokens[:4] + [t if t in _WILD else "*" for t in tokens[4:]])
        rest = [t if t in _WILD or _API_WORD.match(t) else "*" for t in tokens[3:]]
        return ".".join(["shoal", "v1", "*", *rest])
    kept = 2 + _KEPT_AFTER_AREA.get(area, 0)
    return ".".join(tokens[:kept] + [t if t in _WILD else "*" for t in tokens[kept:]])


_OPERATION_TYPES = {
    SpanKind.CONSUMER: MessagingOperationTypeValues.PROCESS.value,
    SpanKind.SERVER: MessagingOperationTypeValues.PROCESS.value,
    SpanKind.CLIENT: MessagingOperationTypeValues.SEND.value,
    SpanKind.PRODUCER: MessagingOperationTypeValues.SEND.value,
}


def messaging_attributes(
    subject: str,
    *,
    operation: str,
    kind: SpanKind,
    template: str | None = None,
    headers: Mapping[str, str] | None = None,
    consumer_group: str | None = None,
    body_size: int | None = None,
) -> dict[str, Any]:
    """The messaging semantic-convention attributes of a span about one message on `subject`."""
    attrs: dict[str, Any] = {
        MESSAGING_SYSTEM: MESSAGING_SYSTEM_NATS,
        MESSAGING_DESTINATION_NAME: subject,
        MESSAGING_DESTINATION_TEMPLATE: template or subject_template(subject),
        MESSAGING_OPERATION_NAME: operation,
    }
    if (operation_type := _OPERATION_TYPES.get(kind)) is not None:
        attrs[MESSAGING_OPERATION_TYPE] = operation_type
    if headers and (msg_id := headers.get(MSG_ID_HEADER)):
        attrs[MESSAGING_MESSAGE_ID] = msg_id
    if consumer_group:
        attrs[MESSAGING_CONSUMER_GROUP_NAME] = consumer_group
    if body_size is not None:
        attrs[MESSAGING_MESSAGE_BODY_SIZE] = body_size
    return attrs


@contextlib.contextmanager
def span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    headers: Mapping[str, str] | None = None,
    subject: str | None = None,
    template: str | None = None,
    consumer_group: str | None = None,
    body_size: int | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[trace.Span]:
    """A span, child of the trace in `headers` when given, else of the current context.

    With a `subject`, the span carries the messaging attributes, and a name that ends with the concrete
    subject (`process shoal.report.node-1`) is named by its template instead (`process shoal.report.*`).
    """
    ctx = extract(headers) if headers else None
    attrs: dict[str, Any] = {}
    if not _exporting:
        # Nothing reads a span here: what must travel on is the trace. Carry on the sender's (or the
        # current) one; start a span only where a trace begins.
        if ctx is not None and trace.get_current_span(ctx).get_span_context().is_valid:
            with attached(ctx):
                yield trace.get_current_span(ctx)
            return
        if ctx is None and trace.get_current_span().get_span_context().is_valid:
            yield trace.get_current_span()
            return
        with tracer().start_as_current_span(name, context=ctx, kind=kind) as current:
            yield current
        return
    if subject:
        operation, _, rest = name.partition(" ")
        template = template or subject_template(subject)
        if rest == subject:
            name = f"{operation} {template}"
        attrs = messaging_attributes(subject, operation=operation, kind=kind, template=template, headers=headers,
                                     consumer_group=consumer_group, body_size=body_size)
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


# -- structured logs ----------------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and service, plus `trace_id` and
    `span_id` when a span is current (and `exception` with its traceback when there is one)."""

    def __init__(self, service: str = "") -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "service": self.service,
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            out["trace_id"] = format(ctx.trace_id, "032x")
            out["span_id"] = format(ctx.span_id, "016x")
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)

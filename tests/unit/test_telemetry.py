"""Trace context in NATS headers, and the JSON-lines exporter tests and demos read."""

from __future__ import annotations

import json

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from shared import telemetry


def test_context_travels_through_header_dicts(tmp_path) -> None:
    provider = TracerProvider()
    exporter = telemetry.JsonLinesExporter(str(tmp_path / "spans.jsonl"))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("producer") as producer:
        headers = telemetry.inject({"Nats-Msg-Id": "x"})
        trace_id = format(producer.get_span_context().trace_id, "032x")
    assert headers["Nats-Msg-Id"] == "x" and telemetry.trace_id_of(headers) == trace_id
    assert telemetry.trace_headers({**headers, "other": "1"}).keys() == {"traceparent"}
    with tracer.start_as_current_span("consumer", context=telemetry.extract(headers)) as consumer:
        assert format(consumer.get_span_context().trace_id, "032x") == trace_id
    spans = [json.loads(line) for line in (tmp_path / "spans.jsonl").read_text().splitlines()]
    assert [s["name"] for s in spans] == ["producer", "consumer"]
    assert spans[1]["parent_id"] == spans[0]["span_id"] and spans[1]["trace_id"] == trace_id


def test_no_trace_means_no_traceparent() -> None:
    assert telemetry.trace_id_of({}) is None
    assert telemetry.trace_id_of({"traceparent": "garbage"}) is None


def test_a_span_nobody_exports_still_carries_the_trace(monkeypatch) -> None:
    """With no exporter, `span` makes no span inside a trace, yet what it publishes stays in the sender's
    trace; where no trace is under way, one begins."""
    provider = TracerProvider()
    monkeypatch.setattr(telemetry, "_tracer", provider.get_tracer("t"))
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    for exporting in (True, False):
        monkeypatch.setattr(telemetry, "_exporting", exporting)
        with telemetry.span("process shoal.report.n1", headers={"traceparent": parent},
                            subject="shoal.report.n1") as current:
            sent = telemetry.inject({})
            with telemetry.span("inner") as inner:
                again = telemetry.inject({})
        assert telemetry.trace_id_of(sent) == telemetry.trace_id_of(again) == "0af7651916cd43dd8448eb211c80319c"
        assert (sent["traceparent"] != parent) is exporting  # a child span of its own only when exported
        assert bool(getattr(current, "attributes", None)) is exporting
        assert (inner is current) is not exporting
        assert not telemetry.inject({}).get("traceparent")  # nothing left attached
        with telemetry.span("submit") as root:  # no trace yet: one begins, exported or not
            assert root.get_span_context().is_valid
            assert telemetry.trace_id_of(telemetry.inject({})) != "0af7651916cd43dd8448eb211c80319c"


def test_a_context_parsed_while_another_is_current_is_not_served_to_later_messages() -> None:
    """Parsed contexts are kept by header (messages of one job share a few). With propagators that build on
    the current context (baggage first), a parse made while a trace is current carries that trace on: a
    later message with the same headers, where nothing is current, must not inherit it."""
    from opentelemetry import propagate, trace
    from opentelemetry.baggage.propagation import W3CBaggagePropagator
    from opentelemetry.propagators.composite import CompositePropagator
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    traced = {"traceparent": "00-0123456789abcdef0123456789abcdef-0123456789abcdef-01"}
    installed = propagate.get_global_textmap()
    propagate.set_global_textmap(CompositePropagator([W3CBaggagePropagator(), TraceContextTextMapPropagator()]))
    try:
        with telemetry.attached(telemetry.extract(traced)):
            inside = telemetry.extract({"other": "1"})  # no trace of its own: the current one carries on
        assert format(trace.get_current_span(inside).get_span_context().trace_id, "032x") == \
            "0123456789abcdef0123456789abcdef"
        outside = telemetry.extract({"other": "1"})
        assert not trace.get_current_span(outside).get_span_context().is_valid
        again = telemetry.extract(traced)
        assert telemetry.extract(traced) is again  # parsed once, where nothing is current
    finally:
        propagate.set_global_textmap(installed)

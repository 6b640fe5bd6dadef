"""Structured logs (SHOAL_LOG_FORMAT=json) and the settings of logs and metrics."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging

import pytest
from opentelemetry.sdk.trace import TracerProvider

from shared import runtime, telemetry
from shared.settings import from_env


def record(message: str, *args: object, exc: BaseException | None = None) -> logging.LogRecord:
    return logging.LogRecord("shoal.test", logging.WARNING, __file__, 1, message, args,
                             (type(exc), exc, exc.__traceback__) if exc else None)


def test_a_json_line_without_a_span() -> None:
    line = telemetry.JsonFormatter("shoal-query").format(record("applied %d events", 3))
    assert "\n" not in line
    body = json.loads(line)
    assert body.keys() == {"time", "level", "logger", "message", "service"}
    assert body["message"] == "applied 3 events" and body["level"] == "WARNING"
    assert body["logger"] == "shoal.test" and body["service"] == "shoal-query"
    at = dt.datetime.fromisoformat(body["time"].replace("Z", "+00:00"))
    assert abs((dt.datetime.now(dt.timezone.utc) - at).total_seconds()) < 60


def test_a_json_line_inside_a_span_carries_its_ids() -> None:
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("serve shoal.v1.*.jobs.get") as current:
        line = telemetry.JsonFormatter("shoal-query").format(record("line\nwith \"quotes\""))
        ctx = current.get_span_context()
    body = json.loads(line)
    assert body["trace_id"] == format(ctx.trace_id, "032x") and body["span_id"] == format(ctx.span_id, "016x")
    assert body["message"] == "line\nwith \"quotes\"" and "\n" not in line


def test_a_json_line_keeps_the_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError as exc:
        body = json.loads(telemetry.JsonFormatter().format(record("it failed", exc=exc)))
    assert body["message"] == "it failed" and "ValueError: boom" in body["exception"]


@pytest.fixture
def root_logger():
    """The root logger as it was: setup_logging configures it, each test puts it back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers = []
    try:
        yield root
    finally:
        root.handlers = handlers
        root.setLevel(level)


def test_setup_logging_writes_json_or_text(root_logger, monkeypatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    root_logger.handlers = []  # pytest's own capture handlers, put back by the fixture
    runtime.setup_logging("info", "json", "shoal-health")
    logging.getLogger("shoal.x").info("hello %s", "there")
    assert json.loads(stream.getvalue())["message"] == "hello there"
    assert json.loads(stream.getvalue())["service"] == "shoal-health"
    root_logger.handlers = []
    stream.truncate(0)
    stream.seek(0)
    runtime.setup_logging("info", "text", "shoal-health")
    logging.getLogger("shoal.x").info("plain")
    assert stream.getvalue().rstrip().endswith("INFO shoal.x: plain")


def test_log_format_and_metrics_port_settings(monkeypatch) -> None:
    monkeypatch.delenv("SHOAL_LOG_FORMAT", raising=False)
    monkeypatch.delenv("SHOAL_METRICS_PORT", raising=False)
    defaults = from_env()
    assert defaults.log_format == "text" and defaults.metrics_port == 0
    monkeypatch.setenv("SHOAL_LOG_FORMAT", "JSON")
    monkeypatch.setenv("SHOAL_METRICS_PORT", "9464")
    chosen = from_env()
    assert chosen.log_format == "json" and chosen.metrics_port == 9464
    for name, value in (("SHOAL_LOG_FORMAT", "xml"), ("SHOAL_METRICS_PORT", "70000"),
                        ("SHOAL_METRICS_PORT", "80.5"), ("SHOAL_METRICS_PORT", "http")):
        monkeypatch.setenv("SHOAL_LOG_FORMAT", "text")
        monkeypatch.setenv("SHOAL_METRICS_PORT", "0")
        monkeypatch.setenv(name, value)
        with pytest.raises(SystemExit, match=name):
            from_env()

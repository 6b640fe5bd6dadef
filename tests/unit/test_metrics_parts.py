"""Metrics and span naming, without a server: subject templates, bounded labels, the rollout gauges, the
query view's executions by state, and the names and attributes of transport spans."""

from __future__ import annotations

import random
import sqlite3

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.semconv._incubating.attributes.messaging_attributes import (
    MESSAGING_CONSUMER_GROUP_NAME,
    MESSAGING_DESTINATION_NAME,
    MESSAGING_DESTINATION_TEMPLATE,
    MESSAGING_MESSAGE_BODY_SIZE,
    MESSAGING_MESSAGE_ID,
    MESSAGING_OPERATION_NAME,
    MESSAGING_OPERATION_TYPE,
    MESSAGING_SYSTEM,
)

from services.query.view import Event, View
from shared import metrics, telemetry
from shared import subjects as s
from shared.codec import to_msgpack
from tests import builders

# -- subject templates and span names ---------------------------------------------------------------------


@pytest.mark.parametrize(("subject", "template"), [
    ("shoal.report.node-1", "shoal.report.*"),
    ("shoal.heartbeat.sim-0042", "shoal.heartbeat.*"),
    ("shoal.submit.acme", "shoal.submit.*"),
    ("shoal.submitted.acme.my-first-job", "shoal.submitted.*.*"),
    ("shoal.eval.acme", "shoal.eval.*"),
    ("shoal.eval._node", "shoal.eval.*"),
    ("shoal.assign.node-1.acme.job-1.exec-1", "shoal.assign.*.*.*.*"),
    ("shoal.output.node-1.acme.job-1.exec-1", "shoal.output.*.*.*.*"),
    ("shoal.events.execution.3.acme.job-1.node-1.exec-1", "shoal.events.execution.*.*.*.*.*"),
    ("shoal.events.rollout.3.acme.job-1", "shoal.events.rollout.*.*.*"),
    ("shoal.v1.acme.jobs.get", "shoal.v1.*.jobs.get"),
    ("shoal.v1.default.executions.list", "shoal.v1.*.executions.list"),
    ("shoal.v1.*.rollouts.status", "shoal.v1.*.rollouts.status"),
    ("shoal.v1.nodes.list", "shoal.v1.nodes.list"),
    ("shoal.v1.deadletters.list", "shoal.v1.deadletters.list"),
    ("shoal.v1.nodes.register.node-2.0123456789abcdef", "shoal.v1.nodes.register.*.*"),
    ("shoal.v1.nodes.register.*.*", "shoal.v1.nodes.register.*.*"),
    ("shoal.v1.fleets.open.fleet-7", "shoal.v1.fleets.open.*"),
    ("shoal.report.>", "shoal.report.>"),
    ("_INBOX.abc.def", "_INBOX.>"),
    ("$JS.API.CONSUMER.MSG.NEXT.SHOAL_ASSIGNMENTS.assign-node-1", "$JS.API.>"),
    ("$SRV.PING.shoal-query", "$SRV.PING.>"),
    ("elsewhere.node-1", "elsewhere.>"),
])
def test_subject_template(subject: str, template: str) -> None:
    assert telemetry.subject_template(subject) == template


def test_templates_do_not_grow_with_the_fleet() -> None:
    nodes = [f"node-{i}" for i in range(500)] + ["alpha", "executions", "list", "a" * 128]
    namespaces = ["default", "acme", "prod-eu", "x"]
    subjects = [f(n) for n in nodes for f in (s.report, s.heartbeat, lambda n: s.node_register(n, "0" * 16),
                                              lambda n: s.output(n, "acme", "job", "e"))]
    subjects += [s.api(ns, op) for ns in namespaces + nodes[:50] for op in (s.EXECUTIONS_LIST, s.JOBS_GET)]
    templates = {telemetry.subject_template(subject) for subject in subjects}
    assert templates == {"shoal.report.*", "shoal.heartbeat.*", "shoal.v1.nodes.register.*.*",
                         "shoal.output.*.*.*.*", "shoal.v1.*.executions.list", "shoal.v1.*.jobs.get"}


@pytest.fixture
def spans(monkeypatch) -> InMemorySpanExporter:
    """Spans of telemetry.span go to memory (the process's tracer provider is left alone)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(telemetry, "tracer", lambda: provider.get_tracer("test"))
    return exporter


def test_span_names_are_templates_and_the_subject_is_an_attribute(spans: InMemorySpanExporter) -> None:
    for i in range(40):
        subject = s.report(f"node-{i}")
        with telemetry.span(f"process {subject}", kind=telemetry.CONSUMER, subject=subject,
                            headers={"Nats-Msg-Id": f"m-{i}"}, consumer_group=s.CONSUMER_HEALTH_REPORTS,
                            body_size=10 + i):
            pass
    finished = spans.get_finished_spans()
    assert len(finished) == 40
    assert {span.name for span in finished} == {"process shoal.report.*"}
    first = finished[0].attributes or {}
    assert first[MESSAGING_SYSTEM] == "nats"
    assert first[MESSAGING_DESTINATION_NAME] == "shoal.report.node-0"
    assert first[MESSAGING_DESTINATION_TEMPLATE] == "shoal.report.*"
    assert first[MESSAGING_OPERATION_TYPE] == "process" and first[MESSAGING_OPERATION_NAME] == "process"
    assert first[MESSAGING_MESSAGE_ID] == "m-0"
    assert first[MESSAGING_CONSUMER_GROUP_NAME] == s.CONSUMER_HEALTH_REPORTS
    assert first[MESSAGING_MESSAGE_BODY_SIZE] == 10
    assert {dict(span.attributes or {})[MESSAGING_DESTINATION_NAME] for span in finished} == {
        s.report(f"node-{i}") for i in range(40)}


def test_a_request_span_and_a_span_without_subject(spans: InMemorySpanExporter) -> None:
    with telemetry.span("request shoal.v1.acme.jobs.get", kind=telemetry.CLIENT, subject="shoal.v1.acme.jobs.get"):
        pass
    with telemetry.span("reconcile", attributes={"shoal.job_id": "j"}):
        pass
    request, plain = spans.get_finished_spans()
    assert request.name == "request shoal.v1.*.jobs.get"
    attrs = dict(request.attributes or {})
    assert attrs[MESSAGING_OPERATION_TYPE] == "send" and MESSAGING_MESSAGE_ID not in attrs
    assert plain.name == "reconcile" and dict(plain.attributes or {}) == {"shoal.job_id": "j"}


# -- bounded labels ----------------------------------------------------------------------------------------


def test_labels_are_made_once_and_bounded() -> None:
    labels = metrics.Labels(("consumer",), limit=3, base={"stream": "S"})
    assert labels.of("a") is labels.of("a") == {"stream": "S", "consumer": "a"}
    for i in range(1000):
        labels.of(f"node-{i}")
    assert len(labels) == 3
    assert labels.of("node-999") == {"stream": "S", "consumer": metrics.OTHER}
    assert labels.of("a") == {"stream": "S", "consumer": "a"}  # those made before the limit stay


def reader_and_instruments() -> tuple[InMemoryMetricReader, metrics.Instruments]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    return reader, metrics.Instruments(provider.get_meter("test"))


def points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict, float]]]:
    out: dict[str, list[tuple[dict, float]]] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for point in metric.data.data_points:
                    value = getattr(point, "value", None)
                    if value is None:
                        value = point.count  # a histogram
                    out.setdefault(metric.name, []).append((dict(point.attributes or {}), value))
    return out


def test_series_stay_bounded_whatever_is_recorded() -> None:
    reader, ins = reader_and_instruments()
    endpoint = metrics.Endpoint(ins, "shoal-query", "jobs-get", "shoal.v1.*.jobs.get")
    for code in range(1000):  # error codes no one planned
        endpoint.record(0.001, str(code))
    for i in range(1000):
        ins.submission(i % 2 == 0, 400 + i)
    lags = [ins.lag("SHOAL_ASSIGNMENTS", f"assign-node-{i}") for i in range(1000)]
    for lag in lags:
        lag.pending = 1
    found = points(reader)
    latency = found["shoal.request.duration"]
    assert len(latency) <= 17 and sum(count for _, count in latency) == 1000
    assert all(attrs["endpoint"] == "jobs-get" and "node" not in str(attrs) for attrs, _ in latency)
    assert len(found["shoal.submissions"]) <= 65
    lag_series = found["shoal.consumer.lag"]
    assert len(lag_series) <= 129 and sum(value for _, value in lag_series) == 1000


def test_consumer_lag_is_shared_by_replicas_and_goes_with_the_last() -> None:
    reader, ins = reader_and_instruments()
    one = ins.lag(s.STREAM_REPORTS, s.CONSUMER_HEALTH_REPORTS)
    two = ins.lag(s.STREAM_REPORTS, s.CONSUMER_HEALTH_REPORTS)
    assert one is two
    one.pending = 7
    assert points(reader)["shoal.consumer.lag"] == [
        ({"stream": s.STREAM_REPORTS, "consumer": s.CONSUMER_HEALTH_REPORTS}, 7)]
    ins.release_lag(s.STREAM_REPORTS, s.CONSUMER_HEALTH_REPORTS)
    assert points(reader)["shoal.consumer.lag"][0][1] == 7
    ins.release_lag(s.STREAM_REPORTS, s.CONSUMER_HEALTH_REPORTS)
    assert "shoal.consumer.lag" not in points(reader)


# -- rollouts ----------------------------------------------------------------------------------------------


def test_budget_and_wave_labels_follow_the_rollout_rules() -> None:
    assert metrics.allowed_failures(10, 3, 100.0) == 3
    assert metrics.allowed_failures(10, 10, 10.0) == 1  # 2 of 10 is more than 10%
    assert metrics.allowed_failures(4, 10, 10.0) == 0
    assert metrics.allowed_failures(0, 5, 50.0) == 0
    assert [metrics.wave_label(w) for w in (0, 1, 9, 10, 250)] == ["0", "1", "9", "10+", "10+"]


def test_rollout_gauges_count_each_rollout_once_and_take_it_back() -> None:
    reader, ins = reader_and_instruments()
    owner = metrics.RolloutGauges(ins)

    def gauges() -> dict[str, dict[tuple, float]]:
        found = points(reader)
        return {name: {tuple(sorted(a.items())): v for a, v in found.get(name, [])}
                for name in ("shoal.rollouts.in_progress", "shoal.rollout.failed_nodes",
                             "shoal.rollout.failure_budget", "shoal.rollouts.finished")}

    for i in range(3):
        owner.observe(("default", f"job-{i}"), strategy="rolling", in_progress=True, wave=1, failed=0, budget=2,
                      state="deploying")
    owner.observe(("default", "job-0"), strategy="rolling", in_progress=True, wave=2, failed=1, budget=2,
                  state="deploying")
    owner.observe(("default", "job-0"), strategy="rolling", in_progress=True, wave=2, failed=1, budget=2,
                  state="deploying")  # redelivered: nothing changes
    now = gauges()
    assert now["shoal.rollouts.in_progress"] == {(("strategy", "rolling"), ("wave", "1")): 2,
                                                 (("strategy", "rolling"), ("wave", "2")): 1}
    assert now["shoal.rollout.failed_nodes"] == {(("strategy", "rolling"),): 1}
    assert now["shoal.rollout.failure_budget"] == {(("strategy", "rolling"),): 6}
    owner.observe(("default", "job-0"), strategy="rolling", in_progress=False, wave=4, failed=1, budget=0,
                  state="succeeded")
    owner.forget(("default", "job-1"))
    now = gauges()
    assert sum(now["shoal.rollouts.in_progress"].values()) == 1
    assert now["shoal.rollout.failure_budget"] == {(("strategy", "rolling"),): 2}
    assert now["shoal.rollouts.finished"] == {(("state", "succeeded"), ("strategy", "rolling")): 1}
    owner.clear()  # the partition moved to another replica
    now = gauges()
    assert sum(now["shoal.rollouts.in_progress"].values()) == 0
    assert sum(now["shoal.rollout.failure_budget"].values()) == 0 and len(owner) == 0


# -- executions by state in the query view -----------------------------------------------------------------


def truth(path: str) -> dict[str, int]:
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT state, count(*) FROM executions GROUP BY state").fetchall())


async def test_view_counts_executions_by_state_as_batches_change_them(tmp_path) -> None:
    """Random batches of new, newer, stale, repeated and deleted executions: the counts kept from what
    each batch changed always equal a count of the table, also after the view is opened again."""
    rng = random.Random(7)
    path = str(tmp_path / "view.db")
    view = View(path)
    await view.open()
    try:
        await apply_random_batches(view, rng, path)
    finally:
        await view.close()
    again = View(path)
    await again.open()
    try:
        assert {k: v for k, v in again.states.snapshot().items() if v} == truth(path)
        await again.reset()
        assert not any(again.states.snapshot().values())
    finally:
        await again.close()


async def apply_random_batches(view: View, rng: random.Random, path: str) -> None:
    revisions: dict[str, int] = {}
    seq = 0
    states = ["pending", "running", "completed", "failed", "stopped"]
    stale = 0
    for _ in range(60):
        events = []
        for _ in range(rng.randint(1, 40)):
            seq += 1
            ex_id = f"ex-{rng.randint(0, 80)}"
            subject = f"{s.EVENTS_EXECUTION}.0.default.job.node.{ex_id}"
            if ex_id in revisions and rng.random() < 0.1:
                events.append(Event(subject, b"", True, seq))
                revisions.pop(ex_id)
                continue
            held = revisions.get(ex_id, 0)
            if held and rng.random() < 0.2:
                revision = rng.randint(1, held)  # not newer than the row: changes nothing
                stale += 1
            else:
                revision = held + rng.randint(1, 2)
            revisions[ex_id] = max(held, revision)
            execution = builders.execution("node", observed=rng.choice(states))
            execution.id = ex_id
            execution.status.revision = revision
            events.append(Event(subject, to_msgpack(execution), False, seq))
        await view.apply(events)
        counted = {state: n for state, n in view.states.snapshot().items() if n}
        assert counted == truth(path)
    assert stale > 50

"""Metrics, scraped over HTTP from real services on a real nats-server, and span names on the bus.

The services run as components in this process (tests/conftest.py's cluster); the process's metrics are
served on a free port as SHOAL_METRICS_PORT would serve them, and by the gateway at GET /metrics. The
instruments live as long as the process, so counters are compared before and after.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from services.gateway import GatewayService
from shared import metrics, telemetry
from shared import subjects as s
from shared.runtime import start_component
from shared.transport import ApiService, Consumer, ConsumerSpec

pytestmark = pytest.mark.nats

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Series:
    out: Series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(series: Series, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when there is none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in series.items() if n == name and wanted <= ls)


def names(series: Series) -> set[str]:
    return {n for n, _ in series}


@pytest.fixture
async def scrape():
    """GET /metrics of this process, as a service serves it on SHOAL_METRICS_PORT."""
    metrics.install("shoal-test")
    port = metrics.serve(0, "127.0.0.1")
    assert port
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10) as http:
        async def get() -> Series:
            response = await http.get("/metrics")
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/plain")
            return parse(response.text)

        yield get


def query_job(name: str) -> dict[str, Any]:
    return {"name": name, "type": "query", "restart_policy": "never", "config": {"simulate": {"duration": 0.1}}}


async def test_a_job_shows_in_the_metrics_of_every_service(cluster, wait_for, scrape) -> None:
    await cluster.start_services()
    await cluster.start("agent", simulate=3)
    api = await cluster.api()
    await api.wait_ready(3)
    before = await scrape()

    assert (await api.submit(query_job("counted"))).accepted
    rejected = await api.submit(query_job("counted"))  # the same spec again: 409
    assert not rejected.accepted and rejected.error.code == 409

    async def completed() -> bool:
        items = await api.all_executions("counted")
        return len(items) == 3 and all(e.observed == "completed" for e in items)

    await wait_for(completed, timeout=30)
    for _ in range(3):
        await api.get_job("counted")

    async def settled() -> Series | None:
        now = await scrape()
        return now if value(now, "shoal_executions", state="completed") == 3 else None

    after = await wait_for(settled, timeout=15)
    accepted = dict(outcome="accepted", code="200", dry_run="false")
    conflict = dict(outcome="rejected", code="409", dry_run="false")
    assert value(after, "shoal_submissions_total", **accepted) == value(before, "shoal_submissions_total", **accepted) + 1
    assert value(after, "shoal_submissions_total", **conflict) == value(before, "shoal_submissions_total", **conflict) + 1
    assert value(after, "shoal_executions") == 3  # every execution of this test's fresh view, all completed

    jobs_get = dict(service=s.SERVICE_QUERY, endpoint="jobs-get", subject="shoal.v1.*.jobs.get", code="ok")
    count = "shoal_request_duration_seconds_count"
    assert value(after, count, **jobs_get) >= value(before, count, **jobs_get) + 3
    assert value(after, "shoal_request_duration_seconds_bucket", le="+Inf", **jobs_get) == value(after, count, **jobs_get)
    assert value(after, "shoal_request_duration_seconds_sum", **jobs_get) > 0

    lags = {dict(labels)["consumer"] for n, labels in after if n == "shoal_consumer_lag"}
    assert {s.CONSUMER_SCHEDULER_SUBMISSIONS, s.CONSUMER_SCHEDULER_EVALS, s.CONSUMER_ROLLOUT_PLANS,
            s.CONSUMER_ROLLOUT_TIMERS, s.CONSUMER_HEALTH_REPORTS, "query-view"} <= lags
    assert any(c.startswith("rollout-p") for c in lags)
    for (n, labels), v in after.items():  # no label names a node, a job or an execution
        assert not any(word in value_ for _, value_ in labels for word in ("sim-", "counted", "ex-")), (n, labels)

    async def drained() -> bool:
        now = await scrape()
        return value(now, "shoal_consumer_lag", consumer=s.CONSUMER_SCHEDULER_SUBMISSIONS) == 0 and \
            value(now, "shoal_consumer_lag", consumer="query-view") == 0

    await wait_for(drained, timeout=15)

    gw = await start_component(lambda b, st: GatewayService(b, st, port=0, host="127.0.0.1"), cluster.settings,
                               "gateway")
    cluster.components.append(gw)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}", trust_env=False, timeout=10) as http:
        response = await http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    served = parse(response.text)
    assert {"shoal_submissions_total", "shoal_executions", "shoal_request_duration_seconds_count",
            "shoal_consumer_lag"} <= names(served)
    assert value(served, "shoal_executions", state="completed") == 3


async def test_a_rollout_shows_its_wave_and_budget_until_it_ends(cluster, wait_for, scrape) -> None:
    await cluster.start_services()
    await cluster.start("agent", simulate=4)
    api = await cluster.api()
    await api.wait_ready(4)
    before = await scrape()
    rolling = dict(strategy="rolling")
    body = {"name": "waves", "type": "pipeline", "restart_policy": "never", "config": {"simulate": {"hang": True}},
            "rollout": {"strategy": "rolling", "max_parallel": 25, "max_failed_nodes": 1,
                        "max_failed_nodes_percent": 100,
                        "health_check": {"interval": "200ms", "success_threshold": 2, "failure_threshold": 2,
                                         "deadline": "60s"}}}
    assert (await api.submit(body)).accepted  # never healthy: it waits in wave 1 of 4

    async def in_wave_one() -> Series | None:
        now = await scrape()
        grew = value(now, "shoal_rollouts_in_progress", wave="1", **rolling) - \
            value(before, "shoal_rollouts_in_progress", wave="1", **rolling)
        return now if grew == 1 else None

    during = await wait_for(in_wave_one, timeout=20)
    assert value(during, "shoal_rollout_failure_budget", **rolling) == \
        value(before, "shoal_rollout_failure_budget", **rolling) + 1
    assert value(during, "shoal_rollout_failed_nodes", **rolling) == value(before, "shoal_rollout_failed_nodes", **rolling)

    await api.stop_job("waves", "enough")
    finished = dict(strategy="rolling", state="stopped")

    async def ended() -> Series | None:
        now = await scrape()
        done = value(now, "shoal_rollouts_finished_total", **finished) == \
            value(before, "shoal_rollouts_finished_total", **finished) + 1
        return now if done else None

    after = await wait_for(ended, timeout=20)
    assert value(after, "shoal_rollouts_in_progress", **rolling) == value(before, "shoal_rollouts_in_progress", **rolling)
    assert value(after, "shoal_rollout_failure_budget", **rolling) == \
        value(before, "shoal_rollout_failure_budget", **rolling)


async def test_transport_span_names_do_not_grow_with_node_ids(bus, monkeypatch) -> None:
    """Requests to an endpoint and stream messages of many nodes: one span name each, the node only in
    the attributes."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(telemetry, "tracer", lambda: provider.get_tracer("test"))

    async def register(req) -> bytes:
        return b"{}"

    await ApiService.start(bus, "shoal-test", "0.1.0", "test", queue_group="test",
                           endpoints=[("register", s.node_register("*", "*"), register)])
    handled: list[str] = []

    async def on_report(delivery) -> None:
        handled.append(delivery.subject)

    consumer = Consumer(bus, ConsumerSpec(stream=s.STREAM_REPORTS, durable="test-reports",
                                          filter_subject=f"{s.REPORT_PREFIX}.>"))
    await consumer.start_single(on_report)
    nodes = [f"node-{i}" for i in range(8)]
    for node in nodes:
        await bus.request(s.node_register(node, "0123456789abcdef"), b"{}")
        await bus.js_publish(s.report(node), b"x", msg_id=f"report-{node}")
    for _ in range(100):
        if len(handled) == len(nodes):
            break
        await asyncio.sleep(0.1)
    await consumer.stop()
    finished = exporter.get_finished_spans()
    by_name: dict[str, set[str]] = {}
    for span in finished:
        attrs = dict(span.attributes or {})
        by_name.setdefault(span.name, set()).add(str(attrs.get("messaging.destination.name")))
    assert set(by_name) == {"request shoal.v1.nodes.register.*.*", "serve shoal.v1.nodes.register.*.*",
                            "process shoal.report.*"}, by_name
    assert by_name["process shoal.report.*"] == {s.report(n) for n in nodes}
    assert by_name["serve shoal.v1.nodes.register.*.*"] == {s.node_register(n, "0123456789abcdef") for n in nodes}
    process = next(sp for sp in finished if sp.name == "process shoal.report.*")
    attrs = dict(process.attributes or {})
    assert attrs["messaging.consumer.group.name"] == "test-reports"
    assert attrs["messaging.message.id"].startswith("report-node-")
    assert attrs["messaging.destination.template"] == "shoal.report.*" and attrs["messaging.system"] == "nats"


def test_a_service_whose_metrics_port_is_taken_exits_non_zero(nats_url: str) -> None:
    """A process serves everything it was asked to, or exits for a supervisor to see: a metrics port it
    cannot bind is not logged and forgotten."""
    import os
    import socket
    import subprocess
    import sys

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        env = {**os.environ, "SHOAL_NATS_URL": nats_url, "SHOAL_METRICS_PORT": str(port)}
        proc = subprocess.run([sys.executable, "-m", "services.cli.main", "serve", "scheduler"], env=env,
                              capture_output=True, text=True, timeout=60)
    finally:
        taken.close()
    assert proc.returncode != 0
    assert "SHOAL_METRICS_PORT" in proc.stderr and str(port) in proc.stderr


def test_metrics_are_served_on_loopback_unless_told_otherwise() -> None:
    from shared.settings import from_env

    assert from_env().metrics_host == "127.0.0.1"

"""Metrics: OpenTelemetry instruments, exported in the Prometheus text format.

`setup(service, port)` installs this process's MeterProvider with a Prometheus reader (it registers in
prometheus_client's default REGISTRY) and, when `port` is set (SHOAL_METRICS_PORT), serves `/metrics`
on it; the gateway also answers `GET /metrics` with `exposition()`. Every name starts with `shoal_`.
docs/OBSERVABILITY.md lists the metrics, their labels and meaning.

The instruments (`INSTRUMENTS`) exist from import on, so code records without caring whether metrics
are on: until `setup` they record nowhere. Recording is cheap and bounded:

- attribute sets are built once and reused (`Labels`), and a label takes a bounded set of values: no
  node, job or execution ids, and past a label's limit every new value is counted as `other`;
- gauges that describe state (executions by state, consumer lag, rollouts in progress) are kept up to
  date by the change that happened (a delta, a number from a delivery's metadata), never by scanning
  the fleet or the history; a scrape reads them as they stand.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import metrics as otel_metrics
from opentelemetry.metrics import CallbackOptions, Meter, Observation

log = logging.getLogger(__name__)

PREFIX = "shoal"
OTHER = "other"  # the value a label takes past its limit
# Seconds: from a cached read (well under a millisecond) to a request that waits for a timeout.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MAX_WAVE_LABEL = 10  # rollouts at wave 10 or later share the label "10+"

_lock = threading.Lock()
_provider: Any = None
_shut = False
_served: dict[int, int] = {}  # port asked for -> port served


# -- labels ---------------------------------------------------------------------------------------------


class Labels:
    """Attribute sets for the values of some labels, each made once and reused for every record.

    At most `limit` distinct combinations: past it, a new one is recorded with every label `other`, so a
    label fed something unexpected (a code no one planned, a name made of user input) cannot grow the
    number of series.
    """

    __slots__ = ("names", "limit", "base", "_sets", "_other")

    def __init__(self, names: tuple[str, ...], limit: int, base: Mapping[str, str] | None = None) -> None:
        self.names = names
        self.limit = limit
        self.base = dict(base or {})
        self._sets: dict[tuple[str, ...], dict[str, str]] = {}
        self._other = {**self.base, **{name: OTHER for name in names}}

    def of(self, *values: str) -> dict[str, str]:
        found = self._sets.get(values)
        if found is not None:
            return found
        if len(self._sets) >= self.limit:
            return self._other
        made = self._sets[values] = {**self.base, **dict(zip(self.names, values))}
        return made

    def __len__(self) -> int:
        return len(self._sets)


def wave_label(wave: int) -> str:
    """A rollout's current wave as a label: `0` (immediate, or not started) to `9`, then `10+`."""
    return str(wave) if wave < MAX_WAVE_LABEL else f"{MAX_WAVE_LABEL}+"


def allowed_failures(targets: int, max_nodes: int, max_percent: float) -> int:
    """How many nodes may fail before a rollout of `targets` nodes is past its budget (the rollout rule:
    it fails once failures exceed the count or the percentage of the targets)."""
    by_percent = math.floor(max_percent * targets / 100) if targets > 0 else 0
    return max(0, min(max_nodes, by_percent))


# -- executions by state --------------------------------------------------------------------------------


class StateCounts:
    """Rows per state of one view, kept current by deltas (written from the view's writer thread, read
    by a scrape)."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def set(self, counts: Mapping[str, int]) -> None:
        with self._lock:
            for state in self._counts:
                self._counts[state] = 0  # a state that emptied reads 0, not nothing
            self._counts.update(counts)

    def apply(self, deltas: Mapping[str, int]) -> None:
        if not deltas:
            return
        with self._lock:
            for state, delta in deltas.items():
                self._counts[state] = self._counts.get(state, 0) + delta

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


# -- rollouts --------------------------------------------------------------------------------------------


class RolloutGauges:
    """What the rollouts one owner holds add to the rollout gauges: each rollout's latest record counts
    once (its wave, its failed nodes, its budget), and is taken back when it finishes, is deleted or its
    owner lets it go (`clear`)."""

    def __init__(self, instruments: Instruments | None = None) -> None:
        self.instruments = instruments or INSTRUMENTS
        # (namespace, job id) -> (in-progress attributes, failed/budget attributes, failed, budget)
        self._held: dict[tuple[str, str], tuple[dict[str, str], dict[str, str], int, int]] = {}

    def observe(self, key: tuple[str, str], *, strategy: str, in_progress: bool, wave: int, failed: int,
                budget: int, state: str) -> None:
        held = self._held.get(key)
        if not in_progress:
            if held is not None:
                self._take_back(key, held)
                self.instruments.rollouts_finished.add(1, self.instruments.finished_labels.of(strategy, state))
            return
        ins = self.instruments
        wave_attrs = ins.wave_labels.of(strategy, wave_label(wave))
        budget_attrs = ins.strategy_labels.of(strategy)
        if held is not None:
            if held[0] is wave_attrs and held[1] is budget_attrs and held[2] == failed and held[3] == budget:
                return
            self._take_back(key, held)
        ins.rollouts_in_progress.add(1, wave_attrs)
        if failed:
            ins.rollout_failed_nodes.add(failed, budget_attrs)
        if budget:
            ins.rollout_failure_budget.add(budget, budget_attrs)
        self._held[key] = (wave_attrs, budget_attrs, failed, budget)

    def forget(self, key: tuple[str, str]) -> None:
        held = self._held.get(key)
        if held is not None:
            self._take_back(key, held)

    def clear(self) -> None:
        for key, held in list(self._held.items()):
            self._take_back(key, held)

    def _take_back(self, key: tuple[str, str], held: tuple[dict[str, str], dict[str, str], int, int]) -> None:
        ins = self.instruments
        ins.rollouts_in_progress.add(-1, held[0])
        if held[2]:
            ins.rollout_failed_nodes.add(-held[2], held[1])
        if held[3]:
            ins.rollout_failure_budget.add(-held[3], held[1])
        del self._held[key]

    def __len__(self) -> int:
        return len(self._held)


# -- the instruments -------------------------------------------------------------------------------------


class Endpoint:
    """The latency histogram of one request endpoint, its attribute sets made once."""

    __slots__ = ("_histogram", "_labels")

    def __init__(self, instruments: Instruments, service: str, endpoint: str, subject: str) -> None:
        self._histogram = instruments.request_duration
        self._labels = Labels(("code",), limit=16, base={"service": service, "endpoint": endpoint,
                                                         "subject": subject})

    def record(self, seconds: float, code: str = "ok") -> None:
        self._histogram.record(seconds, self._labels.of(code))


class Lag:
    """The pending messages of one consumer, as a scrape reads them."""

    __slots__ = ("attributes", "pending", "holders")

    def __init__(self, attributes: dict[str, str]) -> None:
        self.attributes = attributes
        self.pending = 0
        self.holders = 0


class Instruments:
    """Every instrument shoal records, made from one meter."""

    def __init__(self, meter: Meter) -> None:
        self.submissions = meter.create_counter(
            f"{PREFIX}.submissions", unit="{submission}",
            description="Job submissions the scheduler answered, by outcome (accepted, rejected) and code")
        self.submission_labels = Labels(("outcome", "code", "dry_run"), limit=64)
        self.request_duration = meter.create_histogram(
            f"{PREFIX}.request.duration", unit="s",
            description="Time to answer a request, by service, endpoint, subject template and code",
            explicit_bucket_boundaries_advisory=list(LATENCY_BUCKETS))
        self.rollouts_in_progress = meter.create_up_down_counter(
            f"{PREFIX}.rollouts.in_progress", unit="{rollout}",
            description="Rollouts in progress that this process owns, by strategy and current wave")
        self.wave_labels = Labels(("strategy", "wave"), limit=64)
        self.rollout_failed_nodes = meter.create_up_down_counter(
            f"{PREFIX}.rollout.failed_nodes", unit="{node}",
            description="Nodes failed in the rollouts in progress that this process owns, by strategy")
        self.rollout_failure_budget = meter.create_up_down_counter(
            f"{PREFIX}.rollout.failure_budget", unit="{node}",
            description="Failures the budgets of those rollouts allow before they roll back, by strategy")
        self.strategy_labels = Labels(("strategy",), limit=8)
        self.rollouts_finished = meter.create_counter(
            f"{PREFIX}.rollouts.finished", unit="{rollout}",
            description="Rollouts this process saw finish, by strategy and final state")
        self.finished_labels = Labels(("strategy", "state"), limit=64)

        self.lag_labels = Labels(("stream", "consumer"), limit=128)
        self._lags: dict[tuple[str, str], Lag] = {}
        meter.create_observable_gauge(
            f"{PREFIX}.consumer.lag", callbacks=[self._observe_lag], unit="{message}",
            description="Messages of a stream not yet delivered to a consumer, by stream and consumer")
        self._views: list[StateCounts] = []
        self.state_labels = Labels(("state",), limit=32)
        meter.create_observable_gauge(
            f"{PREFIX}.executions", callbacks=[self._observe_executions], unit="{execution}",
            description="Executions in the query view, by observed state")

    # -- submissions
    def submission(self, accepted: bool, code: int, dry_run: bool = False) -> None:
        self.submissions.add(1, self.submission_labels.of("accepted" if accepted else "rejected", str(code),
                                                          "true" if dry_run else "false"))

    # -- consumer lag
    def lag(self, stream: str, consumer: str) -> Lag:
        """The lag of one consumer (one per stream and consumer, shared by the replicas of a process)."""
        key = (stream, consumer)
        with _lock:
            found = self._lags.get(key)
            if found is None:
                found = self._lags[key] = Lag(self.lag_labels.of(stream, consumer))
            found.holders += 1
        return found

    def release_lag(self, stream: str, consumer: str) -> None:
        with _lock:
            found = self._lags.get((stream, consumer))
            if found is not None:
                found.holders -= 1
                if found.holders <= 0:
                    del self._lags[(stream, consumer)]

    def _observe_lag(self, options: CallbackOptions) -> Iterator[Observation]:
        with _lock:
            lags = list(self._lags.values())
        totals: dict[int, tuple[dict[str, str], int]] = {}
        for lag in lags:  # consumers past the label limit add up under `other`
            attrs, total = totals.get(id(lag.attributes), (lag.attributes, 0))
            totals[id(lag.attributes)] = (attrs, total + lag.pending)
        for attrs, total in totals.values():
            yield Observation(total, attrs)

    # -- executions by state
    def add_view(self, counts: StateCounts) -> None:
        with _lock:
            self._views.append(counts)

    def remove_view(self, counts: StateCounts) -> None:
        with _lock:
            if counts in self._views:
                self._views.remove(counts)

    def _observe_executions(self, options: CallbackOptions) -> Iterator[Observation]:
        with _lock:
            view = self._views[0] if self._views else None  # replicas in one process hold the same view
        if view is None:
            return
        for state, count in sorted(view.snapshot().items()):
            yield Observation(count, self.state_labels.of(state))


INSTRUMENTS = Instruments(otel_metrics.get_meter(PREFIX))


# -- the process's provider and exposition --------------------------------------------------------------


def setup(service_name: str, port: int = 0, host: str = "127.0.0.1") -> int:
    """Install this process's metrics (the first call wins) and serve `/metrics` on `port` if it is not 0.
    Returns the port served, or 0."""
    install(service_name)
    return serve(port, host) if port else 0


def install(service_name: str) -> None:
    global _provider
    with _lock:
        if _provider is not None:
            return
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.resources import Resource

        # No scope labels on every series: all of shoal's instruments come from one meter.
        reader = PrometheusMetricReader(scope_info_enabled=False)
        provider = MeterProvider(metric_readers=[reader], resource=Resource.create({"service.name": service_name}),
                                 shutdown_on_exit=False)
        otel_metrics.set_meter_provider(provider)
        _provider = provider


def serve(port: int, host: str = "127.0.0.1") -> int:
    """Serve the Prometheus registry over HTTP on `host`:`port` (port 0: a free one); returns the port. A
    port that cannot be bound ends the process (SystemExit, non-zero): a process serves everything it was
    asked to, or is gone for its supervisor to see."""
    with _lock:
        if port in _served:
            return _served[port]
    from prometheus_client import start_http_server

    try:
        server, _ = start_http_server(port, addr=host)
    except OSError as exc:
        raise SystemExit(f"cannot serve metrics on {host}:{port} (SHOAL_METRICS_PORT, SHOAL_METRICS_HOST): {exc}")
    bound = int(server.server_port)
    with _lock:
        _served[port] = bound
    log.info("metrics at http://%s:%d/metrics", host, bound)
    return bound


def exposition() -> tuple[bytes, str]:
    """This process's metrics in the Prometheus text format, and their content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def shutdown() -> None:
    """Nothing is pushed anywhere, so there is nothing to flush: the provider just stops."""
    global _shut
    with _lock:
        if _provider is None or _shut:
            return
        _shut = True
    _provider.shutdown()

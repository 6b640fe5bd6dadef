"""Shoal on a 3-node NATS cluster with every stream and bucket replicated three times: one node is
killed for good in the middle of a rolling update, and nothing is lost (the chaos round's checks)."""

from __future__ import annotations

import pytest

from tests.chaos import Chaos, Report, run

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]


@pytest.fixture(scope="module")
def round_(tmp_path_factory) -> Report:
    chaos = Chaos(tmp_path_factory.mktemp("cluster"), seed=3, nodes=30, cluster=3, kill_processes=False,
                  chaos_seconds=30.0, submissions=8)
    report = run(chaos)
    print("\n".join(chaos.log))
    print(report.summary())
    return report


def test_every_stream_and_bucket_is_replicated_to_the_three_nodes(round_: Report) -> None:
    shoal = {name: r for name, r in round_.replicas.items() if name.startswith(("SHOAL_", "KV_shoal_"))}
    assert len(shoal) >= 15 and set(shoal.values()) == {3}, shoal


def test_a_nats_node_was_lost_during_the_rolling_update(round_: Report) -> None:
    assert round_.faults == ["nats-n2"]


def test_the_rolling_update_completes(round_: Report) -> None:
    assert round_.problems["rollout"] == []


def test_every_query_replica_lists_exactly_the_buckets(round_: Report) -> None:
    assert round_.problems["views"] == []


def test_no_node_is_bare_or_runs_two_executions(round_: Report) -> None:
    assert round_.problems["placement"] == []


def test_every_submission_is_applied_exactly_once(round_: Report) -> None:
    assert round_.problems["submissions"] == []


def test_every_replica_of_every_service_answers(round_: Report) -> None:
    assert round_.problems["services"] == []


def test_a_lost_compare_and_set_on_a_replicated_bucket_is_a_conflict(tmp_path) -> None:
    """A replicated stream refuses a stale expected sequence with another error code than a single
    server does (10164, not 10071). Either must be a Conflict, the one error every compare-and-set loop
    retries: concurrent read-modify-writes of one key must all land, each loser reading again."""
    import asyncio

    from services.health.windows import HealthWindow
    from shared import subjects as s
    from shared.errors import Conflict
    from shared.natsserver import NatsCluster
    from shared.store import Bucket

    cluster = NatsCluster(tmp_path / "nats").start()

    async def scenario() -> tuple[set[str], int]:
        bus = await _once_elected(cluster.url, replicas=3)
        try:
            windows = Bucket(bus, s.BUCKET_HEALTH, HealthWindow)
            revision = await windows.create("k", HealthWindow(execution_id="e"))
            errors: set[str] = set()

            async def stale_write(i: int) -> None:  # all on the same revision: one wins
                try:
                    await windows.update("k", HealthWindow(execution_id="e", intervals=i), last=revision)
                except Exception as exc:
                    errors.add(type(exc).__name__)

            await asyncio.gather(*(stale_write(i) for i in range(8)))

            def count(w: HealthWindow) -> bool:
                w.intervals += 1
                return True

            before = (await windows.require("k", "window")).value.intervals
            await asyncio.gather(*(windows.mutate("k", count) for _ in range(8)))
            return errors, (await windows.require("k", "window")).value.intervals - before
        finally:
            await bus.close()

    try:
        errors, counted = asyncio.run(scenario())
    finally:
        cluster.stop()
    assert errors == {Conflict.__name__} and counted == 8


def test_ensure_never_lowers_the_replicas_an_operator_raised(tmp_path) -> None:
    import asyncio

    from shared import topology
    from shared.natsserver import NatsCluster

    cluster = NatsCluster(tmp_path / "nats").start()

    async def scenario() -> dict[str, int]:
        bus = await _once_elected(cluster.url, replicas=1)
        try:
            await topology.ensure(bus, replicas=3)  # an operator (or a newer release) raises them
            await topology.ensure(bus, replicas=1)  # an older process starts: it must not lower them
            return {name: await bus.replicas_of(name) for name in await bus.stream_names()}
        finally:
            await bus.close()

    try:
        replicas = asyncio.run(scenario())
    finally:
        cluster.stop()
    assert len(replicas) >= 15 and set(replicas.values()) == {3}, replicas


async def _once_elected(url: str, *, replicas: int):
    """A connection to a new cluster once it has elected its JetStream leader, with the streams and
    buckets made (`replicas` of each)."""
    import asyncio

    from shared import topology
    from shared.transport import Bus

    bus = await Bus.connect(url, name="test", wait=10)
    for _ in range(60):
        try:
            await topology.ensure(bus, replicas=replicas)
            return bus
        except Exception:
            await asyncio.sleep(0.5)
    await bus.close()
    raise AssertionError("the cluster elected no JetStream leader in 30 s")

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


def test_ensure_never_lowers_the_replicas_an_operator_raised(tmp_path) -> None:
    import asyncio

    from shared import topology
    from shared.natsserver import NatsCluster
    from shared.transport import Bus

    cluster = NatsCluster(tmp_path / "nats").start()

    async def scenario() -> dict[str, int]:
        bus = await Bus.connect(cluster.url, name="test", wait=10)
        try:
            for _ in range(60):  # the cluster elects its JetStream leader first
                try:
                    await topology.ensure(bus, replicas=1)
                    break
                except Exception:
                    await asyncio.sleep(0.5)
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

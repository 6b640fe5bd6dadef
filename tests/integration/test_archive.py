"""Superseded, ended executions leave the executions bucket for the archive; the query view keeps them.

A job updated many times must not make what reads its executions (a rollout's load of the job, an
agent's assignments, a scan) grow with its history, and the executions API must still list all of it,
including in a replica rebuilt from the buckets.
"""

from __future__ import annotations

import nats.js.errors
import pytest

from shared import subjects as s
from shared.store import Store
from tests.integration.test_rollouts import job, start, submit, until

pytestmark = pytest.mark.nats


async def updated(cluster, wait_for, nodes: int, versions: int):
    """A job on `nodes` nodes deployed `versions` times, each to the end."""
    api, fleet = await start(cluster, nodes)
    for version in range(1, versions + 1):
        await submit(api, job("svc", strategy="immediate", extra={"description": f"v{version}"}))
        await until(wait_for, api, "svc", lambda st, v=version: st.job_version == v and st.state == "succeeded")
    return api, fleet


async def archived_all_but(store: Store, job_id: str, version: int, wait_for) -> None:
    async def only_latest_left() -> bool:
        live = await store.executions_of_job("default", job_id)
        return bool(live) and {r.value.job_version for r in live} == {version}

    await wait_for(only_latest_left, timeout=20)


async def test_superseded_executions_move_to_the_archive_and_stay_listed(cluster, bus, wait_for) -> None:
    api, _ = await updated(cluster, wait_for, nodes=3, versions=3)
    store = Store(bus)
    job_id = (await api.get_job("svc"))[1].id
    await archived_all_but(store, job_id, 3, wait_for)
    archived = await store.archive.scan(s.executions_of_job("default", job_id))
    assert sorted(r.value.job_version for r in archived) == [1, 1, 1, 2, 2, 2]
    assert all(r.value.observed == "stopped" and r.value.desired == "stopped" for r in archived)
    # Nothing lost: the API lists every version's executions, as they last were.
    listed = await wait_for(lambda: _all_versions(api, 9))
    assert {e.id: e.status.revision for e in listed if e.job_version < 3} == {
        r.value.id: r.value.status.revision for r in archived}
    assert {e.id for e in await store.all_executions()} == {e.id for e in listed}
    # The rollout replica that moved them keeps deciding: a fourth version rolls out and the third is archived.
    await submit(api, job("svc", strategy="immediate", extra={"description": "v4"}))
    await until(wait_for, api, "svc", lambda st: st.job_version == 4 and st.state == "succeeded")
    await archived_all_but(store, job_id, 4, wait_for)
    await wait_for(lambda: _all_versions(api, 12))


async def _all_versions(api, count: int) -> list:
    items = await api.all_executions("svc", all_job_versions=True)
    return items if len(items) == count else []


async def test_an_archive_marker_leaves_the_bucket_and_the_assignments_after_its_ttl(
        cluster, bus, wait_for, monkeypatch) -> None:
    monkeypatch.setattr(s, "ARCHIVE_MARKER_TTL", 1.0)
    api, _ = await updated(cluster, wait_for, nodes=2, versions=2)
    store = Store(bus)
    job_id = (await api.get_job("svc"))[1].id
    await archived_all_but(store, job_id, 2, wait_for)
    old = [r.value for r in await store.archive.scan(s.executions_of_job("default", job_id))]
    assert len(old) == 2

    async def no_trace_left() -> bool:
        for e in old:
            for stream, subject in ((s.kv_stream(s.BUCKET_EXECUTIONS), f"$KV.{s.BUCKET_EXECUTIONS}.{e.key}"),
                                    (s.STREAM_ASSIGNMENTS,
                                     f"{s.ASSIGN_PREFIX}.{e.node_id}.default.{job_id}.{e.id}")):
                try:
                    await bus.js.get_last_msg(stream, subject)
                    return False
                except nats.js.errors.NotFoundError:
                    pass
        return True

    await wait_for(no_trace_left, timeout=15)
    assert len(await api.all_executions("svc", all_job_versions=True)) == 4


async def test_a_move_changes_nothing_when_the_record_changed_or_must_stay(bus) -> None:
    from tests.builders import execution

    store = Store(bus)
    e = execution("n1", observed="stopped", desired="stopped")
    await store.executions.create(e.key, e)
    assert not await store.archive_execution(e.key, lambda current: True)  # must stay
    assert await store.executions.get(e.key) is not None and await store.archive.get(e.key) is None
    assert await store.archive_execution(e.key, lambda current: False)
    assert await store.executions.get(e.key) is None
    assert (await store.archive.get(e.key)).value.id == e.id
    assert not await store.archive_execution(e.key, lambda current: False)  # already moved: nothing to do


async def test_a_replica_rebuilt_from_the_buckets_lists_archived_executions(cluster, bus, wait_for, tmp_path) -> None:
    api, _ = await updated(cluster, wait_for, nodes=2, versions=2)
    store = Store(bus)
    job_id = (await api.get_job("svc"))[1].id
    await archived_all_but(store, job_id, 2, wait_for)
    await cluster.stop([c for c in cluster.components if c.name == "query"][0])
    await bus.purge_stream(s.STREAM_EVENTS)  # what max_age does to events older than 30 days
    await cluster.start("query", db=str(tmp_path / "rebuilt.db"))
    listed = await wait_for(lambda: _all_versions(api, 4))
    assert sorted(e.job_version for e in listed) == [1, 1, 2, 2]


async def test_a_cluster_made_before_archive_markers_gets_message_ttls_on_start(bus) -> None:
    """The assignments stream of an older shoal has no message TTLs: starting this one turns them on (and
    starting it again changes nothing). Buckets get them too (`BucketSpec.msg_ttl`; nats-py 2.16 already
    makes every bucket with them, an older one did not)."""
    import dataclasses

    from shared import topology
    from tests.conftest import wipe

    await wipe(bus)
    for bucket in topology.BUCKETS:
        await bus.ensure_bucket(bucket)
    for stream in topology.STREAMS:
        await bus.ensure_stream(dataclasses.replace(stream, msg_ttl=False))

    async def ttl_allowed() -> list[bool]:
        return [bool((await bus.js.stream_info(name)).config.allow_msg_ttl)
                for name in (s.kv_stream(s.BUCKET_EXECUTIONS), s.STREAM_ASSIGNMENTS)]

    assert await ttl_allowed() == [True, False]
    await topology.ensure(bus)
    assert await ttl_allowed() == [True, True]
    await topology.ensure(bus)
    assert await ttl_allowed() == [True, True]

"""The query service against a real server and a real SQLite file: the view, keyset pages, tokens, restarts.

The second half checks consistent pages: every page of one walk reads the view as of the walk's first
page. The changes between pages go through the buckets, exactly as the services make them, and each
test waits until the view has applied them before it asks for the next page.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import uuid

import pytest

from services.query.view import MAX_WAIT_LAG
from shared import pagetoken
from shared import subjects as s
from shared.api import ListJobExecutionsRequest, ListJobsRequest, ListNodesRequest
from shared.codec import to_json
from shared.durations import to_ns, utcnow
from shared.errors import InvalidInput, NotFound, Unavailable
from shared.models import (
    DesiredState,
    Execution,
    ExecutionStatus,
    Job,
    JobSpec,
    JobState,
    Node,
    NodeState,
    ObservedState,
    Selector,
)
from shared.store import Store

pytestmark = pytest.mark.nats

BASE = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def make_job(namespace: str, name: str, version: int = 1) -> Job:
    spec = JobSpec(name=name, type="pipeline", namespace=namespace, config={"simulate": {}})
    return Job(id=str(uuid.uuid4()), name=name, namespace=namespace, type="pipeline", version=version,
               state=JobState(state_type="running"), spec=spec, created_at=BASE, modified_at=BASE, revision=1)


def make_execution(job: Job, node: str, *, version: int = 1, created: dt.datetime | None = None,
                   state: str = "running") -> Execution:
    at = created or utcnow()
    return Execution(
        id=str(uuid.uuid4()), eval_id="e", job_id=job.id, job_type="pipeline", job_version=version,
        namespace=job.namespace, node_id=node,
        status=ExecutionStatus(created_at=at, updated_at=at, revision=1,
                               desired_state=DesiredState(state_type="running"),
                               observed_state=ObservedState(state_type=state)),  # type: ignore[arg-type]
        job_spec=job.spec,
    )


async def put_job(store: Store, job: Job) -> None:
    await store.jobs.put(s.job_key(job.namespace, job.id), job)


async def put_executions(store: Store, executions: list[Execution]) -> None:
    await asyncio.gather(*(store.executions.put(e.key, e) for e in executions))


async def walk(api, request: ListJobExecutionsRequest) -> list[Execution]:
    items: list[Execution] = []
    token = ""
    while True:
        request.next_token = token
        raw, page = await api.list_executions(request)
        items.extend(page.items)
        if not page.next_token:
            assert b'"next_token"' not in raw  # present only when more exist
            return items
        token = page.next_token


@pytest.fixture
async def query(cluster, bus):
    await cluster.start("query")
    return Store(bus)


async def until_visible(api, job: str, count: int, wait_for, **filters) -> None:
    async def check() -> bool:
        return len(await api.all_executions(job, **filters)) == count

    await wait_for(check)


async def test_walk_returns_every_execution_once_while_inserting(query, cluster, wait_for) -> None:
    store = query
    api = await cluster.api("prod")
    job = make_job("prod", "ingest")
    await put_job(store, job)
    before = [make_execution(job, f"n{i % 7}", created=BASE + dt.timedelta(seconds=i)) for i in range(230)]
    await put_executions(store, before)
    await until_visible(api, "ingest", 230, wait_for)

    async def insert_more() -> list[Execution]:
        extra = []
        for i in range(8):
            batch = [make_execution(job, "late", created=utcnow()) for _ in range(12)]
            await put_executions(store, batch)
            extra += batch
            await asyncio.sleep(0.02)
        return extra

    inserter = asyncio.create_task(insert_more())
    seen: list[Execution] = []
    token = ""
    while True:
        raw, page = await api.list_executions(ListJobExecutionsRequest(job="ingest", limit=17, next_token=token))
        seen.extend(page.items)
        await asyncio.sleep(0.01)
        if not page.next_token:
            break
        token = page.next_token
    extra = await inserter
    ids = [e.id for e in seen]
    assert len(ids) == len(set(ids)), "an execution appeared twice"
    assert {e.id for e in before} <= set(ids), "an execution that existed before the walk was skipped"
    assert set(ids) <= {e.id for e in before + extra}
    created = [(e.status.created_at, e.id) for e in seen]
    assert created == sorted(created)


async def test_order_reverse_and_updated_at(query, cluster, wait_for) -> None:
    store, api = query, await cluster.api()
    job = make_job("default", "ordered")
    await put_job(store, job)
    executions = [make_execution(job, "a", created=BASE + dt.timedelta(minutes=i)) for i in range(25)]
    # updated_at in the opposite order of created_at
    for i, e in enumerate(executions):
        e.status.updated_at = BASE + dt.timedelta(hours=1, minutes=25 - i)
    await put_executions(store, executions)
    await until_visible(api, "ordered", 25, wait_for)
    forward = await walk(api, ListJobExecutionsRequest(job="ordered", limit=4))
    backward = await walk(api, ListJobExecutionsRequest(job="ordered", limit=4, reverse=True))
    by_update = await walk(api, ListJobExecutionsRequest(job="ordered", limit=6, order_by="updated_at"))
    assert [e.id for e in forward] == [e.id for e in executions]
    assert [e.id for e in backward] == [e.id for e in reversed(executions)]
    assert [e.id for e in by_update] == [e.id for e in reversed(executions)]


async def test_filters_versions_nodes_states_and_namespaces(query, cluster, wait_for) -> None:
    store, api = query, await cluster.api("prod")
    job = make_job("prod", "etl", version=2)
    other = make_job("staging", "etl")
    await put_job(store, job)
    await put_job(store, other)
    v1 = [make_execution(job, f"n{i}", version=1, state="stopped") for i in range(3)]
    v2 = [make_execution(job, f"n{i}", version=2, state="running" if i else "failed") for i in range(3)]
    staged = [make_execution(other, "n0")]
    await put_executions(store, v1 + v2 + staged)
    await until_visible(api, "etl", 6, wait_for, all_job_versions=True)

    latest = await walk(api, ListJobExecutionsRequest(job="etl"))
    assert {e.id for e in latest} == {e.id for e in v2}  # default: the latest version only
    assert {e.id for e in await walk(api, ListJobExecutionsRequest(job=job.id, job_version=1))} == {e.id for e in v1}
    assert len(await walk(api, ListJobExecutionsRequest(job="etl", all_job_versions=True))) == 6
    on_n0 = await walk(api, ListJobExecutionsRequest(job="etl", all_job_versions=True, node_id="n0"))
    assert {e.node_id for e in on_n0} == {"n0"} and len(on_n0) == 2
    failed = await walk(api, ListJobExecutionsRequest(job="etl", state="failed"))
    assert [e.id for e in failed] == [v2[0].id]
    one = json.loads(await api.bus.request(s.api("prod", s.EXECUTIONS_GET), to_json({"id": v2[1].id})))
    assert one["execution"]["id"] == v2[1].id and one["execution"]["node_id"] == "n1"
    with pytest.raises(NotFound):  # another namespace's execution is not found here
        await api.bus.request(s.api("prod", s.EXECUTIONS_GET), to_json({"id": staged[0].id}))
    # No job: the whole namespace, every version; never another namespace's executions.
    everything = await walk(api, ListJobExecutionsRequest())
    assert {e.id for e in everything} == {e.id for e in v1 + v2}
    staging = await cluster.api("staging")
    assert [e.id for e in await walk(staging, ListJobExecutionsRequest(job="etl"))] == [staged[0].id]


async def test_bad_requests_are_400_with_the_field(query, cluster, wait_for) -> None:
    store, api = query, await cluster.api()
    job = make_job("default", "paged")
    await put_job(store, job)
    await put_executions(store, [make_execution(job, "n", created=BASE + dt.timedelta(seconds=i)) for i in range(5)])
    await until_visible(api, "paged", 5, wait_for)
    bus = api.bus
    subject = s.api("default", s.EXECUTIONS_LIST)

    async def error_of(body: bytes) -> InvalidInput:
        with pytest.raises(InvalidInput) as err:
            await bus.request(subject, body)
        return err.value

    assert (await error_of(b'{"job":"paged","limit":0}')).field == "limit"
    assert (await error_of(b'{"job":"paged","limit":1001}')).field == "limit"
    unknown_order = await error_of(b'{"job":"paged","order_by":"name"}')
    assert unknown_order.field == "order_by" and "created_at" in unknown_order.message
    assert (await error_of(b'{"job":"paged","colour":"red"}')).field == "colour"
    assert (await error_of(b'{"job":"paged","limit":"ten"}')).field == "limit"
    assert (await error_of(b"[1,2")).code == 400
    assert (await error_of(b'{"job_version":2}')).field == "job_version"
    assert (await error_of(b'{"job":"paged","job_version":0}')).field == "job_version"

    _, first = await api.list_executions(ListJobExecutionsRequest(job="paged", limit=2))
    token = first.next_token
    assert token
    flipped = token[:5] + ("A" if token[5] != "A" else "B") + token[6:]
    assert (await error_of(to_json({"job": "paged", "limit": 2, "next_token": flipped}))).field == "next_token"
    mismatch = await error_of(to_json({"job": "paged", "limit": 2, "next_token": token, "reverse": True}))
    assert mismatch.field == "next_token" and "other filters" in mismatch.message
    assert (await error_of(b'{"job":"paged","next_token":"garbage"}')).field == "next_token"
    with pytest.raises(NotFound):
        await bus.request(subject, b'{"job":"missing"}')
    # The service kept serving through all of that, and the token still works with its own filters
    # (the page size may change between pages).
    _, second = await api.list_executions(ListJobExecutionsRequest(job="paged", limit=3, next_token=token))
    assert len(second.items) == 3 and not second.next_token


async def test_restart_resumes_without_loss_or_duplicates(cluster, bus, wait_for, tmp_path) -> None:
    store = Store(bus)
    db = str(tmp_path / "view.db")
    first = await cluster.start("query", db=db)
    api = await cluster.api()
    job = make_job("default", "durable")
    await put_job(store, job)
    batch1 = [make_execution(job, "a") for _ in range(40)]
    await put_executions(store, batch1)
    await until_visible(api, "durable", 40, wait_for)
    await cluster.stop(first)

    batch2 = [make_execution(job, "b") for _ in range(40)]
    await put_executions(store, batch2)
    changed = batch1[0]
    changed.status.observed_state = ObservedState(state_type="completed")
    changed.status.revision = 2
    await store.executions.put(changed.key, changed)
    # An older revision arriving late must not win.
    stale = make_execution(job, "a")
    stale.id, stale.status.revision = changed.id, 1
    await store.executions.put(stale.key, stale)

    await cluster.start("query", db=db)
    await until_visible(api, "durable", 80, wait_for)
    items = await api.all_executions("durable")
    assert len({e.id for e in items}) == 80 == len(items)
    assert next(e for e in items if e.id == changed.id).observed == "completed"

    # A restarted replica resumes after the last event its view committed (it keeps no durable consumer).
    await cluster.stop([c for c in cluster.components if c.name == "query"][0])
    assert await bus.consumer_count(s.STREAM_EVENTS) == 0
    batch3 = [make_execution(job, "c") for _ in range(5)]
    await put_executions(store, batch3)
    await cluster.start("query", db=db)
    await until_visible(api, "durable", 85, wait_for)


async def test_jobs_and_nodes_reads(query, cluster, bus, wait_for) -> None:
    store, api = query, await cluster.api()
    jobs = [make_job("default", f"job-{i:02d}") for i in range(7)]
    for i, job in enumerate(jobs):
        job.created_at = job.modified_at = BASE + dt.timedelta(seconds=i)
        await put_job(store, job)
    now = utcnow()
    for i in range(6):
        labels = {"region": ["east", "west"][i % 2], "tier": "edge"}
        if i == 5:
            labels["gpu"] = "true"
        node = Node(id=f"node-{i}", labels=labels, state=NodeState(state_type="ready" if i else "disconnected"),
                    registered_at=now, updated_at=now, revision=1)
        await store.nodes.put(node.id, node)

    async def all_jobs() -> list:
        items, token = [], ""
        while True:
            _, page = await api.list_jobs(ListJobsRequest(limit=3, next_token=token))
            items += page.items
            if not page.next_token:
                return items
            token = page.next_token

    await wait_for(lambda: _len_is(all_jobs, 7))
    assert [j.name for j in await all_jobs()] == [j.name for j in jobs]
    _, by_name = await api.get_job("job-03")
    _, by_id = await api.get_job(jobs[3].id)
    assert by_name.id == by_id.id == jobs[3].id
    with pytest.raises(NotFound):
        await api.get_job("job-99")
    with pytest.raises(InvalidInput) as bad_state:
        await api.list_jobs(ListJobsRequest(state="sleeping"))  # type: ignore[arg-type]
    assert bad_state.value.field == "state" and "rollout_failed" in bad_state.value.message
    _, running = await api.list_jobs(ListJobsRequest(state="running", type="pipeline", limit=100))
    assert len(running.items) == 7

    async def nodes(selector: Selector | None = None, state=None, limit=None) -> list[str]:
        out, token = [], ""
        while True:
            _, page = await api.list_nodes(ListNodesRequest(selector=selector, state=state, limit=limit,
                                                            next_token=token))
            out += [n.id for n in page.items]
            if not page.next_token:
                return out
            token = page.next_token

    await wait_for(lambda: _len_is(nodes, 6))
    assert await nodes(Selector(match_expressions=["region=east"])) == ["node-0", "node-2", "node-4"]
    assert await nodes(Selector(match_expressions=["region in (east,west)", "!gpu"]), limit=2) == [
        "node-0", "node-1", "node-2", "node-3", "node-4"]
    assert await nodes(Selector(match_labels={"region": "west"}, match_ids=["node-1", "node-2"])) == ["node-1"]
    assert await nodes(state="disconnected") == ["node-0"]
    with pytest.raises(InvalidInput) as err:
        await api.list_nodes(ListNodesRequest(selector=Selector(match_expressions=["region in (a"])))
    assert err.value.field == "selector.match_expressions[0]"


async def _len_is(fetch, n: int) -> bool:
    return len(await fetch()) == n


def test_page_reply_is_valid_json() -> None:
    from services.query.service import page_reply

    assert json.loads(page_reply([b'{"a":1}', b'{"b":2}'], "tok")) == {"items": [{"a": 1}, {"b": 2}], "next_token": "tok"}
    assert json.loads(page_reply([], "")) == {"items": []}


async def test_a_page_stops_early_rather_than_exceed_what_a_reply_may_carry(query, cluster, wait_for) -> None:
    store, api = query, await cluster.api()
    job = make_job("default", "big")
    job.spec.description = "x" * 300
    await put_job(store, job)
    executions = [make_execution(job, f"n{i}") for i in range(900)]
    for i in range(0, 900, 300):
        await put_executions(store, executions[i:i + 300])
    await until_visible(api, "big", 900, wait_for)
    raw, page = await api.list_executions(ListJobExecutionsRequest(job="big", limit=1000))
    # More than a request may be, and as much as one reply may carry: the page stops early, with a token.
    assert 512 * 1024 < len(raw) <= api.bus.max_payload
    assert 0 < len(page.items) < 900 and page.next_token
    walked = await walk(api, ListJobExecutionsRequest(job="big", limit=1000))
    assert sorted(e.id for e in walked) == sorted(e.id for e in executions)


async def test_an_undecodable_event_is_dropped_and_the_view_keeps_up(query, cluster, bus, wait_for, caplog) -> None:
    from shared.transport import Kv

    store, api = query, await cluster.api()
    job = make_job("default", "poison")
    await put_job(store, job)
    await Kv(bus, s.BUCKET_EXECUTIONS).put(f"default.{job.id}.n.not-an-execution", b"\xc1 not msgpack")
    await put_executions(store, [make_execution(job, "n") for _ in range(3)])
    await until_visible(api, "poison", 3, wait_for)
    assert any("dropping undecodable" in r.message for r in caplog.records)
    # Readers of the bucket skip it as well instead of failing on it.
    assert len(await store.executions_of_job("default", job.id)) == 3


# -- consistent pages -------------------------------------------------------------------------------


async def revision_visible(api, execution: Execution, wait_for) -> None:
    async def check() -> bool:
        raw = await api.bus.request(s.api(api.namespace, s.EXECUTIONS_GET), to_json({"id": execution.id}))
        return json.loads(raw)["execution"]["status"]["revision"] == execution.status.revision

    await wait_for(check)


async def change(store: Store, api, execution: Execution, wait_for, state: str) -> None:
    execution.status.revision += 1
    execution.status.updated_at = utcnow()
    execution.status.observed_state = ObservedState(state_type=state)  # type: ignore[arg-type]
    await store.executions.put(execution.key, execution)
    await revision_visible(api, execution, wait_for)


async def gone(api, execution: Execution, wait_for) -> None:
    async def check() -> bool:
        try:
            await api.bus.request(s.api(api.namespace, s.EXECUTIONS_GET), to_json({"id": execution.id}))
        except Exception as exc:
            return getattr(exc, "code", None) == 404
        return False

    await wait_for(check)


async def seeded(cluster, bus, wait_for, name: str, count: int):
    """A query service, and a job with `count` executions (created a second apart) that it lists."""
    await cluster.start("query")
    store, api = Store(bus), await cluster.api()
    job = make_job("default", name)
    await put_job(store, job)
    executions = [make_execution(job, f"n{i}", created=BASE + dt.timedelta(seconds=i)) for i in range(count)]
    await put_executions(store, executions)
    await until_visible(api, name, count, wait_for)
    return store, api, job, executions


@pytest.mark.parametrize("reverse", [False, True])
async def test_a_walk_by_updated_at_sees_its_first_moment_while_rows_change(cluster, bus, wait_for,
                                                                           reverse: bool) -> None:
    store, api, job, executions = await seeded(cluster, bus, wait_for, "moving", 40)
    before = {e.id: e.status.revision for e in executions}
    by_update = sorted(executions, key=lambda e: (e.status.updated_at, e.id), reverse=reverse)

    request = ListJobExecutionsRequest(job="moving", limit=6, order_by="updated_at", reverse=reverse,
                                       state="running")
    seen: list[Execution] = []
    _, page = await api.list_executions(request)
    seen += page.items
    pages = 1
    while page.next_token:
        done = {e.id for e in seen}
        # Between pages: one row already seen and one not yet seen change state (each moves to the
        # newest end of the order and leaves the `running` filter), one unseen row is deleted, and a
        # new row is inserted.
        ahead = [e for e in by_update if e.id not in done]
        behind = [e for e in by_update if e.id in done]
        await change(store, api, behind[pages % len(behind)], wait_for, "failed")
        if len(ahead) > 2:
            await change(store, api, ahead[-1], wait_for, "completed")
            await store.executions.kv.delete(ahead[-2].key)
            await gone(api, ahead[-2], wait_for)
        await put_executions(store, [make_execution(job, "late")])
        request.next_token = page.next_token
        _, page = await api.list_executions(request)
        seen += page.items
        pages += 1

    assert pages == 7
    assert [e.id for e in seen] == [e.id for e in by_update], "not exactly the rows of the first moment, in order"
    assert all(e.observed == "running" and e.status.revision == before[e.id] for e in seen), \
        "a page showed a row as it is now, not as it was when the walk began"
    # A new walk sees the present: fewer running rows, and the inserted ones.
    now = await api.all_executions("moving", state="running")
    assert len(now) < 40 and any(e.node_id == "late" for e in now)


async def test_a_new_job_version_mid_walk_does_not_break_the_walk(cluster, bus, wait_for) -> None:
    store, api, job, v1 = await seeded(cluster, bus, wait_for, "upgrading", 12)

    _, first = await api.list_executions(ListJobExecutionsRequest(job="upgrading", limit=5))
    job.version, job.revision = 2, 2
    await put_job(store, job)
    v2 = [make_execution(job, f"n{i}", version=2) for i in range(12)]
    await put_executions(store, v2)
    await until_visible(api, "upgrading", 12, wait_for, job_version=2)

    seen = list(first.items)
    token = first.next_token
    while token:
        _, page = await api.list_executions(ListJobExecutionsRequest(job="upgrading", limit=5, next_token=token))
        seen += page.items
        token = page.next_token
    assert [e.id for e in seen] == [e.id for e in v1]
    # A new walk lists the version that is latest now.
    assert {e.id for e in await api.all_executions("upgrading")} == {e.id for e in v2}


async def test_job_and_node_listings_are_snapshots_too(cluster, bus, wait_for) -> None:
    await cluster.start("query")
    store, api = Store(bus), await cluster.api()
    jobs = [make_job("default", f"j{i:02d}") for i in range(6)]
    for i, job in enumerate(jobs):
        job.created_at = job.modified_at = BASE + dt.timedelta(seconds=i)
        await put_job(store, job)
    now = utcnow()
    nodes = [Node(id=f"edge-{i:02d}", labels={"site": "a"}, state=NodeState(state_type="ready"), revision=1,
                  registered_at=now, updated_at=now) for i in range(6)]
    for node in nodes:
        await store.nodes.put(node.id, node)

    async def listed() -> bool:
        _, js = await api.list_jobs(ListJobsRequest(limit=100))
        _, ns = await api.list_nodes(ListNodesRequest(limit=100))
        return len(js.items) == 6 and len(ns.items) == 6

    await wait_for(listed)
    _, jobs_page = await api.list_jobs(ListJobsRequest(limit=2, order_by="modified_at"))
    _, nodes_page = await api.list_nodes(ListNodesRequest(limit=2, state="ready"))
    # Touch a job that was already listed (it moves to the end of modified_at) and drain a node not yet
    # listed (it leaves the ready filter).
    jobs[0].modified_at, jobs[0].revision = utcnow(), 2
    await put_job(store, jobs[0])
    nodes[4].state, nodes[4].revision = NodeState(state_type="disconnected"), 2
    await store.nodes.put(nodes[4].id, nodes[4])

    async def applied() -> bool:
        _, js = await api.list_jobs(ListJobsRequest(limit=100, order_by="modified_at"))
        _, ns = await api.list_nodes(ListNodesRequest(limit=100, state="ready"))
        return js.items[-1].id == jobs[0].id and len(ns.items) == 5

    await wait_for(applied)

    async def rest_of(first, list_page, request) -> list[str]:
        ids, token = [item.id for item in first.items], first.next_token
        while token:
            request.next_token = token
            _, page = await list_page(request)
            ids += [item.id for item in page.items]
            token = page.next_token
        return ids

    assert await rest_of(jobs_page, api.list_jobs, ListJobsRequest(limit=2, order_by="modified_at")) == \
        [j.id for j in jobs]
    assert await rest_of(nodes_page, api.list_nodes, ListNodesRequest(limit=2, state="ready")) == \
        [n.id for n in nodes]


async def test_a_token_older_than_the_retention_is_a_400_and_a_fresh_walk_works(cluster, bus, wait_for) -> None:
    cluster.settings.page_retention = 0.5
    store, api, job, executions = await seeded(cluster, bus, wait_for, "old", 10)
    _, first = await api.list_executions(ListJobExecutionsRequest(job="old", limit=3))
    assert first.next_token

    # Keep changing rows for longer than the retention: the view forgets what the token needs.
    async def expired() -> bool:
        await change(store, api, executions[-1], wait_for, "running")
        try:
            await api.list_executions(ListJobExecutionsRequest(job="old", limit=3, next_token=first.next_token))
        except InvalidInput as exc:
            assert exc.field == "next_token" and "expired" in exc.message
            return True
        await asyncio.sleep(0.3)
        return False

    await wait_for(expired, timeout=20)
    assert len(await api.all_executions("old")) == 10


async def test_a_new_replica_fills_from_the_buckets_when_the_stream_no_longer_holds_everything(
        cluster, bus, wait_for, tmp_path) -> None:
    """EVENTS keeps 30 days, the buckets keep everything: a replica started later must still see it all."""
    store = Store(bus)
    first = await cluster.start("query", db=str(tmp_path / "first.db"))
    api = await cluster.api()
    job = make_job("default", "longlived")
    await put_job(store, job)
    old = [make_execution(job, f"n{i}", created=BASE + dt.timedelta(seconds=i)) for i in range(30)]
    await put_executions(store, old)
    await until_visible(api, "longlived", 30, wait_for)
    await store.executions.kv.delete(old[0].key)  # gone before the stream lost its history
    await gone(api, old[0], wait_for)
    _, before = await api.list_executions(ListJobExecutionsRequest(job="longlived", limit=5))
    await cluster.stop(first)

    await bus.purge_stream(s.STREAM_EVENTS)  # what max_age does to events older than 30 days
    changed = old[1]
    changed.status.revision += 1
    changed.status.observed_state = ObservedState(state_type="completed")
    await store.executions.put(changed.key, changed)  # an event after the purge, on an old record
    new = [make_execution(job, "later", created=utcnow()) for _ in range(5)]
    await put_executions(store, new)

    second = await cluster.start("query", db=str(tmp_path / "second.db"))
    await until_visible(api, "longlived", 34, wait_for)
    items = {e.id: e for e in await api.all_executions("longlived")}
    assert set(items) == {e.id for e in old[1:] + new}  # nothing lost, the deleted one not back
    assert items[changed.id].observed == "completed"
    _, job_page = await api.list_jobs(ListJobsRequest())
    assert [j.id for j in job_page.items] == [job.id]
    # It follows the stream from where it filled in: a later change arrives as usual.
    later = old[2]
    later.status.revision += 1
    later.status.observed_state = ObservedState(state_type="failed")
    await store.executions.put(later.key, later)
    await revision_visible(api, later, wait_for)
    # A walk begun before the fill cannot be continued here (its moment is not in this view), and says so.
    with pytest.raises(InvalidInput) as info:
        await api.list_executions(ListJobExecutionsRequest(job="longlived", limit=5, next_token=before.next_token))
    assert info.value.field == "next_token" and "expired" in info.value.message
    await cluster.stop(second)


async def test_a_token_from_a_replica_far_ahead_is_a_retryable_503_not_a_wrong_page(cluster, bus, wait_for) -> None:
    """Another replica issued the token at a sequence this view has not reached: answer 503 (retry), never
    a page read as of a moment this view does not have."""
    store, api, job, executions = await seeded(cluster, bus, wait_for, "ahead", 6)
    query = [c for c in cluster.components if c.name == "query"][0]
    far = query.view.last_seq + MAX_WAIT_LAG + 1
    scope = pagetoken.scope("executions", "default", "ahead", None, False, "", None, "created_at", False)
    first = executions[0]
    token = pagetoken.encode(query.token_key, scope, [far, to_ns(first.status.created_at), first.id, job.id, 1])
    with pytest.raises(Unavailable) as info:
        await api.list_executions(ListJobExecutionsRequest(job="ahead", next_token=token))
    assert info.value.code == 503 and info.value.retryable
    # The same position at the view's own sequence is an ordinary next page.
    token = pagetoken.encode(query.token_key, scope, [query.view.last_seq, to_ns(first.status.created_at), first.id,
                                                      job.id, 1])
    _, page = await api.list_executions(ListJobExecutionsRequest(job="ahead", next_token=token))
    assert [e.id for e in page.items] == [e.id for e in executions[1:]]


async def test_a_view_file_from_another_events_stream_is_rebuilt(cluster, bus, wait_for, tmp_path) -> None:
    """A view reused against a new stream (a wiped NATS store) must not skip the new stream's events."""
    from tests.conftest import wipe
    from shared import topology

    store = Store(bus)
    db = str(tmp_path / "view.db")
    first = await cluster.start("query", db=db)
    api = await cluster.api()
    old = make_job("default", "before-wipe")
    await put_job(store, old)
    await put_executions(store, [make_execution(old, f"n{i}") for i in range(30)])
    await until_visible(api, "before-wipe", 30, wait_for)
    await cluster.stop(first)

    await wipe(bus)  # the store is wiped; the new stream's sequences start again at 1
    await topology.ensure(bus)
    new = make_job("default", "after-wipe")
    await put_job(store, new)
    fresh = [make_execution(new, f"m{i}") for i in range(5)]
    await put_executions(store, fresh)

    await cluster.start("query", db=db)
    await until_visible(api, "after-wipe", 5, wait_for)
    assert sorted(e.id for e in await api.all_executions("")) == sorted(e.id for e in fresh)
    with pytest.raises(NotFound):
        await api.get_job("before-wipe")


async def test_a_new_replica_says_once_when_it_has_caught_up_with_the_stream(cluster, bus, wait_for, caplog) -> None:
    store = Store(bus)
    job = make_job("default", "catching-up")
    await put_job(store, job)
    await put_executions(store, [make_execution(job, f"n{i}") for i in range(30)])

    async def sourced() -> int:
        last = (await bus.stream_info(s.STREAM_EVENTS))["last_seq"]
        return last if last >= 31 else 0

    last = await wait_for(sourced)
    with caplog.at_level(logging.INFO, logger="services.query.service"):
        query = await cluster.start("query")

        async def caught_up() -> bool:
            return query.caught_up is not None

        await wait_for(caught_up)
        await put_executions(store, [make_execution(job, "later")])  # following the stream is not catching up
        await until_visible(await cluster.api(), "catching-up", 31, wait_for)
    events, wall, cpu = query.caught_up
    assert events >= last and wall > 0 and cpu > 0
    said = [r.getMessage() for r in caplog.records if "caught up with the events stream" in r.getMessage()]
    assert len(said) == 1 and f"{events} events in" in said[0]


async def test_a_batch_whose_write_failed_is_read_again_not_lost(query, cluster, wait_for) -> None:
    store, api = query, await cluster.api()
    service = [c for c in cluster.components if c.name == "query"][0]
    apply = service.view.apply
    failed: list[int] = []

    async def failing_once(events):
        if not failed and any(e.subject.startswith(s.EVENTS_EXECUTION) for e in events):
            failed.append(len(events))
            raise OSError("disk I/O error")
        await apply(events)

    service.view.apply = failing_once
    job = make_job("default", "retried")
    await put_job(store, job)
    executions = [make_execution(job, f"n{i}") for i in range(20)]
    await put_executions(store, executions)
    # The follower crashed on the batch and was started again; it reads that batch again from the stream.
    await until_visible(api, "retried", 20, wait_for)
    assert failed
    assert sorted(e.id for e in await api.all_executions("retried")) == sorted(e.id for e in executions)

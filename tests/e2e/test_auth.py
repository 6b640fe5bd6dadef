"""Every identity confined to what is its own, against the running services (`Stack(auth=True)`, the
identities of `shoal auth init`).

For each identity, allowed actions work and forbidden ones are refused by the server itself: the
server answers a forbidden publish or subscription with "Permissions Violation" (recorded by the
connection) and drops it, so no service ever sees it. One test per action.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from pathlib import Path

import pytest

from services.cli.client import Client
from services.cli.stack import Stack
from shared import subjects as s
from shared.codec import to_json, to_msgpack
from shared.errors import ShoalError
from shared.models import FleetHeartbeat, Heartbeat, StateReport
from shared.transport import Bus, Credentials

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

ENV = {"SHOAL_HEARTBEAT_INTERVAL": "0.5", "SHOAL_NODE_TIMEOUT": "3", "SHOAL_SWEEP_INTERVAL": "0.25"}
JOB = {"name": "probe", "type": "query", "config": {"command": ["sh", "-c", "echo ok"]}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Stack:
    st = Stack(tmp_path_factory.mktemp("auth") / "stack", nodes=2, env=ENV, auth=True,
               tenants=("default", "team-a", "team-b"), gateway=True).start()
    try:
        async def ready() -> None:
            from services.cli.stackcmd import wait_gateway

            bus = await Bus.connect(st.nats_url, name="ready", wait=10, credentials=st.credentials())
            try:
                await Client(bus).wait_ready(2, timeout=60)
                await wait_gateway(st.dashboard_url, 60)
            finally:
                await bus.close()

        asyncio.run(ready())
        yield st
    finally:
        st.stop()


def as_(stack: Stack, kind: str, name: str) -> Credentials:
    return Credentials(nkey=str(stack.seed(kind, name)))


async def connect(stack: Stack, kind: str, name: str) -> Bus:
    return await Bus.connect(stack.nats_url, name=f"{kind}-{name}", wait=10, credentials=as_(stack, kind, name))


async def refused(bus: Bus, subject_part: str) -> bool:
    """Whether the server has refused something of this connection naming `subject_part`."""
    for _ in range(20):
        await bus.nc.flush()
        await bus.nc.flush()  # (a second ping: the first can overtake commands still being written)
        if any(subject_part.lower() in v.lower() for v in bus.violations):
            return True
        await asyncio.sleep(0.05)
    return False


def run(coro):
    return asyncio.run(coro)


def assert_refused(stack: Stack, kind: str, name: str, subject: str, body: bytes | None) -> None:
    """The identity `kind`/`name` publishes `body` on `subject` (subscribes to it, with `body` None), and the
    server refuses it."""
    async def scenario() -> None:
        bus = await connect(stack, kind, name)
        try:
            if body is None:
                await bus.nc.subscribe(subject)
            else:
                await bus.nc.publish(subject, body)
            assert await refused(bus, subject), bus.violations
        finally:
            await bus.close()

    run(scenario())


# -- anonymous ----------------------------------------------------------------------------------------


def test_an_anonymous_client_is_refused(stack: Stack) -> None:
    with pytest.raises(ShoalError):
        run(Bus.connect(stack.nats_url, name="anonymous", wait=2))


# -- tenants ------------------------------------------------------------------------------------------


def test_a_tenant_submits_to_and_reads_its_own_namespace(stack: Stack) -> None:
    async def scenario() -> None:
        bus = await connect(stack, "tenant", "team-a")
        try:
            client = Client(bus, "team-a", timeout=10)
            outcome = await client.submit(JOB)
            assert not isinstance(outcome, str) and outcome.accepted
            for _ in range(100):
                try:
                    _, job = await client.get_job("probe")
                    break
                except ShoalError:
                    await asyncio.sleep(0.2)
            assert job.namespace == "team-a"
            _, page = await client.list_executions(__import__("shared.api").api.ListJobExecutionsRequest(job="probe"))
            assert all(e.namespace == "team-a" for e in page.items)
            assert not bus.violations
        finally:
            await bus.close()

    run(scenario())


@pytest.mark.parametrize("subject", [s.submit("team-b"), s.api("team-b", s.JOBS_LIST), s.api("team-b", s.JOBS_STOP),
                                     s.api("team-b", s.ROLLOUT_ABORT), s.NODES_LIST, s.DEAD_LETTERS_LIST,
                                     s.report("node-1"), s.heartbeat("node-1"),
                                     s.node_register("node-9", s.labels_digest({})),
                                     f"$KV.{s.BUCKET_EXECUTIONS}.team-a.job.node-1.e1",
                                     f"$JS.API.DIRECT.GET.KV_{s.BUCKET_CONFIG}.$KV.{s.BUCKET_CONFIG}.page-token-key",
                                     f"$JS.API.STREAM.INFO.{s.STREAM_EVENTS}",
                                     f"$JS.API.CONSUMER.CREATE.{s.STREAM_EVENTS}.spy.shoal.events.>"])
def test_a_tenant_cannot_publish_outside_its_namespace(stack: Stack, subject: str) -> None:
    assert_refused(stack, "tenant", "team-a", subject, b"{}")


@pytest.mark.parametrize("subject", [f"{s.SUBMITTED_PREFIX}.team-b.>", "_INBOX.>", f"{s.EVENTS_PREFIX}.>",
                                     f"{s.ASSIGN_PREFIX}.>", s.heartbeat("*")])
def test_a_tenant_cannot_listen_to_what_is_not_its_own(stack: Stack, subject: str) -> None:
    assert_refused(stack, "tenant", "team-a", subject, None)


def test_a_tenant_does_not_receive_another_tenants_replies(stack: Stack) -> None:
    """Each identity's replies come to its own inbox, which no other may subscribe to."""
    async def scenario() -> None:
        a = await connect(stack, "tenant", "team-a")
        b = await connect(stack, "tenant", "team-b")
        try:
            b_inbox = b.nc._inbox_prefix.decode()
            assert b_inbox != a.nc._inbox_prefix.decode() and b_inbox.startswith("_INBOX.U")
            await a.nc.subscribe(f"{b_inbox}.>")
            assert await refused(a, b_inbox)
            await Client(b, "team-b").list_jobs(__import__("shared.api").api.ListJobsRequest())  # works for b
        finally:
            await a.close()
            await b.close()

    run(scenario())


# -- admin --------------------------------------------------------------------------------------------


def test_the_admin_reads_every_namespace_nodes_and_dead_letters(stack: Stack) -> None:
    async def scenario() -> None:
        bus = await connect(stack, "admin", "admin")
        try:
            for ns in ("team-a", "team-b", "default"):
                await bus.request(s.api(ns, s.JOBS_LIST), b"{}")
            page = json.loads(await bus.request(s.NODES_LIST, b"{}"))
            assert {n["id"] for n in page["items"]} >= {"node-1", "node-2"}
            await bus.request(s.DEAD_LETTERS_LIST, b"{}")
            await bus.request(s.service_ping(s.SERVICE_QUERY), b"")
            assert not bus.violations
        finally:
            await bus.close()

    run(scenario())


def test_the_admin_cannot_register_a_node_or_write_a_bucket(stack: Stack) -> None:
    async def scenario() -> None:
        bus = await connect(stack, "admin", "admin")
        try:
            subject = s.node_register("node-1", s.labels_digest({"evil": "yes"}))
            await bus.nc.publish(subject, b"{}")
            assert await refused(bus, subject)
            await bus.nc.publish(f"$KV.{s.BUCKET_NODES}.node-1", b"x")
            assert await refused(bus, f"$KV.{s.BUCKET_NODES}")
        finally:
            await bus.close()

    run(scenario())


# -- nodes --------------------------------------------------------------------------------------------


def test_a_node_registers_heartbeats_and_reports_as_itself(stack: Stack) -> None:
    """node-1's agent is running with node-1's identity: it is ready and its work completes."""
    async def scenario() -> None:
        bus = await connect(stack, "admin", "admin")
        try:
            client = Client(bus, "default", timeout=10)
            outcome = await client.submit({**JOB, "name": "on-node-1", "selector": {"match_ids": ["node-1"]}})
            assert not isinstance(outcome, str) and outcome.accepted
            deadline = time.monotonic() + 60
            while True:
                try:
                    _, job = await client.get_job("on-node-1")
                    if job.state.state_type == "completed":
                        break
                except ShoalError:
                    pass
                assert time.monotonic() < deadline, "the job on node-1 never completed"
                await asyncio.sleep(0.3)
        finally:
            await bus.close()

    run(scenario())


def test_a_node_pulls_its_own_assignments_only(stack: Stack) -> None:
    async def scenario() -> None:
        bus = await connect(stack, "node", "node-1")
        try:
            own = await bus.js.pull_subscribe_bind(consumer=s.assign_consumer("node-1"), stream=s.STREAM_ASSIGNMENTS)
            try:
                await own.fetch(1, timeout=1)
            except Exception:
                pass  # nothing new for it: what matters is that the server let it ask
            assert not await refused(bus, s.assign_consumer("node-1"))
            other = await bus.js.pull_subscribe_bind(consumer=s.assign_consumer("node-2"), stream=s.STREAM_ASSIGNMENTS)
            try:
                await other.fetch(1, timeout=1)
            except Exception:
                pass
            assert await refused(bus, s.pull_next(s.assign_consumer("node-2")))
        finally:
            await bus.close()

    run(scenario())


# Bodies of the parametrized cases are built at collection: a fixed time keeps their ids the same in
# every collecting process (pytest-xdist compares them).
AT = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def report_for(node: str) -> bytes:
    return to_msgpack(StateReport(namespace="default", job_id="j", node_id=node, execution_id="e", state="failed",
                                  at=AT))


@pytest.mark.parametrize(("subject", "body"), [
    (s.node_register("node-2", s.labels_digest({})), b"{}"),
    (s.heartbeat("node-2"), to_msgpack(Heartbeat(node_id="node-2", at=AT))),
    (s.fleet_heartbeat("fleet"), to_msgpack(FleetHeartbeat(fleet="fleet", node_ids=["node-2"], at=AT))),
    (s.report("node-2"), report_for("node-2")),
    (f"$KV.{s.BUCKET_EXECUTIONS}.default.j.node-1.e", b"x"),
    (f"$KV.{s.BUCKET_NODES}.node-1", b"x"),
    (f"$JS.API.CONSUMER.CREATE.{s.STREAM_ASSIGNMENTS}.mine.shoal.assign.node-2.>", b"{}"),
    (f"$JS.API.CONSUMER.DURABLE.CREATE.{s.STREAM_ASSIGNMENTS}.mine", b"{}"),
    (f"$JS.API.STREAM.INFO.{s.STREAM_ASSIGNMENTS}", b""),
    (s.api("default", s.JOBS_LIST), b"{}"),
    (s.submit("default"), b"{}"),
])
def test_a_node_cannot_act_as_another_node_or_touch_state(stack: Stack, subject: str, body: bytes) -> None:
    assert_refused(stack, "node", "node-1", subject, body)


@pytest.mark.parametrize("subject", ["_INBOX.>", f"{s.ASSIGN_PREFIX}.node-2.>", f"{s.REPORT_PREFIX}.>",
                                     s.heartbeat("*")])
def test_a_node_cannot_listen_to_others(stack: Stack, subject: str) -> None:
    assert_refused(stack, "node", "node-1", subject, None)


def test_a_node_that_claims_other_labels_is_refused_by_the_server(stack: Stack, tmp_path: Path) -> None:
    """Pinned labels: `add-node ID --label k=v` lets the node register with exactly those labels."""
    from services.cli.auth import add_node, load

    add_node(stack.auth_dir, load(stack.auth_dir), "pinned", {"zone": "a"})
    assert stack.server is not None and stack.server.proc is not None
    stack.server.proc.send_signal(__import__("signal").SIGHUP)  # reload: no restart
    time.sleep(1.0)

    async def scenario() -> None:
        bus = await connect(stack, "node", "pinned")
        try:
            body = {"node_id": "pinned", "labels": {"zone": "a"}}
            await bus.request(s.node_register("pinned", s.labels_digest({"zone": "a"})), to_json(body))
            evil = {"node_id": "pinned", "labels": {"zone": "a", "gpu": "true"}}
            subject = s.node_register("pinned", s.labels_digest(evil["labels"]))
            await bus.nc.publish(subject, to_json(evil))
            assert await refused(bus, subject)
        finally:
            await bus.close()

    run(scenario())


def test_only_the_service_identity_rotates_page_token_keys_and_a_revoke_refuses_old_tokens(stack: Stack) -> None:
    import os
    import subprocess

    from services.cli.stack import shoal_command
    from shared.api import ListNodesRequest

    def rotate(kind: str, name: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "SHOAL_NATS_URL": stack.nats_url, "SHOAL_NATS_NKEY": str(stack.seed(kind, name))}
        return subprocess.run(shoal_command("auth", "rotate-page-key", "--revoke"), env=env, capture_output=True,
                              text=True, timeout=60)

    async def first_page_token() -> str:
        bus = await connect(stack, "admin", "admin")
        try:
            _, page = await Client(bus).list_nodes(ListNodesRequest(limit=1))
            return page.next_token
        finally:
            await bus.close()

    async def next_page(token: str) -> Exception | None:
        bus = await connect(stack, "admin", "admin")
        try:
            await Client(bus).list_nodes(ListNodesRequest(limit=1, next_token=token))
        except ShoalError as exc:
            return exc
        finally:
            await bus.close()
        return None

    token = run(first_page_token())
    assert token
    denied = rotate("tenant", "team-a")
    assert denied.returncode != 0
    assert run(next_page(token)) is None  # the tenant changed nothing
    done = rotate("service", "service")
    assert done.returncode == 0 and "every older key is deleted" in done.stdout, done.stderr
    deadline = time.monotonic() + 10
    while (error := run(next_page(token))) is None and time.monotonic() < deadline:
        time.sleep(0.2)  # the query replicas see the delete through their watch
    assert error is not None and getattr(error, "field", None) == "next_token"


# -- the HTTP gateway ---------------------------------------------------------------------------------


def test_the_gateway_identity_serves_every_route(stack: Stack) -> None:
    """`shoal dev --auth`'s gateway runs as the gateway identity: every route works through it (a route
    whose NATS call the server refused would time out as a 503, never a 200 or a 404/409 from a service)."""
    import httpx

    from services.cli.stack import GATEWAY
    from services.gateway.routes import ROUTES

    assert stack._identity_of(GATEWAY) == ("gateway", "gateway")
    token = stack.gateway_token()
    assert token is not None
    headers = {"Authorization": f"Bearer {token.read_text().strip()}"}
    ns = "/api/v1/namespaces/team-a"
    job = {**JOB, "name": "over-http", "selector": {"match_ids": ["node-1"]}}

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=stack.dashboard_url.rstrip("/"), headers=headers, trust_env=False,
                                     timeout=30) as http:
            put = await http.put(f"{ns}/jobs", json={"spec": job}, headers={"Idempotency-Key": "http-1"})
            assert put.status_code == 200 and put.json()["accepted"], put.text
            submission = put.json()["submission_id"]
            deadline = time.monotonic() + 60
            while True:
                listed = await http.get(f"{ns}/jobs/over-http/executions")
                assert listed.status_code in (200, 404), listed.text
                items = listed.json().get("items", []) if listed.status_code == 200 else []
                if items and items[0]["status"]["observed_state"]["state_type"] == "completed":
                    break
                assert time.monotonic() < deadline, listed.text
                await asyncio.sleep(0.3)
            execution = items[0]["id"]
            served: dict[str, int] = {}
            for method, path, expected in (
                ("GET", f"{ns}/jobs", {200}),
                ("GET", f"{ns}/jobs/over-http", {200}),
                ("GET", f"{ns}/jobs/over-http/executions", {200}),
                ("GET", f"{ns}/executions/{execution}", {200}),
                ("GET", f"{ns}/submissions/{submission}", {200}),
                ("GET", f"{ns}/jobs/over-http/logs", {200}),
                ("GET", f"{ns}/jobs/over-http/rollout", {200, 404}),
                ("POST", f"{ns}/jobs/over-http/rollout/promote", {404, 409}),
                ("POST", f"{ns}/jobs/over-http/rollout/pause", {404, 409}),
                ("POST", f"{ns}/jobs/over-http/rollout/resume", {404, 409}),
                ("POST", f"{ns}/jobs/over-http/rollout/abort", {404, 409}),
                ("POST", f"{ns}/jobs/over-http/stop", {200}),
                ("GET", "/api/v1/nodes", {200}),
                ("GET", "/api/v1/deadletters", {200}),
                ("GET", "/healthz", {200}),
                ("GET", "/openapi.json", {200}),
                ("GET", "/metrics", {200}),
            ):
                response = await http.request(method, path)
                assert response.status_code in expected, (method, path, response.text)
                served[f"{method} {path}"] = response.status_code
            async with http.stream("GET", f"{ns}/jobs/over-http/events") as events:
                assert events.status_code == 200
                async for line in events.aiter_lines():
                    if line.startswith("retry:"):
                        break  # the stream is open: its consumers of SHOAL_EVENTS were created
            assert len(served) + 2 == len([r for r in ROUTES if r.path != "/"])  # PUT and the events, above

    run(scenario())


@pytest.mark.parametrize(("subject", "body"), [
    (s.report("node-1"), report_for("node-1")),
    (s.heartbeat("node-1"), to_msgpack(Heartbeat(node_id="node-1", at=AT))),
    (s.node_register("node-9", s.labels_digest({})), b"{}"),
    (f"$KV.{s.BUCKET_EXECUTIONS}.team-a.j.node-1.e", b"x"),
    (f"$KV.{s.BUCKET_NODES}.node-1", b"x"),
    (f"$JS.API.DIRECT.GET.KV_{s.BUCKET_CONFIG}.$KV.{s.BUCKET_CONFIG}.page-token-key", b""),
    (f"$JS.API.STREAM.INFO.{s.STREAM_ASSIGNMENTS}", b""),
    (f"$JS.API.STREAM.INFO.{s.STREAM_OUTPUT}", b""),
    (f"$JS.API.CONSUMER.CREATE.{s.STREAM_ASSIGNMENTS}", b"{}"),
    (s.pull_next(s.assign_consumer("node-1")), b"{}"),
])
def test_the_gateway_identity_cannot_report_or_write_a_bucket(stack: Stack, subject: str, body: bytes) -> None:
    assert_refused(stack, "gateway", "gateway", subject, body)


def test_the_gateway_identity_reads_only_events_through_its_own_consumers(stack: Stack) -> None:
    from shared.transport import OrderedReader

    async def scenario() -> None:
        bus = await connect(stack, "gateway", "gateway")
        try:
            reader = OrderedReader(bus, s.STREAM_EVENTS, filter_subject=f"{s.EVENTS_PREFIX}.>")
            await reader.open()
            assert await reader.next_batch(wait=1)  # the job events of the stack so far
            await reader.close()
            assert not bus.violations
            await bus.nc.subscribe(f"{s.REPORT_PREFIX}.>")
            assert await refused(bus, s.REPORT_PREFIX)
        finally:
            await bus.close()

    run(scenario())

"""The HTTP gateway against real services and a real nats-server: every route, byte for byte.

The gateway runs as a component on a free port; httpx talks to it on the same event loop. A reply of
the gateway must be the NATS reply itself, so the list routes are compared with what the same request
over NATS answers, bytes and all.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.cli.main import main as shoal
from services.gateway import GatewayService
from services.gateway.handlers import submission_id_of
from services.gateway.http import MAX_QUERY
from services.gateway.routes import ROUTES
from shared import subjects as s
from shared.api import (
    ExecutionLogsRequest,
    ListDeadLettersRequest,
    ListJobExecutionsRequest,
    ListJobsRequest,
    ListNodesRequest,
)
from shared.codec import to_json
from shared.errors import ErrorReply, NotFound
from shared.models import Selector
from shared.runtime import start_component
from shared.tokens import add_token

pytestmark = pytest.mark.nats

HEALTH = {"interval": "200ms", "success_threshold": 2, "failure_threshold": 2, "deadline": "10s"}
NS = "/api/v1/namespaces/default"


def spec(name: str, **rollout: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"name": name, "type": "pipeline", "restart_policy": "never", "config": {"simulate": {}}}
    if rollout:
        body["rollout"] = rollout
    return body


async def start_gateway(cluster, **kwargs: Any) -> GatewayService:
    gw = await start_component(lambda b, st: GatewayService(b, st, port=0, host="127.0.0.1", **kwargs),
                               cluster.settings, "gateway")
    cluster.components.append(gw)
    return gw


@pytest.fixture
async def stack(cluster):
    """Services, a simulated fleet of 4 nodes, an API client and a gateway without tokens."""
    await cluster.start_services()
    await cluster.start("agent", simulate=4)
    api = await cluster.api()
    await api.wait_ready(4)
    gw = await start_gateway(cluster)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}", trust_env=False, timeout=30) as http:
        yield api, gw, http


async def put_job(http: httpx.AsyncClient, body: dict[str, Any], **kw: Any) -> httpx.Response:
    return await http.put(f"{NS}/jobs", json={"spec": body, **kw})


async def settled(api, wait_for, name: str, count: int) -> None:
    """Until the job's executions of its latest version are all running (nothing changes after)."""
    async def check() -> bool:
        items = await api.all_executions(name)
        return len(items) == count and all(e.observed == "running" for e in items)

    await wait_for(check, timeout=30)


def error(response: httpx.Response) -> dict[str, Any]:
    return response.json()["error"]


# -- reads: the NATS reply, byte for byte ------------------------------------------------------------


async def test_list_routes_answer_the_nats_reply_byte_for_byte(stack, wait_for) -> None:
    api, gw, http = stack
    assert (await put_job(http, spec("bytes"))).status_code == 200
    await settled(api, wait_for, "bytes", 4)

    async def same(path: str, params: Any, raw_of) -> bytes:
        """The gateway's reply equals the NATS reply to the same request (asked right after)."""
        async def check() -> bytes | None:
            response = await http.get(path, params=params)
            raw = await raw_of()
            return response.content if response.status_code == 200 and response.content == raw else None

        return await wait_for(check, timeout=10)

    page = await same(f"{NS}/jobs/bytes/executions", {"limit": 3, "order_by": "updated_at", "reverse": "true"},
                      lambda: _raw(api.list_executions(ListJobExecutionsRequest(
                          job="bytes", limit=3, order_by="updated_at", reverse=True))))
    token = json.loads(page)["next_token"]
    assert token
    await same(f"{NS}/jobs/bytes/executions", {"limit": 3, "order_by": "updated_at", "reverse": "true",
                                                "next_token": token},
               lambda: _raw(api.list_executions(ListJobExecutionsRequest(
                   job="bytes", limit=3, order_by="updated_at", reverse=True, next_token=token))))
    await same(f"{NS}/jobs/bytes/executions", {"state": "running", "node_id": "sim-0002", "all_job_versions": "1"},
               lambda: _raw(api.list_executions(ListJobExecutionsRequest(
                   job="bytes", state="running", node_id="sim-0002", all_job_versions=True))))
    await same(f"{NS}/jobs", {"limit": 10, "type": "pipeline"},
               lambda: _raw(api.list_jobs(ListJobsRequest(limit=10, type="pipeline"))))
    await same("/api/v1/nodes", [("selector", "zone in (zone-1,zone-2)"), ("selector", "simulated"),
                                 ("state", "ready")],
               lambda: _raw(api.list_nodes(ListNodesRequest(
                   selector=Selector(match_expressions=["zone in (zone-1,zone-2)", "simulated"]), state="ready"))))
    await same("/api/v1/deadletters", {"limit": 5},
               lambda: _raw(api.list_dead_letters(ListDeadLettersRequest(limit=5))))

    execution = json.loads(page)["items"][0]
    for path, subject, body in (
        (f"{NS}/executions/{execution['id']}", s.api("default", s.EXECUTIONS_GET), {"id": execution["id"]}),
        (f"{NS}/jobs/bytes", s.api("default", s.JOBS_GET), {"job": "bytes"}),
        (f"{NS}/jobs/bytes/rollout", s.api("default", s.ROLLOUT_STATUS), {"job": "bytes", "reason": ""}),
    ):
        raw = await api.bus.request(subject, to_json(body))
        response = await http.get(path)
        assert response.status_code == 200, response.text
        assert response.content == raw, path
        assert response.headers["content-type"] == "application/json"


async def raw_get(port: int, target: str, piece: int = 1024) -> tuple[int, dict[str, str], bytes]:
    """A GET written a piece at a time, as a slow network delivers it: (status, headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = f"GET {target} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n".encode()
        for start in range(0, len(head), piece):
            writer.write(head[start:start + piece])
            await writer.drain()
            await asyncio.sleep(0.002)
        reply = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    first, _, rest = reply.partition(b"\r\n")
    fields, _, body = rest.partition(b"\r\n\r\n")
    headers = dict(line.decode().lower().split(": ", 1) for line in fields.split(b"\r\n") if line)
    return int(first.split()[1]), headers, body


async def _raw(call) -> bytes:
    raw, _ = await call
    return raw


async def test_errors_carry_the_nats_error_body_and_its_code_as_status(stack) -> None:
    api, gw, http = stack
    response = await http.get(f"{NS}/jobs/nope")
    assert response.status_code == 404
    try:
        await api.bus.request(s.api("default", s.JOBS_GET), to_json({"job": "nope"}))
    except NotFound as exc:
        assert response.content == to_json(ErrorReply(error=exc.body()))
    assert error(response)["field"] == "job"

    cases = [
        (f"{NS}/jobs", {"limit": 0}, 400, "limit"),
        (f"{NS}/jobs", {"limit": "many"}, 400, "limit"),
        (f"{NS}/jobs", {"state": "sleeping"}, 400, "state"),
        (f"{NS}/jobs", {"colour": "red"}, 400, "colour"),
        (f"{NS}/jobs", [("limit", "1"), ("limit", "2")], 400, "limit"),
        # A query parameter is given or left out: the text `null` is not "no value" (msgspec's lax mode
        # would read it so, and the OpenAPI document has no null for it).
        (f"{NS}/jobs", {"limit": "null"}, 400, "limit"),
        (f"{NS}/jobs", {"state": "null"}, 400, "state"),
        (f"{NS}/jobs/x/executions", {"job_version": "null"}, 400, "job_version"),
        ("/api/v1/nodes", {"state": "null"}, 400, "state"),
        (f"{NS}/jobs/x/executions", {"next_token": "garbage"}, 400, "next_token"),
        (f"{NS}/jobs/x/executions", {"job": "y"}, 400, "job"),
        ("/api/v1/namespaces/Bad_NS/jobs", {}, 400, "ns"),  # the path parameter {ns}
        ("/api/v1/namespaces/nodes/jobs", {}, 400, "ns"),
        (f"{NS}/executions/no-such", {}, 404, "id"),
        (f"{NS}/submissions/no-such", {}, 404, "submission_id"),
        ("/api/v1/nodes", {"selector": "zone in (a"}, 400, None),
        ("/api/v1/nowhere", {}, 404, None),
    ]
    for path, params, status, field in cases:
        response = await http.get(path, params=params)
        assert response.status_code == status, (path, params, response.text)
        body = error(response)
        assert body["code"] == status and body["message"]
        if field is not None:
            assert body.get("field", "").startswith(field), (path, body)
    assert (await http.delete(f"{NS}/jobs")).status_code == 405
    # A query string past the limit is the JSON error of the API, not the HTTP parser's plain-text 400,
    # also when the request comes in pieces, as over a real network (the parser's own limit on an
    # incomplete head must be above the query string's).
    status, headers, body = await raw_get(gw.port, f"/api/v1/nodes?selector={'x' * (MAX_QUERY + 1000)}")
    assert status == 400 and headers["content-type"] == "application/json", (status, headers, body[:200])
    assert str(MAX_QUERY) in json.loads(body)["error"]["message"]
    # A path or query string that is not UTF-8 once percent-decoded names what it is.
    for target, field in ((f"{NS}/jobs/%ff", "path"), (f"{NS}/jobs?state=%ff", "query")):
        status, headers, body = await raw_get(gw.port, target)
        assert status == 400 and json.loads(body)["error"]["field"] == field, (target, body)
    response = await http.post(f"{NS}/jobs/x/stop", content=b"{not json")
    assert response.status_code == 400
    response = await http.post(f"{NS}/jobs/x/stop", json={"job": "y"})
    assert response.status_code == 400 and error(response)["field"] == "job"
    response = await http.post(f"{NS}/jobs/x/rollout/pause", json={"reason": 5})
    assert response.status_code == 400 and error(response)["field"] == "reason"


# -- control ---------------------------------------------------------------------------------------


async def test_stop_and_rollout_controls(stack, wait_for) -> None:
    api, gw, http = stack
    canary = spec("canary", strategy="canary", max_parallel=50, canary={"canary_count": 1},
                  health_check=HEALTH)
    assert (await put_job(http, canary)).status_code == 200

    async def awaiting() -> bool:
        response = await http.get(f"{NS}/jobs/canary/rollout")
        return response.status_code == 200 and response.json()["state"] == "awaiting_promotion"

    await wait_for(awaiting, timeout=30)
    response = await http.post(f"{NS}/jobs/canary/rollout/pause")
    assert response.status_code == 409, response.text  # only a deploying rollout pauses
    response = await http.post(f"{NS}/jobs/canary/rollout/promote", json={"reason": "looks good"})
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "deploying" and response.json()["message"] == "looks good"
    response = await http.post(f"{NS}/jobs/canary/rollout/pause")
    if response.status_code == 200:  # (unless the last wave was done already)
        assert response.json()["state"] == "paused"
        response = await http.post(f"{NS}/jobs/canary/rollout/resume", content=b"")
        assert response.status_code == 200 and response.json()["state"] == "deploying"
    response = await http.post(f"{NS}/jobs/canary/stop", json={"reason": "enough"})
    assert response.status_code == 200 and response.json()["job_id"]
    response = await http.post(f"{NS}/jobs/canary/stop")
    assert response.status_code == 200 and response.json()["already_stopped"] is True
    response = await http.post(f"{NS}/jobs/canary/rollout/abort")
    assert response.status_code == 409


async def test_put_job_accepted_rejected_dry_run_and_idempotent(stack, wait_for) -> None:
    api, gw, http = stack
    response = await put_job(http, spec("put"), dry_run=True)
    assert response.status_code == 200, response.text
    assert response.json()["accepted"] is True and response.json()["dry_run"] is True
    assert (await http.get(f"{NS}/jobs/put")).status_code == 404  # a dry run applies nothing

    key = {"Idempotency-Key": "put-once"}
    first = await http.put(f"{NS}/jobs", json={"spec": spec("put")}, headers=key)
    assert first.status_code == 200, first.text
    outcome = first.json()
    # The submission id is derived from the namespace and the key; the reply names both.
    assert outcome["accepted"] and outcome["job_version"] == 1
    assert outcome["submission_id"] == submission_id_of("default", "put-once") != "put-once"
    assert first.headers["submission-id"] == outcome["submission_id"]
    assert first.headers["idempotency-key"] == "put-once"
    again = await http.put(f"{NS}/jobs", json={"spec": spec("put")}, headers=key)
    assert again.status_code == 200 and again.content == first.content  # the same outcome, not a new version
    stored = await http.get(f"{NS}/submissions/{outcome['submission_id']}")
    assert stored.status_code == 200 and stored.content == first.content

    unchanged = await put_job(http, spec("put"))
    assert unchanged.status_code == 409 and error(unchanged)["field"] == "spec"
    assert (await put_job(http, spec("put"), force=True)).json()["job_version"] == 2

    bad = await put_job(http, {**spec("bad"), "rollout": {"max_parallel": 400}})
    assert bad.status_code == 400 and error(bad)["field"] == "spec.rollout.max_parallel"
    rejected = await put_job(http, {**spec("bad"), "rollout": {"strategy": "rolling"}})  # no health check
    assert rejected.status_code == 400, rejected.text
    assert set(rejected.json()) == {"error"} and error(rejected)["code"] == 400 and error(rejected)["message"]
    assert rejected.headers["idempotency-key"]  # the key made for it, to retry with
    stored = await http.get(f"{NS}/submissions/{rejected.headers['submission-id']}")  # its id, to look it up later
    assert stored.status_code == 200 and stored.json()["accepted"] is False
    assert (await http.put(f"{NS}/jobs", content=b"[]")).status_code == 400
    response = await http.put(f"{NS}/jobs", json={"spec": spec("put")}, headers={"Idempotency-Key": "no.dots"})
    assert response.status_code == 400 and error(response)["field"] == "Idempotency-Key"
    response = await http.put(f"{NS}/jobs", json={"spec": spec("put")}, headers={"Idempotency-Key": "k" * 129})
    assert response.status_code == 400 and error(response)["field"] == "Idempotency-Key"


async def test_the_same_idempotency_key_in_two_namespaces_is_two_submissions(stack) -> None:
    """Submission ids are the cluster's, so the gateway derives them from (namespace, key): one namespace
    can neither probe another's keys (a 409 would tell it the key is in use) nor occupy them."""
    api, gw, http = stack
    gw.submit_wait = 5.0
    key = {"Idempotency-Key": "shared-key"}
    first = await http.put(f"{NS}/jobs", json={"spec": spec("mine")}, headers=key)
    assert first.status_code == 200 and first.json()["namespace"] == "default", first.text
    other = await http.put("/api/v1/namespaces/other/jobs", json={"spec": spec("theirs")}, headers=key)
    assert other.status_code == 200, other.text
    assert other.json()["accepted"] and other.json()["namespace"] == "other"
    assert other.json()["submission_id"] != first.json()["submission_id"]
    assert (await http.get("/api/v1/namespaces/other/jobs/theirs")).status_code == 200
    for ns, reply in (("default", first), ("other", other)):
        stored = await http.get(f"/api/v1/namespaces/{ns}/submissions/{reply.json()['submission_id']}")
        assert stored.status_code == 200 and stored.content == reply.content
    # In each namespace the key still answers with its own outcome, and changes nothing.
    again = await http.put(f"{NS}/jobs", json={"spec": spec("mine", strategy="rolling")}, headers=key)
    assert again.status_code == 200 and again.content == first.content
    again = await http.put("/api/v1/namespaces/other/jobs", json={"spec": spec("x")}, headers=key)
    assert again.status_code == 200 and again.content == other.content


async def test_logs_route_answers_the_job_output(stack, wait_for, cluster) -> None:
    api, gw, http = stack
    await cluster.start("agent", node_id="edge-1", labels={"role": "printer"})
    await api.wait_ready(5)
    job = {"name": "printer", "type": "query", "selector": {"match_labels": {"role": "printer"}},
           "config": {"command": ["sh", "-c", "echo hello over http; echo oops >&2"]}}
    assert (await put_job(http, job)).status_code == 200

    async def final() -> dict[str, Any] | None:
        response = await http.get(f"{NS}/jobs/printer/logs")
        assert response.status_code == 200, response.text
        body = response.json()
        return body if any(item["final"] for item in body["items"]) else None

    page = await wait_for(final, timeout=30)
    text = "".join(item["text"] for item in page["items"])
    assert "hello over http\n" in text and "oops\n" in text
    assert {item["node_id"] for item in page["items"]} == {"edge-1"}
    execution_id = page["items"][0]["execution_id"]

    # The NATS reply, byte for byte, with each filter; `after` continues where a reply stopped.
    for params in ({}, {"node_id": "edge-1"}, {"execution_id": execution_id, "limit": "1"}, {"after": page["next"]}):
        response = await http.get(f"{NS}/jobs/printer/logs", params=params)
        fields = {k: int(v) if k in ("limit", "after") else v for k, v in params.items()}
        raw, _ = await api.logs(ExecutionLogsRequest(job="printer", **fields))
        assert response.status_code == 200 and response.content == raw, params
    assert (await http.get(f"{NS}/jobs/printer/logs", params={"after": page["next"]})).json()["items"] == []
    assert (await http.get(f"{NS}/jobs/printer/logs", params={"node_id": "sim-0001"})).json()["items"] == []
    for params, field in (({"after": "-1"}, "after"), ({"limit": "0"}, "limit"), ({"execution_id": "a.b"}, None)):
        response = await http.get(f"{NS}/jobs/printer/logs", params=params)
        assert response.status_code == 400, (params, response.text)
        if field:
            assert error(response)["field"] == field
    assert (await http.get(f"{NS}/jobs/nope/logs")).status_code == 404


# -- tokens ----------------------------------------------------------------------------------------


async def test_tokens_admin_tenant_missing_bad_and_other_namespace(cluster, tmp_path: Path, wait_for) -> None:
    await cluster.start_services()
    file = tmp_path / "tokens.json"
    admin = add_token(file, role="admin", name="ops")
    tenant = add_token(file, role="tenant", namespaces=["acme"])
    assert file.stat().st_mode & 0o777 == 0o600
    assert admin not in file.read_text() and tenant not in file.read_text()
    gw = await start_gateway(cluster, tokens_file=str(file))
    base = f"http://127.0.0.1:{gw.port}"
    async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=30) as http:
        def auth(token: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {token}"}

        for headers in ({}, auth("shoal_wrong"), {"Authorization": f"Basic {admin}"}, auth("x" * 5000)):
            response = await http.get("/api/v1/namespaces/acme/jobs", headers=headers)
            assert response.status_code == 401, headers
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert error(response)["code"] == 401
        assert (await http.get("/api/v1/namespaces/acme/jobs", headers=auth(tenant))).status_code == 200
        assert (await http.get("/api/v1/namespaces/acme/jobs/x", headers=auth(tenant))).status_code == 404
        for path in ("/api/v1/namespaces/default/jobs", "/api/v1/nodes", "/api/v1/deadletters", "/metrics"):
            response = await http.get(path, headers=auth(tenant))
            assert response.status_code == 403, path
        response = await http.put("/api/v1/namespaces/other/jobs", json={"spec": spec("x")}, headers=auth(tenant))
        assert response.status_code == 403
        response = await http.put("/api/v1/namespaces/acme/jobs", json={"spec": spec("x")}, headers=auth(tenant))
        assert response.status_code == 200 and response.json()["namespace"] == "acme", response.text
        for path in ("/api/v1/namespaces/other/jobs/x/rollout/pause", "/api/v1/namespaces/other/jobs/x/stop"):
            assert (await http.post(path, headers=auth(tenant))).status_code == 403, path
        assert (await http.get("/api/v1/namespaces/other/jobs/x/events", headers=auth(tenant))).status_code == 403
        for path in ("/api/v1/namespaces/other/jobs/x/logs", "/api/v1/namespaces/other/jobs/x/executions",
                     "/api/v1/namespaces/other/executions/e-1", "/api/v1/namespaces/other/submissions/s-1"):
            response = await http.get(path, headers=auth(tenant))
            assert response.status_code == 403 and error(response)["field"] == "ns", (path, response.text)
        for path in ("/api/v1/namespaces/default/jobs", "/api/v1/namespaces/acme/jobs", "/api/v1/nodes",
                     "/api/v1/deadletters", "/api/v1/namespaces/acme/jobs/x"):
            assert (await http.get(path, headers=auth(admin))).status_code == 200, path
        response = await http.get("/metrics", headers=auth(admin))
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        for path in ("/healthz", "/openapi.json", "/", "/static/app.js"):
            assert (await http.get(path)).status_code == 200, path

        # A token added while the gateway runs works at once (the file is read again when it changes).
        code, out, _ = await asyncio.to_thread(_cli, "auth", "add-token", str(file), "--tenant", "beta",
                                               "--name", "ci")
        assert code == 0
        late = out.strip()

        async def late_works() -> bool:
            return (await http.get("/api/v1/namespaces/beta/jobs", headers=auth(late))).status_code == 200

        await wait_for(late_works, timeout=10)
        assert (await http.get("/api/v1/namespaces/acme/jobs", headers=auth(late))).status_code == 403


def _cli(*args: str) -> tuple[int, str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = shoal(list(args))
        except SystemExit as exc:  # argparse refused the line
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def test_add_token_refuses_admin_with_tenant_and_bad_namespaces(tmp_path: Path) -> None:
    file = str(tmp_path / "t.json")
    assert _cli("auth", "add-token", file, "--tenant", "Not_OK")[0] == 2
    assert _cli("auth", "add-token", file)[0] == 2  # one of --admin and --tenant is required
    assert _cli("auth", "add-token", file, "--admin", "--tenant", "acme")[0] == 2
    code, out, err = _cli("auth", "add-token", file, "--admin")
    assert code == 0 and out.startswith("shoal_") and "shown only now" in err


# -- events ----------------------------------------------------------------------------------------


async def read_events(response: httpx.Response, into: list[tuple[str, Any]], stop: asyncio.Event) -> None:
    kind = ""
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            kind = line[len("event: "):]
        elif line.startswith("data: "):
            into.append((kind, json.loads(line[len("data: "):])))
        elif line.startswith(":"):
            into.append(("comment", line))
        if stop.is_set():
            return


async def test_event_stream_follows_a_rolling_job(stack, wait_for) -> None:
    api, gw, http = stack
    gw.heartbeat = 0.5
    consumers = await api.bus.consumer_count(s.STREAM_EVENTS)
    first = spec("waves", strategy="rolling", max_parallel=25, health_check=HEALTH)
    assert (await put_job(http, first)).status_code == 200

    async def has_rollout() -> bool:
        return (await http.get(f"{NS}/jobs/waves/rollout")).status_code == 200

    await wait_for(has_rollout, timeout=20)
    events: list[tuple[str, Any]] = []
    stop = asyncio.Event()
    async with http.stream("GET", f"{NS}/jobs/waves/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        reading = asyncio.create_task(read_events(response, events, stop))
        await wait_for(lambda: _true(events and events[0][0] == "rollout"), timeout=10)
        assert events[0][1]["job_name"] == "waves" and events[0][1]["total_waves"] == 4

        async def done() -> bool:
            rollouts = [body for kind, body in events if kind == "rollout"]
            return bool(rollouts) and rollouts[-1]["state"] == "succeeded"

        await wait_for(done, timeout=40)
        executions = [body for kind, body in events if kind == "execution"]
        assert {e["node_id"] for e in executions} == {"sim-0001", "sim-0002", "sim-0003", "sim-0004"}
        assert {e["status"]["observed_state"]["state_type"] for e in executions} >= {"validating", "running"}
        waves = [body["current_wave"] for kind, body in events if kind == "rollout"]
        assert waves == sorted(waves) and waves[-1] == 4 and len(set(waves)) > 1
        await wait_for(lambda: _true(any(kind == "comment" for kind, _ in events)), timeout=5)
        stop.set()
        reading.cancel()
    # The client went away: the stream ends and its consumers are deleted.
    await wait_for(lambda: _true(gw.streams == 0), timeout=10)

    async def consumers_gone() -> bool:
        return await api.bus.consumer_count(s.STREAM_EVENTS) <= consumers

    await wait_for(consumers_gone, timeout=10)
    response = await http.get(f"{NS}/jobs/nope/events")
    assert response.status_code == 404


async def _true(value: Any) -> bool:
    return bool(value)


async def test_healthz_only_while_connected_and_the_openapi_names_every_route(stack) -> None:
    api, gw, http = stack
    response = await http.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    doc = (await http.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    for route in ROUTES:
        assert route.method.lower() in doc["paths"][route.path], route.path
    page = await http.get("/")
    assert page.status_code == 200 and b"<html" in page.content
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert (await http.get("/static/../service.py")).status_code == 404
    await gw.bus.nc.close()  # the connection is gone for good
    response = await http.get("/healthz")
    assert response.status_code == 503 and error(response)["code"] == 503


# -- limits and costs of event streams -------------------------------------------------------------


async def open_stream(http: httpx.AsyncClient, path: str) -> tuple[Any, httpx.Response]:
    context = http.stream("GET", path)
    response = await context.__aenter__()
    if response.status_code != 200:
        await response.aread()
    return context, response


async def test_stream_limits_hold_under_concurrent_opens(stack, wait_for) -> None:
    """The slot is taken before the first await: opens racing past the limit are refused, and every slot
    comes back when the streams close."""
    api, gw, http = stack
    assert (await put_job(http, spec("limits"))).status_code == 200
    await wait_for(lambda: _true_async(http, f"{NS}/jobs/limits"), timeout=20)
    path = f"{NS}/jobs/limits/events"
    for total, per_caller, admitted, refusal in ((3, 100, 3, 503), (100, 2, 2, 429)):
        gw.max_streams, gw.max_streams_per_caller = total, per_caller
        opened = await asyncio.gather(*(open_stream(http, path) for _ in range(8)))
        statuses = sorted(response.status_code for _, response in opened)
        assert statuses == [200] * admitted + [refusal] * (8 - admitted), statuses
        for _, response in opened:
            if response.status_code != 200:
                assert error(response)["code"] == refusal
        assert gw.streams == admitted
        for context, _ in opened:
            await context.__aexit__(None, None, None)
        await wait_for(lambda: _true(gw.streams == 0 and not gw.caller_streams and not gw.refreshers), timeout=10)


async def _true_async(http: httpx.AsyncClient, path: str) -> bool:
    return (await http.get(path)).status_code == 200


async def test_event_streams_of_one_job_share_one_status_refresher(stack, wait_for, cluster) -> None:
    """A burst of execution changes under N open streams costs a bounded number of rollouts.status
    requests, whatever N and the number of changes: one refresher per job, at most one request every
    `status_every` seconds for execution changes (plus one per change of the rollout record)."""
    api, gw, http = stack
    gw.status_every = 1.0
    rolling = spec("costly", strategy="rolling", max_parallel=50, health_check=HEALTH)
    assert (await put_job(http, rolling)).status_code == 200

    async def succeeded() -> bool:
        response = await http.get(f"{NS}/jobs/costly/rollout")
        return response.status_code == 200 and response.json()["state"] == "succeeded"

    await wait_for(succeeded, timeout=40)
    job_id = (await http.get(f"{NS}/jobs/costly")).json()["job"]["id"]
    streams = 6
    events: list[list[tuple[str, Any]]] = [[] for _ in range(streams)]
    stop = asyncio.Event()
    opened = [await open_stream(http, f"{NS}/jobs/costly/events") for _ in range(streams)]
    readers = [asyncio.create_task(read_events(response, into, stop)) for (_, response), into in zip(opened, events)]
    try:
        await wait_for(lambda: _true(all(into and into[0][0] == "rollout" for into in events)), timeout=10)
        assert list(gw.refreshers) == [("default", job_id)]

        requests: list[str] = []
        rollout_writes: list[str] = []
        bus = api.bus

        async def count_request(msg: Any) -> None:
            requests.append(msg.subject)

        async def count_write(msg: Any) -> None:
            rollout_writes.append(msg.subject)

        counting = await bus.nc.subscribe(s.api("default", s.ROLLOUT_STATUS), cb=count_request)
        records = await bus.nc.subscribe(f"$KV.{s.BUCKET_ROLLOUTS}.>", cb=count_write)
        await bus.nc.flush()
        kv = await bus.js.key_value(s.BUCKET_EXECUTIONS)
        keys = [k for k in await kv.keys() if f".{job_id}." in k]
        assert len(keys) == 4
        entries = [await kv.get(k) for k in keys]
        loop = asyncio.get_running_loop()
        started = loop.time()
        burst = 120
        for i in range(burst):  # the same records again: an execution event each, nothing else changes
            entry = entries[i % len(entries)]
            await kv.put(entry.key, entry.value)
            await asyncio.sleep(0.01)

        async def forwarded() -> bool:
            return all(sum(kind == "execution" for kind, _ in into) >= burst for into in events)

        await wait_for(forwarded, timeout=20)
        await asyncio.sleep(gw.status_every * 1.5)  # the last refresh due after the burst
        elapsed = loop.time() - started
        await bus.nc.flush()
        await counting.unsubscribe()
        await records.unsubscribe()
        bound = 2 + int(elapsed / gw.status_every) + len(rollout_writes)
        assert 1 <= len(requests) <= bound, (len(requests), bound, elapsed, len(rollout_writes))
        assert gw.status_requests >= len(requests)
    finally:
        stop.set()
        for reader in readers:
            reader.cancel()
        for context, _ in opened:
            await context.__aexit__(None, None, None)
    await wait_for(lambda: _true(gw.streams == 0 and not gw.refreshers), timeout=10)


# -- the token file fails closed -------------------------------------------------------------------


async def test_a_broken_token_file_refuses_every_token_until_fixed(cluster, tmp_path: Path, wait_for,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    await cluster.start_services()
    file = tmp_path / "tokens.json"
    admin = add_token(file, role="admin", name="ops")
    revoked = add_token(file, role="admin", name="leaked")
    good = file.read_bytes()
    gw = await start_gateway(cluster, tokens_file=str(file))
    headers = {"Authorization": f"Bearer {revoked}"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}", trust_env=False, timeout=30) as http:
        assert (await http.get(f"{NS}/jobs", headers=headers)).status_code == 200
        # Revoking the leaked token goes wrong half-way: the file is left invalid.
        file.write_bytes(good[: len(good) // 2])

        async def refused() -> httpx.Response | None:
            response = await http.get(f"{NS}/jobs", headers=headers)
            return response if response.status_code == 503 else None

        response = await wait_for(refused, timeout=10)
        assert error(response)["code"] == 503 and error(response)["field"] == "SHOAL_GATEWAY_TOKENS"
        assert "token file" in error(response)["message"]
        for path in (f"{NS}/jobs", "/api/v1/nodes", "/metrics", f"{NS}/jobs/x/events"):
            assert (await http.get(path, headers={"Authorization": f"Bearer {admin}"})).status_code == 503, path
        assert (await http.get("/healthz")).status_code == 200  # routes without a token still answer
        assert any("unusable" in r.getMessage() and str(file) in r.getMessage() for r in caplog.records)
        # Fixed, without the leaked token: the admin's works again, the leaked one never does.
        entries = json.loads(good)["tokens"]
        fixed = {"tokens": [e for e in entries if e["name"] != "leaked"]}
        file.write_text(json.dumps(fixed))

        async def recovered() -> bool:
            return (await http.get(f"{NS}/jobs", headers={"Authorization": f"Bearer {admin}"})).status_code == 200

        await wait_for(recovered, timeout=10)
        assert (await http.get(f"{NS}/jobs", headers=headers)).status_code == 401


# -- starting -------------------------------------------------------------------------------------


async def test_the_gateway_fails_when_its_http_server_does_not_start(cluster, monkeypatch) -> None:
    from services.gateway import service as gateway_service
    from shared.errors import Unavailable

    async def never(self, sockets=None) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(gateway_service._Server, "serve", never)
    monkeypatch.setattr(gateway_service, "START_TIMEOUT", 0.5)
    with pytest.raises(Unavailable, match="did not start within"):
        await asyncio.wait_for(start_gateway(cluster), timeout=15)


def test_no_token_file_on_a_public_address_is_refused_unless_insecure(tmp_path: Path) -> None:
    import os
    import subprocess

    from services.cli.stack import shoal_command
    from services.gateway.service import check_exposure
    from shared.errors import InvalidInput

    env = {k: v for k, v in os.environ.items() if k not in ("SHOAL_GATEWAY_TOKENS", "SHOAL_GATEWAY_INSECURE")}
    env["SHOAL_NATS_URL"] = "nats://127.0.0.1:1"  # never reached: refused before connecting
    done = subprocess.run(shoal_command("serve", "gateway", "--host", "0.0.0.0", "--port", "0"), env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "SHOAL_GATEWAY_TOKENS" in lines[0] and "--insecure" in lines[0], done.stderr
    with pytest.raises(InvalidInput) as refused:
        check_exposure("::", tokens=False)
    assert refused.value.field == "SHOAL_GATEWAY_TOKENS"
    check_exposure("0.0.0.0", tokens=False, insecure=True)
    check_exposure("0.0.0.0", tokens=True)
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.5"):
        check_exposure(host, tokens=False)

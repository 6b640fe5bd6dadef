"""Schemathesis against the gateway's own /openapi.json, served by a real stack: no 5xx, every reply as documented.

The stack is test_gateway's (real nats-server, the four services, a simulated fleet of 4 nodes, a gateway
without tokens), with a job already running so that list replies carry executions, jobs and nodes to check
against their schemas. Every operation of the document is called with generated requests, valid ones
(positive) and ones the document forbids (negative), a few each, derandomized so that a run is the same
every time and bounded in time. Each reply must be no 5xx, have a documented status and content type and
a body valid against the schema of that status; a request the document forbids must be refused with a 4xx.

Hypothesis drives the requests from a worker thread, so the stack keeps serving on the test's event loop.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections import Counter
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from services.gateway.service import MAX_HEAD
from tests.integration.test_gateway import NS, settled, spec, stack  # noqa: F401 (the fixture)

pytestmark = pytest.mark.nats

# Per operation, generation mode and set of path parameters: 6, so at most about 400 requests. A deeper run, by
# hand: SHOAL_SCHEMATHESIS_EXAMPLES=200.
EXAMPLES = int(os.environ.get("SHOAL_SCHEMATHESIS_EXAMPLES", "6"))
CALL_TIMEOUT = 20.0  # seconds for one request (a PUT waits for its submission's outcome)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def run_schemathesis(doc: dict[str, Any], base_url: str, known: dict[str, str]) -> tuple[Counter[int | str], list[str]]:
    """Every operation of `doc` against `base_url`: the statuses answered, and what was wrong.

    Each operation is called with generated path parameters, and again with those of `known` things of
    the stack (its job, one of its executions, one submission) so that generated queries and bodies reach
    the services and come back with real executions, jobs and rollouts to check against the schema.
    """
    schema = schemathesis.openapi.from_dict(doc)
    failures: list[str] = []
    statuses: Counter[int | str] = Counter()
    with requests.Session() as session:
        session.trust_env = False  # the gateway is local: no proxy from the environment
        for result in schema.get_all_operations():
            operation = result.ok()
            passes: list[dict[str, str] | None] = [None]
            pinned = pin(operation.path, known)
            if pinned is not None:
                passes.append(pinned)
            for path_parameters in passes:
                for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                    checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])
                    strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)
                    label = f"{operation.label} ({mode.value}{', known path' if path_parameters else ''})"

                    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
                    @given(case=strategy)
                    def call(case: schemathesis.Case) -> None:  # run at once, so the loop variables are current
                        try:
                            response = case.call(base_url=base_url, session=session, timeout=CALL_TIMEOUT)
                            if response.status_code == 400 and over_head(response.request):
                                statuses["head over the limit"] += 1
                                return
                            statuses[response.status_code] += 1
                            case.validate_response(response, checks=checks)
                        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
                            sent = exc.request or prepared(case, base_url)
                            if over_head(sent):
                                statuses["head over the limit"] += 1  # refused (and closed) while being sent
                            else:
                                failures.append(f"{label}: {exc}\n  {case.as_curl_command()}")
                        except (Exception, FailureGroup) as exc:  # noqa: BLE001 (each is collected, then all reported)
                            failures.append(f"{label}: {exc}\n  {case.as_curl_command()}")

                    try:
                        call()
                    except Unsatisfiable:  # nothing to get wrong in a request without parameters or body
                        if mode is GenerationMode.POSITIVE:
                            raise
                    except (Exception, FailureGroup) as exc:  # noqa: BLE001 (what hypothesis gathered)
                        failures.append(f"{label}: {exc}")
    return statuses, failures


def prepared(case: schemathesis.Case, base_url: str) -> requests.PreparedRequest:
    """The request a case sends (for one whose connection broke before its request was kept)."""
    kwargs = case.as_transport_kwargs(base_url=base_url)
    return requests.Request(**{k: v for k, v in kwargs.items() if k in (
        "method", "url", "headers", "params", "data", "json", "cookies", "files")}).prepare()


def over_head(request: Any) -> bool:
    """Whether a request's head (request line and headers) is beyond what the gateway's HTTP server reads:
    such a request never reaches the API, and is refused with a plain 400 and a closed connection."""
    head = len(request.method) + len(request.path_url) + 12
    head += sum(len(name) + len(str(value)) + 4 for name, value in request.headers.items())
    return head > MAX_HEAD


def pin(path: str, known: dict[str, str]) -> dict[str, str] | None:
    """The known path parameters of an operation; None for one without any, or for the event stream (a
    stream of an existing job does not end, and test_gateway reads it)."""
    names = re.findall(r"{(\w+)}", path)
    if not names or path.endswith("/events"):
        return None
    kind = "submission" if "/submissions/" in path else "execution"
    return {name: known[kind if name == "id" else name] for name in names}


async def test_schemathesis_finds_no_server_error_and_no_reply_unlike_the_schema(stack, wait_for) -> None:  # noqa: F811
    api, gw, http = stack
    submitted = await http.put(f"{NS}/jobs", json={"spec": spec("fuzz-target")},
                               headers={"Idempotency-Key": "fuzz-target-1"})
    assert submitted.status_code == 200, submitted.text
    await settled(api, wait_for, "fuzz-target", 4)
    execution = (await http.get(f"{NS}/jobs/fuzz-target/executions", params={"limit": 1})).json()["items"][0]
    known = {"ns": "default", "job": "fuzz-target", "execution": execution["id"], "submission": "fuzz-target-1"}
    doc = (await http.get("/openapi.json")).json()

    started = time.monotonic()
    statuses, failures = await asyncio.to_thread(run_schemathesis, doc, f"http://127.0.0.1:{gw.port}", known)
    took = time.monotonic() - started
    print(f"\nschemathesis: {statuses.total()} requests in {took:.1f}s, statuses {dict(sorted(statuses.items(), key=str))}, "
          f"{len(failures)} failure(s)")
    assert statuses[200] >= len(doc["paths"]) and statuses[400] > 0, statuses  # both kinds of request were made
    assert not failures, "\n\n".join(failures[:20])

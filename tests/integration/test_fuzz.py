"""Seeded fuzzing of every public endpoint against the four real services.

Hostile inputs (see tests/fuzzing.py) go to every request-reply endpoint and to the submit subject,
mixed into otherwise valid bodies so that they reach the handlers' own checks. Then the contract:

1. every request is answered, never by a timeout or a 5xx: a structured error reply (400, 404 or 409,
   the same code in `Nats-Service-Error-Code`, a bounded message, no CR/LF in a header) or, for an
   input that happens to be valid, a normal reply; an error reply is small whatever the input's size;
   an input that is certainly invalid is a 400;
2. a 400 about a field names that field;
3. every submission is answered (a rejected outcome on its subject, under its Nats-Msg-Id or
   `seq-<N>`, or a dead letter for a namespace that is not a subject token), and the submissions
   stream is empty afterwards: nothing is retried for ever;
4. afterwards every service still serves: discovery pings and a valid call of every endpoint family.

SHOAL_FUZZ_EXAMPLES sets the inputs per endpoint (the submit subject gets twice as many: its body has
the most fields); SHOAL_FUZZ_SEED another deterministic run; SHOAL_FUZZ_REPORT a file to write every
violation to (the assertions quote the first few), with every reply to an input that might have been
valid.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from shared import subjects as s
from tests import fuzzing
from tests.fuzzing import Case, Context, Submission

pytestmark = pytest.mark.nats

EXAMPLES = int(os.environ.get("SHOAL_FUZZ_EXAMPLES", "200"))  # ~10 s here; bench/ runs thousands
SEED = int(os.environ.get("SHOAL_FUZZ_SEED", "20250611"))
REPORT = os.environ.get("SHOAL_FUZZ_REPORT", "")
NS = "fuzz"
ALLOWED_CODES = {400, 404, 409}
ERROR_REPLY_MAX = 8 * 1024  # bytes of an error reply, body and headers
MESSAGE_MAX = 1024  # characters of an error message
REQUEST_TIMEOUT = 10.0
IN_FLIGHT = 8
SHOWN = 12  # kinds of violation quoted per contract

SIM = {"simulate": {}}
ON_SIM_NODES = {"match_labels": {"fuzz": "yes"}}


# --------------------------------------------------------------------------------------------------
# Judging replies
# --------------------------------------------------------------------------------------------------


@dataclass
class Violations:
    """Contract -> what broke it, each with a minimal reproduction."""

    found: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # replies to inputs that might have been valid
    # 400s to inputs with several hostile fields that name none of them: contract 2 speaks of inputs that
    # target one field, so these are reported, not asserted.
    mixed: list[str] = field(default_factory=list)

    def field_missed(self, targets: tuple[str, ...], text: str) -> None:
        if len(targets) == 1:
            self.add(FIELD_NAMED, text)
        else:
            self.mixed.append(text)

    def add(self, contract: str, text: str) -> None:
        self.found.setdefault(contract, []).append(text)

    def of(self, contract: str) -> list[str]:
        return self.found.get(contract, [])

    def report(self, contract: str) -> str:
        """The violations grouped by what came back (one example of each, with how often), so that one
        frequent defect does not hide the others."""
        groups: dict[str, list[str]] = {}
        for item in self.of(contract):
            groups.setdefault(_shape(item), []).append(item)
        lines = [f"[x{len(found)}] {found[0]}" for found in sorted(groups.values(), key=len, reverse=True)]
        more = f"\n  ... and {len(lines) - SHOWN} more kinds" if len(lines) > SHOWN else ""
        return (f"{len(self.of(contract))} violation(s) of {len(lines)} kind(s):\n  - "
                + "\n  - ".join(lines[:SHOWN]) + more)


def _shape(violation: str) -> str:
    """What a violation says came back, without its particulars (numbers, the ends of quoted values)."""
    answer = re.sub(r"\d+", "N", violation.rpartition(" -> ")[2])
    return re.sub(r"'([^']{0,16})[^']*'", r"'\1'", answer)[:160]


UNANSWERED = "1a answered"
WELL_FORMED = "1b well-formed"
SMALL = "1c small"
INVALID_IS_400 = "1d invalid is 400"
FIELD_NAMED = "2 field named"
SUBMISSION_ANSWERED = "3a submission answered"
SUBMISSION_REJECTED = "3b submission rejected properly"
QUEUE_EMPTY = "3c queue empty"
STILL_SERVING = "4 still serving"


def names_target(reported: str | None, target: str) -> bool:
    """Whether an error's `field` names `target` (the path of a hostile value) or a path inside it."""
    if not reported:
        return False
    if reported == target or reported.startswith((target + ".", target + "[")):
        return True
    if reported.endswith("...") and target.startswith(reported[:-3]):
        return True  # a long field name, cut to fit the reply
    # A job's config is free-form JSON bounded as a whole (size, depth, numbers): an error may name the
    # config, or the part of it that holds the problem (msgspec writes a key inside it as "[...]").
    if target.startswith("spec.config") and reported.startswith("spec.config"):
        return reported == "spec.config" or reported.startswith("spec.config[") or target.startswith(reported + ".")
    return False


def header_bytes(headers: dict[str, str]) -> int:
    return sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())


def judge_reply(case: Case, data: bytes, headers: dict[str, str], v: Violations) -> str:
    """Check one reply against contracts 1 and 2; returns a short verdict for the tallies."""
    repro = case.describe()
    code_header = headers.get("Nats-Service-Error-Code")
    try:
        doc: Any = json.loads(data)
    except ValueError:
        doc = None
    is_error = code_header is not None or (isinstance(doc, dict) and "error" in doc)
    if not is_error:
        if not isinstance(doc, dict):
            v.add(WELL_FORMED, f"{repro} -> a reply that is not a JSON object: {data[:200]!r}")
            return "bad"
        if case.must_fail:
            v.add(INVALID_IS_400, f"{repro} -> answered as valid: {data[:300]!r}")
        else:
            v.notes.append(f"{repro} -> ok: {data[:150]!r}")
        return "ok"
    error = doc.get("error") if isinstance(doc, dict) else None
    if not (isinstance(error, dict) and isinstance(error.get("code"), int) and isinstance(error.get("message"), str)):
        v.add(WELL_FORMED, f"{repro} -> an error reply without {{error: {{code, message}}}}: {data[:300]!r} "
                           f"headers={headers}")
        return "bad"
    code, message, reported = error["code"], error["message"], error.get("field")
    if code_header != str(code):
        v.add(WELL_FORMED, f"{repro} -> Nats-Service-Error-Code {code_header!r} but body code {code}")
    if code not in ALLOWED_CODES:
        v.add(WELL_FORMED, f"{repro} -> code {code}: {message[:300]!r} (field {repr(reported)[:300]})")
    size = len(data) + header_bytes(headers)
    if size > ERROR_REPLY_MAX:
        v.add(SMALL, f"{repro} -> an error reply of {size} bytes (message {len(message)} characters)")
    if len(message) > MESSAGE_MAX:
        v.add(SMALL, f"{repro} -> an error message of {len(message)} characters")
    for name, value in headers.items():
        if "\r" in value or "\n" in value:
            v.add(SMALL, f"{repro} -> header {name} holds CR/LF: {value[:200]!r}")
    if not case.must_fail:
        v.notes.append(f"{repro} -> {code} field {reported!r}: {message[:150]!r}")
    if case.must_fail and code != 400:
        v.add(INVALID_IS_400, f"{repro} -> {code} instead of 400: {message[:200]!r}")
    if code == 400 and case.must_fail and case.targets and not any(names_target(reported, t) for t in case.targets):
        expected = " or ".join(map(repr, case.targets))[:300]
        v.field_missed(case.targets, f"{repro} -> field {repr(reported)[:300]}, expected {expected}: {message[:200]!r}")
    return str(code)


def judge_outcome(sub: Submission, data: bytes, v: Violations) -> None:
    repro = sub.describe()
    if len(data) > ERROR_REPLY_MAX:
        v.add(SMALL, f"{repro} -> an outcome of {len(data)} bytes")
    try:
        outcome = json.loads(data)
    except ValueError:
        v.add(SUBMISSION_REJECTED, f"{repro} -> an outcome that is not JSON: {data[:200]!r}")
        return
    if outcome.get("submission_id") != sub.answer_id or outcome.get("namespace") != sub.namespace:
        v.add(SUBMISSION_REJECTED, f"{repro} -> outcome for {outcome.get('namespace')!r}/"
                                   f"{outcome.get('submission_id')!r}, expected {sub.answer_id!r}")
    if not sub.must_fail:
        v.notes.append(f"{repro} -> {data[:300]!r}")
    if outcome.get("accepted"):
        if sub.must_fail:
            v.add(SUBMISSION_REJECTED, f"{repro} -> accepted: {data[:300]!r}")
        return
    error = outcome.get("error") or {}
    code, reported, message = error.get("code"), error.get("field"), str(error.get("message", ""))
    if code not in (400, 409):
        v.add(SUBMISSION_REJECTED, f"{repro} -> rejected with code {code}: {message[:300]!r}")
    if len(message) > MESSAGE_MAX:
        v.add(SMALL, f"{repro} -> an outcome message of {len(message)} characters")
    if sub.bad_id and reported != "Nats-Msg-Id":
        v.add(SUBMISSION_REJECTED, f"{repro} -> field {repr(reported)[:300]} for a bad Nats-Msg-Id: {message[:200]!r}")
    elif code == 400 and sub.must_fail and sub.targets and not any(names_target(reported, t) for t in sub.targets):
        expected = " or ".join(map(repr, sub.targets))[:300]
        v.field_missed(sub.targets, f"{repro} -> outcome field {repr(reported)[:300]}, expected {expected}: "
                                    f"{message[:200]!r}")


# --------------------------------------------------------------------------------------------------
# Talking to the cluster
# --------------------------------------------------------------------------------------------------


async def call(bus, subject: str, body: Any, timeout: float = REQUEST_TIMEOUT) -> Any:
    """A valid request: the decoded reply, or an AssertionError naming the error reply."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    msg = await bus.nc.request(subject, data, timeout=timeout)
    doc = json.loads(msg.data)
    if (msg.headers or {}).get("Nats-Service-Error-Code") or (isinstance(doc, dict) and "error" in doc):
        raise AssertionError(f"{subject} {data[:200]!r} -> {msg.data[:300]!r}")
    return doc


class TimedOut:
    """What `until` returns when its check never came true: falsy, and says what it last saw."""

    def __init__(self, last: Any) -> None:
        self.last = last

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"not within the wait; last: {self.last!r}"


async def until(check: Callable[[], Awaitable[Any]], timeout: float, interval: float = 0.2) -> Any:
    """`check()` once it is truthy, or a TimedOut."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = await check()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 - an error reply or a timeout while the view catches up
            last = exc
        if time.monotonic() > deadline:
            return TimedOut(last)
        await asyncio.sleep(interval)


async def submit_valid(bus, namespace: str, spec: dict[str, Any], submission_id: str) -> dict[str, Any]:
    waiter = await bus.nc.subscribe(s.submitted(namespace, submission_id), max_msgs=1)
    try:
        await bus.js.publish(s.submit(namespace), json.dumps({"spec": spec}).encode(),
                             headers={"Nats-Msg-Id": submission_id}, timeout=10)
        msg = await waiter.next_msg(timeout=20)
    finally:
        try:
            await waiter.unsubscribe()
        except Exception:  # noqa: BLE001 - already gone after its one message
            pass
    return json.loads(msg.data)


async def prepare(cluster, bus) -> Context:
    """Three simulated nodes, three jobs on them, and real page tokens to tamper with."""
    await cluster.start_services()
    await cluster.start("agent", simulate=3, sim_prefix="fz-sim-{i}", sim_labels=["fuzz=yes"])
    api = await cluster.api(NS)
    await api.wait_ready(3)
    specs = [
        {"name": "fuzz-a", "type": "pipeline", "config": SIM, "selector": ON_SIM_NODES},
        {"name": "fuzz-canary", "type": "pipeline", "config": SIM, "selector": ON_SIM_NODES,
         "rollout": {"strategy": "canary", "canary": {"canary_count": 1},
                     "health_check": {"deadline": "60s", "interval": "1s"}}},
        {"name": "fuzz-q", "type": "query", "config": {"simulate": {"duration": 0.1}}, "selector": ON_SIM_NODES},
    ]
    job_ids = []
    for i, spec in enumerate(specs):
        outcome = await submit_valid(bus, NS, spec, f"setup-{i}")
        assert outcome["accepted"], outcome
        job_ids.append(outcome["job_id"])

    async def listed() -> Any:
        page = await call(bus, s.api(NS, s.EXECUTIONS_LIST), {"job": "fuzz-a", "limit": 1})
        jobs = await call(bus, s.api(NS, s.JOBS_LIST), {"limit": 1})
        return (page, jobs) if page.get("next_token") and jobs.get("next_token") else None

    found = await until(listed, 30)
    assert found, "the fixture jobs' executions were never listed"
    executions, jobs = found
    nodes = await call(bus, s.NODES_LIST, {"limit": 1})
    all_execs = await call(bus, s.api(NS, s.EXECUTIONS_LIST), {"all_job_versions": True, "limit": 100})
    return Context(
        namespace=NS,
        jobs=[spec["name"] for spec in specs],
        job_ids=job_ids,
        execution_ids=[e["id"] for e in all_execs["items"]],
        nodes=["fz-sim-1", "fz-sim-2", "fz-sim-3"],
        node_pool=[f"fz-pool-{i}" for i in range(4)],
        tokens={"executions.list": executions["next_token"], "jobs.list": jobs["next_token"],
                "nodes.list": nodes.get("next_token", "")},
        submission_ids=["setup-0", "setup-1"],
    )


async def send_requests(bus, cases: Iterator[Case], v: Violations) -> tuple[list[Case], Counter]:
    """Send every case, IN_FLIGHT at a time, as the generator makes them; judge each reply."""
    sent: list[Case] = []
    verdicts: Counter = Counter()

    async def worker() -> None:
        for case in cases:  # generators are not shared across threads, only across these tasks: fine
            sent.append(case)
            try:
                msg = await bus.nc.request(case.subject, case.body, timeout=REQUEST_TIMEOUT, headers=case.headers)
            except Exception as exc:  # noqa: BLE001 - a timeout, no responders: all the same here
                case.sent()
                v.add(UNANSWERED, f"{case.describe()} -> no answer: {type(exc).__name__}: {exc}")
                verdicts[(case.endpoint, "unanswered")] += 1
                continue
            case.sent()
            verdicts[(case.endpoint, judge_reply(case, msg.data, dict(msg.headers or {}), v))] += 1

    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    return sent, verdicts


async def publish_submissions(bus, subs: Iterator[Submission]) -> list[Submission]:
    sent: list[Submission] = []

    async def worker() -> None:
        for sub in subs:
            sent.append(sub)
            headers = None if sub.msg_id is None else {"Nats-Msg-Id": sub.msg_id}
            try:
                ack = await bus.js.publish(s.submit(sub.namespace), sub.body, headers=headers, timeout=10)
            except Exception as exc:  # noqa: BLE001 - recorded; the stream never took it
                sub.publish_error = f"{type(exc).__name__}: {exc}"
            else:
                sub.seq, sub.duplicate = ack.seq, bool(ack.duplicate)
            sub.sent()

    await asyncio.gather(*(worker() for _ in range(4)))
    return sent


async def dead_letters(bus) -> dict[int, dict[str, Any]]:
    """Every dead letter taken from the submissions stream, by its sequence there."""
    out: dict[int, dict[str, Any]] = {}
    token = ""
    while True:
        page = await call(bus, s.DEAD_LETTERS_LIST, {"limit": 200, "next_token": token})
        for item in page["items"]:
            if item.get("stream") == s.STREAM_SUBMISSIONS:
                out[item["stream_seq"]] = item
        token = page.get("next_token", "")
        if not token:
            return out


async def check_submissions(bus, subs: list[Submission], outcomes: dict[tuple[str, str], bytes],
                            v: Violations) -> None:
    sent = [x for x in subs if not x.publish_error and not x.duplicate]
    answered = [x for x in sent if not x.dead]
    dead = [x for x in sent if x.dead]
    wait = 30 + len(sent) * 0.05

    async def all_outcomes() -> bool:
        return all((x.namespace, x.answer_id) in outcomes for x in answered)

    await until(all_outcomes, wait)
    for sub in answered:
        data = outcomes.get((sub.namespace, sub.answer_id))
        if data is None and fuzzing.NAMESPACE.fullmatch(sub.namespace):
            try:  # published before we listened, or lost: the kept outcome must be there
                msg = await bus.nc.request(s.api(sub.namespace, s.SUBMISSIONS_GET),
                                           json.dumps({"submission_id": sub.answer_id}).encode(), timeout=5)
                if not (msg.headers or {}).get("Nats-Service-Error-Code"):
                    data = msg.data
            except Exception:  # noqa: BLE001 - reported below as unanswered
                pass
        if data is None:
            v.add(SUBMISSION_ANSWERED, f"{sub.describe()} -> no outcome on "
                                       f"{s.submitted(sub.namespace, sub.answer_id)[:120]!r} within {wait:.0f}s")
            continue
        judge_outcome(sub, data, v)

    letters: dict[int, dict[str, Any]] = {}

    async def all_dead() -> bool:
        letters.update(await dead_letters(bus))
        return all(x.seq in letters for x in dead)

    if dead:
        await until(all_dead, 20, interval=0.5)
    for sub in dead:
        if sub.seq not in letters:
            v.add(SUBMISSION_ANSWERED, f"{sub.describe()} -> no dead letter for sequence {sub.seq}")

    async def empty() -> bool:
        return (await bus.stream_info(s.STREAM_SUBMISSIONS))["messages"] == 0

    if not await until(empty, 30, interval=0.5):
        info = await bus.stream_info(s.STREAM_SUBMISSIONS)
        v.add(QUEUE_EMPTY, f"{s.STREAM_SUBMISSIONS} still holds {info['messages']} message(s) "
                           f"(sequences {info['first_seq']}..{info['last_seq']}) 30 s after the last outcome")


async def check_still_serving(bus, v: Violations) -> None:
    """Every service answers discovery, and a valid call of each endpoint family works."""

    async def step(what: str, action: Callable[[], Awaitable[Any]], timeout: float = 20) -> Any:
        result = await until(action, timeout)
        if not result:
            v.add(STILL_SERVING, f"{what}: {result!r}"[:500])
            return None
        return result

    for service in s.SERVICES:
        await step(f"$SRV.PING.{service}", lambda service=service: call(bus, s.service_ping(service), b"", 5))
    ns = "fuzz-after"
    spec = {"name": "after-fuzz", "type": "pipeline", "config": SIM, "selector": ON_SIM_NODES}
    outcome = await step("submit a valid job", lambda: submit_valid(bus, ns, spec, "after-fuzz-1"))
    if outcome and not outcome.get("accepted"):
        v.add(STILL_SERVING, f"a valid job was rejected after the fuzzing: {outcome}")
    await step("submissions.get", lambda: call(bus, s.api(ns, s.SUBMISSIONS_GET), {"submission_id": "after-fuzz-1"}))
    await step("jobs.get", lambda: call(bus, s.api(ns, s.JOBS_GET), {"job": "after-fuzz"}))

    async def job_listed() -> bool:
        page = await call(bus, s.api(ns, s.JOBS_LIST), {})
        return any(j["name"] == "after-fuzz" for j in page["items"])

    await step("jobs.list lists the new job", job_listed)

    async def executions() -> list[dict[str, Any]]:
        return (await call(bus, s.api(ns, s.EXECUTIONS_LIST), {"job": "after-fuzz"}))["items"]

    items = await step("executions.list lists the new job's executions", executions, timeout=30)
    if items:
        await step("executions.get", lambda: call(bus, s.api(ns, s.EXECUTIONS_GET), {"id": items[0]["id"]}))
    await step("rollouts.status", lambda: call(bus, s.api(ns, s.ROLLOUT_STATUS), {"job": "after-fuzz"}))
    await step("jobs.stop", lambda: call(bus, s.api(ns, s.JOBS_STOP), {"job": "after-fuzz", "reason": "done"}))
    node = {"node_id": "after-fuzz-node", "labels": {"zone": "a"}, "hostname": "after.example.com"}
    await step("nodes.register", lambda: call(bus, s.node_register("after-fuzz-node", s.labels_digest({"zone": "a"})),
                                               node))

    async def node_listed() -> bool:
        page = await call(bus, s.NODES_LIST, {"selector": {"match_ids": ["after-fuzz-node"]}})
        return len(page["items"]) == 1

    await step("nodes.list lists the new node", node_listed)
    await step("deadletters.list", lambda: call(bus, s.DEAD_LETTERS_LIST, {"limit": 5}))


def tally(title: str, counts: Iterable[tuple[Any, int]]) -> str:
    return title + ", ".join(f"{k}={n}" for k, n in sorted(counts, key=lambda kv: str(kv[0])))


# --------------------------------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------------------------------


@pytest.mark.timeout(max(120, 60 + EXAMPLES // 5))  # bench/ runs thousands per endpoint
async def test_every_endpoint_survives_hostile_input(cluster, bus, subtests) -> None:
    started = time.monotonic()
    ctx = await prepare(cluster, bus)
    # One generator each: they are drawn from concurrently, so they must not share a random stream.
    cases = itertools.chain(fuzzing.pinned_cases(ctx),
                            fuzzing.request_cases(random.Random(f"{SEED}:requests"), ctx, EXAMPLES))
    subs = itertools.chain(fuzzing.pinned_submissions(ctx, tag=str(SEED)),
                           fuzzing.submissions(random.Random(f"{SEED}:submissions"), ctx, 2 * EXAMPLES, tag=str(SEED)))

    outcomes: dict[tuple[str, str], bytes] = {}

    async def on_outcome(msg) -> None:
        _, _, namespace, submission_id = msg.subject.split(".", 3)
        outcomes[(namespace, submission_id)] = msg.data

    listener = await bus.nc.subscribe(f"{s.SUBMITTED_PREFIX}.>", cb=on_outcome)
    v = Violations()
    fuzz_started = time.monotonic()
    (sent, verdicts), published = await asyncio.gather(send_requests(bus, cases, v),
                                                       publish_submissions(bus, subs))
    fuzz_seconds = time.monotonic() - fuzz_started
    await check_submissions(bus, published, outcomes, v)
    await listener.unsubscribe()
    await check_still_serving(bus, v)

    by_endpoint = Counter(c.endpoint for c in sent)
    print(f"\nfuzz seed {SEED}: {len(sent)} requests ({EXAMPLES} per endpoint, {len(by_endpoint)} endpoints, "
          f"{sum(c.family.startswith('pinned') for c in sent)} pinned) and "
          f"{len(published)} submissions ({sum(x.dead for x in published)} on non-token namespaces, "
          f"{sum(x.bad_id for x in published)} with bad ids, {sum(bool(x.publish_error) for x in published)} refused "
          f"by the client or stream) in {fuzz_seconds:.1f}s; {time.monotonic() - started:.1f}s in all; "
          f"{(sum(c.size for c in sent) + sum(x.size for x in published)) / 2**20:.0f} MiB sent")
    print(tally("  replies: ", Counter({f"{e}:{code}": n for (e, code), n in verdicts.items()}).items()))
    print(tally("  families: ", Counter(c.family.split("+")[0].split(":")[-1] for c in sent).items()))
    for sub in published:
        if sub.publish_error:
            print(f"  not published: {sub.describe(80)}: {sub.publish_error}")
    for contract in (UNANSWERED, WELL_FORMED, SMALL, INVALID_IS_400, FIELD_NAMED, SUBMISSION_ANSWERED,
                     SUBMISSION_REJECTED, QUEUE_EMPTY, STILL_SERVING):
        print(f"  {contract}: {len(v.of(contract))} violation(s)")
    print(f"  (not asserted) 400s naming none of several hostile fields: {len(v.mixed)}")

    if REPORT:
        with open(REPORT, "w", encoding="utf-8") as out:
            for contract, items in sorted(v.found.items()):
                out.write(f"== {contract}: {len(items)}\n" + "".join(f"{x}\n" for x in items))
            out.write(f"== 400s to inputs with several hostile fields naming none of them: {len(v.mixed)}\n")
            out.write("".join(f"{x}\n" for x in v.mixed))
            out.write(f"== replies to inputs that might have been valid: {len(v.notes)}\n")
            out.write("".join(f"{x}\n" for x in v.notes))

    with subtests.test(msg="1a: every request gets an answer, none times out"):
        assert not v.of(UNANSWERED), v.report(UNANSWERED)
    with subtests.test(msg="1b: every error reply is {error: {code, message}} with code 400, 404 or 409 in body "
                           "and header; every other reply a JSON object"):
        assert not v.of(WELL_FORMED), v.report(WELL_FORMED)
    with subtests.test(msg="1c: error replies stay small (8 KiB, 1 KiB message, no CR/LF in headers) whatever the "
                           "input size"):
        assert not v.of(SMALL), v.report(SMALL)
    with subtests.test(msg="1d: certainly invalid input is a 400, never a success or another error"):
        assert not v.of(INVALID_IS_400), v.report(INVALID_IS_400)
    with subtests.test(msg="2: a 400 about a field names that field"):
        assert not v.of(FIELD_NAMED), v.report(FIELD_NAMED)
    with subtests.test(msg="3a: every submission is answered: an outcome, or a dead letter for a non-token "
                           "namespace"):
        assert not v.of(SUBMISSION_ANSWERED), v.report(SUBMISSION_ANSWERED)
    with subtests.test(msg="3b: a bad submission is rejected with 400 or 409 under the right id and field"):
        assert not v.of(SUBMISSION_REJECTED), v.report(SUBMISSION_REJECTED)
    with subtests.test(msg="3c: nothing is retried for ever: the submissions stream empties"):
        assert not v.of(QUEUE_EMPTY), v.report(QUEUE_EMPTY)
    with subtests.test(msg="4: afterwards every service still answers pings and valid calls"):
        assert not v.of(STILL_SERVING), v.report(STILL_SERVING)

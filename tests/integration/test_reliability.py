"""Faults and hostile input against real services: nothing goes deaf, nothing is retried for ever.

Each test reproduces one way a service used to fail (an oversized error reply that made the server
close its connection, an id that became a wildcard key, a poison record that blocked a batch, a
crashed loop that stayed dead, a handover that waited out a 30 s ack wait) and checks what must hold.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import msgspec
import pytest

from shared import subjects as s
from shared.api import ListDeadLettersResponse
from shared.codec import to_json, to_msgpack
from shared.errors import InvalidInput, Poison, ShoalError
from shared.models import SubmissionOutcome
from shared.runtime import MAX_LOOP_CRASHES, Component
from shared.transport import Bus, Consumer, ConsumerSpec, Delivery, Kv, StreamSpec

pytestmark = pytest.mark.nats

SIM = {"simulate": {}}


async def raw_request(bus: Bus, subject: str, data: bytes, timeout: float = 5.0):
    """The reply as it is on the wire: body and headers."""
    msg = await bus.nc.request(subject, data, timeout=timeout)
    return msg.data, dict(msg.headers or {})


async def all_answer(bus: Bus) -> None:
    for name in s.SERVICES:
        await bus.request(s.service_ping(name), b"", timeout=2)


# -- a service never goes deaf ----------------------------------------------------------------------


@pytest.mark.parametrize(("subject", "body"), [
    (s.api("default", s.JOBS_GET), {"job": "\x7f" * 150_000}),
    (s.api("default", s.JOBS_STOP), {"job": "\x7f" * 150_000}),
    (s.api("default", s.ROLLOUT_RESUME), {"job": "\x7f" * 150_000}),
    (s.node_register("n1", s.labels_digest({})), {"node_id": "\x7f" * 150_000}),
    (s.node_register("n1", s.labels_digest({})), {"node_id": "n1", "hostname": "h" * 400_000}),
    (s.api("default", s.JOBS_LIST), {"x" * 400_000: 1}),
    (s.api("default", s.EXECUTIONS_LIST), {"job": "j", "next_token": "\x7f" * 150_000}),
])
async def test_an_error_about_a_huge_request_is_small_and_the_service_keeps_serving(cluster, bus, subject,
                                                                                  body) -> None:
    await cluster.start_services()
    data, headers = await raw_request(bus, subject, msgspec.json.encode(body))
    reply = json.loads(data)
    assert reply["error"]["code"] == 400 and reply["error"]["field"]
    assert len(data) + sum(len(k) + len(v) for k, v in headers.items()) < 4096
    assert "\n" not in headers["Nats-Service-Error"] and len(headers["Nats-Service-Error"]) <= 256
    # The same connection still serves (the server would have closed it for a reply over max_payload).
    await all_answer(bus)
    data, _ = await raw_request(bus, s.NODES_LIST, b"{}")
    assert json.loads(data) == {"items": []}


async def test_a_connection_closed_for_good_fails_the_component(cluster) -> None:
    """nats-py does not reconnect after the server refuses a connection with -ERR: the component must
    say so (its process then exits non-zero) instead of living on deaf."""
    query = await cluster.start("query")
    failed = asyncio.ensure_future(query.wait_failed())
    await asyncio.sleep(0.2)
    assert not failed.done()
    query.bus.nc._transport.write(b"NOT-A-PROTOCOL-LINE\r\n")  # the server answers -ERR and closes
    reason = await asyncio.wait_for(failed, 10)
    assert "NATS connection closed" in reason and query.bus.lost.is_set()


async def test_a_loop_that_crashes_is_restarted_and_one_that_keeps_crashing_fails_the_component(bus) -> None:
    component = Component(await Bus.connect(bus.nc.connected_url.geturl(), name="loops"), _settings(bus))
    runs = {"flaky": 0, "broken": 0}

    async def flaky() -> None:
        runs["flaky"] += 1
        if runs["flaky"] < 3:
            raise RuntimeError("boom")
        await asyncio.Event().wait()  # then it runs for good

    async def broken() -> None:
        runs["broken"] += 1
        raise RuntimeError("always")

    component.spawn(flaky, "flaky")
    await asyncio.sleep(1.0)
    assert runs["flaky"] == 3 and not component.failed.is_set()
    component.spawn(broken, "broken")
    reason = await asyncio.wait_for(component.wait_failed(), 60)
    assert runs["broken"] == MAX_LOOP_CRASHES and "broken" in reason and "always" in reason
    await component.stop()


def _settings(bus: Bus):
    from shared.settings import Settings

    return Settings(nats_url=bus.nc.connected_url.geturl())


async def test_the_scheduler_node_mirror_comes_back_after_its_watch_crashes(cluster, monkeypatch, wait_for) -> None:
    from shared.store import Mirror

    original = Mirror.run
    calls: dict[int, int] = {}

    async def crash_first(self, stopping):
        calls[id(self)] = calls.get(id(self), 0) + 1
        if calls[id(self)] == 1:
            raise RuntimeError("watch broke")
        await original(self, stopping)

    monkeypatch.setattr(Mirror, "run", crash_first)
    scheduler = await cluster.start("scheduler")
    await cluster.start("health")
    await cluster.start("agent", node_id="late-node")
    await wait_for(lambda: _mirror_has(scheduler, "late-node"))
    assert calls[id(scheduler.nodes)] == 2 and not scheduler.failed.is_set()


async def _mirror_has(scheduler, node_id: str) -> bool:
    return node_id in scheduler.nodes.items


# -- submission ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", ["*", ">", "..", "../../etc/passwd", "a b", "a.b", "x" * 5000, "seq-12"])
async def test_a_bad_submission_id_is_rejected_by_its_sequence_naming_the_header(cluster, bus, bad_id) -> None:
    await cluster.start("scheduler")
    api = await cluster.api()
    real = await api.submit({"name": "real", "type": "pipeline", "config": SIM}, submission_id="real-1")
    assert real.accepted
    ack = await bus.js_publish(s.submit("default"), to_json({"spec": {"name": "other", "type": "pipeline",
                                                                      "config": SIM}}), msg_id=bad_id)
    seq_id = f"seq-{ack.seq}"

    async def outcome() -> SubmissionOutcome | None:
        try:
            raw = await bus.request(s.api("default", s.SUBMISSIONS_GET), to_json({"submission_id": seq_id}))
        except ShoalError:
            return None
        return msgspec.json.decode(raw, type=SubmissionOutcome)

    found = await _eventually(outcome, 15)
    assert not found.accepted and found.error.code == 400 and found.error.field == "Nats-Msg-Id"
    assert found.submission_id == seq_id and seq_id in found.error.message
    # Nothing left to retry, and the other submission's outcome was neither matched nor touched.
    await _eventually(lambda: _empty(bus, s.STREAM_SUBMISSIONS), 10)
    again = await bus.request(s.api("default", s.SUBMISSIONS_GET), to_json({"submission_id": "real-1"}))
    assert msgspec.json.decode(again, type=SubmissionOutcome).job_id == real.job_id
    with pytest.raises(ShoalError):
        await api.get_job("other")


async def test_a_submission_on_a_namespace_that_is_not_a_token_is_a_dead_letter(cluster, bus) -> None:
    await cluster.start("scheduler")
    long_ns = "n" * 4060
    # A core publish (no JetStream ack); the stream captures it all the same.
    await bus.nc.publish(s.submit(long_ns), to_json({"spec": {"name": "x", "type": "query", "config": SIM}}),
                         headers={"Nats-Msg-Id": "long-ns-1"})
    dead = await _eventually(lambda: _dead_letters(bus), 15)
    assert dead.items[0].stream == s.STREAM_SUBMISSIONS and "namespace" in dead.items[0].error
    assert len(dead.items[0].subject) <= 512
    await _eventually(lambda: _empty(bus, s.STREAM_SUBMISSIONS), 10)
    api = await cluster.api()
    assert (await api.submit({"name": "after", "type": "pipeline", "config": SIM})).accepted


async def _dead_letters(bus: Bus) -> ListDeadLettersResponse | None:
    page = msgspec.json.decode(await bus.request(s.DEAD_LETTERS_LIST, b"{}"), type=ListDeadLettersResponse)
    return page if page.items else None


async def _empty(bus: Bus, stream: str) -> bool:
    return (await bus.stream_info(stream))["messages"] == 0


async def _eventually(check, timeout: float):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not true within {timeout}s")
        await asyncio.sleep(0.1)


# -- dead letters and hand-over ---------------------------------------------------------------------


WORK = StreamSpec(name="TEST_WORK", subjects=("test.work.*",), retention="workqueue")


async def test_a_message_that_keeps_failing_becomes_a_dead_letter_and_its_sender_is_answered(cluster, bus) -> None:
    await cluster.start("scheduler")  # lists dead letters
    await bus.ensure_stream(WORK)
    answered: list[tuple[int, str]] = []
    attempts: list[int] = []

    async def handler(d: Delivery) -> None:
        attempts.append(d.num_delivered)
        raise RuntimeError("cannot handle this")

    async def on_dead(d: Delivery, error: str) -> None:
        answered.append((d.stream_seq, error))

    consumer = Consumer(bus, ConsumerSpec(stream=WORK.name, durable="w", max_attempts=3), on_dead=on_dead)
    await consumer.start_single(handler)
    ack = await bus.js_publish("test.work.a", b"payload", headers={"Trace-Me": "yes"})
    page = await _eventually(lambda: _dead_letters(bus), 15)
    assert attempts == [1, 2, 3]
    letter = page.items[0]
    assert (letter.stream, letter.subject, letter.stream_seq, letter.consumer, letter.attempts) == (
        WORK.name, "test.work.a", ack.seq, "w", 3)
    assert "cannot handle this" in letter.error and letter.preview == "payload" and letter.size == 7
    assert answered == [(ack.seq, letter.error)]
    await _eventually(lambda: _empty(bus, WORK.name), 5)


async def test_poison_is_a_dead_letter_at_once(cluster, bus) -> None:
    await cluster.start("scheduler")
    await bus.ensure_stream(WORK)
    attempts: list[int] = []

    async def handler(d: Delivery) -> None:
        attempts.append(d.num_delivered)
        raise Poison("undecodable")

    await Consumer(bus, ConsumerSpec(stream=WORK.name, durable="w")).start_single(handler)
    await bus.js_publish("test.work.p", b"\xc1")
    await _eventually(lambda: _dead_letters(bus), 10)
    assert attempts == [1]


async def test_a_message_whose_handlers_keep_dying_is_not_run_again(cluster, bus) -> None:
    """Handed out more than max_attempts times and never acked (it crashed whoever took it)."""
    await cluster.start("scheduler")
    await bus.ensure_stream(WORK)
    spec = ConsumerSpec(stream=WORK.name, durable="w", max_attempts=2, ack_wait=1.0)
    await bus.js_publish("test.work.c", b"crasher")
    # Two replicas take it and die before acking.
    from nats.js.api import AckPolicy, ConsumerConfig

    config = ConsumerConfig(durable_name="w", ack_policy=AckPolicy.EXPLICIT, ack_wait=1.0, max_deliver=-1)
    for _ in range(2):
        dying = await Bus.connect(bus.nc.connected_url.geturl(), name="dying")
        sub = await dying.js.pull_subscribe("test.work.>", durable="w", stream=WORK.name, config=config)
        assert len(await sub.fetch(1, timeout=5)) == 1
        await dying.nc.close()
        await asyncio.sleep(1.2)
    ran: list[int] = []

    async def handler(d: Delivery) -> None:
        ran.append(d.num_delivered)

    await Consumer(bus, spec).start_single(handler)
    page = await _eventually(lambda: _dead_letters(bus), 10)
    assert ran == [] and "never acknowledged" in page.items[0].error


async def test_work_of_a_dead_replica_moves_to_a_live_one_within_seconds(bus) -> None:
    await bus.ensure_stream(WORK)
    taken = asyncio.Event()
    done: list[tuple[str, float]] = []
    loop = asyncio.get_running_loop()

    async def hang(d: Delivery) -> None:
        taken.set()
        await asyncio.Event().wait()

    async def finish(d: Delivery) -> None:
        done.append((d.subject, loop.time()))

    dying = await Bus.connect(bus.nc.connected_url.geturl(), name="dying")
    await Consumer(dying, ConsumerSpec(stream=WORK.name, durable="w")).start_single(hang)
    await bus.js_publish("test.work.x", b"job")
    await asyncio.wait_for(taken.wait(), 5)
    await dying.nc.close()  # killed: no ack, no nak
    died = loop.time()
    await Consumer(bus, ConsumerSpec(stream=WORK.name, durable="w")).start_single(finish)
    await _eventually(lambda: _true(done), 20)
    assert done[0][1] - died < 8  # the 5 s ack wait, not 30


async def test_a_slow_handler_keeps_its_message_while_it_works(bus) -> None:
    await bus.ensure_stream(WORK)
    deliveries: list[int] = []

    async def slow(d: Delivery) -> None:
        deliveries.append(d.num_delivered)
        await asyncio.sleep(7)  # longer than the ack wait: progress acks keep it

    other = await Bus.connect(bus.nc.connected_url.geturl(), name="other")
    spec = ConsumerSpec(stream=WORK.name, durable="w", ack_wait=2.0)
    await Consumer(bus, spec).start_single(slow)
    await Consumer(other, spec).start_single(slow)
    await bus.js_publish("test.work.s", b"long job")
    await asyncio.sleep(8)
    assert deliveries == [1]
    await other.close()


async def _true(items: list) -> bool:
    return bool(items)


# -- poison records ---------------------------------------------------------------------------------


async def test_a_poison_job_record_fails_only_its_own_events(cluster, bus, wait_for) -> None:
    await cluster.start_services()
    await cluster.start("agent", simulate=2)
    api = await cluster.api()
    await api.wait_ready(2)
    # A job record nobody can decode, and an execution event that makes the rollout service read it.
    poison_job = str(uuid.uuid4())
    await Kv(bus, s.BUCKET_JOBS).put(s.job_key("default", poison_job), b"\xc1 not msgpack")
    await Kv(bus, s.BUCKET_EXECUTIONS).put(s.execution_key("default", poison_job, "sim-0001", "e1"), to_msgpack({}))
    outcome = await api.submit({"name": "healthy", "type": "pipeline", "config": SIM})
    assert outcome.accepted

    async def running() -> bool:
        _, job = await api.get_job("healthy")
        return job.state.state_type == "running"

    await wait_for(running, 30)
    page = await _eventually(lambda: _dead_letters(bus), 30)
    assert any(poison_job in d.subject for d in page.items)
    for k in range(s.PARTITIONS):  # nothing left retrying (the poison's events are dead letters)
        assert await bus.consumer_pending(s.STREAM_EVENTS, s.consumer_rollout_partition(k)) in (None, 0)


# -- bounded input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "field"), [
    ({"job": "j", "job_version": 2**63}, "job_version"),
    ({"job": "j", "job_version": 10**30}, "job_version"),
    ({"job": "j", "limit": 2**64}, "limit"),
    ({"job": "\xff"}, "job"),
    ({"job": "j", "node_id": "a.b"}, "node_id"),
    ({"job": "*"}, "job"),
])
async def test_out_of_range_and_bad_request_fields_are_400s_naming_the_field(cluster, bus, body, field) -> None:
    await cluster.start("query")
    data = json.dumps(body).encode() if body.get("job") != "\xff" else b'{"job": "\xff"}'
    reply, _ = await raw_request(bus, s.api("default", s.EXECUTIONS_LIST), data)
    error = json.loads(reply)["error"]
    assert (error["code"], error["field"]) == (400, field)


async def test_invalid_utf8_is_a_400_naming_the_field_on_a_submission(cluster, bus) -> None:
    await cluster.start("scheduler")
    waiter = await bus.expect(s.submitted("default", "utf8-1"))
    await bus.js_publish(s.submit("default"),
                         b'{"spec": {"name": "u", "type": "query", "config": {"command": ["echo", "\xff"]}}}',
                         msg_id="utf8-1")
    outcome = msgspec.json.decode(await waiter.wait(10), type=SubmissionOutcome)
    assert not outcome.accepted and outcome.error.code == 400
    assert outcome.error.field == "spec.config.command[1]"


def test_an_invalid_input_error_stays_small() -> None:
    exc = InvalidInput("x" * 100_000, field="f" * 10_000)
    assert len(exc.message) <= 1024 and len(exc.field or "") <= 256

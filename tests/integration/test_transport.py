"""The transport against a real nats-server: CAS, watches with headers, consumers, endpoints, errors."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from shared import telemetry
from shared.errors import Conflict, InvalidInput, NotFound, Unavailable
from shared.store import Bucket, Record
from shared.transport import ApiRequest, ApiService, Bus, Consumer, ConsumerSpec, Delivery, Kv, StreamSpec

pytestmark = pytest.mark.nats


async def test_kv_compare_and_set(bus: Bus) -> None:
    kv = Kv(bus, "shoal_config")
    rev1 = await kv.create("k", b"one")
    with pytest.raises(Conflict):
        await kv.create("k", b"again")
    rev2 = await kv.update("k", b"two", last=rev1)
    assert rev2 > rev1
    with pytest.raises(Conflict):
        await kv.update("k", b"stale", last=rev1)
    entry = await kv.get("k")
    assert entry is not None and entry.value == b"two" and entry.revision == rev2
    await kv.delete("k")
    assert await kv.get("k") is None
    # A deleted key can be created again.
    await kv.create("k", b"three")
    assert (await kv.get("k")).value == b"three"  # type: ignore[union-attr]


async def test_kv_watch_keeps_headers_and_sees_updates(bus: Bus) -> None:
    kv = Kv(bus, "shoal_config")
    await kv.put("a.x", b"1", headers={"traceparent": "00-0123456789abcdef0123456789abcdef-0123456789abcdef-01"})
    await kv.put("b.x", b"other")
    seen = []
    async with kv.watch("a.*") as watch:
        it = watch.__aiter__()
        first = await asyncio.wait_for(it.__anext__(), 5)
        assert first is not None and first.key == "a.x"
        assert telemetry.trace_id_of(first.headers) == "0123456789abcdef0123456789abcdef"
        assert await asyncio.wait_for(it.__anext__(), 5) is None  # end of current values
        await kv.put("a.y", b"2")
        seen.append(await asyncio.wait_for(it.__anext__(), 5))
    assert [e.key for e in seen] == ["a.y"]
    assert [e.key for e in await kv.scan("*.x")] == ["a.x", "b.x"]
    assert await kv.scan("zzz.*") == []


async def test_consumer_redelivers_until_handled(bus: Bus) -> None:
    await bus.ensure_stream(StreamSpec(name="T_WORK", subjects=("t.work",), retention="workqueue"))
    attempts: list[int] = []
    done = asyncio.Event()

    async def handler(d: Delivery) -> None:
        attempts.append(d.num_delivered)
        if d.num_delivered < 3:
            raise RuntimeError("transient")
        done.set()

    consumer = Consumer(bus, ConsumerSpec(stream="T_WORK", durable="w"))
    await consumer.start_single(handler)
    await bus.js_publish("t.work", b"x", msg_id="m1")
    dup = await bus.js_publish("t.work", b"x", msg_id="m1")
    assert dup.duplicate
    await asyncio.wait_for(done.wait(), 10)
    assert attempts == [1, 2, 3]
    await consumer.stop()
    info = await bus.stream_info("T_WORK")
    assert info["messages"] == 0  # acked work leaves a work-queue stream


async def test_endpoint_structured_errors_and_recovery(bus: Bus, nats_url: str) -> None:
    async def handler(req: ApiRequest) -> bytes:
        if req.data == b"bad":
            raise InvalidInput("limit must be 1-1000", field="limit")
        if req.data == b"boom":
            raise RuntimeError("bug")
        return b'{"ok":true,"ns":"' + req.token(2).encode() + b'"}'

    await ApiService.start(bus, "t-svc", "0.0.1", "test", queue_group="t",
                           endpoints=[("echo", "shoal.v1.*.echo", handler)])
    client = await Bus.connect(nats_url, name="client")
    try:
        with pytest.raises(InvalidInput) as err:
            await client.request("shoal.v1.prod.echo", b"bad")
        assert err.value.field == "limit" and err.value.code == 400
        with pytest.raises(Exception) as boom:
            await client.request("shoal.v1.prod.echo", b"boom")
        assert getattr(boom.value, "code", None) == 500
        # The service keeps serving after both.
        assert await client.request("shoal.v1.prod.echo", b"ok") == b'{"ok":true,"ns":"prod"}'
        with pytest.raises(Unavailable):
            await client.request("shoal.v1.prod.nothing-here", b"", timeout=1)
    finally:
        await client.close()


async def test_connect_to_nowhere_is_unavailable() -> None:
    with pytest.raises(Unavailable) as err:
        await Bus.connect("nats://127.0.0.1:1", name="x")
    assert "cannot reach NATS" in str(err.value)


async def test_not_found_is_not_unavailable(bus: Bus) -> None:
    assert await Kv(bus, "shoal_config").get("missing") is None
    assert NotFound("x").code == 404


async def test_scan_pages_through_many_keys_and_leaves_nothing_on_the_server(bus: Bus) -> None:
    kv = Kv(bus, "shoal_config")
    await asyncio.gather(*(kv.put(f"big.k{i:05d}", str(i).encode()) for i in range(2500)))
    await kv.put("big.k00007", b"rewritten")
    await kv.delete("big.k00008")
    await kv.put("other.k1", b"x")
    entries = await kv.scan("big.*")
    assert len(entries) == 2499
    values = {e.key: e.value for e in entries}
    assert values["big.k00007"] == b"rewritten" and "big.k00008" not in values
    assert await kv.scan("nothing.*") == []
    # Far more scans than a stream allows consumers: none is left behind to hit that limit.
    results = await asyncio.gather(*(kv.scan("other.*") for _ in range(1200)))
    assert all(len(r) == 1 for r in results)
    async with kv.watch("other.*") as watch:
        assert (await watch.__aiter__().__anext__()).key == "other.k1"
    assert await bus.consumer_count(kv.stream) == 0


async def test_a_service_that_answers_ping_answers_every_endpoint(bus: Bus, nats_url: str) -> None:
    """Readiness checks ping a service and then use it: discovery must not come up before the endpoints."""
    names = [f"e{i}" for i in range(8)]

    def answer(name: str):
        async def handler(req: ApiRequest) -> bytes:
            return name.encode()
        return handler

    client = await Bus.connect(nats_url, name="client")
    try:
        async def first_ping() -> None:
            while True:
                try:
                    await client.request("$SRV.PING.t-ready", b"", timeout=0.2)
                    return
                except Unavailable:
                    await asyncio.sleep(0)

        pinger = asyncio.create_task(first_ping())
        await asyncio.sleep(0.05)
        starting = asyncio.create_task(ApiService.start(
            bus, "t-ready", "0.0.1", "test", queue_group="t",
            endpoints=[(name, f"shoal.v1.t.{name}", answer(name)) for name in names]))
        await asyncio.wait_for(pinger, 10)
        replies = await asyncio.gather(*(client.request(f"shoal.v1.t.{name}", b"", timeout=1) for name in names))
        assert list(replies) == [name.encode() for name in names]
        await starting
    finally:
        await client.close()


async def test_a_refused_connect_leaves_no_socket_open() -> None:
    """A server that refuses us (here: an authorization violation) must not leave our socket open until the
    garbage collector finds it (an unclosed transport, and a descriptor held by a retrying service)."""
    closed = asyncio.Event()

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'INFO {"server_id":"x","version":"2.10.0","max_payload":1048576,"headers":true}\r\n')
        await reader.readline()  # CONNECT
        writer.write(b"-ERR 'Authorization Violation'\r\n")
        await writer.drain()
        try:
            while await asyncio.wait_for(reader.read(1024), 3):
                pass
            closed.set()  # EOF: the client closed its end
        except asyncio.TimeoutError:
            pass
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    import gc
    gc.disable()  # (the collector would close it for us, by chance)
    try:
        with pytest.raises(Unavailable):
            await Bus.connect(f"nats://127.0.0.1:{port}", name="refused")
        await asyncio.wait_for(closed.wait(), 3)
    finally:
        gc.enable()
        server.close()


async def test_a_mutate_from_a_record_just_read_reads_only_after_a_conflict(bus: Bus) -> None:
    class Counter(msgspec.Struct):
        n: int

    bucket = Bucket(bus, "shoal_config", Counter)
    await bucket.create("c", Counter(n=1))
    reads = 0
    plain_get = bucket.get

    async def counted_get(key: str) -> Record[Counter] | None:
        nonlocal reads
        reads += 1
        return await plain_get(key)

    bucket.get = counted_get  # type: ignore[method-assign]

    def bump(c: Counter) -> bool:
        c.n += 1
        return True

    current = await plain_get("c")
    written = await bucket.mutate("c", bump, current=current)
    assert written is not None and written.value.n == 2 and reads == 0  # one write, no read
    # Someone else writes meanwhile: the stale record's write is refused, the key is read again and the
    # change applies to what is there now.
    stale = await plain_get("c")
    await bucket.update("c", Counter(n=10), last=written.revision)
    written = await bucket.mutate("c", bump, current=stale)
    assert written is not None and written.value.n == 11 and reads == 1
    assert (await plain_get("c")).value.n == 11  # type: ignore[union-attr]


async def test_a_fetch_takes_what_is_there_at_once_and_waits_only_for_a_first_message(bus: Bus) -> None:
    """One request per batch: what the consumer has comes back at once (not after the wait, however large
    the batch); with nothing there, the first message to come ends the wait; with nothing at all, [] after it."""
    import time

    from nats.js import api

    from shared.transport import Pull

    await bus.ensure_stream(StreamSpec(name="T_PULL", subjects=("t.pull",), retention="limits"))
    await bus.js.add_consumer("T_PULL", api.ConsumerConfig(durable_name="p", ack_policy=api.AckPolicy.EXPLICIT))
    for i in range(5):
        await bus.js_publish("t.pull", b"%d" % i)
    pull = Pull(bus, "T_PULL", "p")
    try:
        t0 = time.monotonic()
        first = await pull.fetch(2, 5.0)
        rest = await pull.fetch(100, 5.0)
        assert [m.data for m in first] == [b"0", b"1"] and [m.data for m in rest] == [b"2", b"3", b"4"]
        assert time.monotonic() - t0 < 2.0
        for m in first + rest:
            await m.ack()

        async def later() -> None:
            await asyncio.sleep(0.3)
            await bus.js_publish("t.pull", b"late")

        t0 = time.monotonic()
        publisher = asyncio.create_task(later())
        came = await pull.fetch(100, 5.0)
        await publisher
        assert [m.data for m in came] == [b"late"] and time.monotonic() - t0 < 2.0
        await came[0].ack()

        t0 = time.monotonic()
        assert await pull.fetch(100, 0.3) == []
        assert 0.25 <= time.monotonic() - t0 < 2.0
    finally:
        await pull.close()


async def test_a_fetch_from_a_consumer_that_is_not_there_is_unavailable(bus: Bus) -> None:
    import nats.js.errors

    from shared.transport import Pull

    await bus.ensure_stream(StreamSpec(name="T_PULL2", subjects=("t.pull2",), retention="limits"))
    pull = Pull(bus, "T_PULL2", "nobody")
    try:
        with pytest.raises(nats.js.errors.ServiceUnavailableError):
            await pull.fetch(10, 1.0)
    finally:
        await pull.close()


async def test_concurrent_requests_each_get_their_own_reply_or_time_out(bus: Bus) -> None:
    """Replies find their waiters on one subscription: 300 requests in flight at once to a responder that
    answers out of order each get the answer to their own question; one it never answers times out."""
    import random

    rng = random.Random(7)
    later: set[asyncio.Task[None]] = set()

    async def reply(msg) -> None:
        await asyncio.sleep(rng.uniform(0, 0.05))
        await bus.nc.publish(msg.reply, b"re:" + msg.data)

    async def answer(msg) -> None:
        if msg.data != b"never":
            task = asyncio.create_task(reply(msg))
            later.add(task)
            task.add_done_callback(later.discard)

    await bus.nc.subscribe("t.echo", cb=answer)
    questions = [b"%d" % i for i in range(300)]
    answers = await asyncio.gather(*(bus.request("t.echo", q, timeout=5) for q in questions))
    assert answers == [b"re:" + q for q in questions]
    with pytest.raises(Unavailable, match="timed out"):
        await bus.request("t.echo", b"never", timeout=0.3)
    with pytest.raises(Unavailable, match="nothing answers"):
        await bus.request("t.nobody", b"?", timeout=2)
    with pytest.raises(Unavailable, match="nothing answers"):
        await bus.js_publish("t.no.stream", b"?", timeout=2)


async def test_the_status_that_ends_an_abandoned_fetch_does_not_end_the_next(bus: Bus) -> None:
    """A fetch that gave up before the server ended its request (the caller was cancelled, the loop was
    slow) leaves that request's end to arrive later: the next fetch must not take it for its own and
    return empty while its own request is still waiting."""
    from nats.js import api

    from shared.transport import Pull

    await bus.ensure_stream(StreamSpec(name="T_PULL3", subjects=("t.pull3",), retention="limits"))
    await bus.js.add_consumer("T_PULL3", api.ConsumerConfig(durable_name="p", ack_policy=api.AckPolicy.EXPLICIT))
    pull = Pull(bus, "T_PULL3", "p")
    try:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(pull.fetch(10, 0.4), 0.05)  # its request ends (408) at 0.4 s

        async def later() -> None:
            await asyncio.sleep(0.8)
            await bus.js_publish("t.pull3", b"wanted")

        publisher = asyncio.create_task(later())
        got = await pull.fetch(10, 3.0)
        await publisher
        assert [m.data for m in got] == [b"wanted"]
    finally:
        await pull.close()


async def test_a_message_waiting_for_a_free_handler_is_kept_in_progress(bus: Bus) -> None:
    """Fetched messages wait for a free handler (concurrency 1 here) longer than the ack wait: the
    consumer tells the server they are in progress, so none is handed out again meanwhile."""
    await bus.ensure_stream(StreamSpec(name="T_QUEUED", subjects=("t.queued",), retention="workqueue"))
    handled: list[tuple[bytes, int]] = []
    done = asyncio.Event()

    async def slow(d: Delivery) -> None:
        handled.append((d.data, d.num_delivered))
        await asyncio.sleep(1.5)  # longer than the ack wait of 1 s
        if len(handled) >= 2:
            done.set()

    consumer = Consumer(bus, ConsumerSpec(stream="T_QUEUED", durable="q", ack_wait=1.0), batch=2, concurrency=1)
    for body in (b"first", b"second"):
        await bus.js_publish("t.queued", body)
    await consumer.start_single(slow)
    try:
        await asyncio.wait_for(done.wait(), 10)
        await asyncio.sleep(1.0)  # a redelivery, if any, would be handled by now
        assert sorted(handled) == [(b"first", 1), (b"second", 1)]
    finally:
        await consumer.stop()


async def test_a_consumer_whose_durable_is_deleted_makes_it_again_and_goes_on(bus: Bus) -> None:
    """An operator deletes a service's durable (or its stream is made again): the service must not stay
    alive and deaf. Its fetches go unanswered; it asks the server, learns the durable is gone, makes it
    again, and handles what comes next."""
    await bus.ensure_stream(StreamSpec(name="T_GONE", subjects=("t.gone",), retention="workqueue"))
    handled: list[bytes] = []
    consumer = Consumer(bus, ConsumerSpec(stream="T_GONE", durable="g"))
    await consumer.start_single(lambda d: _append(handled, d.data))
    try:
        await bus.js_publish("t.gone", b"before")
        await _until(lambda: handled == [b"before"], 5)
        await bus.js.delete_consumer("T_GONE", "g")
        await bus.js_publish("t.gone", b"after")
        await _until(lambda: handled == [b"before", b"after"], 10)
    finally:
        await consumer.stop()


async def _append(items: list[bytes], item: bytes) -> None:
    items.append(item)


async def _until(check, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "not within the time"
        await asyncio.sleep(0.05)

"""Job output end to end with real services, real agents and a real nats-server: what a command prints is
shipped in chunks into SHOAL_OUTPUT and read back through `executions.logs`.

The agents' look interval is shortened in some tests (`agent.output.interval`), so that a command of a
second makes many chunks; the bounds (4 KiB a chunk, 64 chunks of an execution, in the stream and in an
agent's memory) are the production ones.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
from nats.js.api import DiscardPolicy, RetentionPolicy

from services.agent.output import CHUNK, KEPT, OutputShipper
from services.agent.runstate import OUTPUT_FILE
from shared import subjects as s
from shared import topology
from shared.topology import OUTPUT_MESSAGE_BYTES
from shared.api import OUTPUT_CHUNK_BYTES, ExecutionLogsRequest, ExecutionLogsResponse, LogItem, OutputChunk
from shared.codec import from_msgpack, to_json
from shared.errors import ShoalError
from services.query import QueryService
from tests.integration.test_agent_restart import reaping
from shared.api import node_failure
from shared.models import OUTPUT_SUMMARY_CHARS, details

pytestmark = pytest.mark.nats

HELLO = "echo hello; echo oops >&2; sleep 1.5; echo bye"
HEALTH = {"interval": "200ms", "success_threshold": 2, "failure_threshold": 3, "deadline": "10s"}


def query_job(name: str, script: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "query", "config": {"command": ["sh", "-c", script]}, **extra}


async def logs(api, job: str, **fields: Any) -> ExecutionLogsResponse:
    return (await api.logs(ExecutionLogsRequest(job=job, **fields)))[1]


async def all_logs(api, job: str, after: int = 0, **fields: Any) -> list[LogItem]:
    items: list[LogItem] = []
    while True:
        page = await logs(api, job, after=after, **fields)
        if not page.items and page.next == after:
            return items
        items += page.items
        after = page.next


async def finished(api, job: str, count: int = 1, **fields: Any) -> list[LogItem] | None:
    """Every chunk of the job, once `count` executions have sent their final one."""
    items = await all_logs(api, job, **fields)
    return items if sum(i.final for i in items) >= count else None


def text_of(items: list[LogItem], execution_id: str | None = None) -> str:
    return "".join(i.text for i in items if execution_id is None or i.execution_id == execution_id)


async def stored(bus, subject: str) -> list[OutputChunk]:
    """The chunks SHOAL_OUTPUT holds on one subject."""
    return [from_msgpack(m.data, OutputChunk) for m in await bus.read_stream(s.STREAM_OUTPUT, subject, 1, 10_000)]




async def test_what_a_command_prints_comes_back_in_order_with_its_node_and_execution(cluster, wait_for) -> None:
    await cluster.start_services()
    agent = await cluster.start("agent", node_id="edge-1", labels={"tier": "edge"})
    agent.output.interval = 0.1  # so that `bye`, 1.5 s later, is a chunk of its own (even on a loaded machine)
    api = await cluster.api()
    await api.wait_ready(1)
    assert (await api.submit(query_job("hello", HELLO))).accepted
    items = await wait_for(lambda: finished(api, "hello"))
    [execution] = await api.all_executions("hello")

    assert text_of(items) == "hello\noops\nbye\n"  # stdout and stderr as they interleaved
    assert "bye\n" in [i.text for i in items]  # 1.5 s later: a chunk of its own (the final one may be empty)
    assert {(i.node_id, i.execution_id) for i in items} == {("edge-1", execution.id)}
    assert [i.seq for i in items] == list(range(1, len(items) + 1))
    assert [i.final for i in items] == [False] * (len(items) - 1) + [True]
    assert all(i.at.tzinfo is not None for i in items)

    # `after` goes on from a reply's `next`, one chunk at a time, with no repeat and nothing missed.
    walked: list[LogItem] = []
    after = None
    while True:
        page = await logs(api, "hello", after=after, limit=1)
        assert len(page.items) <= 1
        if not page.items:
            break
        walked += page.items
        after = page.next
    assert walked == items
    last = await logs(api, "hello", after=after)
    assert last.items == [] and last.next >= after  # nothing new: a follow polls from here
    # By execution, by node (an id or the job's name), and nothing for another node.
    assert (await logs(api, "hello", execution_id=execution.id)).items == items
    assert (await logs(api, execution.job_id, node_id="edge-1")).items == items
    assert (await logs(api, "hello", node_id="edge-2")).items == []


async def test_the_output_of_a_failing_command_is_job_output_and_its_details_keep_only_the_last_lines(
        cluster, wait_for) -> None:
    """`uname -a` then a failing `ls`: both reach `executions.logs` whole; the execution's details keep only
    the last lines (typed, ExecutionDetails.output), which is what its failure is told with."""
    await cluster.start_services()
    await cluster.start("agent", node_id="edge-1")
    api = await cluster.api()
    await api.wait_ready(1)
    script = 'uname -a; i=0; while [ $i -lt 200 ]; do echo "filler $i"; i=$((i+1)); done; ls /no/such/dir'
    assert (await api.submit(query_job("failing", script, restart_policy="never"))).accepted
    items = await wait_for(lambda: finished(api, "failing"))
    [execution] = await api.all_executions("failing")
    text = text_of(items)
    assert text.startswith(os.uname().sysname + " " + os.uname().nodename)
    assert "filler 0\n" in text and "filler 199\n" in text and "/no/such/dir" in text.splitlines()[-1]

    assert execution.observed == "failed" and details(execution).exit_code == 2
    kept = details(execution).output
    assert kept == execution.status.details["output"]  # the JSON shape: an open map, as the schema has it
    assert 0 < len(kept) <= OUTPUT_SUMMARY_CHARS and "uname" not in kept and "filler 0\n" not in kept
    assert kept.splitlines()[-1] == text.splitlines()[-1]
    assert "/no/such/dir" in node_failure("edge-1", execution).output


async def test_the_output_stream_keeps_a_tail_of_each_execution_for_seven_days(bus) -> None:
    await topology.ensure(bus)
    config = (await bus.js.stream_info(s.STREAM_OUTPUT)).config
    assert config.subjects == ["shoal.output.*.*.*.*"]
    assert config.max_msgs_per_subject == KEPT == 64  # the tail of each execution
    assert config.max_age == 7 * 86_400 and config.max_bytes == 1024 ** 3  # retention, and a bound on all of it
    assert config.discard == DiscardPolicy.OLD and config.retention == RetentionPolicy.LIMITS
    # A node that sends more than a chunk in one message is refused by the server (not stored, not read).
    assert config.max_msg_size == OUTPUT_MESSAGE_BYTES < 2 * OUTPUT_CHUNK_BYTES
    with pytest.raises(Exception):
        await bus.js_publish(s.output("edge-1", "default", "j", "e"), b"x" * (OUTPUT_MESSAGE_BYTES + 1))
    await bus.js_publish(s.output("edge-1", "default", "j", "e"), b"x" * OUTPUT_CHUNK_BYTES)


async def test_a_chatty_command_keeps_only_its_tail_in_chunks_of_at_most_4_kib(cluster, wait_for, bus,
                                                                                 monkeypatch) -> None:
    await cluster.start_services()
    agent = await cluster.start("agent", node_id="edge-1")
    agent.output.interval = 0.02
    api = await cluster.api()
    await api.wait_ready(1)
    # 300 KB at once, then 300 numbered lines over about 6 s: far more than 64 chunks of 4 KiB.
    script = ("yes 'burst burst burst burst burst' | head -n 10000; "
              "i=0; while [ $i -lt 300 ]; do printf 'line %03d\\n' $i; i=$((i+1)); sleep 0.02; done")
    assert (await api.submit(query_job("chatty", script))).accepted
    await wait_for(lambda: finished(api, "chatty"), timeout=30)
    # Read again once the final chunk is in: a walk made while chunks still arrived can hold one that the
    # stream has dropped since (the 65th newest).
    items = await all_logs(api, "chatty")
    [execution] = await api.all_executions("chatty")

    chunks = await stored(bus, s.output(execution.node_id, "default", execution.job_id, execution.id))
    assert len(chunks) == KEPT == 64  # the stream keeps an execution's last 64 chunks
    assert max(len(c.data) for c in chunks) <= CHUNK == 4096
    assert chunks[0].seq > 1 and chunks[-1].final
    assert [c.seq for c in chunks] == list(range(chunks[0].seq, chunks[0].seq + 64))
    assert [i.seq for i in items] == [c.seq for c in chunks]
    text = text_of(items)
    assert text.endswith("line 298\nline 299\n")
    assert "burst" not in text  # the burst came first: it was not kept
    assert all(c.data.startswith(b"line ") and c.data.endswith(b"\n") for c in chunks if c.data)  # whole lines

    # A reply stops before it would outgrow what one message may carry, and `next` goes on from there.
    [query] = [c for c in cluster.components if isinstance(c, QueryService)]
    monkeypatch.setattr(query, "_reply_budget", lambda: 2_000)
    first = await logs(api, "chatty", limit=1000)
    assert 1 <= len(first.items) < 64 and len(to_json(first)) < 2_000 + 4 * CHUNK
    assert first.next == max(m.seq for m in await bus.read_stream(s.STREAM_OUTPUT, s.output(
        execution.node_id, "default", execution.job_id, execution.id), 1, len(first.items)))
    assert first.items + await all_logs(api, "chatty", after=first.next) == items


async def test_an_agent_bounds_what_waits_for_nats_to_64_chunks_an_execution(cluster, wait_for, bus) -> None:
    """With nowhere to publish (SHOAL_OUTPUT gone), an agent keeps at most the last 64 chunks of 4 KiB of an
    execution, drops the oldest and counts them; once it can publish again, the newest arrive."""
    await cluster.start_services()
    agent = await cluster.start("agent", node_id="edge-1")
    shipper: OutputShipper = agent.output
    shipper.interval = 0.02
    api = await cluster.api()
    await api.wait_ready(1)
    await bus.delete_stream(s.STREAM_OUTPUT)
    script = "i=0; while [ $i -lt 200 ]; do printf 'line %03d %04000d\\n' $i 0; i=$((i+1)); sleep 0.02; done"
    assert (await api.submit(query_job("away", script))).accepted

    async def done() -> bool:
        return [e.observed for e in await api.all_executions("away")] == ["completed"]

    await wait_for(done, timeout=30)
    assert shipper.dropped > 0 and shipper.shipped == 0
    [queue] = shipper.pending.values()
    assert len(queue) == KEPT  # what capped it: 64 chunks, far below the agent's byte cap
    assert max(len(c.payload) for c in queue) <= CHUNK + 64
    assert shipper.pending_bytes <= KEPT * (CHUNK + 64) < shipper.max_pending_bytes

    await topology.ensure(bus)  # the stream is back: what waited goes out, the newest of it
    items = await wait_for(lambda: finished(api, "away"), timeout=30)
    assert len(items) == KEPT and items[-1].final
    assert text_of(items).endswith(f"line 199 {0:04000d}\n")
    assert items[0].seq == items[-1].seq - KEPT + 1 > 1


async def test_a_re_adopted_process_goes_on_shipping_from_where_the_file_was(cluster, wait_for, tmp_path) -> None:
    await cluster.start_services()
    work = tmp_path / "edge-1"
    agent = await cluster.start("agent", node_id="edge-1", work_dir=str(work))
    api = await cluster.api()
    await api.wait_ready(1)
    script = 'i=0; while true; do echo "n $i"; echo ok >> "$SHOAL_HEALTH_FILE"; i=$((i+1)); sleep 0.05; done'
    spec = {"name": "counter", "type": "pipeline", "config": {"command": ["sh", "-c", script]},
            "rollout": {"strategy": "rolling", "max_parallel": 100, "health_check": dict(HEALTH)}}
    assert (await api.submit(spec)).accepted
    with reaping(work):
        async def some() -> list[LogItem] | None:
            items = await all_logs(api, "counter")
            return items if len(items) >= 3 else None

        await wait_for(some)
        [execution] = await api.all_executions("counter")
        output = work / "executions" / execution.id / OUTPUT_FILE
        await agent.crash()  # kill -9: the command keeps printing
        cluster.components.remove(agent)
        printed_at_crash = output.read_text().count("\n")
        await asyncio.sleep(1.0)
        printed_while_down = output.read_text().count("\n")
        assert printed_while_down > printed_at_crash + 5
        await cluster.start("agent", node_id="edge-1", work_dir=str(work))

        async def caught_up() -> list[LogItem] | None:
            items = await all_logs(api, "counter")
            return items if text_of(items).count("\n") > printed_while_down + 5 else None

        items = await wait_for(caught_up)
        await api.stop_job("counter")
        numbers = [int(line.split()[1]) for line in text_of(items).splitlines()]
        assert numbers == sorted(set(numbers))  # in order, nothing twice
        assert set(range(printed_at_crash, printed_while_down)) <= set(numbers)  # printed while no agent watched
        seqs = [i.seq for i in items]
        assert seqs == sorted(set(seqs))  # the new agent's chunks go on from the old one's numbers


async def test_a_simulated_fleet_prints_its_line_and_a_config_job_its_files(cluster, wait_for) -> None:
    await cluster.start_services()
    await cluster.start("agent", simulate=3)
    api = await cluster.api()
    await api.wait_ready(3)
    spec = {"name": "sims", "type": "query", "config": {"simulate": {"output": "tick", "duration": 2.5}}}
    assert (await api.submit(spec)).accepted
    items = await wait_for(lambda: finished(api, "sims", 3), timeout=30)
    executions = {e.id: e.node_id for e in await api.all_executions("sims")}
    assert {i.node_id for i in items} == {"sim-0001", "sim-0002", "sim-0003"}
    for execution_id, node_id in executions.items():
        assert text_of(items, execution_id) == "tick\n" * 3  # at 0, 1 and 2 s
        assert {i.node_id for i in items if i.execution_id == execution_id} == {node_id}
    only = await all_logs(api, "sims", node_id="sim-0002")
    assert only and {i.node_id for i in only} == {"sim-0002"}

    # Without `output`, a simulated run prints nothing and sends nothing.
    assert (await api.submit({"name": "quiet", "type": "query", "config": {"simulate": {"duration": 0.1}}})).accepted

    async def quiet_done() -> bool:
        items = await api.all_executions("quiet")
        return len(items) == 3 and all(e.observed == "completed" for e in items)

    await wait_for(quiet_done)
    assert await all_logs(api, "quiet") == []


async def test_a_config_job_reports_the_files_it_wrote(cluster, wait_for, tmp_path) -> None:
    await cluster.start_services()
    work = tmp_path / "edge-1"
    await cluster.start("agent", node_id="edge-1", work_dir=str(work))
    api = await cluster.api()
    await api.wait_ready(1)
    spec = {"name": "conf", "type": "config",
            "config": {"files": [{"path": "app/a.conf", "content": "a"}, {"path": "b.conf", "content": "b"}]}}
    assert (await api.submit(spec)).accepted
    [item] = await wait_for(lambda: finished(api, "conf"))
    root = (work / "config").resolve()
    assert item.final and item.text == f"{root / 'app/a.conf'}\n{root / 'b.conf'}\n"


async def test_only_the_latest_version_by_default_and_only_what_the_view_places(cluster, wait_for, bus) -> None:
    await cluster.start_services()
    agent = await cluster.start("agent", node_id="edge-1")
    agent.output.interval = 0.1
    api = await cluster.api()
    await api.wait_ready(1)
    assert (await api.submit(query_job("twice", "echo first"))).accepted
    await wait_for(lambda: finished(api, "twice"))
    assert (await api.submit(query_job("twice", "echo second"))).accepted

    async def second() -> list[LogItem] | None:
        items = await all_logs(api, "twice")
        return items if text_of(items) == "second\n" else None

    await wait_for(second)
    [old] = [e for e in await api.all_executions("twice", all_job_versions=True) if e.job_version == 1]
    assert text_of(await all_logs(api, "twice", execution_id=old.id)) == "first\n"  # asked for by id: any version

    # A chunk under another node's id for this execution, or for an execution the view does not know, is
    # not shown (a node may publish only under its own id, but under it, on any subject).
    from shared.codec import to_msgpack
    from shared.durations import utcnow

    chunk = to_msgpack(OutputChunk(seq=9, data=b"forged\n", at=utcnow(), final=True))
    await bus.js_publish(s.output("edge-2", "default", old.job_id, old.id), chunk)
    await bus.js_publish(s.output("edge-1", "default", old.job_id, "no-such-execution"), chunk)
    await asyncio.sleep(2.5)  # past the hold for executions the view may not know yet
    assert "forged" not in text_of(await all_logs(api, "twice", execution_id=old.id))
    everything = await logs(api, "twice", after=0, limit=1000)
    assert "forged" not in text_of(everything.items)


@pytest.mark.parametrize(("body", "field"), [
    ({}, "job"),
    ({"job": ""}, "job"),
    ({"job": "a.b"}, "job"),
    ({"job": "x" * 129}, "job"),
    ({"job": "hello", "node_id": "bad id"}, "node_id"),
    ({"job": "hello", "node_id": "n" * 65}, "node_id"),
    ({"job": "hello", "execution_id": "e.>"}, "execution_id"),
    ({"job": "hello", "after": -1}, "after"),
    ({"job": "hello", "after": "1"}, "after"),
    ({"job": "hello", "limit": 0}, "limit"),
    ({"job": "hello", "limit": 1001}, "limit"),
    ({"job": "hello", "tail": 5}, "tail"),
])
async def test_bad_requests_are_400s_naming_the_field(cluster, body: dict[str, Any], field: str) -> None:
    await cluster.start("query")
    api = await cluster.api()
    with pytest.raises(ShoalError) as caught:
        await api.bus.request(s.api("default", s.EXECUTIONS_LOGS), to_json(body), timeout=10)
    assert (caught.value.code, caught.value.field) == (400, field), caught.value


async def test_a_bad_namespace_is_a_400_and_an_unknown_job_a_404(cluster) -> None:
    await cluster.start("query")
    api = await cluster.api()
    with pytest.raises(ShoalError) as caught:
        await api.bus.request(s.api("Bad_NS", s.EXECUTIONS_LOGS), to_json({"job": "x"}), timeout=10)
    assert (caught.value.code, caught.value.field) == (400, "namespace")
    with pytest.raises(ShoalError) as caught:
        await api.logs(ExecutionLogsRequest(job="no-such-job"))
    assert (caught.value.code, caught.value.field) == (404, "job")
    assert "no-such-job" in caught.value.message


async def test_a_chunk_the_stream_refuses_for_good_is_dropped_not_retried_and_newer_output_follows(bus) -> None:
    """A refusal that trying again cannot change (here: the stream takes no message that large) gives up
    that chunk at once, counted, and the execution's next chunks are not held behind it."""
    from services.agent.output import TextSource
    from shared.transport import StreamSpec
    from tests import builders

    await bus.ensure_stream(StreamSpec(name=s.STREAM_OUTPUT, subjects=(s.output("*", "*", "*", "*"),),
                                       max_msg_size=300))
    shipper = OutputShipper(bus, interval=0.02)
    shipper.start()
    try:
        big, small = builders.execution("edge-1", id="e-big"), builders.execution("edge-1", id="e-small")
        shipper.open(big, TextSource("x" * 1000))  # a chunk over the stream's limit
        shipper.open(small, TextSource("ok"))
        for _ in range(100):
            await asyncio.sleep(0.05)
            if shipper.dropped and shipper.shipped:
                break
        assert (shipper.dropped, shipper.shipped) == (1, 1)
        assert "e-big" not in shipper.pending  # given up at once, not waiting to be tried again
        shipper.close(big.id)  # its final chunk (empty) still goes out
        for _ in range(100):
            await asyncio.sleep(0.05)
            if not shipper.pending:
                break
        assert not shipper.pending and shipper.shipped == 2
    finally:
        await shipper.abandon()

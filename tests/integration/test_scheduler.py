"""The scheduler against a real server: submissions, versions, idempotency, structured rejections, stop."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from shared import subjects as s
from shared.api import ListJobExecutionsRequest
from shared.codec import to_json
from shared.models import SubmissionOutcome

pytestmark = pytest.mark.nats

SIM = {"simulate": {}}


def spec(name: str = "web", **extra) -> dict:
    body = {"name": name, "type": "pipeline", "config": dict(SIM)}
    body.update(extra)
    return body


async def test_submit_versions_and_unchanged_conflict(cluster, wait_for) -> None:
    await cluster.start("scheduler")
    api = await cluster.api()
    first = await api.submit(spec())
    assert isinstance(first, SubmissionOutcome) and first.accepted, first
    assert first.job_version == 1 and first.job_id and first.eval_id

    same = await api.submit(spec())
    assert not same.accepted and same.error.code == 409 and same.error.field == "spec"

    forced = await api.submit(spec(), force=True)
    assert forced.accepted and forced.job_version == 2 and forced.job_id == first.job_id
    assert any("unchanged" in w for w in forced.warnings)

    changed = await api.submit(spec(description="now with a description"))
    assert changed.accepted and changed.job_version == 3

    dry = await api.submit(spec(description="only a dry run"), dry_run=True)
    assert dry.accepted and dry.dry_run and dry.job_version == 4 and not dry.eval_id
    assert dry.plan is not None and dry.plan.no_match == ["no node has registered"]
    assert [(c.path, c.change) for c in dry.plan.changes] == [("description", "changed")]
    # The dry run applied nothing: the next real change is still version 4.
    after = await api.submit(spec(description="real"))
    assert after.job_version == 4


async def test_dry_run_explains_nodes_waves_and_changes(cluster) -> None:
    await cluster.start_services()
    await cluster.start("agent", simulate=4, sim_labels=["zone=z{i%2}", "tier=edge"])
    api = await cluster.api()
    await api.wait_ready(4)
    rolling = {"strategy": "rolling", "max_parallel": 50, "health_check": {"deadline": "1m"}}
    dry = await api.submit(spec("planned", selector={"match_labels": {"zone": "z1"}}, rollout=rolling), dry_run=True)
    assert dry.accepted and dry.dry_run and dry.plan is not None, dry
    plan = dry.plan
    assert (plan.ready_nodes, plan.matched_nodes, plan.node_ids) == (4, 2, ["sim-0001", "sim-0003"])
    assert plan.waves == [1, 1] and plan.strategy == "rolling" and plan.no_match == []
    assert plan.current_version == 0 and plan.changes == []

    nowhere = await api.submit(spec("nowhere", selector={"match_expressions": ["zone in (z7,z8)"]}), dry_run=True)
    assert nowhere.plan.matched_nodes == 0 and nowhere.plan.waves == []
    assert nowhere.plan.no_match == ["no ready node has zone in (z7,z8); 4 of the 4 ready nodes have a zone label"]

    # Against the current version: what the next one would change, and nothing applied.
    assert (await api.submit(spec("planned", selector={"match_labels": {"zone": "z1"}}, rollout=rolling))).accepted
    changed = await api.submit(spec("planned", selector={"match_labels": {"zone": "z1"}}, labels={"team": "a"},
                                    rollout={**rolling, "max_parallel": 100}), dry_run=True)
    assert changed.job_version == 2 and changed.plan.current_version == 1
    assert [(c.path, c.change, c.old, c.new) for c in changed.plan.changes] == [
        ("labels.team", "added", None, "a"), ("rollout.max_parallel", "changed", 50, 100)]
    assert changed.plan.waves == [2]
    again = await api.submit(spec("planned", selector={"match_labels": {"zone": "z1"}}, rollout=rolling), dry_run=True)
    assert not again.accepted and again.error.code == 409  # still version 1's spec: the dry run applied nothing


async def test_same_submission_id_is_processed_once(cluster) -> None:
    await cluster.start("scheduler")
    api = await cluster.api()
    one = await api.submit(spec("once"), submission_id="fixed-submission-1")
    two = await api.submit(spec("once"), submission_id="fixed-submission-1")
    assert one.accepted and two.accepted
    assert (one.job_id, one.job_version, one.eval_id) == (two.job_id, two.job_version, two.eval_id)


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        (b"{not json", None, "malformed JSON"),
        (to_json({"spec": {"name": "x", "type": "pipeline", "priority": "high", "config": SIM}}),
         "spec.priority", "expected `int`"),
        (to_json({"spec": {"name": "x", "type": "batch", "config": SIM}}), "spec.type", "pipeline"),
        (to_json({"spec": {"name": "x", "type": "pipeline", "config": SIM,
                           "selector": {"match_expressions": ["tier in (a,b"]}}}),
         "spec.selector.match_expressions[0]", "parenthes"),
        (to_json({"spec": {"name": "x", "type": "pipeline", "config": SIM,
                           "timeouts": {"execution_timeout": -5}}}), "spec.timeouts.execution_timeout", ">= 0"),
        (to_json({"spec": {"name": "x", "type": "pipeline", "config": SIM,
                           "timeouts": {"execution_timeout": 60, "queue_timeout": 60, "total_timeout": 100}}}),
         "spec.timeouts.total_timeout", "exceed"),
        (to_json({"spec": {"name": "x", "type": "pipeline", "config": SIM,
                           "meta": {"shoal.io/owner": "me"}}}), "spec.meta.shoal.io/owner", "reserved"),
        (to_json({"spec": {"name": "x", "type": "pipeline", "config": SIM, "rollout": {"strategy": "rolling"}}}),
         "spec.rollout.health_check", "health_check"),
        (to_json({"spec": {"name": "x", "type": "pipeline", "config": {"simulate": {"error_rate": 2}}}}),
         "spec.config.simulate.error_rate", "<= 1"),
        (to_json({"spec": {"name": "x", "type": "query"}}), "spec.config.command", "command"),
        (to_json({"spec": {"name": "x", "type": "config", "config": {"files": [{"path": "../etc/passwd",
                                                                                  "content": ""}]}}}),
         "spec.config.files[0].path", "relative"),
        (to_json({"spec": {"name": "bad name!", "type": "pipeline", "config": SIM}}), "spec.name", "job name"),
        (to_json({"spec": {"name": "x", "type": "pipeline", "config": SIM, "replicas": 3}}), "spec.replicas",
         "unknown field"),
        (to_json({"spec": {"name": "x", "type": "pipeline", "config": {"simulate": {}, "blob": "a" * 600_000}}}),
         None, "limit"),
    ],
)
async def test_bad_submissions_get_structured_errors(cluster, body: bytes, field: str | None, words: str) -> None:
    await cluster.start("scheduler")
    api = await cluster.api()
    bus = api.bus
    waiter = await bus.expect(s.submitted("default", "bad-1"))
    await bus.js_publish(s.submit("default"), body, msg_id="bad-1")
    reply = await waiter.wait(10)
    assert reply is not None
    outcome = msgspec.json.decode(reply, type=SubmissionOutcome)
    assert not outcome.accepted
    assert outcome.error.code == 400
    assert outcome.error.field == field
    assert words.lower() in outcome.error.message.lower()
    # The scheduler keeps serving.
    ok = await api.submit(spec("after-bad"))
    assert ok.accepted


async def test_namespace_comes_from_the_subject(cluster) -> None:
    await cluster.start("scheduler")
    api = await cluster.api("team-a")
    outcome = await api.submit(spec("ns-job"))
    assert outcome.accepted and outcome.namespace == "team-a"
    waiter = await api.bus.expect(s.submitted("team-a", "clash-1"))
    await api.bus.js_publish(s.submit("team-a"), to_json({"spec": spec("ns-job2", namespace="team-b")}),
                             msg_id="clash-1")
    clash = msgspec.json.decode(await waiter.wait(10), type=SubmissionOutcome)
    assert not clash.accepted and clash.error.field == "spec.namespace"
    bad_ns = await api.bus.expect(s.submitted("Team_A", "badns-1"))
    await api.bus.js_publish(s.submit("Team_A"), to_json({"spec": spec("x")}), msg_id="badns-1")
    rejected = msgspec.json.decode(await bad_ns.wait(10), type=SubmissionOutcome)
    assert not rejected.accepted and rejected.error.field == "namespace"


async def test_job_runs_on_matching_nodes_and_stop_stops_everything(cluster, wait_for) -> None:
    await cluster.start_services()
    await cluster.start("agent", simulate=4, sim_labels=["zone=z{i%2}"])
    api = await cluster.api()
    await api.wait_ready(4)
    outcome = await api.submit(spec("zoned", selector={"match_labels": {"zone": "z1"}}))
    assert outcome.accepted

    async def running() -> list:
        items = await api.all_executions("zoned")
        return items if len(items) == 2 and all(e.observed == "running" for e in items) else []

    items = await wait_for(running)
    assert sorted(e.node_id for e in items) == ["sim-0001", "sim-0003"]
    assert all(e.rollout_wave == 0 and e.job_version == 1 and e.status.stable_at for e in items)
    _, job = await api.get_job("zoned")
    await wait_for(lambda: _job_state(api, "zoned", "running"))

    stopped = await api.stop_job("zoned")
    assert stopped.job_id == job.id and not stopped.already_stopped

    async def all_stopped() -> bool:
        items = await api.all_executions("zoned")
        return all(e.desired == "stopped" and e.observed == "stopped" for e in items)

    await wait_for(all_stopped)
    await wait_for(lambda: _job_state(api, "zoned", "stopped"))
    again = await api.stop_job("zoned")
    assert again.already_stopped


async def test_node_joining_later_gets_pipeline_and_config_jobs(cluster, wait_for) -> None:
    await cluster.start_services()
    await cluster.start("agent", simulate=2)
    api = await cluster.api()
    await api.wait_ready(2)
    assert (await api.submit(spec("daemon"))).accepted
    query = {"name": "once", "type": "query", "config": {"simulate": {"duration": 0.1}}}
    assert (await api.submit(query)).accepted
    push = {"name": "push", "type": "config", "config": {"simulate": {"duration": 0.1}}}
    assert (await api.submit(push)).accepted
    await wait_for(lambda: _count(api, "daemon", "running", 2))
    await wait_for(lambda: _job_state(api, "once", "completed"))
    await wait_for(lambda: _job_state(api, "push", "completed"))
    await cluster.start("agent", simulate=1, sim_prefix="late-{i}")
    await wait_for(lambda: _count(api, "daemon", "running", 3))
    assert {e.node_id for e in await api.all_executions("daemon")} == {"sim-0001", "sim-0002", "late-1"}
    # A config push that completed everywhere still goes to the new node.
    await wait_for(lambda: _count(api, "push", "completed", 3))
    # A finished one-shot query does not chase new nodes.
    assert len(await api.all_executions("once")) == 2


async def test_unknown_job_reads_are_404(cluster) -> None:
    await cluster.start_services()
    api = await cluster.api()
    from shared.errors import NotFound

    with pytest.raises(NotFound):
        await api.list_executions(ListJobExecutionsRequest(job="nope"))
    with pytest.raises(NotFound):
        await api.stop_job("nope")


async def _job_state(api, name: str, state: str) -> bool:
    try:
        _, job = await api.get_job(name)
    except Exception:
        return False
    return job.state.state_type == state


async def _count(api, name: str, state: str, n: int) -> bool:
    items = await api.all_executions(name)
    return sum(e.observed == state for e in items) == n


async def test_a_submission_id_another_namespace_used_is_a_409_in_this_one(cluster) -> None:
    """Submission ids are kept across namespaces: one already used by another namespace (whose duplicate
    window has passed, so JetStream takes the message) is answered in this namespace, with a 409 naming
    the header, and the other namespace's outcome stays as it was."""
    from shared.durations import utcnow
    from shared.store import Store

    await cluster.start("scheduler")
    api = await cluster.api("team-b")
    store = Store(api.bus)
    theirs = SubmissionOutcome(submission_id="shared-1", namespace="team-a", accepted=True, job_id="j-a",
                               job_version=1, at=utcnow())
    await store.submissions.put("shared-1", theirs)
    waiter = await api.bus.expect(s.submitted("team-b", "shared-1"))
    await api.bus.js_publish(s.submit("team-b"), to_json({"spec": spec("mine")}), msg_id="shared-1")
    reply = await waiter.wait(10)
    assert reply is not None, "the submitter in team-b got no answer"
    outcome = msgspec.json.decode(reply, type=SubmissionOutcome)
    assert not outcome.accepted and outcome.namespace == "team-b"
    assert outcome.error.code == 409 and outcome.error.field == "Nats-Msg-Id"
    kept = await store.submissions.get("shared-1")
    assert kept is not None and kept.value.namespace == "team-a" and kept.value.accepted


async def test_a_submission_publishes_its_plan_itself_once(cluster) -> None:
    """A job registered is evaluated as its submission is handled: its deploy plan goes out under the
    evaluation's id, nothing goes through the evaluations stream, and handling the same submission again
    (a redelivery after a crash before the outcome was stored) publishes no second plan."""
    from services.scheduler.submissions import Submissions
    from shared.codec import from_msgpack
    from shared.models import Plan
    from shared.store import Store

    scheduler = await cluster.start("scheduler")
    api = await cluster.api()
    outcome = await api.submit(spec("planned-here"), submission_id="plan-once-1")
    assert outcome.accepted and outcome.eval_id, outcome

    async def plans() -> list[Plan]:
        found = await api.bus.read_stream(s.STREAM_PLANS, "shoal.plan.>", 1, 100)
        return [p for p in (from_msgpack(m.data, Plan) for m in found) if p.job_id == outcome.job_id]

    [plan] = await plans()
    assert (plan.eval_id, plan.kind, plan.job_version, plan.node_ids) == (outcome.eval_id, "deploy", 1, [])
    assert await api.bus.read_stream(s.STREAM_EVALS, s.evaluation("default"), 1, 10) == []

    again = Submissions(api.bus, Store(api.bus), evaluations=scheduler.evaluations)
    redone = await again._process("default", "plan-once-1", to_json({"spec": spec("planned-here")}))
    assert (redone.job_id, redone.job_version, redone.eval_id) == (outcome.job_id, 1, outcome.eval_id)
    assert len(await plans()) == 1


async def test_the_jobs_mirror_takes_writes_in_batches_and_catches_up_on_demand(cluster, wait_for) -> None:
    """The scheduler's copy of the jobs that want new nodes fetches what was written only every `pace`
    seconds, but a node join (catch_up) gets every job written before it at once."""
    import asyncio

    scheduler = await cluster.start("scheduler")
    api = await cluster.api()
    mirror = scheduler.jobs
    mirror.pace = 60.0
    first = await api.submit(spec("first-daemon"))
    await wait_for(lambda: _in_mirror(mirror, first.job_id), timeout=5)  # the last short wait, then a long one
    await asyncio.sleep(0.5)
    second = await api.submit(spec("second-daemon"))
    await asyncio.sleep(0.5)
    assert not _has(mirror, second.job_id), "the mirror fetched again without waiting its pace"
    assert await asyncio.wait_for(mirror.catch_up(), 5)
    assert _has(mirror, second.job_id)


def _has(mirror, job_id: str) -> bool:
    return f"default.{job_id}" in mirror.items


async def _in_mirror(mirror, job_id: str) -> bool:
    return _has(mirror, job_id)


async def test_a_profiled_scheduler_leaves_its_profile_when_it_stops(cluster, monkeypatch, tmp_path) -> None:
    import os
    import pstats

    from services.scheduler.service import PROFILE_ENV

    monkeypatch.setenv(PROFILE_ENV, str(tmp_path))
    scheduler = await cluster.start("scheduler")
    api = await cluster.api()
    assert (await api.submit(spec("profiled"))).accepted
    await cluster.stop(scheduler)
    profile = tmp_path / f"scheduler-{os.getpid()}.prof"
    assert "_process" in pstats.Stats(str(profile)).get_stats_profile().func_profiles


async def test_a_dry_run_reads_the_schedulers_nodes_mirror_not_the_nodes_bucket(cluster) -> None:
    """A dry run costs what it reads: the fleet from the scheduler's mirror, never a scan of the bucket."""
    for kind in ("health", "rollout", "query"):
        await cluster.start(kind)
    scheduler = await cluster.start("scheduler")
    await cluster.start("agent", simulate=3, sim_labels=["tier=edge"])
    api = await cluster.api()
    await api.wait_ready(3)

    async def no_scan(*args, **kwargs):
        raise AssertionError("a dry run scanned the nodes bucket")

    scheduler.store.nodes.scan = no_scan
    for _ in range(50):
        if len(scheduler.nodes.items) == 3:
            break
        await asyncio.sleep(0.1)
    dry = await api.submit(spec("mirrored", selector={"match_labels": {"tier": "edge"}}), dry_run=True)
    assert dry.accepted and dry.plan is not None and dry.plan.matched_nodes == 3, dry

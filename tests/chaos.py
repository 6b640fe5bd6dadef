"""The chaos scenario, shared by the suite (tests/e2e/test_chaos.py, one bounded round) and the
benchmark (bench/chaos.py, many rounds).

Everything runs as deployed: nats-server, two processes of every service, and a simulated fleet in
its own agent process, all supervised by `Stack` (a dead process is restarted with backoff). A job is
rolled out to the fleet, then updated with a rolling update; meanwhile one-shot jobs are submitted
(some twice with the same Nats-Msg-Id), and random processes, the fleet agent and nats-server itself
are killed with SIGKILL. Then the chaos stops, and each guarantee is checked on its own:

1. the rollout completes (the new version is healthy, so it must succeed, with no failed node);
2. every query replica's view equals the buckets, walked page by page through the API;
3. no node is bare and none has two executions desired running; ended executions are not desired;
4. every submission is applied exactly once;
5. every replica of every service answers.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.cli.client import Client
from services.cli.stack import Stack, process_names
from shared.natsserver import NatsCluster
from shared import subjects as s
from shared.api import ListJobExecutionsRequest, ListJobsRequest, ListNodesRequest
from shared.codec import to_json
from shared.errors import ShoalError
from shared.models import SubmissionOutcome
from shared.store import Store
from shared.transport import Bus
from tests.invariants import placement_problems

ENV = {
    "SHOAL_HEARTBEAT_INTERVAL": "0.5",
    "SHOAL_NODE_TIMEOUT": "4",
    "SHOAL_SWEEP_INTERVAL": "0.25",
    "SHOAL_LOST_GRACE": "30",
    "SHOAL_RESTART_BACKOFF_BASE": "0.2",
    "SHOAL_RESTART_BACKOFF_MAX": "2",
    "SHOAL_STALL_GRACE": "20",
}
JOB = "fleet-svc"
HEALTH = {"interval": "500ms", "success_threshold": 3, "failure_threshold": 2, "deadline": "20s"}
SERVICES = ("scheduler", "rollout", "health", "query")
CHECKS = ("rollout", "views", "placement", "submissions", "services")


@dataclass
class Chaos:
    data_dir: Path
    seed: int = 1
    nodes: int = 40
    replicas: int = 2
    chaos_seconds: float = 40.0  # how long processes are killed (the rolling update runs meanwhile)
    kill_every: tuple[float, float] = (1.5, 3.5)
    down_for: tuple[float, float] = (0.3, 2.0)
    settle_seconds: float = 90.0
    submissions: int = 12
    # On a NATS cluster of this many nodes (0: one nats-server run by the stack) with streams and buckets
    # replicated to all of them; one node is killed for good when the rolling update reaches its third wave.
    cluster: int = 0
    kill_processes: bool = True
    log: list[str] = field(default_factory=list)

    def say(self, line: str) -> None:
        self.log.append(f"{time.strftime('%H:%M:%S')} {line}")


@dataclass
class Report:
    seed: int
    faults: list[str] = field(default_factory=list)
    problems: dict[str, list[str]] = field(default_factory=lambda: {c: [] for c in CHECKS})
    rollout_seconds: float = 0.0
    settle_seconds: float = 0.0
    replicas: dict[str, int] = field(default_factory=dict)  # of every stream (buckets are streams too)

    @property
    def ok(self) -> bool:
        return not any(self.problems.values())

    def summary(self) -> str:
        bad = {k: v[:5] for k, v in self.problems.items() if v}
        return (f"seed {self.seed}: {len(self.faults)} faults, rollout {self.rollout_seconds:.1f}s, "
                f"settled in {self.settle_seconds:.1f}s: " + ("all guarantees held" if not bad else json.dumps(bad)))


def run(chaos: Chaos) -> Report:
    """One round: start the stack, roll out under faults, check, stop."""
    cluster = NatsCluster(chaos.data_dir / "nats", chaos.cluster).start() if chaos.cluster else None
    env = dict(ENV, SHOAL_JS_REPLICAS=str(chaos.cluster or 1))
    try:
        stack = Stack(chaos.data_dir / "stack", nodes=0, simulate=chaos.nodes, replicas=chaos.replicas, env=env,
                      nats_url=cluster.url if cluster else "", backoff_base=0.2, backoff_max=2.0,
                      stable_after=5.0).start()
        try:
            return asyncio.run(_round(chaos, stack, cluster))
        finally:
            stack.stop()
    finally:
        if cluster is not None:
            cluster.stop()


async def _round(chaos: Chaos, stack: Stack, cluster: NatsCluster | None) -> Report:
    rng = random.Random(chaos.seed)
    report = Report(seed=chaos.seed)
    bus = await Bus.connect(stack.nats_url, name="chaos", wait=30)
    client = Client(bus, timeout=5)
    try:
        await client.wait_ready(chaos.nodes, timeout=90)
        report.replicas = {name: await bus.replicas_of(name) for name in await bus.stream_names()}
        v1 = await _submit_until_answered(client, _spec(1), "chaos-v1")
        await _until(lambda: _quietly(_rollout_done(client, 1)), 90)
        await _submit_until_answered(client, _spec(2), "chaos-v2")
        started = time.monotonic()
        stop = asyncio.Event()
        submitted: dict[str, str] = {}
        tasks = [asyncio.create_task(_submit_loop(chaos, bus, rng, submitted, stop)),
                 asyncio.create_task(_follow_rollout(chaos, client, report, started, stop, cluster))]
        if chaos.kill_processes:
            tasks.append(asyncio.create_task(_kill_loop(chaos, stack, rng, report, stop)))
        await asyncio.sleep(chaos.chaos_seconds)
        stop.set()
        await asyncio.gather(*tasks)
        # Faults are over: the supervisor brings back whatever is still down.
        await _until(lambda: _all_alive(stack), 60)
        settle = time.monotonic()
        await _check_rollout(client, report, chaos)
        if not report.rollout_seconds:
            report.rollout_seconds = time.monotonic() - started
        await _check_placement(client, report, chaos)
        await _check_submissions(client, bus, submitted, report, chaos)
        await _check_views(stack, client, bus, report, chaos)
        await _check_services(bus, report, chaos)
        report.settle_seconds = time.monotonic() - settle
        assert v1.accepted
        return report
    finally:
        await bus.close()


def _spec(version: int) -> dict[str, Any]:
    """Version 1 goes everywhere at once; version 2 is a rolling update of ten health-gated waves."""
    rollout: dict[str, Any] = {"strategy": "immediate"}
    if version > 1:
        rollout = {"strategy": "rolling", "max_parallel": 10, "health_check": dict(HEALTH)}
    return {"name": JOB, "type": "pipeline", "description": f"version {version}", "restart_policy": "on-failure",
            "config": {"simulate": {}}, "rollout": rollout}


# -- faults -----------------------------------------------------------------------------------------


async def _kill_loop(chaos: Chaos, stack: Stack, rng: random.Random, report: Report, stop: asyncio.Event) -> None:
    # Every kind of process in turn, in a random order: each round hits each of them once before any twice.
    victims = [n for svc in SERVICES for n in process_names(svc, chaos.replicas)] + ["fleet", "nats"]
    rng.shuffle(victims)
    turn = 0
    next_kill = time.monotonic() + rng.uniform(*chaos.kill_every)
    while not stop.is_set():
        now = time.monotonic()
        for line in stack.supervise_once(now):
            chaos.say(line)
        if now >= next_kill:
            victim = victims[turn % len(victims)]
            turn += 1
            if stack.process(victim) is not None and victim not in stack.dead():
                stack.kill(victim, signal.SIGKILL)
                report.faults.append(victim)
                chaos.say(f"killed {victim}")
            next_kill = now + rng.uniform(*chaos.kill_every)
        await asyncio.sleep(0.1)


async def _all_alive(stack: Stack) -> bool:
    stack.supervise_once()
    return not stack.dead()


async def _follow_rollout(chaos: Chaos, client: Client, report: Report, started: float,
                          stop: asyncio.Event, cluster: NatsCluster | None) -> None:
    """Log each step of the rolling update, so that a round's log shows which faults hit it (and, on a
    cluster, kill one NATS node for good at the third wave)."""
    last = ""
    while not stop.is_set():
        try:
            _, st = await client.rollout(s.ROLLOUT_STATUS, JOB)
            if cluster is not None and st.job_version == 2 and st.current_wave >= 3 and "nats-n2" not in report.faults:
                cluster.servers[1].kill()
                report.faults.append("nats-n2")
                chaos.say("killed nats-server n2 (for good)")
            line = f"rollout of version {st.job_version}: {st.state}, wave {st.current_wave}/{st.total_waves}"
            if st.rollback_of:
                line += f" (rollback of {st.rollback_of})"
            if line != last:
                chaos.say(line)
                last = line
                if st.job_version == 2 and st.state == "succeeded" and not report.rollout_seconds:
                    report.rollout_seconds = time.monotonic() - started
        except ShoalError:
            pass
        await asyncio.sleep(0.5)


# -- submissions ------------------------------------------------------------------------------------


async def _submit_loop(chaos: Chaos, bus: Bus, rng: random.Random, submitted: dict[str, str],
                       stop: asyncio.Event) -> None:
    """One-shot jobs with known ids, some published twice; each publish retried until JetStream has it."""
    i = 0
    while not stop.is_set() and i < chaos.submissions:
        sid = f"chaos-{chaos.seed}-{i}"
        name = f"probe-{i}"
        body = to_json({"spec": {"name": name, "type": "query", "config": {"simulate": {"exit_code": 0}},
                                 "selector": {"match_ids": [f"sim-{rng.randint(1, chaos.nodes):04d}"]}}})
        for _ in range(2 if rng.random() < 0.4 else 1):
            await _publish(bus, s.submit("default"), body, sid)
        submitted[sid] = name
        i += 1
        await asyncio.sleep(rng.uniform(0.5, 2.0))


async def _publish(bus: Bus, subject: str, body: bytes, msg_id: str) -> None:
    for _ in range(120):
        try:
            await bus.js_publish(subject, body, msg_id=msg_id, timeout=2)
            return
        except ShoalError:
            await asyncio.sleep(0.5)  # NATS is down for a moment
    raise AssertionError(f"could not publish {msg_id}")


async def _submit_until_answered(client: Client, spec: dict[str, Any], sid: str) -> SubmissionOutcome:
    async def once() -> SubmissionOutcome | None:
        outcome = await client.submit(spec, submission_id=sid, wait=5)
        return outcome if isinstance(outcome, SubmissionOutcome) else None

    outcome = await _until(lambda: _quietly(once()), 60)
    if not outcome.accepted:
        raise AssertionError(f"submission {sid} rejected: {outcome.error}")
    return outcome


# -- checks -----------------------------------------------------------------------------------------


async def _rollout_done(client: Client, version: int) -> bool:
    """The rollout of `version` has ended: succeeded, failed, or rolled back."""
    _, st = await client.rollout(s.ROLLOUT_STATUS, JOB)
    ended = st.state in ("succeeded", "failed")
    return ended and (st.job_version == version and not st.rollback_of or st.rollback_of == version)


async def _check_rollout(client: Client, report: Report, chaos: Chaos) -> None:
    try:
        await _until(lambda: _quietly(_rollout_done(client, 2)), chaos.settle_seconds)
    except AssertionError:
        pass
    _, st = await client.rollout(s.ROLLOUT_STATUS, JOB)
    if (st.job_version, st.state, st.rollback_of, st.failed_nodes) != (2, "succeeded", 0, []):
        why = "; ".join(f"{f.node_id}: {f.state} {f.reason or ''} {f.message} at {f.at}".replace("  ", " ")
                        for f in st.failures[:5])
        report.problems["rollout"].append(
            f"version {st.job_version} rollout is {st.state} (rollback of {st.rollback_of}, failed nodes "
            f"{st.failed_nodes[:5]}): {st.message}" + (f" [why: {why}]" if why else ""))


async def _placement(client: Client, chaos: Chaos) -> list[str]:
    items = await client.all_executions(JOB, all_job_versions=True)
    return placement_problems(items, 2, (f"sim-{i:04d}" for i in range(1, chaos.nodes + 1)))


async def _check_placement(client: Client, report: Report, chaos: Chaos) -> None:
    last: list[str] = []

    async def ok() -> bool:
        nonlocal last
        last = await _placement(client, chaos)
        return not last

    try:
        await _until(lambda: _quietly(ok()), chaos.settle_seconds)
    except AssertionError:
        report.problems["placement"].extend(last or ["could not be read"])


async def _check_submissions(client: Client, bus: Bus, submitted: dict[str, str], report: Report,
                             chaos: Chaos) -> None:
    store = Store(bus)
    for sid, name in submitted.items():
        try:
            raw = await _until(lambda: _quietly(bus.request(s.api("default", s.SUBMISSIONS_GET),
                                                            to_json({"submission_id": sid}), timeout=5)), 30)
        except AssertionError:
            report.problems["submissions"].append(f"{sid}: never answered")
            continue
        outcome = client_decode(raw)
        if not outcome.accepted or outcome.job_version != 1:
            report.problems["submissions"].append(f"{sid}: {outcome.accepted} version {outcome.job_version} "
                                                  f"{outcome.error}")
            continue
        versions = await store.job_versions.scan(f"default.{outcome.job_id}.*")
        if len(versions) != 1:
            report.problems["submissions"].append(f"{sid}: {len(versions)} versions of {name}, not 1")


def client_decode(raw: bytes) -> SubmissionOutcome:
    from shared.codec import from_json

    return from_json(raw, SubmissionOutcome, max_bytes=None)


async def _check_views(stack: Stack, client: Client, bus: Bus, report: Report, chaos: Chaos) -> None:
    """Each query replica alone (the others stopped for the moment) must list exactly the buckets."""
    store = Store(bus)
    replicas = process_names("query", chaos.replicas)
    for replica in replicas:
        others = [r for r in replicas if r != replica]
        for other in others:
            stack.kill(other, signal.SIGTERM)
        last: list[str] = []

        async def equal() -> bool:
            nonlocal last
            last = await _view_differences(client, store)
            return not last

        try:
            await _until(lambda: _quietly(equal()), 60)
        except AssertionError:
            report.problems["views"].extend(f"{replica}: {p}" for p in (last or ["could not be read"]))
        for other in others:
            stack.restart(other)


async def _view_differences(client: Client, store: Store) -> list[str]:
    truth = {
        "executions": {e.id: e.status.revision for e in await store.all_executions()},
        "jobs": {r.value.id: r.value.revision for r in await store.jobs.scan(">")},
        "nodes": {r.value.id: r.value.revision for r in await store.nodes.scan(">")},
    }
    seen: dict[str, dict[str, int]] = {"executions": {}, "jobs": {}, "nodes": {}}
    token = ""
    while True:  # page by page, small pages, so that walks cross many page boundaries
        _, page = await client.list_executions(ListJobExecutionsRequest(limit=50, next_token=token))
        for e in page.items:
            if e.id in seen["executions"]:
                return [f"execution {e.id} listed twice"]
            seen["executions"][e.id] = e.status.revision
        if not (token := page.next_token):
            break
    while True:
        _, jobs = await client.list_jobs(ListJobsRequest(limit=7, next_token=token))
        seen["jobs"].update((j.id, j.revision) for j in jobs.items)
        if not (token := jobs.next_token):
            break
    while True:
        _, nodes = await client.list_nodes(ListNodesRequest(limit=25, next_token=token))
        seen["nodes"].update((n.id, n.revision) for n in nodes.items)
        if not (token := nodes.next_token):
            break
    problems = []
    for kind in truth:
        missing = [k for k in truth[kind] if k not in seen[kind]]
        extra = [k for k in seen[kind] if k not in truth[kind]]
        stale = [k for k in truth[kind] if k in seen[kind] and seen[kind][k] != truth[kind][k]]
        if missing or extra or stale:
            problems.append(f"{kind}: {len(missing)} missing, {len(extra)} extra, {len(stale)} stale "
                            f"of {len(truth[kind])}")
    return problems


async def _check_services(bus: Bus, report: Report, chaos: Chaos) -> None:
    for name in s.SERVICES:
        ids = await _instances(bus, name)
        if len(ids) < chaos.replicas:
            report.problems["services"].append(f"{name}: {len(ids)} of {chaos.replicas} replicas answer")


async def _instances(bus: Bus, service: str, wait: float = 1.0) -> set[str]:
    """Ids of every running instance of `service` (all answer $SRV.PING)."""
    inbox = bus.nc.new_inbox()
    found: set[str] = set()
    sub = await bus.nc.subscribe(inbox)
    try:
        await bus.nc.publish(s.service_ping(service), b"", reply=inbox)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                msg = await sub.next_msg(timeout=max(0.05, deadline - time.monotonic()))
            except Exception:
                break
            if msg.data:  # (an empty message is the server's "no responders")
                found.add(json.loads(msg.data).get("id", ""))
    finally:
        await sub.unsubscribe()
    return found


# -- helpers ----------------------------------------------------------------------------------------


async def _quietly(awaitable) -> Any:
    """The result, or None while a replica restarts (503), NATS is away, or a view lags (404)."""
    try:
        return await awaitable
    except (ShoalError, asyncio.TimeoutError):
        return None


async def _until(check, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout:.0f}s")
        await asyncio.sleep(0.5)

"""Fleet: registering a thousand nodes, placing a job on all of them, and a waved rolling update.

health + scheduler + rollout + query run in this process with ONE `AgentService(simulate=N)` holding
the whole simulated fleet (one connection, one watch, one heartbeat loop), as `shoal dev` runs it.

1. Registration: from starting the agent until it has registered every node (`nodes.register`
   request-reply, 32 in flight), then until the query service lists all N as ready.
2. Placement: one `pipeline` job with `rollout.strategy: immediate` and `config.simulate: {}` on every
   node; the time until all N executions exist, and until all N are `running` (placements/s).
3. Rolling update: version 2 of the same job with `strategy: rolling`, `max_parallel: 25` (percent:
   4 waves), health check every 200 ms, `success_threshold: 1`, `deadline: 30s`; the time until
   `rollouts.status` says succeeded and all N executions of version 2 are running (stable).

Execution states are followed with a watch on the executions bucket in the benchmark (the source of
truth; polling the query service would add load), the rollout through `Client.rollout("rollouts.status")`.

    .venv/bin/python bench/fleet.py [--nodes 1000] [--fallback 250]

If N nodes do not make it through a phase within its time limit, the benchmark reports how far it
got, and (with --fallback) measures the smaller fleet too.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from common import CpuMeter, LogCounter, Result, ScanCounter, Stack, consumer_counts, finish, ms, parse_args, say

from shared import subjects as s
from shared.api import ListNodesRequest
from shared.codec import from_msgpack
from shared.errors import ShoalError
from shared.models import Execution, SubmissionOutcome
from shared.transport import Kv

JOB = "fleet"


class Tracker:
    """Latest record of every execution, from a watch on the executions bucket."""

    def __init__(self) -> None:
        self.latest: dict[str, Execution] = {}
        self.changed = asyncio.Event()
        self.updates = 0

    async def run(self, kv: Kv) -> None:
        async with kv.watch(">") as watch:
            async for entry in watch:
                if entry is None:
                    continue
                if entry.deleted:
                    self.latest.pop(entry.key, None)
                else:
                    self.latest[entry.key] = from_msgpack(entry.value, Execution)
                self.updates += 1
                self.changed.set()

    def count(self, version: int, observed: str | None = None, *, stable: bool = False) -> int:
        n = 0
        for e in self.latest.values():
            if e.job_version != version:
                continue
            if observed is not None and e.observed != observed:
                continue
            if stable and e.status.stable_at is None:
                continue
            n += 1
        return n

    def states(self, version: int) -> Counter[str]:
        return Counter(e.observed for e in self.latest.values() if e.job_version == version)

    async def until(self, check, timeout: float) -> float | None:
        """Seconds until check() is true (re-checked on every change), None on timeout."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while not check():
            self.changed.clear()
            left = timeout - (loop.time() - t0)
            if left <= 0:
                return None
            try:
                await asyncio.wait_for(self.changed.wait(), min(left, 0.5))
            except asyncio.TimeoutError:
                pass
            await asyncio.sleep(0.05)  # check() walks every execution: at most 20 times a second
        return loop.time() - t0


async def ready_nodes(client) -> int:
    count = 0
    token = ""
    while True:
        _, page = await client.list_nodes(ListNodesRequest(state="ready", limit=500, next_token=token))
        count += len(page.items)
        if not page.next_token:
            return count
        token = page.next_token


async def reports_applied(bus) -> tuple[int, int]:
    """(reports ever published to REPORTS, reports the health service has acked)."""
    info = await bus.stream_info(s.STREAM_REPORTS)
    pending = await bus.consumer_pending(s.STREAM_REPORTS, s.CONSUMER_HEALTH_REPORTS) or 0
    return info["last_seq"], info["last_seq"] - pending


def start_agent_process(stack: Stack, nodes: int) -> subprocess.Popen[bytes]:
    """`shoal agent --simulate N` as its own process, with the benchmark's timings."""
    assert stack.settings is not None
    env = {**os.environ, "SHOAL_NATS_URL": stack.settings.nats_url, "SHOAL_LOG_LEVEL": "WARNING",
           "SHOAL_HEARTBEAT_INTERVAL": str(stack.settings.heartbeat_interval),
           "SHOAL_NODE_TIMEOUT": str(stack.settings.node_timeout),
           "SHOAL_SWEEP_INTERVAL": str(stack.settings.sweep_interval)}
    with open(stack.tmp / "agent.log", "ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen([str(Path(sys.executable).parent / "shoal"), "agent", "--simulate", str(nodes),
                                 "--work-dir", str(stack.tmp / "agent-process"), "--stop-grace", "2"], env=env,
                                stdout=subprocess.DEVNULL, stderr=log)


async def measure(nodes: int, limits: dict[str, float], interval: str,
                  separate: bool = False) -> tuple[list[Result], bool]:
    """All phases for one fleet size; returns the rows and whether every phase finished."""
    rows: list[Result] = []
    tag = f"{nodes} nodes" + (", agents in own process" if separate else "")
    with LogCounter() as logs, ScanCounter() as scans:
        async with Stack(f"fleet{nodes}") as stack:
            await stack.start_services()
            client = await stack.client(timeout=30)
            tracker = Tracker()
            watch_bus = await stack.bus("bench-watch")
            watcher = asyncio.create_task(tracker.run(Kv(watch_bus, s.BUCKET_EXECUTIONS)))
            try:
                ok = await _phases(stack, client, tracker, nodes, tag, rows, limits, logs, scans, interval,
                                   separate)
            finally:
                watcher.cancel()
                try:
                    await watcher
                except (asyncio.CancelledError, Exception):
                    pass
            if not ok:
                ready = await ready_nodes(client)
                rows.append(Result(f"fleet {tag}: diagnostics", float(logs.total()), "log warnings",
                                   f"{ready} of {nodes} nodes ready at the end (heartbeats late on a saturated "
                                   f"process: node_timeout 5 s); server-side consumers per KV stream "
                                   f"{await consumer_counts(client.bus)}; most logged: {logs.top(2)}"))
    return rows, ok


async def _phases(stack: Stack, client, tracker: Tracker, nodes: int, tag: str, rows: list[Result],
                  limits: dict[str, float], logs: LogCounter, scans: ScanCounter, interval: str,
                  separate: bool) -> bool:
    # --- 1. registration ----------------------------------------------------------------------------
    say(f"{tag}: registering" + (" (agent fleet in its own process)" if separate else ""))
    with CpuMeter(stack.server) as cpu:
        t0 = time.perf_counter()
        if separate:
            stack.children.append(start_agent_process(stack, nodes))
            registered = None
        else:
            try:
                await asyncio.wait_for(stack.start("agent", simulate=nodes), limits["register"])
            except asyncio.TimeoutError:
                rows.append(Result(f"fleet {tag}: register all nodes", float("nan"), "s",
                                   f"NOT REACHED within {limits['register']:.0f} s"))
                return False
            registered = time.perf_counter() - t0
        visible = None
        deadline = time.perf_counter() + limits["register"]
        while time.perf_counter() < deadline:
            if await ready_nodes(client) >= nodes:
                visible = time.perf_counter() - t0
                break
            await asyncio.sleep(0.25)
    if visible is None:
        rows.append(Result(f"fleet {tag}: register all nodes", float("nan"), "s",
                           f"NOT REACHED: not all listed ready within {limits['register']:.0f} s"))
        return False
    if registered is None:  # a separate process: only the query service's view tells
        rows.append(Result(f"fleet {tag}: register all nodes", visible, "s",
                           f"{nodes / visible:.0f} registrations/s, from starting `shoal agent --simulate {nodes}` "
                           f"(process start and imports included) until the query service lists all ready; "
                           f"CPU of this process and nats-server: {cpu.note()}"))
    else:
        rows.append(Result(f"fleet {tag}: register all nodes", registered, "s",
                           f"{nodes / registered:.0f} registrations/s (AgentService.start: nodes.register, 32 in "
                           f"flight, + first heartbeat); all listed ready by the query service after "
                           f"{visible:.1f} s; {cpu.note()}"))
    # Let the node-join evaluations of the registration settle before placing.
    await asyncio.sleep(1.0)

    # --- 2. placement (immediate) -------------------------------------------------------------------
    say(f"{tag}: placing one immediate job on every node")
    spec_v1 = {"name": JOB, "type": "pipeline", "config": {"simulate": {}},
               "rollout": {"strategy": "immediate"}}
    before = scans.snapshot()
    with CpuMeter(stack.server) as cpu:
        t0 = time.perf_counter()
        outcome = await client.submit(spec_v1, wait=30)
        accepted = time.perf_counter() - t0
        if not (isinstance(outcome, SubmissionOutcome) and outcome.accepted):
            rows.append(Result(f"fleet {tag}: placement", float("nan"), "s", f"submission not accepted: {outcome}"))
            return False
        created = await tracker.until(lambda: tracker.count(1) >= nodes, limits["place"])
        running = await tracker.until(lambda: tracker.count(1, "running") >= nodes, limits["place"])
        total = time.perf_counter() - t0
    if running is None:
        rows.append(Result(f"fleet {tag}: {nodes} executions running (immediate)", float("nan"), "s",
                           f"NOT REACHED in {total:.0f} s: version 1 states {dict(tracker.states(1))}"))
        return False
    created_s = (created or 0) + accepted
    # Version 2 must find version 1 marked stable (its rollback target): wait for the rollout to say so.
    v1_done = None
    while time.perf_counter() - t0 < limits["place"]:
        try:
            _, st = await client.rollout(s.ROLLOUT_STATUS, JOB)
            if st.state == "succeeded":
                v1_done = time.perf_counter() - t0
                break
        except ShoalError:
            pass
        await asyncio.sleep(0.25)
    rows.append(Result(f"fleet {tag}: {nodes} executions running (immediate)", total, "s",
                       f"{nodes / total:.0f} placements/s to running; all {nodes} execution records existed after "
                       f"{created_s:.1f} s ({nodes / created_s:.0f}/s); submit accepted in {ms(accepted):.0f} ms; "
                       f"rollout status succeeded after {v1_done if v1_done else float('nan'):.1f} s; "
                       f"{scans.since(before)}; {cpu.note()}"))
    if v1_done is None:
        return False

    # --- 3. rolling update --------------------------------------------------------------------------
    say(f"{tag}: rolling update to version 2, 4 waves of 25%, health interval {interval}")
    spec_v2 = {"name": JOB, "type": "pipeline", "description": "version 2", "config": {"simulate": {}},
               "rollout": {"strategy": "rolling", "max_parallel": 25,
                           "health_check": {"interval": interval, "success_threshold": 1, "deadline": "30s"}}}
    wave_started: dict[int, float] = {}
    status_errors = 0
    last_status = None
    before = scans.snapshot()
    reports_before = await reports_applied(client.bus)
    with CpuMeter(stack.server) as cpu:
        t0 = time.perf_counter()
        outcome = await client.submit(spec_v2, wait=30)
        if not (isinstance(outcome, SubmissionOutcome) and outcome.accepted):
            rows.append(Result(f"fleet {tag}: rolling update", float("nan"), "s", f"not accepted: {outcome}"))
            return False
        succeeded_at = None
        deadline = t0 + limits["rollout"]
        while time.perf_counter() < deadline:
            try:
                _, st = await client.rollout(s.ROLLOUT_STATUS, JOB)
                last_status = st
                now = time.perf_counter() - t0
                if st.job_version == 2 and st.current_wave and st.current_wave not in wave_started:
                    wave_started[st.current_wave] = now
                if st.job_version == 2 and st.state == "succeeded":
                    succeeded_at = now
                    break
                if st.state in ("failed", "stopped") or st.rollback_of:
                    break
            except ShoalError:
                status_errors += 1
            await asyncio.sleep(0.5)
        all_v2 = None
        if succeeded_at is not None:
            left = max(1.0, deadline - time.perf_counter())
            all_v2 = await tracker.until(lambda: tracker.count(2, "running", stable=True) >= nodes
                                         and tracker.count(1, "running") == 0, left)
        total = time.perf_counter() - t0
    waves = ", ".join(f"wave {w} at {t:.1f} s" for w, t in sorted(wave_started.items()))
    roll_name = f"fleet {tag}: rolling update, 4 waves of 25%"
    if interval != "200ms":
        roll_name += f", {interval} health interval"
    agent = next((c for c in stack.components if c.name == "agent"), None)
    reporter = (f"agent reporter: {agent.reporter.sent:,} reports sent in total, "  # type: ignore[attr-defined]
                f"{agent.reporter._queue.qsize():,} still queued; "  # type: ignore[attr-defined]
                if agent is not None else "agent fleet in its own process; ")
    published, applied = await reports_applied(client.bus)
    backlog = (f"{reporter}reports published to REPORTS in this phase: {published - reports_before[0]:,}, "
               f"applied by health: {applied - reports_before[1]:,} "
               f"({(applied - reports_before[1]) / total:,.0f}/s); {scans.since(before)}")
    if succeeded_at is None or all_v2 is None:
        st = last_status
        rows.append(Result(roll_name, float("nan"), "s",
                           f"NOT REACHED in {total:.0f} s: status "
                           f"{(st.state, st.job_version, st.current_wave, st.message) if st else None}; {waves}; "
                           f"version 2 states {dict(tracker.states(2))}; version 1 {dict(tracker.states(1))}; "
                           f"{status_errors} status calls failed; {backlog}; {cpu.note()}"))
        return False
    per_wave = succeeded_at / max(1, len(wave_started))
    rows.append(Result(roll_name, total, "s",
                       f"rollouts.status succeeded after {succeeded_at:.1f} s ({waves}; ~{per_wave:.1f} s a wave with "
                       f"a {interval} health interval); all {nodes} on version 2 and version 1 stopped after "
                       f"{total:.1f} s; {status_errors} status calls failed; {backlog}; {cpu.note()}"))
    return True


async def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--nodes", type=int, default=1000),
        p.add_argument("--fallback", type=int, default=250,
                       help="also measure this fleet size if the first one does not finish (0: never)"),
        p.add_argument("--register-limit", type=float, default=45.0),
        p.add_argument("--place-limit", type=float, default=40.0),
        p.add_argument("--rollout-limit", type=float, default=45.0),
        p.add_argument("--health-interval", default="200ms", help="health_check.interval of version 2"),
        p.add_argument("--agent-process", action="store_true",
                       help="run the simulated fleet as `shoal agent --simulate N` in its own process instead "
                            "(not what the table reports by default: a what-if for the bottleneck analysis)"),
    ))
    limits = {"register": args.register_limit, "place": args.place_limit, "rollout": args.rollout_limit}
    t0 = time.perf_counter()
    rows, ok = await measure(args.nodes, limits, args.health_interval, args.agent_process)
    if not ok and args.fallback and args.fallback < args.nodes:
        say(f"{args.nodes} nodes did not finish; measuring {args.fallback}")
        more, _ = await measure(args.fallback, limits, args.health_interval, args.agent_process)
        rows += more
    say(f"fleet done in {time.perf_counter() - t0:.0f} s")
    finish(rows, args, "fleet")


if __name__ == "__main__":
    asyncio.run(main())

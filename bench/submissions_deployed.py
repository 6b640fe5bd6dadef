"""Submissions, as deployed: scheduler CPU per submission, and what a second scheduler process adds.

The stack is bench/deployed.py's `Deployment` (`services.cli.stack.Stack`): nats-server, every service its
own `shoal serve ...` process, the simulated fleet (`--nodes`, in `shoal agent --simulate` processes of
`--per-agent` nodes). This process is the client. The phases run one after the other on the same stack,
one per entry of `--schedulers` (default `1,2,1,2,1,2`): before a phase that wants two scheduler processes a
second one (`scheduler-2`) is started, before one that wants one again it is stopped with SIGTERM. In each
phase `--jobs` distinct one-shot `query` jobs, each pinned to one node by `match_ids` (nodes taken round
robin) and simulated to run 50 ms, are submitted through `Client.submit` with `--concurrency` in flight.
For each phase:

- submissions/s: jobs / (first publish until the last outcome arrived), and submit-to-outcome p50/p99;
- scheduler CPU per submission: utime + stime of the scheduler processes (from /proc) from the first
  publish until every outcome has arrived and neither the submissions nor the evaluations consumer of the
  scheduler has anything pending, divided by the jobs (a submission's evaluation and plan are in it); the
  same for every other kind of process over the same span (they run the jobs meanwhile), and for the
  client (this process: the submitting, and its watch of the executions bucket);
- then until every job's execution has completed (a watch on the executions bucket): the whole path's
  CPU per job by process kind.

Between phases the stack settles (every work consumer empty). The ratios of throughputs, measured in one
run, are those of the best phase of each count (the one other work on the machine disturbed least) and of
their means; alternating the counts spreads the changing load of a shared machine over both. The load average and how busy the machine's cores were
(and how much of that was other processes) are printed with every phase: on 2 shared cores, read the
ratios and the CPU per submission.

`--replica-cpu CORES` (default 0: off) gives every scheduler process its own fixed CPU budget, as if each
ran on its own small machine of CORES of a core: the question is how the schedulers scale horizontally, and
without it the answer is this machine's instead, whether it has a spare core for a second scheduler while
nats-server, the other services, the simulated fleet and this client share the same few cores (on 2
cores the ratio of throughputs moved between 1.0x and 2.1x from run to run). Each scheduler process (the
first one once the stack is up, `scheduler-2` as it is started) is moved into its own cgroup v1 cpu cgroup
`/sys/fs/cgroup/cpu/shoal-bench-<pid>` with cpu.cfs_quota_us = CORES x cpu.cfs_period_us (100 ms), and the
cgroup is removed when the process stops and at the end. Choose CORES small enough that one scheduler is
held at its quota (its CPU over a phase about CORES: "budget used" near 1, the quota running out in most
periods), and far enough below the machine's idle capacity that two such budgets fit on it. A quota is a
ceiling, not a guarantee: when other work saturates the machine a scheduler gets less, which shows as its
budget used below 100%. Every phase prints the budget each scheduler used and how often its quota ran out
(on 2 cores, 0.2 held one and two schedulers at their quotas in most phases). It needs a writable cgroup v1 cpu
hierarchy (root): without one the benchmark says why and exits with an error.

`--profile DIR` runs every scheduler process under cProfile (SHOAL_SCHEDULER_PROFILE) and leaves one
`scheduler-<pid>.prof` per process there when the stack stops.

    .venv/bin/python bench/submissions_deployed.py [--nodes 1000] [--jobs 2000] [--concurrency 64]
        [--schedulers 1,2,1,2,1,2] [--replica-cpu CORES] [--profile DIR] [--json FILE]
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import msgspec
from cgroups import Budgets, Throttling, sweep_stale, unusable
from common import Result, fmt, ms, parse_args, percentile, print_table, say
from deployed import KINDS, Deployment, cpu_note, durables, settle
from procstat import CORES, Span, loadavg

from services.scheduler.service import PROFILE_ENV
from shared import subjects as s
from shared.models import SubmissionOutcome


async def scheduler_replicas(d: Deployment) -> int:
    """How many scheduler processes answer a Services API ping."""
    assert d.bus is not None
    nc = d.bus.nc
    inbox = nc.new_inbox()
    ids: set[str] = set()

    async def got(msg: Any) -> None:
        ids.add(msgspec.json.decode(msg.data).get("id", ""))

    sub = await nc.subscribe(inbox, cb=got)
    await nc.publish(s.service_ping(s.SERVICE_SCHEDULER), b"", reply=inbox)
    await asyncio.sleep(0.3)
    await sub.unsubscribe()
    return len(ids)


def scheduler_pids(d: Deployment) -> dict[int, str]:
    """pid -> child name of every scheduler process running now."""
    stack = d.stack
    assert stack is not None
    out: dict[int, str] = {}
    for name in list(stack.children):
        if name == "scheduler" or name.startswith("scheduler-"):
            proc = stack.process(name)
            if proc is not None and proc.poll() is None:
                out[proc.pid] = name
    return out


def place_budgets(d: Deployment, budgets: Budgets | None) -> None:
    """Every running scheduler process in its own cgroup of `budgets.cores` (those gone: cgroup removed)."""
    if budgets is None:
        return
    running = scheduler_pids(d)
    for pid in budgets.place(running):
        say(f"{running[pid]} (pid {pid}): {budgets.cores:g} of a core ({budgets.by_pid[pid].path})")


async def scale_schedulers(d: Deployment, want: int, budgets: Budgets | None = None) -> None:
    """Start scheduler-2, ... or stop (SIGTERM) the last ones until `want` scheduler processes run, and
    wait until exactly that many answer. With `budgets`, each is in its own CPU budget from its start."""
    stack = d.stack
    assert stack is not None
    names = ["scheduler", *(f"scheduler-{k}" for k in range(2, want + 1))]
    for name in names:
        proc = stack.process(name)
        if proc is None or proc.poll() is not None:
            stack.start_service(name)
    for name in list(stack.children):
        if name.startswith("scheduler-") and name not in names:
            proc = stack.process(name)
            if proc is not None and proc.poll() is None:
                await asyncio.to_thread(stack.kill, name, signal.SIGTERM)
    place_budgets(d, budgets)
    deadline = time.perf_counter() + 60
    while await scheduler_replicas(d) != want:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"not {want} scheduler processes answering after 60 s")
        await asyncio.sleep(0.2)


def mean_of(phases: list[dict[str, float]]) -> dict[str, float]:
    return {key: sum(p[key] for p in phases) / len(phases) for key in phases[0]}


def listed(phases: list[dict[str, float]], key: str) -> str:
    return ", ".join(f"{p[key]:.2f}" for p in phases)


def completed_count(d: Deployment, jobs: set[str]) -> int:
    return sum(n for (job, _, state), n in d.execs.counts.items() if state == "completed" and job in jobs)


def per_kind(span: Span, n: int) -> str:
    return ", ".join(f"{kind} {1000 * span.cpu.get(kind, 0.0) / n:.2f}" for kind in (*KINDS, "bench"))


def budget_note(budgets: Budgets | None, before: dict[int, Throttling], after: dict[int, Throttling],
                cpu: dict[int, float], wall: float) -> tuple[str, float, float]:
    """How much of its budget each scheduler process used over a span, and in how many CFS periods its
    quota ran out: (a note, the mean share of the budget used, the mean share of periods throttled)."""
    if budgets is None or not wall:
        return "", float("nan"), float("nan")
    used, throttled, parts = [], [], []
    for pid in sorted(after):
        got = after[pid] - before.get(pid, Throttling(0, 0, 0.0))
        share = cpu.get(pid, 0.0) / wall / budgets.cores
        used.append(share)
        throttled.append(got.share)
        parts.append(f"pid {pid} {cpu.get(pid, 0.0) / wall:.3f} cores = {100 * share:.0f}% of its budget, quota "
                     f"ran out in {got.throttled} of {got.periods} periods ({100 * got.share:.0f}%), held back "
                     f"{got.held:.1f} s")
    mean_used = sum(used) / len(used) if used else float("nan")
    mean_throttled = sum(throttled) / len(throttled) if throttled else float("nan")
    return (f"budget {budgets.cores:g} of a core per scheduler process: " + "; ".join(parts),
            mean_used, mean_throttled)


async def phase(d: Deployment, schedulers: int, jobs: int, concurrency: int, tag: str,
                rows: list[Result], number: int, budgets: Budgets | None = None) -> dict[str, float]:
    client = d.client
    assert client is not None and d.bus is not None
    await scale_schedulers(d, schedulers, budgets)
    waited, left = await settle(d.bus, 60)
    await asyncio.sleep(1.0)
    idle_before = d.meter.sample()
    await asyncio.sleep(2.0)
    idle = d.meter.span(idle_before, d.meter.sample())
    node_ids = [f"{group}-{i:0{len(str(d.per_agent))}d}" for group, size in d.groups for i in range(1, size + 1)]
    load = loadavg()
    label = f"{schedulers} scheduler{'s' if schedulers > 1 else ''}"
    say(f"{label}: {jobs} submissions, {concurrency} in flight (settled {waited:.1f} s"
        + (f", still pending {left}" if left else "") + f"); load average {load}")

    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    problems: list[str] = []
    job_ids: set[str] = set()

    async def submit(i: int) -> None:
        spec = {"name": f"{tag}-{i}", "type": "query", "config": {"simulate": {"duration": 0.05}},
                "selector": {"match_ids": [node_ids[i % len(node_ids)]]}}
        async with gate:
            t0 = time.perf_counter()
            outcome = await client.submit(spec, wait=60)
            latencies.append(time.perf_counter() - t0)
        if isinstance(outcome, SubmissionOutcome) and outcome.accepted:
            job_ids.add(outcome.job_id)
        else:
            problems.append(str(outcome.error if isinstance(outcome, SubmissionOutcome) else f"no outcome: {outcome}"))

    throttled_before = budgets.throttling() if budgets is not None else {}
    before = d.meter.sample()
    t0 = time.perf_counter()
    await asyncio.gather(*(submit(i) for i in range(jobs)))
    answered = time.perf_counter() - t0
    # What the scheduler still has of these submissions (evaluations included) is its work too.
    while time.perf_counter() - t0 < answered + 60:
        pending = (await durables(d.bus, s.STREAM_EVALS)).get(s.CONSUMER_SCHEDULER_EVALS, 0)
        pending += (await durables(d.bus, s.STREAM_SUBMISSIONS)).get(s.CONSUMER_SCHEDULER_SUBMISSIONS, 0)
        if not pending:
            break
        await asyncio.sleep(0.02)
    submitted = d.meter.sample()
    throttled_after = budgets.throttling() if budgets is not None else {}
    evaluated = time.perf_counter() - t0
    span = d.meter.span(before, submitted)
    old = before.cpu.get("scheduler", {})
    per_pid = {pid: max(0.0, sec - old.get(pid, 0.0)) for pid, sec in submitted.cpu.get("scheduler", {}).items()}
    budget, budget_used, throttled = budget_note(budgets, throttled_before, throttled_after, per_pid, span.wall)
    accepted = len(job_ids)
    rate = jobs / answered
    sched_ms = 1000 * span.cpu.get("scheduler", 0.0) / jobs
    idle_sched = idle.cores("scheduler") * span.wall
    say(f"{label}: {rate:,.0f} submissions/s; scheduler {sched_ms:.2f} ms CPU per submission; "
        f"{accepted} accepted, {len(problems)} not" + (f" (first: {problems[0]})" if problems else ""))
    if budget:
        say(f"{label}: {budget}")

    # Then the whole path: every job's execution completed.
    check = lambda: completed_count(d, job_ids) >= accepted  # noqa: E731
    done = await d.execs.until(check, 120)
    finished = d.meter.sample()
    whole = d.meter.span(before, finished)
    total_s = time.perf_counter() - t0

    name = f"submissions, phase {number}, {label}"
    ours = span.total(KINDS) + span.cpu.get("bench", 0.0)
    other = max(0.0, span.machine_busy - ours / span.wall) if span.wall else 0.0
    rows.append(Result(f"{name}: throughput", rate, "submissions/s",
                       f"{jobs} pinned one-shot query jobs, {concurrency} in flight from the client process, "
                       f"{d.nodes:,} simulated nodes: every outcome in {answered:.2f} s; {accepted} accepted"
                       + (f", {len(problems)} not (first: {problems[0]})" if problems else "")
                       + f"; load average at the start {load}"))
    rows.append(Result(f"{name}: submit-to-outcome", ms(percentile(latencies, 50)), "ms p50",
                       f"p99 {ms(percentile(latencies, 99)):.0f} ms, max {ms(max(latencies)):.0f} ms "
                       "(Client.submit: subscribe, JetStream publish, the outcome on shoal.submitted.<ns>.<id>)"))
    rows.append(Result(f"{name}: scheduler CPU per submission", sched_ms, "ms",
                       f"utime+stime of the scheduler process(es) over {span.wall:.2f} s (until the last outcome, and "
                       f"{evaluated - answered:.2f} s more until its consumers were empty) / {jobs}; of it idle rate "
                       f"{1000 * idle_sched / jobs:.3f} ms; {span.cpu.get('scheduler', 0.0) / span.wall:.2f} cores; every "
                       f"kind over the same span: " + cpu_note(span, jobs, "submission")
                       + (f"; {budget}" if budget else "")))
    if done is None:
        rows.append(Result(f"{name}: all jobs completed", float("nan"), "s",
                           f"only {completed_count(d, job_ids)} of {accepted} completed within 120 s; {d.dead()}"))
    else:
        rows.append(Result(f"{name}: all jobs completed", total_s, "s",
                           f"{accepted / total_s:,.0f} jobs/s end to end (evaluation, plan, execution, agent, "
                           f"reports, job state); CPU per job by kind, ms: {per_kind(whole, jobs)}; total "
                           f"{1000 * whole.total(KINDS) / jobs:.2f} ms; the stack used {whole.total(KINDS) / whole.wall:.2f} "
                           f"of {CORES} cores, the machine {whole.machine_busy:.2f}"))
    return {"rate": rate, "sched_ms": sched_ms, "p50": ms(percentile(latencies, 50)),
            "cores": span.cpu.get("scheduler", 0.0) / span.wall, "other": other,
            "budget_used": budget_used, "throttled": throttled}


async def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--nodes", type=int, default=1000, help="simulated nodes"),
        p.add_argument("--per-agent", type=int, default=1000, help="simulated nodes per agent process"),
        p.add_argument("--jobs", type=int, default=2000, help="submissions per phase"),
        p.add_argument("--concurrency", type=int, default=64, help="submissions in flight"),
        p.add_argument("--schedulers", default="1,2,1,2,1,2", help="scheduler processes of each phase, in order"),
        p.add_argument("--replica-cpu", type=float, default=0.0, metavar="CORES",
                       help="give each scheduler process its own CPU budget of CORES of a core (cgroup v1 cpu "
                            "quota; needs root); 0: off"),
        p.add_argument("--profile", default="", help="run the schedulers under cProfile, files in this dir"),
        p.add_argument("--service-log-level", default="WARNING", help="SHOAL_LOG_LEVEL of the stack's processes"),
        p.add_argument("--keep", action="store_true", help="keep the stack's data dir and logs"),
    ))
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    counts = [int(x) for x in args.schedulers.split(",") if x.strip()]
    if not counts or min(counts) < 1:
        raise SystemExit("--schedulers: scheduler processes per phase, each at least 1 (e.g. 1,2,1,2)")
    if args.replica_cpu < 0:
        raise SystemExit("--replica-cpu: cores per scheduler process, positive (0: no budget)")
    budgets: Budgets | None = None
    if args.replica_cpu > 0:
        why = unusable()
        if why is not None:
            say(f"--replica-cpu {args.replica_cpu:g}: cannot give the schedulers CPU budgets: {why}")
            raise SystemExit(f"--replica-cpu needs a writable cgroup v1 cpu hierarchy (as root): {why}")
        stale = sweep_stale()
        if stale:
            say(f"removed cgroups left by an earlier run: {', '.join(stale)}")
        budgets = Budgets(args.replica_cpu)
        say(f"each scheduler process gets {args.replica_cpu:g} of a core (cgroup cpu quota "
            f"{round(args.replica_cpu * 100_000)} us per 100000 us)")
    rows: list[Result] = []
    figures: dict[int, list[dict[str, float]]] = {}
    say(f"load average {loadavg()} on {CORES} cores")
    d = Deployment(args.nodes, args.per_agent, 1, args.service_log_level, keep=args.keep)
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        d.extra_env[PROFILE_ENV] = str(Path(args.profile).resolve())
    t0 = time.perf_counter()
    try:
        await d.start()
        place_budgets(d, budgets)
        say(f"stack up in {time.perf_counter() - t0:.1f} s; registering {args.nodes:,} nodes")
        d.start_agents()
        if await d.node_states.until(lambda: d.node_states.ready() >= args.nodes, 60 + args.nodes / 100) is None:
            raise RuntimeError(f"only {d.node_states.ready()} of {args.nodes} nodes ready; {d.dead()}")
        for k, count in enumerate(counts):
            measured = await phase(d, count, args.jobs, args.concurrency, f"p{k}", rows, k + 1, budgets)
            figures.setdefault(count, []).append(measured)
    except asyncio.CancelledError:  # SIGTERM: the stack is stopped below; report what there is
        rows.append(Result("submissions: stopped by SIGTERM", float("nan"), "", ""))
    except Exception as exc:  # report the phases measured so far
        rows.append(Result("submissions: benchmark failed", float("nan"), "", f"{type(exc).__name__}: {exc}"))
    finally:
        say(f"stopping the stack; load average {loadavg()}")
        try:
            await d.close()
        finally:
            if budgets is not None:
                for problem in budgets.close():
                    say(f"cgroup left behind: {problem}")
    budget = (f"; each scheduler process had {args.replica_cpu:g} of a core (its own cgroup cpu quota), so this "
              "is the schedulers' scaling, not the machine's spare cores" if args.replica_cpu > 0 else "")
    if args.replica_cpu > 0:
        rows.append(Result("submissions: CPU budget per scheduler process", args.replica_cpu, "cores",
                           "cgroup v1 cpu quota of each scheduler process (--replica-cpu), as if each ran on its own "
                           f"machine of that size; the machine has {CORES} cores"))
    if 1 in figures:
        one = mean_of(figures[1])
        for count, phases in figures.items():
            if count == 1:
                continue
            f = mean_of(phases)
            each = ", ".join(f"{fmt(p['rate'])}" for p in phases)
            ones = ", ".join(f"{fmt(p['rate'])}" for p in figures[1])
            best, best_one = max(p["rate"] for p in phases), max(p["rate"] for p in figures[1])
            rows.append(Result(f"submissions, {count} schedulers / 1: throughput, best phases", best / best_one, "x",
                               f"{fmt(best)} against {fmt(best_one)} submissions/s: the phase of each that other work "
                               f"on the machine disturbed least (phases in the order {args.schedulers} on one stack)"
                               + budget))
            rows.append(Result(f"submissions, {count} schedulers / 1: throughput, mean", f["rate"] / one["rate"], "x",
                               f"mean {fmt(f['rate'])} ({each}) against mean {fmt(one['rate'])} ({ones}) "
                               f"submissions/s; scheduler cores {f['cores']:.2f} against {one['cores']:.2f}; other "
                               f"processes on the machine {f['other']:.2f} against {one['other']:.2f} cores"
                               + (f"; budget used {100 * f['budget_used']:.0f}% against "
                                  f"{100 * one['budget_used']:.0f}%, quota ran out in {100 * f['throttled']:.0f}% "
                                  f"against {100 * one['throttled']:.0f}% of periods" if args.replica_cpu > 0 else "")
                               + budget))
            rows.append(Result(f"submissions, {count} schedulers / 1: scheduler CPU per submission",
                               f["sched_ms"] / one["sched_ms"], "x",
                               f"mean {f['sched_ms']:.2f} ({listed(phases, 'sched_ms')}) against "
                               f"{one['sched_ms']:.2f} ms ({listed(figures[1], 'sched_ms')})"))
            # The throughput the scheduler processes could carry with a core (or their budget) each, from what
            # a submission cost them: the ratio of throughputs when the scheduler is the limit, not the machine.
            each_cores = args.replica_cpu if args.replica_cpu > 0 else 1.0
            rows.append(Result(f"submissions, {count} schedulers / 1: capacity from CPU per submission",
                               count * one["sched_ms"] / f["sched_ms"], "x",
                               f"{count} x {1000 * each_cores / f['sched_ms']:,.0f} against "
                               f"{1000 * each_cores / one['sched_ms']:,.0f} submissions/s: "
                               f"{'its budget' if args.replica_cpu > 0 else 'one core'} per scheduler process "
                               "divided by its CPU per submission (derived, not measured: the measured ratio above "
                               "is the machine's when other processes take the cores)"))
    say(f"done in {time.perf_counter() - t0:.0f} s; load average {loadavg()}")
    print_table(rows, "submissions, as deployed")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    asyncio.run(main())

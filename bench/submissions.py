"""Submissions: how fast the scheduler accepts jobs, and how fast small jobs run to completion.

All four services run in this process, with a simulated fleet of 50 nodes (`AgentService(simulate=50)`)
and the client. 500 distinct small `query` jobs, each pinned to one node by `match_ids` and simulated to
run for 50 ms, are submitted through `Client.submit` with at most 32 in flight. Reported: accepted
submissions per second, the submit-to-outcome latency (publish on `shoal.submit.<ns>` until the outcome
arrives on `shoal.submitted.<ns>.<id>`), and the time until the query service lists all 500 jobs as
`completed` (evaluation -> plan -> execution -> agent -> reports -> job state -> view).

    .venv/bin/python bench/submissions.py [--jobs 500] [--concurrency 32] [--nodes 50]
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from common import (CpuMeter, LogCounter, Result, ScanCounter, Stack, consumer_counts, finish, ms, parse_args,
                    percentile, say)

from shared.api import ListJobExecutionsRequest, ListJobsRequest
from shared.models import SubmissionOutcome


async def job_states(client) -> Counter[str]:
    """State of every job, walked through the query service (pages of 200 stay under the client's size check)."""
    states: Counter[str] = Counter()
    token = ""
    while True:
        _, page = await client.list_jobs(ListJobsRequest(limit=200, next_token=token))
        states.update(j.state.state_type for j in page.items)
        if not page.next_token:
            return states
        token = page.next_token


async def stuck_jobs(client, limit: int = 3) -> str:
    """For a few jobs that are not completed: their state and what their executions say."""
    out = []
    token = ""
    while len(out) < limit:
        _, page = await client.list_jobs(ListJobsRequest(limit=200, next_token=token))
        for job in page.items:
            if job.state.state_type != "completed" and len(out) < limit:
                _, ex = await client.list_executions(ListJobExecutionsRequest(job=job.id, all_job_versions=True))
                execs = ", ".join(f"{e.observed}/{e.desired}" for e in ex.items) or "none"
                out.append(f"{job.name}: job {job.state.state_type} ({job.state.message!r}), executions "
                           f"observed/desired [{execs}]")
        if not page.next_token:
            break
        token = page.next_token
    return "; ".join(out)


async def run(jobs: int, concurrency: int, nodes: int, stall_after: float,
              max_consumers: int | None = None) -> list[Result]:
    rows: list[Result] = []
    with LogCounter() as logs, ScanCounter() as scans:
        async with Stack("submissions", max_consumers=max_consumers) as stack:
            await _run(stack, logs, scans, rows, jobs, concurrency, nodes, stall_after)
    if max_consumers is not None:
        for r in rows:
            r.name += f" [server consumer limit {max_consumers:,}]"
    return rows


async def _run(stack: Stack, logs: LogCounter, scans: ScanCounter, rows: list[Result], jobs: int, concurrency: int,
               nodes: int, stall_after: float) -> None:
    await stack.start_services()
    await stack.start("agent", simulate=nodes)
    client = await stack.client(timeout=30)
    await client.wait_ready(nodes, timeout=60)
    say(f"{nodes} nodes ready; submitting {jobs} jobs, {concurrency} in flight")

    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    outcomes: list[SubmissionOutcome | str] = []
    accepted_at: list[float] = []

    async def submit(i: int) -> None:
        node = f"sim-{i % nodes + 1:04d}"
        spec = {"name": f"b-{i}", "type": "query", "config": {"simulate": {"duration": 0.05}},
                "selector": {"match_ids": [node]}}
        async with gate:
            t0 = time.perf_counter()
            outcome = await client.submit(spec, wait=30)
            t1 = time.perf_counter()
        latencies.append(t1 - t0)
        outcomes.append(outcome)
        if isinstance(outcome, SubmissionOutcome) and outcome.accepted:
            accepted_at.append(t1)

    with CpuMeter(stack.server) as cpu_submit:
        t_start = time.perf_counter()
        await asyncio.gather(*(submit(i) for i in range(jobs)))
        t_submitted = time.perf_counter()
    accepted = len(accepted_at)
    rejected = [o for o in outcomes if isinstance(o, SubmissionOutcome) and not o.accepted]
    unanswered = [o for o in outcomes if isinstance(o, str)]
    submit_s = t_submitted - t_start
    say(f"submitted in {submit_s:.1f} s: {accepted} accepted, {len(rejected)} rejected, "
        f"{len(unanswered)} without an outcome")
    rows.append(Result(f"submit {jobs} jobs, {concurrency} in flight", accepted / submit_s, "accepted/s",
                       f"{accepted} of {jobs} accepted in {submit_s:.1f} s"
                       + (f", {len(rejected)} rejected: {rejected[0].error}" if rejected else "")
                       + (f", {len(unanswered)} without outcome" if unanswered else "")
                       + f"; {cpu_submit.note()}"))
    rows.append(Result("submit-to-outcome latency", ms(percentile(latencies, 50)), "ms p50",
                       f"p99 {ms(percentile(latencies, 99)):.0f} ms, max {ms(max(latencies)):.0f} ms "
                       f"(Client.submit: subscribe, JetStream publish, outcome from the scheduler)"))

    # --- until every job is completed ---------------------------------------------------------
    say("waiting until every job is completed (polling jobs.list every 250 ms)")
    states: Counter[str] = Counter()
    deadline = time.perf_counter() + 100
    marks: dict[int, float] = {}  # completed count -> first time seen
    last_change = time.perf_counter()
    last_completed = -1
    stalled = False
    with CpuMeter(stack.server) as cpu_run:
        while time.perf_counter() < deadline:
            states = await job_states(client)
            now = time.perf_counter()
            completed = states.get("completed", 0)
            for mark in (100, 200, 300, 400, accepted // 2, accepted):
                if completed >= mark and mark not in marks:
                    marks[mark] = now - t_start
            if completed != last_completed:
                last_completed, last_change = completed, now
            if completed >= accepted:
                break
            if now - last_change > stall_after:
                stalled = True
                break
            await asyncio.sleep(0.25)
        t_done = time.perf_counter()
    completed = states.get("completed", 0)
    total_s = t_done - t_start
    consumers = await consumer_counts(client.bus)
    timeline = ", ".join(f"{k} after {v:.1f} s" for k, v in sorted(marks.items()))
    if completed >= accepted:
        rows.append(Result(f"all {jobs} jobs completed", total_s, "s",
                           f"from the first submit, {t_done - t_submitted:.1f} s after the last outcome; "
                           f"{completed / total_s:.1f} jobs/s end to end; completed: {timeline}; "
                           f"{scans.since()}; while draining: {cpu_run.note()}"))
    else:
        why = f"stalled: no job completed for {stall_after:.0f} s" if stalled else "gave up at the time budget"
        rows.append(Result(f"all {jobs} jobs completed", float("nan"), "s",
                           f"NOT REACHED: {completed} of {accepted} completed after {total_s:.0f} s ({why}); "
                           f"job states {dict(states)}; completed: {timeline or 'none'}; consumers held by "
                           f"the server per KV stream: {consumers}; {scans.since()}; services logged {logs.total()} "
                           f"warnings/errors, most: {logs.top(1)}; not completed: {await stuck_jobs(client)}"))
        if last_completed > 0:
            at = last_change - t_start
            rows.append(Result(f"jobs completed until the stall ({last_completed} of {accepted})", last_completed / at,
                               "jobs/s", f"the last of them completed {at:.1f} s after the first submit"))


async def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--jobs", type=int, default=500),
        p.add_argument("--concurrency", type=int, default=32),
        p.add_argument("--nodes", type=int, default=50),
        p.add_argument("--stall-after", type=float, default=10.0,
                       help="stop waiting when no job completed for this long (seconds)"),
        p.add_argument("--max-consumers", type=int, default=None,
                       help="nats-server jetstream.limits.default_max_consumers (default: the server's, 1000)"),
        p.add_argument("--no-lifted", action="store_true",
                       help="do not repeat a stalled run with the server's consumer limit lifted"),
    ))
    t0 = time.perf_counter()
    rows = await run(args.jobs, args.concurrency, args.nodes, args.stall_after, args.max_consumers)
    stalled = any(r.name.startswith("all ") and r.figure != r.figure for r in rows)  # NaN: not reached
    if stalled and args.max_consumers is None and not args.no_lifted:
        say("the run stalled; repeating it with nats-server's per-stream consumer limit lifted to 100,000")
        rows += await run(args.jobs, args.concurrency, args.nodes, args.stall_after, 100_000)
    say(f"submissions done in {time.perf_counter() - t0:.0f} s")
    finish(rows, args, "submissions")


if __name__ == "__main__":
    asyncio.run(main())

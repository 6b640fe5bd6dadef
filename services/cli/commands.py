"""The API commands of the CLI: job, node and rollout."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from shared import telemetry
from shared.api import (
    ExecutionLogsRequest,
    ListDeadLettersRequest,
    ListJobExecutionsRequest,
    ListJobsRequest,
    ListNodesRequest,
    LogItem,
    RolloutStatus,
    node_failure,
)
from shared.codec import to_json
from shared.durations import format_duration, rfc3339
from shared import subjects as s
from shared.errors import InvalidInput, NotFound, ShoalError
from shared.models import ONE_SHOT_JOB_TYPES, Execution, Job, JobSpec, Selector, SubmissionOutcome
from shared.models import ENDED_JOB_STATES, TERMINAL_STATES, details
from shared.settings import Settings
from shared.transport import Bus
from shared.validation import check_namespace, parse_labels

from .client import Client, load_spec
from .main import EXIT_TIMEOUT
from .output import (
    WIDTH,
    LiveBlock,
    budget_text,
    clock,
    command_line,
    emit,
    failure_text,
    plan_lines,
    plural,
    safe,
    shorten,
    table,
    wave_bar,
    wave_counts,
    when,
)

# Job states in which `job run --wait` stops waiting.
SETTLED_JOB_STATES = frozenset(
    {"running", "degraded", "completed", "failed", "stopped", "rollout_failed", "rollout_paused"}
)
ROLLOUT_ENDED = frozenset({"succeeded", "failed", "stopped"})
POLL = 0.5  # seconds between polls of `job run --wait`


async def with_client(args: argparse.Namespace, settings: Settings,
                      handler: Callable[[argparse.Namespace, Client], Awaitable[int]]) -> int:
    telemetry.setup("shoal-cli", settings.traces_exporter, settings.traces_file)
    bus = await Bus.connect(settings.nats_url, name="shoal-cli", credentials=settings.credentials())
    try:
        return await handler(args, Client(bus, args.namespace, timeout=args.timeout))
    finally:
        await bus.close()
        telemetry.shutdown()


# -- job --------------------------------------------------------------------------------------------


async def job(args: argparse.Namespace, client: Client) -> int:
    return await JOB[args.job_command](args, client)


async def job_run(args: argparse.Namespace, client: Client) -> int:
    spec = load_spec(args.file)
    if not spec.namespace:
        spec.namespace = args.namespace
    check_namespace(spec.namespace, "spec.namespace")
    client.namespace = spec.namespace
    with telemetry.span("shoal job run", kind=telemetry.PRODUCER, attributes={"shoal.job": spec.name}):
        outcome = await client.submit(spec, dry_run=args.dry_run, force=args.force, wait=args.timeout)
    if not isinstance(outcome, SubmissionOutcome):
        print(f"submission {outcome} is stored on the bus; the scheduler has not answered yet "
              "(it will process it when it runs)")
        return 0
    if args.output != "table":
        emit(to_json(outcome), args.output, lambda: "")
    if not outcome.accepted:
        error = outcome.error
        where = f" (field: {error.field})" if error and error.field else ""
        print(f"error: job rejected: {error.message if error else 'unknown reason'}{where}", file=sys.stderr)
        return 2 if error and error.code == 400 else 1
    if args.output == "table":
        verb = "would be" if outcome.dry_run else "is"
        print(f"job {spec.name} ({outcome.job_id or 'new'}) version {outcome.job_version} {verb} accepted"
              + (f"; evaluation {outcome.eval_id}" if outcome.eval_id else ""))
        for warning in outcome.warnings:
            print(f"warning: {warning}")
        if outcome.dry_run and outcome.plan is not None:
            print("\n".join(plan_lines(outcome.plan, _selector_phrase(spec.selector))))
    if args.wait and not outcome.dry_run:
        return await _wait_for_job(client, outcome.job_id, outcome.job_version, args.output == "table",
                                   timeout=args.wait_timeout)
    return 0


def _selector_phrase(sel: Selector) -> str:
    text = _selector_text(sel)
    return "the selector (every node)" if text == "(every node)" else f"the selector ({text})"


def _command(client: Client, *words: str) -> str:
    """A shoal command line for the client's namespace, to print as the next thing to run."""
    ns = ["-n", client.namespace] if client.namespace != "default" else []
    return command_line(["shoal", *ns, *words])


async def _wait_for_job(client: Client, job_id: str, version: int, verbose: bool,
                        timeout: float | None = None) -> int:
    """Until the job version is deployed (or, one-shot, finished), has failed, or is queued with no node
    to run on. Says why when it stops short: the selector no ready node meets, the first failure and the
    commands to look further; with `timeout`, gives up after that many seconds saying where it stood."""
    out = sys.stdout if verbose else sys.stderr  # with -o json|yaml, stdout holds only the reply
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    last = ""
    explained = False
    job: Job | None = None
    while True:
        try:
            _, found = await client.get_job(job_id)
        except ShoalError as exc:
            if exc.code != 404 and not exc.retryable:
                raise
            found = None  # not in the query view yet, or a query replica is restarting
        if found is not None and found.version >= version:
            job = found
            state = job.state.state_type
            line = f"{state}: {job.state.message}"
            if verbose and line != last:
                print(line, flush=True)
                last = line
            if state == "queued" and not explained:
                explained = True
                print(await _why_queued(client, job), file=out, flush=True)
                if not job.spec.timeouts.queue_timeout:
                    print(f"the job stays queued and starts when a matching node joins; nodes: "
                          f"{_command(client, 'node', 'list')}", file=out)
                    return 1
                print(f"waiting for a matching node to join (queue_timeout {job.spec.timeouts.queue_timeout}s)",
                      file=out, flush=True)
            # A one-shot job that is running has not finished yet.
            settled = SETTLED_JOB_STATES - {"running", "degraded"} if job.type in ONE_SHOT_JOB_TYPES else SETTLED_JOB_STATES
            if state in settled:
                failed = state in ("failed", "rollout_failed")
                if failed or state == "degraded":
                    await _explain_failure(client, job, out)
                return 1 if failed else 0
        if deadline is not None and loop.time() >= deadline:
            where = (f"it is {job.state.state_type}: {job.state.message}" if job is not None
                     else f"version {version} is not in the query view yet")
            print(f"error: timed out after {timeout:g}s waiting for job {job.name if job else job_id} "
                  f"version {version}; {where}", file=sys.stderr)
            print(f"next: {_command(client, 'rollout', 'status', job.name if job else job_id)}", file=sys.stderr)
            return EXIT_TIMEOUT
        pause = POLL if deadline is None else max(0.0, min(POLL, deadline - loop.time()))
        await asyncio.sleep(pause)


async def _why_queued(client: Client, job: Job) -> str:
    """`queued: no ready node matches the selector (...)`, with each requirement no ready node meets: the
    scheduler's dry run of the same spec says why (whoever may submit may ask; it speaks in counts)."""
    head = f"queued: no ready node matches {_selector_phrase(job.spec.selector)}"
    try:
        outcome = await client.submit(job.spec, dry_run=True, force=True)  # (force: the spec is the current one)
    except ShoalError as exc:
        return f"{head}\n  (could not ask why: {exc})"
    if isinstance(outcome, str) or outcome.plan is None:
        return head
    return head + "".join(f"\n  why: {reason}" for reason in outcome.plan.no_match)


async def first_failure(client: Client, job: str, version: int | None = None) -> Execution | None:
    """The job version's execution that failed first (by when it ended), if one did."""
    _, page = await client.list_executions(ListJobExecutionsRequest(
        job=job, job_version=version, state="failed", order_by="updated_at", limit=1000))
    if not page.items:
        return None

    def ended(e: Execution) -> str:
        return details(e).finished_at or rfc3339(e.status.updated_at)

    return min(page.items, key=lambda e: (ended(e), e.id))


async def _explain_failure(client: Client, job: Job, out: Any) -> None:
    """The first failure's cause and the commands that show the rest."""
    first = await first_failure(client, job.id, job.version)
    if first is not None:
        print(f"first failure: {first.node_id} (execution {first.id}): "
              f"{failure_text(node_failure(first.node_id, first))}", file=out)
    print(f"next: {_command(client, 'job', 'executions', job.name, '--state', 'failed')}", file=out)
    print(f"      {_command(client, 'rollout', 'status', job.name)}", file=out, flush=True)


async def job_list(args: argparse.Namespace, client: Client) -> int:
    request = ListJobsRequest(limit=args.limit, next_token=args.next_token, state=args.state, type=args.type)
    raw, page = await client.list_jobs(request)

    def render() -> str:
        rows = [(j.name, j.id, j.type, j.version, j.state.state_type, when(j.modified_at), j.state.message)
                for j in page.items]
        out = table(("NAME", "ID", "TYPE", "VERSION", "STATE", "MODIFIED", "MESSAGE"), rows)
        return out + _next_page(page.next_token, ["job", "list"], args, {"--state": args.state, "--type": args.type})

    emit(raw, args.output, render)
    return 0


DESCRIBE_EXECUTIONS = 10_000  # executions `job describe` counts by state (10 pages)
DESCRIBE_EVENTS = 6  # latest execution changes it shows
OUTPUT_LINES = 10  # lines of output it shows


async def job_describe(args: argparse.Namespace, client: Client) -> int:
    raw, job = await client.get_job(args.job)
    if args.output != "table":
        emit(raw, args.output, lambda: "")
        return 0
    counts, counted_all = await _execution_states(client, job)
    try:
        _, status = await client.rollout("rollouts.status", job.id)
    except ShoalError:
        status = None  # no rollout yet (a 404), or the rollout service does not answer: describe the rest
    _, recent = await client.list_executions(ListJobExecutionsRequest(
        job=job.id, all_job_versions=True, order_by="updated_at", reverse=True, limit=DESCRIBE_EVENTS))
    tail = await _output_tail(client, job, recent.items)

    def render() -> str:
        spec = job.spec
        lines = [
            f"Name:        {job.name}",
            f"ID:          {job.id}",
            f"Namespace:   {job.namespace}",
            f"Type:        {job.type}",
            f"Version:     {job.version} (stable: {job.stable_version or '-'})",
            f"State:       {job.state.state_type}  {job.state.message}",
            f"Created:     {when(job.created_at)}",
            f"Modified:    {when(job.modified_at)}",
            f"Rollout:     {spec.rollout.strategy}, max_parallel {spec.rollout.max_parallel}%, budget "
            f"{spec.rollout.max_failed_nodes} nodes / {spec.rollout.max_failed_nodes_percent:g}%",
            f"Restart:     {spec.restart_policy}",
            f"Selector:    {_selector_text(spec.selector)}",
            f"Health:      {_health_text(spec)}",
        ]
        total = sum(counts.values())
        by_state = ", ".join(f"{state} {n}" for state, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        lines.append(f"Executions:  {total if counted_all else f'{total}+'} of version {job.version}"
                     + (f": {by_state}" if by_state else ""))
        events = _events(status, recent.items)
        if events:
            lines += ["", "Recent events:", table(("TIME", "WHAT", "EVENT"), events)]
        if tail is not None:
            execution, text = tail
            lines += ["", f"Output of {execution.id} on {execution.node_id} ({execution.observed}), last lines:"]
            lines += [f"  {safe(line)}" for line in text]
        return "\n".join(lines)

    print(render())
    return 0


def _health_text(spec: JobSpec) -> str:
    check = spec.rollout.health_check
    if spec.rollout.strategy == "immediate":
        return "none (an immediate rollout has no health gate)" + (": health_check is ignored" if check else "")
    if check is None:
        return "none"
    return (f"every {format_duration(check.interval)}: stable after {plural(check.success_threshold, 'healthy interval')}, "
            f"failed after {check.failure_threshold} unhealthy; deadline {format_duration(check.deadline)}; "
            f"max error rate {check.error_rate_limit:.0%}")


async def _execution_states(client: Client, job: Job) -> tuple[dict[str, int], bool]:
    """Executions of the job's version by observed state (up to DESCRIBE_EXECUTIONS); whether that was all."""
    counts: dict[str, int] = {}
    token, seen = "", 0
    while True:
        _, page = await client.list_executions(ListJobExecutionsRequest(
            job=job.id, job_version=job.version, limit=1000, next_token=token))
        for e in page.items:
            counts[e.observed] = counts.get(e.observed, 0) + 1
        seen += len(page.items)
        token = page.next_token
        if not token:
            return counts, True
        if seen >= DESCRIBE_EXECUTIONS:
            return counts, False


def _events(status: RolloutStatus | None, recent: list[Execution]) -> list[tuple[str, str, str]]:
    """The latest things that happened to the job, newest first: its rollout's news, and its executions'
    latest changes (the job's own state history is not kept)."""
    events: list[tuple[str, str, str]] = []
    if status is not None and status.message:
        at = status.finished_at or status.started_at
        events.append((at, f"rollout v{status.job_version}", f"{status.state}: {status.message}"))
    for e in recent:
        message = e.status.observed_state.message
        events.append((rfc3339(e.status.updated_at), f"{e.node_id} v{e.job_version}",
                       f"{e.observed}" + (f": {message}" if message and message != e.observed else "")
                       + (f" (desired {e.desired})" if e.desired == "stopped" and e.observed not in
                          ("stopped", "completed", "failed") else "")))
    events.sort(key=lambda ev: ev[0], reverse=True)
    return [(_short_time(at), what, shorten(text, 100)) for at, what, text in events]


def _short_time(at: str) -> str:
    from shared.durations import parse_rfc3339

    ts = parse_rfc3339(at)
    return when(ts) if ts is not None else at


async def _output_tail(client: Client, job: Job, recent: list[Execution]) -> tuple[Execution, list[str]] | None:
    """The last lines of output of the job's latest execution that left some: from the job output API
    (`Client.logs`), else (no longer kept, or a query service without it) the last lines its details keep."""
    latest = [e for e in recent if e.job_version == job.version] or recent
    use_logs = True
    for execution in latest:
        text = await _logs_text(client, job, execution) if use_logs else None
        if text is None:
            use_logs = False  # it did not answer: do not wait on it for every execution
        if not text:
            text = details(execution).output
        lines = [line.rstrip() for line in text.splitlines()]
        while lines and not lines[-1]:
            lines.pop()
        if lines:
            return execution, lines[-OUTPUT_LINES:]
    return None


async def _logs_text(client: Client, job: Job, execution: Execution) -> str | None:
    """An execution's kept output from the job output API; None if that does not answer."""
    try:
        _, page = await client.logs(ExecutionLogsRequest(job=job.id, execution_id=execution.id, limit=1000))
    except ShoalError:
        return None
    return "".join(item.text for item in page.items)


def _selector_text(sel: Selector) -> str:
    parts = [f"{k}={v}" for k, v in sel.match_labels.items()] + list(sel.match_expressions)
    if sel.match_ids:
        parts.append(f"ids in ({','.join(sel.match_ids)})")
    return ", ".join(parts) or "(every node)"


async def job_executions(args: argparse.Namespace, client: Client) -> int:
    request = ListJobExecutionsRequest(
        job=args.job, limit=args.limit, next_token=args.next_token, order_by=args.order_by, reverse=args.reverse,
        job_version=args.version, all_job_versions=args.all_versions, node_id=args.node, state=args.state,
    )
    raw, page = await client.list_executions(request)

    def render() -> str:
        rows = [(e.id, e.node_id, e.job_version, e.rollout_wave, e.desired, e.observed,
                 when(e.status.created_at), e.status.observed_state.message) for e in page.items]
        out = table(("ID", "NODE", "VERSION", "WAVE", "DESIRED", "OBSERVED", "CREATED", "MESSAGE"), rows)
        flags = {"--order-by": args.order_by if args.order_by != "created_at" else None,
                 "--reverse": args.reverse, "--version": args.version, "--all-versions": args.all_versions,
                 "--node": args.node or None, "--state": args.state}
        return out + _next_page(page.next_token, ["job", "executions", args.job], args, flags)

    emit(raw, args.output, render)
    return 0


def _next_page(token: str, words: list[str], args: argparse.Namespace, flags: dict[str, Any]) -> str:
    """The full command for the next page, so that nobody has to assemble it by hand."""
    if not token:
        return ""
    cmd = ["shoal"]
    if args.namespace != "default":
        cmd += ["-n", args.namespace]
    cmd += words
    if args.limit is not None:
        cmd += ["--limit", str(args.limit)]
    for flag, value in flags.items():
        if value is True:
            cmd.append(flag)
        elif value not in (None, False):
            cmd += [flag, str(value)]
    cmd += ["--next-token", token]
    return f"\n\nmore results: {command_line(cmd)}"


async def job_stop(args: argparse.Namespace, client: Client) -> int:
    reply = await client.stop_job(args.job, args.reason)
    if reply.already_stopped:
        print(f"job {args.job} was already stopped")
    else:
        print(f"job {args.job} ({reply.job_id}) version {reply.job_version} is stopping")
    return 0


JOB: dict[str, Callable[[argparse.Namespace, Client], Awaitable[int]]] = {
    "run": job_run, "list": job_list, "describe": job_describe, "executions": job_executions, "stop": job_stop,
}


# -- job logs ---------------------------------------------------------------------------------------

LOG_TAIL_LINES = 10  # lines of each execution `job logs` shows without --since-start
LOG_POLL = 1.0  # seconds between polls of `job logs --follow`
LOG_GRACE = 5.0  # seconds a follow waits, once the executions ended, for their last chunks
LOG_PAGE = 1000
LOG_LINE_MAX = 16 * 1024  # characters of a line with no end yet held back at most: then it is shown as it is
# C0 controls but tab, DEL and C1 controls: a node's output must not drive the reader's terminal.
_CONTROLS = {c: f"^{chr(c + 64)}" for c in range(32) if c != 9} | {127: "^?"} | {c: "?" for c in range(128, 160)}


def printable(text: str) -> str:
    """Output as `cat -v` shows it: escape sequences and carriage returns cannot move the cursor."""
    return text.translate(_CONTROLS)


class LogLines:
    """Chunks of several executions as whole lines: a line cut between two chunks is held until its end
    arrives (or its execution ends, or it outgrows LOG_LINE_MAX), so that lines of different nodes never
    mix."""

    def __init__(self, nodes: set[str]) -> None:
        self.nodes = set(nodes)
        self.prefix = len(self.nodes) > 1  # the node before each line, once several nodes print
        self.partial: dict[str, tuple[str, str]] = {}  # execution id -> (node, start of its current line)
        self.last_seq: dict[str, int] = {}
        self.ended: set[str] = set()  # executions whose final chunk arrived

    def add(self, items: list[LogItem], notes: bool = True) -> list[tuple[str, str]]:
        """The complete lines in `items`, as (execution id, text to print); with `notes`, output that was
        not kept (a gap in an execution's chunks, or chunks before its first) is said on stderr."""
        self.nodes.update(item.node_id for item in items)
        self.prefix = len(self.nodes) > 1
        lines: list[tuple[str, str]] = []
        for item in items:
            seen = self.last_seq.get(item.execution_id)
            if notes and item.seq > (seen or 0) + 1:
                missing = item.seq - (seen or 0) - 1
                print(f"({item.node_id}: {missing} chunk(s) of output before this were not kept)", file=sys.stderr)
            self.last_seq[item.execution_id] = item.seq
            _, held = self.partial.pop(item.execution_id, ("", ""))
            *whole, rest = (held + item.text).split("\n")
            lines += [(item.execution_id, self._line(item.node_id, line)) for line in whole]
            if item.final:
                self.ended.add(item.execution_id)
                if rest:
                    lines.append((item.execution_id, self._line(item.node_id, rest)))
            elif len(rest) > LOG_LINE_MAX:
                lines.append((item.execution_id, self._line(item.node_id, rest)))
            elif rest:
                self.partial[item.execution_id] = (item.node_id, rest)
        return lines

    def flush(self) -> list[tuple[str, str]]:
        """Lines still waiting for their end, as they stand."""
        held, self.partial = self.partial, {}
        return [(eid, self._line(node, rest)) for eid, (node, rest) in held.items()]

    def _line(self, node_id: str, text: str) -> str:
        return f"[{node_id}] {printable(text)}" if self.prefix else printable(text)


class LogTail:
    """The last `keep` lines of each execution, in the order they came: memory for `keep` lines an
    execution, however much output is read."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.count = 0
        self.kept: dict[str, deque[tuple[int, str]]] = {}

    def add(self, lines: list[tuple[str, str]]) -> None:
        for execution_id, text in lines:
            kept = self.kept.get(execution_id)
            if kept is None:
                kept = self.kept[execution_id] = deque(maxlen=self.keep)
            self.count += 1
            kept.append((self.count, text))

    def lines(self) -> list[tuple[str, str]]:
        merged = sorted((n, execution_id, text) for execution_id, kept in self.kept.items() for n, text in kept)
        return [(execution_id, text) for _, execution_id, text in merged]


def _show(lines: list[tuple[str, str]]) -> None:
    if lines:
        sys.stdout.write("".join(text + "\n" for _, text in lines))
        sys.stdout.flush()


def replaced_later(execution: Execution, spec: JobSpec) -> bool:
    """An ended execution that the job's restart policy replaces (after its backoff), unless stopped."""
    if execution.desired != "running" or execution.status.next_execution_id:
        return False
    if execution.observed == "completed":
        return spec.restart_policy == "always"
    return execution.observed in ("failed", "stopped") and spec.restart_policy in ("on-failure", "always")


async def _all_ended(client: Client, job: str, executions: list[Execution]) -> bool:
    """Every execution has ended and none will be restarted (or the job itself has ended)."""
    if not executions or not all(e.observed in TERMINAL_STATES for e in executions):
        return False
    _, found = await client.get_job(job)
    if found.state.state_type in ENDED_JOB_STATES or found.state.state_type == "rollout_failed":
        return True
    return not any(replaced_later(e, found.spec) for e in executions)


async def job_logs(args: argparse.Namespace, client: Client) -> int:
    """What the job's commands printed (the latest version's executions, or one node's): the last lines
    of each, or with --since-start all that is kept; with --follow, then what they print next, until
    Ctrl-C or until every execution has ended and none is to be restarted."""
    executions = await client.all_executions(args.job, node_id=args.node)
    printer = LogLines({e.node_id for e in executions})
    tail = None if args.since_start else LogTail(LOG_TAIL_LINES)
    after = 0
    while True:  # everything kept so far, a page at a time
        _, page = await client.logs(ExecutionLogsRequest(job=args.job, node_id=args.node, after=after, limit=LOG_PAGE))
        lines = printer.add(page.items, notes=args.since_start)
        if not args.follow and not page.items and page.next == after:
            lines += printer.flush()
        if tail is None:
            _show(lines)
        else:
            tail.add(lines)
        if not page.items and page.next == after:
            break
        after = page.next
    if tail is not None:
        _show(tail.lines())
    if not args.follow:
        return 0
    loop = asyncio.get_running_loop()
    ended_at: float | None = None
    while True:
        if ended_at is None:  # (first: what ended is known before its last chunks are read)
            executions = await client.all_executions(args.job, node_id=args.node)
            printer.nodes.update(e.node_id for e in executions)
            if await _all_ended(client, args.job, executions):
                ended_at = loop.time()
        _, page = await client.logs(ExecutionLogsRequest(job=args.job, node_id=args.node, after=after, limit=LOG_PAGE))
        after = page.next
        _show(printer.add(page.items))
        if page.items and len(page.items) == LOG_PAGE:
            continue  # more is waiting
        if ended_at is not None and (all(e.id in printer.ended for e in executions)
                                     or loop.time() - ended_at > LOG_GRACE):
            _show(printer.flush())
            return 0
        await asyncio.sleep(LOG_POLL)


JOB["logs"] = job_logs


# -- node -------------------------------------------------------------------------------------------


async def node(args: argparse.Namespace, client: Client) -> int:
    selector = None
    if args.selector or args.label or args.ids:
        selector = Selector(match_labels=parse_labels(args.label), match_expressions=list(args.selector),
                            match_ids=list(args.ids))
    request = ListNodesRequest(selector=selector, state=args.state, limit=args.limit, next_token=args.next_token)
    raw, page = await client.list_nodes(request)

    def render() -> str:
        rows = [(n.id, n.state.state_type, ",".join(f"{k}={v}" for k, v in sorted(n.labels.items())),
                 when(n.updated_at)) for n in page.items]
        out = table(("ID", "STATE", "LABELS", "UPDATED"), rows)
        flags: dict[str, Any] = {"--state": args.state}
        extra = []
        for expr in args.selector:
            extra += ["--selector", expr]
        for label in args.label:
            extra += ["--label", label]
        for node_id in args.ids:
            extra += ["--id", node_id]
        return out + _next_page(page.next_token, ["node", "list", *extra], args, flags)

    emit(raw, args.output, render)
    return 0


# -- ping -------------------------------------------------------------------------------------------


async def ping(args: argparse.Namespace, client: Client) -> int:
    """Exit 0 if the instances in a ready file (or any instance of --service) answer $SRV.PING."""
    if args.ready_file:
        try:
            with open(args.ready_file, encoding="utf-8") as fh:
                ready = json.load(fh)
            service, ids = str(ready["service"]), [str(i) for i in ready["ids"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"not ready: {args.ready_file}: {exc}", file=sys.stderr)
            return 1
        subjects = [f"{s.service_ping(service)}.{i}" for i in ids] or [s.service_ping(service)]
    elif args.service:
        subjects = [s.service_ping(args.service)]
    else:
        raise InvalidInput("give --ready-file or --service", field="ready_file")
    for subject in subjects:
        try:
            await client.bus.request(subject, b"", timeout=min(args.timeout, 5.0))
        except ShoalError as exc:
            print(f"not ready: {subject}: {exc}", file=sys.stderr)
            return 1
    return 0


# -- dead letters -----------------------------------------------------------------------------------


async def dead_letters(args: argparse.Namespace, client: Client) -> int:
    raw, page = await client.list_dead_letters(ListDeadLettersRequest(limit=args.limit, next_token=args.next_token))

    def render() -> str:
        if not page.items and not args.next_token:
            return "no dead letters"
        rows = [(d.seq, when(d.at), d.stream, d.subject, d.attempts, d.error) for d in page.items]
        out = table(("SEQ", "AT", "STREAM", "SUBJECT", "ATTEMPTS", "ERROR"), rows)
        return out + _next_page(page.next_token, ["dead-letters"], args, {})

    emit(raw, args.output, render)
    return 0


# -- rollout ----------------------------------------------------------------------------------------


async def rollout(args: argparse.Namespace, client: Client) -> int:
    action = args.rollout_command
    if action == "watch":
        return await rollout_watch(args, client)
    raw, status = await client.rollout(f"rollouts.{action}", args.job, getattr(args, "reason", ""))
    emit(raw, args.output, lambda: render_status(status, client.namespace))
    return 0


def _failure_rows(failures: list, indent: str = "  ") -> list[str]:
    return [f"{indent}{f.node_id}: {safe(failure_text(f))}" for f in failures]


def render_status(st: RolloutStatus, namespace: str = "default") -> str:
    ns = ["-n", namespace] if namespace != "default" else []
    head = (f"job {st.job_name} ({st.job_id}) version {st.job_version}: rollout {st.state}, job {st.job_state}\n"
            f"strategy {st.strategy}, wave {st.current_wave} of {st.total_waves}, {st.target_nodes} target nodes")
    story = st.rollback
    if st.rollback_of and story is not None:
        failed = len(story.failed_nodes)
        head += f"\nrollback of version {st.rollback_of}, whose rollout failed: {story.cause or 'no cause recorded'}"
        head += (f"\nversion {story.version} failed on {plural(failed, 'node')} of {story.target_nodes} "
                 f"(its budget: {budget_text(story.max_failed_nodes, story.max_failed_nodes_percent)})")
        lines = _failure_rows(story.failures)
        if failed > len(story.failures):
            lines.append(f"  and {failed - len(story.failures)} more")
        if lines:
            head += "\n" + "\n".join(lines)
        head += f"\nfailed nodes of this rollback: {len(st.failed_nodes)}"
        head += "".join(f"\n{line}" for line in _failure_rows(st.failures))
        look = command_line(["shoal", *ns, "job", "executions", st.job_name, "--version", str(story.version),
                             "--state", "failed"])
    else:
        if st.rollback_of:
            head += f"\nrollback of version {st.rollback_of}"
        head += (f"\nfailed nodes: {len(st.failed_nodes)} "
                 f"(budget: {budget_text(st.max_failed_nodes, st.max_failed_nodes_percent)})")
        lines = _failure_rows(st.failures)
        if len(st.failed_nodes) > len(st.failures) and st.failures:
            lines.append(f"  and {len(st.failed_nodes) - len(st.failures)} more")
        head += "".join(f"\n{line}" for line in lines)
        look = command_line(["shoal", *ns, "job", "executions", st.job_name, "--version", str(st.job_version),
                             "--state", "failed"]) if st.failed_nodes else ""
    if st.message:
        head += f"\n{st.message}"
    rows = [(w.wave, w.nodes, "yes" if w.started else "no",
             ", ".join(f"{k} {v}" for k, v in sorted(w.states.items()))) for w in st.waves]
    out = head + "\n\n" + table(("WAVE", "NODES", "STARTED", "EXECUTIONS"), rows)
    return out + (f"\n\nfailed executions: {look}" if look else "")


def watch_lines(st: RolloutStatus, width: int = WIDTH, now: str | None = None) -> tuple[list[str], tuple]:
    """One compact view of a rollout for `rollout watch`: a timestamped headline, every wave on one bar
    line (# done, x failed, ~ in progress, . not started), and the rollout's latest message; each line
    at most `width` columns. Also what changed, for showing it only then (the time aside)."""
    done = failed = 0
    for w in st.waves:
        d, f, _, _ = wave_counts(w.states)
        done, failed = done + d, failed + f
    head = (f"{now or clock()} {st.job_name} v{st.job_version}: rollout {st.state}, job {st.job_state}"
            + (f" (rollback of v{st.rollback_of})" if st.rollback_of else ""))
    wave = f"wave {st.current_wave}/{st.total_waves} " if st.strategy in ("rolling", "canary") else "all at once "
    story = st.rollback
    if story is not None:  # the failures that matter are the failed version's, against its budget
        tail = f" done {done}/{st.target_nodes}; v{story.version} failed {len(story.failed_nodes)} " \
               f"(budget {story.max_failed_nodes})"
    else:
        tail = f" done {done}/{st.target_nodes} failed {len(st.failed_nodes)} (budget {st.max_failed_nodes})"
    bar = wave_bar(st.waves, max(4, width - len(wave) - len(tail)))
    lines = [shorten(head, width), shorten(wave + bar + tail, width)]
    if st.message:
        lines.append("  " + shorten(st.message, width - 2))
    key = (st.state, st.job_state, st.job_version, st.current_wave, bar, done, len(st.failed_nodes), st.message)
    return lines, key


WATCH_START_GRACE = 5.0  # seconds `rollout watch` waits for a job's rollout to exist


async def rollout_watch(args: argparse.Namespace, client: Client) -> int:
    """Poll the rollout's status until it ends: redrawn in place on a terminal, a line per change
    otherwise. With --timeout, give up after that many seconds saying where it stood."""
    import os
    import shutil

    tty = sys.stdout.isatty() and os.environ.get("TERM", "") != "dumb"
    block = LiveBlock(sys.stdout, tty=tty)
    loop = asyncio.get_running_loop()
    deadline = None if args.watch_timeout is None else loop.time() + args.watch_timeout
    began = loop.time()
    while True:
        try:
            _, status = await client.rollout("rollouts.status", args.job)
        except NotFound:
            # Just submitted (`shoal job run X && shoal rollout watch X`): its rollout may be a moment away.
            if loop.time() - began >= WATCH_START_GRACE or (deadline is not None and loop.time() >= deadline):
                raise
            await asyncio.sleep(min(args.interval, 0.5))
            continue
        width = min(shutil.get_terminal_size((WIDTH, 24)).columns, 200) - 1 if tty else WIDTH
        lines, key = watch_lines(status, width)
        block.show(lines, key)
        if status.state in ROLLOUT_ENDED:
            print(render_status(status, client.namespace))
            return 1 if status.state == "failed" or status.rollback_of else 0
        if deadline is not None and loop.time() >= deadline:
            print(f"error: timed out after {args.watch_timeout:g}s watching the rollout of {status.job_name}: "
                  f"it is {status.state} (wave {status.current_wave} of {status.total_waves}, "
                  f"{plural(len(status.failed_nodes), 'failed node')}), job {status.job_state}", file=sys.stderr)
            return EXIT_TIMEOUT
        pause = args.interval if deadline is None else max(0.0, min(args.interval, deadline - loop.time()))
        await asyncio.sleep(pause)


HANDLERS: dict[str, Callable[[argparse.Namespace, Client], Awaitable[int]]] = {
    "job": job, "node": node, "rollout": rollout, "dead-letters": dead_letters, "ping": ping,
}

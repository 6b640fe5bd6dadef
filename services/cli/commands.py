"""The API commands of the CLI: job, node and rollout."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from shared import telemetry
from shared.api import (
    ListDeadLettersRequest,
    ListJobExecutionsRequest,
    ListJobsRequest,
    ListNodesRequest,
    RolloutStatus,
)
from shared.codec import to_json
from shared import subjects as s
from shared.errors import InvalidInput, ShoalError
from shared.models import ONE_SHOT_JOB_TYPES, Selector, SubmissionOutcome
from shared.settings import Settings
from shared.transport import Bus

from .client import Client, load_spec
from .output import command_line, emit, table, when

# Job states in which `job run --wait` stops waiting.
SETTLED_JOB_STATES = frozenset(
    {"running", "degraded", "completed", "failed", "stopped", "rollout_failed", "rollout_paused"}
)
ROLLOUT_ENDED = frozenset({"succeeded", "failed", "stopped"})


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
    if args.wait and not outcome.dry_run:
        return await _wait_for_job(client, outcome.job_id, outcome.job_version, args.output == "table")
    return 0


async def _wait_for_job(client: Client, job_id: str, version: int, verbose: bool) -> int:
    last = ""
    while True:
        try:
            _, job = await client.get_job(job_id)
        except ShoalError as exc:
            if exc.code != 404 and not exc.retryable:
                raise
            job = None  # not in the query view yet, or a query replica is restarting
        if job is not None and job.version >= version:
            state = job.state.state_type
            line = f"{state}: {job.state.message}"
            if verbose and line != last:
                print(line)
                last = line
            # A one-shot job that is running has not finished yet.
            settled = SETTLED_JOB_STATES - {"running", "degraded"} if job.type in ONE_SHOT_JOB_TYPES else SETTLED_JOB_STATES
            if state in settled:
                return 1 if state in ("failed", "rollout_failed") else 0
        await asyncio.sleep(0.5)


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


async def job_describe(args: argparse.Namespace, client: Client) -> int:
    raw, job = await client.get_job(args.job)

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
        ]
        return "\n".join(lines)

    emit(raw, args.output, render)
    return 0


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


# -- node -------------------------------------------------------------------------------------------


async def node(args: argparse.Namespace, client: Client) -> int:
    from services.agent.service import parse_labels

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
    emit(raw, args.output, lambda: render_status(status))
    return 0


def render_status(st: RolloutStatus) -> str:
    head = (f"job {st.job_name} ({st.job_id}) version {st.job_version}: rollout {st.state}, job {st.job_state}\n"
            f"strategy {st.strategy}, wave {st.current_wave} of {st.total_waves}, {st.target_nodes} target nodes")
    if st.rollback_of:
        head += f"\nrollback of version {st.rollback_of}"
    head += (f"\nfailed nodes: {len(st.failed_nodes)} (budget: more than {st.max_failed_nodes} nodes or "
             f"{st.max_failed_nodes_percent:g}% fails the rollout)")
    if st.message:
        head += f"\n{st.message}"
    rows = [(w.wave, w.nodes, "yes" if w.started else "no",
             ", ".join(f"{k} {v}" for k, v in sorted(w.states.items()))) for w in st.waves]
    return head + "\n\n" + table(("WAVE", "NODES", "STARTED", "EXECUTIONS"), rows)


async def rollout_watch(args: argparse.Namespace, client: Client) -> int:
    last = ""
    while True:
        _, status = await client.rollout("rollouts.status", args.job)
        waves = " | ".join(
            f"w{w.wave}:" + ",".join(f"{k}={v}" for k, v in sorted(w.states.items())) for w in status.waves)
        line = (f"[{status.state}] v{status.job_version} wave {status.current_wave}/{status.total_waves} "
                f"failed {len(status.failed_nodes)} | {waves}")
        if line != last:
            print(line, flush=True)
            last = line
        if status.state in ROLLOUT_ENDED:
            print(render_status(status))
            return 1 if status.state == "failed" or status.rollback_of else 0
        await asyncio.sleep(args.interval)


HANDLERS: dict[str, Callable[[argparse.Namespace, Client], Awaitable[int]]] = {
    "job": job, "node": node, "rollout": rollout, "dead-letters": dead_letters, "ping": ping,
}

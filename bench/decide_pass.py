"""One rollout pass of a large job, in one process (single-process figures): what a pass costs now that the
owner of the job keeps its per-node index (`services/rollout/nodes.py`), against a pass that reads every
execution of the job (the index built from them: what every pass did before the index was kept).

The job is an immediate rollout in progress over `--nodes` targets (each size in turn): half of its
executions are stable, half are validating (the records of tests/builders.py). One operation is one
execution event and the pass that follows it: one validating execution turns stable, then `decide`. Kept:
the index hears the execution (`NodeIndex.put`) and the pass reads it. Scan: the pass builds the index from
all the job's executions. CPU per operation is this process's thread time; the ratio is scan / kept at
the same size, measured in the same run.

    .venv/bin/python bench/decide_pass.py [--nodes 1000,10000,100000] [--json FILE]
"""

from __future__ import annotations

import dataclasses
import time

import msgspec
from common import Result, finish, parse_args, say

from services.rollout.decide import decide
from services.rollout.nodes import NodeIndex
from tests.builders import NOW, execution, job, rollout, seconds, spec, view


def measure(count: int) -> tuple[float, float]:
    """CPU seconds of one kept pass and of one scanning pass over a job of `count` nodes."""
    targets = [f"node-{i:06d}" for i in range(count)]
    record = rollout(targets, strategy="immediate", waves=[count], current_wave=0)
    the_spec = spec("immediate")
    executions = [execution(n, observed="running" if i % 2 else "validating", stable=bool(i % 2),
                            created=NOW - seconds(20)) for i, n in enumerate(targets)]
    v = view(job(), record, the_spec, executions)
    kept = NodeIndex(record, the_spec, v.specs, executions)
    validating = [e for e in executions if e.status.stable_at is None]
    changed = [msgspec.structs.replace(e, status=msgspec.structs.replace(
        e.status, stable_at=NOW, revision=e.status.revision + 1,
        observed_state=msgspec.structs.replace(e.status.observed_state, state_type="running")))
        for e in validating]
    rounds = min(len(changed), max(20, 200_000 // count))
    started = time.thread_time()
    for e in changed[:rounds]:
        kept.put(e)
        decide(dataclasses.replace(v, nodes=kept))
    kept_cpu = (time.thread_time() - started) / rounds
    scans = max(3, 20_000 // count)
    started = time.thread_time()
    for _ in range(scans):
        decide(v)
    scan_cpu = (time.thread_time() - started) / scans
    return kept_cpu, scan_cpu


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: p.add_argument(
        "--nodes", default="1000,10000,100000", help="job sizes, comma separated"))
    rows: list[Result] = []
    for count in (int(n) for n in args.nodes.split(",")):
        say(f"{count} nodes")
        kept, scan = measure(count)
        rows += [
            Result(f"{count} nodes: event + pass, index kept", kept * 1e6, "us CPU"),
            Result(f"{count} nodes: pass reading every execution", scan * 1e3, "ms CPU"),
            Result(f"{count} nodes: scan / kept", scan / kept, "x"),
        ]
    finish(rows, args, "One rollout pass (single process)")


if __name__ == "__main__":
    main()

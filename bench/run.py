"""Run every benchmark and print one table; `--write` puts it into docs/BENCHMARKS.md.

Each benchmark runs in its own process (its own nats-server, its own event loop), one after the other,
so they never compete for the 2 cores. The table replaces whatever is between the markers
`<!-- results:start -->` and `<!-- results:end -->` in docs/BENCHMARKS.md.

    .venv/bin/python bench/run.py [--write] [--only pagination,submissions,fleet,deployed,submissions_deployed,query_deployed]
    make bench

`deployed` runs the stack as deployed (every service, nats-server and the agents their own processes) at
1,000, 5,000 and 10,000 nodes, a fresh stack each: it takes a few minutes. `submissions_deployed` submits
to that stack with one scheduler process, then two, alternately (about 3 minutes). `query_deployed` measures
pages and the view's catch-up against an echo and a plain consumer, each its own process (about 2 minutes).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOC = ROOT / "docs" / "BENCHMARKS.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
BENCHMARKS = ("pagination", "submissions", "fleet", "deployed", "submissions_deployed", "query_deployed")

sys.path.insert(0, str(HERE))
from common import Result, markdown_table  # noqa: E402


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        server = subprocess.run([str(Path(sys.executable).parent / "nats-server"), "--version"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        server = "nats-server ?"
    return (f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, {server}; "
            f"run {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}")


def run_one(name: str, extra: list[str]) -> tuple[list[Result], float, int]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as out:
        path = out.name
    t0 = time.perf_counter()
    cmd = [sys.executable, str(HERE / f"{name}.py"), "--json", path, *extra]
    print(f"\n$ {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    # The benchmark's own table goes to our stderr; we print the combined one at the end.
    proc = subprocess.run(cmd, cwd=ROOT, stdout=sys.stderr)
    seconds = time.perf_counter() - t0
    rows: list[Result] = []
    try:
        rows = [Result(**r) for r in json.loads(Path(path).read_text() or "[]")]
    except (OSError, ValueError):
        pass
    finally:
        Path(path).unlink(missing_ok=True)
    if proc.returncode != 0:
        rows.append(Result(f"{name}: benchmark exited with code {proc.returncode}", float("nan"), "",
                           "see its output above"))
    return rows, seconds, proc.returncode


def write_doc(table: str) -> None:
    text = DOC.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise SystemExit(f"{DOC} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{START}\n{table}\n{END}{tail}", encoding="utf-8")
    print(f"wrote the results into {DOC.relative_to(ROOT)}", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"replace the results table in {DOC.relative_to(ROOT)}")
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help="comma-separated subset of " + ", ".join(BENCHMARKS))
    args = parser.parse_args()
    chosen = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = set(chosen) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")

    sections = []
    status = 0
    t0 = time.perf_counter()
    for name in chosen:
        rows, seconds, code = run_one(name, [])
        status = status or code
        sections.append((name, rows, seconds))
    total = time.perf_counter() - t0

    parts = [f"Measured on {machine()}. Server, services and client share the cores; "
             f"all benchmarks took {total:.0f} s."]
    for name, rows, seconds in sections:
        parts.append(f"\n**{name}** (`.venv/bin/python bench/{name}.py`, {seconds:.0f} s)\n")
        parts.append(markdown_table(rows))
    table = "\n".join(parts)
    print(table)
    if args.write:
        write_doc(table)
    return status


if __name__ == "__main__":
    raise SystemExit(main())

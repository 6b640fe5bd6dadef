"""Many chaos rounds (the scenario of tests/chaos.py, which the suite runs once): how many faults were
survived with every guarantee intact, and what a fault costs.

Each round starts a fresh deployment (nats-server, two processes of every service, a simulated fleet),
rolls a job out, updates it with a rolling update while processes, the fleet agent and nats-server are
killed with SIGKILL, then checks the five guarantees. Rounds differ by seed.

    .venv/bin/python bench/chaos.py [--rounds 10] [--seed 1] [--nodes 40] [--chaos-seconds 40] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.chaos import CHECKS, Chaos, run  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1, help="seed of the first round; each next round adds 1")
    parser.add_argument("--nodes", type=int, default=40)
    parser.add_argument("--chaos-seconds", type=float, default=40.0)
    parser.add_argument("--json", default="", help="also write the rounds as JSON here")
    args = parser.parse_args()

    rows = []
    faults: Counter[str] = Counter()
    broken: Counter[str] = Counter()
    began = time.monotonic()
    for i in range(args.rounds):
        seed = args.seed + i
        with tempfile.TemporaryDirectory(prefix="shoal-chaos-") as tmp:
            chaos = Chaos(Path(tmp), seed=seed, nodes=args.nodes, chaos_seconds=args.chaos_seconds)
            try:
                report = run(chaos)
            except Exception as exc:  # a round that could not even be checked counts as broken
                print(f"seed {seed}: round failed: {exc}", file=sys.stderr)
                print("\n".join(chaos.log[-30:]), file=sys.stderr)
                broken["round"] += 1
                rows.append({"seed": seed, "error": str(exc)})
                continue
        print(report.summary(), file=sys.stderr)
        if not report.ok:
            print("\n".join(chaos.log[-40:]), file=sys.stderr)
        faults.update(f.rsplit("-", 1)[0] for f in report.faults)
        broken.update(check for check, problems in report.problems.items() if problems)
        rows.append({"seed": seed, "faults": report.faults, "problems": report.problems,
                     "settle_seconds": round(report.settle_seconds, 1)})

    checked = [r for r in rows if "faults" in r]
    held = sum(1 for r in checked if not any(r["problems"].values()))
    total_faults = sum(len(r["faults"]) for r in checked)
    print("| rounds | faults injected | rounds with every guarantee held | faults survived | minutes |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    survived = sum(len(r["faults"]) for r in checked if not any(r["problems"].values()))
    print(f"| {len(rows)} | {total_faults} | {held} of {len(rows)} | {survived} of {total_faults} | "
          f"{(time.monotonic() - began) / 60:.1f} |")
    print()
    print("faults by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(faults.items())))
    print("guarantees broken: " + (", ".join(f"{k} in {broken[k]} round(s)" for k in (*CHECKS, "round")
                                             if broken[k]) or "none"))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if held == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Mutation testing of the pure rule modules: `make mutate` (not part of `make test`: it takes minutes).

Each rule module is mutated by mutmut and must be caught by its unit tests alone (no server). The
run happens in a temporary copy of the repository, so nothing mutmut writes lands in the checkout.
Prints killed/total per module and exits non-zero if one is below the bar.

    python tests/mutation.py [module ...]      # default: every module below
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BAR = 0.85

# module -> the unit tests that must kill its mutants
MODULES: dict[str, list[str]] = {
    "shared/selector.py": ["tests/unit/test_selector.py"],
    "services/health/transitions.py": ["tests/unit/test_health_rules.py"],
    "services/health/windows.py": ["tests/unit/test_health_rules.py"],
    "shared/waves.py": ["tests/unit/test_rollout_rules.py"],
    "services/rollout/decide.py": ["tests/unit/test_decide.py"],
    "services/rollout/nodes.py": ["tests/unit/test_nodes.py", "tests/unit/test_decide.py"],
    "services/agent/intervals.py": ["tests/unit/test_agent_parts.py"],
    "services/health/deadlines.py": ["tests/unit/test_deadlines.py"],
    "shared/plan.py": ["tests/unit/test_cli_parts.py"],
}

CONFIG = """
[tool.mutmut]
source_paths = ["services", "shared"]
only_mutate = ["{module}"]
pytest_add_cli_args_test_selection = [{tests}]
also_copy = ["README.md", "examples"]
"""


def run(module: str, tests: list[str]) -> tuple[int, int, list[str]]:
    with tempfile.TemporaryDirectory(prefix="shoal-mutate-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", ".pytest_cache",
                                                                  "mutants", ".hypothesis", ".shoal-*"))
        pyproject = copy / "pyproject.toml"
        pyproject.write_text(pyproject.read_text() + CONFIG.format(
            module=module, tests=", ".join(f'"{t}"' for t in tests)))
        python = sys.executable
        subprocess.run([python, "-m", "mutmut", "run", "--max-children", "2"], cwd=copy, check=False,
                       stdout=subprocess.DEVNULL)
        out = subprocess.run([python, "-m", "mutmut", "results", "--all", "true"], cwd=copy, text=True,
                             capture_output=True, check=False).stdout
    statuses = re.findall(r"^\s*(\S+): (\w[\w ]*)$", out, re.M)
    killed = sum(1 for _, status in statuses if status == "killed")
    survivors = [name for name, status in statuses if status != "killed"]
    return killed, len(statuses), survivors


def main(argv: list[str]) -> int:
    chosen = argv or list(MODULES)
    failed = False
    for module in chosen:
        killed, total, survivors = run(module, MODULES[module])
        score = killed / total if total else 0.0
        print(f"{module}: {killed}/{total} mutants killed ({score:.0%})")
        for name in survivors:
            print(f"  survived: {name}")
        failed |= score < BAR
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

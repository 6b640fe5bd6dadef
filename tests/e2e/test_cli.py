"""The CLI explains itself, end to end: `shoal dev --simulate 3` and the `shoal` command as a user runs them.

A dry run names the nodes it would use (or why none), the waves and what changes; `--wait` says at once
when no node matches, gives the first failure's cause and the next commands, and gives up after
`--timeout`; `rollout status` after a rollback tells what failed where and against which budget; `rollout
watch` writes plain lines when piped; `job describe` shows executions, events, health and output; and the
small things: a closed pipe, a spec on stdin, --version, completion, a bad namespace, a YAML error, the
README's selectors against the simulated fleet.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.devproc import FAST_ENV, SHOAL, running_dev, shoal

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

README = Path(__file__).resolve().parents[2] / "README.md"
EDGE = "selector: {match_labels: {tier: edge}}\n"  # the three real agents (the simulated nodes have no tier)


def cli(url: str, *args: str, check: bool = True, timeout: float = 60,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return shoal(*args, env={"SHOAL_NATS_URL": url}, check=check, timeout=timeout, stdin=stdin)


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    """`shoal dev --nodes 3 --simulate 3 --sim-label rack=r{i%2}`; yields the NATS URL it prints."""
    tmp_path = tmp_path_factory.mktemp("dev")
    with running_dev(tmp_path / "dev", "--nodes", "3", "--simulate", "3", "--sim-label", "rack=r{i%2}",
                     timeout=90) as running:
        yield running.url


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_dry_run_explains_nodes_waves_and_changes(dev, tmp_path) -> None:
    url = dev
    eu = write(tmp_path / "eu.yaml", "name: eu-report\ntype: query\nconfig: {command: [uname, -a]}\n"
                                     "selector: {match_labels: {region: eu-west}}\n")
    none = cli(url, "job", "run", eu, "--dry-run").stdout
    assert "would be accepted" in none
    assert "nodes:   none of 6 ready nodes matches the selector (region=eu-west)" in none
    assert "why:   no ready node has label region=eu-west; 3 of the 6 ready nodes have a region label" in none

    spec = ("name: planned\ntype: pipeline\nconfig: {command: [sh, -c, 'exec sleep 600']}\n" + EDGE +
            "rollout: {strategy: rolling, max_parallel: 50, health_check: {interval: 300ms, success_threshold: 1, "
            "deadline: 30s}}\n")
    path = write(tmp_path / "planned.yaml", spec)
    found = cli(url, "job", "run", path, "--dry-run").stdout
    assert "nodes:   3 of 6 ready nodes match the selector (tier=edge): node-1, node-2, node-3" in found
    assert "waves:   rolling, 2 waves: 2 + 1 nodes" in found and "changes: a new job" in found

    cli(url, "job", "run", path, "--wait", "--timeout", "60")
    changed = spec.replace("max_parallel: 50", "max_parallel: 100") + "labels: {team: edge-ops}\n"
    diff = cli(url, "job", "run", "-", "--dry-run", stdin=changed).stdout  # the spec on stdin
    assert "job planned" in diff and "version 2 would be accepted" in diff
    assert "changes against version 1 (running):" in diff
    assert "  ~ rollout.max_parallel: 50 -> 100" in diff and "  + labels.team: edge-ops" in diff
    assert "waves:   rolling, 1 wave: 3 nodes" in diff
    plan = json.loads(cli(url, "job", "run", "-", "--dry-run", "-o", "json", stdin=changed).stdout)["plan"]
    assert plan["matched_nodes"] == 3 and plan["waves"] == [3] and plan["current_version"] == 1
    assert {c["path"] for c in plan["changes"]} == {"rollout.max_parallel", "labels.team"}
    # Nothing was applied: the job is still at version 1.
    assert json.loads(cli(url, "job", "describe", "planned", "-o", "json").stdout)["job"]["version"] == 1
    cli(url, "job", "stop", "planned")


def test_wait_says_why_it_stops_and_gives_up_after_its_timeout(dev, tmp_path) -> None:
    url = dev
    eu = write(tmp_path / "eu.yaml", "name: eu-wait\ntype: query\nconfig: {command: [uname, -a]}\n"
                                     "selector: {match_labels: {region: eu-west}}\n")
    started = time.monotonic()
    queued = cli(url, "job", "run", eu, "--wait", check=False, timeout=30)
    assert queued.returncode == 1 and time.monotonic() - started < 20
    assert "queued: no ready node matches the selector (region=eu-west)" in queued.stdout
    assert "why: no ready node has label region=eu-west; 3 of the 6 ready nodes have a region label" in queued.stdout
    assert "starts when a matching node joins" in queued.stdout

    typo = write(tmp_path / "typo.yaml", "name: typo\ntype: query\nconfig: {command: [unamee, -a]}\n" + EDGE)
    failed = cli(url, "job", "run", typo, "--wait", check=False)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    first = next(line for line in failed.stdout.splitlines() if line.startswith("first failure:"))
    assert re.match(r"first failure: node-\d \(execution [0-9a-f-]{36}\): could not start: ", first), first
    assert "No such file or directory: 'unamee'" in first and "(reason: start-error)" in first
    assert "next: shoal job executions typo --state failed" in failed.stdout
    assert "shoal rollout status typo" in failed.stdout

    slow = write(tmp_path / "slow.yaml", "name: slow\ntype: pipeline\nconfig: {command: [sh, -c, 'exec sleep 600']}\n"
                 + EDGE + "rollout: {strategy: rolling, max_parallel: 34, "
                          "health_check: {interval: 300ms, success_threshold: 100, deadline: 120s}}\n")
    started = time.monotonic()
    waited = cli(url, "job", "run", slow, "--wait", "--timeout", "2", check=False)
    assert waited.returncode == 124 and time.monotonic() - started < 15
    assert "error: timed out after 2s waiting for job slow version 1; it is deploying" in waited.stderr
    watched = cli(url, "rollout", "watch", "slow", "--timeout", "1", "--interval", "0.2", check=False)
    assert watched.returncode == 124
    assert "error: timed out after 1s watching the rollout of slow: it is deploying (wave 1 of 2" in watched.stderr
    cli(url, "job", "stop", "slow")


def test_rollout_status_after_a_rollback_tells_the_story(dev, tmp_path) -> None:
    url = dev
    good = ("name: story\ntype: pipeline\nconfig: {command: [sh, -c, 'echo serving; exec sleep 600']}\n" + EDGE +
            "rollout: {strategy: rolling, max_parallel: 100, max_failed_nodes: 5, "
            "health_check: {interval: 300ms, success_threshold: 1, deadline: 30s}}\n")
    cli(url, "job", "run", "-", "--wait", "--timeout", "60", stdin=good)
    # Version 2 fails on all three nodes; its budget tolerates two failed nodes, the third trips it.
    bad = (good.replace("echo serving; exec sleep 600", "echo boom; exit 3").replace("max_failed_nodes: 5",
                                                                                    "max_failed_nodes: 2, "
                                                                                    "max_failed_nodes_percent: 100")
           + "restart_policy: never\n")
    run = cli(url, "job", "run", "-", "--wait", "--timeout", "60", stdin=bad, check=False)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "rollout_failed: rolled back to version 1 after: 3 of 3 nodes failed" in run.stdout
    assert re.search(r"first failure: node-\d .*: exited with code 3 \(reason: exit\); output: boom", run.stdout)

    status = cli(url, "rollout", "status", "story").stdout
    assert "rollback of version 2, whose rollout failed: 3 of 3 nodes failed" in status
    assert "version 2 failed on 3 nodes of 3 (its budget: more than 2 nodes or 100% fails the rollout)" in status
    for n in (1, 2, 3):
        assert f"  node-{n}: exited with code 3 (reason: exit); output: boom" in status
    assert "failed nodes: 0" not in status and "more than 5 nodes" not in status
    assert "failed executions: shoal job executions story --version 2 --state failed" in status
    story = json.loads(cli(url, "rollout", "status", "story", "-o", "json").stdout)["rollback"]
    assert story["version"] == 2 and story["failed_nodes"] == ["node-1", "node-2", "node-3"]
    assert (story["max_failed_nodes"], story["max_failed_nodes_percent"]) == (2, 100.0)

    # Watched through a pipe: plain lines, each within 80 columns, with a time; then the status.
    watched = cli(url, "rollout", "watch", "story", "--interval", "0.2", check=False)
    assert watched.returncode == 1 and "\x1b" not in watched.stdout
    lines = watched.stdout.splitlines()
    assert re.match(r"^\d\d:\d\d:\d\d story v1: rollout succeeded, job rollout_failed \(rollback of v2\)$", lines[0])
    assert re.match(r"^all at once \[#+\] done 3/3; v2 failed 3 \(budget 2\)$", lines[1]), lines[1]
    assert all(len(line) <= 80 for line in lines[:3])
    assert "version 2 failed on 3 nodes of 3" in watched.stdout

    described = cli(url, "job", "describe", "story").stdout
    assert "Health:      every 300ms: stable after 1 healthy interval, failed after 3 unhealthy" in described
    assert "Executions:  3 of version 2: failed 3" in described
    events = described[described.index("Recent events:"):]
    assert "rollout v1" in events and "rolled back to version 1" in events
    assert re.search(r"node-\d v2 +failed: exited with code 3", events)
    assert re.search(r"Output of [0-9a-f-]{36} on node-\d \((running|failed)\), last lines:\n  (serving|boom)", described)
    cli(url, "job", "stop", "story")


def test_pipes_stdin_version_completion_namespace_and_yaml_errors(dev, tmp_path) -> None:
    url = dev
    env = {**os.environ, "SHOAL_NATS_URL": url}
    # A reader that goes away (`| head`): no traceback, the exit status of a command killed by SIGPIPE.
    proc = subprocess.Popen([SHOAL, "node", "list", "-o", "json"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    code = proc.wait(timeout=30)
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert code == 141 and err == "", err
    piped = subprocess.run(f"'{SHOAL}' node list -o yaml | head -n 1", shell=True, env=env, capture_output=True,
                           text=True, timeout=30)
    assert piped.stdout == "items:\n" and "Traceback" not in piped.stderr and "BrokenPipe" not in piped.stderr

    ran = cli(url, "job", "run", "-", stdin="name: from-stdin\ntype: query\nconfig: {command: [uname]}\n" + EDGE)
    assert "job from-stdin" in ran.stdout and "is accepted" in ran.stdout

    version = cli(url, "--version").stdout
    assert re.fullmatch(r"shoal \S+\n", version)
    script = cli(url, "completion", "bash").stdout
    assert "complete -o default -F _shoal shoal" in script
    probe = f'{script}\nCOMP_WORDS=(shoal rollout ""); COMP_CWORD=2; _shoal; echo "${{COMPREPLY[@]}}"'
    assert "watch" in subprocess.run(["bash", "--norc", "-c", probe], capture_output=True, text=True,
                                     timeout=30).stdout.split()
    assert "bashcompinit" in cli(url, "completion", "zsh").stdout

    bad_ns = cli(url, "-n", "bad ns", "job", "list", check=False)
    assert bad_ns.returncode == 2 and bad_ns.stdout == ""
    assert bad_ns.stderr.startswith("error: invalid namespace 'bad ns'") and bad_ns.stderr.count("\n") == 1
    assert "BadSubject" not in bad_ns.stderr

    broken = write(tmp_path / "broken.yaml", "name: [unclosed\n")
    yaml_error = cli(url, "job", "run", broken, check=False)
    assert yaml_error.returncode == 2 and yaml_error.stderr.count("\n") == 1
    assert yaml_error.stderr.startswith(f"error: {broken} is not valid YAML: line 2, column 1: ")
    assert "<unicode string>" not in yaml_error.stderr


def test_readme_selectors_match_the_nodes_of_shoal_dev(dev) -> None:
    url = dev
    selectors = re.findall(r"^shoal node list --selector '([^']+)'", README.read_text(), re.M)
    assert len(selectors) >= 2, "the README shows how to select the dev agents and the simulated fleet"
    found = {}
    for selector in selectors:
        items = json.loads(cli(url, "node", "list", "--selector", selector, "-o", "json").stdout)["items"]
        assert items, f"README's selector {selector!r} matches no node of shoal dev --simulate"
        found[selector] = sorted(n["id"] for n in items)
    assert ["node-1", "node-2"] in found.values()  # region in (us-east,us-west)
    assert any(ids and all(i.startswith("sim-") for i in ids) for ids in found.values())  # the simulated fleet


def test_simulated_nodes_carry_the_labels_given_to_shoal_dev_over_the_defaults(dev) -> None:
    items = json.loads(cli(dev, "node", "list", "--selector", "simulated,rack=r1", "-o", "json").stdout)["items"]
    assert [(n["id"], n["labels"]) for n in items] == [
        ("sim-0001", {"rack": "r1", "simulated": "true", "zone": "zone-1"}),
        ("sim-0003", {"rack": "r1", "simulated": "true", "zone": "zone-0"})]


def test_global_flags_stand_anywhere_on_the_line(dev) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("SHOAL_NATS_URL", "SHOAL_NAMESPACE")}
    listed = subprocess.run([SHOAL, "node", "list", "--state", "ready", "--nats-url", dev, "-o", "json"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)["items"]) == 6
    jobs = subprocess.run([SHOAL, "job", "list", "-n", "elsewhere", f"--nats-url={dev}"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert jobs.returncode == 0 and jobs.stdout.startswith("NAME"), jobs.stderr
    bad = subprocess.run([SHOAL, "job", "list", "--nats-url", dev, "-n", "bad ns"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: invalid namespace 'bad ns'")


def test_rollout_watch_redraws_one_status_in_place_on_a_terminal(dev, tmp_path) -> None:
    """On a terminal of 80 columns, `rollout watch` draws its block, then goes back up over it (ANSI cursor
    up, clear below) and draws it again: one status, timestamped, no line wider than the terminal."""
    import fcntl
    import pty
    import struct
    import termios

    url = dev
    spec = ("name: watched\ntype: pipeline\nconfig: {command: [sh, -c, 'exec sleep 600']}\n"
            "rollout: {strategy: rolling, max_parallel: 10, health_check: {interval: 300ms, success_threshold: 100, "
            "deadline: 120s}}\n")
    cli(url, "job", "run", "-", stdin=spec)
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {**os.environ, **FAST_ENV, "SHOAL_NATS_URL": url, "TERM": "xterm"}
    for name in ("COLUMNS", "LINES", "SHOAL_NAMESPACE"):
        env.pop(name, None)
    proc = subprocess.Popen([SHOAL, "rollout", "watch", "watched", "--interval", "0.2", "--timeout", "3"], env=env,
                            stdin=subprocess.DEVNULL, stdout=secondary, stderr=subprocess.PIPE)
    os.close(secondary)
    out = b""
    try:
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the command ended and closed the terminal
                break
            if not chunk:
                break
            out += chunk
        code = proc.wait(timeout=30)
    finally:
        os.close(primary)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        proc.stderr.close()
        cli(url, "job", "stop", "watched")
    text = out.decode()
    assert code == 124 and "timed out after 3s watching the rollout of watched" in err, (code, err)
    frames = re.split(r"\x1b\[\d+F", text)  # each redraw goes back up over the block drawn before it
    assert len(frames) >= 4, text
    for frame in frames[1:]:
        assert frame.startswith("\x1b[J")  # and clears it
        lines = frame[len("\x1b[J"):].split("\r\n")[:-1]
        assert 2 <= len(lines) <= 3, lines
        assert re.match(r"^\d\d:\d\d:\d\d watched v1: rollout \w+, job \w+$", lines[0]), lines
        assert re.match(r"^wave 1/6 \[.*\] done \d/6 failed 0 \(budget \d+\)$", lines[1]), lines
        assert all(len(line) <= 80 for line in lines)
    assert "rollout deploying, job deploying\r\n" in frames[-1]
    # What the terminal shows is one status, redrawn: a headline per frame, not a scroll of them.
    assert text.count(" watched v1: rollout ") == len(frames)

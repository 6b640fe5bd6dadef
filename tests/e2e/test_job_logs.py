"""`shoal job logs` against `shoal dev --auth`: real agents (each connected as its own node identity) ship
what their commands print, the query service reads it back, and the CLI prints it as a user sees it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.devproc import FAST_ENV, SHOAL, running_dev, shoal, until

from services.cli.auth import seed_path
from shared import subjects as s
from shared.api import OutputChunk
from shared.codec import to_msgpack
from shared.durations import utcnow
from shared.errors import ShoalError
from shared.transport import Bus, Credentials

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

HELLO = "echo hello; echo oops >&2; sleep 0.3; echo bye"


class Dev:
    def __init__(self, url: str, admin_seed: str, data: Path) -> None:
        self.url, self.admin_seed, self.data = url, admin_seed, data

    def env(self) -> dict[str, str]:
        return {**os.environ, **FAST_ENV, "SHOAL_NATS_URL": self.url, "SHOAL_NATS_NKEY": self.admin_seed}

    def cli(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return shoal(*args, env={"SHOAL_NATS_URL": self.url, "SHOAL_NATS_NKEY": self.admin_seed}, check=check,
                     timeout=timeout)

    def run_job(self, tmp_path: Path, name: str, kind: str, script: str, nodes: str = "") -> None:
        spec = tmp_path / f"{name}.yaml"
        selector = f"selector:\n  match_ids: [{nodes}]\n" if nodes else ""
        spec.write_text(f"name: {name}\ntype: {kind}\nconfig:\n  command: [sh, -c, '{script}']\n{selector}")
        self.cli("job", "run", str(spec))
        until(lambda: self.cli("job", "describe", name, check=False).returncode == 0)  # in the query view


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    """`shoal dev --nodes 2 --auth`: every agent connects as its node's identity."""
    data = tmp_path_factory.mktemp("logs") / "dev"
    with running_dev(data, "--nodes", "2", "--auth", wait_for={"seed": r"export SHOAL_NATS_NKEY=(\S+)"}) as running:
        yield Dev(running.url, running.found["seed"], data)


def test_logs_print_what_each_node_printed_prefixed_with_the_node(dev: Dev, tmp_path: Path) -> None:
    dev.run_job(tmp_path, "hello", "query", HELLO)

    def both() -> str | None:
        out = dev.cli("job", "logs", "hello", "--since-start").stdout
        return out if out.count("bye") == 2 else None

    out = until(both)
    for node in ("node-1", "node-2"):
        mine = [line for line in out.splitlines() if line.startswith(f"[{node}] ")]
        assert mine == [f"[{node}] hello", f"[{node}] oops", f"[{node}] bye"], out
    assert len(out.splitlines()) == 6
    # One node: no prefix.
    assert dev.cli("job", "logs", "hello", "--node", "node-2").stdout == "hello\noops\nbye\n"
    assert dev.cli("job", "logs", "hello", "--node", "node-9").stdout == ""


def test_without_since_start_each_execution_shows_its_last_lines(dev: Dev, tmp_path: Path) -> None:
    dev.run_job(tmp_path, "many", "query", "for i in $(seq 1 30); do echo line $i; done; echo end", "node-1")

    def ended() -> str | None:
        out = dev.cli("job", "logs", "many", "--since-start").stdout
        return out if out.endswith("end\n") else None

    everything = until(ended)
    assert everything.splitlines() == [f"line {i}" for i in range(1, 31)] + ["end"]
    assert dev.cli("job", "logs", "many").stdout.splitlines() == [f"line {i}" for i in range(22, 31)] + ["end"]


def test_follow_prints_as_it_comes_and_ends_when_the_executions_end(dev: Dev, tmp_path: Path) -> None:
    dev.run_job(tmp_path, "ticker", "query", "for i in 1 2 3 4 5 6; do echo tick $i; sleep 0.5; done")
    began = time.monotonic()
    follow = dev.cli("job", "logs", "ticker", "--follow", "--since-start", timeout=90)
    took = time.monotonic() - began
    for node in ("node-1", "node-2"):
        assert [line for line in follow.stdout.splitlines() if line.startswith(f"[{node}]")] == [
            f"[{node}] tick {i}" for i in range(1, 7)], follow.stdout
    assert took < 30, took  # it ended by itself once the executions completed
    assert "Traceback" not in follow.stderr


def test_follow_ends_quietly_on_ctrl_c(dev: Dev, tmp_path: Path) -> None:
    dev.run_job(tmp_path, "beat", "pipeline", "while true; do echo beat; sleep 0.2; done", "node-1")
    proc = subprocess.Popen([SHOAL, "job", "logs", "beat", "--follow"], env=dev.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        deadline = time.monotonic() + 30
        while first != "beat\n" and time.monotonic() < deadline:
            first = proc.stdout.readline()
        assert first == "beat\n"
        assert proc.stdout.readline() == "beat\n"  # still following
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130 and err == "", err
    dev.cli("job", "stop", "beat")


def test_an_unknown_job_is_one_clear_line(dev: Dev) -> None:
    missing = dev.cli("job", "logs", "no-such-job", check=False)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        "error: job 'no-such-job' not found in namespace 'default' (field: job)"]


def test_a_node_may_publish_output_under_its_own_id_only(dev: Dev) -> None:
    async def scenario() -> None:
        seed = dev.data / "nats" / "auth" / seed_path("node", "node-1")
        bus = await Bus.connect(dev.url, name="node-1", wait=10, credentials=Credentials(nkey=str(seed)))
        chunk = to_msgpack(OutputChunk(seq=1, data=b"x\n", at=utcnow(), final=True))
        try:
            ack = await bus.js_publish(s.output("node-1", "default", "some-job", "some-execution"), chunk)
            assert ack.stream == s.STREAM_OUTPUT
            with pytest.raises(ShoalError):
                await bus.js_publish(s.output("node-2", "default", "some-job", "some-execution"), chunk, timeout=2)
            assert any("shoal.output.node-2" in v for v in bus.violations), bus.violations
        finally:
            await bus.close()

    asyncio.run(scenario())


def test_a_real_uname_and_a_failing_command_reach_job_logs(dev: Dev, tmp_path: Path) -> None:
    spec = tmp_path / "uname.yaml"
    spec.write_text("name: uname\ntype: query\nrestart_policy: never\n"
                    "config: {command: [sh, -c, 'uname -a; ls /no/such/dir']}\n")
    run = dev.cli("job", "run", str(spec), "--wait", "--timeout", "60", check=False)
    assert run.returncode == 1 and "first failure: node-" in run.stdout, run.stdout + run.stderr
    assert "exited with code 2 (reason: exit); output: ls: " in run.stdout  # what the command said last

    def both() -> str | None:
        out = dev.cli("job", "logs", "uname").stdout
        return out if out.count("/no/such/dir") == 2 else None

    out = until(both)
    uname = os.uname()
    for node in ("node-1", "node-2"):
        mine = [line for line in out.splitlines() if line.startswith(f"[{node}] ")]
        assert len(mine) == 2 and mine[0].startswith(f"[{node}] {uname.sysname} {uname.nodename} {uname.release}")
        assert "/no/such/dir" in mine[1]
    one = dev.cli("job", "logs", "uname", "--node", "node-2").stdout.splitlines()
    assert len(one) == 2 and one[0].startswith(uname.sysname) and "/no/such/dir" in one[1]
    described = dev.cli("job", "describe", "uname").stdout
    assert "Executions:  2 of version 1: failed 2" in described and "/no/such/dir" in described


def test_follow_goes_on_across_a_restart_until_ctrl_c(dev: Dev, tmp_path: Path) -> None:
    """An execution that failed and that its restart policy replaces has not ended its job's output: the
    follow prints what the replacement prints too (and ends only on Ctrl-C here: restarts go on)."""
    spec = tmp_path / "retry.yaml"
    spec.write_text("name: retry\ntype: query\nrestart_policy: on-failure\n"
                    "config: {command: [sh, -c, 'echo attempt; sleep 0.3; exit 3']}\n"
                    "selector: {match_ids: [node-1]}\n"
                    "rollout: {max_failed_nodes: 1, max_failed_nodes_percent: 100}\n")
    dev.cli("job", "run", str(spec))
    proc = subprocess.Popen([SHOAL, "job", "logs", "retry", "--follow"], env=dev.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        seen = []
        deadline = time.monotonic() + 45
        while len(seen) < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break  # it ended by itself: after the first failure, wrongly
            seen.append(line)
        assert seen == ["attempt\n", "attempt\n"], (seen, proc.poll())
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        dev.cli("job", "stop", "retry")
    assert proc.returncode == 130 and err == "", err
    executions = dev.cli("job", "executions", "retry", "-o", "json").stdout
    assert executions.count('"previous_execution_id"') >= 1  # the second attempt was a restart of the first

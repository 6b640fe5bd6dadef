"""`shoal dev` and `Stack` under faults: killed children come back, a busy data dir and a stale NATS URL fail fast."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from services.cli.client import Client
from services.cli.stack import Stack
from shared.natsserver import free_port
from shared.transport import Bus
from tests.devproc import FAST_ENV, SHOAL
from tests.e2e.test_dev_stack import cli

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

QUERY_JOB = "name: {name}\ntype: query\nconfig:\n  command: [sh, -c, 'echo hello from $SHOAL_NODE_ID']\n"


def children_of(pid: int) -> dict[int, str]:
    """The live child processes of `pid`, by pid, with their command lines (from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile
            continue
        # The command name in stat is parenthesised and may hold spaces: fields restart after the last ')'.
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found[int(entry.name)] = cmdline
    return found


class Dev:
    """A `shoal dev` process as a user runs it, with every line it prints collected by a reader thread."""

    def __init__(self, data_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        full_env = {**os.environ, **FAST_ENV}
        full_env.pop("SHOAL_NATS_URL", None)
        full_env.update(env or {})
        self.proc = subprocess.Popen([SHOAL, "dev", "--data-dir", str(data_dir), *args], env=full_env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.errors: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(self.proc.stdout, self.lines), daemon=True),
                         threading.Thread(target=self._read, args=(self.proc.stderr, self.errors), daemon=True)]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines) + "".join(self.errors)

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> re.Match[str]:
        """The first printed line from index `start` on that matches `pattern`, waiting up to `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines[start:]:
                match = re.search(pattern, line)
                if match:
                    return match
            if time.monotonic() > deadline or self.proc.poll() is not None and not self._reading():
                raise AssertionError(f"no line matching {pattern!r} within {timeout}s:\n{self.output}")
            time.sleep(0.1)

    def _reading(self) -> bool:
        return any(reader.is_alive() for reader in self._readers)

    def child(self, *words: str) -> int:
        """The pid of the one child whose command line holds all `words`."""
        matches = [pid for pid, cmd in children_of(self.proc.pid).items() if all(w in cmd.split() for w in words)]
        assert len(matches) == 1, (words, children_of(self.proc.pid))
        return matches[0]

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> int:
        """SIGINT (as Ctrl-C) or SIGTERM; the exit code. Kills (and fails) if it does not stop in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            for reader in self._readers:
                reader.join(timeout=10)
            self.proc.stdout.close()
            self.proc.stderr.close()


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    """One `shoal dev --nodes 2` for the module; every test leaves it answering."""
    running = Dev(tmp_path_factory.mktemp("faults") / "dev", "--nodes", "2")
    try:
        running.wait_for(r"export SHOAL_NATS_URL=(\S+)", timeout=90)
    except BaseException:
        running.stop()
        raise
    try:
        yield running
    finally:
        children = children_of(running.proc.pid)
        code = running.stop(signal.SIGTERM)
        assert code == 0, running.output
        assert "stopping..." in running.output
        left = [pid for pid in children if Path(f"/proc/{pid}").exists()]
        assert not left, [children[pid] for pid in left]


def url_of(dev: Dev) -> str:
    return dev.wait_for(r"export SHOAL_NATS_URL=(\S+)", timeout=0).group(1)


def answers_again(url: str, timeout: float = 30) -> None:
    """Until the query service answers (a restarted one takes a moment to start its endpoints)."""
    deadline = time.monotonic() + timeout
    while (listed := cli(url, "node", "list", "-o", "json", check=False)).returncode != 0:
        assert time.monotonic() < deadline, listed.stderr
        time.sleep(0.3)


def run_query_job(url: str, tmp_path: Path, name: str) -> None:
    """Submit a one-shot job on both nodes and wait until the view lists it completed on each."""
    answers_again(url)
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(QUERY_JOB.format(name=name))
    run = cli(url, "job", "run", str(spec), "--wait", timeout=60)
    assert "accepted" in run.stdout, run.stdout

    def states() -> list[tuple[str, str]]:
        items = json.loads(cli(url, "job", "executions", name, "-o", "json").stdout)["items"]
        return sorted((item["node_id"], item["status"]["observed_state"]["state_type"]) for item in items)

    deadline = time.monotonic() + 30
    while (now := states()) != [("node-1", "completed"), ("node-2", "completed")]:
        assert time.monotonic() < deadline, now
        time.sleep(0.3)


def test_a_service_killed_with_sigkill_is_restarted_and_the_stack_answers_again(dev, tmp_path) -> None:
    url = url_of(dev)
    query = dev.child("serve", "query")
    seen = len(dev.lines)
    os.kill(query, signal.SIGKILL)
    # The reason and the plan are printed (and logged), then the same process comes back.
    died = dev.wait_for(r"query was killed by SIGKILL .*restarting it in ([0-9.]+)s \(restart 1\)", 15, seen)
    assert float(died.group(1)) == 0.5
    dev.wait_for(r"query restarted \(restart 1, pid (\d+)\)", 15, seen)
    assert dev.proc.poll() is None, dev.output
    restarted = dev.child("serve", "query")
    assert restarted != query
    log = (dev.data_dir / "logs" / "query.log").read_text()
    assert "query was killed by SIGKILL" in log and "query restarted (restart 1" in log
    run_query_job(url, tmp_path, "after-query-restart")


def test_a_killed_nats_server_comes_back_on_the_same_port(dev, tmp_path) -> None:
    url = url_of(dev)
    server = dev.child(str(Path(sys.executable).parent / "nats-server"))
    seen = len(dev.lines)
    os.kill(server, signal.SIGKILL)
    dev.wait_for(r"nats was killed by SIGKILL .*restarting it in", 15, seen)
    dev.wait_for(r"nats restarted \(restart 1, pid \d+\)", 15, seen)
    assert "was killed" in (dev.data_dir / "logs" / "nats.log").read_text()
    # Same URL: the services reconnect by themselves and the stack works again.
    run_query_job(url, tmp_path, "after-nats-restart")
    assert dev.proc.poll() is None, dev.output


def finish(proc: subprocess.Popen[str], timeout: float) -> tuple[int | None, str, str, float]:
    """Wait up to `timeout` for a process we expect to exit by itself; stop it cleanly if it does not.

    Returns (exit code or None if it had to be stopped, stdout, stderr, seconds it ran)."""
    started = time.monotonic()
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err, time.monotonic() - started
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # let it stop whatever it started
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        return None, out, err, time.monotonic() - started


def test_a_second_shoal_dev_on_the_same_data_dir_fails_at_once(dev) -> None:
    env = {**os.environ, **FAST_ENV}
    env.pop("SHOAL_NATS_URL", None)
    before = set(children_of(dev.proc.pid))
    second = subprocess.Popen([SHOAL, "dev", "--nodes", "2", "--data-dir", str(dev.data_dir)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    code, out, err, took = finish(second, timeout=20)
    assert code not in (None, 0), out + err
    assert took < 10, f"took {took:.1f}s"
    assert str(dev.data_dir.resolve()) in err and f"pid {dev.proc.pid}" in err, err
    assert "Traceback" not in err
    # The first one is untouched.
    assert dev.proc.poll() is None and set(children_of(dev.proc.pid)) == before
    assert (dev.data_dir / "stack.lock").read_text().strip() == str(dev.proc.pid)


def test_a_stale_nats_url_fails_within_seconds_with_a_hint(tmp_path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    env = {**os.environ, **FAST_ENV, "SHOAL_NATS_URL": url}
    proc = subprocess.Popen([SHOAL, "dev", "--data-dir", str(tmp_path / "dev")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    code, out, err, took = finish(proc, timeout=20)
    assert code not in (None, 0), out + err
    assert took < 10, f"took {took:.1f}s"
    assert f"using NATS at {url} (from SHOAL_NATS_URL)" in out, out
    assert f"nothing answers at {url}" in err and "unset SHOAL_NATS_URL" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    # Nothing was started against the dead server.
    assert not (tmp_path / "dev" / "logs" / "scheduler.log").exists()


def test_a_local_server_is_announced(dev) -> None:
    assert "starting a local nats-server" in dev.output


# --------------------------------------------------------------------------------------------------
# Stack itself, as the fault-injection tests drive it.
# --------------------------------------------------------------------------------------------------


async def submit_and_complete(url: str, name: str, nodes: int) -> None:
    bus = await Bus.connect(url, name="e2e", wait=10)
    try:
        client = Client(bus, timeout=10)
        await client.wait_ready(nodes, timeout=60)
        spec = {"name": name, "type": "query", "config": {"command": ["sh", "-c", "echo hi"]}}
        outcome = await client.submit(spec)
        assert outcome.accepted, outcome
        deadline = asyncio.get_running_loop().time() + 45
        state = None
        while asyncio.get_running_loop().time() < deadline:
            try:
                _, job = await client.get_job(name)
                state = job.state.state_type
            except Exception as exc:  # a view still catching up, a replica restarting
                state = repr(exc)
            if state == "completed":
                return
            await asyncio.sleep(0.3)
        raise AssertionError(f"{name} not completed: {state}")
    finally:
        await bus.close()


def supervise_until(stack: Stack, pattern: str, timeout: float = 15) -> list[str]:
    """Call `supervise_once` as `shoal dev` does until one of its messages matches; every message so far."""
    said: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        said += stack.supervise_once()
        if any(re.search(pattern, line) for line in said):
            return said
        time.sleep(0.1)
    raise AssertionError(f"nothing matched {pattern!r}: {said}")


def test_stack_replicas_restarts_and_a_killed_nats_server(tmp_path) -> None:
    stack = Stack(tmp_path / "stack", nodes=1, replicas=2, env=FAST_ENV).start()
    try:
        assert set(stack.children) == {"nats", "health-1", "health-2", "scheduler-1", "scheduler-2",
                                       "rollout-1", "rollout-2", "query-1", "query-2", "node-1"}
        asyncio.run(submit_and_complete(stack.nats_url, "first", 1))
        # Each query replica keeps its own view.
        assert (tmp_path / "stack" / "query-1.db").exists() and (tmp_path / "stack" / "query-2.db").exists()

        stack.kill("scheduler-1")
        assert stack.dead() == ["scheduler-1"]
        said = supervise_until(stack, r"scheduler-1 restarted \(restart 1")
        assert any("scheduler-1 was killed by SIGKILL" in line for line in said), said
        assert stack.dead() == []

        pid = stack.process("query-2").pid
        stack.restart("query-2")
        assert stack.process("query-2").pid != pid and stack.dead() == []

        port = stack.server.port
        stack.server.kill()
        assert "nats" in stack.dead()
        stack.server.start()
        assert stack.server.port == port and stack.nats_url.endswith(f":{port}")
        assert stack.dead() == [] and stack.supervise_once() == []
        asyncio.run(submit_and_complete(stack.nats_url, "after-nats-restart", 1))

        # The supervisor restarts the server too, on the same port.
        stack.kill("nats")
        supervise_until(stack, r"nats restarted")
        assert stack.server.port == port
        asyncio.run(submit_and_complete(stack.nats_url, "after-supervised-restart", 1))
    finally:
        stack.stop()
    assert stack.dead() == []
    # Stopped means unlocked: the same data dir can host a stack again.
    Stack(tmp_path / "stack").lock().unlock()


def test_shoal_dev_with_auth_refuses_anonymous_clients_and_serves_the_admin(tmp_path) -> None:
    """What the README shows works with auth on, as the admin identity `shoal dev --auth` prints."""
    env = {**os.environ, **FAST_ENV}
    env.pop("SHOAL_NATS_URL", None)
    env.pop("SHOAL_NATS_NKEY", None)
    proc = subprocess.Popen([SHOAL, "dev", "--auth", "--nodes", "2", "--data-dir", str(tmp_path / "dev")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        url = nkey = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (url and nkey):
            line = proc.stdout.readline()
            if not line:
                break
            if "export SHOAL_NATS_URL=" in line:
                url = line.split("=", 1)[1].strip()
            if "export SHOAL_NATS_NKEY=" in line:
                nkey = line.split("=", 1)[1].split()[0]
        assert url and nkey, "shoal dev --auth did not print the URL and the admin seed"
        anonymous = cli(url, "node", "list", check=False)
        assert anonymous.returncode != 0 and "Traceback" not in anonymous.stderr
        admin = {"SHOAL_NATS_NKEY": nkey}
        listed = subprocess.run([SHOAL, "node", "list"], env={**env, **admin, "SHOAL_NATS_URL": url},
                                capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0 and "node-1" in listed.stdout and "node-2" in listed.stdout, listed.stderr
        ran = subprocess.run([SHOAL, "job", "run", "examples/query-uptime.yaml", "--wait"],
                             env={**env, **admin, "SHOAL_NATS_URL": url}, capture_output=True, text=True, timeout=90)
        assert ran.returncode == 0 and "completed" in ran.stdout, ran.stdout + ran.stderr
        dead = subprocess.run([SHOAL, "dead-letters"], env={**env, **admin, "SHOAL_NATS_URL": url},
                              capture_output=True, text=True, timeout=60)
        assert dead.returncode == 0, dead.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

"""Agent pieces that need no server: label templates, the health file channel, config files, processes,
and what a restarted agent finds again (the shim's exit file, re-adoption by pid and start time)."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from services.agent.executors import (OUTPUT_TAIL, Outcome, ProcessRun, SimulatedRun, recover_process, start_process,
                                      write_files)
from services.agent.fleetstate import FleetJournal
from services.agent.intervals import interval_is_news, next_streak
from services.agent.node import NodeAgent
from services.agent.runstate import (EXIT_FILE, OUTPUT_FILE, STATE_FILE, ExitStatus, RunState,
                                     finished_run_dirs_to_delete, is_running, process_start, read_struct,
                                     write_struct)
from services.agent.service import expand, parse_labels
from shared.codec import convert
from shared.errors import InvalidInput
from shared.durations import utcnow
from shared.models import DesiredState, Execution, ExecutionStatus, JobSpec, ObservedState, StateReport
from shared.workloads import Simulate


def execution(spec: dict, exec_id: str = "e1", node: str = "n1") -> Execution:
    now = utcnow()
    js = convert(spec, JobSpec)
    return Execution(id=exec_id, job_id="j", job_type=js.type, job_version=1, namespace="default", node_id=node,
                     status=ExecutionStatus(created_at=now, updated_at=now, revision=1,
                                            desired_state=DesiredState(state_type="running"),
                                            observed_state=ObservedState(state_type="pending")),
                     job_spec=js)


def test_label_and_id_templates() -> None:
    assert expand("sim-{i:04d}", 7) == "sim-0007"
    assert expand("zone=z{i%3}", 7) == "zone=z1"
    assert expand("rack-{i}-{i%2}", 12) == "rack-12-0"
    assert parse_labels(["a=1", "b=", "c=x=y"]) == {"a": "1", "b": "", "c": "x=y"}
    with pytest.raises(InvalidInput):
        parse_labels(["novalue"])


async def test_process_reports_exit_code_output_and_env(tmp_path) -> None:
    run = await start_process(execution({"name": "q", "type": "query", "config": {
        "command": ["sh", "-c", "echo node=$SHOAL_NODE_ID; echo $GREETING; exit 3"], "env": {"GREETING": "hi"}}}),
        tmp_path)
    outcome = await run.wait()
    assert outcome.exit_code == 3 and not outcome.succeeded
    assert outcome.output.splitlines() == ["node=n1", "hi"]


async def test_stop_terminates_the_process_group(tmp_path) -> None:
    run = await start_process(execution({"name": "q", "type": "pipeline", "config": {
        "command": ["sh", "-c", "sleep 300 & sleep 300"]}}), tmp_path)
    await asyncio.sleep(0.2)
    await run.stop(grace=2)
    outcome = await asyncio.wait_for(run.wait(), 5)
    assert outcome.reason == "stopped"


async def test_health_file_lines_are_counted_per_interval(tmp_path) -> None:
    run = await start_process(execution({"name": "p", "type": "pipeline", "config": {
        "command": ["sh", "-c", 'printf "ok 5\\nerror 2\\nok\\n" >> "$SHOAL_HEALTH_FILE"; exec sleep 30']}}),
        tmp_path)
    assert isinstance(run, ProcessRun)
    for _ in range(50):
        if run.health_file.exists() and run.health_file.stat().st_size:
            break
        await asyncio.sleep(0.05)
    assert run.health_sample() == (8, 2)
    assert run.health_sample() == (1, 0)  # nothing new: liveness alone
    with open(run.health_file, "a") as fh:
        fh.write("error 4\nok 1")  # the last line is incomplete: counted next time
    assert run.health_sample() == (4, 4)
    with open(run.health_file, "a") as fh:
        fh.write("\n")
    assert run.health_sample() == (1, 0)
    await run.stop(grace=1)
    assert (await asyncio.wait_for(run.wait(), 5)).reason == "stopped"


def test_config_files_are_written_atomically_inside_the_root(tmp_path) -> None:
    spec = {"name": "c", "type": "config", "config": {"files": [
        {"path": "app/settings.ini", "content": "a=1\n", "mode": 0o600},
        {"path": "..data/x.conf", "content": "x"}]}}
    run = write_files(execution(spec), tmp_path / "root")
    assert (tmp_path / "root/app/settings.ini").read_text() == "a=1\n"
    assert stat.S_IMODE(os.stat(tmp_path / "root/app/settings.ini").st_mode) == 0o600
    assert (tmp_path / "root/..data/x.conf").read_text() == "x"
    assert not [p for p in (tmp_path / "root/app").iterdir() if p.name.startswith(".")]  # no temp files left
    assert asyncio.run(run.wait()).succeeded
    escape = {"name": "c", "type": "config", "config": {"files": [{"path": "a/../../evil", "content": "x"}]}}
    with pytest.raises(InvalidInput):
        write_files(execution(escape), tmp_path / "root")
    assert not (tmp_path / "evil").exists()


async def test_simulated_behaviour_follows_the_spec() -> None:
    assert SimulatedRun(Simulate(error_rate=0.25), "n1").health_sample() == (100, 25)
    assert SimulatedRun(Simulate(error_rate=0.25, only_nodes=["other"]), "n1").health_sample() == (100, 0)
    assert SimulatedRun(Simulate(hang=True), "n1").health_sample() == (0, 0)
    done = await asyncio.wait_for(SimulatedRun(Simulate(exit_code=4), "n1").wait(), 2)
    assert done.exit_code == 4
    forever = SimulatedRun(None, "n1")
    waiter = asyncio.create_task(forever.wait())
    await asyncio.sleep(0.1)
    assert not waiter.done()
    await forever.stop(1)
    assert (await waiter).reason == "stopped"


# -- surviving the agent: the shim, the run dir, re-adoption ------------------------------------------


async def _until(predicate, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("not true in time")


def _state(run_dir: Path) -> RunState:
    state = read_struct(run_dir / STATE_FILE, RunState)
    assert state is not None
    return state


def test_the_shim_records_the_exit_code_and_outlives_sigterm_to_its_group(tmp_path) -> None:
    shim = [sys.executable, "-I", "-m", "services.agent.shim"]
    done = subprocess.run([*shim, str(tmp_path), "--", "sh", "-c", "echo out; exit 7"], capture_output=True,
                          timeout=30)
    assert done.returncode == 7 and done.stdout == b"out\n"
    status = read_struct(tmp_path / EXIT_FILE, ExitStatus)
    assert status is not None and status.exit_code == 7 and status.signal is None

    # SIGTERM to the whole group: the command dies of it (default disposition), the shim records that.
    (tmp_path / EXIT_FILE).unlink()
    proc = subprocess.Popen([*shim, str(tmp_path), "--", "sh", "-c", "echo up; exec sleep 30"],
                            stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
    status = read_struct(tmp_path / EXIT_FILE, ExitStatus)
    assert status is not None and status.signal == signal.SIGTERM and status.returncode == -signal.SIGTERM


async def test_a_live_process_is_re_adopted_by_pid_and_start_time(tmp_path) -> None:
    e = execution({"name": "p", "type": "pipeline", "config": {
        "command": ["sh", "-c", 'echo ok >> "$SHOAL_HEALTH_FILE"; exec sleep 30']}})
    run = await start_process(e, tmp_path)
    await _until(lambda: run.health_file.exists() and run.health_file.stat().st_size > 0)
    adopted = recover_process(e, tmp_path)
    assert isinstance(adopted, ProcessRun) and adopted.adopted
    assert adopted.pid == run.pid == _state(run.run_dir).pid
    assert adopted.health_sample() == (1, 0)  # lines from before the adoption belong to no interval
    with open(adopted.health_file, "a") as fh:
        fh.write("ok 3\nerror 1\n")
    assert adopted.health_sample() == (4, 1)
    await adopted.stop(grace=2)  # the process group, though it is not this run's child
    outcome = await asyncio.wait_for(adopted.wait(), 5)
    assert outcome.reason == "stopped" and outcome.exit_code == -signal.SIGTERM
    assert (await asyncio.wait_for(run.wait(), 5)).exit_code == -signal.SIGTERM


async def test_a_recycled_pid_is_not_adopted(tmp_path) -> None:
    e = execution({"name": "p", "type": "pipeline", "config": {"command": ["sleep", "30"]}})
    run = await start_process(e, tmp_path)
    try:
        state = _state(run.run_dir)
        assert is_running(state)
        # The same pid, but a process that started at another time: someone else's.
        write_struct(run.run_dir / STATE_FILE, msgspec.structs.replace(state, pid_start=state.pid_start + 1))
        assert recover_process(e, tmp_path) is None
        write_struct(run.run_dir / STATE_FILE, msgspec.structs.replace(state, boot_id="another-boot"))
        assert recover_process(e, tmp_path) is None
        write_struct(run.run_dir / STATE_FILE, state)
        assert isinstance(recover_process(e, tmp_path), ProcessRun)
    finally:
        await run.stop(grace=2)
        await asyncio.wait_for(run.wait(), 5)


async def test_an_exited_process_is_read_back_with_its_exit_code(tmp_path) -> None:
    for i, (command, code, message) in enumerate([("echo bye; exit 3", 3, "exited with code 3"),
                                                   ("echo bye; kill -KILL $$", -9, "killed by signal 9")]):
        e = execution({"name": "q", "type": "query", "config": {"command": ["sh", "-c", command]}}, exec_id=f"e{i}")
        run = await start_process(e, tmp_path)
        await _until(lambda: (run.run_dir / EXIT_FILE).exists())
        # A new agent, which never saw this process: it ended while nobody watched, and that is what counts.
        found = recover_process(e, tmp_path)
        assert isinstance(found, Outcome)
        assert found.exit_code == code and found.message.startswith(message) and not found.succeeded
        assert found.output == "bye\n"
        await _until(lambda: not run.alive())  # the supervisor writes the exit file, then ends: reaped


async def test_the_output_tail_is_read_from_the_output_file(tmp_path) -> None:
    run = await start_process(execution({"name": "q", "type": "query", "config": {"command": [
        "sh", "-c", "head -c 5000 /dev/zero | tr '\\0' x; echo; echo last words >&2"]}}), tmp_path)
    outcome = await asyncio.wait_for(run.wait(), 10)
    assert outcome.succeeded
    assert len(outcome.output.encode()) == OUTPUT_TAIL and outcome.output.endswith("x\nlast words\n")
    assert (run.run_dir / OUTPUT_FILE).read_bytes().count(b"x") == 5000  # the whole output stays on disk


async def test_a_command_that_cannot_start_is_a_start_error(tmp_path) -> None:
    with pytest.raises(OSError, match="No such file or directory"):
        await start_process(execution({"name": "q", "type": "query", "config": {"command": ["no-such-command"]}}),
                            tmp_path)
    assert not (tmp_path / "executions" / "e1" / STATE_FILE).exists()  # nothing to re-adopt


class _Reports:
    def __init__(self) -> None:
        self.sent: list[StateReport] = []

    def send(self, report: object) -> None:
        if isinstance(report, StateReport):
            self.sent.append(report)


async def test_a_re_adopted_run_keeps_its_execution_timeout(tmp_path) -> None:
    """A new agent adopts the process, says so, and measures the timeout from when the process started."""
    e = execution({"name": "p", "type": "pipeline", "config": {"command": ["sleep", "30"]},
                   "timeouts": {"execution_timeout": 60}})
    run = await start_process(e, tmp_path)
    state = _state(run.run_dir)
    two_minutes_ago = utcnow() - dt.timedelta(minutes=2)
    write_struct(run.run_dir / STATE_FILE, msgspec.structs.replace(state, started_at=two_minutes_ago))
    e.status.observed_state = ObservedState(state_type="running")
    reports = _Reports()
    agent = NodeAgent("n1", reports, work_dir=tmp_path, stop_grace=2)  # type: ignore[arg-type]
    agent.on_execution(e, {})
    await _until(lambda: len(reports.sent) == 2)
    adopted, ended = reports.sent
    assert (adopted.state, adopted.message) == ("running", "re-adopted after an agent restart")
    assert ended.state == "failed" and ended.details["reason"] == "timeout"
    assert (await asyncio.wait_for(run.wait(), 5)).exit_code == -signal.SIGTERM  # the very same process


async def test_a_resumed_simulated_run_lasts_what_is_left_of_its_duration(tmp_path) -> None:
    began = utcnow() - dt.timedelta(seconds=29.8)
    outcome = await asyncio.wait_for(SimulatedRun(Simulate(duration=30), "n1", started_at=began).wait(), 2)
    assert outcome.exit_code == 0

    journal = FleetJournal(tmp_path)
    journal.load()
    e = execution({"name": "s", "type": "pipeline", "config": {"simulate": {}}})
    journal.started(e, began)
    journal.started(execution({"name": "s", "type": "pipeline"}, exec_id="e2"), began)
    await journal.flush()
    again = FleetJournal(tmp_path)
    again.load()
    record = again.get("e1")
    assert record is not None and record.started_at == began and record.node_id == "n1"
    again.assignment_seen()  # e2 was not part of the assignment: forgotten
    assert set(again.runs) == {"e1"}


def test_only_finished_run_dirs_beyond_the_newest_are_deleted(tmp_path) -> None:
    root = tmp_path / "executions"
    for i in range(6):
        (root / f"r{i}").mkdir(parents=True)
        os.utime(root / f"r{i}", (1000 + i, 1000 + i))
    me = process_start(os.getpid())
    assert me is not None
    write_struct(root / "r0" / STATE_FILE, RunState(execution_id="r0", job_id="j", job_version=1, pid=os.getpid(),
                                                     pid_start=me[1], started_at=utcnow()))
    os.utime(root / "r0", (1000, 1000))
    doomed = finished_run_dirs_to_delete(root, busy={"r1"}, keep=2)
    # r0: its process is alive; r1: busy; r5, r4: the newest finished ones.
    assert sorted(p.name for p in doomed) == ["r2", "r3"]


def test_a_job_does_not_inherit_the_agents_nats_identity(monkeypatch) -> None:
    from services.agent.executors import job_environment

    monkeypatch.setenv("SHOAL_NATS_NKEY", "/etc/shoal/node.nk")
    monkeypatch.setenv("SHOAL_NATS_PASSWORD", "secret")
    monkeypatch.setenv("SHOAL_NATS_URL", "nats://a:4222")
    env = job_environment()
    assert "SHOAL_NATS_NKEY" not in env and "SHOAL_NATS_PASSWORD" not in env
    assert env["SHOAL_NATS_URL"] == "nats://a:4222"


# -- which health intervals are reported ---------------------------------------------------------------


def _observed(state: str, stable: bool) -> Execution:
    e = execution({"name": "x", "type": "pipeline", "config": {"simulate": {}}})
    e.status.observed_state.state_type = state  # type: ignore[assignment]
    e.status.stable_at = utcnow() if stable else None
    return e


@pytest.mark.parametrize(("state", "stable", "threshold", "reported", "news"), [
    ("validating", False, 3, 0, True),
    ("validating", False, 3, 2, True),
    ("validating", False, 3, 3, False),  # three healthy ones make it stable: a fourth adds nothing
    ("validating", False, 1, 1, False),
    ("degraded", True, 2, 1, True),  # a degraded execution needs success_threshold healthy ones back
    ("degraded", True, 2, 2, False),
    ("running", True, 3, 0, True),  # stable: one healthy interval after trouble resets the streak
    ("running", True, 3, 1, False),
    ("running", False, 3, 1, True),  # running but not stable yet (the echo of its validation is behind)
])
def test_healthy_intervals_are_reported_until_they_can_change_nothing(state: str, stable: bool, threshold: int,
                                                                      reported: int, news: bool) -> None:
    assert interval_is_news(_observed(state, stable), "healthy", reported, threshold) is news


@pytest.mark.parametrize("verdict", ["unhealthy", "no-data"])
def test_an_interval_that_is_not_healthy_is_always_reported(verdict: str) -> None:
    for state, stable in (("validating", False), ("running", True), ("degraded", True)):
        assert interval_is_news(_observed(state, stable), verdict, 10, 1)


def test_a_streak_counts_consecutive_verdicts_and_no_data_breaks_it() -> None:
    previous, streak, seen = "", 0, []
    for verdict in ["healthy", "healthy", "unhealthy", "unhealthy", "unhealthy", "no-data", "no-data", "healthy",
                    "unhealthy", "healthy"]:
        streak, previous = next_streak(previous, streak, verdict), verdict
        seen.append(streak)
    assert seen == [1, 2, 1, 2, 3, 0, 0, 1, 1, 1]

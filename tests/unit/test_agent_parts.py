"""Agent pieces that need no server: label templates, the health file channel, config files, processes."""

from __future__ import annotations

import asyncio
import os
import stat

import pytest

from services.agent.executors import ProcessRun, SimulatedRun, start_process, write_files
from services.agent.service import expand, parse_labels
from shared.codec import convert
from shared.errors import InvalidInput
from shared.durations import utcnow
from shared.models import DesiredState, Execution, ExecutionStatus, JobSpec, ObservedState
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

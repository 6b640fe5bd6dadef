"""An agent that dies (kill -9) and comes back re-adopts what it ran, with real services and a real nats-server.

`crash()` takes an in-process agent away as kill -9 would: nothing is stopped, reported or flushed, and
the commands it started keep running. The agent that replaces it has the same node id and work dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from services.agent.executors import ProcessRun, SimulatedRun
from services.agent.fleetstate import FLEET_FILE, FleetState
from services.agent.runstate import EXIT_FILE, STATE_FILE, ExitStatus, RunState, is_running, read_struct

pytestmark = pytest.mark.nats

HEALTH = {"interval": "200ms", "success_threshold": 2, "failure_threshold": 3, "deadline": "10s"}


async def crash(cluster, agent) -> None:
    """kill -9 of an in-process agent: no graceful shutdown, no last reports, processes left running."""
    await agent.crash()
    cluster.components.remove(agent)


async def real_agent(cluster, work: Path):
    return await cluster.start("agent", node_id="edge-1", labels={"tier": "edge"}, work_dir=str(work))


def real_job(name: str, script: str, **extra: Any) -> dict:
    return {"name": name, "type": "pipeline", "config": {"command": ["sh", "-c", script]},
            "rollout": {"strategy": "rolling", "max_parallel": 100, "health_check": dict(HEALTH)}, **extra}


async def one_running(api, job: str):
    items = await api.all_executions(job)
    return items[0] if len(items) == 1 and items[0].observed == "running" else None


def run_state(work: Path, execution_id: str) -> RunState:
    state = read_struct(work / "executions" / execution_id / STATE_FILE, RunState)
    assert state is not None
    return state


@contextlib.contextmanager
def reaping(*works: Path):
    """Whatever happens in the test, no process it started outlives it."""
    try:
        yield
    finally:
        for work in works:
            for state_file in work.glob(f"executions/*/{STATE_FILE}"):
                state = read_struct(state_file, RunState)
                if state is not None and is_running(state):
                    os.killpg(state.pid, signal.SIGKILL)


async def test_a_running_process_is_re_adopted_after_the_agent_is_killed(cluster, wait_for, tmp_path) -> None:
    await cluster.start_services()
    work = tmp_path / "edge-1"
    agent = await real_agent(cluster, work)
    api = await cluster.api()
    await api.wait_ready(1)
    script = 'echo $$ > pid; while true; do echo ok >> "$SHOAL_HEALTH_FILE"; sleep 0.2; done'
    assert (await api.submit(real_job("pipe", script))).accepted  # restart_policy on-failure
    with reaping(work):
        before = await wait_for(lambda: one_running(api, "pipe"))
        run_dir = work / "executions" / before.id
        pid = int((run_dir / "pid").read_text())

        await crash(cluster, agent)
        os.kill(pid, 0)  # the command outlived its agent
        # Down long enough for the cluster to notice (node_timeout 1 s), back within the lost grace (3 s).
        await wait_for(lambda: _is(api, "pipe", before.id, "lost"))
        again = await real_agent(cluster, work)
        size = (run_dir / "health").stat().st_size
        await asyncio.sleep(3.5)  # time to re-adopt, and past the lost grace: nothing fails meanwhile
        items = await api.all_executions("pipe", all_job_versions=True)
        assert [(e.id, e.observed) for e in items] == [(before.id, "running")]  # no failure, no restart
        assert items[0].status.observed_state.message == "re-adopted after an agent restart"
        _, job = await api.get_job("pipe")
        assert job.state.state_type == "running" and job.version == 1

        local = again.nodes["edge-1"].agent.runs.get(before.id)
        assert local is not None and isinstance(local.run, ProcessRun) and local.run.adopted
        assert local.run.pid == run_state(work, before.id).pid
        os.kill(pid, 0)  # the very same process, still working
        assert (run_dir / "health").stat().st_size > size

        # And the new agent controls it: stopping the job stops the adopted process.
        await api.stop_job("pipe")
        await wait_for(lambda: _is(api, "pipe", before.id, "stopped"))
        await wait_for(lambda: _gone(pid))


async def test_a_process_that_exits_while_the_agent_is_down_is_reported_with_its_exit_code(
        cluster, wait_for, tmp_path) -> None:
    await cluster.start_services()
    work = tmp_path / "edge-1"
    agent = await real_agent(cluster, work)
    api = await cluster.api()
    await api.wait_ready(1)
    release = tmp_path / "release"
    script = 'echo $$ > pid; while [ ! -e "$RELEASE" ]; do sleep 0.1; done; echo done; exit 3'
    spec = {"name": "once", "type": "pipeline", "restart_policy": "never",
            "config": {"command": ["sh", "-c", script], "env": {"RELEASE": str(release)}}}
    assert (await api.submit(spec)).accepted
    with reaping(work):
        before = await wait_for(lambda: one_running(api, "once"))
        pid = int((work / "executions" / before.id / "pid").read_text())
        await crash(cluster, agent)
        release.touch()
        await wait_for(lambda: _gone(pid))

        await real_agent(cluster, work)
        await wait_for(lambda: _is(api, "once", before.id, "failed"))
        [after] = await api.all_executions("once")
        details = after.status.details
        assert (details.get("reason"), details.get("exit_code"), details.get("output")) == ("exit", 3, "done\n")
        assert after.status.observed_state.message.startswith("exited with code 3")
        status = read_struct(work / "executions" / before.id / EXIT_FILE, ExitStatus)
        assert status is not None and status.exit_code == 3


async def test_a_simulated_fleet_resumes_its_executions(cluster, wait_for, tmp_path) -> None:
    await cluster.start_services()
    work = tmp_path / "fleet"
    fleet = await cluster.start("agent", simulate=3, work_dir=str(work))
    api = await cluster.api()
    await api.wait_ready(3)
    assert (await api.submit({"name": "sims", "type": "pipeline", "config": {"simulate": {"duration": 600}},
                              "rollout": {"strategy": "rolling", "max_parallel": 100,
                                          "health_check": dict(HEALTH)}})).accepted

    async def all_running() -> dict[str, str] | None:
        items = await api.all_executions("sims")
        ok = len(items) == 3 and all(e.observed == "running" for e in items)
        return {e.id: e.node_id for e in items} if ok else None

    before = await wait_for(all_running)

    def on_file() -> FleetState | None:
        state = read_struct(work / FLEET_FILE, FleetState)
        return state if state is not None and {r.execution_id for r in state.runs} == set(before) else None

    recorded = {r.execution_id: r for r in (await wait_for(lambda: _sync(on_file))).runs}
    await crash(cluster, fleet)
    again = await cluster.start("agent", simulate=3, work_dir=str(work))
    await asyncio.sleep(3.5)  # time to resume, and past the lost grace: nothing fails meanwhile
    assert await all_running() == before  # the same executions, none failed, none restarted
    for execution_id, node_id in before.items():
        local = again.nodes[node_id].agent.runs.get(execution_id)
        assert local is not None and isinstance(local.run, SimulatedRun)
        assert local.run.started_at == recorded[execution_id].started_at  # only the rest of its 600 s


@pytest.mark.parametrize("kind", ["real", "simulated"])
async def test_without_any_trace_the_execution_fails_with_reason_agent_restart(cluster, wait_for, tmp_path,
                                                                               kind) -> None:
    await cluster.start_services()
    first, fresh = tmp_path / "first", tmp_path / "fresh"
    spec = real_job("svc", "exec sleep 600") if kind == "real" else {
        "name": "svc", "type": "pipeline", "config": {"simulate": {}}}

    async def start(work: Path):
        if kind == "real":
            return await real_agent(cluster, work)
        return await cluster.start("agent", simulate=1, work_dir=str(work))

    agent = await start(first)
    api = await cluster.api()
    await api.wait_ready(1)
    assert (await api.submit(spec)).accepted
    with reaping(first, fresh):
        before = await wait_for(lambda: one_running(api, "svc"))
        await crash(cluster, agent)
        await start(fresh)  # same node, empty work dir: nothing to re-adopt

        async def replaced() -> bool:
            items = {e.id: e for e in await api.all_executions("svc")}
            lost = items.get(before.id)
            return bool(lost is not None and lost.observed == "failed"
                        and lost.status.details.get("reason") == "agent-restart"
                        and any(e.observed == "running" for e in items.values()))

        await wait_for(replaced)


async def test_a_process_stopped_while_the_agent_was_down_is_stopped_when_it_comes_back(
        cluster, wait_for, tmp_path) -> None:
    await cluster.start_services()
    work = tmp_path / "edge-1"
    agent = await real_agent(cluster, work)
    api = await cluster.api()
    await api.wait_ready(1)
    assert (await api.submit(real_job("pipe", "echo $$ > pid; exec sleep 600"))).accepted
    with reaping(work):
        before = await wait_for(lambda: one_running(api, "pipe"))
        pid = int((work / "executions" / before.id / "pid").read_text())
        await crash(cluster, agent)
        await api.stop_job("pipe")
        await asyncio.sleep(0.5)
        os.kill(pid, 0)  # nobody to stop it yet
        await real_agent(cluster, work)
        await wait_for(lambda: _gone(pid))
        await wait_for(lambda: _is(api, "pipe", before.id, "stopped"))


async def _is(api, job: str, execution_id: str, state: str) -> bool:
    return any(e.id == execution_id and e.observed == state for e in await api.all_executions(job))


async def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def _sync(check):
    return check()

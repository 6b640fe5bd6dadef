"""One node's side of an execution: start what is assigned, stop what is no longer wanted, report what happens.

The assignment is the execution record itself (watched from the executions bucket), so an agent that
reconnects or restarts sees its full current assignment at once. The agent reacts to the desired
state and corrects the observed state where it knows better: it re-announces a run the cluster
believes lost, and reports as failed a run the cluster believes alive but this agent does not have
(it restarted meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from pathlib import Path

from shared import telemetry
from shared.durations import utcnow
from shared.errors import ShoalError
from shared.models import TERMINAL_STATES, Execution, HealthReport, StateReport

from .executors import Outcome, Run, simulated, start_process, write_files
from .reporter import Reporter

log = logging.getLogger(__name__)

FINISHED_MEMORY = 10_000
ALIVE_STATES = frozenset({"starting", "validating", "running", "degraded", "lost", "stopping"})


class LocalRun:
    def __init__(self, execution: Execution) -> None:
        self.execution = execution
        self.run: Run | None = None
        self.task: asyncio.Task[None] | None = None
        self.stop_requested = False


class NodeAgent:
    def __init__(self, node_id: str, reporter: Reporter, *, work_dir: Path, simulate: bool = False,
                 stop_grace: float = 10.0) -> None:
        self.node_id = node_id
        self.reporter = reporter
        self.work_dir = work_dir
        self.simulate = simulate
        self.stop_grace = stop_grace
        self.runs: dict[str, LocalRun] = {}
        # Executions this agent ran and saw end: later echoes of their earlier states are not news.
        self.finished: OrderedDict[str, None] = OrderedDict()

    # -- reacting to the assignment ----------------------------------------------------------------

    def on_execution(self, execution: Execution, headers: dict[str, str]) -> None:
        """Called for every version of every execution assigned to this node, in order."""
        with telemetry.span("agent assignment", kind=telemetry.CONSUMER, headers=headers,
                            attributes={"shoal.execution_id": execution.id, "shoal.node_id": self.node_id}):
            self._react(execution)

    def _react(self, execution: Execution) -> None:
        local = self.runs.get(execution.id)
        observed = execution.observed
        if local is None and execution.id in self.finished:
            return  # its final state is reported (or queued); older versions of the record still arrive
        if local is not None:
            local.execution = execution
            if execution.desired == "stopped" or observed in TERMINAL_STATES:
                self._stop(local)
            elif observed == "lost":
                self._report(execution, "running", "node reconnected; still running")
            return
        if execution.desired == "stopped":
            if observed not in TERMINAL_STATES:
                self._report(execution, "stopped", "stopped (was not running on this node)")
            return
        if execution.desired != "running" or observed in TERMINAL_STATES:
            return
        if observed == "lost":
            # Lost while this node was away: what matters is what it was before (pending = never started).
            observed = str(execution.status.details.get("lost_from", "running"))
        if observed == "pending":
            self._start(execution)
        elif observed in ALIVE_STATES:
            self._report(execution, "failed", "the agent restarted and the execution was lost with it",
                         details={"reason": "agent-restart"})

    def _start(self, execution: Execution) -> None:
        local = LocalRun(execution)
        self.runs[execution.id] = local
        local.task = asyncio.create_task(self._supervise(local), name=f"run-{execution.id}")

    def _stop(self, local: LocalRun) -> None:
        if local.stop_requested:
            return
        local.stop_requested = True
        if local.run is not None:
            asyncio.create_task(local.run.stop(self.stop_grace))

    # -- one run -----------------------------------------------------------------------------------

    async def _supervise(self, local: LocalRun) -> None:
        execution = local.execution
        try:
            self._report(execution, "starting", "starting")
            try:
                local.run = await self._launch(execution)
            except (ShoalError, OSError) as exc:
                self._report(execution, "failed", f"could not start: {exc}", details={"reason": "start-error"})
                return
            if local.stop_requested:
                await local.run.stop(self.stop_grace)
            self._report(execution, "running", "running")
            outcome = await self._wait(local)
            self._finish(local.execution, outcome)
        except Exception as exc:  # a bug here must not take the agent down
            log.exception("execution %s failed in the agent", execution.id)
            self._report(execution, "failed", f"agent error: {exc}", details={"reason": "agent-error"})
        finally:
            self.runs.pop(execution.id, None)
            self.finished[execution.id] = None
            while len(self.finished) > FINISHED_MEMORY:
                self.finished.popitem(last=False)

    async def _launch(self, execution: Execution) -> Run:
        if self.simulate:
            return simulated(execution)
        if execution.job_type == "config":
            return write_files(execution, self.work_dir / "config")
        return await start_process(execution, self.work_dir)

    async def _wait(self, local: LocalRun) -> Outcome:
        assert local.run is not None
        spec = local.execution.job_spec
        timeout = spec.timeouts.execution_timeout if spec is not None else 0
        health = asyncio.create_task(self._health_loop(local))
        try:
            return await asyncio.wait_for(local.run.wait(), timeout or None)
        except asyncio.TimeoutError:
            local.stop_requested = True
            await local.run.stop(self.stop_grace)
            return Outcome(None, f"execution_timeout ({timeout}s) exceeded; killed", reason="timeout")
        finally:
            health.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await health

    def _finish(self, execution: Execution, outcome: Outcome) -> None:
        details: dict[str, object] = {"reason": outcome.reason or "exit"}
        if outcome.output:
            details["output"] = outcome.output[-2048:]
        if outcome.reason == "stopped":
            self._report(execution, "stopped", outcome.message, outcome.exit_code, details)
        elif outcome.succeeded:
            self._report(execution, "completed", outcome.message, outcome.exit_code, details)
        else:
            self._report(execution, "failed", outcome.message, outcome.exit_code, details)

    async def _health_loop(self, local: LocalRun) -> None:
        """Every health interval, report work done and errors for health-gated executions.

        A stable execution that stays healthy needs no news (only unhealthy streaks change it), so once
        stable the agent reports an interval only if it, or the one before it, was not healthy, or the
        execution is degraded: thousands of healthy nodes cost the health service nothing.
        """
        spec = local.execution.job_spec
        check = spec.rollout.health_check if spec is not None else None
        if check is None or spec is None or spec.rollout.strategy == "immediate" or local.run is None:
            return
        interval = check.interval / 1e9
        start = utcnow()
        previous = "healthy"
        while True:
            await asyncio.sleep(interval)
            end = utcnow()
            total, errors = local.run.health_sample()
            verdict, _ = check.judge(total, errors)
            e = local.execution
            quiet = (e.status.stable_at is not None and e.observed == "running"
                     and verdict == "healthy" and previous == "healthy")
            previous = verdict
            if not quiet:
                self.reporter.send(HealthReport(namespace=e.namespace, job_id=e.job_id, node_id=e.node_id,
                                                execution_id=e.id, interval_start=start, interval_end=end,
                                                total=total, errors=errors, at=end))
            start = end

    def _report(self, execution: Execution, state: str, message: str, exit_code: int | None = None,
                details: dict[str, object] | None = None) -> None:
        self.reporter.send(StateReport(namespace=execution.namespace, job_id=execution.job_id,
                                       node_id=execution.node_id, execution_id=execution.id,
                                       state=state, message=message, exit_code=exit_code,  # type: ignore[arg-type]
                                       details=details or {}, at=utcnow()))

    async def shutdown(self) -> None:
        """Stop every local run; each is reported failed (agent shut down) so restart policies apply."""
        for local in list(self.runs.values()):
            local.stop_requested = True
            if local.task is not None:
                local.task.cancel()
            if local.run is not None:
                with contextlib.suppress(Exception):
                    await local.run.stop(min(self.stop_grace, 5.0))
            self._report(local.execution, "failed", "the agent shut down", details={"reason": "agent-shutdown"})
        self.runs.clear()


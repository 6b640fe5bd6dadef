"""One node's side of an execution: start what is assigned, stop what is no longer wanted, report what happens.

The assignment is the execution record itself (watched from the executions bucket), so an agent that
reconnects or restarts sees its full current assignment at once. The agent reacts to the desired
state and corrects the observed state where it knows better: it re-announces a run the cluster
believes lost, and restores what it ran before a restart, as Nomad's client restores its allocations.

After a restart (a crash, kill -9), for a run the cluster believes alive (or still pending: the reports
of a start may have died with the old agent) the agent looks at what the old one left on disk: a
process still running is re-adopted and reported running again; one that ended meanwhile is reported
as it ended (exit code and all); only a run with no trace at all is reported failed with reason
`agent-restart`. A process still running for an execution that is over or stopped is stopped. A
graceful shutdown, by contrast, stops every run (an operator stopping the agent stops the work).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections import OrderedDict
from pathlib import Path

from shared import telemetry
from shared.durations import utcnow
from shared.errors import ShoalError
from shared.models import TERMINAL_STATES, Execution, HealthReport, ObservedStateType, StateReport, details

from .executors import Outcome, Run, leftover_output, recover_process, simulated, start_process, write_files
from .fleetstate import FleetJournal
from .intervals import interval_is_news, next_streak
from .output import OutputShipper, output_summary
from .reporter import Reporter
from .runstate import finished_run_dirs_to_delete

log = logging.getLogger(__name__)

FINISHED_MEMORY = 10_000
STARTING_AFTER = 0.5  # seconds a launch may take before the agent reports "starting"
ALIVE_STATES = frozenset({"starting", "validating", "running", "degraded", "lost", "stopping"})


class LocalRun:
    def __init__(self, execution: Execution) -> None:
        self.execution = execution
        self.run: Run | None = None
        self.task: asyncio.Task[None] | None = None
        self.stop_requested = False
        self.healthy_reported = 0  # consecutive healthy intervals reported (see interval_is_news)


class NodeAgent:
    def __init__(self, node_id: str, reporter: Reporter, *, work_dir: Path, simulate: bool = False,
                 stop_grace: float = 10.0, fleet: FleetJournal | None = None,
                 output: OutputShipper | None = None) -> None:
        self.node_id = node_id
        self.reporter = reporter
        self.output = output  # ships what executions print (None: nothing is shipped)
        self.work_dir = work_dir
        self.simulate = simulate
        self.stop_grace = stop_grace
        # Where a simulated node keeps what it runs across restarts (real runs keep it in their run dirs).
        self.fleet = fleet
        self.runs: dict[str, LocalRun] = {}
        # Executions this agent ran and saw end: later echoes of their earlier states are not news.
        self.finished: OrderedDict[str, None] = OrderedDict()
        self.caught_up = False
        self.closing = False  # shut down (or crashed): assignments that still arrive start nothing
        self._chores: set[asyncio.Task[None]] = set()

    # -- reacting to the assignment ----------------------------------------------------------------

    def on_execution(self, execution: Execution, headers: dict[str, str]) -> None:
        """Called for every version of every execution assigned to this node, in order."""
        if self.closing:
            return
        with telemetry.span("agent assignment", kind=telemetry.CONSUMER, headers=headers,
                            attributes={"shoal.execution_id": execution.id, "shoal.node_id": self.node_id}):
            self._react(execution)

    def _react(self, execution: Execution) -> None:
        local = self.runs.get(execution.id)
        observed = execution.observed
        if observed in TERMINAL_STATES and self.fleet is not None:
            self.fleet.forget(execution.id)  # its end is on record: nothing to resume after a restart
        if local is None and execution.id in self.finished:
            return  # its final state is reported (or queued); older versions of the record still arrive
        if local is not None:
            local.execution = execution
            if execution.desired == "stopped" or observed in TERMINAL_STATES:
                self._stop(local)
            elif observed == "lost":
                # Back after being away: what was reported meanwhile may have found it lost, so the
                # intervals it needs are reported again.
                local.healthy_reported = 0
                self._report(execution, "running", "node reconnected; still running")
            return
        if execution.desired == "stopped" or observed in TERMINAL_STATES:
            leftover = self._recover(execution)
            if isinstance(leftover, Run):
                self._adopt(execution, leftover, stop=True)  # outlived a restart but is not wanted any more
            elif execution.desired == "stopped" and observed not in TERMINAL_STATES:
                self._report(execution, "stopped", "stopped (was not running on this node)")
            return
        if execution.desired != "running":
            return
        if observed == "lost":
            # Lost while this node was away: what matters is what it was before (pending = never started).
            observed = details(execution).lost_from or "running"
        if observed == "pending":
            found = self._recover(execution)  # started by an agent that died before its reports went out?
            if found is None:
                self._start(execution)
            else:
                self._take_over(execution, found)
        elif observed in ALIVE_STATES:
            found = self._recover(execution)
            if found is None:
                self._report(execution, "failed", "the agent restarted and the execution was lost with it",
                             details={"reason": "agent-restart"})
                self._remember(execution.id)
            else:
                self._take_over(execution, found)

    def _recover(self, execution: Execution) -> Run | Outcome | None:
        """What an earlier agent on this node left of `execution`: a run still going, how it ended, or
        None if there is no trace of it."""
        if self.simulate:
            record = self.fleet.get(execution.id) if self.fleet is not None else None
            return simulated(execution, record.started_at) if record is not None else None
        if execution.job_type == "config":
            return None  # written in one go: nothing to re-attach to
        return recover_process(execution, self.work_dir)

    def _take_over(self, execution: Execution, found: Run | Outcome) -> None:
        if isinstance(found, Outcome):
            if self.output is not None and not self.simulate:  # what it printed after the last chunk shipped
                self.output.ship(execution, leftover_output(execution, self.work_dir))
            self._finish(execution, found)  # it ended while no agent watched: that is the truth to report
            self._remember(execution.id)
        else:
            self._adopt(execution, found)

    def _start(self, execution: Execution) -> None:
        local = LocalRun(execution)
        self.runs[execution.id] = local
        local.task = asyncio.create_task(self._supervise(local), name=f"run-{execution.id}")

    def _adopt(self, execution: Execution, run: Run, *, stop: bool = False) -> None:
        local = LocalRun(execution)
        local.run = run
        local.stop_requested = stop
        self.runs[execution.id] = local
        local.task = asyncio.create_task(self._supervise(local, adopted=True), name=f"run-{execution.id}")

    def _stop(self, local: LocalRun) -> None:
        if local.stop_requested:
            return
        local.stop_requested = True
        if local.run is not None:
            asyncio.create_task(local.run.stop(self.stop_grace))

    # -- one run -----------------------------------------------------------------------------------

    async def _supervise(self, local: LocalRun, adopted: bool = False) -> None:
        """Run (or, `adopted`, carry on with a run from before a restart) until it ends; report each step."""
        execution = local.execution
        try:
            if adopted:
                assert local.run is not None
                if local.stop_requested:
                    await local.run.stop(self.stop_grace)
                else:
                    self._report(execution, "running", "re-adopted after an agent restart")
            else:
                # "starting" only if starting takes a while: a run that is up at once goes straight to
                # "running", one report (and one write of the execution) instead of two.
                starting = asyncio.get_running_loop().call_later(
                    STARTING_AFTER, lambda: self._report(execution, "starting", "starting"))
                try:
                    local.run = await self._launch(execution)
                except (ShoalError, OSError) as exc:
                    self._report(execution, "failed", f"could not start: {exc}", details={"reason": "start-error"})
                    return
                finally:
                    starting.cancel()
                if local.stop_requested:
                    await local.run.stop(self.stop_grace)
                self._report(execution, "running", "running")
            self._ship_output(execution, local.run)
            outcome = await self._wait(local)
            self._output_ended(execution.id)  # its last chunk goes out before its final state
            self._finish(local.execution, outcome)
        except Exception as exc:  # a bug here must not take the agent down
            log.exception("execution %s failed in the agent", execution.id)
            self._report(execution, "failed", f"agent error: {exc}", details={"reason": "agent-error"})
        finally:
            if not self.closing:  # (a shutdown ends the output itself, once the run is stopped)
                self._output_ended(execution.id)
            self.runs.pop(execution.id, None)
            self._remember(execution.id)
        self._tidy()

    def _ship_output(self, execution: Execution, run: Run) -> None:
        if self.output is not None:
            source = run.output()
            if source is not None:
                self.output.open(execution, source)

    def _output_ended(self, execution_id: str) -> None:
        if self.output is not None:
            self.output.close(execution_id)

    def _remember(self, execution_id: str) -> None:
        self.finished[execution_id] = None
        while len(self.finished) > FINISHED_MEMORY:
            self.finished.popitem(last=False)

    async def _launch(self, execution: Execution) -> Run:
        if self.simulate:
            run = simulated(execution)
            if self.fleet is not None:
                self.fleet.started(execution, run.started_at)
            return run
        if execution.job_type == "config":
            return write_files(execution, self.work_dir / "config")
        return await start_process(execution, self.work_dir)

    async def _wait(self, local: LocalRun) -> Outcome:
        assert local.run is not None
        spec = local.execution.job_spec
        timeout = spec.timeouts.execution_timeout if spec is not None else 0
        # Measured from the start of the execution, which for a re-adopted run was before this agent.
        left = max(0.0, timeout - local.run.elapsed()) if timeout else None
        health = asyncio.create_task(self._health_loop(local))
        try:
            return await asyncio.wait_for(local.run.wait(), left)
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
        summary = output_summary(outcome.output)
        if summary:
            details["output"] = summary  # (ExecutionDetails.output: the last lines, for failure stories)
        if outcome.reason == "stopped":
            self._report(execution, "stopped", outcome.message, outcome.exit_code, details)
        elif outcome.succeeded:
            self._report(execution, "completed", outcome.message, outcome.exit_code, details)
        else:
            self._report(execution, "failed", outcome.message, outcome.exit_code, details)

    async def _health_loop(self, local: LocalRun) -> None:
        """Every health interval, report work done and errors for health-gated executions.

        Only intervals that can change something are reported (`interval_is_news`): a validating
        execution's first `success_threshold` healthy ones, then nothing while it stays healthy, and every
        interval that is not healthy. Thousands of healthy nodes cost the health service nothing, and a
        health service that falls behind is not sent one more report per execution every interval.
        """
        spec = local.execution.job_spec
        check = spec.rollout.health_check if spec is not None else None
        if check is None or spec is None or spec.rollout.strategy == "immediate" or local.run is None:
            return
        interval = check.interval / 1e9
        start = utcnow()
        previous, streak = "", 0  # consecutive intervals with the same verdict, reported or not
        while True:
            await asyncio.sleep(interval)
            end = utcnow()
            total, errors = local.run.health_sample()
            verdict, _ = check.judge(total, errors)
            streak, previous = next_streak(previous, streak, verdict), verdict
            e = local.execution
            if interval_is_news(e, verdict, local.healthy_reported, check.success_threshold):
                local.healthy_reported = local.healthy_reported + 1 if verdict == "healthy" else 0
                self.reporter.send(HealthReport(namespace=e.namespace, job_id=e.job_id, node_id=e.node_id,
                                                execution_id=e.id, interval_start=start, interval_end=end,
                                                total=total, errors=errors, at=end, streak=streak))
            start = end

    def _report(self, execution: Execution, state: ObservedStateType, message: str, exit_code: int | None = None,
                details: dict[str, object] | None = None) -> None:
        self.reporter.send(StateReport(namespace=execution.namespace, job_id=execution.job_id,
                                       node_id=execution.node_id, execution_id=execution.id,
                                       state=state, message=message, exit_code=exit_code,
                                       details=details or {}, at=utcnow()))

    # -- the work dir ------------------------------------------------------------------------------

    def assignment_seen(self) -> None:
        """The watch has delivered the whole current assignment: every run a previous agent left behind
        has been claimed (re-adopted, reported or stopped), so the rest of the work dir is history."""
        self.caught_up = True
        self._tidy()

    def _tidy(self) -> None:
        """Delete finished run dirs beyond the newest few (see runstate), off the event loop."""
        if self.simulate or not self.caught_up:
            return
        doomed = finished_run_dirs_to_delete(self.work_dir / "executions", self.runs.keys())
        if doomed:
            chore = asyncio.create_task(asyncio.to_thread(_remove_dirs, doomed), name=f"tidy-{self.node_id}")
            self._chores.add(chore)
            chore.add_done_callback(self._chores.discard)

    # -- the end -----------------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop every local run; each is reported failed (agent shut down) so restart policies apply.

        An operator who stops the agent stops its work; only an agent that dies leaves its processes
        running for the next one to re-adopt."""
        self.closing = True
        for local in list(self.runs.values()):
            local.stop_requested = True
            if local.task is not None:
                local.task.cancel()
            run = local.run
            if run is None:  # cancelled while starting: its process may be up already
                found = self._recover(local.execution)
                run = found if isinstance(found, Run) else None
            if run is not None:
                with contextlib.suppress(Exception):
                    await run.stop(min(self.stop_grace, 5.0))
            self._output_ended(local.execution.id)
            self._report(local.execution, "failed", "the agent shut down", details={"reason": "agent-shutdown"})
            if self.fleet is not None:
                self.fleet.forget(local.execution.id)
        self.runs.clear()
        if self._chores:
            await asyncio.wait(set(self._chores), timeout=5)

    def abandon(self) -> None:
        """Let go of every run without stopping or reporting anything, as a crash would: processes keep
        running for the next agent. For tests of re-adoption (see AgentService.crash)."""
        self.closing = True
        for local in list(self.runs.values()):
            if local.task is not None:
                local.task.cancel()
        self.runs.clear()


def _remove_dirs(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


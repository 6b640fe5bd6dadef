"""The health service: node registration and liveness, and the observed state of every execution.

Agents never write execution records themselves: they publish reports to the REPORTS stream and this
service applies them with compare-and-set, so a report is never lost while the service is down, and
the rules of what a state may become live in one place (`transitions`, `windows`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

from shared import subjects as s
from shared.codec import decode_message
from shared.durations import utcnow
from shared.errors import Conflict
from shared.lease import Lease, run_as_leader
from shared.models import TERMINAL_STATES, Execution, HealthReport, Report, StateReport
from shared.runtime import Component
from shared.store import Bucket, Mirror, Store
from shared.transport import ApiService, Consumer, ConsumerSpec, Delivery, Entry

from . import windows
from .deadlines import Deadlines
from .nodes import Liveness, NodeRegistry
from .transitions import apply_report

log = logging.getLogger(__name__)

VERSION = "0.1.0"
WINDOW_ATTEMPTS = 20  # reads of a health window that other replicas keep changing, before the report is retried


class HealthService(Component):
    name = "health"

    async def start(self) -> None:
        self.store = Store(self.bus)
        self.windows: Bucket[windows.HealthWindow] = Bucket(self.bus, s.BUCKET_HEALTH, windows.HealthWindow)
        self.window_mirror = WindowMirror(self.windows)
        self.spawn(lambda: self.window_mirror.run(self.stopping), "watch-windows")
        registry = NodeRegistry(self.bus, self.store, self.settings.heartbeat_interval)
        self.liveness = Liveness(self.bus, self.store, self.settings.node_timeout, self.settings.lost_grace)
        await self.liveness.listen()
        self.spawn(lambda: self.liveness.mirror.run(self.stopping), "watch-nodes")

        await ApiService.start(self.bus, s.SERVICE_HEALTH, VERSION, "Node registration and liveness",
                               queue_group=s.QUEUE_GROUP,
                               endpoints=[("nodes-register", s.node_register("*", "*"), registry.register),
                                          ("fleets-open", s.fleet_open("*"), registry.open_fleet)])

        self.reports = Consumer(
            self.bus,
            ConsumerSpec(stream=s.STREAM_REPORTS, durable=s.CONSUMER_HEALTH_REPORTS),
            batch=256,
            concurrency=64,
        )
        await self.reports.start_single(self.on_report)
        lease = Lease(self.bus, "health-sweep")
        self.spawn(lambda: run_as_leader(lease, self.settings.sweep_interval, self.sweep, self.stopping), "sweep")

    # -- reports -----------------------------------------------------------------------------------

    async def on_report(self, delivery: Delivery) -> None:
        report: StateReport | HealthReport = decode_message(delivery.data, Report,  # type: ignore[arg-type]
                                                            f"report on {delivery.subject}")
        sender = delivery.subject.rsplit(".", 1)[-1]
        if report.node_id != sender:
            log.warning("dropping report for node %s sent on %s", report.node_id, delivery.subject)
            return
        if isinstance(report, StateReport):
            await self.apply_state(report)
        else:
            await self.apply_health(report)

    async def apply_state(self, report: StateReport) -> None:
        key = s.execution_key(report.namespace, report.job_id, report.node_id, report.execution_id)
        now = utcnow()
        written = await self.store.change_execution(key, lambda e: apply_report(e, report, now))
        if written is None:
            log.info("report for unknown execution %s", key)
            return
        await self._track_window(key, written.value)

    async def apply_health(self, report: HealthReport) -> None:
        """Count one interval into the execution's window, then move the execution as the window says.

        The execution and its window are read at once, and each is written back on the revision read
        (three round trips in a row, not five). A window someone else changed meanwhile is read again;
        an interval already counted is not counted twice (`record_interval`), but the window it is in is
        still applied: whoever counted it may have died before moving the execution, and the agent sends
        no more healthy intervals than it takes (a window with nothing to apply writes nothing)."""
        key = s.execution_key(report.namespace, report.job_id, report.node_id, report.execution_id)
        for _ in range(WINDOW_ATTEMPTS):
            record, window_record = await asyncio.gather(self.store.executions.get(key), self.windows.get(key))
            if record is None or record.value.observed in TERMINAL_STATES:
                return
            execution = record.value
            spec = execution.job_spec
            check = spec.rollout.health_check if spec is not None else None
            if check is None or not windows.health_gated(execution):
                return
            window = window_record.value if window_record is not None else windows.new_window(execution)
            if windows.record_interval(window, report, check) is None:
                # Counted already (a replay, or older than one counted): apply the window as it is, once
                # it is known to be current. (A read may be answered by a replica that lags; writing the
                # window back unchanged on the revision read says it was the latest.)
                if window_record is None:
                    return
                try:
                    await self.windows.update(key, window, last=window_record.revision)
                except Conflict:
                    continue
                break
            try:
                if window_record is None:
                    await self.windows.create(key, window)
                else:
                    await self.windows.update(key, window, last=window_record.revision)
            except Conflict:
                continue
            break
        else:
            raise Conflict(f"health window {key}: too many concurrent writers")
        now = utcnow()
        moved = False

        def apply(e: Execution) -> bool:
            nonlocal moved
            moved = windows.apply_window(e, window, now)
            return moved

        written = await self.store.change_execution(key, apply, current=record)
        if written is not None and moved:  # (the window is there: only an end has something to track)
            await self._track_window(key, written.value)

    async def _track_window(self, key: str, execution: Execution) -> None:
        """Open a health window when an execution starts validating; drop it when the execution ends."""
        if execution.observed == "validating":
            try:
                await self.windows.create(key, windows.new_window(execution))
            except Conflict:
                # Intervals were counted before this execution was validating (its health report was
                # applied before its state report): they may already be enough, and the agent sends no
                # more healthy intervals than it takes.
                record = await self.windows.get(key)
                if record is not None:
                    window, now = record.value, utcnow()
                    written = await self.store.change_execution(key, lambda e: windows.apply_window(e, window, now))
                    if written is not None and written.value.observed != "validating":
                        await self._track_window(key, written.value)
        elif execution.observed in TERMINAL_STATES and (key in self.window_mirror.items
                                                        or not self.window_mirror.ready.is_set()):
            # Only an execution that had a window has one to drop: most that end never validated (an
            # immediate job's, or one stopped before it started), and their end costs no write.
            await self.windows.kv.delete(key)

    # -- leader sweep ------------------------------------------------------------------------------

    async def sweep(self) -> None:
        await self.liveness.sweep()
        await self.check_deadlines()

    async def check_deadlines(self) -> None:
        """Fail validating executions past their deadline. The windows are followed in memory (every
        replica watches the health bucket), their deadlines in time order, so a sweep reads only the
        windows that are due.

        A deadline passes on the clock of the evidence: while reports wait to be applied (the service is
        behind), a deadline falls due only up to when the oldest of them was sent, since it may be the
        healthy interval that makes the execution stable in time. (A report that keeps failing goes to
        the dead letters after its attempts, so it holds deadlines back for a bounded time.)"""
        if not self.window_mirror.ready.is_set():
            return
        now = utcnow()
        windows_held = self.window_mirror.items
        due = [(key, windows_held[key]) for key in self.window_mirror.deadlines.due(now) if key in windows_held]
        if not due:
            return
        waiting = await self.bus.read_stream(s.STREAM_REPORTS, s.report("*"), 1, 1)
        if waiting:
            now = min(now, dt.datetime.fromtimestamp(waiting[0].at, dt.timezone.utc))
            due = [(key, w) for key, w in due if w.deadline_at is not None and w.deadline_at <= now]
        for key, window in due:
            execution = await self.store.executions.get(key)
            if execution is not None and execution.value.observed == "lost":
                continue  # its node is away: if it comes back still validating, the deadline still holds
            if execution is None or execution.value.observed != "validating":
                # Stable, ended or gone: the deadline no longer applies.
                def clear(w: windows.HealthWindow) -> bool:
                    if w.deadline_at is None:
                        return False
                    w.deadline_at = None
                    return True

                if execution is not None and execution.value.observed in TERMINAL_STATES:
                    await self.windows.kv.delete(key)
                else:
                    await self.windows.mutate(key, clear)
                continue
            written = await self.store.mutate_execution(execution.value,
                                                        lambda e: windows.deadline_passed(e, window, now))
            if written is not None:
                await self._track_window(key, written.value)


class WindowMirror(Mirror[windows.HealthWindow]):
    """The health bucket in memory, with the windows' deadlines in time order (`Deadlines`)."""

    def __init__(self, bucket: Bucket[windows.HealthWindow]) -> None:
        super().__init__(bucket)
        self.deadlines = Deadlines()

    async def applied(self, entry: Entry | None, loading: bool) -> None:
        if entry is None:  # loaded (again): windows deleted while away are gone from the items
            self.deadlines.reset({key: w.deadline_at for key, w in self.items.items()})
        elif not loading:
            held = self.items.get(entry.key)
            self.deadlines.set(entry.key, held.deadline_at if held is not None else None)

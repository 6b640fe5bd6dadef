"""Small builders of jobs, specs, rollouts and executions for the unit tests of the rollout rules.

Every builder takes keywords for what a test cares about and fills in the rest with one fixed, boring
world: job "svc" in namespace "default", version 2 rolling out over version 1, nodes "n1".."n9", a
fixed clock (`NOW`). Nothing here reads a clock or a store.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from services.rollout.decide import Policy, Step, View, desire_stop, link
from services.rollout.model import Rollout
from services.rollout.waves import plan_waves
from shared.durations import SECOND, Duration, rfc3339
from shared.models import (
    Canary,
    DesiredState,
    Execution,
    ExecutionStatus,
    HealthCheck,
    Job,
    JobSpec,
    JobState,
    ObservedState,
    RolloutSpec,
    Timeouts,
)

NOW = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.timezone.utc)
JOB_ID = "job-svc"
NAMESPACE = "default"
DEPLOYMENT = "deploy-v2"  # the deployment (evaluation) of the rollout under test
OLD_DEPLOYMENT = "deploy-v1"
DEADLINE = 60  # seconds: the health deadline of gated specs


def seconds(n: float) -> dt.timedelta:
    return dt.timedelta(seconds=n)


def spec(strategy: str = "rolling", *, type: str = "pipeline", restart_policy: str = "on-failure",
         health: bool | None = None, deadline: float = DEADLINE, max_parallel: int = 50,
         auto_promote: bool = False, canary_count: int | None = None, max_failed_nodes: int = 10,
         max_failed_nodes_percent: float = 100.0, no_auto_rollback: bool = False, queue_timeout: int = 0,
         total_timeout: int = 0, name: str = "svc", **config: Any) -> JobSpec:
    """A spec; gated strategies get a health check unless `health` says otherwise."""
    gated = strategy != "immediate" if health is None else health
    check = HealthCheck(deadline=Duration(int(deadline * SECOND))) if gated else None
    return JobSpec(
        name=name, type=type, namespace=NAMESPACE, restart_policy=restart_policy, config=dict(config),
        rollout=RolloutSpec(strategy=strategy, max_parallel=max_parallel, auto_promote=auto_promote,
                            canary=Canary(canary_count=canary_count) if canary_count is not None else None,
                            health_check=check, max_failed_nodes=max_failed_nodes,
                            max_failed_nodes_percent=max_failed_nodes_percent, no_auto_rollback=no_auto_rollback),
        timeouts=Timeouts(queue_timeout=queue_timeout, total_timeout=total_timeout),
    )


def job(version: int = 2, *, state: str = "deploying", message: str = "", stable_version: int = 1,
        type: str = "pipeline", revision: int = 7, job_spec: JobSpec | None = None) -> Job:
    return Job(id=JOB_ID, name="svc", namespace=NAMESPACE, type=type, version=version,
               state=JobState(state_type=state, message=message), spec=job_spec or spec(type=type),
               created_at=NOW - seconds(3600), modified_at=NOW - seconds(60), revision=revision,
               stable_version=stable_version)


def nodes(count: int) -> list[str]:
    return [f"n{i}" for i in range(1, count + 1)]


def rollout(targets: Sequence[str] | int = 4, *, strategy: str = "rolling", waves: Sequence[int] | None = None,
            current_wave: int | None = None, state: str = "deploying", version: int = 2,
            source_version: int | None = None, deployment: str = DEPLOYMENT, failed: Sequence[str] = (),
            rollback_of: int = 0, cause: str = "", timed_out: bool = False, message: str = "",
            created_at: dt.datetime | None = None, queued_since: dt.datetime | None = None) -> Rollout:
    """A rollout record; by default rolling waves of two nodes, the first one started."""
    names = nodes(targets) if isinstance(targets, int) else list(targets)
    if waves is None:
        waves = plan_waves(RolloutSpec(strategy=strategy, max_parallel=50), len(names))
    if current_wave is None:
        current_wave = 1 if strategy != "immediate" and names else 0
    return Rollout(
        namespace=NAMESPACE, job_id=JOB_ID, deployment_id=deployment, job_version=version,
        source_version=version if source_version is None else source_version, strategy=strategy, state=state,
        targets=names, wave_sizes=list(waves), current_wave=current_wave, failed_nodes=list(failed),
        rollback_of=rollback_of, cause=cause, timed_out=timed_out, message=message,
        created_at=created_at or NOW - seconds(300), updated_at=NOW - seconds(30), queued_since=queued_since,
    )


def execution(node: str, *, version: int = 2, deployment: str = DEPLOYMENT, observed: str = "running",
              desired: str = "running", stable: bool = False, created: dt.datetime | None = None,
              reason: str | None = None, finished: dt.datetime | None = None, restarts: int = 0,
              next_id: str = "", previous_id: str = "", id: str | None = None, wave: int = 1,
              job_spec: JobSpec | None = None, updated: dt.datetime | None = None) -> Execution:
    """An execution of `version` on `node`; by default created 10 s before `NOW`, running, not yet stable."""
    created = created or NOW - seconds(10)
    extra: dict[str, Any] = {}
    if reason is not None:
        extra["reason"] = reason
    if finished is not None:
        extra["finished_at"] = rfc3339(finished)
    if restarts:
        extra["restarts"] = restarts
    return Execution(
        id=id or f"{node}-v{version}-{deployment}", eval_id=deployment, job_id=JOB_ID, job_type="pipeline",
        job_version=version, namespace=NAMESPACE, node_id=node, rollout_wave=wave,
        status=ExecutionStatus(created_at=created, updated_at=updated or created, revision=3,
                               desired_state=DesiredState(state_type=desired),
                               observed_state=ObservedState(state_type=observed), details=extra,
                               next_execution_id=next_id, previous_execution_id=previous_id,
                               stable_at=created + seconds(5) if stable else None),
        job_spec=job_spec or spec(),
    )


def old(node: str, **kw: Any) -> Execution:
    """What version 1 (stable, deployed earlier) runs on `node`."""
    kw.setdefault("created", NOW - seconds(3600))
    kw.setdefault("stable", True)
    return execution(node, version=1, deployment=OLD_DEPLOYMENT, **kw)


def view(the_job: Job | None = None, the_rollout: Rollout | None = None, the_spec: JobSpec | None = None,
         executions: Iterable[Execution] = (), *, now: dt.datetime = NOW, policy: Policy | None = None,
         hashes: dict[int, str] | None = None, **extra: Any) -> View:
    """A view; the stable version (1) and version 2 have different specs unless `hashes` says otherwise."""
    return View(job=the_job or job(), rollout=the_rollout, spec=the_spec, executions=list(executions), now=now,
                policy=policy or Policy(), spec_hashes={1: "hash-v1", 2: "hash-v2"} if hashes is None else hashes,
                **extra)


def snapshot(v: View) -> Any:
    """Everything a view holds, as plain data (to compare before and after a decision)."""
    return plain({f.name: getattr(v, f.name) for f in dataclasses.fields(v)})


def plain(value: Any) -> Any:
    """Any record of these tests as plain data (durations as integers)."""
    return msgspec.to_builtins(value, enc_hook=_plain)


def _plain(value: Any) -> Any:
    if isinstance(value, int):  # a Duration
        return int(value)
    if dataclasses.is_dataclass(value):  # the policy
        return dataclasses.asdict(value)  # type: ignore[arg-type]
    raise TypeError(f"cannot snapshot {type(value)}")


def applied(v: View, step: Step, *, now: dt.datetime | None = None) -> View:
    """The view the next pass would see once `step` was carried out (as apply.py does, without a store)."""
    executions = [msgspec.structs.replace(e, status=msgspec.structs.replace(e.status)) for e in v.executions]
    by_id = {e.id: e for e in executions}
    for create in step.creates:
        if create.execution.id not in by_id:
            executions.append(create.execution)
            by_id[create.execution.id] = create.execution
        if create.replaces is not None and create.replaces.id in by_id:
            link(by_id[create.replaces.id], create.execution.id)
    for stop in step.stops:
        if stop.execution.id in by_id:
            desire_stop(by_id[stop.execution.id], stop.reason, stop.next_id)
    return dataclasses.replace(v, rollout=step.rollout if step.rollout is not None else v.rollout,
                               executions=executions, now=now or v.now)

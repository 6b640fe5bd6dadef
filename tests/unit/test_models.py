"""The public contract: the seed's example, spec defaults, durations, timestamps and decode errors."""

from __future__ import annotations

import copy
import datetime as dt
import json
from typing import Any

import pytest

from shared.api import GetExecutionResponse, ListJobExecutionsResponse, PutJobRequest
from shared.codec import from_json, from_msgpack, to_json, to_msgpack
from shared.durations import Duration
from shared.errors import InvalidInput
from shared.models import (
    Canary,
    DesiredState,
    Execution,
    ExecutionStatus,
    HealthCheck,
    JobSpec,
    ObservedState,
    RolloutSpec,
    Selector,
    Timeouts,
)

# Copied verbatim from /work/shared/seed/000_39a5f8e012bbd59b.txt (the published example).
SEED_EXAMPLE = b"""{
"items": [
{
"id": "exec-789xyz456abc",
"job_id": "job-abc123xyz",
"job_type": "pipeline",
"job_version": 2,
"namespace": "production",
"node_id": "node-edge-us-west-01",
"status": {
"created_at": "2025-01-15T10:35:00Z",
"desired_state": {
"message": "",
"state_type": "run"
},
"observed_state": {
"message": "Pipeline processing logs",
"state_type": "running"
},
"revision": 5,
"updated_at": "2025-01-15T10:36:15Z"
}
}
],
"next_token": "string"
}"""

UTC = dt.timezone.utc
T0 = dt.datetime(2025, 1, 15, 10, 35, 0, tzinfo=UTC)


def key_shape(value: Any) -> Any:
    """The keys of a JSON document at every level, with the values dropped (lists keep their order)."""
    if isinstance(value, dict):
        return {k: key_shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [key_shape(v) for v in value]
    return None


def put_job(spec: dict[str, Any]) -> bytes:
    return json.dumps({"spec": spec}).encode()


def spec_with(**extra: Any) -> dict[str, Any]:
    return {"name": "x", "type": "pipeline", **extra}


def health_check_request(**hc: Any) -> bytes:
    return put_job(spec_with(rollout={"strategy": "rolling", "health_check": {"deadline": "1m", **hc}}))


def decode_error(data: bytes, tp: type = PutJobRequest) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        from_json(data, tp)
    return info.value


# --- the seed's example ---------------------------------------------------------------------------


def test_key_shape_helper_sees_nested_differences() -> None:
    """Guard for the comparison below: a key missing deep inside a list must make shapes differ."""
    assert key_shape({"a": [{"b": 1, "c": {"d": 2}}]}) != key_shape({"a": [{"b": 1, "c": {}}]})
    assert key_shape({"a": [{"b": 1}]}) == key_shape({"a": [{"b": "other"}]})


def test_seed_example_round_trips_with_the_same_keys_at_every_level() -> None:
    decoded = from_json(SEED_EXAMPLE, ListJobExecutionsResponse)
    original = json.loads(SEED_EXAMPLE)
    reencoded = json.loads(to_json(decoded))
    assert key_shape(reencoded) == key_shape(original)


def test_seed_example_values_survive_except_run_becomes_running() -> None:
    decoded = from_json(SEED_EXAMPLE, ListJobExecutionsResponse)
    (execution,) = decoded.items
    assert execution.desired == "running"
    assert execution.observed == "running"
    assert execution.status.created_at == T0
    assert decoded.next_token == "string"

    expected = json.loads(SEED_EXAMPLE)
    expected["items"][0]["status"]["desired_state"]["state_type"] = "running"
    assert json.loads(to_json(decoded)) == expected


def test_desired_state_run_is_normalised_on_construction_and_in_msgpack() -> None:
    assert DesiredState(state_type="run").state_type == "running"
    again = from_msgpack(to_msgpack(DesiredState(state_type="run")), DesiredState)
    assert again.state_type == "running"


def test_execution_records_accept_unknown_fields() -> None:
    """Records written by services tolerate fields from newer replicas (rolling upgrades)."""
    doc = json.loads(SEED_EXAMPLE)["items"][0]
    doc["future_field"] = {"x": 1}
    doc["status"]["future_status_field"] = [1, 2]
    execution = from_json(json.dumps({"execution": doc}).encode(), GetExecutionResponse).execution
    assert execution.id == "exec-789xyz456abc"
    assert "future_field" not in json.loads(to_json(execution))


# --- spec defaults --------------------------------------------------------------------------------


def test_minimal_spec_defaults() -> None:
    spec = from_json(b'{"name": "x", "type": "pipeline"}', JobSpec)
    assert spec.restart_policy == "on-failure"
    assert spec.namespace == ""
    assert spec.priority == 0
    assert spec.config == {} and spec.labels == {} and spec.meta == {}
    assert spec.rollout.strategy == "immediate"
    assert spec.rollout.max_parallel == 10
    assert spec.rollout.max_failed_nodes == 10
    assert spec.rollout.max_failed_nodes_percent == 10.0
    assert spec.rollout.no_auto_rollback is False
    assert spec.rollout.auto_promote is False
    assert spec.rollout.health_check is None
    assert spec.rollout.canary is None
    assert (spec.timeouts.execution_timeout, spec.timeouts.queue_timeout, spec.timeouts.total_timeout) == (0, 0, 0)
    assert spec.selector.match_labels == {} and spec.selector.match_expressions == [] and spec.selector.match_ids == []


def test_defaults_are_not_shared_between_decoded_specs() -> None:
    """Mutable defaults (labels, rollout) must be fresh per instance, or one job's edit leaks into another."""
    a = from_json(b'{"name": "a", "type": "pipeline"}', JobSpec)
    b = from_json(b'{"name": "b", "type": "pipeline"}', JobSpec)
    a.labels["k"] = "v"
    a.rollout.max_parallel = 50
    a.selector.match_ids.append("n1")
    assert b.labels == {}
    assert b.rollout.max_parallel == 10
    assert b.selector.match_ids == []


def test_health_check_defaults() -> None:
    req = from_json(health_check_request(), PutJobRequest)
    hc = req.spec.rollout.health_check
    assert hc is not None
    assert hc.deadline == 60_000_000_000
    assert hc.failure_threshold == 3
    assert hc.success_threshold == 2
    assert hc.interval == 10_000_000_000
    assert isinstance(hc.interval, Duration)
    assert hc.max_error_rate is None
    assert hc.error_rate_limit == pytest.approx(0.10)


def test_explicit_zero_max_error_rate_is_kept_apart_from_unset() -> None:
    zero = from_json(health_check_request(max_error_rate=0), PutJobRequest).spec.rollout.health_check
    unset = from_json(health_check_request(), PutJobRequest).spec.rollout.health_check
    assert zero is not None and unset is not None
    assert zero.max_error_rate == 0.0 and zero.max_error_rate is not None
    assert zero.error_rate_limit == 0.0
    assert unset.error_rate_limit == pytest.approx(0.10)

    zero_json = json.loads(to_json(zero))
    assert zero_json["max_error_rate"] == 0.0 and isinstance(zero_json["max_error_rate"], float)
    assert json.loads(to_json(unset))["max_error_rate"] is None
    # And back again: the distinction survives a JSON round trip.
    again = from_json(to_json(zero), HealthCheck)
    assert again.max_error_rate == 0.0 and again.error_rate_limit == 0.0
    assert from_json(to_json(unset), HealthCheck).max_error_rate is None


# --- durations ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "ns"),
    [
        (10_000_000_000, 10_000_000_000),
        (1, 1),
        ("10s", 10_000_000_000),
        ("1m30s", 90_000_000_000),
        ("250ms", 250_000_000),
        ("1.5h", 5_400_000_000_000),
    ],
)
@pytest.mark.parametrize("which", ["interval", "deadline"])
def test_durations_accept_nanoseconds_and_strings_and_encode_as_nanoseconds(which: str, given: Any, ns: int) -> None:
    req = from_json(health_check_request(**{which: given}), PutJobRequest)
    hc = req.spec.rollout.health_check
    assert hc is not None
    value = getattr(hc, which)
    assert value == ns and isinstance(value, Duration)
    encoded = json.loads(to_json(req))["spec"]["rollout"]["health_check"][which]
    assert encoded == ns and type(encoded) is int


@pytest.mark.parametrize("bad", ["10x", "ten seconds", "", "10", True, False, 1.5, None, [], {"s": 1}])
@pytest.mark.parametrize("which", ["interval", "deadline"])
def test_bad_durations_name_their_json_path(which: str, bad: Any) -> None:
    err = decode_error(health_check_request(**{which: bad}))
    assert err.field == f"spec.rollout.health_check.{which}"
    assert err.code == 400


def test_out_of_range_duration_string_is_invalid_input() -> None:
    err = decode_error(health_check_request(interval="99999999h"))
    assert err.field == "spec.rollout.health_check.interval"
    assert "range" in err.message


def test_integer_duration_outside_int64_is_invalid_input() -> None:
    """A duration is an int64 of nanoseconds on the wire; 2**63 must be a 400, not a later crash in storage."""
    err = decode_error(health_check_request(deadline=2**63))
    assert err.field == "spec.rollout.health_check.deadline"


# --- timestamps -----------------------------------------------------------------------------------


def make_execution(**status: Any) -> Execution:
    fields: dict[str, Any] = {
        "created_at": T0,
        "updated_at": T0 + dt.timedelta(seconds=75, microseconds=123456),
        "revision": 5,
        "desired_state": DesiredState(state_type="running"),
        "observed_state": ObservedState(state_type="running", message="ok"),
    }
    fields.update(status)
    return Execution(
        id="exec-1",
        job_id="job-1",
        job_type="pipeline",
        job_version=2,
        namespace="production",
        node_id="node-1",
        status=ExecutionStatus(**fields),
    )


def test_timestamps_encode_as_rfc3339_utc_with_z() -> None:
    execution = make_execution(stable_at=T0 + dt.timedelta(minutes=2))
    status = json.loads(to_json(execution))["status"]
    assert status["created_at"] == "2025-01-15T10:35:00Z"
    assert status["updated_at"] == "2025-01-15T10:36:15.123456Z"
    assert status["stable_at"] == "2025-01-15T10:37:00Z"


def test_unset_optional_execution_fields_are_omitted() -> None:
    """omit_defaults keeps the schema example's shape: no eval_id, job_spec, stable_at... when empty."""
    doc = json.loads(to_json(make_execution()))
    assert set(doc) == {"id", "job_id", "job_type", "job_version", "namespace", "node_id", "status"}
    assert set(doc["status"]) == {"created_at", "desired_state", "observed_state", "revision", "updated_at"}


@pytest.mark.parametrize("field", ["created_at", "updated_at", "stable_at"])
def test_naive_timestamp_is_rejected(field: str) -> None:
    doc = json.loads(to_json(make_execution(stable_at=T0)))
    doc["status"][field] = "2025-01-15T10:35:00"
    err = decode_error(json.dumps({"execution": doc}).encode(), GetExecutionResponse)
    assert err.field == f"execution.status.{field}"
    assert "timezone" in err.message


def test_offset_timestamp_is_the_same_instant() -> None:
    doc = json.loads(to_json(make_execution()))
    doc["status"]["created_at"] = "2025-01-15T12:35:00+02:00"
    execution = from_json(json.dumps(doc).encode(), Execution)
    assert execution.status.created_at == T0


# --- enums, unknown fields, ranges ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "field", "allowed"),
    [
        (spec_with(type="batch"), "spec.type", ["pipeline", "query", "update", "config"]),
        (spec_with(rollout={"strategy": "blue-green"}), "spec.rollout.strategy", ["immediate", "rolling", "canary"]),
        (spec_with(restart_policy="sometimes"), "spec.restart_policy", ["on-failure", "always", "never"]),
    ],
)
def test_unknown_spec_enum_values_list_the_allowed_ones(spec: dict[str, Any], field: str, allowed: list[str]) -> None:
    err = decode_error(put_job(spec))
    assert err.field == field
    for value in allowed:
        assert value in err.message


def test_unknown_observed_state_lists_the_allowed_ones() -> None:
    doc = json.loads(SEED_EXAMPLE)
    doc["items"][0]["status"]["observed_state"]["state_type"] = "exploded"
    err = decode_error(json.dumps(doc).encode(), ListJobExecutionsResponse)
    assert err.field == "items[0].status.observed_state.state_type"
    assert "exploded" in err.message
    for value in ["pending", "starting", "validating", "running", "degraded", "completed", "failed", "lost",
                  "stopping", "stopped"]:
        assert value in err.message


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (spec_with(colour="blue"), "spec.colour"),
        (spec_with(rollout={"max_paralel": 5}), "spec.rollout.max_paralel"),
        (spec_with(rollout={"strategy": "canary", "canary": {"canary_pct": 5}}), "spec.rollout.canary.canary_pct"),
        (spec_with(rollout={"health_check": {"deadline": "1m", "intervall": "5s"}}), "spec.rollout.health_check.intervall"),
        (spec_with(selector={"match_label": {"a": "b"}}), "spec.selector.match_label"),
        (spec_with(timeouts={"timeout": 5}), "spec.timeouts.timeout"),
    ],
)
def test_unknown_spec_fields_are_rejected_with_their_path(spec: dict[str, Any], field: str) -> None:
    err = decode_error(put_job(spec))
    assert err.field == field
    assert field.rsplit(".", 1)[-1] in err.message


def test_unknown_request_field_is_rejected() -> None:
    err = decode_error(json.dumps({"spec": spec_with(), "dryrun": True}).encode())
    assert err.field == "dryrun"


def test_missing_required_field_names_its_path() -> None:
    assert decode_error(put_job({"type": "pipeline"})).field == "spec.name"
    assert decode_error(put_job(spec_with(rollout={"health_check": {"interval": "1s"}}))).field == (
        "spec.rollout.health_check.deadline"
    )


def test_prefix_is_prepended_to_field_paths() -> None:
    err = decode_error(b'{"name": "x", "type": "pipeline", "priority": "high"}', JobSpec)
    assert err.field == "priority"
    with pytest.raises(InvalidInput) as info:
        from_json(b'{"name": "x", "type": "pipeline", "priority": "high"}', JobSpec, prefix="spec.")
    assert info.value.field == "spec.priority"


def test_malformed_json_is_invalid_input() -> None:
    err = decode_error(b'{"spec": {"name": "x"')
    assert "malformed JSON" in err.message


@pytest.mark.parametrize(
    ("rollout", "timeouts", "field"),
    [
        ({"max_parallel": 101}, {}, "spec.rollout.max_parallel"),
        ({"max_parallel": -1}, {}, "spec.rollout.max_parallel"),
        ({"max_failed_nodes_percent": -1}, {}, "spec.rollout.max_failed_nodes_percent"),
        ({"max_failed_nodes_percent": 100.5}, {}, "spec.rollout.max_failed_nodes_percent"),
        ({"max_failed_nodes": -1}, {}, "spec.rollout.max_failed_nodes"),
        ({"health_check": {"deadline": "1m", "success_threshold": 0}}, {}, "spec.rollout.health_check.success_threshold"),
        ({"health_check": {"deadline": "1m", "failure_threshold": 0}}, {}, "spec.rollout.health_check.failure_threshold"),
        ({"health_check": {"deadline": "1m", "max_error_rate": 1.5}}, {}, "spec.rollout.health_check.max_error_rate"),
        ({"health_check": {"deadline": "1m", "max_error_rate": -0.1}}, {}, "spec.rollout.health_check.max_error_rate"),
        ({"canary": {"canary_percent": 0}}, {}, "spec.rollout.canary.canary_percent"),
        ({"canary": {"canary_count": 0}}, {}, "spec.rollout.canary.canary_count"),
        ({}, {"execution_timeout": -1}, "spec.timeouts.execution_timeout"),
        ({}, {"queue_timeout": -1}, "spec.timeouts.queue_timeout"),
        ({}, {"total_timeout": -1}, "spec.timeouts.total_timeout"),
    ],
)
def test_out_of_range_numbers_are_rejected(rollout: dict[str, Any], timeouts: dict[str, Any], field: str) -> None:
    err = decode_error(put_job(spec_with(rollout=rollout, timeouts=timeouts)))
    assert err.field == field


def test_range_boundaries_are_accepted() -> None:
    spec = from_json(
        put_job(
            spec_with(
                rollout={
                    "max_parallel": 100,
                    "max_failed_nodes": 0,
                    "max_failed_nodes_percent": 100,
                    "canary": {"canary_percent": 100, "canary_count": 1},
                    "health_check": {"deadline": "1m", "max_error_rate": 1, "success_threshold": 1,
                                     "failure_threshold": 1},
                }
            )
        ),
        PutJobRequest,
    ).spec
    assert spec.rollout.max_parallel == 100
    assert spec.rollout.max_failed_nodes_percent == 100.0
    assert spec.rollout.health_check is not None and spec.rollout.health_check.error_rate_limit == 1.0
    assert from_json(put_job(spec_with(rollout={"max_parallel": 0})), PutJobRequest).spec.rollout.max_parallel == 0


# --- msgpack and JSON round trips -----------------------------------------------------------------


def full_execution() -> Execution:
    spec = JobSpec(
        name="logs",
        type="pipeline",
        namespace="production",
        description="ship logs",
        labels={"team": "edge"},
        meta={"owner": "ops"},
        priority=7,
        restart_policy="always",
        config={"command": ["sh", "-c", "echo hi"], "env": {"A": "1"}, "nested": {"list": [1, 2.5, None, True]}},
        rollout=RolloutSpec(
            strategy="canary",
            max_parallel=25,
            auto_promote=True,
            canary=Canary(canary_percent=5.0, canary_count=2),
            health_check=HealthCheck(
                deadline=Duration(120_000_000_000),
                failure_threshold=4,
                interval=Duration(5_000_000_000),
                max_error_rate=0.0,
                success_threshold=3,
            ),
            max_failed_nodes=3,
            max_failed_nodes_percent=12.5,
            no_auto_rollback=True,
        ),
        selector=Selector(match_labels={"region": "us-west"}, match_expressions=["tier in (a,b)"], match_ids=["n1"]),
        timeouts=Timeouts(execution_timeout=30, queue_timeout=10, total_timeout=60),
    )
    return Execution(
        id="exec-2",
        eval_id="eval-9",
        job_id="job-1",
        job_type="pipeline",
        job_version=3,
        namespace="production",
        node_id="node-1",
        rollout_wave=2,
        job_spec=spec,
        status=ExecutionStatus(
            created_at=T0,
            updated_at=T0 + dt.timedelta(microseconds=1),
            revision=9,
            desired_state=DesiredState(state_type="stopped", message="superseded", details={"by": "exec-3"}),
            observed_state=ObservedState(state_type="degraded", message="errors", details={"rate": 0.2, "n": [1, 2]}),
            details={"code": "E42", "hint": {"retry": False}},
            next_execution_id="exec-3",
            previous_execution_id="exec-1",
            stable_at=T0 + dt.timedelta(hours=1),
        ),
    )


def test_msgpack_round_trip_of_a_full_execution() -> None:
    original = full_execution()
    pristine = copy.deepcopy(original)
    again = from_msgpack(to_msgpack(original), Execution)
    assert again == pristine
    assert again.job_spec is not None and again.job_spec.rollout.health_check is not None
    assert isinstance(again.job_spec.rollout.health_check.interval, Duration)
    assert again.status.stable_at is not None and again.status.stable_at.utcoffset() == dt.timedelta(0)


def test_json_round_trip_of_a_full_execution() -> None:
    original = full_execution()
    assert from_json(to_json(original), Execution) == original

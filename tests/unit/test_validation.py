"""Rules of a job spec beyond its types (shared.validation.validate_spec), and the request size limit."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shared.api import PutJobRequest
from shared.codec import MAX_REQUEST_BYTES, from_json
from shared.errors import InvalidInput
from shared.models import JobSpec
from shared.validation import validate_spec

COMMAND = {"command": ["sh", "-c", "echo hi"]}
HEALTH_CHECK = {"deadline": "5m", "interval": "10s"}


def decode(**fields: Any) -> JobSpec:
    doc: dict[str, Any] = {"name": "web", "type": "pipeline", "config": COMMAND}
    doc.update(fields)
    return from_json(json.dumps(doc).encode(), JobSpec, prefix="spec.")


def validate(namespace: str = "default", /, **fields: Any) -> list[str]:
    return validate_spec(decode(**fields), namespace)


def invalid(namespace: str = "default", /, **fields: Any) -> InvalidInput:
    """The error of a spec that decoding (types and ranges) or validation (rules) refuses."""
    with pytest.raises(InvalidInput) as info:
        validate_spec(decode(**fields), namespace)
    assert info.value.code == 400
    return info.value


def test_minimal_valid_spec_has_no_warnings() -> None:
    assert validate() == []


# --- rollout --------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["rolling", "canary"])
def test_rolling_and_canary_need_a_health_check(strategy: str) -> None:
    err = invalid(rollout={"strategy": strategy})
    assert err.field == "spec.rollout.health_check"
    assert strategy in err.message
    assert validate(rollout={"strategy": strategy, "health_check": HEALTH_CHECK}) == []


def test_immediate_with_health_check_is_accepted_with_a_warning() -> None:
    warnings = validate(rollout={"strategy": "immediate", "health_check": HEALTH_CHECK})
    assert len(warnings) == 1
    assert "health_check" in warnings[0] and "immediate" in warnings[0]


@pytest.mark.parametrize(("which", "value"), [("deadline", 0), ("deadline", "-1s"), ("interval", 0), ("interval", "-5s")])
def test_health_check_durations_must_be_positive(which: str, value: Any) -> None:
    err = invalid(rollout={"strategy": "rolling", "health_check": {**HEALTH_CHECK, which: value}})
    assert err.field == f"spec.rollout.health_check.{which}"


def test_deadline_shorter_than_success_intervals_warns() -> None:
    hc = {"deadline": "15s", "interval": "10s", "success_threshold": 2}
    warnings = validate(rollout={"strategy": "rolling", "health_check": hc})
    assert any("deadline" in w for w in warnings)
    assert validate(rollout={"strategy": "rolling", "health_check": {**hc, "deadline": "20s"}}) == []


def test_canary_settings_outside_canary_strategy_warn() -> None:
    warnings = validate(
        rollout={"strategy": "rolling", "health_check": HEALTH_CHECK, "canary": {"canary_count": 1}, "auto_promote": True}
    )
    assert any("canary" in w for w in warnings)
    assert any("auto_promote" in w for w in warnings)


# --- timeouts -------------------------------------------------------------------------------------


def test_execution_plus_queue_timeout_above_total_is_rejected() -> None:
    err = invalid(timeouts={"execution_timeout": 60, "queue_timeout": 30, "total_timeout": 89})
    assert err.field == "spec.timeouts.total_timeout"


def test_execution_plus_queue_timeout_equal_to_total_is_fine() -> None:
    assert validate(timeouts={"execution_timeout": 60, "queue_timeout": 30, "total_timeout": 90}) == []


def test_total_timeout_zero_means_no_limit() -> None:
    assert validate(timeouts={"execution_timeout": 10**6, "queue_timeout": 10**6, "total_timeout": 0}) == []


# --- meta and labels ------------------------------------------------------------------------------


def test_reserved_meta_prefix_is_rejected() -> None:
    err = invalid(meta={"owner": "ops", "shoal.io/managed-by": "me"})
    assert err.field == "spec.meta.shoal.io/managed-by"
    assert "shoal.io/" in err.message


def test_meta_keys_that_only_resemble_the_prefix_are_allowed() -> None:
    assert validate(meta={"shoal.iox": "1", "x/shoal.io/": "2", "expanso.io/legacy": "3"}) == []


@pytest.mark.parametrize("key", ["-bad", "bad-", "a b", "UPPER.Case/x", "a/b/c", "/x", "x" * 64])
def test_invalid_label_key_is_rejected(key: str) -> None:
    err = invalid(labels={"ok": "fine", key: "v"})
    assert err.field == f"spec.labels.{key}"


def test_invalid_label_value_is_rejected() -> None:
    assert invalid(labels={"tier": "not ok"}).field == "spec.labels.tier"


def test_valid_labels_are_accepted() -> None:
    assert validate(labels={"example.com/app": "shop", "tier": "", "a_b.c-d": "X_y.z-9"}) == []


def test_too_many_labels_are_rejected() -> None:
    assert validate(labels={f"k{i}": "v" for i in range(64)}) == []
    assert invalid(labels={f"k{i}": "v" for i in range(65)}).field == "spec.labels"


def test_overlong_description_is_rejected() -> None:
    assert validate(description="d" * 4096) == []
    assert invalid(description="d" * 4097).field == "spec.description"


# --- selector -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expressions", "index"),
    [
        (["x===a"], 0),
        (["region=us", "a in (b"], 1),
        (["gpu", "tier in (a,b)", ",x"], 2),
        (["!x=a"], 0),
    ],
)
def test_selector_expression_errors_name_their_index(expressions: list[str], index: int) -> None:
    err = invalid(selector={"match_expressions": expressions})
    assert err.field == f"spec.selector.match_expressions[{index}]"


def test_selector_match_labels_and_ids_errors() -> None:
    assert invalid(selector={"match_labels": {"tier": "bad value"}}).field == "spec.selector.match_labels.tier"
    assert invalid(selector={"match_ids": ["node-1", ""]}).field == "spec.selector.match_ids[1]"


def test_valid_selector_is_accepted() -> None:
    selector = {
        "match_labels": {"region": "us-east"},
        "match_expressions": ["tier in (premium,standard)", "environment!=prod", "gpu", "!debug"],
        "match_ids": ["node-1"],
    }
    assert validate(selector=selector) == []


# --- config per job type --------------------------------------------------------------------------


def config_job(*paths: str) -> dict[str, Any]:
    return {"type": "config", "config": {"files": [{"path": p, "content": "x"} for p in paths]}}


@pytest.mark.parametrize(
    ("paths", "index"),
    [
        (["/etc/app.conf"], 0),
        (["ok.conf", "../escape.conf"], 1),
        (["a/../../b"], 0),
        (["a/.."], 0),
        (["."], 0),
        ([""], 0),
    ],
)
def test_config_paths_must_stay_inside_the_root(paths: list[str], index: int) -> None:
    err = invalid(**config_job(*paths))
    assert err.field == f"spec.config.files[{index}].path"


@pytest.mark.parametrize(("paths", "index"), [(["a/b", "c", "a/b"], 2), (["a/b", "a/./b"], 1), (["x", "y/../x"], 1)])
def test_duplicate_config_paths_are_rejected(paths: list[str], index: int) -> None:
    err = invalid(**config_job(*paths))
    assert err.field == f"spec.config.files[{index}].path"
    assert "twice" in err.message


def test_valid_config_paths_are_accepted() -> None:
    assert validate(**config_job("app.conf", "conf.d/extra.conf", ".hidden", "a/../b")) == []


def test_file_names_starting_with_two_dots_stay_inside_the_root() -> None:
    """'..data' (the name Kubernetes gives its ConfigMap payload directory) is a child of the root."""
    assert validate(**config_job("..data/app.conf", "..hidden")) == []


def test_config_job_needs_files() -> None:
    assert invalid(type="config", config={}).field == "spec.config.files"


def test_config_file_entries_are_type_checked() -> None:
    err = invalid(type="config", config={"files": [{"path": "a", "content": "x", "mod": 420}]})
    assert err.field == "spec.config.files[0].mod"


@pytest.mark.parametrize("job_type", ["pipeline", "query", "update"])
def test_command_jobs_need_a_command(job_type: str) -> None:
    assert invalid(type=job_type, config={}).field == "spec.config.command"
    assert invalid(type=job_type, config={"command": []}).field == "spec.config.command"
    assert invalid(type=job_type, config={"command": [""]}).field == "spec.config.command[0]"


def test_command_must_be_a_list_of_strings() -> None:
    assert invalid(config={"command": "echo hi"}).field == "spec.config.command"


@pytest.mark.parametrize("job_type", ["pipeline", "query", "update", "config"])
def test_simulate_block_alone_is_enough(job_type: str) -> None:
    assert validate(type=job_type, config={"simulate": {}}) == []
    assert validate(type=job_type, config={"simulate": {"error_rate": 0.5, "only_nodes": ["n1"]}}) == []


@pytest.mark.parametrize("job_type", ["pipeline", "query", "update", "config"])
def test_simulate_block_is_checked_for_every_type(job_type: str) -> None:
    assert invalid(type=job_type, config={"simulate": {"eror_rate": 0.5}}).field == "spec.config.simulate.eror_rate"
    assert invalid(type=job_type, config={"simulate": {"error_rate": 2}}).field == "spec.config.simulate.error_rate"


# --- namespace and name ---------------------------------------------------------------------------


def test_namespace_mismatch_is_rejected() -> None:
    err = invalid("default", namespace="production")
    assert err.field == "spec.namespace"


def test_empty_namespace_is_filled_from_the_argument() -> None:
    spec = decode()
    assert spec.namespace == ""
    validate_spec(spec, "production")
    assert spec.namespace == "production"


def test_matching_namespace_is_accepted() -> None:
    spec = decode(namespace="production")
    assert validate_spec(spec, "production") == []
    assert spec.namespace == "production"


@pytest.mark.parametrize("namespace", ["Production", "prod_1", "n" * 64, "", "-prod", "prod-", "a.b", "a b", "é"])
def test_invalid_namespace_argument_is_rejected(namespace: str) -> None:
    assert invalid(namespace).field == "spec.namespace"


@pytest.mark.parametrize("namespace", ["a", "0", "prod-eu-1", "n" * 63])
def test_valid_namespace_argument_is_accepted(namespace: str) -> None:
    assert validate(namespace) == []


@pytest.mark.parametrize("name", ["", "-web", "_web", "web.v2", "web app", "web/1", "w" * 129, "wéb", "*", ">"])
def test_invalid_job_name_is_rejected(name: str) -> None:
    assert invalid(name=name).field == "spec.name"


@pytest.mark.parametrize("name", ["w", "Web_2-blue", "9lives", "w" * 128])
def test_valid_job_name_is_accepted(name: str) -> None:
    assert validate(name=name) == []


def test_job_name_with_trailing_newline_is_rejected() -> None:
    assert invalid(name="web\n").field == "spec.name"


def test_namespace_with_trailing_newline_is_rejected() -> None:
    assert invalid("prod\n").field == "spec.namespace"


# --- request size ---------------------------------------------------------------------------------


def test_body_larger_than_the_limit_is_rejected() -> None:
    body = json.dumps({"spec": {"name": "web", "type": "pipeline", "description": "d" * MAX_REQUEST_BYTES}}).encode()
    with pytest.raises(InvalidInput) as info:
        from_json(body, PutJobRequest)
    assert str(MAX_REQUEST_BYTES) in info.value.message
    assert str(len(body)) in info.value.message


def test_body_exactly_at_the_limit_is_decoded() -> None:
    head = b'{"spec": {"name": "web", "type": "pipeline"}}'
    body = head + b" " * (MAX_REQUEST_BYTES - len(head))
    assert len(body) == MAX_REQUEST_BYTES
    assert from_json(body, PutJobRequest).spec.name == "web"
    with pytest.raises(InvalidInput):
        from_json(body + b" ", PutJobRequest)


def test_size_limit_error_uses_the_prefix_as_field() -> None:
    with pytest.raises(InvalidInput) as info:
        from_json(b" " * (MAX_REQUEST_BYTES + 1), JobSpec, prefix="spec.")
    assert info.value.field == "spec"


# -- bounds: every number has a range, every free-form value a size and depth -------------------------


@pytest.mark.parametrize(("fields", "field"), [
    ({"timeouts": {"total_timeout": 10**12}}, "spec.timeouts.total_timeout"),
    ({"timeouts": {"execution_timeout": 2**63}}, "spec.timeouts.execution_timeout"),
    ({"priority": 2**63}, "spec.priority"),
    ({"priority": -(2**63) - 1}, "spec.priority"),
    ({"rollout": {"max_failed_nodes": 10**30}}, "spec.rollout.max_failed_nodes"),
    ({"rollout": {"strategy": "canary", "canary": {"canary_count": 2**64},
                  "health_check": HEALTH_CHECK}}, "spec.rollout.canary.canary_count"),
    ({"config": {**COMMAND, "n": 2**63}}, "spec.config.n"),
    ({"config": {**COMMAND, "deep": {"list": [1, {"x": -(2**63) - 1}]}}}, "spec.config.deep.list[1].x"),
    ({"name": "n" * 129}, "spec.name"),
    ({"meta": {f"k{i}": "v" for i in range(65)}}, "spec.meta"),
    ({"selector": {"match_expressions": ["a"] * 65}}, "spec.selector.match_expressions"),
])
def test_numbers_and_sizes_out_of_range_are_400s_naming_the_field(fields: dict, field: str) -> None:
    assert invalid(**fields).field == field


def test_a_year_of_timeout_is_the_most() -> None:
    assert validate(timeouts={"total_timeout": 366 * 86_400}) == []
    assert invalid(timeouts={"total_timeout": 366 * 86_400 + 1}).field == "spec.timeouts.total_timeout"


def test_config_depth_and_size_are_bounded() -> None:
    nested: dict = {"command": ["true"]}
    node = nested
    for _ in range(32):  # 32 levels below config
        node["x"] = {}
        node = node["x"]
    assert validate(config=nested) == []
    node["x"] = {}  # the 33rd
    assert invalid(config=nested).field == "spec.config" + ".x" * 33
    assert invalid(config={**COMMAND, "blob": "b" * (64 * 1024)}).field == "spec.config"


def test_config_nested_thousands_of_levels_deep_is_a_400_not_a_crash() -> None:
    body = b'{"spec": {"name": "d", "type": "query", "config": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}}"
    with pytest.raises(InvalidInput) as info:
        from_json(body, PutJobRequest)
    assert "nested" in info.value.message


@pytest.mark.parametrize(("check", "field", "words"), [
    ({"interval": 5, "deadline": "5m"}, "interval", "at least"),  # 5 ns: agents would spin
    ({"interval": "50ms", "deadline": "5m"}, "interval", "between 100ms"),
    ({"interval": "25h", "deadline": "700h"}, "interval", "between"),
    ({"interval": "10s", "deadline": "5s"}, "deadline", "at least one interval"),
    ({"interval": "10s", "deadline": "721h"}, "deadline", "at most"),
])
def test_health_intervals_and_deadlines_have_sensible_bounds(check: dict, field: str, words: str) -> None:
    error = invalid(rollout={"strategy": "rolling", "health_check": check})
    assert error.field == f"spec.rollout.health_check.{field}"
    assert any(w in error.message for w in (words, "between"))


def test_the_smallest_health_interval_is_accepted() -> None:
    assert validate(rollout={"strategy": "rolling", "health_check": {"interval": "100ms", "deadline": "100ms",
                                                                     "success_threshold": 1}}) == []


@pytest.mark.parametrize("body", [b'{"spec": {"name": "\xff", "type": "query"}}',
                                  b'{"spec": {"name": "a", "type": "query", "labels": {"\xc3\x28": "v"}}}'])
def test_invalid_utf8_is_a_400_naming_the_field(body: bytes) -> None:
    with pytest.raises(InvalidInput) as info:
        from_json(body, PutJobRequest)
    assert "UTF-8" in info.value.message and info.value.field and info.value.field.startswith("spec.")

"""Rules a job spec must follow beyond its types.

Types, enums and numeric ranges are enforced by the structs in `models` while decoding; this module
holds the rules that span fields (timeouts add up, rolling needs a health check), reference the
grammar of other fields (selectors, label keys) or depend on the job type (its `config`). Every
failure is an `InvalidInput` naming the field; advisory findings come back as warnings.
"""

from __future__ import annotations

import posixpath
import re

from .codec import check_free_form, to_json
from .durations import HOUR, MILLISECOND, format_duration
from .errors import InvalidInput, shown
from .models import RESERVED_META_PREFIXES, JobSpec
from .selector import SelectorError, compile_selector, validate_key, validate_value
from .subjects import RESERVED_NAMESPACES, RESERVED_NODE_PREFIX, TOKEN
from .workloads import command_config, files_config, simulate_config

NAMESPACE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")
MAX_DESCRIPTION = 4096
MAX_LABELS = 64
MAX_CONFIG_BYTES = 64 * 1024
MAX_PATH = 1024  # a job's config, as JSON: it is copied into every execution
MIN_HEALTH_INTERVAL = 100 * MILLISECOND
MAX_HEALTH_INTERVAL = 24 * HOUR
MAX_HEALTH_DEADLINE = 30 * 24 * HOUR


def check_namespace(namespace: str, field: str = "namespace") -> str:
    if not NAMESPACE.fullmatch(namespace):
        raise InvalidInput(
            f"invalid namespace {shown(namespace)}: use 1-63 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit",
            field=field,
        )
    if namespace in RESERVED_NAMESPACES:
        raise InvalidInput(f"namespace {namespace!r} is reserved: shoal.v1.{namespace} is a cluster-wide API",
                           field=field)
    return namespace


def check_node_id(node_id: str, field: str = "node_id") -> str:
    if not NODE_ID.fullmatch(node_id):
        raise InvalidInput(
            f"invalid node id {shown(node_id)}: use 1-64 letters, digits, '_' and '-', starting with a letter or digit",
            field=field,
        )
    if node_id.startswith(RESERVED_NODE_PREFIX):
        raise InvalidInput(f"node ids starting with {RESERVED_NODE_PREFIX!r} are reserved (for simulated fleets)",
                           field=field)
    return node_id


def check_token(value: str, field: str, what: str) -> str:
    if not TOKEN.fullmatch(value):
        raise InvalidInput(
            f"invalid {what} {shown(value)}: use letters, digits, '_' and '-', starting with a letter or digit",
            field=field,
        )
    return value


def check_hostname(hostname: str, field: str = "hostname") -> str:
    if hostname and not HOSTNAME.fullmatch(hostname):
        raise InvalidInput(f"invalid host name {shown(hostname)}: use letters, digits, '.', '_' and '-' "
                           "(at most 253)", field=field)
    return hostname


def check_labels(labels: dict[str, str], field: str) -> None:
    if len(labels) > MAX_LABELS:
        raise InvalidInput(f"at most {MAX_LABELS} labels are allowed", field=field)
    for key, value in labels.items():
        try:
            validate_key(key)
            validate_value(value)
        except SelectorError as exc:
            raise InvalidInput(exc.message, field=f"{field}.{key}") from None


def parse_labels(pairs: list[str], field: str = "label") -> dict[str, str]:
    """`key=value` pairs (flags such as `--label tier=edge`) as a label map; a pair without `=` or key is
    an error naming `field`."""
    labels: dict[str, str] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise InvalidInput(f"label {shown(pair)} must be key=value", field=field)
        labels[key] = value
    return labels


def validate_spec(spec: JobSpec, namespace: str) -> list[str]:
    """Check a decoded spec submitted in `namespace`; fill in the namespace. Returns warnings."""
    warnings: list[str] = []
    if not spec.name:
        raise InvalidInput("a job needs a name", field="spec.name")
    check_token(spec.name, "spec.name", "job name")
    if spec.namespace and spec.namespace != namespace:
        raise InvalidInput(
            f"spec.namespace {spec.namespace!r} differs from the namespace {namespace!r} it was submitted to",
            field="spec.namespace",
        )
    spec.namespace = check_namespace(namespace, "spec.namespace")
    if len(spec.description) > MAX_DESCRIPTION:
        raise InvalidInput(f"description is longer than {MAX_DESCRIPTION} characters", field="spec.description")
    check_labels(spec.labels, "spec.labels")
    for key in spec.meta:
        for prefix in RESERVED_META_PREFIXES:
            if key.startswith(prefix):
                raise InvalidInput(
                    f"meta key {key!r} uses the reserved prefix {prefix!r}", field=f"spec.meta.{key}"
                )
    _check_selector(spec)
    warnings += _check_rollout(spec)
    _check_timeouts(spec)
    warnings += _check_config(spec)
    return warnings


def _check_selector(spec: JobSpec) -> None:
    sel = spec.selector
    try:
        compile_selector(sel.match_labels, sel.match_expressions, sel.match_ids)
    except SelectorError as exc:
        field = f"spec.selector.{exc.field}" if exc.field else "spec.selector"
        raise InvalidInput(exc.message, field=field) from None


def _check_rollout(spec: JobSpec) -> list[str]:
    warnings: list[str] = []
    rollout = spec.rollout
    hc = rollout.health_check
    if rollout.strategy in ("rolling", "canary"):
        if hc is None:
            raise InvalidInput(
                f"the {rollout.strategy} strategy needs a health_check", field="spec.rollout.health_check"
            )
    elif hc is not None:
        warnings.append("rollout.health_check is ignored by the immediate strategy")
    if hc is not None:
        # An interval of nanoseconds would make agents and the health service spin: at least 100 ms.
        if not MIN_HEALTH_INTERVAL <= hc.interval <= MAX_HEALTH_INTERVAL:
            raise InvalidInput(f"health_check.interval must be between {format_duration(MIN_HEALTH_INTERVAL)} and "
                               f"{format_duration(MAX_HEALTH_INTERVAL)}, got {format_duration(hc.interval)}",
                               field="spec.rollout.health_check.interval")
        if not hc.interval <= hc.deadline <= MAX_HEALTH_DEADLINE:
            raise InvalidInput(f"health_check.deadline must be at least one interval ({format_duration(hc.interval)}) "
                               f"and at most {format_duration(MAX_HEALTH_DEADLINE)}, got {format_duration(hc.deadline)}",
                               field="spec.rollout.health_check.deadline")
        if hc.deadline < hc.interval * hc.success_threshold:
            warnings.append(
                "health_check.deadline is shorter than success_threshold intervals: executions cannot become healthy in time"
            )
    if rollout.strategy != "canary":
        if rollout.canary is not None:
            warnings.append(f"rollout.canary is ignored by the {rollout.strategy} strategy")
        if rollout.auto_promote:
            warnings.append(f"rollout.auto_promote is ignored by the {rollout.strategy} strategy")
    elif rollout.canary is not None and rollout.canary.canary_count is not None and rollout.canary.canary_percent is not None:
        warnings.append("rollout.canary: canary_count is given, so canary_percent is ignored")
    return warnings


def _check_timeouts(spec: JobSpec) -> None:
    t = spec.timeouts
    if t.total_timeout and t.execution_timeout + t.queue_timeout > t.total_timeout:
        raise InvalidInput(
            f"execution_timeout ({t.execution_timeout}s) + queue_timeout ({t.queue_timeout}s) exceed "
            f"total_timeout ({t.total_timeout}s)",
            field="spec.timeouts.total_timeout",
        )


def _check_config(spec: JobSpec) -> list[str]:
    check_free_form(spec.config, "spec.config")
    size = len(to_json(spec.config))
    if size > MAX_CONFIG_BYTES:
        raise InvalidInput(f"config is {size} bytes as JSON, more than the limit of {MAX_CONFIG_BYTES}",
                           field="spec.config")
    simulate_config(spec.config)  # validates the simulate block for every type
    if spec.type == "config":
        files = files_config(spec.config)
        if not files.files and files.simulate is None:
            raise InvalidInput("a config job needs config.files", field="spec.config.files")
        seen: set[str] = set()
        for i, f in enumerate(files.files):
            if len(f.path) > MAX_PATH or any(c < " " or c == "\x7f" for c in f.path):
                raise InvalidInput(f"config file path {shown(f.path)} must be at most {MAX_PATH} characters with no "
                                   "control characters", field=f"spec.config.files[{i}].path")
            path = posixpath.normpath(f.path)
            if not f.path or f.path.startswith("/") or path in (".", "..") or path.startswith("../"):
                raise InvalidInput(
                    f"config file path {f.path!r} must be relative and stay inside the agent's config root",
                    field=f"spec.config.files[{i}].path",
                )
            if path in seen:
                raise InvalidInput(f"config file {f.path!r} is listed twice", field=f"spec.config.files[{i}].path")
            seen.add(path)
        return []
    cmd = command_config(spec.config)
    if not cmd.command and cmd.simulate is None:
        raise InvalidInput(
            f"a {spec.type} job needs config.command, an argv list such as [\"sh\", \"-c\", \"echo hi\"]",
            field="spec.config.command",
        )
    if cmd.command and not cmd.command[0]:
        raise InvalidInput("config.command[0] must name a program", field="spec.config.command[0]")
    return []

"""The one place where bytes become typed messages and back.

Public API bodies are JSON; internal events and records are msgpack. Decoders are cached per type.
Decoding public input never raises anything but `InvalidInput`, whose `field` is the JSON path of the
offending value (`spec.rollout.max_parallel`), so every bad request gets a structured answer.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache
from typing import Any, TypeVar

import msgspec

from .durations import Duration, parse_duration
from .errors import Internal, InvalidInput, Poison

log = logging.getLogger(__name__)

T = TypeVar("T")
_INT64_MAX = 2**63 - 1

# Public request bodies above this size are refused before decoding.
MAX_REQUEST_BYTES = 512 * 1024


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, Duration):
        return int(obj)
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def _dec_hook(tp: type, obj: Any) -> Any:
    if tp is Duration:
        if isinstance(obj, bool):
            raise ValueError("expected a duration: nanoseconds or a string such as '10s'")
        if isinstance(obj, int):
            if not -_INT64_MAX <= obj <= _INT64_MAX:
                raise ValueError("duration out of range: nanoseconds must fit in a signed 64-bit integer")
            return Duration(obj)
        if isinstance(obj, str):
            return parse_duration(obj)
        raise ValueError("expected a duration: nanoseconds or a string such as '10s'")
    raise NotImplementedError(f"cannot decode {tp!r}")


_json_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)
_json_sorted_encoder = msgspec.json.Encoder(enc_hook=_enc_hook, order="deterministic")
_msgpack_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)


@lru_cache(maxsize=None)
def _json_decoder(tp: Any) -> msgspec.json.Decoder:
    return msgspec.json.Decoder(tp, dec_hook=_dec_hook)


@lru_cache(maxsize=None)
def _msgpack_decoder(tp: Any) -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(tp, dec_hook=_dec_hook)


def to_json(obj: Any) -> bytes:
    return _json_encoder.encode(obj)


def to_canonical_json(obj: Any) -> bytes:
    """Deterministic JSON (sorted map keys): what we hash to tell whether a spec changed."""
    return _json_sorted_encoder.encode(obj)


def to_msgpack(obj: Any) -> bytes:
    return _msgpack_encoder.encode(obj)


def from_msgpack(data: bytes, tp: type[T]) -> T:
    """Decode an internal message. A failure here is a bug or a foreign writer, never user input."""
    try:
        return _msgpack_decoder(tp).decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise Internal(f"undecodable internal message for {getattr(tp, '__name__', tp)}: {exc}") from exc


def decode_message(data: bytes, tp: type[T], what: str) -> T:
    """Decode an internal message taken off a work queue; one that cannot be decoded is Poison (it would
    fail the same way on every redelivery), so its consumer makes it a dead letter."""
    try:
        return from_msgpack(data, tp)
    except Internal as exc:
        raise Poison(f"undecodable {what}: {exc}") from None


def from_msgpack_or_none(data: bytes, tp: type[T], what: str) -> T | None:
    """Decode an internal message, or log and return None: a message that cannot be decoded would fail
    the same way on every redelivery, so its consumer drops it instead of retrying it forever."""
    try:
        return from_msgpack(data, tp)
    except Internal as exc:
        log.error("dropping undecodable %s: %s", what, exc)
        return None


def from_json(data: bytes, tp: type[T], *, prefix: str = "", max_bytes: int | None = MAX_REQUEST_BYTES) -> T:
    """Decode a public request. Raises InvalidInput naming the field; `prefix` is prepended to paths.

    `max_bytes` guards services against oversized requests; clients decoding replies pass None.
    """
    if max_bytes is not None and len(data) > max_bytes:
        raise InvalidInput(
            f"request body is {len(data)} bytes, more than the limit of {max_bytes}",
            field=prefix.rstrip(".") or None,
        )
    try:
        return _json_decoder(tp).decode(data)
    except msgspec.ValidationError as exc:
        raise invalid_input(exc, prefix, tp) from None
    except msgspec.DecodeError as exc:
        raise InvalidInput(f"malformed JSON: {exc}", field=prefix.rstrip(".") or None) from None
    except UnicodeDecodeError:
        field = path_at(data, stop=_first_bad_byte(data))
        raise InvalidInput("a string is not valid UTF-8", field=(prefix + field).strip(".") or None) from None
    except RecursionError:
        field = path_at(data, depth=MAX_DEPTH)
        raise InvalidInput(f"JSON nested more than {MAX_DEPTH} levels deep",
                           field=(prefix + field).strip(".") or None) from None


MAX_DEPTH = 32  # of free-form JSON (a job's config); msgspec's own limit is reached long after


def _first_bad_byte(data: bytes) -> int:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start
    return len(data)


def path_at(data: bytes, *, stop: int | None = None, depth: int | None = None) -> str:
    """The JSON path of the value at byte `stop`, or of the first container nested deeper than `depth`,
    found by scanning the raw bytes (for errors the decoder cannot place: bad bytes, deep nesting)."""
    path: list[list[Any]] = []  # [kind, key or index]
    last = ""
    i, end = 0, len(data) if stop is None else min(stop, len(data))
    while i < end:
        c = data[i]
        if c == 0x22:  # a string: remember it, it may be a key
            j = i + 1
            while j < len(data) and data[j] != 0x22:
                j += 2 if data[j] == 0x5C else 1
            last = data[i + 1:j].decode("utf-8", errors="replace")
            if stop is not None and j >= stop:
                break
            i = j + 1
            continue
        if c in (0x7B, 0x5B):  # { [
            if depth is not None and len(path) >= depth:
                break
            path.append(["o", ""] if c == 0x7B else ["a", 0])
        elif c in (0x7D, 0x5D) and path:  # } ]
            path.pop()
        elif c == 0x3A and path and path[-1][0] == "o":  # : after a key
            path[-1][1] = last
        elif c == 0x2C and path and path[-1][0] == "a":  # , in a list
            path[-1][1] += 1
        i += 1
    out = ""
    for kind, at in path:
        if kind == "a":
            out += f"[{at}]"
        elif at:
            out += f".{at}" if out else at
    return out


def check_free_form(value: Any, field: str, *, max_depth: int = MAX_DEPTH) -> None:
    """Bound free-form JSON (a job's config): depth, integers that fit in 64 bits, finite numbers.

    Walked without recursion, so that no input can exhaust the stack.
    """
    stack: list[tuple[str, Any, int]] = [(field, value, 0)]
    while stack:
        path, node, depth = stack.pop()
        if depth > max_depth:
            raise InvalidInput(f"nested more than {max_depth} levels deep", field=path)
        if isinstance(node, bool) or node is None or isinstance(node, str):
            continue
        if isinstance(node, int):
            if not -(2**63) <= node <= 2**63 - 1:
                raise InvalidInput("integer out of range: it must fit in a signed 64-bit integer", field=path)
        elif isinstance(node, float):
            if node != node or node in (float("inf"), float("-inf")):
                raise InvalidInput("number must be finite", field=path)
        elif isinstance(node, dict):
            for key, item in node.items():
                stack.append((f"{path}.{key}", item, depth + 1))
        elif isinstance(node, list):
            for i, item in enumerate(node):
                stack.append((f"{path}[{i}]", item, depth + 1))


def convert(obj: Any, tp: type[T], *, prefix: str = "") -> T:
    """Typed conversion of already-parsed data (YAML files): same errors as from_json."""
    try:
        return msgspec.convert(obj, tp, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise invalid_input(exc, prefix, tp) from None


def to_builtins(obj: Any) -> Any:
    return msgspec.to_builtins(obj, enc_hook=_enc_hook)


_AT = re.compile(r"^(?P<msg>.*?)(?: - at (?P<key>`key` in )?`\$(?P<path>[^`]*)`)?$", re.S)
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<name>.*)`$", re.S)
_MISSING = re.compile(r"^Object missing required field `(?P<name>.*)`$", re.S)


def invalid_input(exc: msgspec.ValidationError, prefix: str = "", tp: Any = None) -> InvalidInput:
    """Turn msgspec's "Expected `int`, got `str` - at `$.spec.priority`" into message + field path."""
    match = _AT.match(str(exc))
    message = match.group("msg") if match else str(exc)
    path = (match.group("path") or "") if match else ""
    path = path.lstrip(".")
    if match and match.group("key"):
        message = f"a key: {message[:1].lower()}{message[1:]}"
    for pattern in (_UNKNOWN, _MISSING):
        named = pattern.match(message)
        if named:
            path = f"{path}.{named.group('name')}" if path else named.group("name")
    if message.startswith("Invalid enum value") and tp is not None:
        allowed = _literal_values(tp, path)
        if allowed:
            message += f"; expected one of: {', '.join(map(str, allowed))}"
    field = (prefix + path).replace(".[", "[").strip(".") or None
    text = message[:1].lower() + message[1:]
    return InvalidInput(text, field=field)


_SEGMENT = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _literal_values(tp: Any, path: str) -> tuple[Any, ...]:
    """The allowed values of the Literal found at `path` inside `tp` (for a helpful enum error)."""
    from msgspec import inspect as mi

    def unwrap(info: Any) -> Any:
        while True:
            if isinstance(info, mi.Metadata):
                info = info.type
            elif isinstance(info, mi.UnionType):
                options = [t for t in info.types if not isinstance(t, mi.NoneType)]
                literal = [t for t in options if isinstance(t, mi.LiteralType)]
                info = literal[0] if literal else (options[0] if options else info)
                if not isinstance(info, mi.UnionType):
                    continue
                return info
            else:
                return info

    try:
        info = unwrap(mi.type_info(tp))
        for name, index in _SEGMENT.findall(path):
            if isinstance(info, mi.StructType):
                info = unwrap(next(f.type for f in info.fields if f.encode_name == name))
            elif isinstance(info, (mi.ListType, mi.TupleType, mi.VarTupleType, mi.SetType)) and index:
                info = unwrap(info.item_type)
            elif isinstance(info, mi.DictType):
                info = unwrap(info.value_type)
            else:
                return ()
        info = unwrap(info)
    except (StopIteration, TypeError, AttributeError):
        return ()
    return tuple(info.values) if isinstance(info, mi.LiteralType) else ()

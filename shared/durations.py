"""Durations and timestamps as the public contract spells them.

A duration is an int64 of nanoseconds on the wire (Go's `time.Duration`); people also write "10s",
"1m30s" or "250ms", so both are accepted and nanoseconds are emitted. Timestamps are RFC 3339 in UTC
with a `Z`.
"""

from __future__ import annotations

import datetime as _dt
import re

NANOSECOND = 1
MICROSECOND = 1_000
MILLISECOND = 1_000_000
SECOND = 1_000_000_000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE

_UNITS = {
    "ns": NANOSECOND,
    "us": MICROSECOND,
    "µs": MICROSECOND,
    "μs": MICROSECOND,
    "ms": MILLISECOND,
    "s": SECOND,
    "m": MINUTE,
    "h": HOUR,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_INT64_MAX = 2**63 - 1


class Duration(int):
    """Nanoseconds. A distinct type so that the codec knows to accept "10s" where it expects one."""

    __slots__ = ()

    @property
    def seconds(self) -> float:
        return int(self) / SECOND

    def __repr__(self) -> str:
        return f"Duration({format_duration(self)})"


def parse_duration(text: str) -> Duration:
    """Parse Go's duration syntax ("1h2m3.5s", "300ms", "-5s", "0"). Raises ValueError."""
    s = text.strip()
    if not s:
        raise ValueError("empty duration")
    sign = 1
    if s[0] in "+-":
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    if s == "0":
        return Duration(0)
    pos = 0
    total = 0
    for match in _PART.finditer(s):
        if match.start() != pos:
            break
        number, unit = match.groups()
        whole, _, frac = number.partition(".")
        scale = _UNITS[unit]
        total += int(whole or "0") * scale
        if frac:
            total += int(frac) * scale // (10 ** len(frac))
        pos = match.end()
    if pos == 0 or pos != len(s):
        raise ValueError(f"invalid duration {text!r}: use a number with a unit, such as 10s, 1m30s or 250ms")
    total *= sign
    if not -_INT64_MAX <= total <= _INT64_MAX:
        raise ValueError(f"duration {text!r} is out of range")
    return Duration(total)


def format_duration(ns: int) -> str:
    """Render nanoseconds the way Go prints a duration, for humans (CLI tables, messages)."""
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < MICROSECOND:
        return f"{sign}{ns}ns"
    if ns < MILLISECOND:
        return f"{sign}{_trim(ns / MICROSECOND)}µs"
    if ns < SECOND:
        return f"{sign}{_trim(ns / MILLISECOND)}ms"
    hours, rest = divmod(ns, HOUR)
    minutes, rest = divmod(rest, MINUTE)
    text = f"{_trim(rest / SECOND)}s"
    if hours:
        return f"{sign}{hours}h{minutes}m{text}"
    if minutes:
        return f"{sign}{minutes}m{text}"
    return f"{sign}{text}"


def _trim(value: float) -> str:
    return f"{value:.9f}".rstrip("0").rstrip(".")


def utcnow() -> _dt.datetime:
    """Now, timezone-aware UTC, microsecond precision (what RFC 3339 in our API carries)."""
    return _dt.datetime.now(_dt.timezone.utc)


def rfc3339(ts: _dt.datetime | None) -> str:
    """A timestamp as our API writes it: RFC 3339 in UTC with a Z ("" for None)."""
    if ts is None:
        return ""
    return ts.astimezone(_dt.timezone.utc).isoformat().replace("+00:00", "Z")


def parse_rfc3339(text: object) -> _dt.datetime | None:
    """The timestamp in an RFC 3339 string (as kept in execution details), or None if there is none."""
    if not isinstance(text, str):
        return None
    try:
        return _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def to_ns(ts: _dt.datetime) -> int:
    """A timestamp as integer nanoseconds since the epoch: exact, sortable, used as a keyset column."""
    delta = ts - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * SECOND + delta.microseconds * MICROSECOND


def from_ns(ns: int) -> _dt.datetime:
    return _EPOCH + _dt.timedelta(microseconds=ns // MICROSECOND)


_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)

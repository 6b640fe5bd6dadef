"""Go-style durations (parse and format) and the nanosecond timestamp helpers."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.durations import (
    HOUR,
    MICROSECOND,
    MILLISECOND,
    MINUTE,
    SECOND,
    Duration,
    format_duration,
    from_ns,
    parse_duration,
    to_ns,
)

UTC = dt.timezone.utc
INT64_MAX = 2**63 - 1


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("0", 0),
        ("-0", 0),
        ("+0", 0),
        ("0s", 0),
        ("1ns", 1),
        ("1h2m3.5s", HOUR + 2 * MINUTE + 3 * SECOND + 500 * MILLISECOND),
        ("300ms", 300 * MILLISECOND),
        ("1.5h", 90 * MINUTE),
        ("10us", 10 * MICROSECOND),
        ("10\u00b5s", 10 * MICROSECOND),  # MICRO SIGN, what Go prints
        ("10\u03bcs", 10 * MICROSECOND),  # GREEK SMALL LETTER MU, also accepted by Go
        ("-5s", -5 * SECOND),
        ("+2m", 2 * MINUTE),
        ("-1m30s", -(MINUTE + 30 * SECOND)),
        (".5s", 500 * MILLISECOND),
        ("1.s", SECOND),
        ("0.000000001s", 1),
        ("1.0000000009s", SECOND),  # Go truncates digits below a nanosecond
        ("2h45m", 2 * HOUR + 45 * MINUTE),
        ("1h1h", 2 * HOUR),  # Go sums repeated units
        ("9223372036854775807ns", INT64_MAX),
    ],
)
def test_parse_duration(text: str, ns: int) -> None:
    value = parse_duration(text)
    assert value == ns
    assert isinstance(value, Duration)


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "10",  # a unit is required (Go too), except for a bare "0"
        "s",
        "1x",
        "1s2",
        "--1s",
        "+-1s",
        "-",
        "+",
        ".s",
        "1.5.5s",
        "1 s",
        "1S",
        "1e3s",
        "00",
        "9223372036854775808ns",  # one past int64
        "2562048h",
    ],
)
def test_parse_duration_errors(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (0, "0s"),
        (1, "1ns"),
        (999, "999ns"),
        (MICROSECOND, "1\u00b5s"),
        (1_500, "1.5\u00b5s"),
        (1_001, "1.001\u00b5s"),
        (999_999, "999.999\u00b5s"),
        (MILLISECOND, "1ms"),
        (1_500_000, "1.5ms"),
        (300 * MILLISECOND, "300ms"),
        (SECOND, "1s"),
        (SECOND + 1, "1.000000001s"),
        (1_500 * MILLISECOND, "1.5s"),
        (59 * SECOND + 999_999_999, "59.999999999s"),
        (2 * MINUTE, "2m0s"),
        (90 * SECOND, "1m30s"),
        (HOUR, "1h0m0s"),
        (HOUR + 2 * MINUTE + 3_500 * MILLISECOND, "1h2m3.5s"),
        (25 * HOUR, "25h0m0s"),
        (-5 * SECOND, "-5s"),
        (-1_500, "-1.5\u00b5s"),
        (-1, "-1ns"),
        (INT64_MAX, "2562047h47m16.854775807s"),
    ],
)
def test_format_duration(ns: int, text: str) -> None:
    assert format_duration(ns) == text


def test_duration_type() -> None:
    d = Duration(1_500 * MILLISECOND)
    assert d.seconds == 1.5
    assert repr(d) == "Duration(1.5s)"
    assert d == 1_500_000_000


# format_duration goes through floats (rest / SECOND, ns / MICROSECOND, ns / MILLISECOND) and prints
# them with "%.9f" before trimming zeros. Each quotient is below 60 (seconds) or 1000 (µs, ms), and its
# exact value has at most 9 decimals, so the float's error (< 1e-13) stays far below the 5e-10 rounding
# step of "%.9f": the printed digits are exact at every magnitude, sub-microsecond values included,
# and parse_duration adds them up with integer arithmetic. Hours are printed from an integer divmod.
# So no restriction to whole microseconds is needed: the property holds for every integer in range.
@given(st.integers(min_value=-(10**15), max_value=10**15))
def test_format_then_parse_round_trips(ns: int) -> None:
    assert parse_duration(format_duration(ns)) == ns


@given(st.integers(min_value=-INT64_MAX, max_value=INT64_MAX))
def test_format_then_parse_round_trips_over_int64(ns: int) -> None:
    """Also at the extremes of int64 (except -2**63, which parse_duration's symmetric range refuses)."""
    assert parse_duration(format_duration(ns)) == ns


@given(st.integers(min_value=0, max_value=10**15))
def test_format_is_sign_symmetric(ns: int) -> None:
    formatted = format_duration(-ns)
    assert formatted == ("0s" if ns == 0 else "-" + format_duration(ns))


# --- nanosecond timestamps ------------------------------------------------------------------------


@given(st.datetimes(timezones=st.just(UTC)))
def test_to_ns_from_ns_round_trip_at_microsecond_precision(ts: dt.datetime) -> None:
    back = from_ns(to_ns(ts))
    assert back == ts
    assert back.utcoffset() == dt.timedelta(0)


@given(st.integers(min_value=-(10**18), max_value=10**18))
def test_from_ns_truncates_to_microseconds(ns: int) -> None:
    """Nanoseconds below a microsecond are dropped, rounding toward the past (floor), also before 1970."""
    assert to_ns(from_ns(ns)) == ns - ns % MICROSECOND


@given(st.datetimes(timezones=st.just(UTC)), st.datetimes(timezones=st.just(UTC)))
def test_to_ns_preserves_order(a: dt.datetime, b: dt.datetime) -> None:
    """to_ns is used as a keyset column, so it must sort exactly like the timestamps."""
    assert (to_ns(a) < to_ns(b)) == (a < b)
    assert (to_ns(a) == to_ns(b)) == (a == b)


def test_to_ns_known_values() -> None:
    assert to_ns(dt.datetime(1970, 1, 1, tzinfo=UTC)) == 0
    assert to_ns(dt.datetime(2025, 1, 15, 10, 35, 0, 123456, tzinfo=UTC)) == 1_736_937_300_123_456_000
    assert to_ns(dt.datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)) == -1_000
    # An offset timestamp is the same instant.
    plus_two = dt.timezone(dt.timedelta(hours=2))
    assert to_ns(dt.datetime(2025, 1, 15, 12, 35, tzinfo=plus_two)) == 1_736_937_300_000_000_000


def test_from_ns_known_values() -> None:
    assert from_ns(1_736_937_300_123_456_789) == dt.datetime(2025, 1, 15, 10, 35, 0, 123456, tzinfo=UTC)
    assert from_ns(-1) == dt.datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)

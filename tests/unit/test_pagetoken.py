"""Keyset page tokens: round trip, tamper evidence, scope binding, and garbage never crashing."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import pagetoken
from shared.errors import InvalidInput

KEY = b"k" * 32
OTHER_KEY = b"x" * 32
SCOPE = pagetoken.scope("production", "job-1", None, "created_at", False)
POSITION = [1_736_937_300_123_456_000, "exec-789xyz456abc"]
B64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def rejected(token: str, *, key: bytes = KEY, token_scope: bytes = SCOPE) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        pagetoken.decode(key, token, token_scope)
    assert info.value.field == "next_token"
    assert info.value.code == 400
    return info.value


def sign(body: bytes, key: bytes = KEY) -> str:
    """Build a token by hand, correctly signed, around an arbitrary body (to reach the checks after the HMAC)."""

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return b64(body) + "." + b64(hmac.new(key, body, hashlib.sha256).digest()[:16])


def segments(token: str) -> tuple[bytes, bytes] | None:
    """The bytes a token's two base64 segments decode to, as a lenient decoder sees them."""
    body, dot, sig = token.partition(".")
    if not dot or "." in sig or "=" in token:
        return None
    try:
        return (
            base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)),
            base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)),
        )
    except (binascii.Error, ValueError):
        return None


def single_char_mutations(token: str) -> list[str]:
    out = []
    for i, original in enumerate(token):
        for replacement in B64_ALPHABET + ".=":
            if replacement != original:
                out.append(token[:i] + replacement + token[i + 1 :])
    return out


# --- round trip -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "position",
    [
        POSITION,
        [0, ""],
        [-1, "a"],
        [2**63 - 1, "ünïcødé/with.dots and spaces"],
        [-(2**63), "x" * 500],
    ],
)
def test_round_trip(position: list[Any]) -> None:
    token = pagetoken.encode(KEY, SCOPE, position)
    assert pagetoken.decode(KEY, token, SCOPE) == position


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1), st.text())
def test_round_trip_property(sort_value: int, row_id: str) -> None:
    token = pagetoken.encode(KEY, SCOPE, [sort_value, row_id])
    assert pagetoken.decode(KEY, token, SCOPE) == [sort_value, row_id]


def test_token_is_url_safe_and_opaque() -> None:
    token = pagetoken.encode(KEY, SCOPE, POSITION)
    assert set(token) <= set(B64_ALPHABET + ".")
    assert token.count(".") == 1
    assert "exec-789xyz456abc" not in token


def test_different_positions_give_different_tokens() -> None:
    assert pagetoken.encode(KEY, SCOPE, [1, "a"]) != pagetoken.encode(KEY, SCOPE, [1, "b"])


# --- tampering ------------------------------------------------------------------------------------


def test_changed_body_character_is_rejected() -> None:
    token = pagetoken.encode(KEY, SCOPE, POSITION)
    i = len(token.partition(".")[0]) // 2
    mutated = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1 :]
    assert "not valid" in rejected(mutated).message


def test_changed_signature_character_is_rejected() -> None:
    token = pagetoken.encode(KEY, SCOPE, POSITION)
    i = token.index(".") + 3
    mutated = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1 :]
    assert "not valid" in rejected(mutated).message


def test_every_single_character_change_that_alters_the_bytes_is_rejected() -> None:
    """Change each character of body, dot and signature to every other character; none may be accepted.

    Replacements that only flip the unused low bits of a segment's last base64 character decode to the
    very same bytes; they are left to the strict test below.
    """
    token = pagetoken.encode(KEY, SCOPE, POSITION)
    original = segments(token)
    checked = 0
    for mutated in single_char_mutations(token):
        if segments(mutated) == original:
            continue
        rejected(mutated)
        checked += 1
    assert checked > 60 * len(token)


def test_every_single_character_change_is_rejected() -> None:
    token = pagetoken.encode(KEY, SCOPE, POSITION)
    accepted = []
    for mutated in single_char_mutations(token):
        try:
            pagetoken.decode(KEY, mutated, SCOPE)
        except InvalidInput:
            continue
        accepted.append(mutated)
    assert accepted == []


def test_token_for_other_filters_is_rejected() -> None:
    token = pagetoken.encode(KEY, SCOPE, POSITION)
    other = pagetoken.scope("production", "job-2", None, "created_at", False)
    err = rejected(token, token_scope=other)
    assert "other filters" in err.message


def test_token_signed_with_another_key_is_rejected() -> None:
    token = pagetoken.encode(OTHER_KEY, SCOPE, POSITION)
    assert "not valid" in rejected(token).message


def test_custom_field_name() -> None:
    with pytest.raises(InvalidInput) as info:
        pagetoken.decode(KEY, "garbage", SCOPE, field="page_token")
    assert info.value.field == "page_token"


def test_signed_token_of_another_version_is_rejected() -> None:
    for version in (pagetoken._VERSION - 1, pagetoken._VERSION + 1):
        body = msgspec.msgpack.encode([version, SCOPE, POSITION])
        assert "version" in rejected(sign(body)).message


def test_signed_token_with_a_broken_body_is_malformed() -> None:
    assert "malformed" in rejected(sign(b"\xc1not msgpack")).message
    assert "malformed" in rejected(sign(msgspec.msgpack.encode({"version": 1}))).message


@given(st.binary(max_size=200))
def test_correctly_signed_arbitrary_body_only_raises_invalid_input(body: bytes) -> None:
    try:
        pagetoken.decode(KEY, sign(body), SCOPE)
    except InvalidInput as exc:
        assert exc.field == "next_token"


# --- scope ----------------------------------------------------------------------------------------


def test_scope_depends_on_every_filter_and_their_order() -> None:
    base = pagetoken.scope("ns", "job", None)
    assert pagetoken.scope("ns", "job", None) == base
    assert pagetoken.scope("ns", "job", "") != base  # None and "" are different filters
    assert pagetoken.scope("ns", "job") != base
    assert pagetoken.scope("job", "ns", None) != base
    assert pagetoken.scope("ns", "jo", "b") != pagetoken.scope("ns", "job", "")  # not a plain concatenation


# --- garbage --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "!!!.###",
        ".",
        "..",
        "a..b",
        "abc.",
        ".abc",
        "A" * 100_000 + "." + "B" * 22,
        "A" * 1_000_000,
        "\x00.\x00",
        "é.é",
        "abcd=.abcd",
        " " + "A" * 20 + "." + "A" * 22,
    ],
)
def test_garbage_is_rejected(token: str) -> None:
    rejected(token)


def test_valid_token_with_extra_suffix_is_rejected() -> None:
    token = pagetoken.encode(KEY, SCOPE, POSITION)
    for suffix in (".", "=", "==", "A", "\n", ".abc"):
        rejected(token + suffix)


@given(st.text())
def test_arbitrary_text_only_raises_invalid_input(token: str) -> None:
    with pytest.raises(InvalidInput):
        pagetoken.decode(KEY, token, SCOPE)


@given(st.text(alphabet=B64_ALPHABET + ".=", max_size=120))
def test_arbitrary_base64ish_text_only_raises_invalid_input(token: str) -> None:
    """Text from the token alphabet gets past the character check into base64 and HMAC handling."""
    with pytest.raises(InvalidInput):
        pagetoken.decode(KEY, token, SCOPE)

"""Keyset page tokens: round trip, tamper evidence, scope binding, key ids, and garbage never crashing;
and what a set of rotating signing keys means at a given moment (which signs, which still verify)."""

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

KEY = pagetoken.Key("s1", b"k" * 32)
OTHER_KEY = pagetoken.Key("s1", b"x" * 32)  # same id, another secret: a forgery naming a real key
KEYS = {KEY.id: KEY.secret}.get
SCOPE = pagetoken.scope("production", "job-1", None, "created_at", False)
POSITION = [1_736_937_300_123_456_000, "exec-789xyz456abc"]
B64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def rejected(token: str, *, keys: pagetoken.KeyLookup = KEYS, token_scope: bytes = SCOPE) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        pagetoken.decode(keys, token, token_scope)
    assert info.value.field == "next_token"
    assert info.value.code == 400
    return info.value


def sign(body: bytes, secret: bytes = KEY.secret) -> str:
    """Build a token by hand, correctly signed, around an arbitrary body (to reach the checks after the HMAC)."""

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return b64(body) + "." + b64(hmac.new(secret, body, hashlib.sha256).digest()[:16])


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
    assert pagetoken.decode(KEYS, token, SCOPE) == position


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1), st.text())
def test_round_trip_property(sort_value: int, row_id: str) -> None:
    token = pagetoken.encode(KEY, SCOPE, [sort_value, row_id])
    assert pagetoken.decode(KEYS, token, SCOPE) == [sort_value, row_id]


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
            pagetoken.decode(KEYS, mutated, SCOPE)
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
        pagetoken.decode(KEYS, "garbage", SCOPE, field="page_token")
    assert info.value.field == "page_token"


def test_signed_token_of_another_version_is_rejected() -> None:
    for body in (
        msgspec.msgpack.encode([pagetoken._VERSION - 1, SCOPE, POSITION]),  # the format before key ids
        msgspec.msgpack.encode([pagetoken._VERSION + 1, KEY.id, SCOPE, POSITION]),
        msgspec.msgpack.encode([pagetoken._VERSION + 1]),
    ):
        err = rejected(sign(body))
        assert "version" in err.message and "list again" in err.message


def test_token_of_the_format_before_key_ids_is_refused_with_the_key_it_was_signed_with() -> None:
    """A version-2 token, exactly as the single-key encoder made it, is refused as old (never looked up),
    even when verified with a lookup that would hand out the very key that signed it."""
    old_secret = b"o" * 32
    body = msgspec.msgpack.encode([2, SCOPE, [5, *POSITION]])
    looked_up: list[str] = []

    def keys(key_id: str) -> bytes:
        looked_up.append(key_id)
        return old_secret

    err = rejected(sign(body, old_secret), keys=keys)
    assert "version" in err.message and "list again" in err.message
    assert looked_up == []


def test_signed_token_with_a_broken_body_is_malformed() -> None:
    assert "malformed" in rejected(sign(b"\xc1not msgpack")).message
    assert "malformed" in rejected(sign(msgspec.msgpack.encode({"version": 1}))).message


@given(st.binary(max_size=200))
def test_correctly_signed_arbitrary_body_only_raises_invalid_input(body: bytes) -> None:
    try:
        pagetoken.decode(KEYS, sign(body), SCOPE)
    except InvalidInput as exc:
        assert exc.field == "next_token"


# --- key ids --------------------------------------------------------------------------------------


def test_a_token_names_its_key_and_is_verified_with_that_key() -> None:
    second = pagetoken.Key("m2x", b"2" * 32)
    looked_up: list[str] = []

    def keys(key_id: str) -> bytes | None:
        looked_up.append(key_id)
        return {KEY.id: KEY.secret, second.id: second.secret}.get(key_id)

    assert pagetoken.decode(keys, pagetoken.encode(KEY, SCOPE, POSITION), SCOPE) == POSITION
    assert pagetoken.decode(keys, pagetoken.encode(second, SCOPE, [7, "b"]), SCOPE) == [7, "b"]
    assert looked_up == [KEY.id, second.id]


def test_a_token_naming_an_unknown_or_expired_key_says_to_list_again() -> None:
    token = pagetoken.encode(pagetoken.Key("gone", b"g" * 32), SCOPE, POSITION)
    err = rejected(token)
    assert "rotated out or revoked" in err.message and "list again" in err.message
    assert "rotated out" in rejected(pagetoken.encode(KEY, SCOPE, POSITION), keys=lambda key_id: None).message


def test_a_key_id_swapped_for_another_trusted_one_is_rejected() -> None:
    """The key id is signed with the rest: naming another key the verifier trusts does not help."""
    second = pagetoken.Key("s2", b"2" * 32)
    token = pagetoken.encode(KEY, SCOPE, POSITION)
    body_text, _, sig_text = token.partition(".")
    body = pagetoken._unb64(body_text)
    swapped = msgspec.msgpack.encode([pagetoken._VERSION, second.id, SCOPE, POSITION])
    assert swapped != body
    forged = pagetoken._b64(swapped) + "." + sig_text
    keys = {KEY.id: KEY.secret, second.id: second.secret}.get
    assert "not valid" in rejected(forged, keys=keys).message


def test_a_token_forged_with_a_random_key_under_a_real_key_id_is_rejected() -> None:
    import os

    for _ in range(20):
        forged = pagetoken.encode(pagetoken.Key(KEY.id, os.urandom(32)), SCOPE, POSITION)
        assert "not valid" in rejected(forged).message


@pytest.mark.parametrize("key_id", ["", "k" * (pagetoken.MAX_KEY_ID + 1)])
def test_an_empty_or_overlong_key_id_is_malformed_and_not_looked_up(key_id: str) -> None:
    body = msgspec.msgpack.encode([pagetoken._VERSION, key_id, SCOPE, POSITION])

    def keys(asked: str) -> bytes:
        raise AssertionError(f"looked up {asked!r}")

    assert "malformed" in rejected(sign(body), keys=keys).message


def test_a_key_id_of_another_type_is_malformed() -> None:
    for head in ([pagetoken._VERSION, 7], [pagetoken._VERSION, b"s1"], [pagetoken._VERSION]):
        assert "malformed" in rejected(sign(msgspec.msgpack.encode([*head, SCOPE, POSITION]))).message


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
        pagetoken.decode(KEYS, token, SCOPE)


@given(st.text(alphabet=B64_ALPHABET + ".=", max_size=120))
def test_arbitrary_base64ish_text_only_raises_invalid_input(token: str) -> None:
    """Text from the token alphabet gets past the character check into base64 and HMAC handling."""
    with pytest.raises(InvalidInput):
        pagetoken.decode(KEYS, token, SCOPE)


# --- rotating keys: which signs, which still verify, when the next is due ---------------------------

from services.query import tokenkeys as tk  # noqa: E402

S = tk.SECOND
ROTATION = 100 * S
RETENTION = 10 * S


def page_key(created: int, fill: bytes = b"s") -> tk.PageKey:
    return tk.PageKey(secret=fill * 32, created=created)


def test_the_newest_key_signs_and_ties_are_broken_by_id_so_replicas_agree() -> None:
    assert tk.newest({}) is None
    keys = {"s1": page_key(5 * S), "s2": page_key(9 * S), "m1": page_key(7 * S)}
    assert tk.newest(keys)[0] == "s2"
    assert tk.newest({"a": page_key(3), "b": page_key(3)})[0] == tk.newest({"b": page_key(3), "a": page_key(3)})[0]


def test_a_key_expires_retention_after_the_next_newer_key_was_created() -> None:
    keys = {"old": page_key(0), "mid": page_key(100 * S), "new": page_key(150 * S)}
    assert tk.expires_at(keys, "old", RETENTION) == 110 * S  # its successor, not the newest
    assert tk.expires_at(keys, "mid", RETENTION) == 160 * S
    assert tk.expires_at(keys, "new", RETENTION) is None  # the newest never expires
    assert tk.expires_at(keys, "unknown", RETENTION) is None
    assert tk.trusted(keys, "old", 109 * S, RETENTION) == keys["old"].secret
    assert tk.trusted(keys, "old", 110 * S, RETENTION) is None
    assert tk.trusted(keys, "new", 10**6 * S, RETENTION) == keys["new"].secret
    assert tk.trusted(keys, "unknown", 0, RETENTION) is None
    assert tk.expired(keys, 120 * S, RETENTION) == ["old"]
    assert sorted(tk.expired(keys, 160 * S, RETENTION)) == ["mid", "old"]


def test_rotation_is_due_once_per_period_under_an_id_every_replica_derives_alike() -> None:
    assert tk.rotation_due({}, 250 * S, ROTATION) == tk.scheduled_id(200 * S)  # the first key
    keys = {tk.scheduled_id(200 * S): page_key(200 * S + 3)}
    for now in (200 * S + 5, 250 * S, 300 * S - 1):
        assert tk.rotation_due(keys, now, ROTATION) is None
    # Two replicas finding it due at different moments of the next period name the same key.
    assert tk.rotation_due(keys, 300 * S, ROTATION) == tk.scheduled_id(300 * S)
    assert tk.rotation_due(keys, 399 * S, ROTATION) == tk.scheduled_id(300 * S)
    assert tk.scheduled_id(300 * S) != tk.scheduled_id(200 * S)
    # A key made by hand within the period counts as that period's.
    assert tk.rotation_due({**keys, "mabc": page_key(330 * S)}, 350 * S, ROTATION) is None


def test_the_next_change_is_the_next_period_or_the_next_expiry() -> None:
    keys = {"a": page_key(200 * S), "b": page_key(205 * S)}
    assert tk.next_change(keys, 206 * S, ROTATION, RETENTION) == 215 * S  # "a" expires
    assert tk.next_change(keys, 215 * S, ROTATION, RETENTION) == 300 * S  # then the next period
    assert tk.next_change({}, 0, ROTATION, RETENTION) == ROTATION


def test_key_ids_are_short_subject_tokens() -> None:
    import re

    for key_id in (tk.scheduled_id(0), tk.scheduled_id(2**62), tk.manual_id(), tk.manual_id()):
        assert re.fullmatch(r"[a-z0-9]+", key_id) and len(key_id) <= pagetoken.MAX_KEY_ID
    assert tk.manual_id() != tk.manual_id()
    assert tk.scheduled_id(0)[0] != tk.manual_id()[0]  # the two kinds never collide


def test_page_keys_shorter_than_32_bytes_do_not_decode() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(msgspec.msgpack.encode({"secret": b"short", "created": 1}), type=tk.PageKey)


def test_rotation_period_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.settings import from_env

    monkeypatch.delenv("SHOAL_PAGE_KEY_ROTATION", raising=False)
    assert from_env().page_key_rotation == 7 * 86_400
    monkeypatch.setenv("SHOAL_PAGE_KEY_ROTATION", "3600")
    assert from_env().page_key_rotation == 3600
    for bad in ("soon", "0", "-5", "0.5", "inf", "nan"):
        monkeypatch.setenv("SHOAL_PAGE_KEY_ROTATION", bad)
        with pytest.raises(SystemExit):
            from_env()

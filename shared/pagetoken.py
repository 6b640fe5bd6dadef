"""Opaque, tamper-evident keyset page tokens, signed with rotating keys.

A token names the last row of the page it follows (its sort value and id), so the next page starts
strictly after it: walking every page returns each row exactly once even while rows are inserted,
unlike an offset. It is bound to the filters it was issued for (their digest is inside) and signed
with a key shared by every query replica, so any replica accepts it and a tampered or mismatched
token is a 400, not a silently different listing.

Signing keys rotate (services/query/tokenkeys.py), so a token names the key that signed it: the
verifier looks that key up among the ones it still trusts instead of trying each, and a token whose
key was rotated out or revoked is told apart from a forged one. The key id is inside the signed body,
so it cannot be swapped for another.

Format (version 3): `b64(body) "." b64(sig)`, where body is the msgpack array
`[3, key id, scope, position]` and sig the first 16 bytes of its HMAC-SHA256 under the named key.
Tokens of version 2 (one key for ever, no key id) are refused with a 400 that says to list again.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import msgspec

from .errors import InvalidInput

_VERSION = 3  # 2: positions start with the snapshot sequence of the walk; 3: the signing key's id
_SIG_BYTES = 16
MAX_KEY_ID = 32  # longer ids are never issued: such a token is malformed, and is not looked up


class Key(NamedTuple):
    """A signing key and the id tokens signed with it carry."""

    id: str
    secret: bytes


KeyLookup = Callable[[str], bytes | None]
"""The secret of a key id the verifier still trusts, or None (never issued, rotated out or revoked)."""


class _Token(msgspec.Struct, array_like=True):
    version: int
    key_id: str
    scope: bytes
    position: list[Any]


class _Version(msgspec.Struct, array_like=True):
    """The first element of any version's body: read before anything else, so that an old token is
    refused as old rather than as malformed."""

    version: int


class _Head(msgspec.Struct, array_like=True):
    """What is needed to verify the signature; the rest is decoded only once it is verified."""

    version: int
    key_id: str


_encoder = msgspec.msgpack.Encoder()
# What decoding untrusted bytes may raise (a string of invalid UTF-8 is a UnicodeDecodeError, a ValueError).
_UNDECODABLE = (msgspec.DecodeError, msgspec.ValidationError, ValueError)
_decoder = msgspec.msgpack.Decoder(_Token)
_version_decoder = msgspec.msgpack.Decoder(_Version)
_head_decoder = msgspec.msgpack.Decoder(_Head)


def scope(*filters: Any) -> bytes:
    """A short digest of the filters a listing was asked with; tokens only work for the same filters."""
    return hashlib.blake2b(_encoder.encode(list(filters)), digest_size=8).digest()


def encode(key: Key, token_scope: bytes, position: list[Any]) -> str:
    body = _encoder.encode(_Token(_VERSION, key.id, token_scope, position))
    sig = hmac.new(key.secret, body, hashlib.sha256).digest()[:_SIG_BYTES]
    return _b64(body) + "." + _b64(sig)


def decode(keys: KeyLookup, token: str, token_scope: bytes, *, field: str = "next_token") -> list[Any]:
    """The position inside `token`; InvalidInput if it is malformed, tampered with, for other filters,
    of another format version, or signed with a key `keys` does not (or no longer) trust."""
    body_text, dot, sig_text = token.partition(".")
    try:
        if not dot:
            raise ValueError
        body = _unb64(body_text)
        sig = _unb64(sig_text)
    except (ValueError, binascii.Error):
        raise InvalidInput("next_token is malformed", field=field) from None
    try:
        version = _version_decoder.decode(body).version
    except _UNDECODABLE:
        raise InvalidInput("next_token is malformed", field=field) from None
    if version != _VERSION:
        raise InvalidInput("next_token is from an incompatible version of shoal; list again without it", field=field)
    try:
        key_id = _head_decoder.decode(body).key_id
    except _UNDECODABLE:
        raise InvalidInput("next_token is malformed", field=field) from None
    if not key_id or len(key_id) > MAX_KEY_ID:
        raise InvalidInput("next_token is malformed", field=field)
    secret = keys(key_id)
    if secret is None:
        raise InvalidInput("next_token was signed with a key that has been rotated out or revoked (or never "
                           "existed); list again without it", field=field)
    expected = hmac.new(secret, body, hashlib.sha256).digest()[:_SIG_BYTES]
    if not hmac.compare_digest(sig, expected):
        raise InvalidInput("next_token is not valid (tampered with, or issued by another cluster)", field=field)
    try:
        parsed = _decoder.decode(body)
    except _UNDECODABLE:
        raise InvalidInput("next_token is malformed", field=field) from None
    if not hmac.compare_digest(parsed.scope, token_scope):
        raise InvalidInput(
            "next_token was issued for other filters: repeat the first request's filters and order", field=field
        )
    return parsed.position


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    if _B64_TEXT.fullmatch(text) is None:
        raise ValueError("bad characters")
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64(raw) != text:  # unused low bits set: another spelling of the same bytes is not our token
        raise ValueError("not canonical")
    return raw


_B64_TEXT = re.compile(r"[A-Za-z0-9_-]+")  # URL-safe base64 without padding, not empty

"""Opaque, tamper-evident keyset page tokens.

A token names the last row of the page it follows (its sort value and id), so the next page starts
strictly after it: walking every page returns each row exactly once even while rows are inserted,
unlike an offset. It is bound to the filters it was issued for (their digest is inside) and signed
with a key shared by every query replica, so any replica accepts it and a tampered or mismatched
token is a 400, not a silently different listing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from typing import Any

import msgspec

from .errors import InvalidInput

_VERSION = 2  # 2: positions start with the snapshot sequence of the walk
_SIG_BYTES = 16


class _Token(msgspec.Struct, array_like=True):
    version: int
    scope: bytes
    position: list[Any]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_Token)


def scope(*filters: Any) -> bytes:
    """A short digest of the filters a listing was asked with; tokens only work for the same filters."""
    return hashlib.blake2b(_encoder.encode(list(filters)), digest_size=8).digest()


def encode(key: bytes, token_scope: bytes, position: list[Any]) -> str:
    body = _encoder.encode(_Token(_VERSION, token_scope, position))
    sig = hmac.new(key, body, hashlib.sha256).digest()[:_SIG_BYTES]
    return _b64(body) + "." + _b64(sig)


def decode(key: bytes, token: str, token_scope: bytes, *, field: str = "next_token") -> list[Any]:
    """The position inside `token`; InvalidInput if it is malformed, tampered with or for other filters."""
    body_text, dot, sig_text = token.partition(".")
    try:
        if not dot:
            raise ValueError
        body = _unb64(body_text)
        sig = _unb64(sig_text)
    except (ValueError, binascii.Error):
        raise InvalidInput("next_token is malformed", field=field) from None
    expected = hmac.new(key, body, hashlib.sha256).digest()[:_SIG_BYTES]
    if not hmac.compare_digest(sig, expected):
        raise InvalidInput("next_token is not valid (tampered with, or issued by another cluster)", field=field)
    try:
        parsed = _decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise InvalidInput("next_token is malformed", field=field) from None
    if parsed.version != _VERSION:
        raise InvalidInput("next_token is from an incompatible version", field=field)
    if not hmac.compare_digest(parsed.scope, token_scope):
        raise InvalidInput(
            "next_token was issued for other filters: repeat the first request's filters and order", field=field
        )
    return parsed.position


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    if not text or any(c not in _ALPHABET for c in text):
        raise ValueError("bad characters")
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64(raw) != text:  # unused low bits set: another spelling of the same bytes is not our token
        raise ValueError("not canonical")
    return raw


_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")

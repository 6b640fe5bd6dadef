"""Bearer tokens of the HTTP gateway: who may call which route.

The gateway connects to NATS as one identity (the admin or the service identity) and enforces tokens
itself, so a token is only as strong as this check. The token file (SHOAL_GATEWAY_TOKENS) holds the
SHA-256 of each token, never the token: a leaked file grants nothing. An admin token may call every
route; a tenant token only the routes of its namespaces, as a tenant's NATS identity may only use
`shoal.v1.<its namespace>.>`.

    {"tokens": [{"sha256": "<hex>", "role": "admin" | "tenant", "namespaces": ["ns"], "name": "ci"}]}

The file is read again when it changes, so `shoal auth add-token` takes effect without a restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from shared.codec import from_json, to_json
from shared.errors import InvalidInput, ShoalError
from shared.validation import check_namespace

log = logging.getLogger(__name__)

Role = Literal["admin", "tenant"]
TOKEN_PREFIX = "shoal_"
TOKEN_BYTES = 32  # of randomness: 256 bits, far beyond guessing
MAX_TOKEN = 512  # characters of a presented token; longer is not one of ours
FILE_MODE = 0o600
RECHECK = 1.0  # seconds between looks at the file's modification time

Hex = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]


class TokenEntry(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    sha256: Hex
    role: Role
    namespaces: list[str] = []  # a tenant's; ignored for an admin
    name: str = ""
    created_at: str = ""


class TokenFile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    tokens: list[TokenEntry] = []


class Unauthorized(ShoalError):
    """No token, or one the gateway does not know: 401."""

    default_code = 401


class Forbidden(ShoalError):
    """A known token that may not call this route: 403."""

    default_code = 403


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def read(path: Path) -> TokenFile:
    """The token file, checked: a tenant token must name valid namespaces (else it could never be used)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InvalidInput(f"token file {path} not found: create it with `shoal auth add-token {path} --admin`",
                           code=404) from None
    tokens = from_json(data, TokenFile, max_bytes=None)
    for i, entry in enumerate(tokens.tokens):
        if entry.role == "tenant":
            if not entry.namespaces:
                raise InvalidInput(f"{path}: a tenant token needs namespaces", field=f"tokens[{i}].namespaces")
            for ns in entry.namespaces:
                check_namespace(ns, f"tokens[{i}].namespaces")
    return tokens


def add_token(path: Path, *, role: Role, namespaces: list[str] | None = None, name: str = "") -> str:
    """Create a token, store its hash in `path` (created if missing, mode 0600) and return the token.

    The token is returned once and stored nowhere: whoever loses it makes a new one.
    """
    namespaces = list(namespaces or [])
    if role == "tenant":
        if not namespaces:
            raise InvalidInput("a tenant token needs a namespace (--tenant NS)", field="namespaces")
        for ns in namespaces:
            check_namespace(ns, "namespaces")
    elif namespaces:
        raise InvalidInput("an admin token reaches every namespace: give --admin or --tenant, not both",
                           field="namespaces")
    token = new_token()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        current = read(path) if path.exists() else TokenFile()
        current.tokens.append(TokenEntry(sha256=digest(token), role=role, namespaces=namespaces, name=name,
                                         created_at=datetime.now(UTC).isoformat(timespec="seconds")))
        _write(path, msgspec.json.format(to_json(current), indent=2) + b"\n")
    return token


class Access(msgspec.Struct, frozen=True):
    """What one presented token may do."""

    role: Role
    namespaces: frozenset[str]
    name: str

    def namespace(self, ns: str) -> None:
        if self.role != "admin" and ns not in self.namespaces:
            raise Forbidden(f"this token may not use namespace {ns!r}")

    def admin(self) -> None:
        if self.role != "admin":
            raise Forbidden("this route needs an admin token")


OPEN = Access("admin", frozenset(), "")  # no token file: every caller is trusted (a local `shoal dev`)


class Tokens:
    """The token file as the gateway checks it; reloaded when it changes (a bad new file keeps the old)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self._by_hash: dict[str, TokenEntry] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        if self.path is not None:
            self._load(strict=True)

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def check(self, authorization: str | None) -> Access:
        """The access of an `Authorization` header value; Unauthorized when it grants none."""
        if self.path is None:
            return OPEN
        self._maybe_reload()
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("a bearer token is required: Authorization: Bearer <token>")
        if len(token) > MAX_TOKEN:
            raise Unauthorized("unknown token")
        entry = self._by_hash.get(digest(token))
        if entry is None:
            raise Unauthorized("unknown token")
        return Access(entry.role, frozenset(entry.namespaces), entry.name)

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < RECHECK:
            return
        self._checked = now
        self._load(strict=False)

    def _load(self, *, strict: bool) -> None:
        assert self.path is not None
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            tokens = read(self.path)
        except (ShoalError, OSError) as exc:
            if strict:
                raise
            log.error("token file %s unreadable (%s); keeping the tokens read before", self.path, exc)
            return
        self._by_hash = {entry.sha256: entry for entry in tokens.tokens}
        self._stamp = stamp
        if not strict:
            log.info("token file %s reloaded: %d token(s)", self.path, len(self._by_hash))


def _write(path: Path, data: bytes) -> None:
    """Replace the file at once (a reader sees the old or the new one), mode 0600 whatever the umask."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One writer at a time: two concurrent `add-token`s would each drop the other's token."""
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)

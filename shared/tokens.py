"""Bearer tokens of the HTTP gateway: the token file, and who a presented token is.

The token file (SHOAL_GATEWAY_TOKENS) holds the SHA-256 of each token, never the token: a leaked file
grants nothing. An admin token may call every route; a tenant token only the routes of its namespaces,
as a tenant's NATS identity may only use `shoal.v1.<its namespace>.>`.

    {"tokens": [{"sha256": "<hex>", "role": "admin" | "tenant", "namespaces": ["ns"], "name": "ci"}]}

`shoal auth add-token` writes it (`add_token`); the gateway reads it (`Tokens`), again whenever it
changes, so a token added or removed takes effect without a restart. While the file cannot be read or
is invalid, no token is accepted at all (fail closed): a file broken while a token was being revoked
must not leave the revoked token working.

A presented token is hashed and compared with every stored hash with `hmac.compare_digest`, one after
the other and always all of them, so the time a check takes tells nothing about how close a guess came
to a stored hash (a token has 256 random bits, so such a guess is hopeless anyway).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from .codec import from_json, to_json
from .errors import InvalidInput, ShoalError, Unavailable
from .files import locked, write_atomic
from .validation import check_namespace

log = logging.getLogger(__name__)

Role = Literal["admin", "tenant"]
TOKEN_PREFIX = "shoal_"
TOKEN_BYTES = 32  # of randomness: 256 bits, far beyond guessing
MAX_TOKEN = 512  # characters of a presented token; longer is not one of ours
MAX_FILE = 4 * 1024 * 1024  # bytes of a token file
FILE_MODE = 0o600
RECHECK = 1.0  # seconds between looks at the file's modification time
SETTING = "SHOAL_GATEWAY_TOKENS"

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
        with path.open("rb") as fh:
            data = fh.read(MAX_FILE + 1)
    except FileNotFoundError:
        raise InvalidInput(f"token file {path} not found: create it with `shoal auth add-token {path} --admin`",
                           code=404, field=SETTING) from None
    if len(data) > MAX_FILE:
        raise InvalidInput(f"token file {path} is larger than {MAX_FILE} bytes", field=SETTING)
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
    # One writer at a time: two concurrent `add-token`s would each drop the other's token.
    with locked(path.with_name(f".{path.name}.lock"), FILE_MODE):
        current = read(path) if path.exists() else TokenFile()
        current.tokens.append(TokenEntry(sha256=digest(token), role=role, namespaces=namespaces, name=name,
                                         created_at=datetime.now(UTC).isoformat(timespec="seconds")))
        write_atomic(path, msgspec.json.format(to_json(current), indent=2) + b"\n", FILE_MODE)
    return token


class Access(msgspec.Struct, frozen=True):
    """What one presented token may do. `key` tells callers apart (the token's hash, never the token)."""

    role: Role
    namespaces: frozenset[str]
    name: str
    key: str = ""

    def namespace(self, ns: str) -> None:
        if self.role != "admin" and ns not in self.namespaces:
            raise Forbidden(f"this token may not use namespace {ns!r}", field="ns")

    def admin(self) -> None:
        if self.role != "admin":
            raise Forbidden("this route needs an admin token")


OPEN = Access("admin", frozenset(), "")  # no token file: every caller is trusted (a local `shoal dev`)


class Tokens:
    """The token file as the gateway checks it, read again when it changes.

    A file that cannot be read or is invalid at start is an error; one that breaks later refuses every
    token (Unavailable, 503) until it is fixed, and the log says why, once per distinct problem.
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self._entries: tuple[TokenEntry, ...] = ()
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self.problem: str | None = None  # why the file is not usable now; None while it is
        if self.path is not None:
            self._load(strict=True)

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def check(self, authorization: str | None) -> Access:
        """The access of an `Authorization` header value; Unauthorized when it grants none, Unavailable
        while the token file is broken."""
        if self.path is None:
            return OPEN
        self._maybe_reload()
        if self.problem is not None:
            raise Unavailable(f"the gateway's token file is unusable, so no token is accepted until it is fixed: "
                              f"{self.problem}", field=SETTING)
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("a bearer token is required: Authorization: Bearer <token>")
        if len(token) > MAX_TOKEN:
            raise Unauthorized("unknown token")
        presented = digest(token).encode()
        found: TokenEntry | None = None
        for entry in self._entries:  # every entry, whatever matched: the time does not depend on which
            if hmac.compare_digest(presented, entry.sha256.encode()) and found is None:
                found = entry
        if found is None:
            raise Unauthorized("unknown token")
        return Access(found.role, frozenset(found.namespaces), found.name, found.sha256)

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
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self._stamp:
                return
            tokens = read(self.path)
        except (ShoalError, OSError) as exc:
            if strict:
                raise
            problem = f"{self.path}: {exc}"
            if problem != self.problem:
                log.error("token file %s is unusable (%s): every request that needs a token is refused (503) "
                          "until it is fixed", self.path, exc)
            self.problem = problem
            self._entries = ()
            self._stamp = None
            return
        self._entries = tuple(tokens.tokens)
        self._stamp = stamp
        if self.problem is not None:
            log.warning("token file %s is usable again: %d token(s)", self.path, len(self._entries))
        elif not strict:
            log.info("token file %s reloaded: %d token(s)", self.path, len(self._entries))
        self.problem = None

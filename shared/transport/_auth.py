"""How a connection proves who it is: seed list, credentials, TLS, and its private reply inbox.

A deployment gives each identity (a service, an operator, a tenant, an edge node) its own NKey, JWT
credentials or user and password; NATS permissions then confine it. One of those permissions is where
it may receive replies: each identity subscribes only to `_INBOX.<its id>.>`, where the id is its NKey
public key (or its user name), so that no identity can read replies meant for another. The client
derives the same id from what it connects with, and uses it as its inbox prefix.
"""

from __future__ import annotations

import base64
import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidInput

SHARED_INBOX = "_INBOX"


@dataclass(frozen=True)
class Credentials:
    """Everything but the URL that a connection needs; every field optional."""

    creds: str = ""  # JWT credentials file
    nkey: str = ""  # NKey seed file
    user: str = ""
    password: str = ""
    tls_ca: str = ""  # CA bundle that signs the servers' certificates
    tls_cert: str = ""  # client certificate (mutual TLS)
    tls_key: str = ""
    inbox_prefix: str = ""  # overrides the derived one

    def identity(self) -> str:
        """The id of the connection's identity (see the module docstring); "" when anonymous."""
        if self.nkey:
            return _nkey_public(self.nkey)
        if self.creds:
            return _creds_public(self.creds)
        return self.user

    def inbox(self) -> str:
        if self.inbox_prefix:
            return self.inbox_prefix
        who = self.identity()
        return f"{SHARED_INBOX}.{who}" if who else SHARED_INBOX

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for the client library's connect."""
        options: dict[str, Any] = {"inbox_prefix": self.inbox().encode()}
        if self.creds:
            options["user_credentials"] = _readable(self.creds, "creds")
        if self.nkey:
            options["nkeys_seed"] = _readable(self.nkey, "nkey")
        if self.user:
            options["user"] = self.user
            options["password"] = self.password
        if self.tls_ca or self.tls_cert:
            options["tls"] = self.tls_context()
        return options

    def tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=_readable(self.tls_ca, "tls_ca") if self.tls_ca else None)
        if self.tls_cert:
            if not self.tls_key:
                raise InvalidInput("a TLS client certificate needs its key (SHOAL_NATS_TLS_KEY)", field="tls_key")
            context.load_cert_chain(_readable(self.tls_cert, "tls_cert"), _readable(self.tls_key, "tls_key"))
        return context


def servers(url: str) -> list[str]:
    """A comma-separated seed list as a list of URLs (whitespace ignored)."""
    found = [u.strip() for u in url.split(",") if u.strip()]
    if not found:
        raise InvalidInput("no NATS URL given", field="nats_url")
    return found


def _readable(path: str, field: str) -> str:
    if not Path(path).is_file():
        raise InvalidInput(f"{path}: no such file", field=field)
    return path


def _nkey_public(path: str) -> str:
    import nkeys

    seed = Path(_readable(path, "nkey")).read_bytes().strip()
    try:
        return nkeys.from_seed(bytearray(seed)).public_key.decode()
    except Exception:
        raise InvalidInput(f"{path} does not hold an NKey seed", field="nkey") from None


def _creds_public(path: str) -> str:
    """The user's public key: the `sub` claim of the JWT in a creds file."""
    text = Path(_readable(path, "creds")).read_text()
    try:
        jwt = text.split("-----BEGIN NATS USER JWT-----", 1)[1].split("------END NATS USER JWT------", 1)[0].strip()
        payload = jwt.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return str(claims["sub"])
    except (IndexError, KeyError, ValueError):
        raise InvalidInput(f"{path} is not a NATS credentials file", field="creds") from None

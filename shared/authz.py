"""Who may publish and subscribe to what: the NATS permissions of every kind of shoal identity.

The rules live here as pure data and functions, so that one source feeds everything that speaks of
them: `shoal auth` renders them into nats-server's `authorization` block (`render_conf`),
docs/SECURITY.md shows them as a table (`markdown_table`, checked by a test) and the tests compare
both with what a real server enforces.

Each identity is an NKey user. Permissions confine it to the subjects its role needs, with three
traps designed out:

- Replies. Every identity receives replies only on its own inbox, `_INBOX.<its public key>.>`; with a
  shared `_INBOX.>` any client could read every other client's replies (pages of executions, submission
  acks).
- Consumers. A client that may create a JetStream consumer may set a push consumer's deliver subject
  to anything, and so have the server send it any stream; so no edge identity may call the consumer
  API except `MSG.NEXT` on its own durable, which the health service creates for it.
- Labels. A node identity may pin its labels: it may then register only with the digest of those
  labels in the subject, so a stolen node seed cannot claim other labels to attract other jobs.

Nothing here grants `$KV` or the rest of `$JS.API` to a tenant or a node: they reach state only
through the services' request-reply API, which checks what they ask.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Literal, get_args

import msgspec

from . import subjects as s
from .errors import InvalidInput, shown
from .subjects import labels_digest  # re-exported: the digest a pinned node's permission names
from .validation import check_labels, check_namespace, check_node_id

__all__ = ["INBOX", "KINDS", "SINGLETONS", "Identity", "Kind", "Permissions", "Registry", "check_name",
           "check_public_key", "inbox", "inbox_prefix", "labels_digest", "markdown_table", "permissions", "render_conf"]

Kind = Literal["service", "admin", "gateway", "tenant", "node", "fleet"]
KINDS: tuple[Kind, ...] = get_args(Kind)
# Kinds with a single identity, named after the kind (`service`, `admin`, `gateway`, `fleet`).
SINGLETONS: tuple[Kind, ...] = ("service", "admin", "gateway", "fleet")

INBOX = "_INBOX"
JS_API = "$JS.API"
PUBLIC_KEY = re.compile(r"^U[A-Z2-7]{55}$")  # an NKey user public key


class Permissions(msgspec.Struct, kw_only=True):
    """What nats-server lets one identity do; an empty list grants nothing."""

    publish_allow: list[str]
    publish_deny: list[str] = msgspec.field(default_factory=list)
    subscribe_allow: list[str] = msgspec.field(default_factory=list)


class Identity(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One key of the registry (`shoal-auth.json`). An identity has several keys only while one is
    being rotated: the old ones are `previous` and stay accepted until revoked."""

    kind: Kind
    name: str
    public_key: str
    labels: dict[str, str] | None = None  # a node's pinned labels; None: not pinned
    created_at: str = ""
    previous: bool = False


class Registry(msgspec.Struct, kw_only=True):
    """Every identity nats-auth.conf is generated from."""

    identities: list[Identity] = msgspec.field(default_factory=list)
    format: int = 1


# --- names and inboxes ---------------------------------------------------------------------------


def check_name(kind: Kind, name: str) -> str:
    """The name of an identity, validated: it becomes a subject token, a consumer name and a file name.
    Validation also refuses the names that would widen a permission: a tenant called `nodes` (it would
    get `shoal.v1.nodes.>`), a node called `fleet-x` (it would own fleet x's consumer of every node's
    assignments)."""
    if kind in SINGLETONS:
        if name != kind:
            raise InvalidInput(f"the {kind} identity is named {kind!r}, not {shown(name)}", field="name")
    elif kind == "tenant":
        check_namespace(name)
    elif kind == "node":
        check_node_id(name)
    else:
        raise InvalidInput(f"unknown identity kind {shown(kind)}; expected one of: {', '.join(KINDS)}", field="kind")
    return name


def check_public_key(public_key: str) -> str:
    if not PUBLIC_KEY.fullmatch(public_key):
        raise InvalidInput(f"{shown(public_key)} is not an NKey user public key (U followed by 55 base32 characters)",
                           field="public_key")
    return public_key


def inbox_prefix(identity: str = "") -> str:
    """The inbox prefix a connection uses: `_INBOX.<identity>`, where the identity is the NKey public key
    (connecting with a seed) or the user name (user and password); plain `_INBOX`, which every
    anonymous client shares, when there is none. Permissions let each identity subscribe only under it."""
    if not identity:
        return INBOX
    if any(c in identity for c in ".*> \t\r\n"):
        raise InvalidInput(f"{shown(identity)} cannot be an inbox token: no '.', '*', '>' or spaces",
                           field="identity")
    return f"{INBOX}.{identity}"


def inbox(identity: str) -> str:
    """Every reply subject of `identity`: what it alone may subscribe to."""
    return f"{inbox_prefix(identity)}.>"


# --- the rules ------------------------------------------------------------------------------------


def permissions(kind: Kind, name: str, public_key: str, pinned_labels: dict[str, str] | None = None) -> Permissions:
    """The permissions of one identity. `pinned_labels` (nodes only) confines registration to exactly
    those labels; None lets the node register with any."""
    check_name(kind, name)
    check_public_key(public_key)
    if pinned_labels is not None:
        if kind != "node":
            raise InvalidInput(f"only a node pins labels, not a {kind}", field="labels")
        check_labels(pinned_labels, "labels")
    digest = "*" if pinned_labels is None else labels_digest(pinned_labels)
    return _rules(kind, name, public_key, digest)


def _rules(kind: Kind, name: str, key: str, digest: str) -> Permissions:
    """The rules themselves, on unchecked tokens (the docs render them with placeholders)."""
    replies = [f"{INBOX}.{key}.>"]  # inbox(key), without its check: the docs pass a placeholder
    if kind == "service":
        return Permissions(publish_allow=[">"], subscribe_allow=[">"])
    if kind == "admin":
        return Permissions(
            publish_allow=[f"{s.API}.>", s.submit("*"), "$SRV.>"],
            publish_deny=[f"{s.NODES_REGISTER}.>", f"{s.FLEETS_PREFIX}.>"],
            subscribe_allow=[f"{s.SUBMITTED_PREFIX}.>", *replies],
        )
    if kind == "gateway":
        # The HTTP gateway: the API and submissions on its callers' behalf (it checks their bearer tokens),
        # and for its event streams, ordered (ephemeral pull) consumers of SHOAL_EVENTS: create, pull, check,
        # delete. No other stream, no bucket, no node protocol, no Services API ping.
        events = s.STREAM_EVENTS
        return Permissions(
            publish_allow=[f"{s.API}.>", s.submit("*"), f"{JS_API}.STREAM.INFO.{events}",
                           f"{JS_API}.CONSUMER.CREATE.{events}", f"{JS_API}.CONSUMER.MSG.NEXT.{events}.*",
                           f"{JS_API}.CONSUMER.INFO.{events}.*", f"{JS_API}.CONSUMER.DELETE.{events}.*"],
            publish_deny=[f"{s.NODES_REGISTER}.>", f"{s.FLEETS_PREFIX}.>"],
            subscribe_allow=[f"{s.SUBMITTED_PREFIX}.>", *replies],
        )
    if kind == "tenant":
        return Permissions(
            publish_allow=[s.submit(name), s.api(name, ">")],
            subscribe_allow=[f"{s.SUBMITTED_PREFIX}.{name}.>", *replies],
        )
    if kind == "node":
        consumer = s.assign_consumer(name)
        return Permissions(
            publish_allow=[s.node_register(name, digest), s.heartbeat(name), s.report(name), s.pull_next(consumer),
                           s.ack(consumer), s.output_of_node(name)],
            subscribe_allow=replies,
        )
    if kind == "fleet":
        return Permissions(
            publish_allow=[f"{s.NODES_REGISTER}.>", s.heartbeat("*"), s.fleet_heartbeat("*"), s.report("*"),
                           s.fleet_open("*"), s.pull_next("*"), s.ack("*"), s.output_of_node("*")],
            subscribe_allow=replies,
        )
    raise InvalidInput(f"unknown identity kind {shown(kind)}", field="kind")


# --- nats-server configuration --------------------------------------------------------------------


def render_conf(identities: Iterable[Identity]) -> str:
    """nats-auth.conf: the `authorization { users: [...] }` block listing every identity.

    Every subject is a quoted string (nats-server's format is JSON-like, and `$`, `>` and `*` are not
    safe bare). There is no `no_auth_user`, so a client with no key is refused. An empty list is refused
    here: nats-server reads `users: []` as no authorization at all and lets anyone in.
    """
    users = list(identities)
    if not users:
        raise InvalidInput("no identity left: nats-server would read an empty users list as no authorization "
                           "and accept anonymous clients", field="identities")
    lines = [
        "# Generated by `shoal auth` from shoal-auth.json: change it with `shoal auth`, not by hand,",
        "# then reload nats-server (nats-server --signal reload). Anonymous clients are refused.",
        "authorization {",
        "  users: [",
    ]
    for ident in users:
        perms = permissions(ident.kind, ident.name, ident.public_key, ident.labels)
        note = f"{ident.kind} {ident.name}" if ident.kind not in SINGLETONS else ident.kind
        if ident.labels is not None:
            note += f", labels pinned (digest {labels_digest(ident.labels)})"
        if ident.previous:
            note += ", previous key (rotated)"
        publish = [f"allow: {_strings(perms.publish_allow)}"]
        if perms.publish_deny:
            publish.append(f"deny: {_strings(perms.publish_deny)}")
        lines += [
            f"    # {note}",
            "    {",
            f"      nkey: {_quote(ident.public_key)}",
            "      permissions: {",
            f"        publish: {{ {', '.join(publish)} }}",
            f"        subscribe: {{ allow: {_strings(perms.subscribe_allow)} }}",
            "      }",
            "    }",
        ]
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def _quote(text: str) -> str:
    return json.dumps(text)


def _strings(items: list[str]) -> str:
    return "[" + ", ".join(_quote(i) for i in items) + "]"


# --- documentation --------------------------------------------------------------------------------

# Each row of the table in docs/SECURITY.md: a title, and the arguments of `_rules` with placeholders.
DOC_ROWS: tuple[tuple[str, Kind, str, str], ...] = (
    ("service", "service", "service", "*"),
    ("admin", "admin", "admin", "*"),
    ("gateway", "gateway", "gateway", "*"),
    ("tenant `<ns>`", "tenant", "<ns>", "*"),
    ("node `<id>`, labels pinned", "node", "<id>", "<digest>"),
    ("node `<id>`, not pinned", "node", "<id>", "*"),
    ("fleet (tests only)", "fleet", "fleet", "*"),
)


def markdown_table() -> str:
    """The permissions of every kind as the Markdown table of docs/SECURITY.md (`<key>` is the
    identity's public key, `<digest>` the `labels_digest` of its pinned labels)."""
    def cell(items: list[str]) -> str:
        return "<br>".join(f"`{i}`" for i in items) or "—"

    rows = ["| Identity | Publish allow | Publish deny | Subscribe allow |", "| --- | --- | --- | --- |"]
    for title, kind, name, digest in DOC_ROWS:
        p = _rules(kind, name, "<key>", digest)
        rows.append(f"| {title} | {cell(p.publish_allow)} | {cell(p.publish_deny)} | {cell(p.subscribe_allow)} |")
    return "\n".join(rows) + "\n"

"""`shoal auth`: NKey identities for a NATS deployment, and the nats-server configuration that confines them.

A directory holds everything: one seed per identity (mode 0600), the registry `shoal-auth.json` (kind,
name, public key and pinned labels of each key; no secrets) and `nats-auth.conf`, which is generated
from the registry by `shared.authz` after every change and included by nats-server.conf. The registry,
not the conf, is the source: a command that fails half-way is repaired by the next one.

    shoal auth init DIR [--tenant NS]... [--node ID]... [--no-fleet] [--force]
    shoal auth add-node DIR ID [--label k=v]... [--relabel]
    shoal auth add-tenant DIR NS
    shoal auth rotate DIR (--node ID | --tenant NS | --identity NAME)
    shoal auth revoke DIR (--node ID | --tenant NS | --identity NAME) [--previous]
    shoal auth list DIR
    shoal auth add-token FILE (--admin | --tenant NS...) [--name N]

Changes take effect when nats-server reloads its configuration (SIGHUP), without a restart.
`add-token` is the HTTP gateway's: it prints a new bearer token once and stores only its hash in FILE
(SHOAL_GATEWAY_TOKENS), which the gateway reads again when it changes.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import nkeys

from shared import authz
from shared.authz import Identity, Kind, Registry
from shared.codec import from_json, to_json
from shared.errors import InvalidInput, ShoalError
from shared.files import write_atomic
from shared.models import DEFAULT_NAMESPACE
from shared.tokens import add_token
from shared.validation import check_labels

REGISTRY = "shoal-auth.json"
CONF = "nats-auth.conf"
LOCK = ".shoal-auth.lock"
SEED_MODE = 0o600
PUBLIC_MODE = 0o644  # the registry and the conf hold public keys only; nats-server must read the conf
SEED_DIR_MODE = 0o700
DIR_MODE = 0o755
SUBDIRS: dict[Kind, str] = {"tenant": "tenants", "node": "nodes"}

EXIT_ERROR = 1
EXIT_USAGE = 2


def add_auth_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `shoal auth ...` on the `shoal` command's subparsers."""
    auth = subparsers.add_parser("auth", help="NKey identities and the nats-server permissions that confine them",
                                 description=(__doc__ or "").split("\n\n")[0])
    sub = auth.add_subparsers(dest="auth_command", required=True, metavar="ACTION")

    init = sub.add_parser("init", help="create DIR: seeds of the service, admin, gateway and fleet identities, "
                                       "the registry and nats-auth.conf")
    init.add_argument("dir", metavar="DIR")
    # Not --namespace: that is the global -n of every command, which `shoal` takes from anywhere on the line.
    init.add_argument("--tenant", action="append", default=[], dest="namespaces", metavar="NS",
                      help="also create a tenant confined to this namespace (repeatable)")
    init.add_argument("--node", action="append", default=[], dest="nodes", metavar="ID",
                      help="also create a node identity, labels not pinned (repeatable)")
    init.add_argument("--no-fleet", action="store_true",
                      help="no fleet identity (it may act as any node: for simulated fleets and tests)")
    init.add_argument("--force", action="store_true",
                      help="replace an existing DIR's identities with new keys (their seeds are deleted)")

    node = sub.add_parser("add-node", help="create a node identity, optionally pinning its labels")
    node.add_argument("dir", metavar="DIR")
    node.add_argument("node_id", metavar="ID")
    node.add_argument("--label", action="append", default=[], dest="labels", metavar="KEY=VALUE",
                      help="pin this label (repeatable): the node may then register with exactly these labels")
    node.add_argument("--relabel", action="store_true",
                      help="change the pinned labels of an existing node (no new key; no --label: unpin)")

    tenant = sub.add_parser("add-tenant", help="create a tenant identity confined to one namespace")
    tenant.add_argument("dir", metavar="DIR")
    tenant.add_argument("tenant_namespace", metavar="NS")  # not `namespace`: shoal -n is one

    rotate = sub.add_parser("rotate", help="give an identity a new key; the old one works until "
                                           "`revoke --previous`")
    rotate.add_argument("dir", metavar="DIR")
    _which(rotate)

    revoke = sub.add_parser("revoke", help="remove an identity (or only its previous keys) and its seed")
    revoke.add_argument("dir", metavar="DIR")
    _which(revoke)
    revoke.add_argument("--previous", action="store_true",
                        help="revoke only the keys replaced by `rotate`, keeping the current one")

    listing = sub.add_parser("list", help="show the identities of DIR")
    listing.add_argument("dir", metavar="DIR")

    token = sub.add_parser("add-token", help="create a bearer token of the HTTP gateway: printed once, its hash "
                                             "stored in FILE (SHOAL_GATEWAY_TOKENS)")
    token.add_argument("file", metavar="FILE")
    role = token.add_mutually_exclusive_group(required=True)
    role.add_argument("--admin", action="store_true", help="every route of every namespace")
    role.add_argument("--tenant", action="append", default=None, dest="token_namespaces", metavar="NS",
                      help="only the routes of this namespace (repeatable)")
    token.add_argument("--name", default="", help="who or what holds it (shown in the file, never secret)")

    page = sub.add_parser("rotate-page-key", help="sign page tokens with a new key now (connects to NATS "
                                                  "as the service identity)")
    page.add_argument("--revoke", action="store_true",
                      help="also delete every older key: every token issued so far is refused (a suspected leak)")
    return auth


def _which(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--node", dest="node_id", metavar="ID")
    group.add_argument("--tenant", dest="tenant", metavar="NS")
    group.add_argument("--identity", dest="identity", choices=authz.SINGLETONS, metavar="NAME",
                       help=f"one of: {', '.join(authz.SINGLETONS)}")


def run(args: argparse.Namespace) -> int:
    """Carry out `shoal auth ACTION`; print what was written and what to do next. Returns the exit code."""
    try:
        _no_namespace(args)
        if args.auth_command == "add-token":
            return add_gateway_token(Path(args.file), admin=args.admin, namespaces=args.token_namespaces or [],
                                     name=args.name)
        directory = Path(args.dir)
        if args.auth_command == "init":
            return init(directory, namespaces=args.namespaces, nodes=args.nodes, fleet=not args.no_fleet,
                        force=args.force)
        if args.auth_command == "list":
            return show(directory)
        with _locked(directory):
            registry = load(directory)
            if args.auth_command == "add-node":
                return add_node(directory, registry, args.node_id, parse_labels(args.labels), relabel=args.relabel)
            if args.auth_command == "add-tenant":
                return add_tenant(directory, registry, args.tenant_namespace)
            kind, name = _target(args)
            if args.auth_command == "rotate":
                return rotate(directory, registry, kind, name)
            if args.auth_command == "revoke":
                return revoke(directory, registry, kind, name, previous=args.previous)
        raise InvalidInput(f"unknown auth action {args.auth_command!r}")
    except ShoalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE if exc.code == 400 else EXIT_ERROR
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _no_namespace(args: argparse.Namespace) -> None:
    """`-n/--namespace` is a global flag, picked from anywhere on the line: `auth init DIR --namespace acme`
    would set it and create no tenant. Say so rather than ignore it."""
    given = getattr(args, "namespace", None)
    if given is not None and given != os.environ.get("SHOAL_NAMESPACE", DEFAULT_NAMESPACE):
        raise InvalidInput("shoal auth does not use -n/--namespace: create tenants with `shoal auth init DIR "
                           "--tenant NS` or `shoal auth add-tenant DIR NS`", field="namespace")


def _target(args: argparse.Namespace) -> tuple[Kind, str]:
    if args.node_id:
        return "node", args.node_id
    if args.tenant:
        return "tenant", args.tenant
    return args.identity, args.identity


# --- actions --------------------------------------------------------------------------------------


def init(directory: Path, *, namespaces: list[str], nodes: list[str], fleet: bool = True,
         force: bool = False) -> int:
    wanted: list[tuple[Kind, str]] = [("service", "service"), ("admin", "admin"), ("gateway", "gateway")]
    wanted += [("fleet", "fleet")] if fleet else []
    wanted += [("tenant", ns) for ns in namespaces] + [("node", n) for n in nodes]
    for kind, name in wanted:
        authz.check_name(kind, name)
    if len(set(wanted)) != len(wanted):
        raise InvalidInput("a namespace or node is given twice")
    if directory.exists() and not directory.is_dir():
        raise InvalidInput(f"{directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise InvalidInput(f"{directory} exists and is not empty: use another DIR, or --force to replace its "
                           "identities with new keys")
    directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    with _locked(directory):
        if force:
            _forget(directory)
        registry = Registry()
        for kind, name in wanted:
            _new_key(directory, registry, kind, name)
        _save(directory, registry)
    _next_steps(directory)
    return 0


def add_node(directory: Path, registry: Registry, node_id: str, labels: dict[str, str] | None, *,
             relabel: bool = False) -> int:
    authz.check_name("node", node_id)
    if labels is not None:
        check_labels(labels, "labels")
    keys = _keys(registry, "node", node_id)
    if relabel:
        if not keys:
            raise InvalidInput(f"no node {node_id!r} in {directory}: add it without --relabel", code=404)
        for i, ident in enumerate(registry.identities):
            if ident.kind == "node" and ident.name == node_id:
                registry.identities[i] = msgspec.structs.replace(ident, labels=labels)
        _save(directory, registry)
        _say_labels(node_id, labels)
    else:
        if keys:
            raise InvalidInput(f"node {node_id!r} already has an identity: `shoal auth rotate --node {node_id}` "
                               "gives it a new key, `add-node --relabel` changes its labels", code=409)
        _new_key(directory, registry, "node", node_id, labels)
        _save(directory, registry)
        _say_labels(node_id, labels)
        print(f"copy {directory / seed_path('node', node_id)} to the node (mode 0600) and start its agent with "
              f"SHOAL_NATS_NKEY=<that file> shoal agent --node-id {node_id}"
              + "".join(f" --label {k}={v}" for k, v in sorted((labels or {}).items())))
    _next_steps(directory)
    return 0


def add_tenant(directory: Path, registry: Registry, namespace: str) -> int:
    authz.check_name("tenant", namespace)
    if _keys(registry, "tenant", namespace):
        raise InvalidInput(f"tenant {namespace!r} already has an identity: `shoal auth rotate --tenant "
                           f"{namespace}` gives it a new key", code=409)
    _new_key(directory, registry, "tenant", namespace)
    _save(directory, registry)
    _next_steps(directory)
    return 0


def rotate(directory: Path, registry: Registry, kind: Kind, name: str) -> int:
    """A new key for an identity, written to its usual seed file; its old keys become `previous` and
    stay accepted until `revoke --previous`, so that clients can move to the new seed without a gap.
    A missing service, admin or fleet identity is created."""
    authz.check_name(kind, name)
    keys = _keys(registry, kind, name)
    if not keys and kind not in authz.SINGLETONS:
        raise InvalidInput(f"no {kind} {name!r} in {directory}: add it with `shoal auth add-{kind}`", code=404)
    labels = keys[-1].labels if keys else None
    registry.identities = [msgspec.structs.replace(i, previous=True) if i in keys else i for i in registry.identities]
    _new_key(directory, registry, kind, name, labels)
    _save(directory, registry)
    if keys:
        old = "the previous keys" if len(keys) > 1 else "the previous key"
        print(f"{old} of {kind} {name} keep working: once every client uses the new seed, run "
              f"`shoal auth revoke {directory} {_flag(kind, name)} --previous` and reload")
    _next_steps(directory)
    return 0


def revoke(directory: Path, registry: Registry, kind: Kind, name: str, *, previous: bool = False) -> int:
    keys = _keys(registry, kind, name)
    gone = [k for k in keys if k.previous] if previous else keys
    if not gone:
        what = f"no previous key of {kind} {name!r}" if previous else f"no {kind} {name!r}"
        raise InvalidInput(f"{what} in {directory}", code=404)
    registry.identities = [i for i in registry.identities if i not in gone]
    _save(directory, registry)  # refuses to leave no identity at all
    if not previous:
        seed = directory / seed_path(kind, name)
        if seed.exists():
            seed.unlink()
            print(f"deleted {seed}")
    for key in gone:
        print(f"revoked {kind} {name} key {key.public_key}")
    print("clients using a revoked key are disconnected by the reload, and refused from then on")
    _next_steps(directory)
    return 0


def add_gateway_token(path: Path, *, admin: bool, namespaces: list[str], name: str) -> int:
    """`shoal auth add-token`: the token alone on stdout (so `TOKEN=$(shoal auth add-token ...)` works),
    what was done on stderr."""
    token = add_token(path, role="admin" if admin else "tenant", namespaces=namespaces, name=name)
    print(token)
    scope = "admin" if admin else f"tenant of {', '.join(namespaces)}"
    print(f"stored the hash of a new {scope} token in {path}; the token is shown only now: send it as "
          "`Authorization: Bearer <token>`", file=sys.stderr)
    return 0


def show(directory: Path) -> int:
    registry = load(directory)
    for ident in registry.identities:
        labels = "not pinned" if ident.labels is None else (
            ",".join(f"{k}={v}" for k, v in sorted(ident.labels.items())) or "pinned: none")
        extra = f"  labels {labels}" if ident.kind == "node" else ""
        state = "previous" if ident.previous else str(directory / seed_path(ident.kind, ident.name))
        print(f"{ident.kind:8} {ident.name:24} {ident.public_key}  {state}{extra}")
    return 0


# --- files ----------------------------------------------------------------------------------------


def seed_path(kind: Kind, name: str) -> Path:
    """Where an identity's current seed lives, relative to DIR: `service.nk`, `tenants/<ns>.nk`, `nodes/<id>.nk`."""
    sub = SUBDIRS.get(kind)
    return Path(sub, f"{name}.nk") if sub else Path(f"{name}.nk")


def load(directory: Path) -> Registry:
    path = directory / REGISTRY
    if not path.is_file():
        raise InvalidInput(f"{path} not found: create DIR with `shoal auth init {directory}`", code=404)
    return from_json(path.read_bytes(), Registry, max_bytes=None)


def parse_labels(pairs: list[str]) -> dict[str, str] | None:
    """`--label k=v ...` as a dict; None when no label is given (the node's labels are not pinned)."""
    if not pairs:
        return None
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise InvalidInput(f"label {pair!r} is not KEY=VALUE", field="labels")
        if key in labels and labels[key] != value:
            raise InvalidInput(f"label {key!r} is given twice", field="labels")
        labels[key] = value
    check_labels(labels, "labels")
    return labels


def generate_seed() -> tuple[bytes, str]:
    """A new NKey user seed (`SU...`) and its public key (`U...`)."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    pair = nkeys.from_seed(bytearray(seed))
    public = pair.public_key.decode()
    pair.wipe()
    return seed, public


def _new_key(directory: Path, registry: Registry, kind: Kind, name: str, labels: dict[str, str] | None = None) -> None:
    """Write a new seed for (kind, name) and add its key to the registry (saved by the caller)."""
    seed, public = generate_seed()
    path = directory / seed_path(kind, name)
    if path.parent != directory:
        path.parent.mkdir(mode=SEED_DIR_MODE, exist_ok=True)
    write_atomic(path, seed + b"\n", SEED_MODE)
    registry.identities.append(Identity(kind=kind, name=name, public_key=public, labels=labels,
                                        created_at=datetime.now(UTC).isoformat(timespec="seconds")))
    print(f"wrote {path} (seed of {kind} {name}, public key {public})")


def _save(directory: Path, registry: Registry) -> None:
    """Write the registry, then nats-auth.conf generated from it (refused if it would list no one)."""
    conf = authz.render_conf(registry.identities)
    write_atomic(directory / REGISTRY, msgspec.json.format(to_json(registry), indent=2) + b"\n", PUBLIC_MODE)
    write_atomic(directory / CONF, conf.encode(), PUBLIC_MODE)
    print(f"wrote {directory / REGISTRY} and {directory / CONF} ({len(registry.identities)} keys)")


def _forget(directory: Path) -> None:
    """`init --force`: delete the seeds of the identities DIR held (only those: DIR may hold other files)."""
    paths = {Path(f"{kind}.nk") for kind in authz.SINGLETONS}
    with contextlib.suppress(ShoalError, OSError):
        paths |= {seed_path(i.kind, i.name) for i in load(directory).identities}
    for sub in SUBDIRS.values():
        paths |= {p.relative_to(directory) for p in (directory / sub).glob("*.nk")}
    for rel in sorted(paths):
        path = directory / rel
        if path.is_file():
            path.unlink()
            print(f"deleted {path}")


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One `shoal auth` at a time per DIR: two concurrent changes would each drop the other's key."""
    if not directory.is_dir():
        raise InvalidInput(f"{directory} is not a directory: create it with `shoal auth init {directory}`", code=404)
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _keys(registry: Registry, kind: Kind, name: str) -> list[Identity]:
    return [i for i in registry.identities if i.kind == kind and i.name == name]


def _flag(kind: Kind, name: str) -> str:
    return {"node": f"--node {name}", "tenant": f"--tenant {name}"}.get(kind, f"--identity {name}")


def _say_labels(node_id: str, labels: dict[str, str] | None) -> None:
    if labels is None:
        print(f"node {node_id} may register with any labels (not pinned)")
    else:
        print(f"node {node_id} may register only with the labels "
              f"{','.join(f'{k}={v}' for k, v in sorted(labels.items())) or '(none)'} "
              f"(digest {authz.labels_digest(labels)})")


def _next_steps(directory: Path) -> None:
    conf = (directory / CONF).absolute()
    rel = os.path.relpath(conf)
    print(f"\nnats-server.conf must include it, by a path relative to nats-server.conf's own directory "
          f"(nats-server refuses absolute include paths); from a nats-server.conf in {Path.cwd()}:\n"
          f"    include {json.dumps(rel)}\n"
          "apply every change without a restart: nats-server --signal reload  (or: kill -HUP <pid of nats-server>)")

"""NATS permissions of shoal's identities (shared.authz) and the files `shoal auth` writes.

Three layers: the rules as data (each identity's lists exactly as the design states them), the files
(modes, registry, conf regenerated on every change) and a real nats-server that includes the
generated nats-auth.conf and enforces it: allowed subjects go through, forbidden ones come back as
`Permissions Violation` errors, anonymous and revoked clients are refused, and a reload applies
changes without a restart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from services.cli.auth import CONF, REGISTRY, add_auth_parser, load, run
from services.cli.main import hoist_global_flags
from shared import authz
from shared import subjects as s
from shared.authz import Identity, Kind, Permissions, labels_digest, permissions
from shared.codec import to_canonical_json
from shared.errors import InvalidInput
from shared.natsserver import binary, free_port

KEY = "U" + "A" * 55
OTHER = "U" + "B" * 55
ROOT = Path(__file__).resolve().parents[2]


# --- the rules ------------------------------------------------------------------------------------


def test_service_may_do_everything() -> None:
    assert permissions("service", "service", KEY) == Permissions(publish_allow=[">"], subscribe_allow=[">"])


def test_admin_rules() -> None:
    assert permissions("admin", "admin", KEY) == Permissions(
        publish_allow=["shoal.v1.>", "shoal.submit.*", "$SRV.>"],
        publish_deny=["shoal.v1.nodes.register.>", "shoal.v1.fleets.>"],
        subscribe_allow=["shoal.submitted.>", f"_INBOX.{KEY}.>"],
    )


def test_gateway_rules() -> None:
    """The API and submissions, and ordered consumers of SHOAL_EVENTS only: no bucket, no other stream, no
    node protocol, no Services API ping."""
    assert permissions("gateway", "gateway", KEY) == Permissions(
        publish_allow=["shoal.v1.>", "shoal.submit.*", "$JS.API.STREAM.INFO.SHOAL_EVENTS",
                       "$JS.API.CONSUMER.CREATE.SHOAL_EVENTS", "$JS.API.CONSUMER.MSG.NEXT.SHOAL_EVENTS.*",
                       "$JS.API.CONSUMER.INFO.SHOAL_EVENTS.*", "$JS.API.CONSUMER.DELETE.SHOAL_EVENTS.*"],
        publish_deny=["shoal.v1.nodes.register.>", "shoal.v1.fleets.>"],
        subscribe_allow=["shoal.submitted.>", f"_INBOX.{KEY}.>"],
    )
    p = permissions("gateway", "gateway", KEY)
    assert all(x.endswith((f".{s.STREAM_EVENTS}", f".{s.STREAM_EVENTS}.*"))
               for x in p.publish_allow if x.startswith("$JS"))
    assert not [x for x in p.publish_allow + p.subscribe_allow
                if x.startswith(("$KV", "$SRV", s.REPORT_PREFIX, "shoal.heartbeat", "_INBOX.>"))]


def test_tenant_is_confined_to_its_namespace() -> None:
    assert permissions("tenant", "acme", KEY) == Permissions(
        publish_allow=["shoal.submit.acme", "shoal.v1.acme.>"],
        subscribe_allow=["shoal.submitted.acme.>", f"_INBOX.{KEY}.>"],
    )


def test_node_rules_pinned_and_not() -> None:
    tail = ["shoal.heartbeat.edge-1", "shoal.report.edge-1",
            "$JS.API.CONSUMER.MSG.NEXT.SHOAL_ASSIGNMENTS.assign-edge-1", "$JS.ACK.SHOAL_ASSIGNMENTS.assign-edge-1.>",
            "shoal.output.edge-1.>"]
    labels = {"zone": "a", "tier": "edge"}
    assert permissions("node", "edge-1", KEY, labels) == Permissions(
        publish_allow=[f"shoal.v1.nodes.register.edge-1.{labels_digest(labels)}", *tail],
        subscribe_allow=[f"_INBOX.{KEY}.>"],
    )
    assert permissions("node", "edge-1", KEY) == Permissions(
        publish_allow=["shoal.v1.nodes.register.edge-1.*", *tail], subscribe_allow=[f"_INBOX.{KEY}.>"])
    # Pinned to no labels is not the same as not pinned.
    assert permissions("node", "edge-1", KEY, {}).publish_allow[0] == "shoal.v1.nodes.register.edge-1.44136fa355b3678a"


def test_fleet_rules() -> None:
    assert permissions("fleet", "fleet", KEY) == Permissions(
        publish_allow=["shoal.v1.nodes.register.>", "shoal.heartbeat.*", "shoal.fleetbeat.*", "shoal.report.*",
                       "shoal.v1.fleets.open.*",
                       "$JS.API.CONSUMER.MSG.NEXT.SHOAL_ASSIGNMENTS.*", "$JS.ACK.SHOAL_ASSIGNMENTS.*.>",
                       "shoal.output.*.>"],
        subscribe_allow=[f"_INBOX.{KEY}.>"],
    )


def test_no_edge_identity_reaches_kv_or_the_jetstream_api_beyond_its_pull() -> None:
    identities: list[tuple[Kind, str]] = [("tenant", "acme"), ("node", "edge-1"), ("fleet", "fleet"),
                                           ("admin", "admin")]
    for kind, name in identities:
        p = permissions(kind, name, KEY)
        granted = p.publish_allow + p.subscribe_allow
        assert not [x for x in granted if x.startswith("$KV")]
        assert [x for x in granted if x.startswith("$JS.API")] in ([], [s.pull_next(s.assign_consumer(name))],
                                                                   [s.pull_next("*")])
        assert ">" not in granted and "_INBOX.>" not in granted


def test_digest_is_stable_and_order_independent() -> None:
    assert labels_digest is s.labels_digest  # one definition: the agent's, the health service's, the rules'
    assert labels_digest({}) == "44136fa355b3678a"  # sha256(b"{}")
    a = labels_digest({"zone": "a", "tier": "edge", "region": "us-east"})
    b = labels_digest({"region": "us-east", "tier": "edge", "zone": "a"})
    assert a == b == labels_digest(dict(sorted({"tier": "edge", "zone": "a", "region": "us-east"}.items())))
    assert len(a) == 16 and int(a, 16) >= 0
    assert a != labels_digest({"zone": "b", "tier": "edge", "region": "us-east"})
    # The same bytes as the project's canonical JSON, so another implementation cannot drift.
    labels = {"b": "2", "a": "1", "k8s.io/x": ""}
    import hashlib
    assert labels_digest(labels) == hashlib.sha256(to_canonical_json(labels)).hexdigest()[:16]


def test_inbox_prefix() -> None:
    assert authz.inbox_prefix(KEY) == f"_INBOX.{KEY}"
    assert authz.inbox_prefix("alice") == "_INBOX.alice"
    assert authz.inbox_prefix() == "_INBOX"
    for bad in ("a.b", "a*", "a>", "a b"):
        with pytest.raises(InvalidInput):
            authz.inbox_prefix(bad)


@pytest.mark.parametrize(("kind", "name", "labels"), [
    ("tenant", "nodes", None),  # would be granted shoal.v1.nodes.> (registration of any node)
    ("tenant", "deadletters", None),
    ("tenant", "fleets", None),
    ("tenant", "Acme", None),
    ("tenant", "a.b", None),
    ("tenant", "*", None),
    ("node", "a.b", None),
    ("node", ">", None),
    ("node", "fleet-x", None),  # would own assign-fleet-x, fleet x's consumer of every assignment
    ("admin", "root", None),
    ("tenant", "acme", {"a": "b"}),  # only nodes pin labels
    ("node", "edge-1", {"bad key!": "x"}),
])
def test_bad_identities_are_refused(kind: Kind, name: str, labels: dict[str, str] | None) -> None:
    with pytest.raises(InvalidInput):
        permissions(kind, name, KEY, labels)


def test_public_key_must_be_a_user_key() -> None:
    for bad in ("", "U" * 10, "N" + "A" * 55, KEY + ".>", KEY[:-1] + "*"):
        with pytest.raises(InvalidInput):
            permissions("tenant", "acme", bad)


def test_every_cluster_wide_api_token_is_reserved() -> None:
    """Every `shoal.v1.X...` subject that is not namespaced names an X no tenant may be called."""
    constants = [v for k, v in vars(s).items() if k.isupper() and isinstance(v, str) and v.startswith(s.API + ".")]
    assert constants
    for subject in constants + [s.FLEETS_OPEN_PREFIX]:
        assert subject.split(".")[2] in s.RESERVED_NAMESPACES, subject


def test_subjects_agree_with_shared_subjects() -> None:
    node = permissions("node", "edge-1", KEY).publish_allow
    assert s.report("edge-1") in node
    assert node[0].startswith(s.NODES_REGISTER + ".edge-1.")
    tenant = permissions("tenant", "acme", KEY).publish_allow
    assert s.submit("acme") in tenant and s.api("acme", ">") in tenant
    assert s.service_ping(s.SERVICE_QUERY).startswith("$SRV.")


def test_conf_quotes_every_subject_and_refuses_no_users() -> None:
    conf = authz.render_conf([Identity(kind="node", name="edge-1", public_key=KEY, labels={"zone": "a"}),
                              Identity(kind="service", name="service", public_key=OTHER)])
    assert f'"shoal.v1.nodes.register.edge-1.{labels_digest({"zone": "a"})}"' in conf
    assert '"$JS.ACK.SHOAL_ASSIGNMENTS.assign-edge-1.>"' in conf and 'allow: [">"]' in conf
    assert "no_auth_user" not in conf
    # nats-server reads `users: []` as no authorization at all: anyone could connect.
    with pytest.raises(InvalidInput):
        authz.render_conf([])


def test_security_doc_table_is_the_code() -> None:
    doc = (ROOT / "docs" / "SECURITY.md").read_text()
    assert authz.markdown_table() in doc


# --- the files ------------------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    """`shoal auth ...` parsed as `shoal` parses it: global flags such as -n are taken from anywhere."""
    parser = argparse.ArgumentParser(prog="shoal")
    parser.add_argument("-n", "--namespace", default=os.environ.get("SHOAL_NAMESPACE", "default"))
    add_auth_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(hoist_global_flags(["auth", *argv]))


def auth(*argv: str) -> int:
    return run(parse(*argv))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def identities(directory: Path) -> dict[tuple[str, str], list[Identity]]:
    found: dict[tuple[str, str], list[Identity]] = {}
    for ident in load(directory).identities:
        found.setdefault((ident.kind, ident.name), []).append(ident)
    return found


@pytest.fixture
def umask_open() -> Iterator[None]:
    """A permissive umask, to show that seeds are 0600 whatever it is."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_init_writes_every_file_with_its_mode(tmp_path: Path, umask_open: None) -> None:
    d = tmp_path / "auth"
    assert auth("init", str(d), "--tenant", "acme", "--tenant", "beta", "--node", "edge-1") == 0
    seeds = [d / "service.nk", d / "admin.nk", d / "gateway.nk", d / "fleet.nk", d / "tenants/acme.nk",
             d / "tenants/beta.nk",
             d / "nodes/edge-1.nk"]
    for seed in seeds:
        assert mode(seed) == 0o600, seed
        assert seed.read_text().startswith("SU") and len(seed.read_text().strip()) == 58
    assert mode(d / "tenants") == mode(d / "nodes") == 0o700
    assert mode(d / REGISTRY) == mode(d / CONF) == 0o644
    assert not list(d.rglob("*.tmp"))
    reg = identities(d)
    assert set(reg) == {("service", "service"), ("admin", "admin"), ("gateway", "gateway"), ("fleet", "fleet"),
                        ("tenant", "acme"),
                        ("tenant", "beta"), ("node", "edge-1")}
    conf = (d / CONF).read_text()
    for (kind, name), [ident] in reg.items():
        assert f'nkey: "{ident.public_key}"' in conf
        assert ident.public_key == seed_public(d / {"tenant": "tenants/", "node": "nodes/"}.get(kind, "") / f"{name}.nk")
    assert conf == authz.render_conf(load(d).identities)


def seed_public(path: Path) -> str:
    import nkeys

    return nkeys.from_seed(bytearray(path.read_bytes().strip())).public_key.decode()


def test_parser_keeps_every_argument_apart_from_the_global_flags(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    args = parse("init", "DIR", "--tenant", "acme", "--tenant", "beta", "--node", "e1", "--force")
    assert (args.auth_command, args.dir, args.namespaces, args.nodes, args.force, args.no_fleet) == \
        ("init", "DIR", ["acme", "beta"], ["e1"], True, False)
    assert args.namespace == "default"
    args = parse("add-node", "DIR", "e1", "--label", "a=b", "--label", "c=d")
    assert (args.node_id, args.labels, args.relabel) == ("e1", ["a=b", "c=d"], False)
    assert parse("add-tenant", "DIR", "acme").tenant_namespace == "acme"
    args = parse("revoke", "DIR", "--identity", "fleet", "--previous")
    assert (args.identity, args.node_id, args.tenant, args.previous) == ("fleet", None, None, True)
    with pytest.raises(SystemExit):
        parse("revoke", "DIR", "--node", "a", "--tenant", "b")  # one identity at a time
    with pytest.raises(SystemExit):
        parse("rotate", "DIR", "--identity", "root")
    # --namespace is shoal's global -n: it would create no tenant, so it is refused, not ignored.
    assert auth("init", str(tmp_path / "a"), "--namespace", "acme") == 2
    assert "--tenant" in capsys.readouterr().err and not (tmp_path / "a").exists()


def test_init_without_fleet(tmp_path: Path) -> None:
    assert auth("init", str(tmp_path / "a"), "--no-fleet") == 0
    assert ("fleet", "fleet") not in identities(tmp_path / "a")
    assert not (tmp_path / "a" / "fleet.nk").exists()


def test_init_refuses_an_existing_dir_unless_forced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "auth"
    assert auth("init", str(d), "--node", "edge-1") == 0
    before = identities(d)
    (d / "notes.txt").write_text("mine")
    assert auth("init", str(d)) == 2
    assert "--force" in capsys.readouterr().err
    assert identities(d) == before
    assert auth("init", str(d), "--force", "--tenant", "acme") == 0
    after = identities(d)
    assert after[("service", "service")][0].public_key != before[("service", "service")][0].public_key
    assert ("node", "edge-1") not in after and not (d / "nodes/edge-1.nk").exists()  # old seeds deleted
    assert (d / "notes.txt").read_text() == "mine"  # nothing else touched
    assert auth("init", str(tmp_path / "empty-dir-is-fine")) == 0


def test_add_node_pins_labels_as_the_digest_token(tmp_path: Path) -> None:
    d = tmp_path / "auth"
    auth("init", str(d))
    assert auth("add-node", str(d), "edge-1", "--label", "zone=a", "--label", "tier=edge") == 0
    assert auth("add-node", str(d), "edge-2") == 0
    digest = labels_digest({"tier": "edge", "zone": "a"})
    conf = (d / CONF).read_text()
    assert f'"shoal.v1.nodes.register.edge-1.{digest}"' in conf
    assert '"shoal.v1.nodes.register.edge-2.*"' in conf
    assert identities(d)[("node", "edge-1")][0].labels == {"tier": "edge", "zone": "a"}
    assert mode(d / "nodes/edge-1.nk") == 0o600
    # Relabel keeps the key; no --label unpins.
    key = identities(d)[("node", "edge-1")][0].public_key
    assert auth("add-node", str(d), "edge-1", "--label", "zone=b", "--relabel") == 0
    assert f'"shoal.v1.nodes.register.edge-1.{labels_digest({"zone": "b"})}"' in (d / CONF).read_text()
    assert auth("add-node", str(d), "edge-1", "--relabel") == 0
    assert '"shoal.v1.nodes.register.edge-1.*"' in (d / CONF).read_text()
    assert identities(d)[("node", "edge-1")][0].public_key == key


@pytest.mark.parametrize("argv", [
    ["add-node", "edge-1"],  # exists
    ["add-node", "bad.id"],
    ["add-node", "fleet-x"],
    ["add-node", "edge-9", "--label", "novalue"],
    ["add-node", "edge-9", "--label", "bad key=x"],
    ["add-node", "edge-9", "--relabel"],  # does not exist
    ["add-tenant", "Acme"],
    ["add-tenant", "nodes"],
    ["add-tenant", "acme"],  # exists
    ["revoke", "--tenant", "nobody"],
    ["revoke", "--tenant", "acme", "--previous"],  # no previous key
])
def test_bad_changes_are_refused_and_change_nothing(tmp_path: Path, argv: list[str]) -> None:
    d = tmp_path / "auth"
    auth("init", str(d), "--tenant", "acme", "--node", "edge-1")
    conf, registry = (d / CONF).read_bytes(), (d / REGISTRY).read_bytes()
    assert auth(argv[0], str(d), *argv[1:]) != 0
    assert (d / CONF).read_bytes() == conf and (d / REGISTRY).read_bytes() == registry


def test_add_and_revoke_regenerate_the_conf(tmp_path: Path) -> None:
    d = tmp_path / "auth"
    auth("init", str(d))
    assert auth("add-tenant", str(d), "acme") == 0
    [acme] = identities(d)[("tenant", "acme")]
    assert '"shoal.v1.acme.>"' in (d / CONF).read_text() and acme.public_key in (d / CONF).read_text()
    assert auth("revoke", str(d), "--tenant", "acme") == 0
    assert acme.public_key not in (d / CONF).read_text() and "acme" not in (d / CONF).read_text()
    assert not (d / "tenants/acme.nk").exists()
    fleet = identities(d)[("fleet", "fleet")][0].public_key
    assert auth("revoke", str(d), "--identity", "fleet") == 0
    assert fleet not in (d / CONF).read_text() and not (d / "fleet.nk").exists()
    assert (d / CONF).read_text() == authz.render_conf(load(d).identities)


def test_rotate_keeps_the_old_key_until_revoke_previous(tmp_path: Path) -> None:
    d = tmp_path / "auth"
    auth("init", str(d))
    auth("add-node", str(d), "edge-1", "--label", "zone=a")
    [old] = identities(d)[("node", "edge-1")]
    assert auth("rotate", str(d), "--node", "edge-1") == 0
    old_now, new = identities(d)[("node", "edge-1")]
    assert old_now.public_key == old.public_key and old_now.previous and not new.previous
    assert new.labels == {"zone": "a"}  # pinning survives rotation
    assert seed_public(d / "nodes/edge-1.nk") == new.public_key
    conf = (d / CONF).read_text()
    assert old.public_key in conf and new.public_key in conf
    assert auth("revoke", str(d), "--node", "edge-1", "--previous") == 0
    assert [i.public_key for i in identities(d)[("node", "edge-1")]] == [new.public_key]
    assert old.public_key not in (d / CONF).read_text() and (d / "nodes/edge-1.nk").exists()


def test_the_last_identity_cannot_be_revoked(tmp_path: Path) -> None:
    d = tmp_path / "auth"
    auth("init", str(d), "--no-fleet")
    assert auth("revoke", str(d), "--identity", "admin") == 0
    assert auth("revoke", str(d), "--identity", "gateway") == 0
    assert auth("revoke", str(d), "--identity", "service") == 2  # the conf would let anyone in
    assert ("service", "service") in identities(d) and (d / "service.nk").exists()


def test_generated_conf_is_valid_for_nats_server(tmp_path: Path) -> None:
    d = tmp_path / "auth"
    auth("init", str(d), "--tenant", "acme", "--node", "edge-1")
    auth("add-node", str(d), "edge-2", "--label", "zone=a")
    auth("rotate", str(d), "--tenant", "acme")
    (tmp_path / "server.conf").write_text('listen: 127.0.0.1:-1\ninclude "auth/nats-auth.conf"\n')
    out = subprocess.run([binary(), "-t", "-c", str(tmp_path / "server.conf")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# --- a real nats-server enforcing the generated conf ---------------------------------------------


class Server:
    """nats-server with JetStream whose config includes DIR/nats-auth.conf, as an operator would set it up."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        conf = root / "nats-server.conf"
        conf.write_text(f"listen: 127.0.0.1:{self.port}\n"
                        f"jetstream {{ store_dir: {json.dumps(str(root / 'js'))} }}\n"
                        'include "auth/nats-auth.conf"\n')
        self.log = open(root / "nats.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([binary(), "-c", str(conf)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            assert self.proc.poll() is None, (root / "nats.log").read_text()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                assert time.monotonic() < deadline, "nats-server did not listen"
                time.sleep(0.05)

    def reload(self) -> None:
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


WAIT = 5.0  # seconds to wait for what the server should do
# A refused connect: the server's -ERR 'Authorization Violation', or the socket it closed under the client.
REFUSED = (nats.errors.Error, OSError)


async def settle(nc: NATS) -> None:
    """Return once the server has processed everything `nc` sent. One flush is not enough: nats-py writes
    its PING straight to the socket, ahead of commands still queued for its flusher task, so the PONG
    can come back before the server has seen a SUB or PUB sent just before. The first flush lets the
    flusher run; the second PING goes out after it."""
    await nc.flush(timeout=WAIT)
    await nc.flush(timeout=WAIT)


class Conn:
    """A connection as one identity, collecting the errors the server sends it.

    A refused publish or subscription comes back as `-ERR 'Permissions Violation ...'`, which nats-py
    hands (lowercased) to the error callback, on its own time: it may arrive after the PONG of a flush,
    so a refusal is waited for, and what is allowed is shown by its effect (a message received).
    """

    def __init__(self, nc: NATS, errors: list[Exception]) -> None:
        self.nc, self.errors = nc, errors

    def violations(self) -> list[str]:
        return [str(e).lower() for e in self.errors if "permissions violation" in str(e).lower()]

    def _refusal_of(self, action: str, subject: str) -> bool:
        what = "publish" if action == "pub" else "subscription"
        return any(f'{what} to "{subject.lower()}"' in v for v in self.violations())

    async def refused(self, action: str, subject: str) -> bool:
        """Publish on (`pub`) or subscribe to (`sub`) `subject`; True once the server has refused it."""
        assert not self._refusal_of(action, subject), f"use each forbidden subject once: {subject}"
        if action == "pub":
            await self.nc.publish(subject, b"x")
        else:
            await self.nc.subscribe(subject)
        await settle(self.nc)
        deadline = time.monotonic() + WAIT
        while not self._refusal_of(action, subject) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return self._refusal_of(action, subject)

    async def publishes(self, subject: str, tap: Tap) -> bool:
        """True when a message published on `subject` reaches a subscriber (and is not refused)."""
        await self.nc.publish(subject, b"x")
        return await tap.saw(subject) and not self._refusal_of("pub", subject)

    async def receives(self, subject: str, sample: str, publisher: Conn) -> bool:
        """True when a subscription to `subject` gets what `publisher` sends on `sample`."""
        sub = await self.nc.subscribe(subject)
        await settle(self.nc)
        await publisher.nc.publish(sample, b"x")
        try:
            return (await sub.next_msg(timeout=WAIT)).subject == sample
        except nats.errors.TimeoutError:
            return False


class Tap:
    """Every subject the service identity (`subscribe >`) sees: proof that a publish went through."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    async def start(self, conn: Conn) -> Tap:
        async def on_message(msg) -> None:
            self.seen.add(msg.subject)

        await conn.nc.subscribe(">", cb=on_message)
        await settle(conn.nc)
        return self

    async def saw(self, subject: str) -> bool:
        deadline = time.monotonic() + WAIT
        while subject not in self.seen and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return subject in self.seen


async def connect(url: str, seed: Path | None, inbox: str | None = None) -> Conn:
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    options: dict = {"error_cb": on_error, "allow_reconnect": False, "connect_timeout": 3}
    if seed is not None:
        options["nkeys_seed"] = str(seed)
        options["inbox_prefix"] = authz.inbox_prefix(seed_public(seed)) if inbox is None else inbox
    nc = NATS()
    try:
        await nc.connect(url, **options)
    except BaseException:
        await nc.close()  # a refused connect leaves its socket open otherwise
        raise
    return Conn(nc, errors)


async def eventually_connect(url: str, seed: Path) -> Conn:
    """Connect once a reload has taken effect."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return await connect(url, seed)
        except REFUSED:
            assert time.monotonic() < deadline, f"{seed} still refused"
            await asyncio.sleep(0.1)


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[tuple[Server, Path]]:
    d = tmp_path / "auth"
    assert auth("init", str(d), "--tenant", "acme", "--tenant", "beta", "--node", "edge-2") == 0
    assert auth("add-node", str(d), "edge-1", "--label", "zone=a") == 0
    server = Server(tmp_path)
    try:
        yield server, d
    finally:
        server.stop()


@pytest.mark.nats
async def test_server_enforces_each_identity(stack: tuple[Server, Path]) -> None:
    server, d = stack
    svc = await connect(server.url, d / "service.nk")
    tap = await Tap().start(svc)
    js = svc.nc.jetstream()
    await js.add_stream(StreamConfig(name="SHOAL_ASSIGNMENTS", subjects=["shoal.assign.>"]))
    await js.add_stream(StreamConfig(name="SHOAL_REPORTS", subjects=["shoal.report.>"]))
    for node in ("edge-1", "edge-2"):
        await js.add_consumer("SHOAL_ASSIGNMENTS", ConsumerConfig(
            durable_name=s.assign_consumer(node), filter_subject=f"shoal.assign.{node}.>",
            ack_policy=AckPolicy.EXPLICIT))
        await js.publish(f"shoal.assign.{node}.acme.job.exec-1", node.encode())

    async def answer(msg) -> None:
        if msg.reply:
            await msg.respond(b"ok:" + msg.subject.encode())

    await svc.nc.subscribe("shoal.v1.>", cb=answer)
    await settle(svc.nc)

    # -- a node, labels pinned to zone=a --
    node = await connect(server.url, d / "nodes/edge-1.nk")
    good = s.node_register("edge-1", labels_digest({"zone": "a"}))
    assert (await node.nc.request(good, b"{}", timeout=WAIT)).data == b"ok:" + good.encode()
    assert await node.refused("pub", s.node_register("edge-1", labels_digest({"zone": "b"})))  # other labels
    assert await node.refused("pub", s.node_register("edge-2", labels_digest({"zone": "a"})))  # other node
    assert await node.publishes("shoal.heartbeat.edge-1", tap)
    assert await node.refused("pub", "shoal.heartbeat.edge-2")
    ack = await node.nc.jetstream().publish("shoal.report.edge-1", b"report")  # the ack comes to its own inbox
    assert ack.stream == "SHOAL_REPORTS"
    assert await node.refused("pub", "shoal.report.edge-2")
    # It pulls from its own consumer, which the service created, and acks (nats-py's pull subscription
    # needs nothing more: no consumer info, no create).
    pull = await node.nc.jetstream().pull_subscribe_bind(s.assign_consumer("edge-1"), stream="SHOAL_ASSIGNMENTS")
    [msg] = await pull.fetch(1, timeout=WAIT)
    assert msg.data == b"edge-1" and msg.reply.startswith("$JS.ACK.SHOAL_ASSIGNMENTS.assign-edge-1.")
    await msg.ack_sync()
    info = await js.consumer_info("SHOAL_ASSIGNMENTS", s.assign_consumer("edge-1"))
    assert info.num_ack_pending == 0 and info.delivered.stream_seq == 1
    assert await node.refused("pub", s.pull_next(s.assign_consumer("edge-2")))
    assert await node.refused("pub", "$JS.ACK.SHOAL_ASSIGNMENTS.assign-edge-2.1.2.1.0.0")
    # No consumer of its own making (a push consumer's deliver subject could be anything), no stream, no KV.
    for subject in ("$JS.API.CONSUMER.CREATE.SHOAL_ASSIGNMENTS.mine", "$JS.API.CONSUMER.DURABLE.CREATE.SHOAL_ASSIGNMENTS.mine",
                    "$JS.API.CONSUMER.INFO.SHOAL_ASSIGNMENTS.assign-edge-1", "$JS.API.STREAM.INFO.SHOAL_ASSIGNMENTS",
                    "$KV.shoal_nodes.edge-1", "shoal.v1.acme.jobs.list", "shoal.v1.nodes.list"):
        assert await node.refused("pub", subject), subject
    for subject in ("shoal.assign.>", "_INBOX.>", "shoal.heartbeat.edge-2"):
        assert await node.refused("sub", subject), subject
    assert node.nc.is_connected  # a violation refuses one operation; the connection stays

    # -- a tenant --
    acme = await connect(server.url, d / "tenants/acme.nk")
    reply = await acme.nc.request("shoal.v1.acme.executions.list", b"{}", timeout=WAIT)
    assert reply.data == b"ok:shoal.v1.acme.executions.list"
    assert await acme.publishes("shoal.submit.acme", tap)
    assert await acme.receives("shoal.submitted.acme.>", "shoal.submitted.acme.sub-1", svc)
    for subject in ("shoal.submit.beta", "shoal.v1.beta.executions.list", "shoal.v1.nodes.list",
                    "shoal.v1.nodes.register.edge-1.0000000000000000", "shoal.v1.deadletters.list",
                    "shoal.report.edge-1", "shoal.heartbeat.edge-1", "$JS.API.STREAM.NAMES", "$KV.shoal_jobs.acme.x",
                    "$SRV.PING"):
        assert await acme.refused("pub", subject), subject
    beta_key = seed_public(d / "tenants/beta.nk")
    for subject in ("_INBOX.>", f"_INBOX.{beta_key}.>", f"_INBOX.{seed_public(d / 'admin.nk')}.*",
                    "shoal.submitted.beta.>", "shoal.submitted.>", ">"):
        assert await acme.refused("sub", subject), subject
    # With the shared inbox prefix a tenant gets no replies at all: its reply subscription is refused.
    shared_inbox = await connect(server.url, d / "tenants/acme.nk", inbox=authz.INBOX)
    with pytest.raises(nats.errors.TimeoutError):
        await shared_inbox.nc.request("shoal.v1.acme.jobs.list", b"{}", timeout=1)
    assert shared_inbox.violations()

    # -- the admin --
    admin = await connect(server.url, d / "admin.nk")
    assert (await admin.nc.request(s.NODES_LIST, b"{}", timeout=WAIT)).data == b"ok:" + s.NODES_LIST.encode()
    for subject in ("shoal.submit.beta", "shoal.v1.deadletters.list", "$SRV.PING"):
        assert await admin.publishes(subject, tap), subject
    assert await admin.receives("shoal.submitted.>", "shoal.submitted.beta.sub-2", svc)
    for subject in ("shoal.v1.nodes.register.edge-1.x", "shoal.v1.fleets.open.f1", "shoal.report.edge-1",
                    "shoal.heartbeat.edge-1", "$JS.API.STREAM.NAMES"):
        assert await admin.refused("pub", subject), subject
    assert await admin.refused("sub", "_INBOX.>")

    # -- the gateway: the API, submissions and ordered consumers of SHOAL_EVENTS; nothing else --
    await js.add_stream(StreamConfig(name=s.STREAM_EVENTS, subjects=["shoal.events.>"]))
    await js.publish("shoal.events.rollout.0.acme.job", b"event")
    gateway = await connect(server.url, d / "gateway.nk")
    assert (await gateway.nc.request("shoal.v1.beta.jobs.list", b"{}", timeout=WAIT)).data.startswith(b"ok:")
    assert await gateway.publishes("shoal.submit.acme", tap)
    assert await gateway.receives("shoal.submitted.>", "shoal.submitted.acme.sub-3", svc)
    gjs = gateway.nc.jetstream()
    assert (await gjs.stream_info(s.STREAM_EVENTS)).state.last_seq == 1
    made = await gjs.add_consumer(s.STREAM_EVENTS, ConsumerConfig(ack_policy=AckPolicy.NONE, mem_storage=True,
                                                                  filter_subject="shoal.events.rollout.>"))
    events = await gjs.pull_subscribe_bind(made.name, stream=s.STREAM_EVENTS)
    [event] = await events.fetch(1, timeout=WAIT)
    assert event.data == b"event"
    await gjs.consumer_info(s.STREAM_EVENTS, made.name)
    assert await gjs.delete_consumer(s.STREAM_EVENTS, made.name)
    for subject in ("shoal.report.edge-1", "shoal.heartbeat.edge-1", "shoal.v1.nodes.register.edge-1.x",
                    "$KV.shoal_executions.acme.j.edge-1.e", "$JS.API.STREAM.INFO.SHOAL_ASSIGNMENTS",
                    "$JS.API.CONSUMER.CREATE.SHOAL_ASSIGNMENTS",
                    "$JS.API.CONSUMER.MSG.NEXT.SHOAL_ASSIGNMENTS.assign-edge-1",
                    "$JS.API.DIRECT.GET.KV_shoal_config", "$JS.API.STREAM.NAMES", "$SRV.PING"):
        assert await gateway.refused("pub", subject), subject
    for subject in ("_INBOX.>", "shoal.report.>", "shoal.assign.>"):
        assert await gateway.refused("sub", subject), subject

    # -- the fleet acts for any node, but creates no consumer either --
    fleet = await connect(server.url, d / "fleet.nk")
    for subject in ("shoal.v1.nodes.register.sim-0001.abc", "shoal.heartbeat.sim-0001", "shoal.report.sim-0001",
                    "shoal.v1.fleets.open.f1", s.pull_next(s.fleet_consumer("f1"))):
        assert await fleet.publishes(subject, tap), subject
    for subject in ("$JS.API.CONSUMER.CREATE.SHOAL_ASSIGNMENTS.x", "shoal.v1.acme.jobs.list", "shoal.submit.acme"):
        assert await fleet.refused("pub", subject), subject

    assert not svc.violations()
    for conn in (svc, node, acme, shared_inbox, admin, gateway, fleet):
        await conn.nc.close()


@pytest.mark.nats
async def test_a_node_ships_output_under_its_own_id_only(stack: tuple[Server, Path]) -> None:
    """Job output: a node stores chunks in SHOAL_OUTPUT on its own `shoal.output.<id>.>` subjects only; the
    fleet for any of its nodes; tenants and the admin read output through the API, never write it."""
    server, d = stack
    svc = await connect(server.url, d / "service.nk")
    tap = await Tap().start(svc)
    await svc.nc.jetstream().add_stream(StreamConfig(name=s.STREAM_OUTPUT, subjects=[s.output("*", "*", "*", "*")]))

    node = await connect(server.url, d / "nodes/edge-1.nk")
    ack = await node.nc.jetstream().publish(s.output("edge-1", "acme", "job-1", "exec-1"), b"chunk")
    assert ack.stream == s.STREAM_OUTPUT  # stored, and the ack came back to its own inbox
    assert await node.publishes(s.output("edge-1", "beta", "job-2", "exec-2"), tap)
    assert await node.refused("pub", s.output("edge-2", "acme", "job-1", "exec-1"))  # another node's
    assert await node.refused("pub", "shoal.output.edge-1")  # not an output subject of its own: no tokens after it
    assert await node.refused("sub", s.output("*", "*", "*", "*"))  # nor may it read anybody's

    fleet = await connect(server.url, d / "fleet.nk")
    assert await fleet.publishes(s.output("sim-0001", "acme", "job-1", "exec-3"), tap)
    acme = await connect(server.url, d / "tenants/acme.nk")
    assert await acme.refused("pub", s.output("edge-1", "acme", "job-1", "exec-4"))
    admin = await connect(server.url, d / "admin.nk")
    assert await admin.refused("pub", s.output("edge-1", "acme", "job-1", "exec-5"))

    assert not svc.violations()
    for conn in (svc, node, fleet, acme, admin):
        await conn.nc.close()


@pytest.mark.nats
async def test_anonymous_and_unknown_keys_are_refused(stack: tuple[Server, Path], tmp_path: Path) -> None:
    server, _ = stack
    with pytest.raises(REFUSED):
        await connect(server.url, None)
    from services.cli.auth import generate_seed

    seed, _ = generate_seed()
    stranger = tmp_path / "stranger.nk"
    stranger.write_bytes(seed)
    with pytest.raises(REFUSED):
        await connect(server.url, stranger)


@pytest.mark.nats
async def test_reload_applies_revoke_and_add_without_restart(stack: tuple[Server, Path], tmp_path: Path) -> None:
    server, d = stack
    pid = server.proc.pid
    kept = tmp_path / "edge-2.nk"
    kept.write_bytes((d / "nodes/edge-2.nk").read_bytes())  # what the edge machine still holds
    node = await connect(server.url, kept)
    svc = await connect(server.url, d / "service.nk")
    pinned = await connect(server.url, d / "nodes/edge-1.nk")  # pinned to zone=a
    assert auth("revoke", str(d), "--node", "edge-2") == 0
    assert auth("add-tenant", str(d), "gamma") == 0
    assert auth("add-node", str(d), "edge-1", "--label", "zone=b", "--relabel") == 0
    server.reload()

    deadline = time.monotonic() + 10
    while not node.nc.is_closed:  # the server drops the revoked client on reload
        assert time.monotonic() < deadline, "revoked client still connected"
        await asyncio.sleep(0.05)
    with pytest.raises(REFUSED):
        await connect(server.url, kept)
    gamma = await eventually_connect(server.url, d / "tenants/gamma.nk")
    tap = await Tap().start(svc)
    assert await gamma.publishes("shoal.submit.gamma", tap)
    assert await gamma.refused("pub", "shoal.submit.acme")
    # A connected client gets its new permissions at the reload, without reconnecting.
    assert await pinned.publishes(s.node_register("edge-1", labels_digest({"zone": "b"})), tap)
    assert await pinned.refused("pub", s.node_register("edge-1", labels_digest({"zone": "a"})))
    assert pinned.nc.stats["reconnects"] == 0
    # Nobody else was disturbed, and it is the same server process.
    assert svc.nc.is_connected and await svc.publishes("shoal.anything", tap)
    assert server.proc.poll() is None and server.proc.pid == pid
    for conn in (gamma, pinned, svc):
        await conn.nc.close()


@pytest.mark.nats
async def test_reload_applies_a_rotation(stack: tuple[Server, Path], tmp_path: Path) -> None:
    server, d = stack
    old = tmp_path / "old.nk"
    old.write_bytes((d / "tenants/acme.nk").read_bytes())
    assert auth("rotate", str(d), "--tenant", "acme") == 0
    server.reload()
    after = await eventually_connect(server.url, d / "tenants/acme.nk")
    before = await connect(server.url, old)  # both keys work during the rotation
    svc = await connect(server.url, d / "service.nk")
    assert await after.publishes("shoal.submit.acme", await Tap().start(svc))
    assert auth("revoke", str(d), "--tenant", "acme", "--previous") == 0
    server.reload()
    deadline = time.monotonic() + 10
    while not before.nc.is_closed:
        assert time.monotonic() < deadline, "the previous key still connected"
        await asyncio.sleep(0.05)
    assert after.nc.is_connected
    await after.nc.close()
    await svc.nc.close()


# --- files the CLI and the gateway share ----------------------------------------------------------


def test_write_atomic_creates_with_its_mode_and_leaves_no_temporary_file(tmp_path: Path, umask_open: None) -> None:
    from shared.files import write_atomic

    target = tmp_path / "seed.nk"
    write_atomic(target, b"one\n", 0o600)
    write_atomic(target, b"two\n", 0o600)
    assert target.read_bytes() == b"two\n" and mode(target) == 0o600
    # A replacement that fails (the target is a directory) leaves the target and no temporary file.
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "inside").write_text("x")
    with pytest.raises(OSError):
        write_atomic(tmp_path / "dir", b"data", 0o600)
    assert (tmp_path / "dir" / "inside").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "seed.nk"]


def test_the_cli_reaches_the_token_file_through_shared_not_the_gateway() -> None:
    """Services never import each other: `shoal auth add-token` and `shoal dev --auth` use shared/tokens.py."""
    for path in ("services/cli/auth.py", "services/cli/stack.py", "services/cli/stackcmd.py"):
        assert "services.gateway" not in (ROOT / path).read_text(), path


def test_tokens_are_checked_against_every_stored_hash(tmp_path: Path) -> None:
    from shared.tokens import Forbidden, Tokens, Unauthorized, add_token

    file = tmp_path / "tokens.json"
    admin = add_token(file, role="admin", name="ops")
    tenant = add_token(file, role="tenant", namespaces=["acme"], name="ci")
    tokens = Tokens(file)
    assert tokens.check(f"Bearer {admin}").role == "admin"
    access = tokens.check(f"bearer  {tenant} ")
    assert access.role == "tenant" and access.namespaces == {"acme"} and access.key and tenant not in access.key
    access.namespace("acme")
    with pytest.raises(Forbidden):
        access.namespace("beta")
    for header in (None, "", f"Basic {admin}", "Bearer shoal_nope", f"Bearer {admin}x", "Bearer " + "x" * 600):
        with pytest.raises(Unauthorized):
            tokens.check(header)

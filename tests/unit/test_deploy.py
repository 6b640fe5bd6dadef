"""The deploy files, checked against the code: the one-node container stack (deploy/Dockerfile,
deploy/nats-server.conf, docker-compose.yml) and the clustered deployment of docs/DEPLOY.md (the 3-node
NATS configuration in deploy/cluster, docker-compose.cluster.yml, the Kubernetes manifests in deploy/k8s,
the systemd units in deploy/systemd).

No Docker engine or Kubernetes runs in CI, so these tests check what can go stale without one: that each
file parses, that every command it runs is a real `shoal` command line (renaming a subcommand or flag
breaks them), that every SHOAL_* variable it sets is one shoal reads, that the processes point at the
nodes, seeds and certificates that exist, that nats-server accepts each configuration, and that the
cluster configuration, started on localhost, forms a 3-node cluster that runs JetStream with three
replicas and refuses anonymous clients and foreign routes. With a Docker engine, `docker compose
config` validates the compose files against compose's schema.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.cli.main import build_parser
from shared.natsserver import binary, free_port

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
NATS_CONF = REPO / "deploy" / "nats-server.conf"
NATS_SERVER = Path(sys.executable).parent / "nats-server"

SERVED = {"scheduler", "rollout", "health", "query"}
NATS_URL = "nats://nats:4222"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), "compose file has no services map"
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def argv(value: Any) -> list[str]:
    """A compose command/entrypoint (list or shell-style string) as an argument list."""
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    assert isinstance(value, list), f"expected a list or string, got {value!r}"
    return [str(v) for v in value]


def runs_shoal(service: dict[str, Any]) -> bool:
    """True when the container keeps the image's default entrypoint, `shoal`."""
    entrypoint = argv(service.get("entrypoint"))
    return not entrypoint or entrypoint == ["shoal"]


def shoal_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services.items() if runs_shoal(svc)}


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def strict_parser() -> argparse.ArgumentParser:
    """The shoal parser without prefix matching: a renamed flag must not still parse as an abbreviation."""
    parser = build_parser()
    pending = [parser]
    while pending:
        p = pending.pop()
        p.allow_abbrev = False
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                pending.extend(action.choices.values())
    return parser


def parse_shoal(name: str, command: list[str]) -> argparse.Namespace:
    try:
        return strict_parser().parse_args(command)
    except SystemExit as exc:  # argparse's way to reject a command line; its message is on stderr
        code = exc.code
    pytest.fail(f"service {name!r}: `shoal {shlex.join(command)}` is not a valid shoal command line "
                f"(argparse exit {code}; its message is in the captured stderr)")


def volume_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each volume entry, short ("src:dst[:ro]") or long syntax."""
    mounts = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, str):
            parts = entry.split(":")
            assert len(parts) >= 2, f"volume {entry!r} has no target"
            mounts.append((parts[0], parts[1]))
        else:
            mounts.append((str(entry.get("source", "")), str(entry["target"])))
    return mounts


def nats_config_path(nats: dict[str, Any]) -> str:
    args = argv(nats.get("entrypoint")) + argv(nats.get("command"))
    for flag in ("-c", "--config"):
        if flag in args:
            return args[args.index(flag) + 1]
    pytest.fail(f"nats service does not pass a config file: {args}")


# --------------------------------------------------------------------------------------------------
# docker-compose.yml
# --------------------------------------------------------------------------------------------------


def test_compose_has_the_stack(services: dict[str, dict[str, Any]]) -> None:
    missing = {"nats", "scheduler", "rollout", "health", "query"} - services.keys()
    assert not missing, f"compose file lacks services: {sorted(missing)}"
    agents = [n for n, s in shoal_services(services).items() if argv(s.get("command"))[:1] == ["agent"]]
    assert len(agents) >= 2, f"expected at least two agents, found {agents}"


def test_every_shoal_command_is_a_real_cli_command(services: dict[str, dict[str, Any]]) -> None:
    shoal = shoal_services(services)
    assert set(shoal) >= {"scheduler", "rollout", "health", "query"}
    for name, svc in shoal.items():
        command = argv(svc.get("command"))
        assert command, f"service {name!r} runs the image default (`shoal --help`), which exits at once"
        parse_shoal(name, command)


def test_serve_commands_cover_the_four_services(services: dict[str, dict[str, Any]]) -> None:
    served: dict[str, str] = {}
    for name, svc in shoal_services(services).items():
        args = parse_shoal(name, argv(svc.get("command")))
        if args.command == "serve" and args.service != "gateway":
            assert args.service in SERVED
            served[args.service] = name
    assert set(served) == SERVED, f"services not run by any container: {sorted(SERVED - set(served))}"
    # The query view lives on a volume, not in the container's writable layer.
    query = services[served["query"]]
    db = parse_shoal(served["query"], argv(query.get("command"))).db
    assert db, "query service should name its SQLite file with --db"
    targets = [target for _, target in volume_mounts(query)]
    assert any(db.startswith(t.rstrip("/") + "/") for t in targets), f"--db {db} is not on a volume {targets}"


def test_the_gateway_without_tokens_is_insecure_on_purpose_and_published_on_loopback_only(
        services: dict[str, dict[str, Any]]) -> None:
    """This stack has no authentication: its gateway must say --insecure to listen on its container's
    addresses (else it refuses to start), and the host publishes it on loopback only."""
    (name,) = [n for n, svc in shoal_services(services).items() if argv(svc.get("command"))[:2] == ["serve", "gateway"]]
    gateway = services[name]
    args = parse_shoal(name, argv(gateway.get("command")))
    assert args.insecure and args.host == "0.0.0.0", args
    assert "SHOAL_GATEWAY_TOKENS" not in environment(gateway)
    ports = [str(p) for p in gateway.get("ports") or []]
    assert ports and all(p.startswith("127.0.0.1:") and p.endswith(f":{args.port}") for p in ports), ports


def test_agents_have_distinct_node_ids_and_their_own_volume(services: dict[str, dict[str, Any]]) -> None:
    node_ids: dict[str, str] = {}
    for name, svc in shoal_services(services).items():
        args = parse_shoal(name, argv(svc.get("command")))
        if args.command != "agent":
            continue
        assert args.node_id, f"agent {name!r} must pass --node-id (the container's host name changes on recreate)"
        assert any(a == "--node-id" or a.startswith("--node-id=") for a in argv(svc.get("command"))), name
        assert args.node_id not in node_ids, f"agents {node_ids[args.node_id]!r} and {name!r} share a node id"
        node_ids[args.node_id] = name
        assert all("=" in label for label in args.label), f"agent {name!r}: labels must be KEY=VALUE"
        targets = [t for _, t in volume_mounts(svc)]
        assert any(args.work_dir == t or args.work_dir.startswith(t.rstrip("/") + "/") for t in targets), (
            f"agent {name!r}: --work-dir {args.work_dir} is not on a volume {targets}")
    assert len(node_ids) >= 2


def test_every_shoal_service_points_at_the_nats_service(services: dict[str, dict[str, Any]]) -> None:
    assert "nats" in services
    for name, svc in shoal_services(services).items():
        url = environment(svc).get("SHOAL_NATS_URL")
        assert url, f"service {name!r} does not set SHOAL_NATS_URL"
        parsed = urllib.parse.urlparse(url)
        assert (parsed.scheme, parsed.hostname, parsed.port) == ("nats", "nats", 4222), (
            f"service {name!r}: SHOAL_NATS_URL={url!r}, expected {NATS_URL}")
        depends = svc.get("depends_on") or {}
        assert "nats" in depends, f"service {name!r} should depend on nats"
        if isinstance(depends, dict):
            assert depends["nats"].get("condition") == "service_healthy", f"{name!r} should wait for nats healthy"


def test_one_image_built_from_the_dockerfile(services: dict[str, dict[str, Any]]) -> None:
    built = {name: svc["build"] for name, svc in services.items() if svc.get("build")}
    assert built, "no service builds the image"
    for name, build in built.items():
        build = {"context": build} if isinstance(build, str) else build
        context = (REPO / build.get("context", ".")).resolve()
        assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE, name
    images = {svc.get("image") for svc in services.values()}
    assert images == {"shoal:dev"}, f"every service should run the shoal:dev image, found {images}"


def test_nats_runs_nats_server_with_the_mounted_config(services: dict[str, dict[str, Any]]) -> None:
    nats = services["nats"]
    entrypoint = argv(nats.get("entrypoint"))
    assert entrypoint and Path(entrypoint[0]).name == "nats-server", f"nats entrypoint is {entrypoint}"
    config = nats_config_path(nats)
    sources = {target: source for source, target in volume_mounts(nats)}
    assert config in sources, f"{config} is not mounted into the nats container ({sorted(sources)})"
    local = (REPO / sources[config]).resolve()
    assert local == NATS_CONF, f"nats mounts {local}, expected {NATS_CONF}"
    text = local.read_text()
    assert "jetstream" in text
    # JetStream's store must be on a volume, or streams and buckets vanish with the container.
    store = re.search(r"store_dir\s*[:=]\s*\"?([^\s\"}]+)", text)
    assert store, "nats-server.conf sets no jetstream store_dir"
    assert any(store.group(1).startswith(t.rstrip("/") + "/") for t in sources), (
        f"store_dir {store.group(1)} is not on a volume of the nats service")
    ports = {str(p).split(":")[-1] for p in nats.get("ports") or []}
    assert "4222" in ports


def test_nats_healthcheck_needs_no_wget_or_curl(services: dict[str, dict[str, Any]]) -> None:
    test = services["nats"]["healthcheck"]["test"]
    text = test if isinstance(test, str) else " ".join(test)
    assert "wget" not in text and "curl" not in text, "python:3.11-slim has neither wget nor curl"
    assert "8222" in text and "healthz" in text


# --------------------------------------------------------------------------------------------------
# nats-server.conf with the real binary
# --------------------------------------------------------------------------------------------------


needs_nats_server = pytest.mark.skipif(not NATS_SERVER.exists(), reason=f"no nats-server binary at {NATS_SERVER}")


@needs_nats_server
def test_nats_server_accepts_the_config() -> None:
    # -t only parses and validates: it creates nothing, so /data/jetstream need not exist here.
    result = subprocess.run([str(NATS_SERVER), "-c", str(NATS_CONF), "-t"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"nats-server rejects {NATS_CONF}:\n{result.stdout}{result.stderr}"


def localized_config(tmp_path: Path, client_port: int, http_port: int) -> Path:
    """The deploy config with its ports and store moved somewhere this test may use."""
    text = NATS_CONF.read_text()
    replacements = [
        (r"(?m)^(\s*listen\s*[:=]\s*).*$", rf"\g<1>127.0.0.1:{client_port}"),
        (r"(?m)^(\s*http\s*[:=]\s*).*$", rf"\g<1>127.0.0.1:{http_port}"),
        (r"(?m)^(\s*store_dir\s*[:=]\s*).*$", lambda m: m.group(1) + json.dumps(str(tmp_path / "jetstream"))),
    ]
    for pattern, repl in replacements:
        text, count = re.subn(pattern, repl, text)
        assert count == 1, f"expected one match of {pattern!r} in {NATS_CONF}"
    path = tmp_path / "nats-server.conf"
    path.write_text(text)
    return path


@needs_nats_server
def test_nats_server_runs_the_config_and_passes_the_healthcheck(
        tmp_path: Path, services: dict[str, dict[str, Any]]) -> None:
    """Boot the deploy config (ports and store moved) and run the compose healthcheck against it."""
    client_port = free_port()
    http_port = free_port()
    while http_port == client_port:
        http_port = free_port()
    config = localized_config(tmp_path, client_port, http_port)
    test = services["nats"]["healthcheck"]["test"]
    assert isinstance(test, list) and test[0] == "CMD", "healthcheck should be exec form: [CMD, ...]"
    check = [sys.executable if arg == "python" else arg.replace(":8222/", f":{http_port}/") for arg in test[1:]]
    assert check[0] == sys.executable, f"healthcheck should run python, runs {test[1]!r}"

    with open(tmp_path / "nats.log", "wb") as log:
        proc = subprocess.Popen([str(NATS_SERVER), "-c", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, f"nats-server exited: {(tmp_path / 'nats.log').read_text()}"
            result = subprocess.run(check, capture_output=True, text=True, timeout=15)
            if result.returncode == 0:
                break
            assert time.monotonic() < deadline, f"healthcheck never passed:\n{result.stderr}"
            time.sleep(0.2)
        assert (tmp_path / "jetstream").is_dir(), "JetStream did not use the configured store_dir"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------------------------------
# deploy/Dockerfile
# --------------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    assert not pending, "Dockerfile ends in a line continuation"
    return out


def test_dockerfile_installs_the_project_and_runs_shoal() -> None:
    assert DOCKERFILE.is_file()
    instructions = dockerfile_instructions()
    assert instructions[0][0] in ("FROM", "ARG") and any(
        k == "FROM" and a.startswith("python:3.11") for k, a in instructions), "base should be python:3.11"

    copied = " ".join(a for k, a in instructions if k == "COPY")
    for needed in ("pyproject.toml", "README.md", "shared", "services"):
        assert needed in copied, f"the Dockerfile does not COPY {needed}, which `pip install .` needs"

    installs = [shlex.split(cmd) for k, a in instructions if k == "RUN" for cmd in re.split(r"&&|;", a)]
    assert any(w[:2] == ["pip", "install"] and "." in w[2:] or w[:4] == ["python", "-m", "pip", "install"]
               and "." in w[4:] for w in installs if w), "the Dockerfile should `pip install .`"

    entrypoints = [a for k, a in instructions if k == "ENTRYPOINT"]
    assert entrypoints, "no ENTRYPOINT"
    assert json.loads(entrypoints[-1]) == ["shoal"], f"ENTRYPOINT is {entrypoints[-1]}, expected [\"shoal\"]"
    cmds = [json.loads(a) for k, a in instructions if k == "CMD"]
    if cmds and cmds[-1] != ["--help"]:  # --help is valid but exits through SystemExit(0)
        parse_shoal("Dockerfile CMD", cmds[-1])

    users = [a for k, a in instructions if k == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image should run as a non-root user"
    workdirs = [a for k, a in instructions if k == "WORKDIR"]
    assert workdirs and workdirs[-1] == "/data"


# --------------------------------------------------------------------------------------------------
# With a Docker engine
# --------------------------------------------------------------------------------------------------


def docker_engine() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.docker
def test_docker_compose_config_is_valid() -> None:
    if not docker_engine():
        pytest.skip("no Docker engine")
    result = subprocess.run(["docker", "compose", "config", "-q"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, f"docker compose config rejects docker-compose.yml:\n{result.stderr}"


# ==================================================================================================
# The clustered deployment (docs/DEPLOY.md): deploy/cluster, docker-compose.cluster.yml, deploy/k8s,
# deploy/systemd
# ==================================================================================================

CLUSTER_DIR = REPO / "deploy" / "cluster"
CLUSTER_CONF = CLUSTER_DIR / "nats-cluster.conf"
ROUTES_CONF = CLUSTER_DIR / "routes.conf"
GEN_CERTS = CLUSTER_DIR / "gen-certs.sh"
CLUSTER_COMPOSE = REPO / "docker-compose.cluster.yml"
K8S_DIR = REPO / "deploy" / "k8s"
KUSTOMIZATION = K8S_DIR / "kustomization.yaml"
SYSTEMD_DIR = REPO / "deploy" / "systemd"
DEPLOY_DOC = REPO / "docs" / "DEPLOY.md"

NODES = ("nats-1", "nats-2", "nats-3")  # the compose services and bare hosts of the cluster
CLIENT_PORT, CLUSTER_PORT, MONITOR_PORT = 4222, 6222, 8222
# Where every node finds its files (nats-cluster.conf's layout, the same in compose, k8s and on hosts).
ETC_NATS = "/etc/nats"

# The connection settings of the auth design (its table of env vars), the reference for the deploy
# files until shared/settings.py reads every one of them; test_design_variables_are_read_by_settings
# says which it does not read yet.
DESIGN_VARIABLES = frozenset({
    "SHOAL_NATS_URL", "SHOAL_NATS_CREDS", "SHOAL_NATS_NKEY", "SHOAL_NATS_USER", "SHOAL_NATS_PASSWORD",
    "SHOAL_NATS_TLS_CA", "SHOAL_NATS_TLS_CERT", "SHOAL_NATS_TLS_KEY", "SHOAL_JS_REPLICAS",
})
VARIABLE = re.compile(r"\bSHOAL_[A-Z0-9_]+\b")


def settings_variables() -> set[str]:
    """The SHOAL_* variables shoal reads: shared/settings.py, the CLI's own (SHOAL_NAMESPACE) and the
    gateway's (SHOAL_HTTP_*, SHOAL_GATEWAY_*)."""
    found: set[str] = set()
    for source in (REPO / "shared" / "settings.py", REPO / "services" / "cli" / "main.py",
                   REPO / "services" / "gateway" / "service.py", REPO / "shared" / "tokens.py"):
        found |= set(VARIABLE.findall(source.read_text()))
    return found


def known_variables() -> set[str]:
    return settings_variables() | DESIGN_VARIABLES


# --------------------------------------------------------------------------------------------------
# Command lines the shoal parser may not have yet
# --------------------------------------------------------------------------------------------------

# `shoal serve --ready-file`, `shoal ping` and `shoal auth` belong to the clustered deployment; the files
# use them already. Until services/cli/main.py's parser has one, the commands that need it are listed in
# a skip instead of failing, and every other command is still checked.


def missing_cli_features() -> set[str]:
    parser = build_parser()
    commands: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            commands.update(action.choices)
    missing = {name for name in ("auth", "ping") if name not in commands}
    serve = commands.get("serve")
    if serve is None or "--ready-file" not in serve._option_string_actions:
        missing.add("serve --ready-file")
    return missing


def cli_features_needed(command: list[str]) -> set[str]:
    needed = {command[0]} & {"auth", "ping"} if command else set()
    if command[:1] == ["serve"] and any(a.split("=", 1)[0] == "--ready-file" for a in command):
        needed.add("serve --ready-file")
    return needed


def check_shoal_commands(commands: list[tuple[str, list[str]]]) -> None:
    """Parse every command line (strictly: no abbreviations); skip, naming them, those that need what
    the parser does not have yet."""
    assert commands, "no shoal commands found"
    missing = missing_cli_features()
    waiting = []
    for where, command in commands:
        lacking = cli_features_needed(command) & missing
        if lacking:
            waiting.append(f"{where}: `shoal {shlex.join(command)}` ({', '.join(sorted(lacking))})")
            continue
        parse_shoal(where, command)
    if waiting:
        pytest.skip(f"services/cli/main.py's parser lacks {', '.join(sorted(missing))}, which these use: "
                    + "; ".join(waiting))


def ready_file(command: list[str]) -> str:
    for i, word in enumerate(command):
        if word == "--ready-file" and i + 1 < len(command):
            return command[i + 1]
        if word.startswith("--ready-file="):
            return word.split("=", 1)[1]
    return ""


def option(command: list[str], flag: str) -> list[str]:
    """Every value of `flag` on a command line (`--flag V` or `--flag=V`)."""
    values = []
    for i, word in enumerate(command):
        if word == flag and i + 1 < len(command):
            values.append(command[i + 1])
        elif word.startswith(flag + "="):
            values.append(word.split("=", 1)[1])
    return values


# --------------------------------------------------------------------------------------------------
# nats-server configuration helpers
# --------------------------------------------------------------------------------------------------


def server_name(text: str) -> str:
    found = re.findall(r"(?m)^\s*server_name\s*[:=]\s*\"?([^\s\"]+)", text)
    assert len(found) == 1, f"expected one server_name, found {found}"
    return found[0]


def route_urls(text: str) -> list[tuple[str, int]]:
    return [(host, int(port)) for host, port in re.findall(r"nats-route://([^:/\s,\]]+):(\d+)", text)]


def conf_includes(text: str) -> list[str]:
    return re.findall(r"(?m)^\s*include\s+\"?([^\s\"]+)\"?", text)


def tls_paths(text: str) -> set[str]:
    return set(re.findall(r"(?:cert_file|key_file|ca_file)\s*[:=]\s*\"([^\"]+)\"", text))


def store_dir(text: str) -> str:
    found = re.search(r"store_dir\s*[:=]\s*\"?([^\s\"}]+)", text)
    assert found, "no jetstream store_dir"
    return found.group(1)


def replace_once(text: str, old: str, new: str, what: Path | str) -> str:
    assert text.count(old) == 1, f"expected {old!r} exactly once in {what}"
    return text.replace(old, new)


def under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


# --------------------------------------------------------------------------------------------------
# Certificates and identities for running the configuration in a test
# --------------------------------------------------------------------------------------------------


def make_certificates(directory: Path, server_names: list[str], client: str = "edge-1") -> Path:
    """A CA, a server certificate for `server_names` (serverAuth and clientAuth, as routes need) and a
    client certificate, laid out as nats-cluster.conf expects (`tls/`); returns the tls dir."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    tls = directory / "tls"
    tls.mkdir(parents=True)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def builder(subject: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(name("test CA"))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1)))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (builder(name("test CA"), ca_key)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (tls / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def san(value: str) -> x509.GeneralName:
        try:
            return x509.IPAddress(ipaddress.ip_address(value))
        except ValueError:
            return x509.DNSName(value)

    def leaf(cn: str, sans: list[str], usages: list[x509.ObjectIdentifier]) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        alt = [san(s) for s in sans]
        cert = (builder(name(cn), key).add_extension(x509.SubjectAlternativeName(alt), critical=False)
                .add_extension(x509.ExtendedKeyUsage(usages), critical=False).sign(ca_key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)

    cert, key = leaf(server_names[0], server_names, [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    (tls / "server.pem").write_bytes(cert)
    (tls / "server-key.pem").write_bytes(key)
    cert, key = leaf(client, [client], [ExtendedKeyUsageOID.CLIENT_AUTH])
    (directory / "client.pem").write_bytes(cert)
    (directory / "client-key.pem").write_bytes(key)
    return tls


def make_identities(directory: Path) -> Path:
    """An auth dir holding nats-auth.conf and the service seed: `shoal auth init` once the CLI has it,
    until then a stand-in with one NKey user allowed everything (as the service identity is)."""
    auth = directory / "auth"
    if "auth" not in missing_cli_features():
        result = subprocess.run([sys.executable, "-m", "services.cli", "auth", "init", str(auth)],
                                capture_output=True, text=True, timeout=60, cwd=REPO)
        assert result.returncode == 0, f"shoal auth init failed:\n{result.stdout}{result.stderr}"
        assert (auth / "nats-auth.conf").is_file() and (auth / "service.nk").is_file(), sorted(auth.iterdir())
        return auth
    import nkeys

    auth.mkdir(parents=True)
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    (auth / "service.nk").write_bytes(seed + b"\n")
    (auth / "nats-auth.conf").write_text(
        f'authorization {{ users: [ {{ nkey: "{public}", permissions: {{ publish: ">", subscribe: ">" }} }} ] }}\n')
    return auth


@pytest.fixture(scope="module")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(tls dir, auth dir) for configurations run on localhost."""
    base = tmp_path_factory.mktemp("credentials")
    return make_certificates(base, ["localhost", "127.0.0.1"]), make_identities(base)


def install_node(dest: Path, node_text: str, cluster_text: str, routes_text: str, tls: Path, auth: Path, *,
                 ports: dict[str, int] | None = None, route_ports: dict[str, int] | None = None,
                 verify: bool = False) -> Path:
    """One node's /etc/nats in `dest`, from the deploy files: paths moved into `dest`, and with `ports`
    (client, http, cluster) and `route_ports` (route host -> local port) the node listens on loopback and
    routes to localhost. Returns its nats-server.conf."""
    dest.mkdir(parents=True)
    text = cluster_text.replace(f'"{ETC_NATS}/', f'"{dest}/')
    assert f'"{ETC_NATS}/' not in text and text != cluster_text, f"{CLUSTER_CONF}: TLS paths are not under {ETC_NATS}"
    text = replace_once(text, '"/data/jetstream"', json.dumps(str(dest / "data" / "jetstream")), CLUSTER_CONF)
    if ports:
        text = replace_once(text, f"0.0.0.0:{CLIENT_PORT}", f"127.0.0.1:{ports['client']}", CLUSTER_CONF)
        text = replace_once(text, f"127.0.0.1:{MONITOR_PORT}", f"127.0.0.1:{ports['http']}", CLUSTER_CONF)
        text = replace_once(text, f"0.0.0.0:{CLUSTER_PORT}", f"127.0.0.1:{ports['cluster']}", CLUSTER_CONF)
    if verify:
        text = replace_once(text, "verify: false", "verify: true", CLUSTER_CONF)
    if route_ports is not None:
        def local(match: re.Match[str]) -> str:
            assert match.group(1) in route_ports, f"route to unknown host {match.group(1)}"
            return f"nats-route://localhost:{route_ports[match.group(1)]}"
        routes_text = re.sub(r"nats-route://([^:/\s,\]]+):\d+", local, routes_text)
    (dest / "nats-server.conf").write_text(node_text)
    (dest / "nats-cluster.conf").write_text(text)
    (dest / "routes.conf").write_text(routes_text)
    shutil.copytree(tls, dest / "tls")
    (dest / "auth").mkdir()
    shutil.copy(auth / "nats-auth.conf", dest / "auth" / "nats-auth.conf")
    return dest / "nats-server.conf"


def nats_server_test(config: Path, env: dict[str, str] | None = None) -> None:
    result = subprocess.run([binary(), "-t", "-c", str(config)], capture_output=True, text=True, timeout=30,
                            cwd=config.parent, env={**os.environ, **(env or {})})
    assert result.returncode == 0, f"nats-server -t rejects {config}:\n{result.stdout}{result.stderr}"


def distinct_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


@contextlib.contextmanager
def nats_servers(configs: list[Path]) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Run a nats-server per config (log: nats.log beside it); every one is reaped on the way out."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for config in configs:
            with open(config.parent / "nats.log", "wb") as log:
                procs.append(subprocess.Popen([binary(), "-c", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                              cwd=config.parent))
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def monitor(http_port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{path}", timeout=3) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read() or b"{}")
    except (OSError, ValueError):
        return 0, {}


# --------------------------------------------------------------------------------------------------
# deploy/cluster: the 3-node NATS configuration
# --------------------------------------------------------------------------------------------------


def test_cluster_config_has_what_a_production_cluster_needs() -> None:
    text = CLUSTER_CONF.read_text()
    assert re.search(rf"(?m)^listen:\s*0\.0\.0\.0:{CLIENT_PORT}\s*$", text), "clients: listen on 4222"
    # Monitoring has no authentication: loopback only.
    http = re.findall(r"(?m)^\s*https?(?:_port)?\s*[:=]\s*(\S+)", text)
    assert http == [f"127.0.0.1:{MONITOR_PORT}"], f"monitoring should listen on 127.0.0.1:{MONITOR_PORT}, not {http}"
    assert "0.0.0.0:8222" not in text
    payload = re.findall(r"(?m)^\s*max_payload\s*[:=]\s*(\S+)", text)
    assert payload == ["1MB"], f"max_payload {payload}: shoal bounds its replies to it; the 1MB default is enough"
    cluster = re.search(r"(?ms)^cluster\s*\{(.*?)^\}", text)
    assert cluster, "no cluster block"
    block = cluster.group(1)
    assert re.search(r"(?m)^\s*name\s*[:=]\s*shoal\s*$", block)
    assert re.search(rf"(?m)^\s*listen\s*[:=]\s*0\.0\.0\.0:{CLUSTER_PORT}\s*$", block)
    assert re.search(r"(?m)^\s*no_advertise\s*[:=]\s*true", block), "clients must keep to their seed list"
    # Route authentication: a certificate from the CA that names a route host.
    assert re.search(r"(?m)^\s*verify_cert_and_check_known_urls\s*[:=]\s*true", block), "routes are not authenticated"
    assert "include \"routes.conf\"" in block
    assert tls_paths(block) == {f"{ETC_NATS}/tls/{name}" for name in ("server.pem", "server-key.pem", "ca.pem")}
    # Client TLS with mutual TLS as a one-word switch.
    client_tls = re.search(r"(?ms)^tls\s*\{(.*?)^\}", text)
    assert client_tls and tls_paths(client_tls.group(1)) == tls_paths(block)
    assert re.search(r"(?m)^\s*verify\s*[:=]\s*false\s*$", client_tls.group(1)), (
        "mutual TLS should be a switch: `verify: false` (or true)")
    assert store_dir(text) == "/data/jetstream"
    # The identities `shoal auth` writes, by a relative path (nats-server refuses absolute ones).
    assert conf_includes(text) == ["routes.conf", "auth/nats-auth.conf"]
    assert "no_auth_user" not in text, "anonymous clients must be refused"


def test_each_node_has_its_own_name_and_includes_the_shared_config() -> None:
    names = []
    for node in NODES:
        text = (CLUSTER_DIR / f"{node}.conf").read_text()
        names.append(server_name(text))
        assert conf_includes(text) == ["nats-cluster.conf"], node
    assert names == list(NODES)
    routes = route_urls(ROUTES_CONF.read_text())
    assert sorted(routes) == [(node, CLUSTER_PORT) for node in NODES], f"routes.conf: {routes}"


@needs_nats_server
@pytest.mark.parametrize("verify", [False, True], ids=["tls", "mutual-tls"])
def test_nats_server_accepts_each_node_config(tmp_path: Path, credentials: tuple[Path, Path], verify: bool) -> None:
    tls, auth = credentials
    for node in NODES:
        config = install_node(tmp_path / node, (CLUSTER_DIR / f"{node}.conf").read_text(), CLUSTER_CONF.read_text(),
                              ROUTES_CONF.read_text(), tls, auth, verify=verify)
        nats_server_test(config)


async def jetstream_r3(urls: list[str], ca: Path, seed: Path) -> dict[str, Any]:
    """As the service identity: create a stream with 3 replicas, store a message, wait until both
    followers are current; return where it lives."""
    import nats
    from nats.js.errors import APIError

    context = ssl.create_default_context(cafile=str(ca))
    nc = await nats.connect(servers=urls, tls=context, nkeys_seed=str(seed), connect_timeout=5,
                            max_reconnect_attempts=3)
    try:
        js = nc.jetstream(timeout=5)
        deadline = time.monotonic() + 30
        while True:
            try:
                await js.add_stream(name="DEPLOY_R3", subjects=["deploy.r3"], num_replicas=3)
                break
            except (APIError, asyncio.TimeoutError, nats.errors.NoRespondersError):
                assert time.monotonic() < deadline, "the cluster never accepted an R3 stream"
                await asyncio.sleep(0.5)
        await js.publish("deploy.r3", b"replicated")
        while True:
            info = await js.stream_info("DEPLOY_R3")
            cluster = info.cluster
            if cluster and cluster.leader and len(cluster.replicas or []) == 2 and all(
                    r.current for r in cluster.replicas or []):
                return {"config_replicas": info.config.num_replicas, "messages": info.state.messages,
                        "servers": sorted([cluster.leader, *(r.name for r in cluster.replicas or [])])}
            assert time.monotonic() < deadline, f"replicas never caught up: {cluster}"
            await asyncio.sleep(0.2)
    finally:
        await nc.close()


def anonymous_reply(port: int, ca: Path) -> str:
    """What the server answers a TLS client that connects without credentials."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        info = b""
        while not info.endswith(b"\r\n"):
            chunk = raw.recv(4096)
            assert chunk, "server closed before INFO"
            info += chunk
        assert json.loads(info.split(b" ", 1)[1])["tls_required"] is True, "clients must use TLS"
        context = ssl.create_default_context(cafile=str(ca))
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b'CONNECT {"verbose":false,"pedantic":false,"tls_required":true}\r\nPING\r\n')
            reply = b""
            with contextlib.suppress(OSError):
                while b"\r\n" not in reply:
                    chunk = tls.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
            return reply.decode(errors="replace")


@needs_nats_server
@pytest.mark.timeout(120)
def test_the_three_nodes_form_a_cluster_and_run_jetstream_r3(tmp_path: Path) -> None:
    """deploy/cluster as shipped (TLS, route authentication, NKey users), on localhost: three nodes
    route to each other, an R3 stream lives on all three, anonymous clients are refused, and a server
    whose certificate (from the same CA) names no route host cannot join."""
    tls, auth = make_certificates(tmp_path / "pki", ["localhost", "127.0.0.1"]), make_identities(tmp_path / "ids")
    ports = distinct_ports(len(NODES) * 3 + 3)
    plan = {node: {"client": ports[3 * i], "http": ports[3 * i + 1], "cluster": ports[3 * i + 2]}
            for i, node in enumerate(NODES)}
    route_ports = {node: plan[node]["cluster"] for node in NODES}
    configs = [install_node(tmp_path / node, (CLUSTER_DIR / f"{node}.conf").read_text(), CLUSTER_CONF.read_text(),
                            ROUTES_CONF.read_text(), tls, auth, ports=plan[node], route_ports=route_ports)
               for node in NODES]

    with nats_servers(configs) as procs:
        deadline = time.monotonic() + 60
        for node, proc in zip(NODES, procs, strict=True):
            while monitor(plan[node]["http"], "/healthz")[0] != 200:
                assert proc.poll() is None, f"{node} exited:\n{(tmp_path / node / 'nats.log').read_text()}"
                assert time.monotonic() < deadline, (
                    f"{node} never healthy:\n{(tmp_path / node / 'nats.log').read_text()}")
                time.sleep(0.2)
        for node in NODES:
            _, routez = monitor(plan[node]["http"], "/routez")
            peers = {route.get("remote_name") for route in routez.get("routes", [])}
            assert peers == set(NODES) - {node}, f"{node} routes to {peers}"
            _, jsz = monitor(plan[node]["http"], "/jsz")
            assert jsz.get("meta_cluster", {}).get("cluster_size") == len(NODES), jsz.get("meta_cluster")

        urls = [f"tls://localhost:{plan[node]['client']}" for node in NODES]
        placed = asyncio.run(jetstream_r3(urls, tls / "ca.pem", auth / "service.nk"))
        assert placed == {"config_replicas": 3, "messages": 1, "servers": sorted(NODES)}

        reply = anonymous_reply(plan["nats-1"]["client"], tls / "ca.pem")
        assert "Authorization Violation" in reply, f"an anonymous client got {reply!r}"

        # A server with a client certificate from the same CA tries to route to nats-1.
        rogue = tmp_path / "rogue"
        rogue.mkdir()
        rogue_client, rogue_http, rogue_cluster = ports[-3:]
        (rogue / "nats-server.conf").write_text(
            f"server_name: rogue\nlisten: 127.0.0.1:{rogue_client}\nhttp: 127.0.0.1:{rogue_http}\n"
            f"cluster {{\n  name: shoal\n  listen: 127.0.0.1:{rogue_cluster}\n"
            f"  tls {{ cert_file: {json.dumps(str(tmp_path / 'pki' / 'client.pem'))}, "
            f"key_file: {json.dumps(str(tmp_path / 'pki' / 'client-key.pem'))}, "
            f"ca_file: {json.dumps(str(tls / 'ca.pem'))}, timeout: 2 }}\n"
            f"  routes: [ nats-route://localhost:{route_ports['nats-1']} ]\n}}\n")
        with nats_servers([rogue / "nats-server.conf"]):
            deadline = time.monotonic() + 20
            while "Authorization Violation" not in (rogue / "nats.log").read_text():
                _, routez = monitor(plan["nats-1"]["http"], "/routez")
                assert "rogue" not in {route.get("remote_name") for route in routez.get("routes", [])}, (
                    "a server whose certificate names no route host joined the cluster")
                assert time.monotonic() < deadline, (
                    f"the rogue route was not refused:\n{(rogue / 'nats.log').read_text()}")
                time.sleep(0.2)
            _, routez = monitor(plan["nats-1"]["http"], "/routez")
            assert "rogue" not in {route.get("remote_name") for route in routez.get("routes", [])}
            assert monitor(rogue_http, "/routez")[1].get("num_routes") == 0

        for node, proc in zip(NODES, procs, strict=True):
            assert proc.poll() is None, f"{node} exited:\n{(tmp_path / node / 'nats.log').read_text()}"


def gen_certs_names(text: str, out_dir: str) -> list[list[str]]:
    """The NAME arguments of every `gen-certs.sh server OUT_DIR NAME...` in a text (comments and
    line continuations included)."""
    joined = re.sub(r"\\\n\s*#?\s*", " ", text)
    found = []
    for line in joined.splitlines():
        line = line.lstrip("#").strip()
        match = re.search(r"gen-certs\.sh\s+server\s+(.*)$", line)
        if match:
            words = shlex.split(match.group(1), comments=True)
            if words and words[0] == out_dir:
                found.append(words[1:])
    return found


@pytest.mark.skipif(not shutil.which("openssl"), reason="no openssl binary (gen-certs.sh uses it)")
@needs_nats_server
def test_gen_certs_makes_what_the_cluster_config_needs(tmp_path: Path, credentials: tuple[Path, Path]) -> None:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    out = tmp_path / "local"

    def run(*args: str) -> None:
        result = subprocess.run(["sh", str(GEN_CERTS), *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"gen-certs.sh {' '.join(args)} failed:\n{result.stdout}{result.stderr}"

    run("server", str(out), "nats-1", "nats-2", "nats-3", "localhost", "127.0.0.1")
    ca_before = (out / "ca" / "ca.pem").read_bytes()
    run("server", str(out), "nats-1", "nats-2", "nats-3", "localhost", "127.0.0.1")  # again: a rotation
    run("client", str(out), "edge-1")
    assert (out / "ca" / "ca.pem").read_bytes() == ca_before, "a second run must keep the CA"
    assert sorted(p.name for p in (out / "tls").iterdir()) == ["ca.pem", "server-key.pem", "server.pem"], (
        "tls/ is what the nodes mount: the CA's key must not be there")
    for key in (out / "ca" / "ca-key.pem", out / "tls" / "server-key.pem", out / "clients" / "edge-1-key.pem"):
        assert key.stat().st_mode & 0o077 == 0, f"{key} is readable by others"

    server = x509.load_pem_x509_certificate((out / "tls" / "server.pem").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"nats-1", "nats-2", "nats-3", "localhost"}
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    usages = set(server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert usages == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}, "routes need both"
    client = x509.load_pem_x509_certificate((out / "clients" / "edge-1.pem").read_bytes())
    client_usages = set(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert client_usages == {ExtendedKeyUsageOID.CLIENT_AUTH}
    ca = x509.load_pem_x509_certificate(ca_before)
    for cert in (server, client):
        cert.verify_directly_issued_by(ca)

    _, auth = credentials
    config = install_node(tmp_path / "nats-1", (CLUSTER_DIR / "nats-1.conf").read_text(), CLUSTER_CONF.read_text(),
                          ROUTES_CONF.read_text(), out / "tls", auth, verify=True)
    nats_server_test(config)


def test_the_documented_certificates_name_every_host_clients_and_routes_dial() -> None:
    """The gen-certs.sh commands in the compose file, the kustomization and DEPLOY.md put every
    host that a client or a route dials into the server certificate."""
    compose = yaml.safe_load(CLUSTER_COMPOSE.read_text())
    compose_hosts = {urllib.parse.urlparse(u).hostname for u in compose["x-nats-client"]["SHOAL_NATS_URL"].split(",")}
    compose_hosts |= {h for h, _ in route_urls(ROUTES_CONF.read_text())}
    k8s_config = k8s_objects()[("ConfigMap", "nats-config")]["data"]
    k8s_hosts = {h for h, _ in route_urls(k8s_config["routes.conf"])} | {
        urllib.parse.urlparse(u).hostname for u in k8s_service_env()["SHOAL_NATS_URL"].split(",")}
    for path, out_dir, hosts in ((CLUSTER_COMPOSE, "deploy/cluster/local", compose_hosts),
                                 (KUSTOMIZATION, "deploy/k8s/local", k8s_hosts),
                                 (GEN_CERTS, "deploy/cluster/local", compose_hosts),
                                 (GEN_CERTS, "deploy/k8s/local", k8s_hosts),
                                 (DEPLOY_DOC, "deploy/cluster/local", compose_hosts),
                                 (DEPLOY_DOC, "deploy/k8s/local", k8s_hosts)):
        commands = gen_certs_names(path.read_text(), out_dir)
        assert commands, f"{path.name} shows no `gen-certs.sh server {out_dir} ...`"
        for names in commands:
            assert hosts <= set(names), (
                f"{path.name}: gen-certs.sh server {out_dir} leaves out {sorted(hosts - set(names))}")


# --------------------------------------------------------------------------------------------------
# docker-compose.cluster.yml
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_compose() -> dict[str, Any]:
    data = yaml.safe_load(CLUSTER_COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def compose_shoal_command(service: dict[str, Any]) -> list[str] | None:
    """The shoal command line a compose service runs: its command under the image's `shoal`
    entrypoint, or under a `sh -c 'shoal "$@" && ...'` wrapper; None for anything else."""
    entrypoint = argv(service.get("entrypoint"))
    if not entrypoint or entrypoint == ["shoal"]:
        return argv(service.get("command"))
    if entrypoint[:2] == ["sh", "-c"] and len(entrypoint) > 2 and re.match(r'shoal "\$\$@"', entrypoint[2]):
        return argv(service.get("command"))
    return None


def compose_nats_nodes(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services.items()
            if argv(svc.get("entrypoint"))[:1] and Path(argv(svc.get("entrypoint"))[0]).name == "nats-server"}


def compose_replicas(service: dict[str, Any]) -> int:
    return int((service.get("deploy") or {}).get("replicas", 1))


def compose_secret_file(compose: dict[str, Any], service: dict[str, Any], path: str) -> str:
    """The host file behind /run/secrets/NAME in a service."""
    assert path.startswith("/run/secrets/"), f"{path} is not a compose secret"
    name = path.removeprefix("/run/secrets/")
    granted = [s if isinstance(s, str) else s.get("source") for s in service.get("secrets") or []]
    assert name in granted, f"secret {name} is not granted to the service ({granted})"
    return str(compose["secrets"][name]["file"])


def test_cluster_compose_runs_three_nats_nodes(cluster_compose: dict[str, Any]) -> None:
    services = cluster_compose["services"]
    nodes = compose_nats_nodes(services)
    assert sorted(nodes) == list(NODES)
    stores = set()
    for name, svc in nodes.items():
        mounts = {target: source for source, target in volume_mounts(svc)}
        assert nats_config_path(svc) == f"{ETC_NATS}/nats-server.conf"
        expected = {f"{ETC_NATS}/nats-server.conf": f"./deploy/cluster/{name}.conf",
                    f"{ETC_NATS}/nats-cluster.conf": "./deploy/cluster/nats-cluster.conf",
                    f"{ETC_NATS}/routes.conf": "./deploy/cluster/routes.conf",
                    f"{ETC_NATS}/tls": "./deploy/cluster/local/tls",
                    f"{ETC_NATS}/auth": "./deploy/cluster/local/auth"}
        for target, source in expected.items():
            assert mounts.get(target) == source, f"{name}: {target} should be {source}, is {mounts.get(target)}"
        assert server_name((REPO / mounts[f"{ETC_NATS}/nats-server.conf"]).read_text()) == name
        # The store on the node's own named volume.
        data = [source for target, source in mounts.items() if under(store_dir(CLUSTER_CONF.read_text()), target)]
        assert len(data) == 1 and "/" not in data[0] and data[0] in cluster_compose["volumes"], f"{name}: store {data}"
        stores.add(data[0])
        test = svc["healthcheck"]["test"]
        assert test[0] == "CMD" and test[1] == "python" and f"127.0.0.1:{MONITOR_PORT}/healthz" in test[-1]
        assert svc.get("stop_signal") == "SIGUSR2", f"{name}: stop in lame duck mode"
    assert len(stores) == len(NODES), "each node needs its own JetStream volume"
    # The route hosts are the nodes' service names; the image is built once, from the Dockerfile.
    assert {host for host, _ in route_urls(ROUTES_CONF.read_text())} == set(NODES)
    built = [name for name, svc in services.items() if svc.get("build")]
    assert len(built) == 1 and services[built[0]]["build"]["dockerfile"] == "deploy/Dockerfile"
    assert {svc.get("image") for svc in services.values()} == {"shoal:dev"}


def test_cluster_compose_runs_two_replicas_of_every_service(cluster_compose: dict[str, Any]) -> None:
    services = cluster_compose["services"]
    replicas: dict[str, int] = {}
    views: dict[str, str] = {}
    for name, svc in services.items():
        command = compose_shoal_command(svc) or []
        if command[:1] != ["serve"]:
            continue
        replicas[command[1]] = replicas.get(command[1], 0) + compose_replicas(svc)
        if command[1] == "gateway":  # no NATS service instance to ping: its HTTP /healthz instead
            (port,) = option(command, "--port")
            assert f"127.0.0.1:{port}/healthz" in argv(svc["healthcheck"]["test"])[-1], name
            continue
        path = ready_file(command)
        assert path, f"{name}: serve without --ready-file"
        assert argv(svc["healthcheck"]["test"]) == ["CMD", "shoal", "ping", "--ready-file", path], name
        if command[1] == "query":
            assert compose_replicas(svc) == 1, f"{name}: query replicas each need their own volume"
            (db,) = option(command, "--db")
            volume = [source for source, target in volume_mounts(svc) if under(db, target)]
            assert len(volume) == 1 and volume[0] in cluster_compose["volumes"], f"{name}: --db {db} not on a volume"
            views[name] = volume[0]
    assert replicas == {service: 2 for service in (*SERVED, "gateway")}, f"replicas per service: {replicas}"
    assert len(set(views.values())) == 2, f"the query replicas share a view volume: {views}"


def test_cluster_compose_clients_use_the_seeds_tls_their_identity_and_r3(cluster_compose: dict[str, Any]) -> None:
    services = cluster_compose["services"]
    seeds = {f"tls://{node}:{CLIENT_PORT}" for node in NODES}
    kinds: dict[str, int] = {}
    for name, svc in services.items():
        command = compose_shoal_command(svc)
        if command is None or command[:1] == ["auth"]:
            continue
        env = environment(svc)
        url = env.get("SHOAL_NATS_URL", "")
        assert set(url.split(",")) == seeds, f"{name}: SHOAL_NATS_URL={url!r} should name all three nodes"
        ca = compose_secret_file(cluster_compose, svc, env["SHOAL_NATS_TLS_CA"])
        assert ca == "./deploy/cluster/local/tls/ca.pem", f"{name}: {ca}"
        seed = compose_secret_file(cluster_compose, svc, env["SHOAL_NATS_NKEY"])
        if command[:2] == ["serve", "gateway"]:
            kind = "gateway"
            assert seed == "./deploy/cluster/local/auth/gateway.nk", f"{name}: {seed}"
            tokens = env["SHOAL_GATEWAY_TOKENS"]
            mounts = {target: source for source, target in volume_mounts(svc)}
            (directory,) = [t for t in mounts if under(tokens, t)]
            assert mounts[directory] == "./deploy/cluster/local/gateway", (
                f"{name}: the token file's directory is mounted (a replaced file is seen): {mounts}")
        elif command[:1] == ["serve"]:
            kind = "service"
            assert seed == "./deploy/cluster/local/auth/service.nk", f"{name}: {seed}"
            assert env.get("SHOAL_JS_REPLICAS") == str(len(NODES)), f"{name}: streams and buckets on every node"
        elif command[:1] == ["agent"]:
            kind = "node"
            (node_id,) = option(command, "--node-id")
            assert seed == f"./deploy/cluster/local/auth/nodes/{node_id}.nk", f"{name}: {seed}"
        else:
            kind = "admin"
            assert seed == "./deploy/cluster/local/auth/admin.nk", f"{name}: {seed}"
        kinds[kind] = kinds.get(kind, 0) + 1
        depends = svc.get("depends_on") or {}
        assert {n: d.get("condition") for n, d in depends.items()} == dict.fromkeys(NODES, "service_healthy"), name
    assert kinds.keys() == {"service", "node", "admin", "gateway"}, kinds


def test_cluster_compose_auth_init_creates_every_identity_it_mounts(cluster_compose: dict[str, Any]) -> None:
    services = cluster_compose["services"]
    init = services["auth-init"]
    assert init.get("profiles"), "auth-init must not run on every `up`"
    command = compose_shoal_command(init)
    assert command and command[:2] == ["auth", "init"], f"auth-init runs {command}"
    host = {target: source for source, target in volume_mounts(init)}
    (mount,) = [t for t in host if under(command[2], t)]
    assert host[mount].rstrip("/") + command[2][len(mount):] == "./deploy/cluster/local/auth", (
        f"auth init writes {command[2]}, which is not deploy/cluster/local/auth")
    agents = {option(c, "--node-id")[0] for c in (compose_shoal_command(s) for s in services.values())
              if c and c[:1] == ["agent"]}
    assert set(option(command, "--node")) == agents, "auth init should create every agent's node identity"
    # Every seed file a secret names is one that auth init writes.
    written = {"./deploy/cluster/local/auth/service.nk", "./deploy/cluster/local/auth/admin.nk",
               "./deploy/cluster/local/auth/gateway.nk",
               *(f"./deploy/cluster/local/auth/nodes/{a}.nk" for a in agents)}
    seeds = {s["file"] for s in cluster_compose["secrets"].values() if s["file"].endswith(".nk")}
    assert seeds == written, seeds ^ written


def test_cluster_compose_commands_are_real_cli_commands(cluster_compose: dict[str, Any]) -> None:
    commands = []
    for name, svc in cluster_compose["services"].items():
        command = compose_shoal_command(svc)
        if command is not None and name != "admin":  # admin takes its command from `docker compose run`
            assert command, f"{name} runs no command"
            commands.append((name, command))
        test = argv((svc.get("healthcheck") or {}).get("test"))
        if test[1:2] == ["shoal"]:
            commands.append((f"{name} healthcheck", test[2:]))
    check_shoal_commands(commands)


@pytest.mark.docker
def test_docker_compose_cluster_config_is_valid(tmp_path: Path) -> None:
    if not docker_engine() or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode:
        pytest.skip("no Docker engine with compose")
    # A copy with stand-ins for the generated files the secrets name.
    shutil.copy(CLUSTER_COMPOSE, tmp_path / CLUSTER_COMPOSE.name)
    shutil.copytree(CLUSTER_DIR, tmp_path / "deploy" / "cluster", ignore=shutil.ignore_patterns("local"))
    for secret in yaml.safe_load(CLUSTER_COMPOSE.read_text())["secrets"].values():
        path = tmp_path / secret["file"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("stand-in\n")
    result = subprocess.run(["docker", "compose", "-f", CLUSTER_COMPOSE.name, "config", "-q"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"docker compose config rejects {CLUSTER_COMPOSE.name}:\n{result.stderr}"


# --------------------------------------------------------------------------------------------------
# deploy/k8s
# --------------------------------------------------------------------------------------------------


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    """Every object of every manifest in deploy/k8s (the kustomization aside), by (kind, name)."""
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path == KUSTOMIZATION:
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{path.name}: {sorted(doc)}"
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, f"{path.name}: {key} defined twice"
            objects[key] = doc
    return objects


def k8s_containers(objects: dict[tuple[str, str], dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    out = {}
    for (k, name), obj in objects.items():
        if k == kind:
            (container,) = obj["spec"]["template"]["spec"]["containers"]
            out[name] = container
    return out


def k8s_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env") or []}


def k8s_service_env() -> dict[str, str]:
    return k8s_env(k8s_containers(k8s_objects(), "Deployment")["shoal-scheduler"])


def k8s_files(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, tuple[str, str, str]]:
    """Path in the container -> (source kind, source name, key) of every file mounted from a Secret
    or ConfigMap, directly or through a projected volume."""
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    files = {}
    for mount in container.get("volumeMounts") or []:
        volume = volumes.get(mount["name"])
        if volume is None:  # a StatefulSet's volume claim
            continue
        sources = volume["projected"]["sources"] if "projected" in volume else [volume]
        for source in sources:
            for kind in ("secret", "configMap"):
                if kind in source:
                    ref = source[kind]
                    name = ref.get("name") or ref.get("secretName")
                    for item in ref.get("items") or []:
                        files[f"{mount['mountPath'].rstrip('/')}/{item['path']}"] = (kind, name, item["key"])
                    if not ref.get("items"):
                        files[f"{mount['mountPath'].rstrip('/')}/*"] = (kind, name, "*")
    return files


def k8s_empty_dirs(pod: dict[str, Any], container: dict[str, Any]) -> list[str]:
    empty = {v["name"] for v in pod.get("volumes") or [] if "emptyDir" in v}
    return [m["mountPath"] for m in container.get("volumeMounts") or [] if m["name"] in empty]


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    return k8s_objects()


@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    return yaml.safe_load(KUSTOMIZATION.read_text())


def generated(kustomization: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    """(secret|configMap, name) -> keys, of every generator."""
    out = {}
    for field, kind in (("secretGenerator", "secret"), ("configMapGenerator", "configMap")):
        for gen in kustomization.get(field) or []:
            keys = {f.split("=", 1)[0] if "=" in f else Path(f).name for f in gen.get("files") or []}
            out[(kind, gen["name"])] = keys
            for f in gen.get("files") or []:
                assert f.split("=", 1)[-1].startswith("local/"), (
                    f"{gen['name']}: {f} is not under local/ (ignored by git)")
    return out


def test_k8s_manifests_parse_and_the_kustomization_lists_them(
        k8s: dict[tuple[str, str], dict[str, Any]], kustomization: dict[str, Any]) -> None:
    resources = kustomization["resources"]
    for resource in resources:
        assert (K8S_DIR / resource).is_file(), resource
    for path in K8S_DIR.glob("*.yaml"):
        assert path == KUSTOMIZATION or path.name in resources or f"# - {path.name}" in KUSTOMIZATION.read_text(), (
            f"{path.name} is neither a resource nor mentioned in kustomization.yaml")
    assert "local/" in (K8S_DIR / ".gitignore").read_text().split()
    # Every container runs the image the kustomization points at the registry.
    images = {image["name"] for image in kustomization["images"]}
    for kind in ("Deployment", "StatefulSet"):
        for name, container in k8s_containers(k8s, kind).items():
            assert container["image"] in images, f"{name} runs {container['image']}, not in {images}"
    # Every Secret and ConfigMap a pod mounts is generated (or defined), with the keys it reads.
    made = generated(kustomization)
    defined = {("configMap" if k == "ConfigMap" else "secret", n): set((o.get("data") or {}).keys())
               for (k, n), o in k8s.items() if k in ("ConfigMap", "Secret")}
    for kind in ("Deployment", "StatefulSet"):
        for (k, name), obj in k8s.items():
            if k != kind:
                continue
            pod = obj["spec"]["template"]["spec"]
            for path, (source, ref, key) in k8s_files(pod, pod["containers"][0]).items():
                keys = made.get((source, ref), defined.get((source, ref)))
                assert keys is not None, f"{name}: {source} {ref} is neither generated nor defined"
                assert key == "*" or key in keys, f"{name}: {source} {ref} has no key {key} ({keys})"
    assert kustomization.get("namespace") == k8s[("Namespace", kustomization["namespace"])]["metadata"]["name"]


def test_k8s_nats_is_a_statefulset_of_three_with_jetstream_volumes(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    sts = k8s[("StatefulSet", "nats")]
    spec = sts["spec"]
    assert spec["replicas"] == 3
    assert spec.get("podManagementPolicy") == "Parallel", "JetStream needs a quorum before any node is ready"
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    headless = k8s[("Service", spec["serviceName"])]["spec"]
    assert headless["clusterIP"] == "None" and headless.get("publishNotReadyAddresses") is True
    assert headless["selector"].items() <= labels.items()
    assert {p["port"] for p in headless["ports"]} == {CLIENT_PORT, CLUSTER_PORT}

    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["nats-server", "--config", f"{ETC_NATS}/nats-server.conf"]
    assert {p["containerPort"] for p in container["ports"]} == {CLIENT_PORT, CLUSTER_PORT}
    env = {e["name"]: e for e in container["env"]}
    config = k8s[("ConfigMap", "nats-config")]["data"]
    # server_name is the pod's name (nats-0 ...), stable across rescheduling.
    assert server_name(config["nats-server.conf"]) == "$POD_NAME"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert conf_includes(config["nats-server.conf"]) == ["nats-cluster.conf"]
    assert config["nats-cluster.conf"] == CLUSTER_CONF.read_text(), (
        "the nats-config ConfigMap's nats-cluster.conf must be deploy/cluster/nats-cluster.conf verbatim")
    pods = [f"{sts['metadata']['name']}-{i}.{spec['serviceName']}" for i in range(spec["replicas"])]
    assert sorted(route_urls(config["routes.conf"])) == [(p, CLUSTER_PORT) for p in pods]

    # /etc/nats holds the files where nats-cluster.conf looks for them.
    files = k8s_files(pod, container)
    for path in tls_paths(CLUSTER_CONF.read_text()):
        assert files.get(path, ("", "", ""))[:2] == ("secret", "shoal-nats-tls"), f"{path} is not mounted: {files}"
    include = [i for i in conf_includes(CLUSTER_CONF.read_text()) if i.startswith("auth/")]
    assert files.get(f"{ETC_NATS}/{include[0]}", ("", "", ""))[:2] == ("secret", "shoal-nats-auth")
    assert files.get(f"{ETC_NATS}/*") == ("configMap", "nats-config", "*")
    assert not any("subPath" in m for m in container["volumeMounts"]), "subPath mounts never see an updated file"
    # The JetStream store on the persistent volume.
    (claim,) = spec["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert under(store_dir(CLUSTER_CONF.read_text()), mounts[claim["metadata"]["name"]])
    # Probes in the pod: monitoring listens on its loopback only.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[0] == "python" and f"127.0.0.1:{MONITOR_PORT}/healthz" in command[-1], probe
    assert "ldm" in " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    assert pod["terminationGracePeriodSeconds"] > 40, "lame duck mode takes lame_duck_duration + grace"
    pdb = k8s[("PodDisruptionBudget", "nats")]["spec"]
    assert pdb["maxUnavailable"] == 1 and pdb["selector"]["matchLabels"].items() <= labels.items()


@needs_nats_server
def test_nats_server_accepts_the_k8s_config(tmp_path: Path, credentials: tuple[Path, Path],
                                           k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    tls, auth = credentials
    data = k8s[("ConfigMap", "nats-config")]["data"]
    config = install_node(tmp_path / "etc-nats", data["nats-server.conf"], data["nats-cluster.conf"],
                          data["routes.conf"], tls, auth)
    nats_server_test(config, env={"POD_NAME": "nats-0"})


def test_k8s_runs_two_ready_checked_replicas_of_every_service(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    sts = k8s[("StatefulSet", "nats")]["spec"]
    seeds = {f"tls://nats-{i}.{sts['serviceName']}:{CLIENT_PORT}" for i in range(sts["replicas"])}
    served = {}
    for (kind, name), obj in k8s.items():
        if kind != "Deployment":
            continue
        spec = obj["spec"]
        pod = spec["template"]["spec"]
        (container,) = pod["containers"]
        command = container.get("args") or []
        env = k8s_env(container)
        files = k8s_files(pod, container)
        assert set(env["SHOAL_NATS_URL"].split(",")) == seeds, f"{name}: {env['SHOAL_NATS_URL']}"
        assert files.get(env["SHOAL_NATS_TLS_CA"]) == ("configMap", "shoal-nats-ca", "ca.pem"), name
        assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items(), name
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, name
        if command[:1] != ["serve"]:
            assert container["command"] == ["sleep", "infinity"], f"{name}: neither a service nor the toolbox"
            assert files.get(env["SHOAL_NATS_NKEY"]) == ("secret", "shoal-nkey-admin", "admin.nk"), name
            continue
        service = command[1]
        served[service] = name
        assert spec["replicas"] == 2, f"{name}: replicas {spec['replicas']}"
        if service == "gateway":
            continue  # test_k8s_gateway_runs_as_its_own_identity_with_its_tokens
        assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, (
            f"{name}: keep the old replica until the new one serves")
        assert files.get(env["SHOAL_NATS_NKEY"]) == ("secret", "shoal-nkey-service", "service.nk"), name
        assert env.get("SHOAL_JS_REPLICAS") == str(sts["replicas"]), name
        path = ready_file(command)
        assert path, f"{name}: serve without --ready-file"
        assert any(under(path, d) for d in k8s_empty_dirs(pod, container)), f"{name}: {path} is not writable"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["exec"]["command"] == ["shoal", "ping", "--ready-file", path], f"{name} {probe}"
        assert container["livenessProbe"]["periodSeconds"] * container["livenessProbe"]["failureThreshold"] >= 120, (
            f"{name}: liveness should ride out a NATS outage of a minute or two")
        if service == "query":
            (db,) = option(command, "--db")
            assert any(under(db, d) for d in k8s_empty_dirs(pod, container)), f"{name}: the view is not on an emptyDir"
        pdb = k8s[("PodDisruptionBudget", name)]["spec"]
        assert pdb["minAvailable"] == 1 and pdb["selector"]["matchLabels"] == spec["selector"]["matchLabels"]
    assert set(served) == {*SERVED, "gateway"}, f"services without a Deployment: {sorted(SERVED - set(served))}"


def test_k8s_gateway_runs_as_its_own_identity_with_its_tokens(k8s: dict[tuple[str, str], dict[str, Any]],
                                                              kustomization: dict[str, Any]) -> None:
    deployment = k8s[("Deployment", "shoal-gateway")]
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    args = parse_shoal("shoal-gateway", [str(a) for a in container["args"]])
    assert args.command == "serve" and args.service == "gateway" and not args.insecure
    env = k8s_env(container)
    files = k8s_files(pod, container)
    assert files.get(env["SHOAL_NATS_NKEY"]) == ("secret", "shoal-nkey-gateway", "gateway.nk")
    assert files.get(env["SHOAL_GATEWAY_TOKENS"]) == ("secret", "shoal-gateway-tokens", "tokens.json")
    assert "SHOAL_JS_REPLICAS" not in env  # it creates no stream or bucket
    generators = {g["name"]: g for g in kustomization["secretGenerator"]}
    assert generators["shoal-gateway-tokens"]["files"] == ["tokens.json=local/gateway/tokens.json"]
    assert (generators["shoal-gateway-tokens"].get("options") or {}).get("disableNameSuffixHash") is True, (
        "updated in place, so that the running gateways read the new tokens")
    assert generators["shoal-nkey-gateway"]["files"] == ["gateway.nk=local/auth/gateway.nk"]
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    assert port == args.port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}, probe
    service = k8s[("Service", "shoal-gateway")]["spec"]
    assert service["selector"] == spec["selector"]["matchLabels"]
    assert service["ports"][0]["targetPort"] == "http"
    pdb = k8s[("PodDisruptionBudget", "shoal-gateway")]["spec"]
    assert pdb["minAvailable"] == 1 and pdb["selector"]["matchLabels"] == spec["selector"]["matchLabels"]


def test_k8s_commands_are_real_cli_commands(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    commands = []
    for name, container in k8s_containers(k8s, "Deployment").items():
        if container.get("args"):
            commands.append((name, [str(a) for a in container["args"]]))
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            command = (container.get(probe) or {}).get("exec", {}).get("command") or []
            if command[:1] == ["shoal"]:
                commands.append((f"{name} {probe}", command[1:]))
    check_shoal_commands(commands)


# --------------------------------------------------------------------------------------------------
# deploy/systemd
# --------------------------------------------------------------------------------------------------


def unit_file(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit: section -> key -> values (a key may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"{path.name}: stray line {raw!r}"
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def env_file(path: Path) -> dict[str, str]:
    out = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out[key] = value
    return out


def exec_start(value: str, env: dict[str, str], instance: str = "") -> list[str]:
    """An ExecStart line as systemd runs it: %i, then ${VAR} as one word and $VAR split at spaces."""
    words = []
    for word in shlex.split(value.replace("%i", instance)):
        whole = re.fullmatch(r"\$\{(\w+)\}", word) or None
        split = re.fullmatch(r"\$(\w+)", word)
        if whole:
            assert whole.group(1) in env, f"${{{whole.group(1)}}} is not in the environment file"
            words.append(env[whole.group(1)])
        elif split:
            assert split.group(1) in env, f"${split.group(1)} is not in the environment file"
            words.extend(env[split.group(1)].split())
        else:
            assert "$" not in word, f"systemd expands only whole-word variables: {word!r}"
            words.append(word)
    return words


def test_systemd_agent_unit_keeps_commands_alive_across_restarts() -> None:
    unit = unit_file(SYSTEMD_DIR / "shoal-agent.service")
    service = unit["Service"]
    # The agent's commands run under their own supervisors and are re-adopted after a restart: only
    # the agent may be signalled.
    assert service["KillMode"] == ["process"]
    assert service["Restart"] == ["always"]
    assert unit["Unit"].get("StartLimitIntervalSec") == ["0"], "Restart=always should never give up"
    for forbidden in ("PrivateTmp", "RemoveIPC", "DynamicUser"):
        assert service.get(forbidden, ["no"]) == ["no"], f"{forbidden} pulls state from under re-adopted commands"
    assert service["User"][0] not in ("root", "0") and service["User"] == ["shoal-agent"]
    assert service["EnvironmentFile"] == ["/etc/shoal/agent.env"]
    assert service["StateDirectory"] == ["shoal-agent"] and service["WorkingDirectory"] == ["/var/lib/shoal-agent"]

    env = env_file(SYSTEMD_DIR / "agent.env.example")
    assert {"SHOAL_NATS_URL", "SHOAL_NATS_NKEY", "SHOAL_NATS_TLS_CA"} <= env.keys()
    (line,) = service["ExecStart"]
    words = exec_start(line, env)
    assert Path(words[0]).name == "shoal"
    args = parse_shoal("shoal-agent.service", words[1:])
    assert args.command == "agent" and args.node_id == env["AGENT_NODE_ID"] and args.label
    assert "--node-id" in words and under(args.work_dir, "/var/lib/shoal-agent"), args.work_dir
    timeout = float(service["TimeoutStopSec"][0])
    assert timeout > args.stop_grace, "systemd would SIGKILL the agent while it stops its runs"


def test_systemd_service_and_nats_units() -> None:
    unit = unit_file(SYSTEMD_DIR / "shoal@.service")
    service = unit["Service"]
    env = env_file(SYSTEMD_DIR / "shoal.env.example")
    assert service["EnvironmentFile"] == ["/etc/shoal/shoal.env"]
    assert env["SHOAL_JS_REPLICAS"] == str(len(NODES))
    assert {"SHOAL_NATS_URL", "SHOAL_NATS_NKEY", "SHOAL_NATS_TLS_CA"} <= env.keys()
    assert service["Restart"] == ["always"] and service["User"] == ["shoal"]
    commands = []
    for instance in sorted(SERVED):
        words = exec_start(service["ExecStart"][0], env, instance)
        assert Path(words[0]).name == "shoal" and words[1:3] == ["serve", instance]
        commands.append((f"shoal@{instance}.service", words[1:]))
    check_shoal_commands(commands)


def test_systemd_gateway_unit_runs_as_the_gateway_identity_with_tokens() -> None:
    unit = unit_file(SYSTEMD_DIR / "shoal-gateway.service")
    service = unit["Service"]
    assert service["EnvironmentFile"] == ["/etc/shoal/gateway.env"]
    env = env_file(SYSTEMD_DIR / "gateway.env.example")
    assert {"SHOAL_NATS_URL", "SHOAL_NATS_NKEY", "SHOAL_NATS_TLS_CA", "SHOAL_GATEWAY_TOKENS"} <= env.keys()
    assert Path(env["SHOAL_NATS_NKEY"]).name == "gateway.nk"
    assert "SHOAL_JS_REPLICAS" not in env
    assert service["Restart"] == ["always"] and service["User"] == ["shoal"]
    words = exec_start(service["ExecStart"][0], env)
    assert Path(words[0]).name == "shoal" and words[1:3] == ["serve", "gateway"]
    args = parse_shoal("shoal-gateway.service", words[1:])
    assert not args.insecure
    check_shoal_commands([("shoal-gateway.service", words[1:])])


def test_systemd_nats_unit_and_users() -> None:
    unit = unit_file(SYSTEMD_DIR / "nats-server.service")
    service = unit["Service"]
    words = shlex.split(service["ExecStart"][0])
    assert Path(words[0]).name == "nats-server" and words[1:] == ["--config", f"{ETC_NATS}/nats-server.conf"]
    assert service["KillSignal"] == ["SIGUSR2"], "stop in lame duck mode"
    assert float(service["TimeoutStopSec"][0]) > 40
    assert store_dir(CLUSTER_CONF.read_text()) in service["ReadWritePaths"][0].split()
    users = {line.split()[1] for line in (SYSTEMD_DIR / "shoal.sysusers").read_text().splitlines()
             if line.startswith("u ")}
    for name in ("shoal-agent.service", "shoal@.service", "shoal-gateway.service", "nats-server.service"):
        assert unit_file(SYSTEMD_DIR / name)["Service"]["User"][0] in users, name


# --------------------------------------------------------------------------------------------------
# Across the files: variables, commands in the guide
# --------------------------------------------------------------------------------------------------


def deploy_variables() -> dict[str, set[str]]:
    """Every SHOAL_* variable the deploy files set, with where."""
    found: dict[str, set[str]] = {}

    def add(name: str, where: str) -> None:
        if name.startswith("SHOAL_"):
            found.setdefault(name, set()).add(where)

    for path in (COMPOSE, CLUSTER_COMPOSE):
        data = yaml.safe_load(path.read_text())
        for name, svc in data["services"].items():
            for var in environment(svc):
                add(var, f"{path.name} {name}")
    for (kind, name), obj in k8s_objects().items():
        if kind in ("Deployment", "StatefulSet"):
            for container in obj["spec"]["template"]["spec"]["containers"]:
                for var in k8s_env(container):
                    add(var, f"k8s {name}")
    for path in SYSTEMD_DIR.glob("*.env.example"):
        for var in env_file(path):
            add(var, path.name)
    for path in SYSTEMD_DIR.glob("*.service"):
        for value in unit_file(path)["Service"].get("Environment", []):
            add(value.split("=", 1)[0], path.name)
    # Anything else that looks like one, in any deploy file or the guide.
    texts = [COMPOSE, CLUSTER_COMPOSE, DEPLOY_DOC,
             *[p for p in (REPO / "deploy").rglob("*") if p.is_file() and "local" not in p.relative_to(REPO).parts]]
    streams = set(VARIABLE.findall((REPO / "shared" / "subjects.py").read_text()))
    for path in texts:
        for var in VARIABLE.findall(path.read_text()):
            if var not in streams:
                add(var, str(path.relative_to(REPO)))
    return found


def test_every_shoal_variable_in_the_deploy_files_is_one_shoal_reads() -> None:
    unknown = {var: sorted(where) for var, where in deploy_variables().items() if var not in known_variables()}
    assert not unknown, f"SHOAL_* variables that neither shared/settings.py nor the auth design define: {unknown}"


def test_design_variables_are_read_by_settings() -> None:
    """The deploy files are checked against DESIGN_VARIABLES; once shared/settings.py reads them all,
    this passes and the list is only a cross-check."""
    missing = DESIGN_VARIABLES - settings_variables()
    if missing:
        pytest.skip(f"shared/settings.py does not read these yet (the deploy files are checked against "
                    f"DESIGN_VARIABLES meanwhile): {sorted(missing)}")


SHELL_OPERATORS = ("<", ">", "|", "&&", "||", ";", "2>&1")


def shoal_command_in(words: list[str]) -> list[str] | None:
    """The shoal arguments of a shell command line in the guide: `shoal ...` (or a path to it, after
    `sudo -u USER` and VAR=value words), `kubectl exec ... -- shoal ...`, or `docker compose ... run
    [--rm] admin|auth-init ...` (whose entrypoint is shoal). None when the line runs no shoal."""
    for op in SHELL_OPERATORS:
        if op in words:
            words = words[:words.index(op)]
    i = 0
    while True:
        while i < len(words) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[i]):
            i += 1
        if words[i:i + 1] != ["sudo"]:
            break
        i += 1
        while i < len(words) and words[i].startswith("-"):
            i += 2 if words[i] in ("-u", "-g") else 1
    if i < len(words) and Path(words[i]).name == "shoal":
        return words[i + 1:]
    if "--" in words[i:]:
        j = words.index("--", i)
        if j + 1 < len(words) and Path(words[j + 1]).name == "shoal":
            return words[j + 2:]
    if words[i:i + 2] == ["docker", "compose"] and "run" in words:
        j = words.index("run") + 1
        while j < len(words) and words[j].startswith("-"):
            j += 1
        if j < len(words) and words[j] in ("admin", "auth-init"):
            return words[j + 1:]
    return None


def test_deploy_guide_commands_are_real_cli_commands() -> None:
    text = DEPLOY_DOC.read_text()
    assert "RELIABILITY.md" in text, "DEPLOY.md should link RELIABILITY.md for what a node loss does"
    commands = []
    for block in re.findall(r"(?ms)^```[a-z]*\n(.*?)^```", text):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            words = shlex.split(line, comments=True)
            command = shoal_command_in(words) if words else None
            if command:
                commands.append(("DEPLOY.md", command))
    assert len(commands) >= 10, f"expected the guide to show shoal commands, found {len(commands)}"
    check_shoal_commands(commands)

"""The container deployment (deploy/Dockerfile, deploy/nats-server.conf, docker-compose.yml), checked statically.

No Docker engine runs in CI, so these tests check what can go stale without one: that the compose file
parses, that every command it runs is a real `shoal` command line (renaming a subcommand or flag breaks
them), that nats-server accepts its config and answers the healthcheck, and that every process points at
the nats service. With a Docker engine, `docker compose config` validates the file against compose's schema.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.cli.main import build_parser
from shared.natsserver import free_port

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
        if args.command == "serve":
            assert args.service in SERVED
            served[args.service] = name
    assert set(served) == SERVED, f"services not run by any container: {sorted(SERVED - set(served))}"
    # The query view lives on a volume, not in the container's writable layer.
    query = services[served["query"]]
    db = parse_shoal(served["query"], argv(query.get("command"))).db
    assert db, "query service should name its SQLite file with --db"
    targets = [target for _, target in volume_mounts(query)]
    assert any(db.startswith(t.rstrip("/") + "/") for t in targets), f"--db {db} is not on a volume {targets}"


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

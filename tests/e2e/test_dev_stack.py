"""End to end through real processes: `shoal dev`, its agents, and the `shoal` CLI as a user runs them."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.devproc import running_dev, shoal, until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def cli(url: str, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return shoal(*args, env={"SHOAL_NATS_URL": url}, check=check, timeout=timeout)


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    """`shoal dev --nodes 3` as a user starts it; yields the NATS URL it prints and its data dir."""
    tmp_path = tmp_path_factory.mktemp("dev")
    with running_dev(tmp_path / "dev", "--nodes", "3", timeout=90) as running:
        yield running.url, tmp_path / "dev"


def test_dev_runs_real_commands_on_matching_nodes_and_the_cli_lists_them(dev, tmp_path) -> None:
    url, data = dev
    nodes = json.loads(cli(url, "node", "list", "-o", "json").stdout)
    assert sorted(n["id"] for n in nodes["items"]) == ["node-1", "node-2", "node-3"]
    east_west = json.loads(cli(url, "node", "list", "--selector", "region in (us-east,us-west)", "-o", "json").stdout)
    assert sorted(n["id"] for n in east_west["items"]) == ["node-1", "node-2"]

    spec = tmp_path / "mark.yaml"
    spec.write_text(
        "name: mark\n"
        "type: query\n"
        "config:\n"
        "  command: [sh, -c, 'echo \"ran on $SHOAL_NODE_ID\" | tee proof.txt']\n"
        "selector:\n"
        "  match_expressions: ['region in (us-east,us-west)']\n"
    )
    run = cli(url, "job", "run", str(spec), "--wait")
    assert "accepted" in run.stdout and "completed" in run.stdout

    listing = json.loads(cli(url, "job", "executions", "mark", "-o", "json").stdout)
    items = listing["items"]
    assert sorted(i["node_id"] for i in items) == ["node-1", "node-2"]
    assert "next_token" not in listing
    for item in items:
        assert item["status"]["observed_state"]["state_type"] == "completed"
        assert item["status"]["details"]["exit_code"] == 0
        assert item["status"]["details"]["output"].strip() == f"ran on {item['node_id']}"
        proof = data / "agents" / item["node_id"] / "executions" / item["id"] / "proof.txt"
        assert proof.read_text().strip() == f"ran on {item['node_id']}"
    assert not list((data / "agents" / "node-3").glob("executions/*/proof.txt"))

    # The table ends with the full command for the next page, and that command works.
    table = cli(url, "job", "executions", "mark", "--limit", "1").stdout
    assert "NODE" in table and "OBSERVED" in table
    more = re.search(r"more results: (shoal .*)$", table.strip())
    assert more, table
    args = more.group(1).split()[1:]
    assert "--next-token" in args and "--limit" in args
    second = cli(url, *args).stdout
    assert "more results" not in second
    first_id = re.search(r"^([0-9a-f-]{36})", table.splitlines()[1]).group(1)
    second_id = re.search(r"^([0-9a-f-]{36})", second.splitlines()[1]).group(1)
    assert {first_id, second_id} == {i["id"] for i in items}

    described = cli(url, "job", "describe", "mark").stdout
    assert "State:       completed" in described
    assert "mark" in cli(url, "job", "list").stdout
    assert yaml_has(cli(url, "job", "executions", "mark", "-o", "yaml").stdout, "items")

    stop = cli(url, "job", "stop", "mark")
    assert "stopping" in stop.stdout


def yaml_has(text: str, key: str) -> bool:
    import yaml

    return key in yaml.safe_load(text)


def test_cli_errors_are_one_clear_line(dev, tmp_path) -> None:
    url, _ = dev
    unreachable = cli("nats://127.0.0.1:1", "job", "list", check=False)
    assert unreachable.returncode == 1
    assert unreachable.stderr.strip().startswith("error: cannot reach NATS at nats://127.0.0.1:1")
    assert len(unreachable.stderr.strip().splitlines()) == 1 and "Traceback" not in unreachable.stderr

    missing = cli(url, "job", "describe", "no-such-job", check=False)
    assert missing.returncode == 1 and missing.stderr.strip().splitlines() == [
        "error: job 'no-such-job' not found in namespace 'default' (field: job)"]

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ntype: pipeline\nconfig: {command: [sleep, '1']}\nrollout: {max_parallel: 500}\n")
    rejected = cli(url, "job", "run", str(bad), check=False)
    assert rejected.returncode == 2
    assert rejected.stderr.strip().endswith("(field: spec.rollout.max_parallel)")
    assert len(rejected.stderr.strip().splitlines()) == 1

    out_of_range = cli(url, "job", "executions", "whatever", "--limit", "5000", check=False)
    assert out_of_range.returncode in (1, 2) and "Traceback" not in out_of_range.stderr
    assert len(out_of_range.stderr.strip().splitlines()) == 1

    not_yaml = tmp_path / "broken.yaml"
    not_yaml.write_text("name: [unclosed\n")
    broken = cli(url, "job", "run", str(not_yaml), check=False)
    assert broken.returncode == 2 and "not valid YAML" in broken.stderr and "Traceback" not in broken.stderr


def test_json_output_is_exactly_the_api_reply(dev) -> None:
    url, _ = dev
    import asyncio

    from shared import subjects as s
    from shared.transport import Bus

    async def direct() -> bytes:
        bus = await Bus.connect(url, name="e2e")
        try:
            return await bus.request(s.NODES_LIST, b'{"limit": 2}')
        finally:
            await bus.close()

    printed = cli(url, "node", "list", "--limit", "2", "-o", "json").stdout.strip()
    assert printed.encode() == asyncio.run(direct())


def test_rollout_commands_steer_a_canary_and_a_rolling_update(dev, tmp_path) -> None:
    url, _ = dev
    spec = tmp_path / "edge-app.yaml"

    def write(version_note: str, strategy: str, extra: str, success: int = 2) -> None:
        spec.write_text(
            "name: edge-app\n"
            "type: pipeline\n"
            f"description: {version_note}\n"
            "config:\n"
            "  command: [sh, -c, 'exec sleep 600']\n"
            "rollout:\n"
            f"  strategy: {strategy}\n"
            f"{extra}"
            f"  health_check: {{interval: 300ms, success_threshold: {success}, deadline: 60s}}\n"
        )

    write("v1", "canary", "  max_parallel: 50\n  canary: {canary_count: 1}\n")
    cli(url, "job", "run", str(spec))
    until(lambda: "rollout awaiting_promotion" in cli(url, "rollout", "status", "edge-app").stdout)
    status = json.loads(cli(url, "rollout", "status", "edge-app", "-o", "json").stdout)
    assert status["strategy"] == "canary" and status["current_wave"] == 1 and status["job_state"] == "rollout_paused"
    promoted = cli(url, "rollout", "promote", "edge-app", "--reason", "canary looks good").stdout
    assert "rollout deploying" in promoted and "wave 2 of" in promoted
    watched = cli(url, "rollout", "watch", "edge-app", "--interval", "0.2")
    assert "rollout succeeded" in watched.stdout

    # A rolling update, paused and resumed, then aborted: it rolls back to version 1.
    # Each wave needs 20 healthy intervals of 300 ms: slow enough to steer by hand.
    write("v2", "rolling", "  max_parallel: 34\n", success=20)
    cli(url, "job", "run", str(spec))
    until(lambda: json.loads(cli(url, "rollout", "status", "edge-app", "-o", "json").stdout)["job_version"] == 2)
    paused = cli(url, "rollout", "pause", "edge-app", "--reason", "hold on")
    assert "rollout paused" in paused.stdout and "wave 1 of 2" in paused.stdout
    assert "rollout deploying" in cli(url, "rollout", "resume", "edge-app").stdout
    aborted = cli(url, "rollout", "abort", "edge-app", "--reason", "testing abort")
    assert "rollback of version 2" in aborted.stdout and "testing abort" in aborted.stdout
    final = cli(url, "rollout", "watch", "edge-app", "--interval", "0.2", check=False)
    assert final.returncode == 1 and "rolled back to version 1" in final.stdout
    again = cli(url, "rollout", "promote", "edge-app", check=False)
    assert again.returncode == 1 and again.stderr.startswith("error: rollout of 'edge-app' is")
    cli(url, "job", "stop", "edge-app")


def test_dead_letters_shows_what_was_given_up_on_and_why(dev) -> None:
    url, _ = dev
    import asyncio

    from shared import subjects as s
    from shared.transport import Bus

    async def poison() -> None:
        bus = await Bus.connect(url, name="e2e")
        try:  # a namespace that is no subject token: no subject to answer on, so a dead letter
            await bus.js_publish(s.submit("x" * 300), b'{"spec": {}}', msg_id="poison-1")
        finally:
            await bus.close()

    asyncio.run(poison())
    listed = until(lambda: (out := cli(url, "dead-letters").stdout) and "SHOAL_SUBMISSIONS" in out and out, 30)
    assert "namespace is not a valid subject token" in listed and "shoal.submit.xxx" in listed
    raw = cli(url, "dead-letters", "-o", "json").stdout
    items = json.loads(raw)["items"]
    assert items[-1]["stream"] == "SHOAL_SUBMISSIONS" and items[-1]["attempts"] == 1

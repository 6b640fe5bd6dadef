"""The parts of the local stack that need no NATS: restart backoff, process names, supervision, the data-dir lock."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from services.cli.stack import Backoff, Stack, exit_reason, process_names
from shared.errors import Conflict


def test_backoff_doubles_from_half_a_second_to_thirty() -> None:
    backoff = Backoff()
    assert [backoff.next(uptime=0.1) for _ in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]


def test_backoff_starts_over_after_a_run_that_lasted() -> None:
    backoff = Backoff(base=0.5, cap=30, stable=10)
    assert [backoff.next(uptime=1) for _ in range(4)] == [0.5, 1, 2, 4]
    assert backoff.next(uptime=10) == 0.5
    assert backoff.next(uptime=9.9) == 1


def test_backoff_never_overflows() -> None:
    backoff = Backoff(base=0.5, cap=30)
    for _ in range(5000):
        delay = backoff.next(uptime=0)
    assert delay == 30


def test_one_replica_keeps_the_plain_names_and_more_are_numbered() -> None:
    assert process_names("scheduler", 1) == ["scheduler"]
    assert process_names("query", 3) == ["query-1", "query-2", "query-3"]
    with pytest.raises(ValueError):
        process_names("query", 0)


def test_each_query_replica_has_its_own_view_file(tmp_path) -> None:
    one = Stack(tmp_path)
    assert one.service_args("query") == ["serve", "query", "--db", str(tmp_path / "query.db")]
    assert one.service_args("scheduler") == ["serve", "scheduler"]
    two = Stack(tmp_path, replicas=2)
    assert two.service_names() == ["health-1", "health-2", "scheduler-1", "scheduler-2", "rollout-1", "rollout-2",
                                   "query-1", "query-2"]
    assert two.service_args("query-2") == ["serve", "query", "--db", str(tmp_path / "query-2.db")]
    assert two.service_args("rollout-1") == ["serve", "rollout"]


def test_exit_reasons_name_the_code_or_the_signal() -> None:
    assert exit_reason(3) == "exited with code 3"
    assert exit_reason(0) == "exited with code 0"
    assert exit_reason(-signal.SIGKILL) == "was killed by SIGKILL"
    assert exit_reason(-200) == "was killed by signal 200"


def wait_dead(stack: Stack, name: str) -> None:
    proc = stack.process(name)
    assert proc is not None
    proc.wait(timeout=10)


def test_a_dead_child_is_restarted_after_its_backoff_and_the_reason_is_logged(tmp_path) -> None:
    stack = Stack(tmp_path)
    try:
        stack.launch("flaky", [sys.executable, "-c", "raise SystemExit(3)"])
        wait_dead(stack, "flaky")
        assert stack.dead() == ["flaky"]
        now = time.monotonic()
        said = stack.supervise_once(now)
        assert len(said) == 1 and said[0].startswith("flaky exited with code 3 after ")
        assert said[0].endswith("; restarting it in 0.5s (restart 1)")
        assert stack.supervise_once(now + 0.4) == []  # not yet
        said = stack.supervise_once(now + 0.5)
        assert len(said) == 1 and said[0].startswith("flaky restarted (restart 1, pid ")
        wait_dead(stack, "flaky")
        # A second failure in a row waits twice as long.
        said = stack.supervise_once(time.monotonic())
        assert said[0].endswith("; restarting it in 1.0s (restart 2)")
        log = (tmp_path / "logs" / "flaky.log").read_text()
        assert "supervisor: flaky exited with code 3" in log and "supervisor: flaky restarted (restart 1" in log
    finally:
        stack.stop()
    assert stack.dead() == []


def test_a_child_killed_by_a_signal_says_so(tmp_path) -> None:
    stack = Stack(tmp_path)
    try:
        stack.launch("victim", [sys.executable, "-c", "import time; time.sleep(60)"])
        stack.kill("victim", signal.SIGKILL)
        said = stack.supervise_once()
        assert len(said) == 1 and said[0].startswith("victim was killed by SIGKILL after ")
        stack.restart("victim")  # at once, whatever the backoff says
        assert stack.dead() == [] and stack.supervise_once() == []
    finally:
        stack.stop()


def test_restart_of_a_running_child_stops_it_first(tmp_path) -> None:
    stack = Stack(tmp_path)
    try:
        first = stack.launch("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
        second = stack.restart("sleeper")
        assert first.poll() is not None and second.poll() is None and stack.process("sleeper") is second
        with pytest.raises(ValueError):
            stack.launch("sleeper", [sys.executable, "-c", "pass"])
    finally:
        stack.stop()


def test_a_data_dir_is_locked_by_one_stack_at_a_time(tmp_path) -> None:
    first = Stack(tmp_path / "data").lock()
    try:
        assert (tmp_path / "data" / "stack.lock").read_text().strip() == str(os.getpid())
        with pytest.raises(Conflict) as caught:
            Stack(tmp_path / "data").lock()
        message = str(caught.value)
        assert str((tmp_path / "data").resolve()) in message and f"pid {os.getpid()}" in message
    finally:
        first.stop()
    Stack(tmp_path / "data").lock().unlock()


def test_shoal_dev_says_where_its_nats_url_comes_from() -> None:
    from services.cli.stackcmd import nats_source

    assert nats_source("nats://a:4222", {"SHOAL_NATS_URL": "nats://b:4222"}) == "--nats-url"
    assert nats_source(None, {"SHOAL_NATS_URL": "nats://b:4222"}) == "SHOAL_NATS_URL"
    assert nats_source(None, {"SHOAL_NATS_URL": ""}) == ""
    assert nats_source(None, {}) == ""


def test_an_external_url_where_nothing_answers_fails_in_seconds_with_what_to_do() -> None:
    import asyncio

    from services.cli.stackcmd import probe
    from shared.errors import Unavailable
    from shared.natsserver import free_port

    url = f"nats://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(Unavailable) as caught:
        asyncio.run(probe(url, "SHOAL_NATS_URL", wait=0.5))
    assert time.monotonic() - started < 3
    assert str(caught.value) == (f"nothing answers at {url}; unset SHOAL_NATS_URL to let shoal dev start its own "
                                 "server, or start that server")
    with pytest.raises(Unavailable, match="drop --nats-url"):
        asyncio.run(probe(url, "--nats-url", wait=0))


def test_global_flags_may_stand_anywhere_on_the_line() -> None:
    from services.cli.main import build_parser, hoist_global_flags

    argv = ["serve", "query", "--nats-url", "nats://a:4222,nats://b:4222", "--db", "v.db", "--nats-nkey=/s.nk",
            "-n", "team-a", "--js-replicas", "3"]
    args = build_parser().parse_args(hoist_global_flags(argv))
    assert (args.command, args.service, args.db) == ("serve", "query", "v.db")
    assert (args.nats_url, args.nats_nkey, args.namespace, args.js_replicas) == (
        "nats://a:4222,nats://b:4222", "/s.nk", "team-a", 3)
    assert hoist_global_flags(["job", "run", "--", "-n"]) == ["job", "run", "--", "-n"]


def test_a_seed_list_is_split_and_an_empty_one_refused() -> None:
    import pytest

    from shared.errors import InvalidInput
    from shared.transport import servers

    assert servers(" nats://a:4222 ,nats://b:4222,") == ["nats://a:4222", "nats://b:4222"]
    with pytest.raises(InvalidInput):
        servers(" , ")


def test_each_process_of_a_stack_gets_its_own_metrics_port_or_none(tmp_path, monkeypatch) -> None:
    """One SHOAL_METRICS_PORT for every child would leave all but one unable to bind it (and a process
    that cannot serve its metrics exits): a stack gives its processes base, base+1, ... and keeps each
    process's port across restarts; without a base, no child inherits the user's port."""
    from services.cli.stack import Stack

    monkeypatch.setenv("SHOAL_METRICS_PORT", "9100")
    plain = Stack(tmp_path / "a", nats_url="nats://127.0.0.1:1")
    assert "SHOAL_METRICS_PORT" not in plain.child_env("query")
    stack = Stack(tmp_path / "b", nats_url="nats://127.0.0.1:1", metrics_port=9200)
    ports = [stack.child_env(name)["SHOAL_METRICS_PORT"] for name in ("scheduler", "rollout", "query", "agent-1")]
    assert ports == ["9200", "9201", "9202", "9203"]
    assert stack.child_env("rollout")["SHOAL_METRICS_PORT"] == "9201"  # the same after a restart
    assert stack.metrics_ports == {"scheduler": 9200, "rollout": 9201, "query": 9202, "agent-1": 9203}

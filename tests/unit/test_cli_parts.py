"""The CLI's explanations without a server: what a dry run finds (services/scheduler/submissions.py), how
the CLI words it and draws a rollout (services/cli/output.py, commands.py), the failure story of a
rollout status (services/rollout/service.py), and the small things: a spec from stdin, a YAML error that
names its file, --version, shell completion, a bad namespace."""

from __future__ import annotations

import datetime as dt
import io
import itertools
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from services.cli import main as cli_main
from services.cli.client import load_spec
from services.cli.commands import LOG_LINE_MAX, LogLines, LogTail, render_status, replaced_later, watch_lines
from services.cli.output import (
    LiveBlock,
    change_line,
    plan_lines,
    safe,
    wave_bar,
    wave_sizes_text,
)
from services.rollout.service import first_failures
from services.scheduler.evaluations import NodeTable
from services.scheduler.submissions import dry_run_plan
from shared.plan import explain_no_match, spec_changes
from shared.api import LogItem, NodeFailure, RollbackStory, RolloutStatus, WaveStatus, node_failure
from shared.codec import convert, from_json, to_json
from shared.errors import InvalidInput
from shared.models import (
    OUTPUT_SUMMARY_CHARS,
    DesiredState,
    DesiredStateType,
    DryRunPlan,
    Execution,
    ExecutionStatus,
    JobSpec,
    Node,
    NodeState,
    NodeStateType,
    ObservedState,
    ObservedStateType,
    SpecChange,
    SubmissionOutcome,
    details,
)

NOW = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.timezone.utc)


def node(node_id: str, state: NodeStateType = "ready", **labels: str) -> Node:
    return Node(id=node_id, labels=labels, state=NodeState(state_type=state),
                registered_at=NOW, updated_at=NOW, revision=1)


def spec(**fields) -> JobSpec:
    body = {"name": "app", "type": "pipeline", "config": {"command": ["sleep", "60"]}}
    body.update(fields)
    return convert(body, JobSpec)


# The fleet of the example in the explanation: 3 nodes with a region, none in eu-west.
FLEET = [node("n1", region="us-east", tier="edge"), node("n2", region="us-east", tier="edge"),
         node("n3", region="us-west", tier="edge", gpu="true"), node("n9", "disconnected", region="eu-west")]


# -- why a selector matches nothing ------------------------------------------------------------------


def test_a_label_value_no_ready_node_has_is_named_with_how_many_nodes_carry_the_label() -> None:
    reasons = explain_no_match(spec(selector={"match_labels": {"region": "eu-west"}}), FLEET)
    assert reasons == ["no ready node has label region=eu-west; 3 of the 3 ready nodes have a region label"]


@pytest.mark.parametrize(("selector", "expected"), [
    ({"match_expressions": ["region in (eu-west,ap-south)"]},
     "no ready node has region in (ap-south,eu-west); 3 of the 3 ready nodes have a region label"),
    ({"match_expressions": ["zone"]}, "no ready node has label zone; none of the 3 ready nodes has a zone label"),
    ({"match_expressions": ["!tier"]}, "every ready node has label tier; 3 of the 3 ready nodes have a tier label"),
    ({"match_expressions": ["region notin (us-east,us-west)"]},
     "every ready node has region in (us-east,us-west); 3 of the 3 ready nodes have a region label"),
    ({"match_expressions": ["gpu=false"]}, "no ready node has label gpu=false; 1 of the 3 ready nodes has a gpu label"),
    ({"match_expressions": ["region=us-east", "gpu"]},
     "no ready node meets all of: region=us-east (2 nodes), gpu (1 node)"),
    ({"match_ids": ["n9", "ghost"]}, "no ready node has one of the ids of match_ids: ghost is unknown, n9 is disconnected"),
    ({"match_ids": ["n1"], "match_labels": {"gpu": "true"}},
     "no ready node of match_ids has label gpu=true; none of the 1 ready node of match_ids has a gpu label"),
])
def test_each_unmet_requirement_is_explained(selector, expected) -> None:
    assert explain_no_match(spec(selector=selector), FLEET) == [expected]


def test_an_explanation_never_names_other_nodes_label_values_or_keys() -> None:
    """A tenant may dry-run: the fleet is told in counts of the selector's own terms, nothing more."""
    fleet = [node(f"n{i}", zone=f"secret-z{i % 12}", owner="other-team") for i in range(24)]
    for selector in ({"match_labels": {"zone": "nowhere"}}, {"match_expressions": ["gpu"]},
                     {"match_expressions": ["zone notin (" + ",".join(f"secret-z{i}" for i in range(12)) + ")"]}):
        (reason,) = explain_no_match(spec(selector=selector), fleet)
        given = " ".join(str(v) for v in selector.values())
        assert "other-team" not in reason and "owner" not in reason
        assert all(f"secret-z{i}" in given for i in range(12) if f"secret-z{i}" in reason)


def test_every_unmet_requirement_is_its_own_line_and_an_empty_fleet_says_so() -> None:
    both = explain_no_match(spec(selector={"match_labels": {"region": "eu-west", "zone": "a"}}), FLEET)
    assert len(both) == 2 and both[0].startswith("no ready node has label region=eu-west")
    assert both[1].startswith("no ready node has label zone=a")
    assert explain_no_match(spec(), []) == ["no node has registered"]
    assert explain_no_match(spec(), [node("x", "disconnected")]) == ["no node is ready (1 node known, all disconnected)"]


# -- the plan a dry run returns ----------------------------------------------------------------------


def test_dry_run_plan_counts_targets_names_the_first_ten_and_makes_the_rollouts_waves() -> None:
    fleet = NodeTable({n.id: n for n in [node(f"e{i:02d}", tier="edge") for i in range(25)]
                       + [node("off", "disconnected", tier="edge"), node("core", tier="core")]})
    rolling = spec(selector={"match_labels": {"tier": "edge"}},
                   rollout={"strategy": "rolling", "max_parallel": 30, "health_check": {"deadline": "1m"}})
    plan = dry_run_plan(rolling, fleet, None, None)
    assert (plan.ready_nodes, plan.matched_nodes, plan.matched_disconnected) == (26, 25, 1)
    assert plan.node_ids == [f"e{i:02d}" for i in range(10)]
    assert plan.waves == [8, 8, 8, 1] and plan.strategy == "rolling"
    assert plan.no_match == [] and plan.current_version == 0 and plan.changes == []
    nothing = dry_run_plan(spec(selector={"match_labels": {"tier": "cloud"}}), fleet, None, None)
    assert nothing.matched_nodes == 0 and nothing.waves == [] and nothing.no_match[0].startswith(
        "no ready node has label tier=cloud; 26 of the 26 ready nodes have a tier label")


def test_spec_changes_name_what_was_added_removed_and_changed() -> None:
    old = spec(description="ships logs", labels={"team": "obs"}, rollout={"max_parallel": 50})
    new = spec(labels={"team": "platform", "tier": "1"}, config={"command": ["sleep", "90"]},
               rollout={"strategy": "rolling", "max_parallel": 34,
                        "health_check": {"deadline": "1m", "interval": "500ms"}})
    changes = {c.path: c for c in spec_changes(old, new)}
    assert list(changes) == sorted(changes)
    assert changes["description"] == SpecChange(path="description", change="removed", old="ships logs")
    assert changes["labels.team"] == SpecChange(path="labels.team", change="changed", old="obs", new="platform")
    assert changes["labels.tier"] == SpecChange(path="labels.tier", change="added", new="1")
    assert changes["config.command"].old == ["sleep", "60"] and changes["config.command"].new == ["sleep", "90"]
    assert changes["rollout.max_parallel"].change == "changed"
    block = changes["rollout.health_check"]  # a block only one side has is one change, durations as written
    assert block.change == "added" and block.new["deadline"] == "1m0s" and block.new["interval"] == "500ms"
    assert set(changes) == {"description", "labels.team", "labels.tier", "config.command", "rollout.max_parallel",
                            "rollout.strategy", "rollout.health_check"}
    assert spec_changes(new, new) == []


def test_the_plan_travels_in_the_outcome_and_an_outcome_without_one_keeps_its_shape() -> None:
    plan = DryRunPlan(ready_nodes=3, matched_nodes=0, no_match=["why"], changes=[
        SpecChange(path="a", change="added", new=1)])
    outcome = SubmissionOutcome(submission_id="s", namespace="default", accepted=True, dry_run=True, at=NOW,
                                plan=plan)
    assert from_json(to_json(outcome), SubmissionOutcome) == outcome
    plain = SubmissionOutcome(submission_id="s", namespace="default", accepted=True, at=NOW)
    assert b"plan" not in to_json(plain)
    assert b'"change":"added","new":1}' in to_json(plan)  # no "old" on an addition


# -- how the CLI words a plan ------------------------------------------------------------------------


def test_plan_lines_tell_nodes_waves_and_changes() -> None:
    found = DryRunPlan(ready_nodes=14, matched_nodes=12, node_ids=[f"n{i}" for i in range(10)], strategy="canary",
                       waves=[1, 4, 4, 3], current_version=2, current_state="running",
                       changes=[SpecChange(path="rollout.max_parallel", change="changed", old=50, new=34),
                                SpecChange(path="labels.team", change="added", new="platform"),
                                SpecChange(path="description", change="removed", old="old text")])
    text = "\n".join(plan_lines(found, "the selector (tier=edge)"))
    assert "nodes:   12 of 14 ready nodes match the selector (tier=edge): n0, n1," in text
    assert "n9 and 2 more" in text
    assert "waves:   canary, 4 waves: 1 + 4 + 4 + 3 nodes" in text
    assert "changes against version 2 (running):" in text
    assert "  ~ rollout.max_parallel: 50 -> 34" in text and "  + labels.team: platform" in text
    assert "  - description: old text" in text
    none = DryRunPlan(ready_nodes=3, matched_nodes=0, no_match=["no ready node has label region=eu-west"],
                      matched_disconnected=1)
    text = "\n".join(plan_lines(none, "the selector (region=eu-west)"))
    assert "none of 3 ready nodes matches the selector (region=eu-west)" in text
    assert "why:   no ready node has label region=eu-west" in text
    assert "1 disconnected node matches too" in text and "changes: a new job" in text


def test_wave_sizes_fold_runs_and_values_stay_on_one_line() -> None:
    assert wave_sizes_text([1, 34, 34, 31]) == "1 + 34 + 34 + 31"
    assert wave_sizes_text([1] + [10] * 9 + [3]) == "1 + 9×10 + 3"
    line = change_line(SpecChange(path="config.command", change="changed", old=["sh", "-c", "x" * 200], new=["b"]))
    assert len(line) < 100 and line.endswith('-> ["b"]')
    assert change_line(SpecChange(path="description", change="added", new="two\nlines")) == \
        'description: "two\\nlines"'.join(["+ ", ""])


# -- drawing a rollout -------------------------------------------------------------------------------


def waves(states: list[dict[str, int]], current: int) -> list[WaveStatus]:
    return [WaveStatus(wave=i, nodes=sum(s.values()), started=i <= current, states=s)
            for i, s in enumerate(states, start=1)]


def status(wave_list: list[WaveStatus], **fields) -> RolloutStatus:
    base = dict(job_id="j1", job_name="edge-app", job_version=2, job_state="deploying", strategy="rolling",
                state="deploying", current_wave=3, total_waves=len(wave_list), target_nodes=sum(w.nodes for w in wave_list),
                waves=wave_list, max_failed_nodes=3, max_failed_nodes_percent=10.0)
    base.update(fields)
    return RolloutStatus(**base)


def test_ten_waves_are_one_bar_line_within_80_columns() -> None:
    ten = waves([{"running": 10}] * 2 + [{"running": 4, "validating": 5, "failed": 1}]
                + [{"not started": 10}] * 7, current=3)
    lines, _ = watch_lines(status(ten, message="wave 3: waiting for 5 nodes to become healthy " * 3), 80,
                           now="12:00:00")
    assert len(lines) == 3 and all(len(line) <= 80 for line in lines)
    assert lines[0].startswith("12:00:00 edge-app v2: rollout deploying")
    bar = lines[1][lines[1].index("["): lines[1].index("]") + 1]
    assert bar.count("|") == 9
    cells = bar[1:-1].split("|")
    assert set(cells[0]) == set(cells[1]) == {"#"} and set(cells[-1]) == {"."} and len(set(map(len, cells))) == 1
    assert "x" in cells[2]  # a failure always shows, however narrow the cell
    assert lines[1].startswith("wave 3/10 [") and lines[1].endswith("] done 24/100 failed 0 (budget 3)")


def test_many_waves_shrink_to_a_character_each_then_share_one() -> None:
    hundred = waves([{"running": 1}] * 40 + [{"failed": 1}] + [{"not started": 1}] * 59, current=41)
    bar = wave_bar(hundred, 76)
    assert len(bar) <= 76 and "|" not in bar and "x" in bar and bar.startswith("[#")
    three = wave_bar(waves([{"running": 2}, {"running": 1, "starting": 1}, {"not started": 2}], 2), 60)
    assert three == "[##|#~|..]"
    for count in (1, 10, 37, 79, 80, 500, 5000):
        assert len(wave_bar(waves([{"not started": 1}] * count, 0), 70)) <= 70


def test_watch_redraws_in_place_on_a_terminal_and_writes_changes_once_elsewhere() -> None:
    tty = io.StringIO()
    block = LiveBlock(tty, tty=True)
    block.show(["a", "b"])
    block.show(["a", "b"])
    assert tty.getvalue() == "\x1b[Ja\nb\n\x1b[2F\x1b[Ja\nb\n"
    pipe = io.StringIO()
    block = LiveBlock(pipe, tty=False)
    block.show(["12:00:00 x", "y"], key="same")
    block.show(["12:00:01 x", "y"], key="same")
    block.show(["12:00:02 z", "y"], key="other")
    assert pipe.getvalue() == "12:00:00 x\ny\n12:00:02 z\ny\n" and "\x1b" not in pipe.getvalue()


# -- the story of a failed rollout -------------------------------------------------------------------


def execution(node_id: str, version: int, observed: ObservedStateType, message: str = "", *, created: int = 0,
              desired: DesiredStateType = "stopped", desired_message: str = "", **details) -> Execution:
    at = NOW + dt.timedelta(seconds=created)
    return Execution(id=f"{node_id}-v{version}-{created}", job_id="j1", job_type="pipeline", job_version=version,
                     namespace="default", node_id=node_id, status=ExecutionStatus(
                         created_at=at, updated_at=at, revision=1,
                         desired_state=DesiredState(state_type=desired, message=desired_message),
                         observed_state=ObservedState(state_type=observed, message=message),
                         details=details))


def test_first_failures_are_the_budgets_failures_with_what_the_node_said() -> None:
    runs = [
        execution("n1", 2, "failed", "exited with code 3", created=1, reason="exit", exit_code=3, output="boom\n\n"),
        execution("n1", 2, "failed", "exited with code 4", created=5, reason="exit", exit_code=4),  # a restart
        execution("n2", 2, "failed", "could not start: [Errno 2] No such file or directory: 'unamee'",
                  reason="start-error"),
        execution("n3", 2, "failed", "agent restarted", reason="agent-restart"),  # node trouble: not counted
        execution("n4", 2, "stopped", "stopped", desired_message="stalled: still pending 35s after it was created"),
        execution("n5", 1, "failed", "old version", reason="exit"),
        execution("n6", 2, "running", desired="running"),
    ]
    first = first_failures(runs, 2)
    assert sorted(first) == ["n1", "n2", "n4"] and first["n1"].status.details["exit_code"] == 3
    boom = node_failure("n1", first["n1"])
    assert (boom.message, boom.reason, boom.exit_code, boom.output) == ("exited with code 3", "exit", 3, "boom")
    stalled = node_failure("n4", first["n4"])
    assert stalled.message.startswith("stalled: still pending") and stalled.state == "stopped"
    assert node_failure("n7", None) == NodeFailure(node_id="n7")


def test_status_after_a_rollback_tells_what_failed_where_why_and_against_which_budget() -> None:
    failures = [NodeFailure(node_id=f"n{i}", execution_id=f"e{i}", state="failed", reason="start-error",
                            message="could not start: [Errno 2] No such file or directory: 'unamee'")
                for i in range(1, 6)]
    st = status(waves([{"running": 5}], 1), job_version=1, strategy="immediate", state="succeeded",
                job_state="rollout_failed", current_wave=0, rollback_of=2, max_failed_nodes=10,
                message="rolled back to version 1 on 5 nodes after: 5 of 5 nodes failed",
                rollback=RollbackStory(version=2, cause="5 of 5 nodes failed, more than the budget", target_nodes=5,
                                       failed_nodes=[f"n{i}" for i in range(1, 6)], failures=failures[:3],
                                       max_failed_nodes=0, max_failed_nodes_percent=0.0))
    text = render_status(st, "team-a")
    assert "rollback of version 2, whose rollout failed: 5 of 5 nodes failed, more than the budget" in text
    assert "version 2 failed on 5 nodes of 5 (its budget: more than 0 nodes or 0% fails the rollout)" in text
    assert "  n1: could not start: [Errno 2] No such file or directory: 'unamee' (reason: start-error)" in text
    assert "  and 2 more" in text and "failed nodes of this rollback: 0" in text
    assert "more than 10 nodes" not in text  # the stable version's budget is not the one that was broken
    assert "shoal -n team-a job executions edge-app --version 2 --state failed" in text
    decoded = from_json(to_json(st), RolloutStatus)
    assert decoded.rollback is not None and decoded.rollback.max_failed_nodes == 0
    assert b'"max_failed_nodes":0' in to_json(st.rollback)  # a zero budget is said, not omitted


def test_a_failing_rollout_lists_its_failed_nodes_and_control_characters_are_defused() -> None:
    st = status(waves([{"failed": 2, "running": 1}], 1), failed_nodes=["n1", "n2"], failures=[
        NodeFailure(node_id="n1", message="exited with code 1", reason="exit", exit_code=1, output="\x1b[2Jgone")])
    text = render_status(st)
    assert "failed nodes: 2 (budget: more than 3 nodes or 10% fails the rollout)" in text
    assert "  n1: exited with code 1 (reason: exit); output: ^[[2Jgone" in text and "\x1b" not in text
    assert "  and 1 more" in text
    assert safe("a\rb\x07\tc") == "a^Mb^G\tc"


# -- the small things --------------------------------------------------------------------------------


def test_a_spec_comes_from_stdin_and_a_yaml_error_names_its_file_on_one_line(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("name: from-stdin\ntype: query\nconfig: {command: [true]}\n"))
    assert load_spec("-").name == "from-stdin"
    monkeypatch.setattr("sys.stdin", io.StringIO('{"name": "json-in", "type": "query", "config": {"command": ["a"]}}'))
    assert load_spec("-").name == "json-in"
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(InvalidInput) as caught:
        load_spec(str(broken))
    message = caught.value.message
    assert message.startswith(f"{broken} is not valid YAML: line 2, column 1: ")
    assert "<unicode string>" not in message and "\n" not in message
    monkeypatch.setattr("sys.stdin", io.StringIO("a: b\n  c: d\n"))
    with pytest.raises(InvalidInput, match=r"^standard input is not valid YAML: line 2, column 4"):
        load_spec("-")


def test_version_bad_namespace_and_timeouts_fail_before_any_connection(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        cli_main.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("shoal ")
    # No NATS is reachable at this URL: the namespace is refused before anything is sent.
    code = cli_main.main(["--nats-url", "nats://127.0.0.1:1", "-n", "bad ns", "job", "list"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: invalid namespace 'bad ns'")
    assert "BadSubject" not in err[0]
    with pytest.raises(SystemExit):
        cli_main.main(["job", "run", "x.yaml", "--wait", "--timeout", "0"])
    assert "more than 0 seconds" in capsys.readouterr().err
    args = cli_main.build_parser().parse_args(["rollout", "watch", "app", "--timeout", "2.5"])
    assert args.watch_timeout == 2.5 and args.timeout == 10.0  # the request timeout is another flag


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_completes_commands_flags_and_choices() -> None:
    script = cli_main.completion_script(cli_main.build_parser(), "bash")

    def complete(*words: str) -> list[str]:
        quoted = " ".join(f"'{w}'" for w in words)
        probe = f'{script}\nCOMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; _shoal; printf "%s\\n" "${{COMPREPLY[@]}}"'
        out = subprocess.run(["bash", "--norc", "-c", probe], capture_output=True, text=True, timeout=30, check=True)
        return out.stdout.split()

    assert {"job", "rollout", "node", "completion"} <= set(complete("shoal", ""))
    assert {"run", "list", "describe", "executions", "stop"} <= set(complete("shoal", "job", ""))
    assert complete("shoal", "-n", "ns", "rollout", "w") == ["watch"]
    assert complete("shoal", "job", "run", "--d") == ["--dry-run"]
    assert complete("shoal", "job", "list", "-o", "") == ["table", "json", "yaml"]
    assert complete("shoal", "completion", "") == ["bash", "zsh"]
    assert "--timeout" in complete("shoal", "rollout", "watch", "app", "--t")
    assert "--version" not in complete("shoal", "job", "list", "--")  # global-only flags stay before the command
    zsh = cli_main.completion_script(cli_main.build_parser(), "zsh")
    assert zsh.startswith("#compdef shoal") and "bashcompinit" in zsh and "complete -o default -F _shoal shoal" in zsh


def test_every_command_path_of_the_parser_is_in_the_completion() -> None:
    script = cli_main.completion_script(cli_main.build_parser(), "bash")
    for path in ("job run", "job describe", "rollout watch", "node list", "dead-letters", "auth"):
        assert f'"{path}")' in script
    assert list(itertools.islice(script.splitlines(), 1)) == ["# shoal bash completion: source <(shoal completion bash)"]


# -- the README and the simulated fleet ---------------------------------------------------------------

README = Path(__file__).resolve().parents[2] / "README.md"
EXAMPLES = README.parent / "examples"


def test_the_readme_activates_the_venv_before_anything_else() -> None:
    text = README.read_text()
    using = text[text.index("## Using it"):]
    first = next(line for line in using.splitlines() if line.startswith(("source", "shoal")))
    assert first.startswith("source .venv/bin/activate")


def test_the_readme_labels_simulated_nodes_so_that_every_example_selects_them() -> None:
    """The README's `shoal dev --simulate N --sim-label ...` line makes simulated nodes that the README's
    own spec and every example under examples/ select, and they keep the default labels its `node list`
    selector picks."""
    from services.agent.service import DEFAULT_SIM_LABELS, expand, parse_labels
    from shared.selector import compile_selector

    [line] = [line for line in README.read_text().splitlines() if line.startswith("shoal dev --simulate")]
    given = re.findall(r"--sim-label (\S+)", line)
    assert given
    cli_main.check_sim_labels(given)
    fleet = {f"sim-{i:04d}": parse_labels([expand(t, i) for t in (*DEFAULT_SIM_LABELS, *given)])
             for i in range(1, 7)}
    text = README.read_text()
    readme_spec = yaml.safe_load(text[text.index("```yaml\nname: pipeline-logs") + 8:].split("```")[0])
    specs = [readme_spec] + [yaml.safe_load(p.read_text()) for p in sorted(EXAMPLES.glob("*.yaml"))]
    assert len(specs) >= 5
    for body in specs:
        sel = body.get("selector", {})
        matcher = compile_selector(sel.get("match_labels"), sel.get("match_expressions"), sel.get("match_ids"))
        assert all(matcher.matches(nid, labels) for nid, labels in fleet.items()), (body["name"], fleet)
    for selector in re.findall(r"^shoal node list --selector '([^']+)'", text, re.M):
        if "simulated" in selector:
            matcher = compile_selector(None, [selector])
            assert sum(matcher.matches(nid, labels) for nid, labels in fleet.items()) == 4  # zone-0 and zone-1


def test_sim_labels_add_to_the_defaults_and_bad_ones_are_refused_naming_the_field(capsys) -> None:
    from services.agent.service import DEFAULT_SIM_LABELS

    args = cli_main.build_parser().parse_args(["dev", "--simulate", "4", "--sim-label", "tier=edge",
                                               "--sim-label", "rack=r{i%2}", "--http-port", "0"])
    assert args.sim_label == ["tier=edge", "rack=r{i%2}"] and args.http_port == 0
    assert DEFAULT_SIM_LABELS == ("simulated=true", "zone=zone-{i%3}")  # what the README's node list selects
    for bad, field in (("nope", "sim_label"), ("x y=1", "sim_label.x y"), ("ok=a b", "sim_label.ok")):
        assert cli_main.main(["dev", "--sim-label", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.rstrip().endswith(f"(field: {field})") and err.count("\n") == 1


# -- job output in the CLI -----------------------------------------------------------------------------


def log(execution_id: str, node_id: str, seq: int, text: str, final: bool = False) -> LogItem:
    return LogItem(execution_id=execution_id, node_id=node_id, seq=seq, text=text, at=NOW, final=final)


def test_log_lines_hold_a_cut_line_but_never_more_than_a_bound() -> None:
    lines = LogLines({"n1"})
    assert lines.add([log("e1", "n1", 1, "hel")]) == []
    assert lines.add([log("e1", "n1", 2, "lo\nwor")]) == [("e1", "hello")]
    endless = "x" * (LOG_LINE_MAX + 1)
    assert lines.add([log("e1", "n1", 3, endless)]) == [("e1", "wor" + endless)]  # shown, not held on
    assert lines.partial == {}
    assert lines.add([log("e1", "n1", 4, "\x1b[2Jbye", final=True)]) == [("e1", "^[[2Jbye")]
    assert lines.ended == {"e1"}


def test_the_tail_keeps_the_last_lines_of_each_execution_in_their_order() -> None:
    tail = LogTail(2)
    tail.add([("a", "a1"), ("b", "b1"), ("a", "a2"), ("a", "a3")])
    tail.add([("b", "b2"), ("b", "b3"), ("a", "a4")])
    assert tail.lines() == [("a", "a3"), ("b", "b2"), ("b", "b3"), ("a", "a4")]
    assert max(len(kept) for kept in tail.kept.values()) == 2


@pytest.mark.parametrize(("policy", "observed", "desired", "replaced"), [
    ("on-failure", "failed", "running", True),
    ("on-failure", "completed", "running", False),
    ("always", "completed", "running", True),
    ("never", "failed", "running", False),
    ("on-failure", "failed", "stopped", False),  # stopped by the user (or the job): no restart
])
def test_a_follow_goes_on_while_the_restart_policy_replaces_an_ended_execution(
        policy, observed: ObservedStateType, desired: DesiredStateType, replaced: bool) -> None:
    e = execution("n1", 1, observed, desired=desired)
    assert replaced_later(e, spec(restart_policy=policy)) is replaced
    e.status.next_execution_id = "n1-v1-restart"
    assert not replaced_later(e, spec(restart_policy=policy))  # already replaced: the successor is followed


def test_details_keep_only_the_last_lines_of_output_and_read_typed() -> None:
    from services.agent.output import output_summary

    printed = "".join(f"line {i:03d}\n" for i in range(500))
    summary = output_summary(printed)
    assert len(summary) <= OUTPUT_SUMMARY_CHARS and summary.endswith("line 499\n") and summary.startswith("line ")
    assert output_summary("done\n") == "done\n"
    assert details(execution("n1", 1, "failed", output=summary)).output == summary
    assert details(execution("n1", 1, "failed", output=["not", "text"])).output == ""
    assert details(execution("n1", 1, "failed", output="y" * 5000)).output == "y" * OUTPUT_SUMMARY_CHARS
    boom = node_failure("n1", execution("n1", 1, "failed", "exited with code 3", output="a\nlast words\n\n"))
    assert boom.output == "last words"

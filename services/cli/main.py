"""The `shoal` command: run the services, agents and a local stack, and talk to the API.

Errors that a user can cause (unreachable NATS, a missing job, bad input) print one line and exit
non-zero; a traceback always means a bug. Output piped into a command that stops reading early
(`shoal job list -o json | head`) ends quietly, as a command killed by SIGPIPE does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from shared import runtime
from shared.errors import ShoalError
from shared.models import DEFAULT_NAMESPACE
from shared.settings import DEFAULT_NATS_URL, from_env

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 124  # --timeout passed before a job or rollout settled (as timeout(1) exits)
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a command killed by SIGPIPE
SIM_LABEL_HELP = ("label of the simulated nodes, over the defaults simulated=true and zone=zone-{i%%3}; {i} is the "
                  "node's number, {i%%3} its remainder: 'tier=edge', 'rack=r{i%%4}' (repeatable)")
# Commands whose requests name the namespace (-n) in their subjects.
NAMESPACED_COMMANDS = frozenset({"job", "rollout"})


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("shoal")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal", description="Job orchestration for fleets of edge nodes.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument("--nats-url", default=None,
                        help=f"NATS seed list, comma-separated (default: $SHOAL_NATS_URL or {DEFAULT_NATS_URL})")
    for flag, env, text in CONNECTION_FLAGS:
        parser.add_argument(flag, default=None, help=f"{text} (default: ${env})")
    parser.add_argument("--js-replicas", type=int, default=None,
                        help="replicas of every stream and bucket created (default: $SHOAL_JS_REPLICAS or 1)")
    parser.add_argument("-n", "--namespace", default=os.environ.get("SHOAL_NAMESPACE", DEFAULT_NAMESPACE),
                        help="namespace (default: $SHOAL_NAMESPACE or 'default')")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an answer")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run one service")
    serve.add_argument("service", choices=["scheduler", "rollout", "health", "query", "gateway"])
    serve.add_argument("--port", type=int, default=None,
                       help="gateway: HTTP port (default: $SHOAL_HTTP_PORT or 8080)")
    serve.add_argument("--host", default=None, help="gateway: address to listen on (default: $SHOAL_HTTP_HOST or 127.0.0.1)")
    serve.add_argument("--insecure", action="store_true", default=os.environ.get("SHOAL_GATEWAY_INSECURE", "") == "1",
                       help="gateway: serve without SHOAL_GATEWAY_TOKENS on a non-loopback address, trusting every "
                            "caller (default: $SHOAL_GATEWAY_INSECURE=1)")
    serve.add_argument("--replicas", type=int, default=1, help="run this many replicas in this process")
    serve.add_argument("--db", default=None, help="query service: SQLite view file (default: $SHOAL_QUERY_DB)")
    serve.add_argument("--ready-file", default="",
                       help="once serving, write the service's instance ids here (for `shoal ping --ready-file`)")

    ping = sub.add_parser("ping", help="exit 0 if the given service instances answer (a readiness probe)")
    ping.add_argument("--ready-file", default="", help="the file `shoal serve --ready-file` wrote")
    ping.add_argument("--service", default="", help="or: any instance of this service (shoal-query, ...)")

    agent = sub.add_parser("agent", help="run a node agent (or a simulated fleet)")
    agent.add_argument("--node-id", default="", help="node id (default: the host name)")
    agent.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="node label (repeatable)")
    agent.add_argument("--work-dir", default=".shoal-agent", help="where executions run and config files land")
    agent.add_argument("--simulate", type=int, default=0, metavar="N", help="run N simulated nodes instead")
    agent.add_argument("--sim-prefix", default="sim-{i:04d}", help="id template of simulated nodes")
    agent.add_argument("--sim-label", action="append", default=[], metavar="KEY=TEMPLATE",
                       help=SIM_LABEL_HELP)
    agent.add_argument("--disconnect-rate", type=float, default=0.0,
                       help="simulated nodes: chance per heartbeat to drop off the network")
    agent.add_argument("--disconnect-duration", type=float, default=5.0, help="seconds a dropped node stays off")
    agent.add_argument("--stop-grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")

    dev = sub.add_parser("dev", help="run nats-server, all services and agents locally until Ctrl-C")
    dev.add_argument("--nodes", type=int, default=3, help="real agents to start")
    dev.add_argument("--simulate", type=int, default=0, metavar="N", help="also start N simulated nodes")
    dev.add_argument("--data-dir", default=".shoal-dev", help="state of the local stack")
    dev.add_argument("--auth", action="store_true",
                     help="refuse anonymous clients: every process gets its own NKey identity (shoal auth)")
    dev.add_argument("--replicas", type=int, default=1,
                     help="processes per service (scheduler-1, scheduler-2, ...; one view file per query process)")
    dev.add_argument("--sim-label", action="append", default=[], metavar="KEY=TEMPLATE", help=SIM_LABEL_HELP)
    dev.add_argument("--http-port", type=int, default=0,
                     help="port of the HTTP gateway it starts (default: a free port; its URL is printed)")
    dev.add_argument("--metrics-port", type=int, default=0, metavar="N",
                     help="serve each process's metrics on its own port from N up (default: off)")

    demo = sub.add_parser("demo", help="start a local stack, run the examples, show the results, exit")
    demo.add_argument("--examples", default="examples", help="directory of example job specs")
    demo.add_argument("--data-dir", default="", help="keep the stack's state here (default: a temporary dir)")

    job = sub.add_parser("job", help="submit, inspect and stop jobs").add_subparsers(dest="job_command",
                                                                                      required=True, metavar="ACTION")
    run = job.add_parser("run", help="submit a job spec (YAML or JSON)")
    run.add_argument("file", help="the spec file; - reads it from standard input")
    run.add_argument("--wait", action="store_true",
                     help="wait until the job is deployed or finished; exit 1 if it failed (saying why) or is "
                          "queued with no node to run on")
    run.add_argument("--timeout", dest="wait_timeout", type=_seconds, default=None, metavar="SECONDS",
                     help=f"with --wait: give up after this long, exit {EXIT_TIMEOUT} (default: no limit)")
    run.add_argument("--dry-run", action="store_true",
                     help="apply nothing; show the nodes it would run on (or why none), its waves and what "
                          "changes against the current version")
    run.add_argument("--force", action="store_true", help="apply even if the spec is unchanged")
    _output(run)
    jl = job.add_parser("list", help="list jobs")
    jl.add_argument("--state", default=None)
    jl.add_argument("--type", default=None)
    _paging(jl)
    _output(jl)
    jd = job.add_parser("describe", help="show one job")
    jd.add_argument("job", help="job id or name")
    _output(jd)
    je = job.add_parser("executions", help="list a job's executions")
    je.add_argument("job", help="job id or name")
    _paging(je)
    je.add_argument("--order-by", choices=["created_at", "updated_at"], default="created_at")
    je.add_argument("--reverse", action="store_true")
    je.add_argument("--version", type=int, default=None, help="job version (default: the latest)")
    je.add_argument("--all-versions", action="store_true")
    je.add_argument("--node", default="", help="only this node")
    je.add_argument("--state", default=None, help="only this observed state")
    _output(je)
    js = job.add_parser("stop", help="stop a job: every execution's desired state becomes stopped")
    js.add_argument("job", help="job id or name")
    js.add_argument("--reason", default="")
    jo = job.add_parser("logs", help="what the job's commands printed (the last lines of each execution)")
    jo.add_argument("job", help="job id or name")
    jo.add_argument("--node", default="", help="only this node")
    jo.add_argument("-f", "--follow", action="store_true", help="then print what they print next, until Ctrl-C or "
                                                                 "until every execution has ended")
    jo.add_argument("--since-start", action="store_true", help="all the output that is kept, not its last lines")

    node = sub.add_parser("node", help="inspect nodes").add_subparsers(dest="node_command", required=True,
                                                                       metavar="ACTION")
    nl = node.add_parser("list", help="list nodes, optionally by selector")
    nl.add_argument("--selector", action="append", default=[], metavar="EXPR",
                    help="label selector expression, e.g. 'region in (us-east,us-west)' (repeatable, ANDed)")
    nl.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="exact label (repeatable)")
    nl.add_argument("--id", action="append", default=[], dest="ids", help="only these node ids (repeatable)")
    nl.add_argument("--state", choices=["ready", "disconnected"], default=None)
    _paging(nl)
    _output(nl)

    dead = sub.add_parser("dead-letters", help="messages given up on after repeated failures, and why")
    _paging(dead)
    _output(dead)

    rollout = sub.add_parser("rollout", help="inspect and steer a job's rollout").add_subparsers(
        dest="rollout_command", required=True, metavar="ACTION")
    for action, text in (("status", "where the rollout stands"), ("promote", "continue after the canary wave"),
                         ("pause", "start no new waves"), ("resume", "continue a paused rollout"),
                         ("abort", "stop the rollout and roll back"), ("watch", "live progress until it ends")):
        p = rollout.add_parser(action, help=text)
        p.add_argument("job", help="job id or name")
        if action in ("promote", "pause", "resume", "abort"):
            p.add_argument("--reason", default="")
        if action in ("status", "promote", "pause", "resume", "abort"):
            _output(p)
        if action == "watch":
            p.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
            p.add_argument("--timeout", dest="watch_timeout", type=_seconds, default=None, metavar="SECONDS",
                           help=f"give up after this long, exit {EXIT_TIMEOUT} (default: until it ends)")
    from .auth import add_auth_parser

    add_auth_parser(sub)
    completion = sub.add_parser("completion", help="print a shell completion script: "
                                                   "source <(shoal completion bash)")
    completion.add_argument("shell", choices=["bash", "zsh"])
    return parser


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return value


def _output(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")


def _paging(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=None, help="page size (default 20, at most 1000)")
    p.add_argument("--next-token", default="", help="continue from a previous page")


# Connection flags of every command, each also an environment variable (see shared/settings.py).
CONNECTION_FLAGS = (
    ("--nats-creds", "SHOAL_NATS_CREDS", "JWT credentials file"),
    ("--nats-nkey", "SHOAL_NATS_NKEY", "NKey seed file"),
    ("--nats-user", "SHOAL_NATS_USER", "user name"),
    ("--nats-password", "SHOAL_NATS_PASSWORD", "password"),
    ("--nats-tls-ca", "SHOAL_NATS_TLS_CA", "CA certificates that sign the servers' certificates"),
    ("--nats-tls-cert", "SHOAL_NATS_TLS_CERT", "client certificate (mutual TLS)"),
    ("--nats-tls-key", "SHOAL_NATS_TLS_KEY", "client certificate's key"),
)
# Flags that belong to every command and may be written anywhere on the line (`shoal serve query
# --nats-url ...` as well as `shoal --nats-url ... serve query`): moved in front before parsing.
GLOBAL_VALUE_FLAGS = frozenset({"--nats-url", "-n", "--namespace", "--js-replicas",
                                *(flag for flag, _, _ in CONNECTION_FLAGS)})


# Options whose value is a file or directory (the completion offers file names for them).
PATH_OPTIONS = frozenset({"--nats-creds", "--nats-nkey", "--nats-tls-ca", "--nats-tls-cert", "--nats-tls-key",
                          "--ready-file", "--db", "--work-dir", "--data-dir", "--examples", "--out", "--dir"})


def _completion_tables(parser: argparse.ArgumentParser) -> dict[str, dict[str, Any]]:
    """Per command path ("", "job", "job run", ...): its subcommands, options, the options that take a
    value (with their choices), and what its positional argument accepts."""
    tables: dict[str, dict[str, Any]] = {}

    def visit(p: argparse.ArgumentParser, path: str) -> None:
        entry: dict[str, Any] = {"commands": [], "options": [], "values": {}, "positional": None}
        tables[path] = entry
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    entry["commands"].append(name)
                    visit(child, f"{path} {name}".strip())
            elif action.option_strings:
                entry["options"] += action.option_strings
                if action.nargs != 0:
                    for flag in action.option_strings:
                        entry["values"][flag] = list(action.choices or [])
            elif entry["positional"] is None:
                entry["positional"] = list(action.choices) if action.choices else "files"
    visit(parser, "")
    return tables


def completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    """A bash completion for `shoal`, made from the parser itself (so it never lags behind a new flag);
    zsh runs the same through bashcompinit. Use: `source <(shoal completion bash)`."""
    tables = _completion_tables(parser)
    # After a command, only the global flags that may stand anywhere (hoisted before parsing) apply.
    hoisted = [flag for flag in tables[""]["options"] if flag in GLOBAL_VALUE_FLAGS]
    global_values = {flag: allowed for flag, allowed in tables[""]["values"].items() if flag in GLOBAL_VALUE_FLAGS}

    def case(name: str, rows: dict[str, str]) -> str:
        arms = "".join(f'        "{key}") echo {shlex_quote(value)} ;;\n' for key, value in rows.items() if value)
        return f"_shoal_{name}() {{\n    case \"$1\" in\n{arms}    esac\n}}\n"

    def shlex_quote(text: str) -> str:
        return "'" + text.replace("'", "'\\''") + "'"

    commands = {path: " ".join(e["commands"]) for path, e in tables.items()}
    options = {path: " ".join(dict.fromkeys(e["options"] + (hoisted if path else [])))
               for path, e in tables.items()}
    takes = {path: " ".join(dict.fromkeys([*e["values"], *(global_values if path else [])]))
             for path, e in tables.items()}
    choices: dict[str, str] = {}
    for path, e in tables.items():
        for flag, allowed in {**(global_values if path else {}), **e["values"]}.items():
            choices[f"{path}|{flag}"] = " ".join(allowed) if allowed else ("@files" if flag in PATH_OPTIONS else "")
    positional = {path: ("@files" if e["positional"] == "files" else " ".join(e["positional"]))
                  for path, e in tables.items() if e["positional"] and not e["commands"]}
    body = f"""# shoal {shell} completion: source <(shoal completion {shell})
{case("commands", commands)}{case("options", options)}{case("takes_value", takes)}{case("choices", choices)}{case("positional", positional)}
_shoal() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="" path="" word i skip=0 words
    ((COMP_CWORD > 0)) && prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    COMPREPLY=()
    for ((i = 1; i < COMP_CWORD; i++)); do
        word="${{COMP_WORDS[i]}}"
        if ((skip)); then skip=0; continue; fi
        case "$word" in
            --*=*) continue ;;
            -*) case " $(_shoal_takes_value "$path") " in *" $word "*) skip=1 ;; esac; continue ;;
        esac
        case " $(_shoal_commands "$path") " in
            *" $word "*) path="${{path:+$path }}$word" ;;
        esac
    done
    if ((skip)); then
        words="$(_shoal_choices "$path|$prev")"
        if [[ "$words" == "@files" ]]; then
            COMPREPLY=($(compgen -f -- "$cur"))
        elif [[ -n "$words" ]]; then
            COMPREPLY=($(compgen -W "$words" -- "$cur"))
        fi
        return 0
    fi
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$(_shoal_options "$path")" -- "$cur"))
        return 0
    fi
    words="$(_shoal_commands "$path")"
    [[ -z "$words" ]] && words="$(_shoal_positional "$path")"
    if [[ "$words" == "@files" ]]; then
        COMPREPLY=($(compgen -f -- "$cur"))
    else
        COMPREPLY=($(compgen -W "$words" -- "$cur"))
    fi
    return 0
}}
"""
    if shell == "zsh":
        return ("#compdef shoal\n" + body.replace("# shoal zsh completion", "# shoal zsh completion (bash's, through "
                                                                         "bashcompinit)", 1)
                + "autoload -U +X bashcompinit && bashcompinit\ncomplete -o default -F _shoal shoal\n")
    return body + "complete -o default -F _shoal shoal\n"


def hoist_global_flags(argv: list[str]) -> list[str]:
    """`argv` with every global flag (and its value) moved before the subcommand."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        name = word.split("=", 1)[0]
        if word == "--":
            rest += argv[i:]
            break
        if name in GLOBAL_VALUE_FLAGS and name.startswith("--") and "=" in word:
            front.append(word)
        elif word in GLOBAL_VALUE_FLAGS and i + 1 < len(argv):
            front += argv[i:i + 2]
            i += 1
        else:
            rest.append(word)
        i += 1
    return front + rest


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except BrokenPipeError:
        # The reader went away (`| head`): say nothing more, and let no later flush of stdout complain.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def run(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(hoist_global_flags(sys.argv[1:] if argv is None else list(argv)))
    if args.command == "completion":
        print(completion_script(parser, args.shell), end="")
        return 0
    if args.command == "auth" and args.auth_command != "rotate-page-key":
        from .auth import run as auth_run

        return auth_run(args)
    if args.command in ("dev", "agent"):
        try:
            check_sim_labels(args.sim_label)
        except ShoalError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    settings = from_env(nats_url=args.nats_url, js_replicas=args.js_replicas,
                        **{flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_"))
                           for flag, _, _ in CONNECTION_FLAGS})
    try:
        if args.command == "auth":
            return asyncio.run(rotate_page_key(args, settings))
        if args.command == "serve":
            return serve(args, settings)
        if args.command == "agent":
            return agent(args, settings)
        if args.command == "dev":
            from .stackcmd import dev

            return dev(args, settings)
        if args.command == "demo":
            from .demo import demo

            return demo(args, settings)
        if args.command in NAMESPACED_COMMANDS:
            check_cli_namespace(args.namespace)
        from . import commands

        handler: Callable[[Any, Any], Awaitable[int]] = commands.HANDLERS[args.command]
        return asyncio.run(commands.with_client(args, settings, handler))
    except ShoalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE if exc.code == 400 else EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def check_cli_namespace(namespace: str) -> None:
    """A namespace the API can be asked about (it is a subject token), before anything is sent."""
    from shared.validation import check_namespace

    try:
        check_namespace(namespace, "namespace")
    except ShoalError as exc:
        raise type(exc)(f"{exc.message} (set by -n/--namespace or $SHOAL_NAMESPACE)") from None


def check_sim_labels(templates: list[str]) -> None:
    """`--sim-label` templates that make valid labels (tried on node 1), before any process starts."""
    from services.agent.service import DEFAULT_SIM_LABELS, expand, parse_labels
    from shared.errors import InvalidInput
    from shared.validation import check_labels

    for template in templates:
        if "=" not in template or template.startswith("="):
            raise InvalidInput(f"--sim-label {template!r} must be KEY=TEMPLATE", field="sim_label")
        check_labels(parse_labels([expand(template, 1)]), "sim_label")
    check_labels(parse_labels([expand(t, 1) for t in (*DEFAULT_SIM_LABELS, *templates)]), "sim_label")


async def rotate_page_key(args: argparse.Namespace, settings) -> int:
    """`shoal auth rotate-page-key`: a new page-token signing key at once (see docs/SECURITY.md)."""
    from services.query.tokenkeys import rotate_now
    from shared.store import Store
    from shared.transport import Bus

    bus = await Bus.connect(settings.nats_url, name="shoal-cli", credentials=settings.credentials())
    try:
        key_id = await rotate_now(Store(bus), revoke=args.revoke)
    finally:
        await bus.close()
    print(f"page tokens are now signed with key {key_id}"
          + ("; every older key is deleted, so every earlier token is refused" if args.revoke else
             "; older keys verify until they expire"))
    return 0


def serve(args: argparse.Namespace, settings) -> int:
    if args.replicas < 1:
        raise ShoalError("--replicas must be at least 1", code=400)
    if args.service == "gateway":
        from services.gateway.service import check_exposure

        check_exposure(args.host, insecure=args.insecure)  # before waiting for NATS

    def factory(bus, s):
        if args.service == "scheduler":
            from services.scheduler import SchedulerService

            return SchedulerService(bus, s)
        if args.service == "rollout":
            from services.rollout import RolloutService

            return RolloutService(bus, s)
        if args.service == "health":
            from services.health import HealthService

            return HealthService(bus, s)
        if args.service == "gateway":
            from services.gateway import GatewayService

            return GatewayService(bus, s, port=args.port, host=args.host, insecure=args.insecure)
        from services.query import QueryService

        return QueryService(bus, s, db_path=args.db, numbered=args.replicas > 1)

    return runtime.run(factory, settings, f"shoal-{args.service}", replicas=args.replicas,
                       ready_file=args.ready_file)


def agent(args: argparse.Namespace, settings) -> int:
    from services.agent import AgentService
    from services.agent.service import parse_labels

    labels = parse_labels(args.label)

    def factory(bus, s):
        return AgentService(bus, s, node_id=args.node_id, labels=labels, work_dir=args.work_dir,
                            simulate=args.simulate, sim_prefix=args.sim_prefix, sim_labels=args.sim_label or None,
                            disconnect_rate=args.disconnect_rate, disconnect_duration=args.disconnect_duration,
                            stop_grace=args.stop_grace)

    return runtime.run(factory, settings, "shoal-agent")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

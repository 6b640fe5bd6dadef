"""`shoal dev`: a whole shoal on this machine until Ctrl-C.

It owns its data dir (a second `shoal dev` on the same one fails at once, naming the first), checks an
external NATS before starting anything against it, and supervises what it starts: a child that exits
is started again after a growing delay, with the reason printed here and written to that child's log,
so that one crash never takes the stack down. It also runs the HTTP gateway and prints the dashboard's
URL once the gateway answers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

from shared.errors import InvalidInput, Unavailable
from shared.settings import Settings
from shared.transport import Bus

from .client import Client
from .stack import Stack

# An external server that does not answer within this many seconds is not coming: say so, do not wait.
PROBE_SECONDS = 3.0
# How often dead children are looked for.
TICK = 0.5


def say(line: str) -> None:
    print(line, flush=True)  # a terminal or a pipe: each line as it happens


def nats_source(flag_url: str | None, environ: Mapping[str, str]) -> str:
    """Where an external NATS URL comes from ("--nats-url" or "SHOAL_NATS_URL"); "" for a local server."""
    if flag_url:
        return "--nats-url"
    if environ.get("SHOAL_NATS_URL"):
        return "SHOAL_NATS_URL"
    return ""


async def probe(url: str, source: str, wait: float = PROBE_SECONDS) -> None:
    """Fail within seconds, saying what to do, when nothing answers at an external URL.

    Services wait for their server for ever (it may be restarting), so without this a stale URL would
    only show as a stack that never becomes ready.
    """
    try:
        bus = await Bus.connect(url, name="shoal-dev", wait=wait)
    except Unavailable:
        fix = "unset SHOAL_NATS_URL" if source == "SHOAL_NATS_URL" else "drop --nats-url"
        raise Unavailable(f"nothing answers at {url}; {fix} to let shoal dev start its own server, "
                          "or start that server", retryable=False) from None
    await bus.close()


# The gateway is local: a proxy from the environment must not stand between.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def gateway_answers(url: str) -> bool:
    """Whether the gateway's /healthz says it serves (it does once connected to NATS)."""
    try:
        with _LOCAL.open(f"{url}healthz", timeout=1.0) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


async def wait_gateway(url: str, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await asyncio.to_thread(gateway_answers, url):
        if loop.time() > deadline:
            raise Unavailable(f"the gateway at {url} did not answer within {timeout:.0f}s; see its log")
        await asyncio.sleep(0.25)


async def wait_ready(stack: Stack, nodes: int, stopping: Callable[[], bool], timeout: float = 60.0) -> bool:
    """Until the stack answers (True) or we are asked to stop (False), supervising it meanwhile: a child
    that dies while the others start is restarted rather than waited for in vain."""
    bus = await Bus.connect(stack.nats_url, name="shoal-dev", wait=10, credentials=stack.credentials())

    async def ready_all() -> None:
        await Client(bus).wait_ready(nodes, timeout)
        if stack.gateway:
            await wait_gateway(stack.dashboard_url, timeout)

    try:
        ready = asyncio.ensure_future(ready_all())
        try:
            while not ready.done():
                await asyncio.wait({ready}, timeout=TICK)
                if stopping():
                    return False
                for line in stack.supervise_once():
                    say(line)
            ready.result()
            return True
        finally:
            if not ready.done():
                ready.cancel()
                await asyncio.gather(ready, return_exceptions=True)
    finally:
        await bus.close()


def dev(args: argparse.Namespace, settings: Settings) -> int:
    source = nats_source(args.nats_url, os.environ)
    replicas = getattr(args, "replicas", 1)  # processes per service: 1 where the parser has no --replicas
    if replicas < 1:
        raise InvalidInput("--replicas must be at least 1", field="replicas")
    auth = getattr(args, "auth", False)
    if auth and source:
        raise InvalidInput("--auth makes identities for a local nats-server; with an external one, use "
                           "`shoal auth` and its seeds instead", field="auth")
    http_port = getattr(args, "http_port", 0) or 0  # 0 where the parser has no --http-port: a free port
    if not 0 <= http_port <= 65535:
        raise InvalidInput(f"--http-port {http_port} is not between 0 and 65535", field="http_port")
    sim_labels = tuple(getattr(args, "sim_label", None) or ())
    metrics_port = getattr(args, "metrics_port", 0) or 0
    if not 0 <= metrics_port <= 65535 - 1000:
        raise InvalidInput(f"--metrics-port {metrics_port} leaves no room for a port per process", field="metrics_port")
    stack = Stack(Path(args.data_dir), nodes=args.nodes, simulate=args.simulate, replicas=replicas,
                  nats_url=settings.nats_url if source else "", auth=auth, gateway=True, http_port=http_port,
                  sim_labels=sim_labels, metrics_port=metrics_port)
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack.lock()
        if source:
            say(f"using NATS at {stack.nats_url} (from {source})")
            asyncio.run(probe(stack.nats_url, source))
        else:
            say(f"starting a local nats-server in {stack.data_dir / 'nats'}")
        if stopping:
            return 0
        stack.start()
        if not asyncio.run(wait_ready(stack, args.nodes + args.simulate, lambda: stopping)):
            say("stopping...")
            return 0
        say(f"shoal is running: NATS at {stack.nats_url}, {args.nodes} agents"
            + (f", {args.simulate} simulated nodes" if args.simulate else ""))
        say(f"  export SHOAL_NATS_URL={stack.nats_url}")
        if auth:
            say(f"  export SHOAL_NATS_NKEY={stack.seed('admin', 'admin')}    # anonymous clients are refused")
        say(f"dashboard: {stack.dashboard_url}")
        say(f"  HTTP API: {stack.dashboard_url}api/v1/...    OpenAPI: {stack.dashboard_url}openapi.json")
        token = stack.gateway_token()
        if token is not None:
            say(f"  the dashboard asks for a token: the admin token is in {token}")
        say("  shoal node list")
        say("  shoal job run examples/pipeline-logs.yaml --wait")
        if stack.metrics_ports:
            say("metrics: " + ", ".join(f"{name} :{port}" for name, port in stack.metrics_ports.items()))
        say(f"logs: {stack.data_dir / 'logs'}    stop: Ctrl-C")
        while not stopping:
            for line in stack.supervise_once():
                say(line)
            time.sleep(TICK)
        say("stopping...")
        return 0
    finally:
        stack.stop()

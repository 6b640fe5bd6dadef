"""`shoal dev`: a whole shoal on this machine until Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
from pathlib import Path

from shared.settings import Settings
from shared.transport import Bus

from .client import Client
from .stack import Stack


async def wait_ready(url: str, nodes: int, timeout: float = 60.0) -> None:
    bus = await Bus.connect(url, name="shoal-dev", wait=10)
    try:
        await Client(bus).wait_ready(nodes, timeout)
    finally:
        await bus.close()


def dev(args: argparse.Namespace, settings: Settings) -> int:
    external = args.nats_url or os.environ.get("SHOAL_NATS_URL", "")
    stack = Stack(Path(args.data_dir), nodes=args.nodes, simulate=args.simulate,
                  nats_url=settings.nats_url if external else "")
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    stack.start()
    try:
        asyncio.run(wait_ready(stack.nats_url, args.nodes + args.simulate))
        print(f"shoal is running: NATS at {stack.nats_url}, {args.nodes} agents"
              + (f", {args.simulate} simulated nodes" if args.simulate else ""))
        print(f"  export SHOAL_NATS_URL={stack.nats_url}")
        print("  shoal node list")
        print("  shoal job run examples/pipeline-logs.yaml --wait")
        print(f"logs: {stack.data_dir / 'logs'}    stop: Ctrl-C", flush=True)
        while not stopping:
            dead = stack.dead()
            if dead:
                print(f"process exited: {', '.join(dead)}; see {stack.data_dir / 'logs'}")
                return 1
            time.sleep(0.5)
        print("stopping...")
        return 0
    finally:
        stack.stop()

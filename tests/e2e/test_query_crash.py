"""A query replica killed with SIGKILL while events pour in must come back with a view equal to the buckets."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess

import pytest

from services.cli.client import Client
from services.cli.stack import shoal_command
from shared import topology
from shared.natsserver import NatsServer
from shared.store import Store
from shared.transport import Bus
from tests.integration.test_query import make_execution, make_job, put_job

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def start_query(url: str, db: str, log: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(shoal_command("serve", "query", "--db", db), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**os.environ, "SHOAL_NATS_URL": url})


def test_kill_minus_nine_of_a_query_replica_loses_no_update(tmp_path) -> None:
    rng = random.Random(7)
    server = NatsServer(tmp_path / "nats").start()
    db, log = str(tmp_path / "view.db"), str(tmp_path / "query.log")
    proc = start_query(server.url, db, log)

    async def scenario() -> None:
        nonlocal proc
        bus = await Bus.connect(server.url, name="test", wait=10)
        await topology.ensure(bus)
        store = Store(bus)
        client = Client(bus, timeout=10)
        job = make_job("default", "crash")
        await put_job(store, job)
        written: dict[str, int] = {}
        stop = asyncio.Event()

        async def writer() -> None:
            # New executions and updates of earlier ones, without pause, while the replica is killed.
            while not stop.is_set():
                if written and rng.random() < 0.3:
                    rec = await store.executions.get(
                        next(k for k in rng.sample(sorted(written), 1)))
                    assert rec is not None
                    rec.value.status.revision += 1
                    rec.value.status.observed_state.message = f"update {rec.value.status.revision}"
                    await store.executions.put(rec.key, rec.value)
                    written[rec.key] = rec.value.status.revision
                else:
                    batch = [make_execution(job, f"n{len(written) + i}") for i in range(20)]
                    await asyncio.gather(*(store.executions.put(e.key, e) for e in batch))
                    written.update({e.key: 1 for e in batch})
                await asyncio.sleep(0.005)

        task = asyncio.create_task(writer())
        for _ in range(6):
            await asyncio.sleep(rng.uniform(0.3, 1.2))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc = start_query(server.url, db, log)
        await asyncio.sleep(0.5)
        stop.set()
        await task

        truth = {e.id: e.status.revision for e in await store.all_executions()}

        async def converged() -> bool:
            try:
                items = await client.all_executions("crash")
            except Exception:
                return False
            return {e.id: e.status.revision for e in items} == truth

        deadline = asyncio.get_running_loop().time() + 45  # longer than any ack wait the old consumer had
        while not await converged():
            if asyncio.get_running_loop().time() > deadline:
                items = await client.all_executions("crash")
                seen = {e.id: e.status.revision for e in items}
                missing = [k for k in truth if k not in seen]
                stale = [k for k in truth if k in seen and seen[k] != truth[k]]
                raise AssertionError(f"view diverged from the bucket: {len(missing)} missing, {len(stale)} stale "
                                     f"of {len(truth)}")
            await asyncio.sleep(0.5)
        await bus.close()

    try:
        asyncio.run(scenario())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        server.stop()

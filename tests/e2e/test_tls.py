"""Connections over TLS with a client certificate (mutual TLS), as the deploy files configure NATS: the
settings (SHOAL_NATS_TLS_CA, _CERT, _KEY) reach every process, and a client without a certificate the
server trusts is refused."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from services.cli.stack import shoal_command
from shared import subjects as s, topology
from shared.errors import ShoalError
from shared.natsserver import NatsServer
from shared.transport import Bus, Credentials, Kv
from tests.unit.test_deploy import make_certificates

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


@pytest.fixture
def tls_server(tmp_path: Path):
    tls = make_certificates(tmp_path / "pki", ["localhost", "127.0.0.1"])
    block = (f"tls {{ cert_file: {json.dumps(str(tls / 'server.pem'))}, key_file: {json.dumps(str(tls / 'server-key.pem'))}, "
             f"ca_file: {json.dumps(str(tls / 'ca.pem'))}, verify: true, timeout: 2 }}\n")
    server = NatsServer(tmp_path / "nats", extra=block, scheme="tls").start()
    mine = Credentials(tls_ca=str(tls / "ca.pem"), tls_cert=str(tmp_path / "pki" / "client.pem"),
                       tls_key=str(tmp_path / "pki" / "client-key.pem"))
    try:
        yield server, mine
    finally:
        server.stop()


def test_a_client_with_a_trusted_certificate_uses_jetstream_over_tls(tls_server) -> None:
    server, mine = tls_server

    async def scenario() -> bytes:
        bus = await Bus.connect(server.url, name="tls", wait=5, credentials=mine)
        try:
            await topology.ensure(bus)
            kv = Kv(bus, s.BUCKET_CONFIG)
            await kv.put("probe", b"over tls")
            entry = await kv.get("probe")
            assert entry is not None
            return entry.value
        finally:
            await bus.close()

    assert asyncio.run(scenario()) == b"over tls"


@pytest.mark.parametrize("missing", ["client certificate", "CA"])
def test_a_client_without_what_mutual_tls_needs_is_refused(tls_server, missing: str) -> None:
    server, mine = tls_server
    creds = Credentials(tls_ca=mine.tls_ca) if missing == "client certificate" else Credentials(
        tls_cert=mine.tls_cert, tls_key=mine.tls_key)
    with pytest.raises(ShoalError):
        asyncio.run(Bus.connect(server.url, name="tls", wait=2, credentials=creds))


def test_a_service_process_connects_with_the_tls_settings(tls_server, tmp_path: Path) -> None:
    server, mine = tls_server
    env = {**os.environ, "SHOAL_NATS_URL": server.url, "SHOAL_NATS_TLS_CA": mine.tls_ca,
           "SHOAL_NATS_TLS_CERT": mine.tls_cert, "SHOAL_NATS_TLS_KEY": mine.tls_key}
    with open(tmp_path / "scheduler.log", "ab") as log:
        proc = subprocess.Popen(shoal_command("serve", "scheduler"), env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(shoal_command("ping", "--service", s.SERVICE_SCHEDULER), env=env,
                             capture_output=True).returncode != 0:
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "scheduler.log").read_text()
            time.sleep(0.5)
        bare = {k: v for k, v in env.items() if not k.startswith("SHOAL_NATS_TLS")}
        assert subprocess.run(shoal_command("ping", "--service", s.SERVICE_SCHEDULER), env=bare,
                              capture_output=True).returncode != 0
    finally:
        proc.terminate()
        proc.wait(timeout=20)

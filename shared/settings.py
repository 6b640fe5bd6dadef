"""Settings every process reads from its environment (and CLI flags override).

One struct, so that `shoal dev`, the services, agents and tests agree on names and defaults. Timing
knobs exist so that tests and demos can run the real system in seconds instead of minutes.
"""

from __future__ import annotations

import math
import os

import msgspec

from .transport import Credentials

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


class Settings(msgspec.Struct, kw_only=True):
    # A comma-separated seed list: the client reconnects across all of them.
    nats_url: str = DEFAULT_NATS_URL
    # Who this process is to NATS (see shared/transport/_auth.py); all optional.
    nats_creds: str = ""
    nats_nkey: str = ""
    nats_user: str = ""
    nats_password: str = ""
    nats_tls_ca: str = ""
    nats_tls_cert: str = ""
    nats_tls_key: str = ""
    # Replicas of every stream and bucket this process creates (3 on a 3-node cluster); never lowered.
    js_replicas: int = 1
    # Agents heartbeat this often; a node silent for node_timeout is disconnected and its executions lost.
    heartbeat_interval: float = 5.0
    node_timeout: float = 15.0
    # A lost execution whose node comes back within this grace resumes; after it, it counts as failed.
    lost_grace: float = 60.0
    # How often leader loops (node sweep, deadlines, timers) look at the world.
    sweep_interval: float = 1.0
    # Restart backoff: base * 2**restarts, capped.
    restart_backoff_base: float = 1.0
    restart_backoff_max: float = 60.0
    # A gated execution not settled this long after its health deadline has stalled (counted as failed).
    stall_grace: float = 30.0
    # The query service's SQLite view (one file per replica).
    query_db: str = "shoal-query.db"
    # How long a next_token stays good: the view keeps the rows a walk's snapshot needs this long.
    page_retention: float = 600.0
    # How often the query service replaces the key that signs page tokens (old keys verify a while longer).
    page_key_rotation: float = 7 * 86_400.0
    traces_exporter: str = "none"
    traces_file: str = ""
    log_level: str = "INFO"
    # Logs as plain text lines (`text`) or one JSON object per line with trace ids (`json`).
    log_format: str = "text"
    # Serve this process's metrics at http://<host>:<port>/metrics in the Prometheus format; 0: off.
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"  # where SHOAL_METRICS_PORT listens (unauthenticated: loopback unless told)

    def credentials(self) -> Credentials:
        return Credentials(creds=self.nats_creds, nkey=self.nats_nkey, user=self.nats_user,
                           password=self.nats_password, tls_ca=self.nats_tls_ca, tls_cert=self.nats_tls_cert,
                           tls_key=self.nats_tls_key)


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not a number") from None


def _at_least(name: str, default: float, least: float) -> float:
    value = _float(name, default)
    if not math.isfinite(value) or value < least:
        raise SystemExit(f"{name}={value!r} must be at least {least:g}")
    return value


LOG_FORMATS = ("text", "json")


def _choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = (os.environ.get(name) or default).strip().lower()
    if raw not in choices:
        raise SystemExit(f"{name}={raw!r} must be one of {', '.join(choices)}")
    return raw


def _port(name: str) -> int:
    value = _float(name, 0.0)
    if not value.is_integer() or not 0 <= value <= 65535:
        raise SystemExit(f"{name}={value!r} must be a port number (0-65535; 0: off)")
    return int(value)


def from_env(**overrides: object) -> Settings:
    """Settings from SHOAL_* variables; keyword arguments that are not None win."""
    env = os.environ
    settings = Settings(
        nats_url=env.get("SHOAL_NATS_URL") or DEFAULT_NATS_URL,
        nats_creds=env.get("SHOAL_NATS_CREDS", ""),
        nats_nkey=env.get("SHOAL_NATS_NKEY", ""),
        nats_user=env.get("SHOAL_NATS_USER", ""),
        nats_password=env.get("SHOAL_NATS_PASSWORD", ""),
        nats_tls_ca=env.get("SHOAL_NATS_TLS_CA", ""),
        nats_tls_cert=env.get("SHOAL_NATS_TLS_CERT", ""),
        nats_tls_key=env.get("SHOAL_NATS_TLS_KEY", ""),
        js_replicas=int(_float("SHOAL_JS_REPLICAS", 1)),
        heartbeat_interval=_float("SHOAL_HEARTBEAT_INTERVAL", 5.0),
        node_timeout=_float("SHOAL_NODE_TIMEOUT", 15.0),
        lost_grace=_float("SHOAL_LOST_GRACE", 60.0),
        sweep_interval=_float("SHOAL_SWEEP_INTERVAL", 1.0),
        restart_backoff_base=_float("SHOAL_RESTART_BACKOFF_BASE", 1.0),
        restart_backoff_max=_float("SHOAL_RESTART_BACKOFF_MAX", 60.0),
        stall_grace=_float("SHOAL_STALL_GRACE", 30.0),
        query_db=env.get("SHOAL_QUERY_DB") or "shoal-query.db",
        page_retention=_float("SHOAL_PAGE_RETENTION", 600.0),
        page_key_rotation=_at_least("SHOAL_PAGE_KEY_ROTATION", 7 * 86_400.0, 1.0),
        traces_exporter=env.get("SHOAL_TRACES_EXPORTER") or env.get("OTEL_TRACES_EXPORTER") or "none",
        traces_file=env.get("SHOAL_TRACES_FILE", ""),
        log_level=env.get("SHOAL_LOG_LEVEL", "INFO"),
        log_format=_choice("SHOAL_LOG_FORMAT", "text", LOG_FORMATS),
        metrics_port=_port("SHOAL_METRICS_PORT"),
        metrics_host=env.get("SHOAL_METRICS_HOST") or "127.0.0.1",
    )
    for name, value in overrides.items():
        if value is not None:
            setattr(settings, name, value)
    return settings

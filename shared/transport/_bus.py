"""The connection: publish, request, subscribe, JetStream setup and graceful shutdown.

This package is the only code that imports `nats`. Everything above it sees bytes, header dicts,
`ShoalError`s and small typed wrappers, so services can be tested against a real server without
knowing the client library's quirks (see ANCHORS: NoResponders is not a timeout, drain stalls after
a timed-out fetch, micro endpoints do not flush).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from ..codec import from_json
from ..errors import Conflict, ErrorReply, Internal, ShoalError, Unavailable
from .. import telemetry
from ._auth import Credentials, servers
from ._requests import Replies
from ._topology import BucketSpec, StreamSpec, bucket_config, stream_config

log = logging.getLogger(__name__)

ERROR_HEADER = "Nats-Service-Error"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"
MSG_ID_HEADER = "Nats-Msg-Id"
EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
# A stale expected sequence: 10071 from a single server; 10164 from a replicated stream's leader (which
# refuses it before proposing, e.g. while a write of the same subject is in flight). Both are a lost CAS.
WRONG_LAST_SEQUENCE = frozenset({10071, 10164})
# The server closes a connection that sends a protocol line longer than its max_control_line (4 KB by
# default) and nats-py does not reconnect after a server -ERR; so no subject may come near that.
MAX_SUBJECT = 1024
MAX_VIOLATIONS = 50
MAX_HEADER_VALUE = 1024


def message_size(data: bytes, headers: dict[str, str] | None) -> int:
    """Bytes a message counts against the server's max_payload: its payload plus its header block."""
    size = len(data)
    if headers:
        size += 12 + sum(len(k) + len(v.encode()) + 4 for k, v in headers.items())  # "NATS/1.0\r\n" ... "\r\n"
    return size


def header_value(text: str, limit: int = MAX_HEADER_VALUE) -> str:
    """A header value that cannot break the protocol: printable ASCII on one line, bounded."""
    clean = "".join(c if " " <= c <= "~" else "?" for c in text[:limit])
    return clean if len(text) <= limit else clean[: limit - 3] + "..."


class Message:
    """A core NATS message handed to a subscription handler."""

    __slots__ = ("_msg",)

    def __init__(self, msg: Msg) -> None:
        self._msg = msg

    @property
    def subject(self) -> str:
        return self._msg.subject

    @property
    def data(self) -> bytes:
        return self._msg.data

    @property
    def headers(self) -> dict[str, str]:
        return self._msg.headers or {}

    async def respond(self, data: bytes, headers: dict[str, str] | None = None) -> None:
        if self._msg.reply:
            client = self._msg._client
            check_size(self._msg.reply, data, headers, client.max_payload)
            await client.publish(self._msg.reply, data, headers=headers)


def check_size(subject: str, data: bytes, headers: dict[str, str] | None, max_payload: int) -> None:
    """Refuse, here, a message the server would answer by closing the connection."""
    if len(subject) > MAX_SUBJECT:
        raise Internal(f"subject of {len(subject)} characters is longer than {MAX_SUBJECT}")
    size = message_size(data, headers)
    if size > max_payload:
        raise Internal(f"message of {size} bytes is larger than the server's max_payload ({max_payload})")


class Expectation:
    """One message expected on a subject; see `Bus.expect`."""

    def __init__(self, sub: Any) -> None:
        self._sub = sub

    async def wait(self, timeout: float) -> bytes | None:
        try:
            msg = await self._sub.next_msg(timeout=timeout)
        except (asyncio.TimeoutError, nats.errors.TimeoutError):
            return None
        return msg.data

    async def close(self) -> None:
        try:
            await self._sub.unsubscribe()
        except Exception:  # already removed after its one message, or connection closed
            pass


class StoredMessage:
    """One message read back from a stream by sequence."""

    __slots__ = ("subject", "data", "headers", "seq", "at")

    def __init__(self, subject: str, data: bytes, headers: dict[str, str], seq: int, at: float) -> None:
        self.subject = subject
        self.data = data
        self.headers = headers
        self.seq = seq
        self.at = at


class PubAck:
    __slots__ = ("stream", "seq", "duplicate")

    def __init__(self, stream: str, seq: int, duplicate: bool) -> None:
        self.stream = stream
        self.seq = seq
        self.duplicate = duplicate


def map_error(exc: BaseException, what: str) -> ShoalError:
    """Translate a client-library failure into our error type."""
    if isinstance(exc, ShoalError):
        return exc
    if isinstance(exc, nats.js.errors.APIError) and exc.err_code in WRONG_LAST_SEQUENCE:
        return Conflict(f"{what}: changed concurrently")
    if isinstance(exc, (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError)):
        return Unavailable(f"{what}: nothing answers (is the service or JetStream running?)")
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, nats.errors.TimeoutError)):
        return Unavailable(f"{what}: timed out")
    if isinstance(exc, (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError,
                        nats.errors.ConnectionReconnectingError, nats.errors.StaleConnectionError,
                        nats.errors.NoServersError, OSError)):
        return Unavailable(f"{what}: not connected to NATS")
    if isinstance(exc, nats.js.errors.ServiceUnavailableError):
        return Unavailable(f"{what}: JetStream unavailable")
    if isinstance(exc, nats.js.errors.APIError):
        return Internal(f"{what}: {exc.description or exc}")
    return Internal(f"{what}: {type(exc).__name__}: {exc}")


class Bus:
    """One NATS connection and its JetStream context, shared by everything in a process."""

    def __init__(self, nc: Client, name: str) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.replies = Replies(nc)
        self.name = name
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self.closing = False
        # Set when the connection is closed for good without our asking (the server refused something
        # with -ERR, which nats-py does not recover from): the process must exit rather than live deaf.
        self.lost = asyncio.Event()
        self.lost_reason = ""
        # Bumped on every reconnect; readers that keep server-side state (ordered consumers) recreate it.
        self.generation = 0
        self.violations: list[str] = []  # the server's last permission refusals of this connection
        self.services: list[tuple[str, str]] = []  # (name, instance id) of the API services it serves
        self._on_reconnect: list[Callable[[], Awaitable[None] | None]] = []

    # -- lifecycle ---------------------------------------------------------------------------------

    @classmethod
    async def connect(cls, url: str, *, name: str, wait: float | None = 0.0,
                      credentials: Credentials | None = None) -> Bus:
        """Connect to a seed list (comma-separated URLs), retrying with backoff for up to `wait` seconds, or
        for ever when `wait` is None (a service may start before the server, or while it restarts)."""
        loop = asyncio.get_running_loop()
        deadline = None if wait is None else loop.time() + wait
        holder: list[Bus] = []
        delay = 0.25
        seeds = servers(url)
        options = (credentials or Credentials()).connect_options()
        tries = 0
        while True:
            tries += 1
            nc = Client()
            try:
                await nc.connect(
                    servers=seeds,
                    name=name,
                    connect_timeout=2,
                    # The first connect is tried once per call and retried here (with reconnects allowed,
                    # nats-py would hang after a TLS handshake failure); reconnects are allowed once connected.
                    allow_reconnect=False,
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0.5,
                    # A server that stops answering (not only one that closes the socket) is noticed in ~20 s.
                    ping_interval=10,
                    max_outstanding_pings=2,
                    error_cb=_on_error(name, holder),
                    disconnected_cb=_log_disconnect(name, holder),
                    reconnected_cb=_on_reconnect(name, holder),
                    closed_cb=_on_closed(name, holder),
                    **options,
                )
            except Exception as exc:  # the client raises several unrelated types here
                reason = f"{exc or type(exc).__name__}"
                await _discard(nc)
                # (Each call tries one seed, picked at random: try as many times as there are seeds.)
                if deadline is not None and loop.time() >= deadline and tries >= len(seeds):
                    raise Unavailable(f"cannot reach NATS at {url}: {reason}") from None
                if deadline is None:
                    log.warning("%s: cannot reach NATS at %s (%s); retrying in %.1fs", name, url, reason, delay)
                await asyncio.sleep(delay if deadline is None else min(delay, max(0.0, deadline - loop.time())))
                delay = min(delay * 2, 5.0)
                continue
            # Once connected, never give up reconnecting: a service outlives server restarts.
            nc.options["allow_reconnect"] = True
            nc.options["max_reconnect_attempts"] = -1
            bus = cls(nc, name)
            holder.append(bus)
            return bus

    def on_reconnect(self, callback: Callable[[], Awaitable[None] | None]) -> None:
        """Call `callback` after every reconnect (in the client's callback; keep it short)."""
        self._on_reconnect.append(callback)

    async def _reconnected(self) -> None:
        self.generation += 1
        for callback in list(self._on_reconnect):
            try:
                result = callback()
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("%s: reconnect callback failed", self.name)

    def on_close(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Register something to stop before the connection drains (consumers, services, watches)."""
        self._closers.append(closer)

    async def close(self) -> None:
        """Stop consumers and endpoints (newest first), then drain so in-flight replies go out."""
        self.closing = True
        closers, self._closers = self._closers, []
        results = await asyncio.gather(*(closer() for closer in reversed(closers)), return_exceptions=True)
        for closer, result in zip(reversed(closers), results):
            if isinstance(result, Exception):  # shutting down: report and keep going
                log.error("error while stopping %s: %s", closer, result)
        if self.nc.is_closed:
            return
        try:
            await asyncio.wait_for(self.nc.drain(), timeout=5)
        except Exception:
            await self.nc.close()

    @property
    def connected(self) -> bool:
        return self.nc.is_connected

    # -- core NATS ---------------------------------------------------------------------------------

    @property
    def max_payload(self) -> int:
        return self.nc.max_payload

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        hdrs = telemetry.inject(headers)
        check_size(subject, data, hdrs, self.nc.max_payload)
        try:
            await self.nc.publish(subject, data, headers=hdrs)
        except Exception as exc:
            raise map_error(exc, f"publish to {_short(subject)}") from None

    async def flush(self, timeout: float = 5) -> None:
        await self.nc.flush(timeout=timeout)

    async def request(
        self, subject: str, data: bytes, *, timeout: float = 5.0, headers: dict[str, str] | None = None
    ) -> bytes:
        """Request-reply; a structured error reply is raised as the matching ShoalError."""
        with telemetry.span(f"request {subject}", kind=telemetry.CLIENT, subject=subject, body_size=len(data)):
            hdrs = telemetry.inject(headers)
            check_size(subject, data, hdrs, self.nc.max_payload)
            try:
                msg = await self.replies.request(subject, data, timeout=timeout, headers=hdrs)
            except Exception as exc:
                raise map_error(exc, f"request {subject}") from None
        hdrs = msg.headers or {}
        if ERROR_CODE_HEADER in hdrs:
            raise _error_from_reply(msg.data, hdrs)
        return msg.data

    async def expect(self, subject: str) -> Expectation:
        """Subscribe now to a subject whose one message will come later (avoids a subscribe/publish race)."""
        sub = await self.nc.subscribe(subject, max_msgs=1)
        return Expectation(sub)

    async def subscribe(
        self, subject: str, handler: Callable[[Message], Awaitable[None]], *, queue: str = "",
        traced: bool = True,
    ) -> None:
        """Core subscription; replicas that pass the same `queue` share the messages. `traced=False` for
        a stream of small beats (heartbeats) that carry no trace: no span per message."""

        async def on_msg(msg: Msg) -> None:
            try:
                if traced:
                    with telemetry.span(f"process {msg.subject}", kind=telemetry.CONSUMER, headers=msg.headers,
                                        subject=msg.subject, consumer_group=queue or None,
                                        body_size=len(msg.data)):
                        await handler(Message(msg))
                else:
                    await handler(Message(msg))
            except Exception:
                log.exception("handler for %s failed", msg.subject)

        sub = await self.nc.subscribe(subject, queue=queue, cb=on_msg)
        self.on_close(sub.unsubscribe)

    # -- JetStream ---------------------------------------------------------------------------------

    async def js_publish(
        self,
        subject: str,
        data: bytes,
        *,
        msg_id: str | None = None,
        headers: dict[str, str] | None = None,
        expected_last_subject_seq: int | None = None,
        timeout: float = 5.0,
    ) -> PubAck:
        """Publish into a stream and wait for the ack. Conflict when the expected sequence is stale."""
        hdrs = telemetry.inject(headers)
        if msg_id:
            hdrs[MSG_ID_HEADER] = msg_id
        if expected_last_subject_seq is not None:
            hdrs[EXPECTED_LAST_SUBJECT_SEQ] = str(expected_last_subject_seq)
        check_size(subject, data, hdrs, self.nc.max_payload)
        try:
            stream, seq, duplicate = await self.replies.publish(subject, data, headers=hdrs, timeout=timeout)
        except Exception as exc:
            raise map_error(exc, f"publish to {subject}") from None
        return PubAck(stream, seq, duplicate)

    async def ensure_stream(self, spec: StreamSpec) -> None:
        """Create the stream, or bring an existing one to our config (sources and limits may change between
        versions) without lowering its replicas: an operator may have raised them."""
        config = stream_config(spec)
        try:
            await self.js.add_stream(config)
        except nats.js.errors.BadRequestError:
            try:
                existing = (await self.js.stream_info(spec.name)).config
                config.num_replicas = max(config.num_replicas or 1, existing.num_replicas or 1)
                if _differs(config, existing):
                    await self.js.update_stream(config)
            except Exception as exc:
                raise map_error(exc, f"update stream {spec.name}") from None
        except Exception as exc:
            raise map_error(exc, f"create stream {spec.name}") from None

    async def ensure_bucket(self, spec: BucketSpec) -> None:
        """Create the bucket, or raise an existing one's replicas to ours (never lower them)."""
        config = bucket_config(spec)
        try:
            await self.js.create_key_value(config)
            created = True
        except nats.js.errors.BadRequestError:
            created = False
        except Exception as exc:
            raise map_error(exc, f"create bucket {spec.name}") from None
        if created and not spec.msg_ttl:
            return
        try:
            existing = (await self.js.stream_info(f"KV_{spec.name}")).config
            changed = False
            if (existing.num_replicas or 1) < spec.replicas:
                existing.num_replicas, changed = spec.replicas, True
            if spec.msg_ttl and not existing.allow_msg_ttl:  # may be turned on later, never off
                existing.allow_msg_ttl, changed = True, True
            if changed:
                await self.js.update_stream(existing)
        except Exception as exc:
            raise map_error(exc, f"open bucket {spec.name}") from None

    async def reset_pull_consumer(self, stream: str, name: str, filter_subject: str, *, ack_wait: float = 5.0,
                                  inactive_threshold: float = 7 * 86_400.0,
                                  filter_subjects: Sequence[str] = ()) -> None:
        """(Re)create a durable pull consumer that starts with the last message of every subject it
        filters, then follows new ones: what a reader that lost its place (an agent that restarted) needs.
        Created by a service on a client's behalf, so that clients never create consumers themselves."""
        try:
            await self.js.delete_consumer(stream, name)
        except nats.js.errors.NotFoundError:
            pass
        except Exception as exc:
            raise map_error(exc, f"reset consumer {stream}/{name}") from None
        config = ConsumerConfig(durable_name=name, filter_subject=None if filter_subjects else filter_subject,
                                filter_subjects=list(filter_subjects) or None, ack_policy=AckPolicy.EXPLICIT,
                                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, ack_wait=ack_wait, max_deliver=-1,
                                inactive_threshold=inactive_threshold)
        try:
            await self.js.add_consumer(stream, config=config)
        except Exception as exc:
            raise map_error(exc, f"create consumer {stream}/{name}") from None

    async def replicas_of(self, stream: str) -> int:
        try:
            return (await self.js.stream_info(stream)).config.num_replicas or 1
        except Exception as exc:
            raise map_error(exc, f"stream info {stream}") from None

    async def stream_names(self) -> list[str]:
        try:
            return [info.config.name for info in await self.js.streams_info()]
        except Exception as exc:
            raise map_error(exc, "list streams") from None

    async def delete_stream(self, name: str) -> bool:
        try:
            return await self.js.delete_stream(name)
        except nats.js.errors.NotFoundError:
            return False

    async def purge_stream(self, name: str) -> None:
        """Drop every message of a stream (its sequence numbers go on from where they were)."""
        try:
            await self.js.purge_stream(name)
        except Exception as exc:
            raise map_error(exc, f"purge stream {name}") from None

    async def stream_info(self, name: str) -> dict[str, Any]:
        try:
            info = await self.js.stream_info(name)
        except Exception as exc:
            raise map_error(exc, f"stream info {name}") from None
        created = info.created.isoformat() if info.created is not None else ""
        return {"messages": info.state.messages, "first_seq": info.state.first_seq, "last_seq": info.state.last_seq,
                "created": created}

    async def read_stream(self, stream: str, subjects: str, start_seq: int, limit: int) -> list[StoredMessage]:
        """Up to `limit` messages of `stream` matching `subjects`, from `start_seq` on (for small admin
        listings; followers use OrderedReader)."""
        out: list[StoredMessage] = []
        seq = max(1, start_seq)
        while len(out) < limit:
            try:
                raw = await self.js.get_msg(stream, seq=seq, subject=subjects, next=True)
            except nats.js.errors.NotFoundError:
                break
            except Exception as exc:
                raise map_error(exc, f"read {stream}") from None
            assert raw.seq is not None
            out.append(StoredMessage(raw.subject or "", raw.data or b"", dict(raw.headers or {}), raw.seq,
                                     raw.time.timestamp() if raw.time else 0.0))
            seq = raw.seq + 1
        return out

    async def consumer_pending(self, stream: str, durable: str) -> int | None:
        """Messages a durable has not yet been handed plus those awaiting ack; None if it does not exist."""
        try:
            info = await self.js.consumer_info(stream, durable)
        except nats.js.errors.NotFoundError:
            return None
        except Exception as exc:
            raise map_error(exc, f"consumer info {stream}/{durable}") from None
        return (info.num_pending or 0) + (info.num_ack_pending or 0)

    async def consumer_count(self, stream: str) -> int:
        try:
            return (await self.js.stream_info(stream)).state.consumer_count
        except Exception as exc:
            raise map_error(exc, f"stream info {stream}") from None

    async def delete_consumer(self, stream: str, durable: str) -> bool:
        try:
            return await self.js.delete_consumer(stream, durable)
        except nats.js.errors.NotFoundError:
            return False


def _differs(wanted: Any, existing: Any) -> bool:
    """Whether an update would change anything (fields the server fills in are compared as ours)."""
    for name in ("subjects", "retention", "max_age", "max_bytes", "max_msgs", "max_msgs_per_subject",
                 "duplicate_window", "num_replicas", "description", "allow_msg_ttl"):
        if getattr(wanted, name, None) not in (None, getattr(existing, name, None)):
            return True
    mine = [(s.name, [(t.src, t.dest) for t in s.subject_transforms or []]) for s in wanted.sources or []]
    theirs = [(s.name, [(t.src, t.dest) for t in s.subject_transforms or []]) for s in existing.sources or []]
    return mine != theirs


def _error_from_reply(data: bytes, headers: dict[str, str]) -> ShoalError:
    try:
        return ShoalError.from_body(from_json(data, ErrorReply).error)
    except ShoalError:
        pass
    try:
        code = int(headers.get(ERROR_CODE_HEADER, "500"))
    except ValueError:
        code = 500
    return ShoalError(headers.get(ERROR_HEADER, "error"), code=code)


def _on_error(name: str, holder: list[Bus]) -> Callable[[Exception], Awaitable[None]]:
    async def cb(exc: Exception) -> None:
        text = f"{exc or type(exc).__name__}"
        if "permissions violation" in text.lower():  # (nats-py lowercases the server's -ERR text)
            # The server refused a publish or a subscription of this identity: worth a warning, and kept
            # (the last few) so that what was refused can be seen.
            log.warning("%s: %s", name, text)
            if holder:
                holder[0].violations.append(text)
                del holder[0].violations[:-MAX_VIOLATIONS]
            return
        # Connection-level errors are expected while the server restarts; the disconnect callback says it once.
        log.debug("%s: nats: %s", name, text)

    return cb


def _log_disconnect(name: str, holder: list[Bus]) -> Callable[[], Awaitable[None]]:
    async def cb() -> None:
        if holder and not holder[0].closing:  # (a connect that fails is reported by connect itself)
            log.warning("%s: disconnected from NATS", name)

    return cb


def _on_reconnect(name: str, holder: list[Bus]) -> Callable[[], Awaitable[None]]:
    async def cb() -> None:
        log.info("%s: reconnected to NATS", name)
        if holder:
            await holder[0]._reconnected()

    return cb


async def _discard(nc: Client) -> None:
    """Close what a failed connect left open (the client leaves its socket to the garbage collector)."""
    try:
        # (Bounded: after a failed TLS handshake the client waits for ever for its transport to close.)
        await asyncio.wait_for(nc.close(), 1.0)
    except (Exception, asyncio.TimeoutError):  # nothing more to release
        pass


def _on_closed(name: str, holder: list[Bus]) -> Callable[[], Awaitable[None]]:
    async def cb() -> None:
        if not holder or holder[0].closing:
            return
        bus = holder[0]
        err = getattr(bus.nc, "last_error", None)
        bus.lost_reason = f"{err or 'closed by the server'}"
        log.error("%s: the NATS connection was closed for good: %s", name, bus.lost_reason)
        bus.lost.set()

    return cb


def _short(subject: str) -> str:
    return subject if len(subject) <= 200 else subject[:200] + "..."

"""Key-value buckets with compare-and-set, and watches that keep message headers.

Writes go straight to the bucket's subject (`$KV.<bucket>.<key>`) so they can carry trace headers and
an expected-revision header; the client library's own KV API can do neither. A revision is the
stream sequence of the key's last write; `update(last=rev)` fails with Conflict if anyone wrote since.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator

from ..errors import Conflict, Internal, ShoalError, Unavailable
from ._bus import Bus, map_error
from ._pull import Inbox
from ._requests import STATUS
from ._reader import OrderedReader

log = logging.getLogger(__name__)

KV_OPERATION = "KV-Operation"
SEQUENCE_HEADER = "Nats-Sequence"  # on a direct get's reply: the message's stream sequence (the revision)
SCAN_BATCH = 1000
SCAN_WAIT = 5.0  # seconds a scan waits for the next reply of a batch before it gives up
MARKER_REASON = "Nats-Marker-Reason"
MSG_TTL = "Nats-TTL"


class Entry:
    """One key's value at one revision (None value and `deleted` for a delete or purge marker)."""

    __slots__ = ("key", "value", "revision", "headers", "deleted", "pending")

    def __init__(self, key: str, value: bytes, revision: int, headers: dict[str, str], deleted: bool,
                 pending: int = 0) -> None:
        self.key = key
        self.value = value
        self.revision = revision
        self.headers = headers
        self.deleted = deleted
        self.pending = pending

    def __repr__(self) -> str:
        return f"Entry({self.key!r}, rev={self.revision}, deleted={self.deleted})"


def is_delete(headers: dict[str, str] | None) -> bool:
    """Whether a bucket message (or an event sourced from one) marks its key deleted."""
    if not headers:
        return False
    if headers.get(KV_OPERATION) in ("DEL", "PURGE"):
        return True
    return headers.get(MARKER_REASON) in ("MaxAge", "Purge", "Remove")


class Kv:
    def __init__(self, bus: Bus, bucket: str) -> None:
        self.bus = bus
        self.bucket = bucket
        self.stream = f"KV_{bucket}"
        self._prefix = f"$KV.{bucket}."

    def subject(self, key: str) -> str:
        return self._prefix + key

    async def get(self, key: str) -> Entry | None:
        """The key's current value, or None if it was never written or is deleted."""
        entry = await self._last(key)
        return None if entry is None or entry.deleted else entry

    async def _last(self, key: str) -> Entry | None:
        """The key's last entry, its delete marker included; None if it was never written (or the marker
        is gone)."""
        try:
            msg = await self.bus.replies.direct_get_last(self.stream, self._prefix + key)
        except Exception as exc:
            raise map_error(exc, f"get {self.bucket}/{key}") from None
        if msg is None:
            return None
        headers = dict(msg.headers or {})
        return Entry(key, msg.data or b"", int(headers.get(SEQUENCE_HEADER, 0)), headers, is_delete(headers))

    async def create(self, key: str, value: bytes, *, headers: dict[str, str] | None = None) -> int:
        """Write only if the key does not exist (a deleted key counts as absent). Conflict otherwise."""
        try:
            return await self._write(key, value, 0, headers)
        except Conflict:
            last = await self._last_revision_if_deleted(key)
            if last is None:
                raise Conflict(f"{self.bucket}/{key} already exists") from None
            return await self._write(key, value, last, headers)

    async def update(self, key: str, value: bytes, *, last: int, headers: dict[str, str] | None = None) -> int:
        """Write only if the key's revision is still `last`. Conflict otherwise."""
        return await self._write(key, value, last, headers)

    async def put(self, key: str, value: bytes, *, headers: dict[str, str] | None = None) -> int:
        return await self._write(key, value, None, headers)

    async def delete(self, key: str, *, last: int | None = None, ttl: float = 0.0,
                     headers: dict[str, str] | None = None) -> None:
        """Mark the key deleted (Conflict if `last` is given and stale). With `ttl` (a bucket made with
        `msg_ttl`), the marker itself is removed from the bucket that long after: the key then leaves no
        trace there, while streams sourced from the bucket keep the marker and `headers` for their readers."""
        marker = {**(headers or {}), KV_OPERATION: "DEL"}
        if ttl:
            marker[MSG_TTL] = f"{max(1, math.ceil(ttl))}s"
        await self._write(key, b"", last, marker)

    async def _write(self, key: str, value: bytes, last: int | None, headers: dict[str, str] | None) -> int:
        ack = await self.bus.js_publish(
            self._prefix + key, value, headers=headers, expected_last_subject_seq=last
        )
        return ack.seq

    async def _last_revision_if_deleted(self, key: str) -> int | None:
        entry = await self._last(key)
        return entry.revision if entry is not None and entry.deleted else None

    async def scan(self, pattern: str = ">") -> list[Entry]:
        """Current values of every key matching `pattern` (deletes skipped), in write order.

        Uses batched direct gets (`next_by_subj` from a sequence) instead of a consumer: nothing is left
        on the server, and any number of scans may run at once. A bucket keeps one message per key, so
        walking its stream by sequence sees each key once; a key rewritten during the walk may show up
        twice, and the later revision wins.
        """
        nc = self.bus.nc
        inbox = Inbox(nc)
        await inbox.open()
        found: dict[str, Entry] = {}
        api_subject = f"$JS.API.DIRECT.GET.{self.stream}"
        seq = 0
        try:
            while True:
                request = json.dumps({"seq": seq, "next_by_subj": self._prefix + pattern, "batch": SCAN_BATCH})
                await nc.publish(api_subject, request.encode(), reply=inbox.subject + ".scan")
                pending = 0
                while True:
                    msg = await inbox.next(SCAN_WAIT)
                    if msg is None:
                        raise Unavailable(f"scan {self.bucket}/{pattern}: timed out")
                    headers = dict(msg.headers or {})
                    status = headers.get(STATUS)
                    if status == "204":  # end of this batch
                        pending = int(headers.get("Nats-Num-Pending", "0"))
                        break
                    if status == "404":  # nothing (more) matches
                        break
                    if status:
                        raise Internal(f"scan {self.bucket}/{pattern}: {status} {msg.data.decode(errors='replace')}")
                    revision = int(headers["Nats-Sequence"])
                    key = headers["Nats-Subject"][len(self._prefix):]
                    found.pop(key, None)
                    found[key] = Entry(key, msg.data or b"", revision, headers, is_delete(headers))
                    seq = revision + 1
                if not pending:
                    break
        except ShoalError:
            raise
        except Exception as exc:
            raise map_error(exc, f"scan {self.bucket}/{pattern}") from None
        finally:
            await inbox.close()
        return [e for e in found.values() if not e.deleted]

    def watch(self, pattern: str = ">") -> Watch:
        """Current values of matching keys, then None, then every later change."""
        return Watch(self, pattern)


class Watch:
    """`async with kv.watch("a.*") as w: async for entry in w: ...` — stops cleanly on exit.

    Current values of the matching keys first, then None once, then every later change, in order. It
    is an `OrderedReader`, so it survives reconnects and server restarts without missing or repeating
    a change (a server restart used to silence a watch until the client's idle-heartbeat check).
    """

    def __init__(self, kv: Kv, pattern: str, batch: int = 512) -> None:
        self._kv = kv
        self.reader = self._reader = OrderedReader(kv.bus, kv.stream, filter_subject=kv._prefix + pattern, last_per_subject=True,
                                     batch=batch)
        self._init_done = False

    async def __aenter__(self) -> Watch:
        try:
            await self._reader.open()
        except ShoalError:
            await self._reader.close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._reader.close()

    def __aiter__(self) -> AsyncIterator[Entry | None]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Entry | None]:
        kv = self._kv
        cut = len(kv._prefix)
        if self._reader.initial_pending == 0 and not self._init_done:
            self._init_done = True
            yield None  # nothing to deliver at all
        delay = 0.1
        while True:
            try:
                batch = await self._reader.next_batch()
            except ShoalError as exc:
                if not exc.retryable:
                    raise
                log.info("watch %s: %s; retrying in %.1fs", kv.bucket, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.1
            for msg in batch:
                yield Entry(msg.subject[cut:], msg.data, msg.seq, msg.headers, is_delete(msg.headers), msg.pending)
                if msg.pending == 0 and not self._init_done:
                    self._init_done = True
                    yield None

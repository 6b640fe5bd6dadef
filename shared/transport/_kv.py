"""Key-value buckets with compare-and-set, and watches that keep message headers.

Writes go straight to the bucket's subject (`$KV.<bucket>.<key>`) so they can carry trace headers and
an expected-revision header; the client library's own KV API can do neither. A revision is the
stream sequence of the key's last write; `update(last=rev)` fails with Conflict if anyone wrote since.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

from ..errors import Conflict, Internal, ShoalError
from ._bus import Bus, map_error

log = logging.getLogger(__name__)

KV_OPERATION = "KV-Operation"
SCAN_BATCH = 1000
MARKER_REASON = "Nats-Marker-Reason"


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
        try:
            msg = await self.bus.js.get_last_msg(self.stream, self._prefix + key, direct=True)
        except nats.js.errors.NotFoundError:
            return None
        except Exception as exc:
            raise map_error(exc, f"get {self.bucket}/{key}") from None
        headers = dict(msg.headers or {})
        if is_delete(headers):
            return None
        return Entry(key, msg.data or b"", msg.seq or 0, headers, False)

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

    async def delete(self, key: str, *, last: int | None = None) -> None:
        await self._write(key, b"", last, {KV_OPERATION: "DEL"})

    async def _write(self, key: str, value: bytes, last: int | None, headers: dict[str, str] | None) -> int:
        ack = await self.bus.js_publish(
            self._prefix + key, value, headers=headers, expected_last_subject_seq=last
        )
        return ack.seq

    async def _last_revision_if_deleted(self, key: str) -> int | None:
        try:
            msg = await self.bus.js.get_last_msg(self.stream, self._prefix + key, direct=True)
        except nats.js.errors.NotFoundError:
            return None
        return msg.seq if is_delete(dict(msg.headers or {})) else None

    async def scan(self, pattern: str = ">") -> list[Entry]:
        """Current values of every key matching `pattern` (deletes skipped), in write order.

        Uses batched direct gets (`next_by_subj` from a sequence) instead of a consumer: nothing is left
        on the server, and any number of scans may run at once. A bucket keeps one message per key, so
        walking its stream by sequence sees each key once; a key rewritten during the walk may show up
        twice, and the later revision wins.
        """
        nc = self.bus.nc
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        found: dict[str, Entry] = {}
        api_subject = f"$JS.API.DIRECT.GET.{self.stream}"
        seq = 0
        try:
            while True:
                request = json.dumps({"seq": seq, "next_by_subj": self._prefix + pattern, "batch": SCAN_BATCH})
                await nc.publish(api_subject, request.encode(), reply=inbox)
                pending = 0
                while True:
                    msg = await sub.next_msg(timeout=5.0)
                    headers = dict(msg.headers or {})
                    status = headers.get("Status")
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
            await sub.unsubscribe()
        return [e for e in found.values() if not e.deleted]

    def watch(self, pattern: str = ">") -> Watch:
        """Current values of matching keys, then None, then every later change."""
        return Watch(self, pattern)


class Watch:
    """`async with kv.watch("a.*") as w: async for entry in w: ...` — stops cleanly on exit."""

    def __init__(self, kv: Kv, pattern: str) -> None:
        self._kv = kv
        self._pattern = pattern
        self._queue: asyncio.Queue[Entry | None] = asyncio.Queue()
        self._sub = None
        self._init_done = False

    async def __aenter__(self) -> Watch:
        kv = self._kv

        async def on_msg(msg: Msg) -> None:
            meta = msg.metadata
            headers = dict(msg.headers or {})
            entry = Entry(msg.subject[len(kv._prefix):], msg.data or b"", meta.sequence.stream, headers,
                          is_delete(headers), meta.num_pending)
            await self._queue.put(entry)
            if meta.num_pending == 0 and not self._init_done:
                self._init_done = True
                await self._queue.put(None)

        try:
            self._sub = await kv.bus.js.subscribe(
                kv._prefix + self._pattern,
                stream=kv.stream,
                cb=on_msg,
                ordered_consumer=True,
                deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
                inactive_threshold=60,
            )
            info = await self._sub.consumer_info()
        except Exception as exc:
            await self._stop()
            raise map_error(exc, f"watch {kv.bucket}/{self._pattern}") from None
        # Nothing to deliver at all: say so now. Otherwise the message carrying num_pending 0 says it.
        # (The server's delivered count, not the client's: a message may be on its way to the callback.)
        if info.num_pending == 0 and info.delivered.consumer_seq == 0 and not self._init_done:
            self._init_done = True
            await self._queue.put(None)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stop()

    async def _stop(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await sub.unsubscribe()
                # Remove the server-side consumer now rather than when its inactivity threshold passes.
                await self._kv.bus.js.delete_consumer(self._kv.stream, sub._consumer)
            except Exception:  # connection closing, or the consumer is already gone
                pass

    def __aiter__(self) -> AsyncIterator[Entry | None]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Entry | None]:
        # The end-of-current-values None is queued exactly once (guarded by _init_done).
        while True:
            yield await self._queue.get()

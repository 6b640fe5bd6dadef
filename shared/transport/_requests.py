"""Requests that wait for one reply: many at a time, on one subscription of the connection.

Every JetStream publish (each KV write), every KV read (a direct get) and every API request waits for
one reply. nats-py's `request` spends about 30 us of the caller's CPU on each beyond the message itself
(a random token from the OS, a future wrapped in `wait_for`, the reply's JSON parsed twice for a publish
ack): the largest cost of a write after the fetch (bench/client.py measures both). Here a reply finds
its waiter by a counter in its subject, a timer ends the wait, and a publish ack is decoded once.

Failures are raised as nats-py raises them (a timeout, no responders, the server's API error), so the
transport's one mapping (`map_error`) stays the only place that turns them into shoal's errors.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

STATUS = "Status"
NO_RESPONDERS = "503"
NOT_FOUND = "404"


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int | None = None
    description: str | None = None


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _ApiError | None = None


_decode_ack = msgspec.json.Decoder(_PubAck).decode


class Replies:
    """The connection's waiters for replies, on one wildcard inbox subscription."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self._prefix = ""
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._count = 0
        self._opening: asyncio.Lock | None = None

    async def _open(self) -> None:
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if not self._prefix:
                prefix = self.nc.new_inbox() + "."
                await self.nc.subscribe(prefix + "*", cb=self._reply)
                self._prefix = prefix

    async def _reply(self, msg: Msg) -> None:
        waiter = self._waiting.pop(msg.subject[len(self._prefix):], None)
        if waiter is not None and not waiter.done():
            waiter.set_result(msg)

    async def request(self, subject: str, data: bytes, *, headers: dict[str, str] | None = None,
                      timeout: float = 5.0) -> Msg:
        """The reply to `data` sent on `subject`. Raises nats.errors.TimeoutError or NoRespondersError."""
        if not self._prefix:
            await self._open()
        self._count += 1
        token = str(self._count)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Msg] = loop.create_future()
        self._waiting[token] = waiter
        expiry = loop.call_later(timeout, _expire, waiter)
        try:
            await self.nc.publish(subject, data, reply=self._prefix + token, headers=headers)
            msg = await waiter
        finally:
            expiry.cancel()
            self._waiting.pop(token, None)
        if not msg.data and msg.headers and msg.headers.get(STATUS) == NO_RESPONDERS:
            raise nats.errors.NoRespondersError
        return msg

    async def publish(self, subject: str, data: bytes, *, headers: dict[str, str] | None = None,
                      timeout: float = 5.0) -> tuple[str, int, bool]:
        """Publish into a stream; (stream, sequence, duplicate) from its ack. Raises the server's refusal
        as nats-py's APIError (or its subclasses), and no stream as NoStreamResponseError."""
        try:
            msg = await self.request(subject, data, headers=headers, timeout=timeout)
        except nats.errors.NoRespondersError:
            raise nats.js.errors.NoStreamResponseError from None
        ack = _decode_ack(msg.data)
        if ack.error is not None:
            nats.js.errors.APIError.from_error(msgspec.structs.asdict(ack.error))  # raises
        return ack.stream, ack.seq, ack.duplicate

    async def direct_get_last(self, stream: str, subject: str, *, timeout: float = 5.0) -> Msg | None:
        """The last message of `subject` in `stream` (a direct get: any replica answers), None if there is
        none. The reply's headers carry its sequence (`Nats-Sequence`) beside its own headers."""
        msg = await self.request(f"$JS.API.DIRECT.GET.{stream}.{subject}", b"", timeout=timeout)
        status = msg.headers.get(STATUS) if not msg.data and msg.headers else None
        if status == NOT_FOUND:
            return None
        if status is not None:
            nats.js.errors.APIError.from_msg(msg)  # raises
        return msg


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(nats.errors.TimeoutError())

"""Fetching from a pull consumer: one request per batch, and the batch read as it arrives.

`Inbox` is what reads it: the messages to one subject queued as they come, taken without a task each
(a scan of a bucket reads its replies the same way).

Every reader of a stream goes through here: durable consumers (`Consumer`), ordered readers and watches
(`OrderedReader`), an agent's assignments (`PullReader`). nats-py's `PullSubscription.fetch` waits for
each message of a batch on its own (two tasks, a timer and a uuid per message: about 50 us of the
reader's CPU a message on this machine, the largest single cost of a delivered event); here one wait
covers whatever the server has sent, and a message costs about 12 us, its ack included (bench/client.py).

A fetch asks for up to `batch` messages with `no_wait` and `expires`: the server sends what the consumer
has now and ends the request at once with a status (404), or, if it has nothing, waits up to `expires`
for the first message (then 404) or ends it with a 408. A fetch returns when its request ends, when it
has the batch, or when the server does not answer in time (the connection is away); messages that come
later for it (or a status) are read by the next fetch.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque

import nats.js.errors
from nats.aio.msg import Msg

from nats.aio.client import Client

from ._bus import Bus
from ._requests import STATUS

HEARTBEAT = "100"
REQUEST_OVER = frozenset({"404", "408", "409"})  # no messages; expired; consumer changed (deleted, leader moved)
REPLY_GRACE = 0.25  # seconds past `expires` that a fetch waits for the server's word before it gives up
EARLY_PAUSE = 0.1  # seconds a fetch waits when the server ended its request at once with nothing


class Inbox:
    """The messages to a new inbox (`subject`, and `subject.<anything>`: a request may name its own reply
    subject under it), queued as they arrive: `take` the next without waiting, `wait` for one. (nats-py's
    `next_msg` makes two tasks, a timer and a uuid for every message.)"""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.subject = nc.new_inbox()
        self._sub: nats.aio.subscription.Subscription | None = None
        self._arrived: deque[Msg] = deque()
        self._signal = asyncio.Event()

    async def open(self) -> None:
        if self._sub is None:
            self._sub = await self.nc.subscribe(self.subject + ".*", cb=self._arrive)

    async def _arrive(self, msg: Msg) -> None:
        self._arrived.append(msg)
        self._signal.set()

    def take(self) -> Msg | None:
        """The next message if one is there, without waiting."""
        return self._arrived.popleft() if self._arrived else None

    async def next(self, timeout: float) -> Msg | None:
        """The next message, waiting up to `timeout` seconds for one (a single wait, however many then
        arrive); None if none came."""
        if not self._arrived:
            self._signal.clear()
            if timeout <= 0:
                return None
            try:
                await asyncio.wait_for(self._signal.wait(), timeout)
            except asyncio.TimeoutError:
                return None
        return self._arrived.popleft()

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception:  # the connection is closed or away: the subscription went with it
                pass


class Pull:
    """Fetches from the pull consumer `consumer` of `stream`."""

    def __init__(self, bus: Bus, stream: str, consumer: str) -> None:
        self.bus = bus
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = Inbox(bus.nc)
        self._requests = 0

    async def open(self) -> None:
        await self._inbox.open()

    async def fetch(self, batch: int, wait: float) -> list[Msg]:
        """Up to `batch` messages: those the consumer has now, or the first to come within `wait`; [] if
        none came. Raises what the server answers instead (503: no consumer, or no JetStream leader).

        Each request names its own reply subject, on which the server also sends the status that ends
        it: a status that ends an earlier request (one this fetch's predecessor gave up on) is ignored.
        A request the server ends at once with nothing (it has requests of other replicas pending, or
        its leader moved) is not asked again straight away: the fetch waits out a tenth of a second."""
        await self.open()
        got = self._drain_stale()
        if got:
            return got
        self._requests += 1
        reply = f"{self._inbox.subject}.{self._requests}"
        request = {"batch": batch, "expires": int(wait * 1e9), "no_wait": True}
        await self.bus.nc.publish(self.subject, json.dumps(request).encode(), reply=reply)
        loop = asyncio.get_running_loop()
        asked = loop.time()
        deadline = asked + wait + REPLY_GRACE
        inbox = self._inbox
        while len(got) < batch:
            msg = await inbox.next(deadline - loop.time())
            if msg is None:
                break
            status = msg.headers.get(STATUS) if msg.headers else None
            if status is None:
                got.append(msg)
            elif msg.subject != reply or status == HEARTBEAT:
                continue
            elif status in REQUEST_OVER:
                if not got and asked + wait - loop.time() > EARLY_PAUSE:
                    await asyncio.sleep(EARLY_PAUSE)
                break
            else:
                if got:
                    break
                nats.js.errors.APIError.from_msg(msg)  # raises (503 as ServiceUnavailableError)
        return got

    def _drain_stale(self) -> list[Msg]:
        """Messages that came after an earlier fetch gave up (still ours to handle); its status, if it came
        too, is dropped: it ended a request that is over."""
        kept = []
        while (msg := self._inbox.take()) is not None:
            if not (msg.headers and msg.headers.get(STATUS)):
                kept.append(msg)
        return kept

    async def close(self) -> None:
        await self._inbox.close()

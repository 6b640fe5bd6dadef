"""The keys that sign page tokens: a set shared by every query replica, rotated on a schedule and on demand.

One key for ever would let anyone who once read it forge tokens for ever, and could not be changed
without breaking every walk in progress. So there are several, each in the `shoal_config` bucket as
`page-token-key.<key id>` with a `PageKey` value (the 32-byte secret and when it was created). Only
services may read that bucket (NATS permissions deny tenants `$KV` altogether).

- Every replica keeps the keys in memory, follows the bucket with a watch of `page-token-key.>`,
  signs new tokens with the newest key (latest `created`, then highest id) and verifies a token with
  the key it names, if it knows that key and the key has not expired.
- A key expires `retention` (the token lifetime, SHOAL_PAGE_RETENTION) after the next newer key was
  created: a token signed just before a rotation stays good for as long as any token does, and a
  superseded key is trusted no longer than that. On schedule that is rotation + retention after the
  key was created. The newest key never expires.
- Rotation is on a clock aligned to the epoch: once per period of SHOAL_PAGE_KEY_ROTATION seconds
  (7 days by default) the newest key must have been created within the current period, or a new one
  is due. Its id is derived from the period (`s` + the period's start in milliseconds, base 36), so
  every replica that finds it due creates the same key id with a create-if-absent, and exactly one
  of them succeeds; the others see its key through their watch. A replica starting with no key at
  all creates the first one the same way.
- Every replica deletes the expired keys it knows of (a delete at the revision it read, so replicas
  racing delete once). The single key of the old token format (`page-token-key`) goes too: tokens of
  that format are refused, so it signs nothing any more.
- `rotate_now` makes a new key at once, with a random id (`m` + 8 base-32 characters), for use after a
  suspected leak; with `revoke=True` it also deletes every older key, so every token signed before is
  refused straight away (a 400 that says to list again).

Ids are never reused: a scheduled id is only created while no key newer than its period's start
exists, and a key is only ever deleted once a newer one exists.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import time
from collections.abc import Mapping
from typing import Annotated

import msgspec

from shared import pagetoken
from shared import subjects as s
from shared.errors import Conflict, ShoalError, Unavailable
from shared.runtime import Component
from shared.store import Bucket, Mirror, Store
from shared.transport import Bus

log = logging.getLogger(__name__)

PREFIX = "page-token-key"  # keys are PREFIX.<key id>; PREFIX alone is the old format's single key
SECRET_BYTES = 32
MAX_RECHECK = 60.0  # the rotation loop looks again at least this often (a key changed by hand, a clock jump)
MIN_RECHECK = 0.2  # and at most this often (a key it created not yet back through the watch)
SECOND = 1_000_000_000


class PageKey(msgspec.Struct, kw_only=True, frozen=True):
    """One signing key as stored in `shoal_config`."""

    secret: Annotated[bytes, msgspec.Meta(min_length=SECRET_BYTES)]
    created: int  # nanoseconds since the epoch, by the clock of the process that created it


def config_key(key_id: str) -> str:
    return f"{PREFIX}.{key_id}"


def scheduled_id(period_start: int) -> str:
    """The id of the key of the rotation period starting at `period_start` (ns since the epoch)."""
    return "s" + _base36(period_start // 1_000_000)


def manual_id() -> str:
    return "m" + base64.b32encode(os.urandom(5)).decode().lower()


def period_start(now: int, rotation: int) -> int:
    return now - now % rotation


# -- what a set of keys means at a moment: pure, so that every replica and the tests agree -----------


def _order(item: tuple[str, PageKey]) -> tuple[int, str]:
    return item[1].created, item[0]


def newest(keys: Mapping[str, PageKey]) -> tuple[str, PageKey] | None:
    """The key that signs: the latest created (ties broken by id, so that replicas agree)."""
    return max(keys.items(), key=_order, default=None)


def expires_at(keys: Mapping[str, PageKey], key_id: str, retention: int) -> int | None:
    """When tokens signed with `key_id` stop being accepted: `retention` after the next newer key was
    created. None while it is the newest (or unknown)."""
    key = keys.get(key_id)
    if key is None:
        return None
    mine = (key.created, key_id)
    successors = [k.created for i, k in keys.items() if (k.created, i) > mine]
    return min(successors) + retention if successors else None


def trusted(keys: Mapping[str, PageKey], key_id: str, now: int, retention: int) -> bytes | None:
    """The secret to verify a token naming `key_id` with, or None if unknown or expired."""
    key = keys.get(key_id)
    if key is None:
        return None
    end = expires_at(keys, key_id, retention)
    return key.secret if end is None or now < end else None


def expired(keys: Mapping[str, PageKey], now: int, retention: int) -> list[str]:
    return [i for i in keys if (end := expires_at(keys, i, retention)) is not None and end <= now]


def rotation_due(keys: Mapping[str, PageKey], now: int, rotation: int) -> str | None:
    """The id of the key to create now, if the newest was created before the current period began."""
    start = period_start(now, rotation)
    current = newest(keys)
    if current is None or current[1].created < start:
        return scheduled_id(start)
    return None


def next_change(keys: Mapping[str, PageKey], now: int, rotation: int, retention: int) -> int:
    """The next moment the set needs attention: the next period, or the next key to expire."""
    moments = [period_start(now, rotation) + rotation]
    moments += [end for i in keys if (end := expires_at(keys, i, retention)) is not None and end > now]
    return min(moments)


# -- the bucket ----------------------------------------------------------------------------------


def _bucket(bus: Bus) -> Bucket[PageKey]:
    return Bucket(bus, s.BUCKET_CONFIG, PageKey)


def _new_key(clock: int) -> PageKey:
    return PageKey(secret=os.urandom(SECRET_BYTES), created=clock)


async def _delete(bucket: Bucket[PageKey], key: str) -> bool:
    """Delete `key` at the revision it has now; False if it is gone already or another replica got there."""
    entry = await bucket.kv.get(key)
    if entry is None:
        return False
    try:
        await bucket.kv.delete(key, last=entry.revision)
    except Conflict:
        return False
    return True


async def rotate_now(store: Store, *, revoke: bool = False) -> str:
    """Create a new signing key at once and return its id (`shoal auth rotate-page-key`).

    Replicas sign with it as soon as their watch delivers it. Tokens signed with older keys still
    verify until they expire, unless `revoke`: then every older key is deleted, and every token signed
    before this call is refused (a 400 saying to list again) once the replicas have seen the deletes.
    """
    bucket = _bucket(store.bus)
    while True:
        key_id = manual_id()
        key = _new_key(time.time_ns())
        try:
            await bucket.create(config_key(key_id), key)
            break
        except Conflict:
            continue  # 40 random bits met an existing id: draw again
    log.info("page-token key %s created by hand%s", key_id, ", older keys revoked" if revoke else "")
    if revoke:
        for record in await bucket.scan(f"{PREFIX}.>"):
            other = record.key[len(PREFIX) + 1:]
            if (record.value.created, other) < (key.created, key_id):  # a key created since is not suspect
                await _delete(bucket, record.key)
        await _delete(bucket, PREFIX)
    return key_id


class KeyRing:
    """One replica's copy of the signing keys, kept current by a watch, and its share of rotating them."""

    def __init__(self, bus: Bus, *, rotation: float, retention: float) -> None:
        self.bucket = _bucket(bus)
        self.mirror: Mirror[PageKey] = Mirror(self.bucket, f"{PREFIX}.>")
        self.rotation = int(rotation * SECOND)
        self.retention = int(retention * SECOND)
        self._cut = len(PREFIX) + 1

    def keys(self) -> dict[str, PageKey]:
        return {k[self._cut:]: v for k, v in self.mirror.items.items()}

    def signing(self) -> pagetoken.Key:
        """The key new tokens are signed with: the newest this replica knows."""
        current = newest(self.keys())
        if current is None:
            raise Unavailable("no page-token key loaded yet; retry")
        return pagetoken.Key(current[0], current[1].secret)

    def lookup(self, key_id: str) -> bytes | None:
        """For pagetoken.decode: the secret of `key_id` if this replica knows it and it has not expired."""
        return trusted(self.keys(), key_id, time.time_ns(), self.retention)

    async def start(self, component: Component) -> None:
        """Load the keys (creating the first if there is none) and keep them current until the component stops."""
        component.spawn(lambda: self.mirror.run(component.stopping), "watch-page-keys")
        await self.mirror.wait_ready()
        if not self.mirror.items:
            now = time.time_ns()
            await self._create(scheduled_id(period_start(now, self.rotation)), now)
            await self._until_loaded()
        component.spawn(lambda: self._maintain(component.stopping), "rotate-page-keys")

    async def _create(self, key_id: str, now: int) -> None:
        """Create the key of the period `now` is in; created at `now`, so that it is within its period."""
        try:
            await self.bucket.create(config_key(key_id), _new_key(now))
            log.info("page-token key %s created", key_id)
        except Conflict:
            pass  # another replica created it first: one key, which the watch brings here too

    async def _until_loaded(self, timeout: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.mirror.items:
            if loop.time() > deadline:
                raise Unavailable("the page-token key did not come back through the watch")
            await asyncio.sleep(0.01)

    async def _maintain(self, stopping: asyncio.Event) -> None:
        """Rotate when a period begins and delete expired keys, racing the other replicas by compare-and-set.

        A NATS outage only postpones the work: the loop logs and looks again, rather than crash (and
        a crashing loop, restarted too often, would take the whole replica down).
        """
        legacy_checked = False
        while not stopping.is_set():
            now = time.time_ns()
            keys = self.keys()
            try:
                if not legacy_checked:
                    if await _delete(self.bucket, PREFIX):
                        log.info("deleted %s, the key of the old token format", PREFIX)
                    legacy_checked = True
                for key_id in expired(keys, now, self.retention):
                    if await _delete(self.bucket, config_key(key_id)):
                        log.info("page-token key %s expired and was deleted", key_id)
                due = rotation_due(keys, now, self.rotation)
                if due is not None:
                    await self._create(due, now)
                    wait = 0.0  # look again once the new key is back, to time its predecessor's expiry
                else:
                    wait = (next_change(keys, now, self.rotation, self.retention) - now) / SECOND
            except ShoalError as exc:
                if not exc.retryable:
                    raise
                log.warning("page-token key rotation: %s; looking again shortly", exc)
                wait = 1.0
            try:
                await asyncio.wait_for(stopping.wait(), min(max(wait, MIN_RECHECK), MAX_RECHECK))
            except asyncio.TimeoutError:
                pass


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if not n:
            return out

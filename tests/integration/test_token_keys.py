"""Rotating page-token keys against a real server: walks survive rotations, revoked and forged tokens are
400s naming next_token, and query replicas agree on the keys as they rotate.

A key rotated by hand reaches each replica through its watch of the config bucket, a few milliseconds
later; the tests wait for that where it matters, as a client would retry.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import os

import msgspec
import pytest

from services.query import tokenkeys
from shared import pagetoken
from shared import subjects as s
from shared.api import ListJobExecutionsRequest
from shared.errors import InvalidInput
from shared.store import Store
from shared.transport import Kv
from tests.integration.test_query import make_execution, make_job, put_executions, put_job, until_visible

pytestmark = pytest.mark.nats

BASE = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def key_id_of(token: str) -> str:
    """The key id a token names (the second element of its msgpack body)."""
    body = token.partition(".")[0]
    return msgspec.msgpack.decode(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))[1]


def scope_of(job: str) -> bytes:
    """The scope list_executions gives a walk of one job's executions with no other filter."""
    return pagetoken.scope("executions", "default", job, None, False, "", None, "created_at", False)


async def seed(cluster, bus, wait_for, name: str, count: int, *, replicas: int = 1):
    """`replicas` query replicas, and a job with `count` executions (a second apart) that they list."""
    queries = [await cluster.start("query") for _ in range(replicas)]
    store, api = Store(bus), await cluster.api()
    job = make_job("default", name)
    await put_job(store, job)
    executions = [make_execution(job, f"n{i}", created=BASE + dt.timedelta(seconds=i)) for i in range(count)]
    await put_executions(store, executions)
    await until_visible(api, name, count, wait_for)
    return store, api, queries, [e.id for e in executions]


async def next_page_refused(api, job: str, token: str) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        await api.list_executions(ListJobExecutionsRequest(job=job, limit=3, next_token=token))
    assert info.value.code == 400 and info.value.field == "next_token"
    return info.value


async def rest_of_walk(api, job: str, token: str, limit: int = 3) -> tuple[list[str], set[str]]:
    """The ids of every page after `token`, and the key ids the tokens met on the way named."""
    ids: list[str] = []
    keys = {key_id_of(token)}
    while token:
        _, page = await api.list_executions(ListJobExecutionsRequest(job=job, limit=limit, next_token=token))
        ids += [e.id for e in page.items]
        token = page.next_token
        if token:
            keys.add(key_id_of(token))
    return ids, keys


async def test_a_walk_begun_before_a_rotation_continues_after_it(cluster, bus, wait_for) -> None:
    store, api, [query], ids = await seed(cluster, bus, wait_for, "rotated", 12)
    _, first = await api.list_executions(ListJobExecutionsRequest(job="rotated", limit=3))
    old = key_id_of(first.next_token)
    assert old == query.token_key.id

    new = await tokenkeys.rotate_now(store)
    assert new != old

    async def signs_with_new() -> bool:
        return query.token_key.id == new

    await wait_for(signs_with_new)
    rest, named = await rest_of_walk(api, "rotated", first.next_token)
    assert [e.id for e in first.items] + rest == ids  # every execution once, in order
    assert named == {old, new}  # the first token was signed before the rotation, the later ones after
    # The old key is still there for the walks signed with it, until it expires.
    assert await Kv(bus, s.BUCKET_CONFIG).get(tokenkeys.config_key(old)) is not None


async def test_a_token_signed_with_a_revoked_key_is_a_400_naming_next_token(cluster, bus, wait_for) -> None:
    """Revoking deletes every older key, the scheduled one and one rotated by hand without revoking alike."""
    store, api, [query], ids = await seed(cluster, bus, wait_for, "revoked", 7)
    _, first = await api.list_executions(ListJobExecutionsRequest(job="revoked", limit=3))
    middle = await tokenkeys.rotate_now(store)

    async def signs_with_middle() -> bool:
        return query.token_key.id == middle

    await wait_for(signs_with_middle)
    _, second = await api.list_executions(ListJobExecutionsRequest(job="revoked", limit=3))
    old = {key_id_of(first.next_token), key_id_of(second.next_token)}
    assert len(old) == 2
    newest = await tokenkeys.rotate_now(store, revoke=True)

    for token in (first.next_token, second.next_token):
        async def refused(token: str = token) -> InvalidInput:
            return await next_page_refused(api, "revoked", token)

        error = await wait_for(refused)  # once the replica's watch has delivered the delete
        assert "list again" in error.message
    config = Kv(bus, s.BUCKET_CONFIG)
    assert [await config.get(tokenkeys.config_key(key_id)) for key_id in old] == [None, None]
    # Listing again works, with tokens signed by the new key.
    _, again = await api.list_executions(ListJobExecutionsRequest(job="revoked", limit=3))
    assert key_id_of(again.next_token) == newest
    rest, _ = await rest_of_walk(api, "revoked", again.next_token)
    assert [e.id for e in again.items] + rest == ids


async def test_two_replicas_agree_on_the_keys_also_right_after_a_rotation(cluster, bus, wait_for) -> None:
    store, api, (a, b), ids = await seed(cluster, bus, wait_for, "shared", 20, replicas=2)
    assert a.token_key == b.token_key  # the second replica found the first one's key, and made none
    position = [a.view.last_seq, 1, "x", "job", 1]
    for signer, verifier in ((a, b), (b, a)):
        token = pagetoken.encode(signer.token_key, scope_of("shared"), position)
        assert pagetoken.decode(verifier.page_keys.lookup, token, scope_of("shared")) == position

    _, first = await api.list_executions(ListJobExecutionsRequest(job="shared", limit=2))
    new = await tokenkeys.rotate_now(store)

    async def a_signs_with_new() -> bool:
        return a.token_key.id == new

    await wait_for(a_signs_with_new)
    token = pagetoken.encode(a.token_key, scope_of("shared"), position)

    async def b_accepts() -> bool:  # allowing for b's watch to deliver the new key
        return pagetoken.decode(b.page_keys.lookup, token, scope_of("shared")) == position

    await wait_for(b_accepts, timeout=5.0)
    assert b.token_key == a.token_key
    # Through the API, pages land on either replica: a walk begun before the rotation completes.
    rest, named = await rest_of_walk(api, "shared", first.next_token, limit=2)
    assert [e.id for e in first.items] + rest == ids
    assert len(named) == 2


async def test_replicas_rotating_on_schedule_create_one_key_per_period(cluster, bus, wait_for, monkeypatch) -> None:
    """Two replicas find each rotation due at the same moment and race to create its key: exactly one
    write per key id, and a slow walk across several rotations, its pages on either replica, completes."""
    cluster.settings.page_key_rotation = 1.0
    writes: list[str] = []
    loaded = asyncio.Event()

    async def record() -> None:
        async with Kv(bus, s.BUCKET_CONFIG).watch(f"{tokenkeys.PREFIX}.>") as watch:
            async for entry in watch:
                if entry is None:
                    loaded.set()
                elif not entry.deleted:
                    writes.append(entry.key)

    recorder = asyncio.create_task(record())
    try:
        await asyncio.wait_for(loaded.wait(), 5)
        store, api, _, ids = await seed(cluster, bus, wait_for, "scheduled", 10, replicas=2)
        _, first = await api.list_executions(ListJobExecutionsRequest(job="scheduled", limit=2))
        items, token, named = [e.id for e in first.items], first.next_token, {key_id_of(first.next_token)}
        while token:
            await asyncio.sleep(0.6)
            _, page = await api.list_executions(ListJobExecutionsRequest(job="scheduled", limit=2, next_token=token))
            items += [e.id for e in page.items]
            token = page.next_token
            if token:
                named.add(key_id_of(token))
        assert items == ids
        assert len(named) >= 2  # the walk did span rotations
        await asyncio.sleep(0.3)
    finally:
        recorder.cancel()
    assert len(writes) >= 3
    assert len(writes) == len(set(writes)), f"a key id was written more than once: {writes}"
    keys = {r.key.partition(".")[2]: r.value for r in await tokenkeys._bucket(bus).scan(f"{tokenkeys.PREFIX}.>")}
    for key_id, key in keys.items():  # each key is its own period's, created within that period
        assert key_id == tokenkeys.scheduled_id(tokenkeys.period_start(key.created, tokenkeys.SECOND))


async def test_a_forged_token_is_refused(cluster, bus, wait_for) -> None:
    store, api, [query], _ = await seed(cluster, bus, wait_for, "forged", 5)
    _, first = await api.list_executions(ListJobExecutionsRequest(job="forged", limit=2))
    position = pagetoken.decode(query.page_keys.lookup, first.next_token, scope_of("forged"))
    # A random key under the id of the real one: the signature does not match.
    forged = pagetoken.encode(pagetoken.Key(query.token_key.id, os.urandom(32)), scope_of("forged"), position)
    assert "not valid" in (await next_page_refused(api, "forged", forged)).message
    # A random key under an id of its own: no such key.
    forged = pagetoken.encode(pagetoken.Key("sforged", os.urandom(32)), scope_of("forged"), position)
    assert "list again" in (await next_page_refused(api, "forged", forged)).message
    # The real token still works.
    _, page = await api.list_executions(ListJobExecutionsRequest(job="forged", limit=2, next_token=first.next_token))
    assert len(page.items) == 2


async def test_a_token_forged_with_the_single_key_of_before_the_upgrade_is_refused(cluster, bus, wait_for) -> None:
    """Before rotation, one key signed every token for ever. Whoever read it can still sign tokens of that
    format: they are refused as old, and the key itself is deleted."""
    legacy = os.urandom(32)
    config = Kv(bus, s.BUCKET_CONFIG)
    await config.create(tokenkeys.PREFIX, legacy)
    store, api, [query], executions = await seed(cluster, bus, wait_for, "legacy", 4)
    _, first = await api.list_executions(ListJobExecutionsRequest(job="legacy", limit=2))
    position = pagetoken.decode(query.page_keys.lookup, first.next_token, scope_of("legacy"))
    body = msgspec.msgpack.encode([2, scope_of("legacy"), position])  # exactly as the single-key encoder did
    sig = hmac.new(legacy, body, hashlib.sha256).digest()[:16]
    old = (base64.urlsafe_b64encode(body).rstrip(b"=") + b"." + base64.urlsafe_b64encode(sig).rstrip(b"=")).decode()
    error = await next_page_refused(api, "legacy", old)
    assert "version" in error.message and "list again" in error.message

    async def legacy_deleted() -> bool:
        return await config.get(tokenkeys.PREFIX) is None

    await wait_for(legacy_deleted)


async def test_keys_are_deleted_once_expired_and_their_tokens_refused(cluster, bus, wait_for, monkeypatch) -> None:
    """A key is deleted `page_retention` after the next one took over; the set stays small."""
    cluster.settings.page_key_rotation = 1.0
    cluster.settings.page_retention = 1.5
    store, api, [query], _ = await seed(cluster, bus, wait_for, "expiring", 5)
    _, first = await api.list_executions(ListJobExecutionsRequest(job="expiring", limit=2))
    old = key_id_of(first.next_token)
    config = Kv(bus, s.BUCKET_CONFIG)

    async def deleted() -> bool:
        return await config.get(tokenkeys.config_key(old)) is None

    await wait_for(deleted, timeout=10.0)
    assert query.page_keys.lookup(old) is None
    await next_page_refused(api, "expiring", first.next_token)
    await asyncio.sleep(2.0)
    # Only the keys that may still have live tokens remain: created within the last rotation + retention.
    assert 1 <= len(await tokenkeys._bucket(bus).scan(f"{tokenkeys.PREFIX}.>")) <= 4

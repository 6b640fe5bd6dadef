"""Typed access to the key-value buckets, with compare-and-set loops.

All durable state lives in JetStream buckets; services hold none that a replica could not rebuild.
Two replicas changing the same record race on its revision: the loser re-reads and re-applies its
change (`mutate`), so concurrent writers never overwrite each other.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

from . import subjects as s
from . import telemetry
from .codec import decode_message, from_msgpack_or_none, to_msgpack
from .durations import utcnow
from .errors import Conflict, Internal, NotFound, Unavailable
from .models import Evaluation, Execution, Job, JobVersion, Node, SubmissionOutcome
from .transport import Bus, Entry, Kv
from .validation import check_token

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_CAS_ATTEMPTS = 50


class Record(Generic[T]):
    """A decoded value and the revision it was read at."""

    __slots__ = ("key", "value", "revision", "headers")

    def __init__(self, key: str, value: T, revision: int, headers: dict[str, str]) -> None:
        self.key = key
        self.value = value
        self.revision = revision
        self.headers = headers


class Bucket(Generic[T]):
    def __init__(self, bus: Bus, name: str, tp: type[T]) -> None:
        self.kv = Kv(bus, name)
        self.tp = tp

    def decode(self, entry: Entry) -> Record[T]:
        """One record; an undecodable one is Poison (a consumer handling it makes its message a dead letter)."""
        return Record(entry.key, decode_message(entry.value, self.tp, f"record {self.kv.bucket}/{entry.key}"),
                      entry.revision, entry.headers)

    async def get(self, key: str) -> Record[T] | None:
        entry = await self.kv.get(key)
        return None if entry is None else self.decode(entry)

    async def require(self, key: str, what: str) -> Record[T]:
        record = await self.get(key)
        if record is None:
            raise NotFound(f"{what} not found")
        return record

    async def create(self, key: str, value: T, *, headers: dict[str, str] | None = None) -> int:
        return await self.kv.create(key, to_msgpack(value), headers=headers)

    async def update(self, key: str, value: T, *, last: int, headers: dict[str, str] | None = None) -> int:
        return await self.kv.update(key, to_msgpack(value), last=last, headers=headers)

    async def put(self, key: str, value: T, *, headers: dict[str, str] | None = None) -> int:
        return await self.kv.put(key, to_msgpack(value), headers=headers)

    async def mutate(
        self,
        key: str,
        change: Callable[[T], bool | None],
        *,
        headers: dict[str, str] | None = None,
        current: Record[T] | None = None,
    ) -> Record[T] | None:
        """Read, apply `change` in place, write back if it returned anything but False; retry on conflict.

        Returns the written record, the unchanged one if `change` declined, or None if the key is absent.
        Without `headers`, the write carries on the trace of the record it changes (one trace per job,
        even for a write made outside any span, such as a reconcile of a batch of events). With `current`
        (a record of `key` the caller has just read, which `change` then alters in place) the first
        attempt starts from it instead of a read: one round trip, not two, when nobody wrote meanwhile.
        """
        for _ in range(MAX_CAS_ATTEMPTS):
            record = current if current is not None else await self.get(key)
            current = None  # a conflict: read again
            if record is None:
                return None
            if change(record.value) is False:
                return record
            carried = headers if headers is not None else telemetry.trace_headers(record.headers)
            try:
                rev = await self.update(key, record.value, last=record.revision, headers=carried)
            except Conflict:
                continue
            return Record(key, record.value, rev, carried)
        raise Internal(f"{self.kv.bucket}/{key}: too many concurrent writers")

    def decode_or_none(self, entry: Entry) -> Record[T] | None:
        """For reads of many entries: one undecodable entry is logged and skipped, not fatal to all."""
        value = from_msgpack_or_none(entry.value, self.tp, f"{self.kv.bucket}/{entry.key}")
        return None if value is None else Record(entry.key, value, entry.revision, entry.headers)

    async def scan(self, pattern: str = ">") -> list[Record[T]]:
        records = (self.decode_or_none(e) for e in await self.kv.scan(pattern))
        return [r for r in records if r is not None]


class Mirror(Generic[T]):
    """A live in-memory copy of a bucket (or part of one), kept current by a watch.

    Rebuildable at any time from the bucket, so holding it breaks no statelessness rule; it lets a
    scheduler match thousands of nodes without a read per node.
    """

    def __init__(self, bucket: Bucket[T], pattern: str = ">") -> None:
        self.bucket = bucket
        self.pattern = pattern
        self.items: dict[str, T] = {}
        self.ready = asyncio.Event()

    async def run(self, stopping: asyncio.Event) -> None:
        """Follow the bucket until `stopping`. Run again after a crash, it reloads: keys deleted while
        it was away are dropped once the current values are in."""
        seen: set[str] | None = set()
        async with self.bucket.kv.watch(self.pattern) as watch:
            async for entry in watch:
                if stopping.is_set():
                    return
                if entry is None:
                    if seen is not None:
                        for key in [k for k in self.items if k not in seen]:
                            del self.items[key]
                    seen = None
                    self.ready.set()
                    await self.applied(None, loading=False)
                    continue
                if seen is not None:
                    seen.add(entry.key)
                if entry.deleted:
                    self.items.pop(entry.key, None)
                elif (record := self.bucket.decode_or_none(entry)) is not None:
                    self.items[entry.key] = record.value
                await self.applied(entry, loading=seen is not None)

    async def applied(self, entry: Entry | None, loading: bool) -> None:
        """Called after each change is in the copy (`entry` None: the first load is complete; `loading`:
        the change is part of that first load). Nothing here; a subclass may pace itself."""

    async def wait_ready(self, timeout: float = 10.0) -> None:
        try:
            await asyncio.wait_for(self.ready.wait(), timeout)
        except asyncio.TimeoutError:
            raise Unavailable(f"{self.bucket.kv.bucket} not loaded yet") from None


def touch(execution: Execution) -> None:
    """Every change of an execution bumps its revision and updated_at (the query view relies on it)."""
    execution.status.revision += 1
    execution.status.updated_at = utcnow()


class Store:
    """The buckets, typed."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.jobs = Bucket(bus, s.BUCKET_JOBS, Job)
        self.job_names = Kv(bus, s.BUCKET_JOB_NAMES)
        self.job_versions = Bucket(bus, s.BUCKET_JOB_VERSIONS, JobVersion)
        self.evaluations = Bucket(bus, s.BUCKET_EVALUATIONS, Evaluation)
        self.executions = Bucket(bus, s.BUCKET_EXECUTIONS, Execution)
        self.archive = Bucket(bus, s.BUCKET_EXECUTIONS_ARCHIVE, Execution)
        self.nodes = Bucket(bus, s.BUCKET_NODES, Node)
        self.submissions = Bucket(bus, s.BUCKET_SUBMISSIONS, SubmissionOutcome)
        self.config = Kv(bus, s.BUCKET_CONFIG)

    async def job_id_by_name(self, namespace: str, name: str) -> str | None:
        entry = await self.job_names.get(s.job_name_key(namespace, name))
        return entry.value.decode() if entry is not None else None

    async def find_job(self, namespace: str, ref: str) -> Record[Job]:
        """A job by id or by name; NotFound names the reference."""
        check_token(ref, "job", "job id or name")
        record = await self.jobs.get(s.job_key(namespace, ref))
        if record is not None:
            return record
        job_id = await self.job_id_by_name(namespace, ref)
        if job_id is not None:
            record = await self.jobs.get(s.job_key(namespace, job_id))
            if record is not None:
                return record
        raise NotFound(f"job {ref!r} not found in namespace {namespace!r}", field="job")

    async def job_version(self, namespace: str, job_id: str, version: int) -> JobVersion:
        record = await self.job_versions.require(s.job_version_key(namespace, job_id, version), "job version")
        return record.value

    async def executions_of_job(self, namespace: str, job_id: str) -> list[Record[Execution]]:
        return await self.executions.scan(s.executions_of_job(namespace, job_id))

    async def all_executions(self, pattern: str = ">") -> list[Execution]:
        """Every execution matching `pattern`, archived or not (the newer revision where both hold one:
        a move to the archive interrupted between its two writes). For rebuilds and checks, not decisions."""
        found = {r.key: r.value for r in await self.archive.scan(pattern)}
        for record in await self.executions.scan(pattern):
            held = found.get(record.key)
            if held is None or held.status.revision <= record.value.status.revision:
                found[record.key] = record.value
        return list(found.values())

    async def archive_execution(self, key: str, keep: Callable[[Execution], bool]) -> bool:
        """Move an execution to the archive bucket, unless `keep(current)` says it must stay. The archive
        is written first, then the live record is deleted on the revision just read (a change meanwhile:
        Conflict, nothing deleted), with a marker that says where it went and that leaves the bucket after
        ARCHIVE_MARKER_TTL. Safe to repeat at any point. True if it moved now."""
        record = await self.executions.get(key)
        if record is None or keep(record.value):
            return False
        await self.archive.put(key, record.value, headers=telemetry.trace_headers(record.headers))
        await self.executions.kv.delete(key, last=record.revision, ttl=s.ARCHIVE_MARKER_TTL,
                                        headers={s.ARCHIVED_HEADER: "1"})
        return True

    async def mutate_execution(
        self,
        execution: Execution,
        change: Callable[[Execution], bool | None],
        *,
        headers: dict[str, str] | None = None,
    ) -> Record[Execution] | None:
        """CAS-change one execution; bumps revision and updated_at only when something changed."""
        return await self.change_execution(execution.key, change, headers=headers)

    async def change_execution(
        self,
        key: str,
        change: Callable[[Execution], bool | None],
        *,
        headers: dict[str, str] | None = None,
        current: Record[Execution] | None = None,
    ) -> Record[Execution] | None:
        """`mutate_execution` by key (one read, not two, when the caller has no record yet; none with
        `current`, a record just read, see `Bucket.mutate`); None if absent."""

        def apply(execution: Execution) -> bool:
            if change(execution) is False:
                return False
            touch(execution)
            return True

        return await self.executions.mutate(key, apply, headers=headers, current=current)

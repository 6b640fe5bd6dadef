"""Shipping what executions print into SHOAL_OUTPUT, as a bounded tail.

Each execution's output goes out as `OutputChunk`s on `shoal.output.<node>.<ns>.<job>.<execution>`:

- Batched. One loop for the whole agent (a simulated fleet included) looks at every running execution
  every `INTERVAL` (0.5 s) and takes what it printed since the last look as one chunk of at most
  `CHUNK` (4 KiB) bytes; a run that ends sends one last chunk with `final` set, at once. A command that
  writes faster than a chunk per interval loses the middle: each chunk is the newest 4 KiB, cut at a
  line start, because SHOAL_OUTPUT keeps only the last 64 chunks of an execution anyway.
- Ordered. Chunks of one execution are published one at a time, each after the previous one's ack, so
  stream order is `seq` order; executions are published side by side.
- Bounded. While NATS is away chunks wait in memory: at most `KEPT` (64, what the stream would keep) per
  execution and `MAX_PENDING_BYTES` in all, the oldest dropped first and counted (`dropped`).

Where the output comes from (an `OutputSource`): a real process's `shoal-output.log`, read from where
the last chunk ended (`shoal-output.pos` in the run dir remembers it, so an agent that re-adopts the
process after a restart carries on from there); a simulated run's `config.simulate.output`, one line
a second; a config job's list of the files it wrote.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import OrderedDict, deque
from pathlib import Path
from typing import Protocol

import msgspec

from shared import subjects as s
from shared.api import OUTPUT_CHUNK_BYTES, OutputChunk
from shared.codec import to_msgpack
from shared.durations import utcnow
from shared.errors import ShoalError, Unavailable
from shared.models import OUTPUT_SUMMARY_CHARS, Execution
from shared.topology import OUTPUT_CHUNKS_KEPT
from shared.transport import Bus

from .runstate import OUTPUT_FILE, OUTPUT_POSITION_FILE, read_struct, write_struct

log = logging.getLogger(__name__)

INTERVAL = 0.5  # seconds between chunks of one execution, at most one chunk each
CHUNK = OUTPUT_CHUNK_BYTES
KEPT = OUTPUT_CHUNKS_KEPT  # chunks of one execution waiting at most: the stream keeps no more of it
MAX_PENDING_BYTES = 4 * 1024 * 1024  # chunks of every execution waiting at most
BATCH = 64  # executions published side by side
SIM_LINE_EVERY = 1.0  # seconds between two lines of a simulated run's output


class OutputSource(Protocol):
    first_seq: int  # the seq of the last chunk shipped before (0: none)

    def take(self, final: bool) -> bytes | None:
        """What was printed since the last take, at most CHUNK bytes (the newest); None if nothing."""

    def shipped(self, seq: int) -> None:
        """The chunk just taken went out as `seq` (or is queued to)."""


class OutputPosition(msgspec.Struct, kw_only=True):
    """`shoal-output.pos`: how far a process's output file has been shipped."""

    seq: int
    offset: int


def newest(data: bytes, start: int, limit: int = CHUNK) -> tuple[bytes, int]:
    """At most `limit` bytes of the end of `data` (which begins at file offset `start`), from a line start
    when it has to be cut; and where they begin."""
    if len(data) <= limit:
        return data, start
    cut = len(data) - limit
    tail = data[cut:]
    newline = tail.find(b"\n")
    if 0 <= newline < len(tail) - 1:
        cut += newline + 1
    return data[cut:], start + cut


def output_summary(text: str, limit: int = OUTPUT_SUMMARY_CHARS) -> str:
    """The last lines of an ended execution's output, at most `limit` characters (cut at a line start
    when a line start falls inside them): all of it that its details keep."""
    if len(text) <= limit:
        return text
    tail = text[-limit:]
    newline = tail.find("\n")
    return tail[newline + 1:] if 0 <= newline < len(tail) - 1 else tail


class FileSource:
    """A process's `shoal-output.log` (stdout and stderr as they interleaved), from where shipping got to.

    Complete lines go out as soon as they are there; a line still being written is held back for one
    interval (it goes out whole, or as it stands a look later: a prompt or a progress bar)."""

    def __init__(self, run_dir: Path, *, resume: bool) -> None:
        self.path = run_dir / OUTPUT_FILE
        self.position_path = run_dir / OUTPUT_POSITION_FILE
        position = read_struct(self.position_path, OutputPosition) if resume else None
        self.first_seq = position.seq if position is not None else 0
        self.offset = position.offset if position is not None else 0
        self.skipped = 0  # bytes never shipped: written faster than a chunk per interval
        self._held = False

    def take(self, final: bool) -> bytes | None:
        try:
            with open(self.path, "rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                if size < self.offset:  # replaced under us: start again
                    self.offset = 0
                if size == self.offset:
                    return None
                start = max(self.offset, size - CHUNK)
                fh.seek(start)
                data = fh.read(size - start)
        except OSError:
            return None
        data, start = newest(data, start)
        self.skipped += start - self.offset
        if not final:
            whole = data.rfind(b"\n") + 1
            if whole:
                data = data[:whole]
                self._held = False
            elif not self._held:
                self._held = True  # no complete line yet: give it one more interval
                self.offset = start
                return None
            else:
                self._held = False
        self.offset = start + len(data)
        return data or None

    def shipped(self, seq: int) -> None:
        try:
            write_struct(self.position_path, OutputPosition(seq=seq, offset=self.offset), durable=False)
        except OSError as exc:
            log.debug("cannot write %s: %s", self.position_path, exc)


class LinesSource:
    """A simulated run that prints `text` as a line every SIM_LINE_EVERY seconds, the first at its start
    (a run resumed after an agent restart goes on from the line it is at)."""

    def __init__(self, text: str, elapsed) -> None:  # elapsed: () -> seconds since the run started
        self.line = (text + "\n").encode()[:CHUNK]
        self.elapsed = elapsed
        self.printed = int(elapsed() / SIM_LINE_EVERY)
        self.first_seq = self.printed  # one chunk per line at most: seqs go on from the line reached

    def take(self, final: bool) -> bytes | None:
        due = int(self.elapsed() / SIM_LINE_EVERY) + 1 - self.printed
        if due <= 0:
            return None
        self.printed += due
        return self.line * max(1, min(due, CHUNK // len(self.line)))

    def shipped(self, seq: int) -> None:
        return None


class TextSource:
    """Output known all at once (the files a config job wrote)."""

    first_seq = 0

    def __init__(self, text: str) -> None:
        self.data: bytes | None = newest(text.encode(), 0)[0] or None

    def take(self, final: bool) -> bytes | None:
        data, self.data = self.data, None
        return data

    def shipped(self, seq: int) -> None:
        return None


class _Stream:
    __slots__ = ("subject", "source", "seq")

    def __init__(self, subject: str, source: OutputSource) -> None:
        self.subject = subject
        self.source = source
        self.seq = source.first_seq


class _Chunk:
    __slots__ = ("subject", "payload")

    def __init__(self, subject: str, payload: bytes) -> None:
        self.subject = subject
        self.payload = payload


class OutputShipper:
    """Every execution's output of one agent (or simulated fleet), on one connection."""

    def __init__(self, bus: Bus, *, interval: float = INTERVAL, kept: int = KEPT,
                 max_pending_bytes: int = MAX_PENDING_BYTES) -> None:
        self.bus = bus
        self.interval = interval
        self.kept = kept
        self.max_pending_bytes = max_pending_bytes
        self.streams: dict[str, _Stream] = {}  # execution id -> its running output
        # Chunks not yet acknowledged, per execution, the executions in the order they began waiting.
        self.pending: OrderedDict[str, deque[_Chunk]] = OrderedDict()
        self.pending_bytes = 0
        self.shipped = 0
        self.dropped = 0  # chunks given up on (the oldest, while NATS was away)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._look(), name="output-look"),
                       asyncio.create_task(self._send(), name="output-send")]

    # -- executions --------------------------------------------------------------------------------

    def open(self, execution: Execution, source: OutputSource) -> None:
        """Ship what `execution` prints from now on, until `close`."""
        subject = s.output(execution.node_id, execution.namespace, execution.job_id, execution.id)
        self.streams[execution.id] = _Stream(subject, source)

    def close(self, execution_id: str) -> None:
        """The execution ended: ship the rest of its output as its final chunk (empty if nothing is left)."""
        stream = self.streams.pop(execution_id, None)
        if stream is not None:
            self._chunk(execution_id, stream, self._take(stream, final=True) or b"", final=True)

    def ship(self, execution: Execution, source: OutputSource) -> None:
        """Output of an execution that is over already: all of it at once, as its final chunk."""
        self.open(execution, source)
        self.close(execution.id)

    def _take(self, stream: _Stream, final: bool) -> bytes | None:
        try:
            return stream.source.take(final)
        except Exception:  # a source that fails must not stop the others
            log.exception("reading the output of %s failed", stream.subject)
            return None

    def _chunk(self, execution_id: str, stream: _Stream, data: bytes, final: bool = False) -> None:
        stream.seq += 1
        stream.source.shipped(stream.seq)
        payload = to_msgpack(OutputChunk(seq=stream.seq, data=data, at=utcnow(), final=final))
        queue = self.pending.get(execution_id)
        if queue is None:
            queue = self.pending[execution_id] = deque()
        queue.append(_Chunk(stream.subject, payload))
        self.pending_bytes += len(payload)
        if len(queue) > self.kept:
            self._drop(execution_id)
        while self.pending_bytes > self.max_pending_bytes and self.pending:
            self._drop(next(iter(self.pending)))
        self._wake.set()

    def _drop(self, execution_id: str) -> None:
        queue = self.pending[execution_id]
        self.pending_bytes -= len(queue.popleft().payload)
        if not queue:
            del self.pending[execution_id]
        self.dropped += 1
        if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
            log.warning("%d output chunks dropped so far: NATS has not taken them (the oldest go first)",
                        self.dropped)

    # -- the loops ---------------------------------------------------------------------------------

    async def _look(self) -> None:
        """Every interval, one chunk of whatever each running execution printed since the last look."""
        while True:
            await asyncio.sleep(self.interval)
            for execution_id, stream in list(self.streams.items()):
                data = self._take(stream, final=False)
                if data:
                    self._chunk(execution_id, stream, data)

    async def _send(self) -> None:
        """Publish the oldest waiting chunk of up to BATCH executions at once; what fails is retried before
        anything newer of its execution, so each execution's chunks are stored in order."""
        delay = 0.1
        while True:
            await self._wake.wait()
            batch = [(execution_id, queue[0]) for execution_id, queue in list(self.pending.items())[:BATCH]]
            if not batch:
                self._wake.clear()
                continue
            results = await asyncio.gather(*(self.bus.js_publish(chunk.subject, chunk.payload)
                                             for _, chunk in batch), return_exceptions=True)
            failed: BaseException | None = None
            for (execution_id, chunk), result in zip(batch, results):
                if isinstance(result, BaseException) and self._final(chunk, result):
                    self._give_up(execution_id, chunk, result)
                    continue
                if isinstance(result, BaseException):
                    failed = result
                    continue
                self.shipped += 1
                queue = self.pending.get(execution_id)
                if queue and queue[0] is chunk:  # (unless dropped meanwhile)
                    queue.popleft()
                    self.pending_bytes -= len(chunk.payload)
                    if queue:
                        self.pending.move_to_end(execution_id)  # the others' turn first
                    else:
                        del self.pending[execution_id]
            if failed is not None:
                log.info("output of %d execution(s) not delivered yet (%s); retrying in %.1fs",
                         sum(isinstance(r, BaseException) for r in results), failed, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            else:
                delay = 0.1

    def _final(self, chunk: _Chunk, error: BaseException) -> bool:
        """Whether trying `chunk` again cannot help: the stream refused the message itself (a JetStream
        error, not a timeout or a lost connection), or the server refused this connection its subject."""
        if isinstance(error, ShoalError) and not isinstance(error, Unavailable):
            return True
        return any(chunk.subject in violation for violation in self.bus.violations)

    def _give_up(self, execution_id: str, chunk: _Chunk, error: BaseException) -> None:
        queue = self.pending.get(execution_id)
        if not queue or queue[0] is not chunk:
            return  # dropped meanwhile
        queue.popleft()
        self.pending_bytes -= len(chunk.payload)
        if not queue:
            del self.pending[execution_id]
        self.dropped += 1
        if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
            log.warning("output chunk on %s refused for good and dropped (%d dropped so far): %s",
                        chunk.subject, self.dropped, error)

    # -- the end -----------------------------------------------------------------------------------

    async def drain(self, timeout: float = 5.0) -> None:
        """Ship what is waiting (for up to `timeout` seconds), then stop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.pending and loop.time() < deadline and self._tasks:
            await asyncio.sleep(0.05)
        if self.pending:
            log.warning("%d output chunks not delivered at shutdown", sum(len(q) for q in self.pending.values()))
        await self.abandon()

    async def abandon(self) -> None:
        """Stop at once, dropping what waits (as a crash would)."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2)

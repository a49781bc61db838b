"""The NAR stream of a blob service with :class:`~nixcas.castore.blob.base.BulkReads`, for servers.

:func:`bulk_stream` yields a planned NAR (:class:`~nixcas.store.nar.rawplan.Plan`)
while :data:`READERS` worker threads read ahead of it, each byte hashed against
the BLAKE3 it is stored under before it is yielded:

* consecutive small files form a *run*: one
  :meth:`~nixcas.castore.blob.base.BulkReads.read_run`, whose contents and the
  framing between them are joined on the worker into one piece (one write);
* a file up to :data:`WHOLE_MAX` is one
  :meth:`~nixcas.castore.blob.base.BulkReads.read_whole`, hashed whole before a
  byte of it is yielded;
* a bigger file is read chunk by chunk (its chunk list from
  :meth:`~nixcas.castore.blob.base.BlobService.chunks`), in steps of about
  :data:`STEP` bytes, :data:`STEPS_AHEAD` steps read at once: each chunk one
  :meth:`~nixcas.castore.blob.base.BulkReads.read_chunk_into`, checked against the
  chunk's digest before it is yielded; the chunks' bytes also go, in order, into
  the blob's BLAKE3 on a thread of its own, compared with the blob's digest
  before the last step is yielded (what ties the chunk list to the blob).

Reads go into buffers reused (by every stream of the process) once no view of
them is alive; pieces are ``bytes`` or views of those buffers.  At most
:data:`JOBS_AHEAD` jobs and about :data:`WINDOW_BYTES` of contents are read
ahead, a big file at most four or five steps (one job bigger than the window
runs alone).  What a job cannot serve (a missing, damaged or differently sized
blob, a blob kept in a form only the async API reads) is read file by file (or
chunk by chunk) through the async API
(:func:`~nixcas.store.nar.render.file_contents`,
:meth:`~nixcas.castore.blob.base.BlobService.read_chunk`), which raises the
precise error after the NAR up to that file: nothing unverified is yielded.
Unlike :func:`~nixcas.store.nar.dump.dump_nar` nothing here blocks the event
loop: the stream only awaits its jobs.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import blake3

from nixcas.castore.blob.base import BlobService, BulkReads, ChunkMeta
from nixcas.castore.blob.buffers import ReusedBuffers, chunk_room, read_in_rooms
from nixcas.errors import ChecksumMismatch, StorageError
from nixcas.store.nar.plan import Hole, show_path
from nixcas.store.nar.rawplan import RUN_FILES, Plan
from nixcas.store.nar.render import file_contents

__all__ = [
    "JOBS_AHEAD",
    "KEEP_BYTES",
    "READERS",
    "RUN_BYTES",
    "STEP",
    "STEPS_AHEAD",
    "WHOLE_MAX",
    "WINDOW_BYTES",
    "bulk_stream",
]

WINDOW_BYTES = 32 << 20
"""File contents read ahead of the consumer, at most (per stream)."""
JOBS_AHEAD = 4
"""Jobs (runs, files, steps of a big file) submitted ahead of the consumer, at most."""
RUN_BYTES = 1 << 20
"""Most bytes of file contents in one run."""
WHOLE_MAX = 16 << 20
"""Files up to this size are read (and hashed) whole; bigger ones chunk by chunk."""
STEP = 4 << 20
"""A big file is read in steps of about this many bytes."""
STEPS_AHEAD = 2
"""Steps of a big file being read at once, ahead of the one being yielded (and one more, read, waiting)."""
READERS = 2
"""Threads reading (and checking) for every stream of the process: steps of a big file are read in parallel."""
KEEP_BYTES = 64 << 20
"""Read buffers kept for reuse, at most (per process, all streams together)."""
_SLACK = 256 << 10
"""Room beyond a run's contents (gaps between blobs in a pack)."""
_EMPTY = memoryview(bytearray())

Pieces = list[bytes | memoryview]


@dataclass(slots=True)
class _Job:
    """Files ``start`` to ``stop`` of the plan, read on the worker by ``future`` (``None``: read one by one)."""

    start: int
    stop: int
    cost: int
    future: asyncio.Future[Pieces | None] | None
    buffer: bytearray | None = None
    big: _Big | None = None
    """A big file's state once its first step found its chunk list."""


def _run_job(
    reads: BulkReads, wanted: list[tuple[bytes, int]], frames: list[bytes], buffer: bytearray
) -> Pieces | None:
    """A run's framing and contents as one piece (``None``: some file is read one by one instead)."""
    data = reads.read_run(wanted, memoryview(buffer))
    if data is None:
        return None
    pieces: Pieces = []
    for frame, contents in zip(frames, data, strict=True):
        pieces.append(frame)
        pieces.append(contents)
    return [b"".join(pieces)]


def _whole_job(reads: BulkReads, digest: bytes, size: int, frame: bytes, buffer: bytearray) -> Pieces | None:
    """A file read and hashed whole into ``buffer`` (yielded as a view of it)."""
    data = reads.read_whole(digest, size, memoryview(buffer))
    return None if data is None else [frame, data]


_BUFFERS = ReusedBuffers(KEEP_BYTES)


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Mark an abandoned job's error as seen (the consumer reports the errors of the jobs it reaches)."""
    if not future.cancelled():
        future.exception()


_POOLS: dict[str, ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()


def _named_pool(name: str, threads: int = 1) -> ThreadPoolExecutor:
    with _POOL_LOCK:
        pool = _POOLS.get(name)
        if pool is None:
            pool = _POOLS[name] = ThreadPoolExecutor(threads, thread_name_prefix=name)
        return pool


def _pool() -> ThreadPoolExecutor:
    """The reading threads of every stream of the process."""
    return _named_pool("nixcas-nar", READERS)


def _hash_pool() -> ThreadPoolExecutor:
    """The thread hashing big files whole (one, so a file's steps are hashed in order)."""
    return _named_pool("nixcas-nar-hash")


class _Reader:
    """The jobs of one stream, submitted in plan order within the window's bounds."""

    def __init__(self, plan: Plan, reads: BulkReads, blobs: BlobService) -> None:
        self.plan = plan
        self.reads = reads
        self.blobs = blobs
        self.window: deque[_Job] = deque()
        self.held = 0
        self.next_file = 0
        self.buffers = _BUFFERS
        self.pool = _pool()

    def _run_end(self, i: int) -> tuple[int, int]:
        """The end of the run starting at file ``i``, and its bytes of contents."""
        sizes, run_max = self.plan.sizes, self.reads.run_max
        stop, total, n = i, 0, len(sizes)
        while stop < n and stop - i < RUN_FILES and sizes[stop] <= run_max and total + sizes[stop] <= RUN_BYTES:
            total += sizes[stop]
            stop += 1
        return max(stop, i + 1), total

    def fill(self) -> None:
        """Submit jobs while fewer than :data:`JOBS_AHEAD` are out and the window has room."""
        plan, reads = self.plan, self.reads
        while self.next_file < len(plan.sizes) and len(self.window) < JOBS_AHEAD:
            i = self.next_file
            size = plan.sizes[i]
            whole = reads.run_max < size <= min(WHOLE_MAX, reads.whole_max)
            if size <= reads.run_max:
                stop, cost = self._run_end(i)
            else:
                stop, cost = i + 1, size if whole else STEP
            if self.window and self.held + cost > WINDOW_BYTES:
                return
            job = _Job(i, stop, cost, None)
            if size <= reads.run_max:
                job.buffer = self.buffers.take(cost + _SLACK)
                wanted = list(zip(plan.digests[i:stop], plan.sizes[i:stop], strict=True))
                job.future = self._submit(_run_job, reads, wanted, plan.frames[i:stop], job.buffer)
            elif whole:
                job.buffer = self.buffers.take(size + (size >> 7) + _SLACK)
                job.future = self._submit(_whole_job, reads, plan.digests[i], size, plan.frames[i], job.buffer)
            else:
                job.future = asyncio.ensure_future(_big_head(self, job, self.blobs))
                job.future.add_done_callback(_retrieved)
            self.window.append(job)
            self.held += job.cost
            self.next_file = stop

    def _submit(self, fn: Callable[..., Pieces | None], *args: Any) -> asyncio.Future[Pieces | None]:
        future = asyncio.wrap_future(self.pool.submit(fn, *args))
        future.add_done_callback(_retrieved)
        return future

    def done(self, job: _Job) -> None:
        """The head job is written: release its budget (and its buffer, which the worker no longer uses)."""
        self.window.popleft()
        self.held -= job.cost
        if job.buffer is not None:
            self.buffers.give(job.buffer)

    def abandon(self) -> None:
        """Cancel the jobs; those running on the worker finish on their own (their buffers are dropped)."""
        for job in self.window:
            if job.future is not None:
                job.future.cancel()
        self.window.clear()


class _Big:
    """A big file read chunk by chunk in steps: its chunk list cut into steps, and the BLAKE3 of the steps so far.

    Each chunk is read and checked against its own digest (one
    :meth:`~nixcas.castore.blob.base.BulkReads.read_chunk_into`, on a
    reading thread; steps are read in parallel); the chunks' bytes also go, in
    order, into one BLAKE3 of the whole blob on a thread of its own
    (:func:`_hash_pool`), compared with its digest before the last step is
    yielded.
    """

    __slots__ = ("chunks", "hasher", "hole", "steps")

    def __init__(self, hole: Hole, chunks: list[ChunkMeta]) -> None:
        self.hole = hole
        self.chunks = chunks
        self.hasher = blake3.blake3()
        self.steps: list[tuple[int, int]] = []
        """Chunk index ranges of about :data:`STEP` bytes each."""
        start = got = 0
        for k, chunk in enumerate(chunks):
            got += chunk.size
            if got >= STEP or k == len(chunks) - 1:
                self.steps.append((start, k + 1))
                start, got = k + 1, 0

    def step_bytes(self, step: int) -> int:
        """The buffer a step needs, rounded up to whole MiB (so that buffers fit the next steps too)."""
        start, stop = self.steps[step]
        return -(-sum(chunk_room(c.size) for c in self.chunks[start:stop]) >> 20) << 20

    async def hash(self, pieces: Pieces, last: bool) -> None:
        """Hash a step into the blob's BLAKE3 (in order, on its thread); after the last, check the chunk list."""
        hashed = asyncio.wrap_future(_hash_pool().submit(_update, self.hasher, pieces))
        if not last:
            hashed.add_done_callback(_retrieved)
            return
        await hashed
        got = self.hasher.digest()
        if got != self.hole.digest:
            where = f"blob {self.hole.digest.hex()} (file {show_path(self.hole.path)} in the NAR): its chunks"
            raise ChecksumMismatch(where, self.hole.digest.hex(), got.hex())


def _update(hasher: Any, pieces: Pieces) -> None:
    for piece in pieces:
        hasher.update(piece)


async def _chunk_async(blobs: BlobService, big: _Big, chunk: ChunkMeta) -> bytes:
    """A chunk through the async API, which raises the precise error (damaged, missing)."""
    data = await blobs.read_chunk(chunk)
    if data is None:
        raise StorageError(
            f"blob {big.hole.digest.hex()}: chunk {chunk.digest.hex()} not found "
            f"(file {show_path(big.hole.path)} in the NAR)"
        )
    return data


async def _step(reader: _Reader, big: _Big, step: int, read: asyncio.Future[Pieces]) -> Pieces:
    """Step ``step`` once ``read`` (its batched read) is done, completed through the async API if need be, hashed."""
    pieces = await read
    start, stop = big.steps[step]
    for chunk in big.chunks[start + len(pieces) : stop]:
        pieces.append(await _chunk_async(reader.blobs, big, chunk))
    await big.hash(pieces, last=step == len(big.steps) - 1)
    return pieces


def _start_step(reader: _Reader, big: _Big, step: int) -> tuple[asyncio.Future[Pieces], bytearray]:
    """Submit a step's batched read (into a buffer of its own)."""
    buffer = reader.buffers.take(big.step_bytes(step))
    start, stop = big.steps[step]
    read = asyncio.wrap_future(reader.pool.submit(read_in_rooms, reader.reads, big.chunks[start:stop], buffer))
    read.add_done_callback(_retrieved)
    return read, buffer


async def _big_head(reader: _Reader, job: _Job, blobs: BlobService) -> Pieces | None:
    """Fetch a big file's chunk list and read its first step (``None``: not chunked, read it one by one)."""
    hole = reader.plan.hole(job.start)
    chunks = await blobs.chunks(hole.digest)
    if not chunks or sum(c.size for c in chunks) != hole.size:
        return None
    job.big = _Big(hole, chunks)
    read, job.buffer = _start_step(reader, job.big, 0)
    return [reader.plan.frames[job.start], *await _step(reader, job.big, 0, read)]


async def _job_pieces(reader: _Reader, job: _Job, blobs: BlobService) -> AsyncGenerator[bytes | memoryview, None]:
    """What one job contributes to the stream, in order."""
    plan = reader.plan
    pieces: Pieces | None = None
    if job.future is not None:
        pieces = await job.future
    if pieces is None:  # read file by file: the NAR up to a bad file, then its precise error
        for i in range(job.start, job.stop):
            yield plan.frames[i]
            async for data in file_contents(blobs, plan.hole(i)):
                yield data
        return
    big, buffer = job.big, job.buffer
    if big is None:
        for part in pieces:
            yield part
        return
    job.buffer = None  # given back here, step by step
    steps: asyncio.Queue[tuple[Pieces, bytearray] | Exception | None] = asyncio.Queue(1)
    producer = asyncio.ensure_future(_produce(reader, big, steps))
    try:
        while True:  # a big file: the next steps are read (into buffers of their own) while this one is yielded
            for part in pieces:
                yield part
            part = b""  # no view of the buffer held here any more
            if buffer is not None:
                reader.buffers.give(buffer)  # taken again once the views yielded from it are gone
            item = await steps.get()
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            pieces, buffer = item
    finally:
        producer.cancel()


async def _produce(
    reader: _Reader, big: _Big, steps: asyncio.Queue[tuple[Pieces, bytearray] | Exception | None]
) -> None:
    """Read a big file's steps after its first into ``steps`` in order (then ``None``, or the error).

    Up to :data:`STEPS_AHEAD` reads are submitted at once, so the reading
    threads work on several steps while the consumer yields.
    """
    reads: deque[tuple[int, asyncio.Future[Pieces], bytearray]] = deque()
    following = 1
    try:
        while reads or following < len(big.steps):
            while following < len(big.steps) and len(reads) < STEPS_AHEAD:
                reads.append((following, *_start_step(reader, big, following)))
                following += 1
            step, read, buffer = reads.popleft()
            await steps.put((await _step(reader, big, step, read), buffer))
    except Exception as e:  # the consumer raises it in stream order
        await steps.put(e)
        return
    finally:
        for _, read, _ in reads:
            read.cancel()
    await steps.put(None)


async def bulk_stream(plan: Plan, reads: BulkReads, blobs: BlobService) -> AsyncGenerator[bytes | memoryview, None]:
    """The NAR of ``plan``, each byte verified before it is yielded (see the module's description).

    Pieces are ``bytes`` or read-only views of buffers never reused.  Closing
    the generator early abandons the reads ahead.
    """
    reader = _Reader(plan, reads, blobs)
    try:
        reader.fill()
        while reader.window:
            job = reader.window[0]
            async for piece in _job_pieces(reader, job, blobs):
                yield piece
            reader.done(job)
            reader.fill()
        yield plan.frames[-1]
    finally:
        reader.abandon()

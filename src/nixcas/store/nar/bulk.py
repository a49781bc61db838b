"""The NAR stream of a blob service with :class:`~nixcas.castore.blob.base.BulkReads`, for servers.

:func:`bulk_stream` yields a planned NAR (:class:`~nixcas.store.nar.dump.Plan`)
while a worker thread reads ahead of it, each byte hashed once against its
BLAKE3 before it is yielded:

* consecutive small files form a *run*: one
  :meth:`~nixcas.castore.blob.base.BulkReads.read_run`, whose contents and the
  framing between them are joined on the worker into one piece (one write);
* a file up to :data:`WHOLE_MAX` is one
  :meth:`~nixcas.castore.blob.base.BulkReads.read_whole`, hashed whole before a
  byte of it is yielded, into a buffer of its own (yielded without a copy);
* a bigger file is read chunk by chunk
  (:meth:`~nixcas.castore.blob.base.BulkReads.read_chunks`: each chunk checked
  before it is yielded, the chunk list against the blob's digest at the end),
  in steps of about :data:`STEP` bytes, one step read ahead.

At most :data:`JOBS_AHEAD` jobs and about :data:`WINDOW_BYTES` of contents are
read ahead (one job bigger than that runs alone).  What a job cannot serve (a
missing, damaged or differently sized blob, a blob kept in a form only the
async API reads) is read file by file through the async API
(:func:`~nixcas.store.nar.render.file_contents`), which raises the file's
precise error after the NAR up to that file: nothing unverified is yielded.
Unlike :func:`~nixcas.store.nar.dump.dump_nar` nothing here blocks the event
loop: the stream only awaits its jobs.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncGenerator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from nixcas.castore.blob.base import BlobService, BulkReads
from nixcas.store.nar.dump import RUN_FILES, Plan
from nixcas.store.nar.render import file_contents

__all__ = ["JOBS_AHEAD", "RUN_BYTES", "STEP", "WHOLE_MAX", "WINDOW_BYTES", "bulk_stream"]

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
    future: Future[Pieces | None] | None
    buffer: bytearray | None = None
    chunks: list[Iterator[bytes] | None] = field(default_factory=list)
    """A big file's chunk iterator, once its first step opened it (``[None]``: not chunked)."""


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


def _whole_job(reads: BulkReads, digest: bytes, size: int, frame: bytes) -> Pieces | None:
    """A file read and hashed whole into a buffer of its own (yielded as it is, so never reused)."""
    data = reads.read_whole(digest, size, _EMPTY)
    return None if data is None else [frame, data]


def _first_step(reads: BulkReads, digest: bytes, size: int, frame: bytes, job: _Job) -> Pieces | None:
    """Open a big file's chunk iterator (kept in ``job``) and read its first step."""
    chunks = reads.read_chunks(digest, size)
    job.chunks.append(chunks)
    if chunks is None:
        return None
    return [frame, *_step(chunks)]


def _step(chunks: Iterator[bytes]) -> Pieces:
    """The next chunks of a big file, about :data:`STEP` bytes (all that is left at its end).

    The iterator is driven to its end before the last chunks are returned: its
    last step checks the chunk list against the blob's digest.
    """
    pieces: Pieces = []
    got = 0
    for chunk in chunks:
        pieces.append(chunk)
        got += len(chunk)
        if got >= STEP:
            break
    return pieces


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """The worker thread of every stream of the process (one: hashing views holds the GIL)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(1, thread_name_prefix="nixcas-nar")
        return _POOL


class _Reader:
    """The jobs of one stream, submitted in plan order within the window's bounds."""

    def __init__(self, plan: Plan, reads: BulkReads) -> None:
        self.plan = plan
        self.reads = reads
        self.window: deque[_Job] = deque()
        self.held = 0
        self.next_file = 0
        self.free: list[bytearray] = []
        self.pool = _pool()

    def _run_end(self, i: int) -> tuple[int, int]:
        """The end of the run starting at file ``i``, and its bytes of contents."""
        sizes, run_max = self.plan.sizes, self.reads.run_max
        stop, total, n = i, 0, len(sizes)
        while stop < n and stop - i < RUN_FILES and sizes[stop] <= run_max and total + sizes[stop] <= RUN_BYTES:
            total += sizes[stop]
            stop += 1
        return max(stop, i + 1), total

    def _buffer(self, need: int) -> bytearray:
        for k, buffer in enumerate(self.free):
            if len(buffer) >= need:
                return self.free.pop(k)
        return bytearray(need)

    def fill(self) -> None:
        """Submit jobs while fewer than :data:`JOBS_AHEAD` are out and the window has room."""
        plan, reads = self.plan, self.reads
        while self.next_file < len(plan.sizes) and len(self.window) < JOBS_AHEAD:
            i = self.next_file
            size = plan.sizes[i]
            stop, cost = (i + 1, min(size, STEP)) if size > reads.run_max else self._run_end(i)
            if self.window and self.held + cost > WINDOW_BYTES:
                return
            job = _Job(i, stop, cost, None)
            if size <= reads.run_max:
                job.buffer = self._buffer(cost + _SLACK)
                wanted = list(zip(plan.digests[i:stop], plan.sizes[i:stop], strict=True))
                job.future = self.pool.submit(_run_job, reads, wanted, plan.frames[i:stop], job.buffer)
            elif size <= min(WHOLE_MAX, reads.whole_max):
                job.cost = size
                job.future = self.pool.submit(_whole_job, reads, plan.digests[i], size, plan.frames[i])
            else:
                job.future = self.pool.submit(_first_step, reads, plan.digests[i], size, plan.frames[i], job)
            self.window.append(job)
            self.held += job.cost
            self.next_file = stop

    def done(self, job: _Job) -> None:
        """The head job is written: release its budget (and its buffer, which the worker no longer uses)."""
        self.window.popleft()
        self.held -= job.cost
        if job.buffer is not None:
            self.free.append(job.buffer)

    def abandon(self) -> None:
        """Cancel the jobs not started; running ones finish on their own (their buffers are dropped)."""
        for job in self.window:
            if job.future is not None:
                job.future.cancel()
        self.window.clear()


async def _job_pieces(reader: _Reader, job: _Job, blobs: BlobService) -> AsyncGenerator[bytes | memoryview, None]:
    """What one job contributes to the stream, in order."""
    plan = reader.plan
    pieces: Pieces | None = None
    if job.future is not None:
        pieces = await asyncio.wrap_future(job.future)
    if pieces is None:  # read file by file: the NAR up to a bad file, then its precise error
        for i in range(job.start, job.stop):
            yield plan.frames[i]
            async for data in file_contents(blobs, plan.hole(i)):
                yield data
        return
    chunks = job.chunks[0] if job.chunks else None
    if chunks is None:
        for part in pieces:
            yield part
        return
    hole = plan.hole(job.start)
    got = sum(map(len, pieces)) - len(plan.frames[job.start])
    while True:  # one step read ahead while this one is yielded
        if got > hole.size:
            raise hole.long()
        ahead = reader.pool.submit(_step, chunks) if got < hole.size else None
        for part in pieces:
            yield part
        if ahead is None:
            break
        pieces = await asyncio.wrap_future(ahead)
        if not pieces:
            raise hole.short(got)
        got += sum(map(len, pieces))


async def bulk_stream(plan: Plan, reads: BulkReads, blobs: BlobService) -> AsyncGenerator[bytes | memoryview, None]:
    """The NAR of ``plan``, each byte verified before it is yielded (see the module's description).

    Pieces are ``bytes`` or read-only views of buffers never reused.  Closing
    the generator early abandons the reads ahead.
    """
    reader = _Reader(plan, reads)
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

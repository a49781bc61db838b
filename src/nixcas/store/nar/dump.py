"""Writing a NAR straight to a file descriptor: the path of ``nixcas dump-path``.

For a blob service with :class:`~nixcas.castore.blob.base.BulkReads` (the
embedded store), the whole NAR is planned first and then read in large
batches on a worker thread:

* the directory closure (stored bytes, hash-checked) is turned into a *plan*
  without building node objects
  (:func:`~nixcas.store.nar.rawplan.plan_steps`): the framing before each
  file's contents, and each file's digest and size;
* consecutive small files form a *run*, read with one
  :meth:`~nixcas.castore.blob.base.BulkReads.read_run` (one indexed lookup,
  the pack bytes in offset order, each blob checked against its BLAKE3);
  a bigger file is one :meth:`~nixcas.castore.blob.base.BulkReads.read_whole`,
  hashed whole before a byte of it is returned;
* one worker thread reads and hashes ahead (already while the plan is being
  made) while :func:`write_planned` writes finished jobs in order with
  ``writev``, at most :data:`WINDOW_BYTES` of file contents ahead, into
  buffers reused from job to job.

:func:`write_planned` is synchronous and this module imports neither asyncio,
protobuf nor typing: the command line's fast path (:mod:`nixcas.cli.fast`)
writes a NAR with it on the embedded store without loading them.

Whatever a job cannot serve (a missing, damaged or differently sized blob, a
blob bigger than ``whole_max``, a batch that failed) is written file by file
through the async API by :func:`dump_nar`, as
:func:`~nixcas.store.nar.render.render_nar` does: the NAR up to that file is
written and the file's precise error is raised, so nothing unverified is ever
written.  Other blob services render through
:func:`~nixcas.store.nar.render.render_nar`.  The bytes are the same either way.

The writes block the writing thread (this is for a command writing to its
standard output, not for a server's event loop).
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
from _queue import SimpleQueue
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence

from nixcas.castore.nodes import DirectoryNode
from nixcas.store.nar.rawplan import RUN_FILES, plan_steps

TYPE_CHECKING = False  # not typing's: the command line's fast path imports this module, and needs nothing of it
if TYPE_CHECKING:
    from typing import Protocol

    from nixcas.castore.blob.base import BlobService
    from nixcas.castore.dirs.base import DirectoryService
    from nixcas.castore.nodes import Node
    from nixcas.store.nar.plan import Hole
    from nixcas.store.nar.rawplan import Plan

    class Reads(Protocol):
        """What the renderer needs of :class:`~nixcas.castore.blob.base.BulkReads` (the fast path has its own)."""

        @property
        def run_max(self) -> int: ...
        @property
        def whole_max(self) -> int: ...
        def read_run(self, wanted: Sequence[tuple[bytes, int]], buffer: memoryview) -> list[bytes | memoryview] | None:
            """See :meth:`~nixcas.castore.blob.base.BulkReads.read_run`."""

        def read_whole(self, digest: bytes, size: int, buffer: memoryview) -> bytes | memoryview | None:
            """See :meth:`~nixcas.castore.blob.base.BulkReads.read_whole`."""


__all__ = [
    "KEPT_BYTES",
    "PLANNING_BYTES",
    "RUN_BYTES",
    "WINDOW_BYTES",
    "WORKERS",
    "Output",
    "Unread",
    "dump_nar",
    "fetch_raw_closure",
    "write_all",
    "write_planned",
]

WORKERS = 1
"""Threads reading and hashing ahead of the writer.

One: the reads are views into reused buffers, and blake3 holds the GIL while it hashes anything
but ``bytes`` (it releases it only for immutable input), so a second worker only contends for
the GIL (measured: no faster, and less steady, on two cores).  The writer's ``writev`` runs
beside it.
"""
RUN_BYTES = 1 << 20
"""Most bytes of file contents in one run (read, then hashed while still in the CPU's cache); most files in one
run: :data:`~nixcas.store.nar.rawplan.RUN_FILES`."""
WINDOW_BYTES = 128 << 20
"""File contents read ahead of the writer, at most (a job bigger than this still runs, alone)."""
PLANNING_BYTES = 16 << 20
"""File contents read while the plan is being made (nothing is written until it is complete), at most."""
KEPT_BYTES = 16 << 20
"""Verified contents of small files kept for their later copies in the same NAR, at most (see :class:`_Repeats`)."""
_IOV_MAX = 1024
_SLACK = 256 << 10
"""Room beyond a job's contents (block headers of stored frames, gaps between blobs in a pack)."""


async def dump_nar(fd: int, node: Node, blobs: BlobService, directories: DirectoryService, skip: int = 0) -> int:
    """Write the NAR of ``node`` to ``fd``; return its size.  Errors as :func:`~nixcas.store.nar.render.render_nar`.

    ``skip``: the first bytes of the NAR are not written (an earlier attempt wrote them, see
    :mod:`nixcas.cli.fast`); the rest is written and checked as ever.
    """
    out = Output(fd, skip)
    reads = blobs.bulk_reads()
    if reads is None:
        from nixcas.store.nar.render import render_nar

        total = 0
        async for chunk in render_nar(node, blobs, directories):
            out.write([chunk])
            total += len(chunk)
        return total
    plan, steps = plan_steps(node, await fetch_raw_closure(node, directories))
    return await _dump_planned(out, plan, steps, reads, blobs)


async def fetch_raw_closure(node: Node, directories: DirectoryService) -> dict[bytes, bytes]:
    """The stored bytes of every Directory below ``node`` (each checked against its digest), by digest."""
    from nixcas.errors import ChecksumMismatch, StorageError
    from nixcas.store.nar.plan import ROOT, NarContentNotFound, fetch_closure

    if not isinstance(node, DirectoryNode):
        return {}
    closure: dict[bytes, bytes] = {}
    try:
        async for digest, raw in directories.get_recursive_raw(node.digest):
            closure[digest] = raw
    except ChecksumMismatch:
        raise
    except StorageError:
        await fetch_closure(node, directories)  # names the missing directory and where it hangs
        raise
    if node.digest not in closure:
        raise NarContentNotFound("directory", node.digest, ROOT)
    return closure


# -- writing ---------------------------------------------------------------------------


def write_all(fd: int, pieces: Sequence[bytes | memoryview]) -> None:
    """Write every piece to ``fd`` in order (``writev``, at most IOV_MAX at a time; short writes continued)."""
    for k in range(0, len(pieces), _IOV_MAX):
        batch = pieces[k : k + _IOV_MAX]
        try:
            done = os.writev(fd, batch)
        except BlockingIOError:  # a non-blocking descriptor: wait until it takes bytes
            done = 0
        want = sum(map(len, batch))
        if done < want:
            _write_rest(fd, batch, done)


def _write_rest(fd: int, batch: Sequence[bytes | memoryview], done: int) -> None:
    rest = memoryview(b"".join(batch))[done:]
    while rest:
        try:
            rest = rest[os.write(fd, rest) :]
        except BlockingIOError:
            import select  # (only for a non-blocking descriptor that is full)

            select.select([], [fd], [])


class Output:
    """Where a NAR goes: ``fd``, less its first ``skip`` bytes; :attr:`position` counts the NAR's bytes passed on."""

    __slots__ = ("fd", "position", "skip")

    def __init__(self, fd: int, skip: int = 0) -> None:
        self.fd = fd
        self.skip = skip
        self.position = 0

    def write(self, pieces: Sequence[bytes | memoryview]) -> None:
        """Write ``pieces`` (those of the first ``skip`` bytes left out); :attr:`position` moves past them."""
        size = sum(map(len, pieces))
        if self.skip:
            pieces = self._after_skip(pieces)
        write_all(self.fd, pieces)
        self.position += size

    def _after_skip(self, pieces: Sequence[bytes | memoryview]) -> list[bytes | memoryview]:
        kept: list[bytes | memoryview] = []
        for piece in pieces:
            if self.skip >= len(piece):
                self.skip -= len(piece)
                continue
            kept.append(memoryview(piece)[self.skip :] if self.skip else piece)
            self.skip = 0
        return kept


class _Buffers:
    """Read buffers reused from job to job, at most ``limit`` bytes of them kept.

    Fresh memory costs the kernel a page fault and a zeroed page on first touch (about as much
    as reading the bytes into it): buffers are reused, and bigger ones are mappings (huge pages
    for the biggest).
    """

    def __init__(self, limit: int) -> None:
        self._free: list[memoryview] = []
        self._limit = limit

    def take(self, need: int) -> memoryview:
        """The smallest free buffer of at least ``need`` bytes, or a new one."""
        fits = [b for b in self._free if len(b) >= need]
        if fits:
            best = min(fits, key=len)
            self._free.remove(best)
            return best
        if need < _MAPPED:
            return memoryview(bytearray(need))
        unit = _HUGE if need >= _HUGE else mmap.PAGESIZE
        size = -(-need // unit) * unit
        area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if unit == _HUGE and hasattr(mmap, "MADV_HUGEPAGE"):
            import contextlib  # (big files only)

            with contextlib.suppress(OSError):
                area.madvise(mmap.MADV_HUGEPAGE)
        return memoryview(area)

    def give(self, buffer: memoryview) -> None:
        """Keep ``buffer`` for reuse, dropping the smallest kept ones beyond the limit."""
        self._free.append(buffer)
        self._free.sort(key=len, reverse=True)
        while sum(map(len, self._free)) > self._limit:
            self._free.pop()


_MAPPED = 256 << 10
"""Buffers of at least this size are anonymous mappings: not cleared by this thread (the kernel clears each page
when the reader first writes to it, on the reader's thread, without the GIL), in pages, or in huge pages from:"""
_HUGE = 2 << 20

_Pieces = list[bytes | memoryview]
_Task = tuple[Callable[[], _Pieces | None], "SimpleQueue[_Pieces | BaseException | None]", threading.Event]


class _Worker:
    """The thread reading and hashing ahead of every dump of the process, jobs in the order given.

    One for the process (a backend may keep state per thread, such as a database connection);
    each dump has its own queue of results and stops its jobs not yet started when it ends.
    """

    def __init__(self) -> None:
        self._tasks: SimpleQueue[_Task] = SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, task: _Task) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="nixcas-dump", daemon=True)
                self._thread.start()
        self._tasks.put(task)

    def _run(self) -> None:
        while True:
            read, results, halt = self._tasks.get()
            if halt.is_set():  # the dump ended: its jobs not started are answered, not run
                results.put(None)
                continue
            try:
                results.put(read())
            except BaseException as e:
                results.put(e)


_WORKER = _Worker()

_RUN, _WHOLE, _STREAMED = 0, 1, 2
"""Kinds of job: a run of small files (``read_run``), one file read whole, one file too big for either."""


def _job_bounds(sizes: list[int], i: int, n: int, run_max: int, whole_max: int) -> tuple[int, int, int]:
    """The job starting at file ``i`` (of the first ``n``): (the file after it, bytes of contents read ahead, kind)."""
    size = sizes[i]
    if size > run_max:
        return (i + 1, size, _WHOLE) if size <= whole_max else (i + 1, 0, _STREAMED)
    end = min(n, i + RUN_FILES)
    window = sizes[i:end]
    total = sum(window)
    if total <= RUN_BYTES and max(window) <= run_max:  # (the usual run: the next RUN_FILES files, all small)
        return end, total, _RUN
    stop, total = i, 0
    while stop < n and stop - i < RUN_FILES and sizes[stop] <= run_max and total + sizes[stop] <= RUN_BYTES:
        total += sizes[stop]
        stop += 1
    return max(stop, i + 1), total, _RUN


def _read_job(reads: Reads, plan: Plan, kind: int, start: int, stop: int, buffer: memoryview) -> _Pieces | None:
    """A job's framing and contents in order (``None``: its files are to be read one by one)."""
    frames = plan.frames
    if kind == _WHOLE:
        data = reads.read_whole(plan.digests[start], plan.sizes[start], buffer)
        return None if data is None else [frames[start], data]
    wanted = list(zip(plan.digests[start:stop], plan.sizes[start:stop], strict=True))
    contents = reads.read_run(wanted, buffer)
    if contents is None:
        return None
    if len(contents) != stop - start:
        return None
    pieces: _Pieces = [b""] * (2 * len(contents))
    pieces[::2] = frames[start:stop]  # each file's framing, then its contents
    pieces[1::2] = contents
    return pieces


class Unread:
    """Files ``start`` to ``stop`` (exclusive) that bulk reads did not serve: nothing of them was written."""

    __slots__ = ("error", "start", "stop")

    def __init__(self, start: int, stop: int, error: BaseException | None) -> None:
        self.start = start
        self.stop = stop
        self.error = error


def write_planned(
    out: Output,
    plan: Plan,
    reads: Reads,
    start: int = 0,
    halt: threading.Event | None = None,
    planning: Iterator[None] | None = None,
) -> Unread | None:
    """Write the NAR of ``plan`` from ``frames[start]`` on, every file through ``reads`` (checked against its BLAKE3
    before a byte of it is written); ``None`` once the end is written, else the job that could not be served.

    Runs of small files are read on this thread when their turn comes, into one reused buffer (a
    second thread only took turns with this one for the GIL: measured slower); a blob the rest of
    the plan holds again is read once (:class:`_Repeats`).  Bigger files are read and hashed by one
    worker thread up to :data:`WINDOW_BYTES` of contents ahead, into buffers reused from job to job,
    while this thread writes finished jobs in order with ``writev``.  With ``planning`` (the steps of
    :func:`~nixcas.store.nar.rawplan.plan_steps` of ``plan``), the plan is completed here first, the
    worker reading the bigger files planned so far meanwhile (at most :data:`PLANNING_BYTES`):
    nothing is written before the whole plan is made, so a plan that fails writes nothing.
    ``halt`` set (by another thread) stops at the next job.  Synchronous, no event loop: the
    command line's fast path writes a whole NAR with it.
    """
    sizes = plan.sizes
    run_max, whole_max = reads.run_max, reads.whole_max
    window: deque[tuple[int, int, int, int, memoryview | None]] = deque()  # start, stop, cost, kind, buffer
    buffers = _Buffers(WINDOW_BYTES + 2 * RUN_BYTES)
    results: SimpleQueue[_Pieces | BaseException | None] = SimpleQueue()
    stopped = threading.Event()
    held = 0
    next_file = start
    pending = 0  # jobs submitted whose results were not taken

    def fill(jobs: int, most: int) -> None:
        nonlocal held, next_file, pending
        n = len(sizes)
        while next_file < n and pending < jobs:
            i = next_file
            stop, cost, kind = _job_bounds(sizes, i, n, run_max, whole_max)
            if window and held + cost > most:
                return
            buffer = None
            if kind == _WHOLE:
                buffer = buffers.take(cost + (cost >> 7) + _SLACK)
                _WORKER.submit((_job_reader(reads, plan, kind, i, stop, buffer), results, stopped))
                pending += 1
            window.append((i, stop, cost, kind, buffer))
            held += cost
            next_file = stop

    try:
        for _ in planning or ():
            fill(sys.maxsize, PLANNING_BYTES)
        repeats = _planned(plan, start, reads)  # (the plan is complete: nothing is written before)
        run_buffer = buffers.take(RUN_BYTES + _SLACK)  # (a mapping: its pages are made when first read into)
        while True:
            fill(2 * WORKERS, WINDOW_BYTES)
            if not window:
                break
            i, stop, cost, kind, buffer = window.popleft()
            got: _Pieces | BaseException | None = None
            if kind == _RUN:
                got = _read_here(reads, plan, i, stop, run_buffer, repeats)
            elif kind == _WHOLE:
                got = results.get()
                pending -= 1
            if halt is not None and halt.is_set():
                raise InterruptedError("the dump was stopped")
            if got is None or isinstance(got, BaseException):
                return Unread(i, stop, got)
            out.write(got)
            del got
            if buffer is not None:
                buffers.give(buffer)
            held -= cost
        out.write([plan.frames[-1]])
        return None
    finally:  # jobs not started are dropped, a running one finishes: ``reads`` and the buffers are free again
        stopped.set()
        for _ in range(pending):
            results.get()


def _planned(plan: Plan, start: int, reads: Reads) -> _Repeats | None:
    """Once the plan is complete: the blobs it holds more than once from file ``start`` on, and, to reads that take
    the hint (the fast path's), the distinct blobs it will ask for."""
    uses = Counter(plan.digests[start:])
    will_read = getattr(reads, "will_read", None)
    if will_read is not None:
        will_read(uses.keys())
    return _Repeats.of(uses)


def _read_here(
    reads: Reads, plan: Plan, start: int, stop: int, buffer: memoryview, repeats: _Repeats | None
) -> _Pieces | BaseException | None:
    """A run read on the writing thread: its pieces, or why not (as the worker hands a failure back)."""
    try:
        if repeats is None or repeats.left.keys().isdisjoint(plan.digests[start:stop]):
            return _read_job(reads, plan, _RUN, start, stop, buffer)
        return repeats.read_run(reads, plan, start, stop, buffer)
    except Exception as e:
        return e


class _Repeats:
    """Small files whose contents come again later in the NAR: each read and checked against its BLAKE3 once.

    A tree may hold many copies of a few files (``/usr/include`` here: 2,045 copies, 46 MB of its
    115 MB, of 3.3 MB of distinct contents).  The first time such a file's contents are read (and
    checked), an immutable copy is kept, at most :data:`KEPT_BYTES` in all, and written for its
    later copies without reading or hashing them again; it is dropped after its last use.  Each
    later copy must have the size the plan gives it, as a read would check.
    """

    __slots__ = ("kept", "left", "room")

    def __init__(self, left: dict[bytes, int]) -> None:
        self.left = left
        """Uses still to come, by digest (only of digests the rest of the plan has more than once)."""
        self.kept: dict[bytes, bytes] = {}
        self.room = KEPT_BYTES

    @classmethod
    def of(cls, uses: Counter[bytes]) -> _Repeats | None:
        """The repeats among files used so many times (by digest), or ``None`` if there are none."""
        left = {digest: n for digest, n in uses.items() if n > 1}
        return cls(left) if left else None

    def read_run(self, reads: Reads, plan: Plan, start: int, stop: int, buffer: memoryview) -> _Pieces | None:
        """A run's pieces, as :func:`_read_job` gives them, the contents of kept files not read again."""
        digests, sizes = plan.digests[start:stop], plan.sizes[start:stop]
        kept, left = self.kept, self.left
        fresh: dict[bytes, int] = {}  # each blob not kept, once
        for digest, size in zip(digests, sizes, strict=True):
            if digest not in kept:
                fresh.setdefault(digest, size)
        got = reads.read_run(list(fresh.items()), buffer) if fresh else []
        if got is None or len(got) != len(fresh):
            return None
        read = dict(zip(fresh, got, strict=True))
        pieces: _Pieces = []
        for frame, digest, size in zip(plan.frames[start:stop], digests, sizes, strict=True):
            data = kept.get(digest) or read[digest]
            if len(data) != size:
                return None  # (another size for the same digest: a read refuses it too)
            uses = left.get(digest)
            if uses == 1:
                del left[digest]
                if kept.pop(digest, None) is not None:
                    self.room += size
            elif uses is not None:
                left[digest] = uses - 1
                if digest not in kept and size <= self.room:
                    data = kept[digest] = bytes(data)
                    self.room -= size
            pieces += (frame, data)
        return pieces


def _job_reader(
    reads: Reads, plan: Plan, kind: int, start: int, stop: int, buffer: memoryview
) -> Callable[[], _Pieces | None]:
    def read() -> _Pieces | None:
        return _read_job(reads, plan, kind, start, stop, buffer)

    return read


async def _dump_planned(
    out: Output, plan: Plan, planning: Iterator[None] | None, reads: Reads, blobs: BlobService
) -> int:
    """:func:`write_planned` on a thread; files it cannot serve through the async API, one by one, then on."""
    import asyncio
    import logging

    start = 0
    while True:
        halt = threading.Event()
        try:
            unread = await asyncio.to_thread(write_planned, out, plan, reads, start, halt, planning)
            planning = None
        except asyncio.CancelledError:
            halt.set()
            raise
        if unread is None:
            return plan.nar_size
        if unread.error is not None:  # the files are read one by one below, which reports the error
            logging.getLogger(__name__).warning(
                "reading files %d to %d of the NAR in one job failed (%s)", unread.start, unread.stop, unread.error
            )
        for i in range(unread.start, unread.stop):
            out.write([plan.frames[i]])
            await _copy_blob(out, blobs, plan.hole(i))
        start = unread.stop


async def _copy_blob(out: Output, blobs: BlobService, hole: Hole) -> None:
    """One file's contents through the async API (verified as :func:`~nixcas.store.nar.render.render_nar` does)."""
    from nixcas.store.nar.render import file_contents

    async for piece in file_contents(blobs, hole):
        out.write([piece])

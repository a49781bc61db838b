"""Writing a NAR straight to a file descriptor: the path of ``nixcas dump-path``.

For a blob service with :class:`~nixcas.castore.blob.base.BulkReads` (the
embedded store), the whole NAR is planned first and then read in large
batches on worker threads:

* the directory closure is fetched once as stored bytes (hash-checked) and
  turned into a *plan* without building node objects: the framing before
  each file's contents, and each file's digest and size;
* consecutive small files form a *run*, read with one
  :meth:`~nixcas.castore.blob.base.BulkReads.read_run` (one indexed lookup,
  the pack bytes in offset order, each blob checked against its BLAKE3);
  a bigger file is one :meth:`~nixcas.castore.blob.base.BulkReads.read_whole`,
  hashed whole before a byte of it is returned;
* a worker thread reads and hashes ahead while this coroutine writes
  finished jobs in order with
  ``writev``, at most :data:`WINDOW_BYTES` of file contents ahead, into
  buffers reused from job to job.

Whatever a job cannot serve (a missing, damaged or differently sized blob, a
blob bigger than ``whole_max``, a batch that failed) is written file by file
through the async API, as :func:`~nixcas.store.nar.render.render_nar` does:
the NAR up to that file is written and the file's precise error is raised, so
nothing unverified is ever written.  Other blob services render through
:func:`~nixcas.store.nar.render.render_nar`.  The bytes are the same either way.

The writes block the calling thread (this is for a command writing to its
standard output, not for a server's event loop).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import mmap
import operator
import os
import select
import struct
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from nixcas.castore.blob.base import BlobService, BulkReads
from nixcas.castore.digest import DIGEST_LEN, EMPTY_DIGEST, B3Digest
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.nodes import (
    MAX_DEPTH,
    MAX_NAME_LEN,
    DirectoryNode,
    FileNode,
    Node,
    validate_name,
    validate_symlink_target,
)
from nixcas.castore.treepath import TreePath
from nixcas.errors import ChecksumMismatch, DirectoryError, InvalidSymlinkTargetError, StorageError
from nixcas.store.nar.plan import ROOT, Hole, NarContentNotFound, _check_file, fetch_closure, too_deep
from nixcas.store.nar.render import BLOCK, SMALL_FILE, _fetch_whole, _open, _read_exact_end, render_nar
from nixcas.store.nar.wire import (
    ENTRY_PREFIX,
    NAR_MAGIC,
    NODE_DIRECTORY,
    NODE_EXECUTABLE,
    NODE_REGULAR,
    NODE_SYMLINK,
    TOK_CLOSE,
    TOK_NODE,
    encode_str,
    padding,
    u64_le,
)

__all__ = ["RUN_BYTES", "RUN_FILES", "WINDOW_BYTES", "WORKERS", "Plan", "dump_nar", "plan_nar"]

log = logging.getLogger(__name__)

WORKERS = 1
"""Threads reading and hashing ahead of the writer.

One: the reads are views into reused buffers, and blake3 holds the GIL while it hashes anything
but ``bytes`` (it releases it only for immutable input), so a second worker only contends for
the GIL (measured: no faster, and less steady, on two cores).  The writer's ``writev`` runs
beside it.
"""
RUN_FILES = 1024
"""Most files in one run (one ``read_run``; its pieces are two ``writev`` calls of at most IOV_MAX)."""
RUN_BYTES = 1 << 20
"""Most bytes of file contents in one run (read, then hashed while still in the CPU's cache)."""
WINDOW_BYTES = 128 << 20
"""File contents read ahead of the writer, at most (a job bigger than this still runs, alone)."""
_IOV_MAX = 1024
_SLACK = 256 << 10
"""Room beyond a job's contents (block headers of stored frames, gaps between blobs in a pack)."""
_CLOSE_ENTRY = TOK_CLOSE + TOK_CLOSE
_FILE_REGULAR = TOK_NODE + NODE_REGULAR
_FILE_EXECUTABLE = TOK_NODE + NODE_EXECUTABLE
_PAD_CLOSE = [bytes(-n & 7) + _CLOSE_ENTRY for n in range(8)]
"""The padding after contents of a size ``n`` (mod 8), and the end of the file and of its entry."""
_U64 = struct.Struct("<Q")
_ZEROS = bytes(8)
_NAME = operator.itemgetter(0)


class Plan:
    """A NAR as framing and holes: ``frames[i]`` comes before file ``i`` (``digests[i]``, ``sizes[i]``,
    at ``paths[i]``: parent and name), and ``frames[-1]`` after the last file."""

    __slots__ = ("digests", "frames", "paths", "sizes")

    def __init__(
        self,
        frames: list[bytes],
        digests: list[bytes],
        sizes: list[int],
        paths: list[tuple[TreePath, bytes] | None],
    ) -> None:
        self.frames = frames
        self.digests = digests
        self.sizes = sizes
        self.paths = paths

    def hole(self, i: int) -> Hole:
        where = self.paths[i]
        path = ROOT if where is None else TreePath(*where)
        return Hole(B3Digest(self.digests[i]), self.sizes[i], path)

    @property
    def nar_size(self) -> int:
        return sum(map(len, self.frames)) + sum(self.sizes)


async def dump_nar(fd: int, node: Node, blobs: BlobService, directories: DirectoryService) -> int:
    """Write the NAR of ``node`` to ``fd``; return its size.  Errors as :func:`~nixcas.store.nar.render.render_nar`."""
    reads = blobs.bulk_reads()
    if reads is None:
        total = 0
        async for chunk in render_nar(node, blobs, directories):
            write_all(fd, [chunk])
            total += len(chunk)
        return total
    plan = plan_nar(node, await fetch_raw_closure(node, directories))
    return await _dump_planned(fd, plan, reads, blobs)


async def fetch_raw_closure(node: Node, directories: DirectoryService) -> dict[bytes, bytes]:
    """The stored bytes of every Directory below ``node`` (each checked against its digest), by digest."""
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


def _entries(raw: bytes, path: TreePath) -> list[tuple[bytes, int, Any]]:
    """A stored Directory's entries in name order: (name, kind (0 directory, 1 file, 2 symlink), message).

    Checked as :meth:`~nixcas.castore.directory.Directory.decode` does: each list sorted, names
    unique across the lists and valid (all names of the directory at once; one by one only to
    name the bad one).
    """
    from google.protobuf.message import DecodeError

    from nixcas.castore.proto import pb

    try:
        msg = pb.Directory.FromString(raw)
    except DecodeError as e:
        raise DirectoryError(f"directory {path.show_below_root()}: cannot decode Directory message: {e}") from None
    entries: list[tuple[bytes, int, Any]] = []
    names: list[bytes] = []
    lists: tuple[Any, Any, Any] = (msg.directories, msg.files, msg.symlinks)
    for kind, items in enumerate(lists):
        if not items:
            continue
        part = [(e.name, kind, e) for e in items]
        listed = [entry[0] for entry in part]
        if listed != sorted(set(listed)):
            _name_order(listed, path)
        entries += part
        names += listed
    if not names:
        return entries
    joined = b"/".join(names)
    if (
        joined.count(b"/") != len(names) - 1
        or b"\0" in joined
        or max(map(len, names)) > MAX_NAME_LEN
        or b"" in names
        or b"." in names
        or b".." in names
    ):
        for name in names:
            validate_name(name)
    if len(names) > len(listed):  # more than one list: merge them (names must stay unique)
        entries.sort(key=_NAME)
        if len(set(names)) != len(names):
            _name_order([entry[0] for entry in entries], path)
    return entries


def _name_order(names: list[bytes], path: TreePath) -> None:
    """Raise for the first name that is not sorted after the one before (or repeats it)."""
    for previous, name in itertools.pairwise(names):
        if name == previous:
            raise DirectoryError(f"directory {path.show_below_root()}: duplicate name {name[:300]!r}")
        if name < previous:
            raise DirectoryError(
                f"directory {path.show_below_root()}: {name[:300]!r} is not sorted after {previous[:300]!r}"
            )


def plan_nar(root: Node, closure: dict[bytes, bytes]) -> Plan:
    """The NAR of ``root`` as a :class:`Plan`; directories from ``closure`` (stored bytes by digest).

    The same checks as :func:`~nixcas.store.nar.plan.iter_plan` with Directory decoding: names
    valid, sorted and unique, digests of 32 bytes, sizes that agree with the empty blob, symlink
    targets valid, depth at most :data:`~nixcas.castore.nodes.MAX_DEPTH`, every directory present.
    """
    frames: list[bytes] = []
    digests: list[bytes] = []
    sizes: list[int] = []
    paths: list[tuple[TreePath, bytes] | None] = []
    buf = bytearray(NAR_MAGIC)
    if isinstance(root, FileNode):
        buf += NODE_EXECUTABLE if root.executable else NODE_REGULAR
        buf += u64_le(root.size)
        if _check_file(root, ROOT) is not None:
            frames.append(bytes(buf))
            buf.clear()
            digests.append(bytes(root.digest))
            sizes.append(root.size)
            paths.append(None)
            buf += padding(root.size)
        buf += TOK_CLOSE
        frames.append(bytes(buf))
        return Plan(frames, digests, sizes, paths)
    if not isinstance(root, DirectoryNode):
        buf += NODE_SYMLINK
        buf += encode_str(root.target)
        buf += TOK_CLOSE
        frames.append(bytes(buf))
        return Plan(frames, digests, sizes, paths)
    buf += NODE_DIRECTORY
    top = closure.get(root.digest)
    if top is None:
        raise NarContentNotFound("directory", root.digest, ROOT)
    # Each frame: a directory's entries, the next one's index, its path.
    stack: list[tuple[list[tuple[bytes, int, Any]], int, TreePath]] = [(_entries(top, ROOT), 0, ROOT)]
    append_frame, append_digest, append_size, append_path = frames.append, digests.append, sizes.append, paths.append
    pack, join, zeros, empty = _U64.pack, b"".join, _ZEROS, EMPTY_DIGEST
    while stack:
        entries, i, path = stack.pop()
        if not i and entries and path.depth >= MAX_DEPTH:
            raise too_deep(path)
        descend = None
        n = len(entries)
        while i < n:
            name, kind, msg = entries[i]
            i += 1
            if kind == 1:
                digest: bytes = msg.digest
                size: int = msg.size
                length = len(name)
                buf += join(
                    (
                        ENTRY_PREFIX,
                        pack(length),
                        name,
                        zeros[: -length & 7],
                        _FILE_EXECUTABLE if msg.executable else _FILE_REGULAR,
                        pack(size),
                    )
                )
                if size and digest != empty and len(digest) == DIGEST_LEN:
                    append_frame(bytes(buf))
                    buf.clear()
                    append_digest(digest)
                    append_size(size)
                    append_path((path, name))
                    buf += _PAD_CLOSE[size & 7]
                    continue
                if len(digest) != DIGEST_LEN:
                    raise DirectoryError(f"invalid node {name[:300]!r}: invalid digest length {len(digest)}")
                _check_file(FileNode(B3Digest(digest), size), TreePath(path, name))
                buf += _CLOSE_ENTRY
                continue
            buf += ENTRY_PREFIX
            buf += encode_str(name)
            buf += TOK_NODE
            if kind == 2:
                target: bytes = msg.target
                try:
                    validate_symlink_target(target)
                except InvalidSymlinkTargetError as e:
                    raise DirectoryError(f"invalid node {name[:300]!r}: {e}") from None
                buf += NODE_SYMLINK
                buf += encode_str(target)
                buf += _CLOSE_ENTRY
                continue
            digest = msg.digest
            child = TreePath(path, name)
            raw = closure.get(digest)
            if raw is None:
                if len(digest) != DIGEST_LEN:
                    raise DirectoryError(f"invalid node {name[:300]!r}: invalid digest length {len(digest)}")
                raise NarContentNotFound("directory", B3Digest(digest), child)
            buf += NODE_DIRECTORY
            descend = (_entries(raw, child), 0, child)
            break
        if descend is not None:
            stack.append((entries, i, path))
            stack.append(descend)
            continue
        buf += TOK_CLOSE if path.parent is None else _CLOSE_ENTRY
    frames.append(bytes(buf))
    return Plan(frames, digests, sizes, paths)


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
            select.select([], [fd], [])


class _Buffers:
    """Read buffers reused from job to job, at most ``limit`` bytes of them kept.

    Fresh memory costs the kernel a page fault and a zeroed page on first touch (about as much
    as reading the bytes into it): buffers are reused, and big ones are huge-page mappings.
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
        if need < _HUGE:
            return memoryview(bytearray(need))
        size = -(-need // _HUGE) * _HUGE
        area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            with contextlib.suppress(OSError):
                area.madvise(mmap.MADV_HUGEPAGE)
        return memoryview(area)

    def give(self, buffer: memoryview) -> None:
        """Keep ``buffer`` for reuse, dropping the smallest kept ones beyond the limit."""
        self._free.append(buffer)
        self._free.sort(key=len, reverse=True)
        while sum(map(len, self._free)) > self._limit:
            self._free.pop()


_HUGE = 2 << 20
"""Buffers of at least this size are anonymous mappings in units of a huge page."""


class _Job:
    """Files ``start`` to ``stop`` of the plan, read on a worker (``future``) unless ``future`` is ``None``."""

    __slots__ = ("buffer", "cost", "future", "start", "stop")

    def __init__(
        self,
        start: int,
        stop: int,
        cost: int,
        buffer: memoryview | None,
        future: Future[list[bytes | memoryview] | None] | None,
    ) -> None:
        self.start = start
        self.stop = stop
        self.cost = cost
        self.buffer = buffer
        self.future = future


def _run_job(
    reads: BulkReads, wanted: list[tuple[bytes, int]], frames: list[bytes], buffer: memoryview
) -> list[bytes | memoryview] | None:
    """A run's framing and contents in order (``None``: some file is read one by one instead)."""
    data = reads.read_run(wanted, buffer)
    if data is None:
        return None
    pieces: list[bytes | memoryview] = []
    for frame, contents in zip(frames, data, strict=True):
        pieces.append(frame)
        pieces.append(contents)
    return pieces


def _whole_job(
    reads: BulkReads, digest: bytes, size: int, frame: bytes, buffer: memoryview
) -> list[bytes | memoryview] | None:
    data = reads.read_whole(digest, size, buffer)
    return None if data is None else [frame, data]


async def _dump_planned(fd: int, plan: Plan, reads: BulkReads, blobs: BlobService) -> int:
    frames, digests, sizes = plan.frames, plan.digests, plan.sizes
    n = len(sizes)
    run_max, whole_max = reads.run_max, reads.whole_max
    window: deque[_Job] = deque()
    buffers = _Buffers(WINDOW_BYTES + 2 * RUN_BYTES)
    held = 0
    next_file = 0
    pool = _pool()

    def fill() -> None:
        nonlocal held, next_file
        while next_file < n and len(window) < 2 * WORKERS:
            i = next_file
            size = sizes[i]
            if size <= run_max:
                stop, total = i, 0
                while stop < n and stop - i < RUN_FILES and sizes[stop] <= run_max and total + sizes[stop] <= RUN_BYTES:
                    total += sizes[stop]
                    stop += 1
                stop = max(stop, i + 1)
            else:
                stop, total = i + 1, size
            if window and held + total > WINDOW_BYTES:
                return
            buffer: memoryview | None = None
            future: Future[list[bytes | memoryview] | None] | None = None
            if size <= run_max:
                buffer = buffers.take(total + _SLACK)
                wanted = list(zip(digests[i:stop], sizes[i:stop], strict=True))
                future = pool.submit(_run_job, reads, wanted, frames[i:stop], buffer)
            elif size <= whole_max:
                buffer = buffers.take(size + (size >> 7) + _SLACK)
                future = pool.submit(_whole_job, reads, digests[i], size, frames[i], buffer)
            else:
                total = 0  # streamed through the async API
            window.append(_Job(i, stop, total, buffer, future))
            held += total
            next_file = stop

    try:
        fill()
        while window:
            job = window[0]
            pieces: list[bytes | memoryview] | None = None
            if job.future is not None:
                try:
                    pieces = await asyncio.wrap_future(job.future)
                except Exception as e:  # the files are read one by one below, which reports the error
                    log.warning("reading files %d to %d of the NAR in one job failed (%s)", job.start, job.stop, e)
            if pieces is not None:
                write_all(fd, pieces)
                del pieces
            else:
                for i in range(job.start, job.stop):
                    write_all(fd, [frames[i]])
                    await _copy_blob(fd, blobs, plan.hole(i))
            window.popleft()
            if job.buffer is not None:
                buffers.give(job.buffer)
            held -= job.cost
            fill()
        write_all(fd, [frames[-1]])
    finally:  # jobs not started are dropped; running ones finish before their buffers go
        running = [job.future for job in window if job.future is not None and not job.future.cancel()]
        if running:
            concurrent.futures.wait(running)
    return plan.nar_size


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """The worker threads, shared by every dump of the process (a backend may keep state per thread)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(WORKERS, thread_name_prefix="nixcas-dump")
        return _POOL


async def _copy_blob(fd: int, blobs: BlobService, hole: Hole) -> None:
    """One file's contents through the async API (verified as :func:`~nixcas.store.nar.render.render_nar` does)."""
    if hole.size <= SMALL_FILE:  # read whole and to its end (so verified) before a byte is written
        write_all(fd, await _fetch_whole(blobs, hole))
        return
    reader = await _open(blobs, hole)
    async with reader:
        got = 0
        while got < hole.size:
            data = await reader.read(min(BLOCK, hole.size - got))
            if not data:
                raise hole.short(got)
            got += len(data)
            if got > hole.size:
                raise hole.long()
            write_all(fd, [data])
        await _read_exact_end(reader, hole)

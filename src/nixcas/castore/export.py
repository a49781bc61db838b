"""Materializing a castore node on the local filesystem: the inverse of ingest.

:func:`export_node` writes a directory tree, a file or a symlink to a new
path ``dest``, as ``nix-store --restore`` writes a NAR:

* **what is written** -- directories, regular files (mode ``0666``, or
  ``0777`` when executable, less the umask), symlinks created as symlinks
  (their targets are never followed); timestamps are left as the kernel sets
  them (the time of writing), as ``nix-store --restore`` leaves them;
* **where** -- ``dest`` must not exist; a directory root may also replace an
  existing *empty* directory.  Everything is written below a staging
  directory created (mode ``0700``, so no other user can reach inside) next
  to ``dest``, ``.nixcas-export-<random>-<name>``, and published in one step
  at the end: renamed to ``dest`` (a directory root), or hard-linked there (a
  file or symlink root: ``link`` fails if ``dest`` appeared meanwhile, where
  a rename would replace it).  Every entry is created relative to an open
  descriptor of its parent directory (``mkdir``/``open``/``symlink``/``link``
  with ``dir_fd``, directories opened with ``O_NOFOLLOW``, files with
  ``O_CREAT | O_EXCL``), and each name is checked again before use, so
  neither a name nor a symlink inside the tree can direct a write elsewhere;
* **verification** -- small files are read with
  :meth:`~nixcas.castore.blob.base.BlobService.read_many`, which hashes each
  blob before returning it; larger ones stream through the blob service's
  verifying reader (chunked backends check each chunk before handing it out,
  and the whole blob's BLAKE3 is checked at its end).  The staging directory
  is published only after every file has passed, so no unverified byte ever
  appears at ``dest``;
* **failure** -- on any error (or cancellation) the staging directory is
  removed and the error raised; nothing is left at ``dest``.  A process
  killed outright leaves its staging directory (the name says what it is);
* **links** -- with ``link=True``, the first file of each blob (and
  executable bit) is written and every further one is a hard link to it
  (a copy of it once the file system's link limit is reached);
* **reads in parallel, memory bounded** -- like the NAR renderer, a window
  of at most ``prefetch`` fetches (batches of small files read with one
  ``read_many``, or the head of a large file) runs ahead of the writers, and
  about ``buffer_bytes`` are held at most; large files stream in blocks or
  chunks.  From a blob service with
  :class:`~nixcas.castore.blob.base.BulkReads` (``packed://``,
  ``objectstore+file://``) a batch is read on a worker thread (its smallest
  blobs as one read run, the others whole), and a large file is copied in a
  worker thread (:data:`STREAMS` at once), whole up to an eighth of
  ``buffer_bytes``, chunk by chunk above; all verified.  Files are created by
  :data:`WRITERS` threads that take the batches in turn, each waiting for
  its reads itself, so reading (hashing) and writing overlap without a round
  trip through the event loop between two batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import secrets
import shutil
import stat
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import Any, TypeAlias, TypeVar

from nixcas._aio import to_thread_uninterrupted, uninterrupted
from nixcas.castore.blob.base import BlobReader, BlobService, BulkReads
from nixcas.castore.digest import DIGEST_LEN, EMPTY_DIGEST, B3Digest
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.nodes import (
    MAX_DEPTH,
    DirectoryNode,
    FileNode,
    Node,
    SymlinkNode,
    validate_name,
    validate_symlink_target,
)
from nixcas.castore.treepath import show_names
from nixcas.errors import DepthError, DirectoryError, NixcasError, NotFoundError, StorageError

__all__ = [
    "BATCH_BYTES",
    "BATCH_FILES",
    "BLOCK",
    "BUFFER_BYTES",
    "PREFETCH",
    "SMALL_FILE",
    "ExportError",
    "ExportStats",
    "export_node",
    "fetch_closure",
]

T = TypeVar("T")

PREFETCH = 16
"""Default number of fetches (batches of small files, or large files) in flight."""
BUFFER_BYTES = 64 << 20
"""Default byte budget of the fetches held ahead of the writer."""
BLOCK = 1 << 20
"""Large files are read and written in blocks of this size."""
SMALL_FILE = 1 << 20
"""Files up to this size are read whole, in batches (one ``read_many`` each)."""
BATCH_FILES = 128
"""Most files read in one batch."""
BATCH_BYTES = 8 << 20
"""Most content bytes in one batch."""
BATCH_OPS = 2048
"""Most entries of any kind (directories, symlinks, links, files) written in one worker-thread call."""
WRITERS = 2
"""Threads creating files (of consecutive batches) at once."""
STREAMS = 2
"""Large files written at once (each streams in its own worker thread with BulkReads)."""
BATCHES = 6
"""Batches in the window at once: the ones being written and the ones read ahead of them.

Under load every hand-off between the threads (read, event loop, writer) waits for a CPU;
batches read well ahead keep the writers from waiting on that latency.
"""
DIR_FDS = 64
"""Directory descriptors kept open (least recently used closed first)."""

ROOT = "root"
"""The root's name inside the staging directory."""

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

Closure: TypeAlias = dict[bytes, Any]
"""Directory messages (``castore.proto.pb.Directory``) by digest, as :func:`fetch_closure` returns them."""

_MKDIR, _SYMLINK, _FILE, _LINK = range(4)
Op: TypeAlias = tuple[int, int, bytes, object]
"""One entry to create: ``(kind, parent directory id, name, argument)``.

The argument is the new directory's id (``_MKDIR``), the target (``_SYMLINK``)
or the :class:`FileNode` (``_FILE``: write it; ``_LINK``: link to the first
file of the same blob and executable bit).
"""


class ExportError(NixcasError):
    """The destination cannot be written (it exists, say), or a partial export could not be removed."""


@dataclass
class ExportStats:
    """What an export wrote."""

    directories: int = 0
    files: int = 0
    symlinks: int = 0
    links: int = 0
    """Files written as hard links to an earlier file of the same blob (``link=True``)."""
    bytes: int = 0
    """Content bytes of the files written (links not counted)."""


class _BadBlob(Exception):
    """A batch's blob is missing or has another size than its file declares (the caller explains which)."""

    def __init__(self, op: Op) -> None:
        super().__init__()
        self.op = op


# -- the plan: every entry in depth-first pre-order ---------------------------------------


class _Plan:
    """The entries of a tree in creation order, with the directory table the writer resolves parents in.

    Directory 0 is the staging directory; the root is its entry :data:`ROOT`.
    """

    def __init__(self, root: Node, closure: Closure, link: bool) -> None:
        self.root = root
        self.closure = closure
        self.link = link
        self.parents: list[int] = [-1]
        self.names: list[bytes] = [b""]
        self.stats = ExportStats()

    def show(self, parent: int, name: bytes) -> str:
        """The path of entry ``name`` of directory ``parent`` inside the export (``/`` for the root)."""
        names = [name]
        while parent > 0:
            names.append(self.names[parent])
            parent = self.parents[parent]
        names.reverse()
        return show_names(names[1:], "/")

    def _file(self, parent: int, name: bytes, node: FileNode, seen: set[tuple[B3Digest, bool]]) -> Op:
        if (node.size == 0) != (node.digest == EMPTY_DIGEST):
            raise StorageError(
                f"file {self.show(parent, name)}: size {node.size} contradicts digest {node.digest.hex()}"
            )
        if self.link:
            key = (node.digest, node.executable)
            if key in seen:
                self.stats.links += 1
                return (_LINK, parent, name, node)
            seen.add(key)
        self.stats.files += 1
        self.stats.bytes += node.size
        return (_FILE, parent, name, node)

    def _mkdir(self, parent: int, name: bytes) -> Op:
        new = len(self.parents)
        self.parents.append(parent)
        self.names.append(name)
        self.stats.directories += 1
        return (_MKDIR, parent, name, new)

    def ops(self) -> Iterator[Op]:
        seen: set[tuple[B3Digest, bool]] = set()
        root = ROOT.encode()
        node = self.root
        if isinstance(node, FileNode):
            yield self._file(0, root, node, seen)
            return
        if isinstance(node, SymlinkNode):
            self.stats.symlinks += 1
            yield (_SYMLINK, 0, root, node.target)
            return
        first = self._mkdir(0, root)
        yield first
        stack: list[tuple[int, int, Iterator[tuple[int, Any]]]] = [
            (1, 0, _entries(self._directory(node.digest, 0, root)))
        ]
        while stack:
            parent, depth, entries = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                continue
            kind, msg = entry
            name: bytes = msg.name
            validate_name(name)  # checked when the Directory was stored; again, as it becomes a path
            if kind == _FILE:
                if len(msg.digest) != DIGEST_LEN:
                    raise DirectoryError(f"file {self.show(parent, name)}: invalid digest length {len(msg.digest)}")
                yield self._file(parent, name, FileNode(B3Digest(msg.digest), msg.size, msg.executable), seen)
            elif kind == _SYMLINK:
                self.stats.symlinks += 1
                yield (_SYMLINK, parent, name, validate_symlink_target(msg.target))
            else:
                directory = self._directory(msg.digest, parent, name)
                if depth + 1 >= MAX_DEPTH and (directory.directories or directory.files or directory.symlinks):
                    raise DepthError(
                        f"directory {self.show(parent, name)} is nested {depth + 1} levels deep: its entries "
                        f"would exceed the {MAX_DEPTH} levels a tree may have"
                    )
                op = self._mkdir(parent, name)
                yield op
                stack.append((len(self.parents) - 1, depth + 1, _entries(directory)))

    def _directory(self, digest: bytes, parent: int, name: bytes) -> Any:
        directory = self.closure.get(digest)
        if directory is None:
            raise NotFoundError(f"directory {digest.hex()} not found (needed at {self.show(parent, name)})")
        return directory


def _entries(directory: Any) -> Iterator[tuple[int, Any]]:
    """A Directory message's entries (their order does not matter to an export: each has its own name)."""
    for msg in directory.directories:
        yield _MKDIR, msg
    for msg in directory.files:
        yield _FILE, msg
    for msg in directory.symlinks:
        yield _SYMLINK, msg


async def fetch_closure(node: Node, directories: DirectoryService) -> Closure:
    """Every Directory message below ``node`` by digest: each checked against its digest (by the service),
    announced by its parent, none missing.

    The messages are kept as they were parsed (upb), not turned into
    :class:`~nixcas.castore.directory.Directory` objects: for a tree of many
    small files that decoding cost more than the rest of the export's own work.
    """
    if not isinstance(node, DirectoryNode):
        return {}
    from google.protobuf.message import DecodeError

    from nixcas.castore.proto import pb

    closure: Closure = {}
    expected: set[bytes] = {node.digest}
    async for digest, raw in directories.get_recursive_raw(node.digest):
        if digest not in expected:
            raise StorageError(f"received unexpected directory {digest.hex()}")
        try:
            directory = pb.Directory.FromString(raw)
        except DecodeError as e:
            raise StorageError(f"directory {digest.hex()} is stored in an invalid form: {e}") from None
        closure[digest] = directory
        expected.update(child.digest for child in directory.directories)
    if node.digest not in closure:
        raise NotFoundError(f"directory {node.digest.hex()} not found")
    missing = expected - closure.keys()
    if missing:
        raise StorageError(f"directory closure of {node.digest.hex()} incomplete: {len(missing)} directories missing")
    return closure


# -- the writer: file-system calls, in a worker thread, one call at a time ------------------


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _Writer:
    """Creates entries below the staging directory; every call resolves a parent by descriptor.

    Descriptors of recently used directories are cached (at most
    :data:`DIR_FDS`); one not cached is opened from its nearest cached
    ancestor, a component at a time with ``O_NOFOLLOW``.
    """

    def __init__(self, plan: _Plan, staging_fd: int) -> None:
        self.plan = plan
        self.staging_fd = staging_fd
        self.fds: OrderedDict[int, int] = OrderedDict()
        self.firsts: dict[tuple[B3Digest, bool], tuple[int, bytes]] = {}

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.popitem()[1])

    def _keep(self, d: int, fd: int, pinned: int) -> None:
        self.fds[d] = fd
        while len(self.fds) > DIR_FDS:
            old, old_fd = next(iter(self.fds.items()))
            if old == pinned:
                self.fds.move_to_end(old)
                continue
            del self.fds[old]
            os.close(old_fd)

    def dir_fd(self, d: int, pinned: int = -1) -> int:
        if d == 0:
            return self.staging_fd
        fd = self.fds.get(d)
        if fd is not None:
            self.fds.move_to_end(d)
            return fd
        chain: list[int] = []
        while d != 0 and d not in self.fds:
            chain.append(d)
            d = self.plan.parents[d]
        fd = self.dir_fd(d)
        for child in reversed(chain):
            fd = os.open(self.plan.names[child], _DIR_FLAGS, dir_fd=fd)
            self._keep(child, fd, pinned)
        return fd

    def mkdir(self, parent: int, name: bytes, new: int) -> None:
        pfd = self.dir_fd(parent)
        os.mkdir(name, 0o777, dir_fd=pfd)
        self._keep(new, os.open(name, _DIR_FLAGS, dir_fd=pfd), parent)

    def create(self, parent: int, name: bytes, node: FileNode) -> int:
        """A new, empty file (``O_EXCL``: never an existing file, never through a symlink)."""
        fd = os.open(name, _NEW_FILE, 0o777 if node.executable else 0o666, dir_fd=self.dir_fd(parent))
        if self.plan.link:
            self.firsts[(node.digest, node.executable)] = (parent, name)
        return fd

    def link(self, parent: int, name: bytes, node: FileNode) -> None:
        """A hard link to the first file of the blob; a copy of it once that file has too many links."""
        src_parent, src_name = self.firsts[(node.digest, node.executable)]
        src_fd = self.dir_fd(src_parent)
        dst_fd = self.dir_fd(parent, pinned=src_parent)
        try:
            os.link(src_name, name, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
            return
        except OSError as e:
            if e.errno != errno.EMLINK:
                raise
        source = os.open(src_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_fd)
        try:
            target = self.create(parent, name, node)  # further links go to this copy
            try:
                left = node.size
                while left > 0:
                    copied = os.copy_file_range(source, target, left)
                    if copied == 0:
                        raise StorageError(f"{self.plan.show(parent, name)}: its first copy shrank while linking")
                    left -= copied
            finally:
                os.close(target)
        finally:
            os.close(source)

    def run(self, ops: list[Op], found: dict[B3Digest, bytes | memoryview]) -> None:
        """Create ``ops`` in order; a file's bytes come from ``found`` (checked against its size)."""
        for op in ops:
            kind, parent, name, arg = op
            if kind == _FILE:
                assert isinstance(arg, FileNode)
                if arg.size:
                    data = found.get(arg.digest)
                    if data is None or len(data) != arg.size:
                        raise _BadBlob(op)
                fd = self.create(parent, name, arg)
                try:
                    if arg.size:
                        _write_all(fd, found[arg.digest])
                finally:
                    os.close(fd)
            elif kind == _MKDIR:
                assert isinstance(arg, int)
                self.mkdir(parent, name, arg)
            elif kind == _SYMLINK:
                assert isinstance(arg, bytes)
                os.symlink(arg, name, dir_fd=self.dir_fd(parent))
            else:
                assert isinstance(arg, FileNode)
                self.link(parent, name, arg)


# -- reads on worker threads (blob services with BulkReads) ---------------------------------


def _bulk_batch(
    reads: BulkReads, sizes: dict[B3Digest, int]
) -> tuple[dict[B3Digest, bytes | memoryview], list[B3Digest]]:
    """A batch of small blobs through ``reads``: the ones up to ``run_max`` as one read run, the others whole.

    Everything returned has been hashed against its digest (see
    :class:`~nixcas.castore.blob.base.BulkReads`).  The digests it could not
    serve are returned for :meth:`~nixcas.castore.blob.base.BlobService.read_many`,
    which leaves out a missing blob or one of another size, so the writer names it.
    """
    found: dict[B3Digest, bytes | memoryview] = {}
    rest: list[B3Digest] = []
    run = [d for d, size in sizes.items() if size <= reads.run_max]
    if run:
        got = reads.read_run([(bytes(d), sizes[d]) for d in run], memoryview(bytearray()))
        if got is None:
            rest += run
        else:
            found.update(zip(run, got, strict=True))
    for digest, size in sizes.items():
        if size > reads.run_max:
            data = reads.read_whole(bytes(digest), size, memoryview(bytearray()))
            if data is None:
                rest.append(digest)
            else:
                found[digest] = data
    return found, rest


def _bulk_copier(reads: BulkReads, whole_max: int) -> Callable[[int, FileNode, threading.Event], bool]:
    """Copy a large blob into a file descriptor in a worker thread, verified (see :class:`BulkReads`).

    Up to ``whole_max`` bytes it is read whole (and hashed once); a larger one
    is streamed chunk by chunk (:meth:`~nixcas.castore.blob.base.BulkReads.read_chunks`:
    each chunk checked, the whole blob's BLAKE3 at its end, a mismatch raises
    and the export is then removed).  ``False``, with nothing written, for
    what ``reads`` does not serve: the blob service's verifying reader takes
    those and names any problem.  Stops between chunks once ``stop`` is set.
    """

    def copy(fd: int, node: FileNode, stop: threading.Event) -> bool:
        raw = bytes(node.digest)
        if node.size <= whole_max:
            data = reads.read_whole(raw, node.size, memoryview(bytearray()))
            if data is not None:
                _write_all(fd, data)
                return True
        chunks = reads.read_chunks(raw, node.size)
        if chunks is None:
            return False
        for data in chunks:
            if stop.is_set():
                raise asyncio.CancelledError
            _write_all(fd, data)
        return True

    return copy


# -- the window of reads ahead of the writer -----------------------------------------------


@dataclass(slots=True)
class _Batch:
    """Consecutive entries written by one step of the writer thread; their small files read by one ``read_many``."""

    ops: list[Op]
    """Every entry but the new directories."""
    sizes: dict[B3Digest, int]
    dirs: list[Op] = field(default_factory=list)
    """The new directories, created first (in order)."""
    cost: int = 0
    task: asyncio.Future[dict[B3Digest, bytes | memoryview]] | None = None
    data: Future[dict[B3Digest, bytes | memoryview]] | None = None
    """The read's result, for the writer thread."""
    done: asyncio.Future[object] | None = None
    """Set once the writer thread has written the batch (or failed to)."""
    after: threading.Event | None = None
    """The previous unit's :attr:`made`: its directories exist."""
    made: threading.Event = field(default_factory=threading.Event)


@dataclass(slots=True)
class _Big:
    """A large file: created in order by the writer thread, then streamed in the background."""

    op: Op
    node: FileNode
    cost: int
    task: asyncio.Future[bytes] | None = None
    """The reader opened and the first block read ahead (blob services without BulkReads)."""
    reader: BlobReader | None = None
    done: asyncio.Future[object] | None = None
    """The writer thread's answer: ``(fd, copy)``, the copy a future of the BulkReads copier (or ``None``)."""
    streamed: bool = False
    """Whether a stream took the answer over (it then closes the file)."""
    after: threading.Event | None = None
    made: threading.Event = field(default_factory=threading.Event)


class _WriterThread:
    """Writes the units of the window, in threads that keep going while there is work.

    The event loop queues each unit as soon as its read is started; a
    thread waits for the read's result itself, so no round trip through the
    event loop separates one write from the next.  With several writers
    (each with its own :class:`_Writer`), units are dealt out in turn; a
    unit's new directories are created first, and the next unit starts only
    once they exist (its files may be in them), so files of consecutive
    units are created in parallel.  With BulkReads, large files
    are copied by :data:`STREAMS` further threads.
    """

    def __init__(self, writers: list[_Writer], copier: Callable[[int, FileNode, threading.Event], bool] | None) -> None:
        self.copier = copier
        self.stop = threading.Event()
        self.loop = asyncio.get_running_loop()
        self.queues: list[SimpleQueue[_Batch | _Big | None]] = [SimpleQueue() for _ in writers]
        self.submitted = 0
        self.last: threading.Event | None = None
        self.copies = ThreadPoolExecutor(STREAMS, "nixcas-export-copy") if copier is not None else None
        self.threads = [
            threading.Thread(target=self._main, args=(w, q), name="nixcas-export-writer", daemon=True)
            for w, q in zip(writers, self.queues, strict=True)
        ]
        for thread in self.threads:
            thread.start()

    def submit(self, unit: _Batch | _Big) -> None:
        unit.done = self.loop.create_future()
        unit.after, self.last = self.last, unit.made
        self.queues[self.submitted % len(self.queues)].put(unit)
        self.submitted += 1

    def _main(self, writer: _Writer, queue: SimpleQueue[_Batch | _Big | None]) -> None:
        while (unit := queue.get()) is not None:
            try:
                if unit.after is not None:
                    unit.after.wait()
                if self.stop.is_set():
                    raise asyncio.CancelledError
                result = self._write(writer, unit)
            except BaseException as e:
                self.stop.set()
                self._answer(unit, None, e)
            else:
                self._answer(unit, result, None)
            finally:
                unit.made.set()

    def _write(self, writer: _Writer, unit: _Batch | _Big) -> object:
        if isinstance(unit, _Batch):
            writer.run(unit.dirs, {})
            unit.made.set()
            writer.run(unit.ops, unit.data.result() if unit.data is not None else {})
            return None
        op = unit.op
        fd = writer.create(op[1], op[2], unit.node)
        unit.made.set()
        if self.copies is None or self.copier is None:
            return fd, None
        try:
            return fd, self.copies.submit(self.copier, fd, unit.node, self.stop)
        except BaseException:
            os.close(fd)
            raise

    def _answer(self, unit: _Batch | _Big, result: object, error: BaseException | None) -> None:
        done = unit.done
        assert done is not None

        def settle() -> None:
            if done.cancelled():
                if error is None and isinstance(result, tuple):
                    _close_when_done(result[0], result[1])  # a big file nobody will stream
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result)

        self.loop.call_soon_threadsafe(settle)

    async def close(self) -> None:
        """Stop after the current units; wait for the threads and every copy (no write runs afterwards)."""
        for queue in self.queues:
            queue.put(None)
        for thread in self.threads:
            await to_thread_uninterrupted(thread.join)
        if self.copies is not None:
            copies = self.copies
            await to_thread_uninterrupted(lambda: copies.shutdown(wait=True, cancel_futures=True))


def _close_when_done(fd: int, copy: Future[bool] | None) -> None:
    """Close ``fd`` now, or once ``copy`` (which writes to it) has finished."""
    if copy is None:
        os.close(fd)
    else:
        copy.add_done_callback(lambda _: os.close(fd))


class _Materializer:
    def __init__(
        self, plan: _Plan, writers: list[_Writer], blobs: BlobService, prefetch: int, buffer_bytes: int
    ) -> None:
        self.plan = plan
        self.writers = writers
        self.blobs = blobs
        self.prefetch = max(1, prefetch)
        self.buffer_bytes = max(1, buffer_bytes)
        self.small = min(SMALL_FILE, self.buffer_bytes // 4)
        self.batch_bytes = min(BATCH_BYTES, self.buffer_bytes)
        self.ops = plan.ops()
        self.peeked: Op | None = None
        self.window: deque[_Batch | _Big] = deque()
        self.held = 0
        self.batches = 0
        self.reads = blobs.bulk_reads()
        whole = min(self.reads.whole_max, self.buffer_bytes // 8) if self.reads is not None else 0
        self.copier = _bulk_copier(self.reads, whole) if self.reads is not None else None
        self.streams: dict[asyncio.Future[None], _Big] = {}
        self.thread: _WriterThread | None = None

    def _take(self) -> Op | None:
        op, self.peeked = self.peeked, None
        return op if op is not None else next(self.ops, None)

    def _is_big(self, op: Op) -> bool:
        return op[0] == _FILE and isinstance(op[3], FileNode) and op[3].size > self.small

    def _fill(self) -> None:
        assert self.thread is not None
        while len(self.window) < self.prefetch and (not self.window or self.held < self.buffer_bytes):
            op = self._take()
            if op is None:
                return
            if self._is_big(op):
                node = op[3]
                assert isinstance(node, FileNode)
                big = _Big(op, node, 0 if self.copier is not None else min(node.size, BLOCK))
                if self.copier is None:  # the head is read ahead; the BulkReads copier reads it
                    big.task = asyncio.ensure_future(self._open_big(big))
                self.window.append(big)
                self.thread.submit(big)
                self.held += big.cost
                continue
            if self.batches >= BATCHES:
                self.peeked = op
                return
            batch = _Batch([], {})
            files = 0
            while True:
                (batch.dirs if op[0] == _MKDIR else batch.ops).append(op)
                if op[0] == _FILE:
                    node = op[3]
                    assert isinstance(node, FileNode)
                    if node.size:
                        files += 1
                        batch.cost += node.size
                        if node.size > batch.sizes.get(node.digest, 0):
                            batch.sizes[node.digest] = node.size
                nxt = self._take()
                if nxt is None:
                    break
                size = nxt[3].size if nxt[0] == _FILE and isinstance(nxt[3], FileNode) else 0
                if (
                    self._is_big(nxt)
                    or len(batch.ops) + len(batch.dirs) >= BATCH_OPS
                    or (size and (files >= BATCH_FILES or batch.cost + size > self.batch_bytes))
                ):
                    self.peeked = nxt
                    break
                op = nxt
            if batch.sizes:
                batch.task = asyncio.ensure_future(self._read(batch.sizes))
                batch.data = _bridge(batch.task)
            self.window.append(batch)
            self.thread.submit(batch)
            self.held += batch.cost
            self.batches += 1

    async def _read(self, sizes: dict[B3Digest, int]) -> dict[B3Digest, bytes | memoryview]:
        """The blobs of a batch, each verified (missing ones, and ones of another size, may be left out)."""
        if self.reads is None:
            return dict(await self.blobs.read_many(sizes, parallel=self.prefetch))
        found, rest = await asyncio.to_thread(_bulk_batch, self.reads, sizes)
        if rest:
            found.update(await self.blobs.read_many({d: sizes[d] for d in rest}, parallel=self.prefetch))
        return found

    async def _open_big(self, big: _Big) -> bytes:
        reader = await self.blobs.open_read(big.node.digest)
        if reader is None:
            raise self._missing(big.op)
        big.reader = reader
        first = await reader.read(min(BLOCK, big.node.size))
        if not first:
            raise self._short(big.op, 0)
        return first

    def _missing(self, op: Op) -> NotFoundError:
        assert isinstance(op[3], FileNode)
        return NotFoundError(f"blob {op[3].digest.hex()} not found (needed at {self.plan.show(op[1], op[2])})")

    def _short(self, op: Op, got: int) -> StorageError:
        assert isinstance(op[3], FileNode)
        return StorageError(
            f"blob {op[3].digest.hex()} ended after {got} of the {op[3].size} bytes "
            f"file {self.plan.show(op[1], op[2])} declares"
        )

    def _long(self, op: Op) -> StorageError:
        assert isinstance(op[3], FileNode)
        return StorageError(
            f"blob {op[3].digest.hex()} is longer than the {op[3].size} bytes "
            f"file {self.plan.show(op[1], op[2])} declares"
        )

    async def _explain(self, op: Op, found: dict[B3Digest, bytes | memoryview]) -> NixcasError:
        """Why a batch had no fitting bytes for ``op``'s blob."""
        node = op[3]
        assert isinstance(node, FileNode)
        data = found.get(node.digest)
        if data is not None and len(data) < node.size:
            return self._short(op, len(data))
        if data is None and not await self.blobs.has(node.digest):
            return self._missing(op)
        return self._long(op)

    async def _finish(self, unit: _Batch | _Big) -> None:
        """Wait for the writer thread to have written ``unit``; a large file then streams in the background."""
        assert unit.done is not None
        if isinstance(unit, _Batch):
            try:
                await unit.done
            except _BadBlob as e:
                assert unit.task is not None
                raise await self._explain(e.op, unit.task.result()) from None
            return
        answer = await unit.done
        assert isinstance(answer, tuple)
        fd: int = answer[0]
        copy: Future[bool] | None = answer[1]
        task = asyncio.ensure_future(self._stream(unit, fd, copy))
        task.add_done_callback(lambda _: _close_when_done(fd, copy))  # also when cancelled before it ran
        unit.streamed = True
        self.streams[task] = unit
        await self._drain(STREAMS)

    async def _drain(self, left: int) -> None:
        """Wait until at most ``left`` streams run; the first failure raises."""
        while len(self.streams) > left:
            done, _ = await asyncio.wait(self.streams, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                del self.streams[task]
                task.result()

    async def _stream(self, big: _Big, fd: int, copy: Future[bool] | None) -> None:
        if copy is not None:
            if await uninterrupted(asyncio.wrap_future(copy)):
                return
            big.task = asyncio.ensure_future(self._open_big(big))
        await self._write_big(big, fd)

    async def _write_big(self, big: _Big, fd: int) -> None:
        """A large file through the blob service's verifying reader, one block read ahead of the write."""
        assert big.task is not None
        op, size = big.op, big.node.size
        pending: asyncio.Future[bytes] | None = None
        try:
            data = await big.task
            reader = big.reader
            assert reader is not None
            got = 0
            while True:
                got += len(data)
                if got > size:
                    raise self._long(op)
                if got < size:
                    pending = asyncio.ensure_future(reader.read(min(BLOCK, size - got)))
                await to_thread_uninterrupted(functools.partial(_write_all, fd, data))
                if pending is None:
                    break
                data = await pending
                pending = None
                if not data:
                    raise self._short(op, got)
            if await reader.read(1):  # the end of the blob: this completes its verification
                raise self._long(op)
        finally:
            if pending is not None:
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)
            if big.reader is not None:
                reader, big.reader = big.reader, None
                await reader.close()

    async def run(self) -> None:
        self.thread = _WriterThread(self.writers, self.copier)
        try:
            self._fill()
            while self.window:
                unit = self.window[0]
                await self._finish(unit)
                self.window.popleft()
                self.held -= unit.cost
                if isinstance(unit, _Batch):
                    self.batches -= 1
                self._fill()
            await self._drain(0)
        finally:
            await self._abandon()

    async def _abandon(self) -> None:
        """Stop the writer thread and the streams, cancel the reads still in the window, close their readers."""
        assert self.thread is not None
        self.thread.stop.set()
        units: list[_Batch | _Big] = [*self.window, *self.streams.values()]
        futures: list[asyncio.Future[object]] = list(self.streams)  # type: ignore[arg-type]
        self.streams.clear()
        for unit in units:
            if unit.task is not None:
                futures.append(unit.task)  # type: ignore[arg-type]
        for fut in futures:
            fut.cancel()
        await asyncio.gather(*futures, return_exceptions=True)
        await self.thread.close()
        for unit in units:
            if isinstance(unit, _Big) and unit.reader is not None:
                with contextlib.suppress(Exception):
                    await unit.reader.close()
                unit.reader = None
            if unit.done is not None and unit.done.done() and not unit.done.cancelled():
                answer = unit.done.exception() or unit.done.result()  # retrieved: no "never retrieved" warning
                if isinstance(unit, _Big) and not unit.streamed and isinstance(answer, tuple):
                    _close_when_done(answer[0], answer[1])  # created, never streamed
        self.window.clear()


def _bridge(task: asyncio.Future[T]) -> Future[T]:
    """A :class:`concurrent.futures.Future` with ``task``'s outcome, for a thread to wait on."""
    out: Future[T] = Future()

    def copy(done: asyncio.Future[T]) -> None:
        if done.cancelled():
            out.set_exception(asyncio.CancelledError())
        elif (error := done.exception()) is not None:
            out.set_exception(error)
        else:
            out.set_result(done.result())

    task.add_done_callback(copy)
    return out


# -- the destination ---------------------------------------------------------------------------


def _check_dest(dest: str, node: Node) -> None:
    """Refuse a ``dest`` that exists, unless it is an empty directory and ``node`` a directory."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode) and isinstance(node, DirectoryNode):
        with os.scandir(dest) as entries:
            if next(entries, None) is None:
                return
        raise ExportError(f"{dest}: exists and is not empty (export writes a new path, or into an empty directory)")
    raise ExportError(f"{dest}: exists (export writes a new path)")


def _publish(parent_fd: int, staging: str, staging_fd: int, base: str, dest: str, is_dir: bool) -> None:
    """Move the finished root from the staging directory to ``dest``; never replaces anything but an empty dir."""
    try:
        if is_dir:
            os.rename(ROOT, base, src_dir_fd=staging_fd, dst_dir_fd=parent_fd)
        else:
            os.link(ROOT, base, src_dir_fd=staging_fd, dst_dir_fd=parent_fd, follow_symlinks=False)
            os.unlink(ROOT, dir_fd=staging_fd)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise ExportError(f"{dest}: appeared while exporting (export writes a new path)") from None
        raise
    os.rmdir(staging, dir_fd=parent_fd)


def _remove(parent_fd: int, staging: str, parent: str) -> str | None:
    """Remove the staging directory (without following any symlink); what went wrong, if anything."""
    try:
        shutil.rmtree(staging, dir_fd=parent_fd)
    except FileNotFoundError:
        pass
    except OSError as e:
        return f"the partial export {os.path.join(parent, staging)} could not be removed: {e}"
    return None


async def export_node(
    node: Node,
    dest: str | os.PathLike[str],
    blobs: BlobService,
    directories: DirectoryService,
    *,
    link: bool = False,
    prefetch: int = PREFETCH,
    buffer_bytes: int = BUFFER_BYTES,
) -> ExportStats:
    """Write ``node`` (a directory tree, a file or a symlink) to the new path ``dest``; see the module docs.

    Raises :class:`ExportError` when ``dest`` exists (other than an empty
    directory for a directory root), :class:`~nixcas.errors.NotFoundError`
    for a missing blob or directory, :class:`~nixcas.errors.ChecksumMismatch`
    or :class:`~nixcas.errors.StorageError` for damaged content; in every
    case nothing is left behind.
    """
    path = os.path.abspath(os.fspath(dest))
    parent, base = os.path.split(path)
    if not base:
        raise ExportError(f"{dest}: cannot export to the root directory")
    _check_dest(path, node)
    plan = _Plan(node, await fetch_closure(node, directories), link)
    parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        staging = _make_staging(parent_fd, base)
        try:
            staging_fd = os.open(staging, _DIR_FLAGS, dir_fd=parent_fd)
            try:
                # Links need their first file to exist: one writer then, which creates everything in order.
                writers = [_Writer(plan, staging_fd) for _ in range(1 if link else WRITERS)]
                try:
                    await _Materializer(plan, writers, blobs, prefetch, buffer_bytes).run()
                finally:
                    for writer in writers:
                        writer.close()
                _publish(parent_fd, staging, staging_fd, base, path, isinstance(node, DirectoryNode))
            finally:
                os.close(staging_fd)
        except BaseException as e:
            problem = await to_thread_uninterrupted(lambda: _remove(parent_fd, staging, parent))
            if problem is not None and isinstance(e, Exception):
                raise ExportError(f"{e}; {problem}") from e
            raise
    finally:
        os.close(parent_fd)
    return plan.stats


def _make_staging(parent_fd: int, base: str) -> str:
    """A new directory (mode 0700) beside the destination, named after it."""
    tail = os.fsencode(base)[:160]
    while True:
        name = os.fsdecode(b".nixcas-export-" + secrets.token_hex(6).encode() + b"-" + tail)
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        except FileExistsError:
            continue
        return name

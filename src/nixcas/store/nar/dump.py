"""Writing a NAR straight to a file descriptor: the path of ``nixcas dump-path``.

For a blob service with :class:`~nixcas.castore.blob.base.BulkReads` (the
embedded store), the whole NAR is planned first and then read in large
batches on a worker thread:

* the directory closure (stored bytes, hash-checked) is turned into a *plan*
  without building node objects (:func:`plan_steps`): the framing before
  each file's contents, and each file's digest and size;
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

import contextlib
import itertools
import mmap
import operator
import os
import select
import struct
import sys
import threading
from _queue import SimpleQueue
from collections import deque
from collections.abc import Callable, Iterator, Sequence

from nixcas.castore.canonical import canonical_fields
from nixcas.castore.digest import DIGEST_LEN, EMPTY_DIGEST, B3Digest
from nixcas.castore.nodes import (
    MAX_DEPTH,
    MAX_NAME_LEN,
    DirectoryNode,
    FileNode,
    SymlinkNode,
    validate_name,
    validate_symlink_target,
)
from nixcas.castore.treepath import TreePath
from nixcas.errors import DirectoryError, InvalidSymlinkTargetError
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

TYPE_CHECKING = False  # not typing's: the command line's fast path imports this module, and needs nothing of it
if TYPE_CHECKING:
    from typing import Any, Protocol

    from nixcas.castore.blob.base import BlobService
    from nixcas.castore.dirs.base import DirectoryService
    from nixcas.castore.nodes import Node
    from nixcas.store.nar.plan import Hole

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

    class DirectoryBytes(Protocol):
        """Stored Directory bytes by raw digest (a ``dict``, or the fast path's reader of the database, which also
        has ``prefetch(digests)``: the planner announces the subdirectories it will ask for, a directory's at once)."""

        def get(self, digest: bytes, /) -> bytes | None:
            """The stored bytes of ``digest`` (checked against it), or ``None`` if there are none."""

    from nixcas.castore.canonical import Fields

__all__ = [
    "plan_steps",
    "RUN_BYTES",
    "RUN_FILES",
    "WINDOW_BYTES",
    "WORKERS",
    "Output",
    "Plan",
    "dump_nar",
    "plan_nar",
    "write_planned",
]

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
PLANNING_BYTES = 16 << 20
"""File contents read while the plan is being made (nothing is written until it is complete), at most."""
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
        from nixcas.store.nar.plan import ROOT, Hole

        where = self.paths[i]
        path = ROOT if where is None else TreePath(*where)
        return Hole(B3Digest(self.digests[i]), self.sizes[i], path)

    @property
    def nar_size(self) -> int:
        return sum(map(len, self.frames)) + sum(self.sizes)

    def offset(self, i: int) -> int:
        """Where ``frames[i]`` starts in the NAR."""
        return sum(map(len, self.frames[:i])) + sum(self.sizes[:i])


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


# -- planning --------------------------------------------------------------------------


def _entries(raw: bytes, path: TreePath) -> list[Fields]:
    """A stored Directory's entries in name order: (name, kind (0 directory, 1 file, 2 symlink), digest or target,
    size, executable).

    Checked as :meth:`~nixcas.castore.directory.Directory.decode` does: each list sorted, names
    unique across the lists and valid (all names of the directory at once; one by one only to name
    the bad one).  Canonical bytes are read without protobuf while it is not loaded
    (:func:`~nixcas.castore.canonical.canonical_fields`); anything else, or anything once protobuf
    is loaded, goes through protobuf, which reports the precise error.
    """
    entries = None if _protobuf_loaded() else canonical_fields(raw)
    if entries is None:
        entries, names = _message_entries(raw, path)
    else:
        names = [entry[0] for entry in entries]
    if names:
        _check_names(names)
        if entries[0][1] != entries[-1][1]:  # more than one list: merge them (names must stay unique)
            if len(set(names)) != len(names):
                _name_order(sorted(names), path)
            entries.sort(key=_NAME)
    return entries


def _protobuf_loaded() -> bool:
    return "google.protobuf" in sys.modules


def _message_entries(raw: bytes, path: TreePath) -> tuple[list[Fields], list[bytes]]:
    """The entries of any Directory message through protobuf, in the lists' order (each list checked sorted), and
    their names."""
    from google.protobuf.message import DecodeError

    from nixcas.castore.proto import pb

    try:
        msg = pb.Directory.FromString(raw)
    except DecodeError as e:
        raise DirectoryError(f"directory {path.show_below_root()}: cannot decode Directory message: {e}") from None
    entries: list[Fields] = []
    names: list[bytes] = []
    for kind in (0, 1, 2):
        items: Any = (msg.directories, msg.files, msg.symlinks)[kind]
        if not items:
            continue
        if kind == 1:
            part: list[Fields] = [(e.name, 1, e.digest, e.size, e.executable) for e in items]
        elif kind == 0:
            part = [(e.name, 0, e.digest, e.size, False) for e in items]
        else:
            part = [(e.name, 2, e.target, 0, False) for e in items]
        listed = [entry[0] for entry in part]
        if listed != sorted(set(listed)):
            _name_order(listed, path)
        entries += part
        names += listed
    return entries, names


def _check_names(names: list[bytes]) -> None:
    """Every name valid (:func:`~nixcas.castore.nodes.validate_name`), checked at once; one by one to name a bad one."""
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


def _name_order(names: list[bytes], path: TreePath) -> None:
    """Raise for the first name that is not sorted after the one before (or repeats it)."""
    for previous, name in itertools.pairwise(names):
        if name == previous:
            raise DirectoryError(f"directory {path.show_below_root()}: duplicate name {name[:300]!r}")
        if name < previous:
            raise DirectoryError(
                f"directory {path.show_below_root()}: {name[:300]!r} is not sorted after {previous[:300]!r}"
            )


def plan_nar(root: Node, closure: DirectoryBytes) -> Plan:
    """The NAR of ``root`` as a :class:`Plan`; directories from ``closure`` (stored bytes by digest).

    The same checks as :func:`~nixcas.store.nar.plan.iter_plan` with Directory decoding: names
    valid, sorted and unique, digests of 32 bytes, sizes that agree with the empty blob, symlink
    targets valid, depth at most :data:`~nixcas.castore.nodes.MAX_DEPTH`, every directory present.
    """
    plan, steps = plan_steps(root, closure)
    for _ in steps:
        pass
    return plan


def plan_steps(root: Node, closure: DirectoryBytes) -> tuple[Plan, Iterator[None]]:
    """:func:`plan_nar` step by step: the :class:`Plan` is complete once the steps are done.

    Each step plans at least :data:`RUN_FILES` more files (a whole directory at a time), so a
    reader may start on the files planned so far (:func:`write_planned`).
    """
    plan = Plan([], [], [], [])
    if isinstance(root, DirectoryNode):
        return plan, _plan_tree(root, closure, plan)
    _plan_leaf(root, plan)
    return plan, iter(())


def _plan_leaf(root: Node, plan: Plan) -> None:
    """The NAR of a file or a symlink."""
    buf = bytearray(NAR_MAGIC)
    frames, digests, sizes, paths = plan.frames, plan.digests, plan.sizes, plan.paths
    if isinstance(root, FileNode):
        buf += NODE_EXECUTABLE if root.executable else NODE_REGULAR
        buf += u64_le(root.size)
        if _has_contents(root.digest, root.size, None, b""):
            frames.append(bytes(buf))
            buf.clear()
            digests.append(bytes(root.digest))
            sizes.append(root.size)
            paths.append(None)
            buf += padding(root.size)
    else:
        assert isinstance(root, SymlinkNode)
        buf += NODE_SYMLINK
        buf += encode_str(root.target)
    buf += TOK_CLOSE
    frames.append(bytes(buf))


def _plan_tree(root: DirectoryNode, closure: DirectoryBytes, plan: Plan) -> Iterator[None]:
    """:func:`plan_steps` of a directory: depth first, each file's framing inline (the hot loop), the rest in
    helpers; a step ends with a directory once :data:`RUN_FILES` more files are planned."""
    frames, digests, sizes, paths = plan.frames, plan.digests, plan.sizes, plan.paths
    step_end = RUN_FILES
    buf = bytearray(NAR_MAGIC)
    buf += NODE_DIRECTORY
    top = closure.get(root.digest)
    if top is None:
        raise _missing_directory(root.digest, None, b"")
    # Each frame: a directory's entries, the next one's index, its path.
    stack: list[tuple[list[Fields], int, TreePath]] = [(_entries_from(closure, top, _ROOT), 0, _ROOT)]
    append_frame, append_digest, append_size, append_path = frames.append, digests.append, sizes.append, paths.append
    pack, join, zeros, empty = _U64.pack, b"".join, _ZEROS, EMPTY_DIGEST
    while stack:
        if len(sizes) >= step_end:
            step_end = len(sizes) + RUN_FILES
            yield
        entries, i, path = stack.pop()
        if not i and entries and path.depth >= MAX_DEPTH:
            raise _too_deep(path)
        descend = None
        n = len(entries)
        while i < n:
            name, kind, digest, size, executable = entries[i]
            i += 1
            if kind == 1:
                length = len(name)
                buf += join(
                    (
                        ENTRY_PREFIX,
                        pack(length),
                        name,
                        zeros[: -length & 7],
                        _FILE_EXECUTABLE if executable else _FILE_REGULAR,
                        pack(size),
                    )
                )
                if (size and digest != empty and len(digest) == DIGEST_LEN) or _has_contents(digest, size, path, name):
                    append_frame(bytes(buf))
                    buf.clear()
                    append_digest(digest)
                    append_size(size)
                    append_path((path, name))
                    buf += _PAD_CLOSE[size & 7]
                else:
                    buf += _CLOSE_ENTRY
            elif kind == 2:
                buf += _symlink_entry(name, digest)
            else:
                descend = _enter(closure, path, name, digest)
                buf += join((ENTRY_PREFIX, encode_str(name), TOK_NODE, NODE_DIRECTORY))
                break
        if descend is not None:
            stack.append((entries, i, path))
            stack.append(descend)
            continue
        buf += TOK_CLOSE if path.parent is None else _CLOSE_ENTRY
    frames.append(bytes(buf))


_ROOT = TreePath(None, b"")
"""The NAR's root (:data:`nixcas.store.nar.plan.ROOT`)."""


def _has_contents(digest: bytes, size: int, parent: TreePath | None, name: bytes) -> bool:
    """Whether a file has contents (a hole in the plan): ``False`` for the empty file; a contradiction raises."""
    if len(digest) != DIGEST_LEN:
        raise DirectoryError(f"invalid node {name[:300]!r}: invalid digest length {len(digest)}")
    if size and digest != EMPTY_DIGEST:
        return True
    if not size and digest == EMPTY_DIGEST:
        return False
    from nixcas.store.nar.plan import ROOT, _check_file

    _check_file(FileNode(B3Digest(digest), size), ROOT if parent is None else TreePath(parent, name))
    raise AssertionError("unreachable: _check_file raises for a size that contradicts the digest")


def _symlink_entry(name: bytes, target: bytes) -> bytes:
    """The whole entry of a symlink, its target checked."""
    try:
        validate_symlink_target(target)
    except InvalidSymlinkTargetError as e:
        raise DirectoryError(f"invalid node {name[:300]!r}: {e}") from None
    return b"".join((ENTRY_PREFIX, encode_str(name), TOK_NODE, NODE_SYMLINK, encode_str(target), _CLOSE_ENTRY))


def _enter(closure: DirectoryBytes, parent: TreePath, name: bytes, digest: bytes) -> tuple[list[Fields], int, TreePath]:
    """The stack frame of a subdirectory: its entries (from ``closure``), from the first, and its path."""
    raw = closure.get(digest)
    if raw is None:
        if len(digest) != DIGEST_LEN:
            raise DirectoryError(f"invalid node {name[:300]!r}: invalid digest length {len(digest)}")
        raise _missing_directory(digest, parent, name)
    child = TreePath(parent, name)
    return _entries_from(closure, raw, child), 0, child


def _entries_from(closure: DirectoryBytes, raw: bytes, path: TreePath) -> list[Fields]:
    """:func:`_entries`, and the subdirectories announced to a ``closure`` that reads ahead (``prefetch``)."""
    entries = _entries(raw, path)
    prefetch = getattr(closure, "prefetch", None)
    if prefetch is not None:
        below = [entry[2] for entry in entries if not entry[1]]
        if len(below) > 1:
            prefetch(below)
    return entries


def _missing_directory(digest: bytes, parent: TreePath | None, name: bytes) -> Exception:
    from nixcas.store.nar.plan import ROOT, NarContentNotFound

    return NarContentNotFound("directory", B3Digest(digest), ROOT if parent is None else TreePath(parent, name))


def _too_deep(path: TreePath) -> Exception:
    from nixcas.store.nar.plan import too_deep

    return too_deep(path)


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
    pieces: _Pieces = []
    for frame, data in zip(frames[start:stop], contents, strict=True):
        pieces.append(frame)
        pieces.append(data)
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

    One worker thread reads and hashes up to :data:`WINDOW_BYTES` of contents ahead, into buffers
    reused from job to job, while this thread writes finished jobs in order with ``writev``.
    With ``planning`` (the steps of :func:`plan_steps` of ``plan``), the plan is completed here
    first, the worker reading the files planned so far meanwhile (at most :data:`PLANNING_BYTES`):
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
        while next_file < n and len(window) < jobs:
            i = next_file
            stop, cost, kind = _job_bounds(sizes, i, n, run_max, whole_max)
            if window and held + cost > most:
                return
            buffer = None
            if kind != _STREAMED:
                buffer = buffers.take(cost + (cost >> 7 if kind == _WHOLE else 0) + _SLACK)
                _WORKER.submit((_job_reader(reads, plan, kind, i, stop, buffer), results, stopped))
                pending += 1
            window.append((i, stop, cost, kind, buffer))
            held += cost
            next_file = stop

    try:
        for _ in planning or ():
            fill(sys.maxsize, PLANNING_BYTES)
        while True:
            fill(2 * WORKERS, WINDOW_BYTES)
            if not window:
                break
            i, stop, cost, kind, buffer = window.popleft()
            got = None
            if kind != _STREAMED:
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
    from nixcas.store.nar.render import BLOCK, SMALL_FILE, _fetch_whole, _open, _read_exact_end

    if hole.size <= SMALL_FILE:  # read whole and to its end (so verified) before a byte is written
        out.write(await _fetch_whole(blobs, hole))
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
            out.write([data])
        await _read_exact_end(reader, hole)

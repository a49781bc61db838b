"""Turning a filesystem tree (or any post-order entry stream) into castore nodes.

:func:`ingest_entries` is the generic core: it consumes entries children
before parents, builds each Directory when its own entry arrives, validates
the closure as it goes and commits it in one step at the end.
:func:`ingest_path` feeds it from a filesystem walk: symlinks are not
followed, the owner-exec bit becomes ``executable``, sockets/FIFOs/devices
are refused with the path named, and so is anything nested deeper than
:data:`~nixcas.castore.nodes.MAX_DEPTH`.  Small files are read and uploaded in
batches; large files stream in blocks; reading runs ahead of uploading in a
worker thread, and the bytes in flight are bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from nixcas.castore.blob.base import BlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.base import DirectoryPutter, DirectoryService
from nixcas.castore.nodes import MAX_DEPTH, DirectoryNode, FileNode, Node, SymlinkNode
from nixcas.castore.treepath import TreePath
from nixcas.errors import DepthError, IngestError, StorageError, ValidationError

__all__ = [
    "IngestEntry",
    "Progress",
    "Stamp",
    "WalkObserver",
    "ingest_entries",
    "ingest_path",
    "stamp_of",
    "upload_stream",
]

SMALL_FILE = 256 << 10
"""Files up to this size are read whole and uploaded in batches."""
BATCH_FILES = 2048
BATCH_BYTES = 16 << 20
READ_BLOCK = 1 << 20
LARGE_PARALLEL = 2
BATCHES_AHEAD = 3

T = TypeVar("T")

Progress = Callable[[int], None]
"""Called with the number of content bytes just ingested."""


class WalkObserver(Protocol):
    """Sees a filesystem walk in canonical order: depth first, names sorted by their bytes.

    That is the order of castore Directories and of NARs, so an observer can
    hash a serialisation of the tree while it is being imported, from the
    bytes being imported (the Nix layer hashes the NAR this way).  Called
    from the walker's thread.  ``name`` is ``None`` for the root.
    """

    def directory(self, name: bytes | None) -> None:
        """A directory starts; its entries follow, then :meth:`leave`."""

    def leave(self) -> None:
        """The current directory ends."""

    def symlink(self, name: bytes | None, target: bytes) -> None:
        """A symlink."""

    def file(
        self, name: bytes | None, executable: bool, size: int, data: bytes | None, fs_path: bytes, stamp: Stamp
    ) -> None:
        """A regular file: ``data`` is its contents when it is small (they are what is imported).

        A large file (``data is None``) is streamed by the importer separately;
        an observer that reads ``fs_path`` itself must check that the file
        still has ``stamp`` (:func:`stamp_of`) before and after it reads it, as
        the importer does around its own read: both then read the same bytes.
        """


Stamp = tuple[int, int, int, int, int]
"""A file's identity and version: device, inode, size, mtime and ctime (ns).  Any write, and
any attempt to set the mtime back, changes the ctime: equal stamps mean unchanged contents."""


def stamp_of(st: os.stat_result) -> Stamp:
    """The :data:`Stamp` of a ``stat`` result."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True, slots=True)
class IngestEntry:
    """One filesystem object, by path relative to the parent of the root.

    ``node`` is ``None`` for a directory, whose node is built from the
    entries that came before it.  The path is a :class:`~nixcas.castore.treepath.TreePath`
    whose root is the root entry (producers share each directory's path among
    its children: memory linear in the depth), or a tuple of names (root first).
    """

    path: TreePath | tuple[bytes, ...]
    node: Node | None


def _show(path: TreePath) -> str:
    return path.show()


class _Builder:
    """Assembles Directories from post-order entries."""

    def __init__(self, directories: DirectoryService) -> None:
        self._pending: dict[TreePath, list[tuple[bytes, Node]]] = {}
        self._putter: DirectoryPutter | None = None
        self._directories = directories
        self.root: Node | None = None

    async def add(self, entry: IngestEntry) -> None:
        path = entry.path
        if type(path) is tuple:
            if not path:
                raise IngestError("entry with an empty path")
            path = TreePath.of(path)
        assert isinstance(path, TreePath)
        if self.root is not None:
            raise IngestError(f"{_show(path)}: entry after the root")
        if path.depth > MAX_DEPTH:
            raise DepthError(f"{_show(path)}: nested deeper than the {MAX_DEPTH} levels a tree may have")
        node = entry.node
        if node is None:
            children = self._pending.pop(path, [])
            try:
                directory = Directory(children)
            except ValidationError as e:
                raise IngestError(f"{_show(path)}: {e}") from None
            if self._putter is None:
                self._putter = self._directories.put_multiple_start()
            await self._putter.put(directory)
            node = directory.node(self._directories.size_rule)
        parent = path.parent
        if parent is None:
            if self._pending:
                stray = _show(next(iter(self._pending)))
                raise IngestError(f"{stray}: not below the root {_show(path)} (or listed after it)")
            self.root = node
        else:
            siblings = self._pending.get(parent)
            if siblings is None:
                self._pending[parent] = [(path.name, node)]
            else:
                siblings.append((path.name, node))

    async def finish(self) -> Node:
        if self.root is None:
            raise IngestError("input ended before its root")
        if self._putter is not None:
            digest = await self._putter.close()
            if not isinstance(self.root, DirectoryNode) or digest != self.root.digest:
                raise StorageError(f"directory service returned root {digest.hex()} for {self.root}")
        return self.root

    async def abort(self) -> None:
        if self._putter is not None:
            await self._putter.abort()


async def ingest_entries(
    entries: AsyncIterable[IngestEntry] | Iterable[IngestEntry],
    directories: DirectoryService,
    *,
    before_commit: Callable[[], Awaitable[None]] | None = None,
) -> Node:
    """Build and store the Directories of a post-order entry stream; return the root node.

    The last entry is the root (one path component).  All Directories are
    committed together at the end, after ``before_commit`` (used to make the
    blobs durable first); on any error nothing is committed.
    """
    builder = _Builder(directories)
    try:
        if isinstance(entries, AsyncIterable):
            async for entry in entries:
                await builder.add(entry)
        else:
            for entry in entries:
                await builder.add(entry)
        if before_commit is not None:
            await before_commit()
        return await builder.finish()
    except BaseException:
        await builder.abort()
        raise


async def upload_stream(
    blobs: BlobService,
    read: Callable[[int], bytes],
    size: int,
    what: str,
    progress: Progress | None = None,
) -> B3Digest:
    """Upload ``size`` bytes from a blocking ``read(n)`` callable, in blocks, off the event loop."""
    writer = await blobs.open_write(size)
    async with writer:
        remaining = size
        while remaining > 0:
            block = await asyncio.to_thread(read, min(READ_BLOCK, remaining))
            if not block:
                raise IngestError(f"{what}: ended after {size - remaining} of {size} bytes")
            await writer.write(block)
            remaining -= len(block)
            if progress is not None:
                progress(len(block))
        if await asyncio.to_thread(read, 1):
            raise IngestError(f"{what}: longer than its declared size {size}")
        return await writer.close()


# -- filesystem walk --------------------------------------------------------------


@dataclass(slots=True)
class _FileItem:
    path: TreePath
    fs_path: bytes
    size: int
    executable: bool
    data: bytes | None  # the contents, for small files
    stamp: Stamp  # as the walk saw it: a large file's two reads (upload, observer) must see it unchanged


_Item = IngestEntry | _FileItem


@dataclass(slots=True)
class _Started:
    """A batch whose uploads are under way."""

    items: list[_Item]
    small: asyncio.Future[list[FileNode]]
    larges: dict[int, asyncio.Future[FileNode]]


def _visit(fs_path: bytes, path: TreePath) -> _Item | list[bytes]:
    """One filesystem object: a directory's entry names, or an item for anything else."""
    try:
        st = os.lstat(fs_path)
    except OSError as e:
        raise IngestError(f"{os.fsdecode(fs_path)}: cannot stat: {e.strerror}") from None
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        try:
            with os.scandir(fs_path) as it:
                return sorted([entry.name for entry in it])  # canonical order (castore, NAR)
        except OSError as e:
            raise IngestError(f"{os.fsdecode(fs_path)}: cannot list directory: {e.strerror}") from None
    if stat.S_ISLNK(mode):
        try:
            return IngestEntry(path, SymlinkNode(os.readlink(fs_path)))
        except OSError as e:
            raise IngestError(f"{os.fsdecode(fs_path)}: cannot read symlink: {e.strerror}") from None
        except ValidationError as e:
            raise IngestError(f"{os.fsdecode(fs_path)}: {e}") from None
    if stat.S_ISREG(mode):
        data = _read_small(fs_path, st.st_size) if st.st_size <= SMALL_FILE else None
        return _FileItem(path, fs_path, st.st_size, bool(mode & stat.S_IXUSR), data, stamp_of(st))
    kind = (
        "socket" if stat.S_ISSOCK(mode) else
        "FIFO" if stat.S_ISFIFO(mode) else
        "character device" if stat.S_ISCHR(mode) else
        "block device" if stat.S_ISBLK(mode) else
        f"file of mode {mode:o}"
    )  # fmt: skip
    raise IngestError(f"{os.fsdecode(fs_path)}: cannot import a {kind}")


def _walk(fs_path: bytes, path: TreePath, observer: WalkObserver | None = None) -> Iterator[_Item]:
    """Post-order walk without recursion; small files come with their contents.

    Deeper than :data:`~nixcas.castore.nodes.MAX_DEPTH` is refused before it is visited.
    Names are visited sorted, so ``observer`` sees the tree in canonical order.
    """
    first = _visit(fs_path, path)
    if not isinstance(first, list):
        if observer is not None:
            _observe(observer, None, first)
        yield first
        return
    if observer is not None:
        observer.directory(None)
    stack = [(fs_path, path, iter(first))]
    while stack:
        parent_fs, parent, names = stack[-1]
        name = next(names, None)
        if name is None:
            stack.pop()
            if observer is not None:
                observer.leave()
            yield IngestEntry(parent, None)
            continue
        child_fs, child = os.path.join(parent_fs, name), TreePath(parent, name)
        if child.depth > MAX_DEPTH:
            raise DepthError(f"{child.show()}: nested deeper than the {MAX_DEPTH} levels a tree may have")
        visited = _visit(child_fs, child)
        if isinstance(visited, list):
            if observer is not None:
                observer.directory(name)
            stack.append((child_fs, child, iter(visited)))
        else:
            if observer is not None:
                _observe(observer, name, visited)
            yield visited


def _observe(observer: WalkObserver, name: bytes | None, item: _Item) -> None:
    if isinstance(item, _FileItem):
        observer.file(name, item.executable, item.size, item.data, item.fs_path, item.stamp)
    elif isinstance(item.node, SymlinkNode):
        observer.symlink(name, item.node.target)


def _read_small(fs_path: bytes, size: int) -> bytes:
    """A small file's contents (plain os calls: this runs once per small file)."""
    try:
        fd = os.open(fs_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            data = os.read(fd, size + 1)
            while len(data) <= size and (more := os.read(fd, size + 1 - len(data))):
                data += more
        finally:
            os.close(fd)
    except OSError as e:
        raise IngestError(f"{os.fsdecode(fs_path)}: cannot read: {e.strerror}") from None
    if len(data) != size:
        raise IngestError(f"{os.fsdecode(fs_path)}: changed while being imported (size {size}, read {len(data)})")
    return data


def _batches(items: Iterator[_Item]) -> Iterator[list[_Item]]:
    batch: list[_Item] = []
    size = 0
    for item in items:
        batch.append(item)
        if isinstance(item, _FileItem) and item.data is not None:
            size += item.size
        if len(batch) >= BATCH_FILES or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


async def _upload_large(blobs: BlobService, item: _FileItem, progress: Progress | None) -> FileNode:
    where = os.fsdecode(item.fs_path)
    changed = IngestError(f"{where}: changed while being imported; retry")
    try:
        f = await asyncio.to_thread(open, item.fs_path, "rb")
    except OSError as e:
        raise IngestError(f"{where}: cannot read: {e.strerror}") from None
    try:
        if stamp_of(os.fstat(f.fileno())) != item.stamp:
            raise changed
        digest = await upload_stream(blobs, f.read, item.size, f"{where} (changed while being imported)", progress)
        if stamp_of(os.fstat(f.fileno())) != item.stamp:
            raise changed
    except OSError as e:
        if isinstance(e, StorageError):
            raise
        raise IngestError(f"{where}: cannot read: {e.strerror}") from None
    except ValidationError as e:
        raise IngestError(f"{where}: {e}") from None
    finally:
        await asyncio.to_thread(f.close)
    return FileNode(digest, item.size, item.executable)


async def _entries_from_walk(
    root: bytes,
    blobs: BlobService,
    progress: Progress | None,
    observer: WalkObserver | None = None,
) -> AsyncGenerator[IngestEntry, None]:
    name = os.path.basename(os.path.normpath(root)) or b"root"
    batches = _batches(_walk(root, TreePath(None, name), observer))
    large_slots = asyncio.Semaphore(LARGE_PARALLEL)

    def next_batch() -> list[_Item] | None:
        return next(batches, None)

    async def large(item: _FileItem) -> FileNode:
        async with large_slots:
            return await _upload_large(blobs, item, progress)

    async def small(items: list[_FileItem]) -> list[FileNode]:
        if not items:
            return []
        digests = await blobs.put_many([i.data for i in items if i.data is not None])
        for i in items:
            i.data = None  # uploaded: do not hold the bytes until the entry is emitted
        if progress is not None:
            progress(sum(i.size for i in items))
        return [FileNode(d, i.size, i.executable) for d, i in zip(digests, items, strict=True)]

    # A producer reads batches (in a thread) and starts their uploads at once;
    # the consumer below emits entries in walk order.  The queue bounds how far
    # the producer runs ahead, hence the bytes held in memory; small-file
    # batches and large-file streams overlap instead of waiting for each other.
    queue: asyncio.Queue[_Started | BaseException | None] = asyncio.Queue(maxsize=BATCHES_AHEAD)
    started: set[asyncio.Future[Any]] = set()

    def finished(fut: asyncio.Future[Any]) -> None:
        started.discard(fut)
        if not fut.cancelled():
            fut.exception()  # seen: a failure the consumer never awaits (it stopped at another) is not logged

    def track(fut: asyncio.Future[T]) -> asyncio.Future[T]:
        started.add(fut)
        fut.add_done_callback(finished)
        return fut

    async def produce() -> None:
        try:
            while (batch := await asyncio.to_thread(next_batch)) is not None:
                smalls = [i for i in batch if isinstance(i, _FileItem) and i.data is not None]
                small_task = track(asyncio.ensure_future(small(smalls)))
                larges = {
                    id(i): track(asyncio.ensure_future(large(i)))
                    for i in batch
                    if isinstance(i, _FileItem) and i.data is None
                }
                await queue.put(_Started(batch, small_task, larges))
            await queue.put(None)
        except asyncio.CancelledError:
            raise  # the consumer is gone (it cancelled us): nobody would take a queued error
        except BaseException as e:  # handed to the consumer, which raises it
            await queue.put(e)

    producer = asyncio.ensure_future(produce())
    try:
        while (started_batch := await queue.get()) is not None:
            if isinstance(started_batch, BaseException):
                raise started_batch
            small_nodes = iter(await started_batch.small)
            for item in started_batch.items:
                if isinstance(item, IngestEntry):
                    yield item
                else:
                    large_task = started_batch.larges.get(id(item))
                    node = next(small_nodes) if large_task is None else await large_task
                    yield IngestEntry(item.path, node)
    finally:
        pending = [producer, *started]
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def ingest_path(
    path: str | os.PathLike[str] | bytes,
    blobs: BlobService,
    directories: DirectoryService,
    *,
    progress: Progress | None = None,
    observer: WalkObserver | None = None,
) -> Node:
    """Import a file, symlink or directory tree; return its root node.

    A root symlink is imported as a symlink.  Errors name the offending path;
    on error no Directory is stored (blobs already uploaded stay, unreferenced).
    ``observer`` sees the tree in canonical order as it is read (:class:`WalkObserver`).
    """
    root = os.fsencode(Path(os.fsdecode(path)))
    async with contextlib.aclosing(_entries_from_walk(root, blobs, progress, observer)) as entries:
        return await ingest_entries(entries, directories, before_commit=blobs.sync)

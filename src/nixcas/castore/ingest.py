"""Turning a filesystem tree (or any post-order entry stream) into castore nodes.

:func:`ingest_entries` is the generic core: it consumes entries children
before parents, builds each Directory when its own entry arrives, validates
the closure as it goes and commits it in one step at the end.
:func:`ingest_path` feeds it from a filesystem walk (:mod:`nixcas.castore.walk`):
symlinks are not followed, the owner-exec bit becomes ``executable``,
sockets/FIFOs/devices are refused with the path named, and so is anything
nested deeper than :data:`~nixcas.castore.nodes.MAX_DEPTH`.  The walk runs in
a worker thread, or in a process of its own started earlier
(:mod:`nixcas.castore.walkproc`); the contents go to the one uploader of
:mod:`nixcas.castore.upload` (small files in batches, large ones streamed),
which bounds the bytes in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from nixcas.castore.blob.base import BlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.base import DirectoryPutter, DirectoryService
from nixcas.castore.nodes import MAX_DEPTH, DirectoryNode, Node
from nixcas.castore.treepath import TreePath
from nixcas.castore.upload import PendingFile, Progress, Uploader, run_ahead
from nixcas.castore.walk import FileItem, IngestEntry, Item, Stamp, root_name, stamp_of, walk
from nixcas.errors import DepthError, IngestError, StorageError, ValidationError

if TYPE_CHECKING:
    from nixcas.castore.walkproc import WalkProcess

__all__ = [
    "IngestEntry",
    "Progress",
    "Stamp",
    "WalkObserver",
    "ingest_entries",
    "ingest_path",
    "stamp_of",
]


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
        pending = entry.node
        node: Node
        if pending is None:
            node = await self._directory(path)
        elif type(pending) is PendingFile:
            node = pending.ready() or await pending.node()
        else:
            node = pending  # type: ignore[assignment]  # not a PendingFile (checked by type, the fastest test)
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

    async def _directory(self, path: TreePath) -> Node:
        """Store the Directory at ``path`` from its children (all added before it)."""
        children = self._pending.pop(path, [])
        try:
            directory = Directory(children)
        except ValidationError as e:
            raise IngestError(f"{_show(path)}: {e}") from None
        if self._putter is None:
            self._putter = self._directories.put_multiple_start()
        await self._putter.put(directory)
        return directory.node(self._directories.size_rule)

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


def _stream_blocking(uploader: Uploader, read: Callable[[int], bytes], size: int, what: str) -> Awaitable[B3Digest]:
    """:meth:`Uploader.stream` from a blocking ``read``, each call on a worker thread; nothing may follow."""

    def read_off_loop(n: int) -> Awaitable[bytes]:
        return asyncio.to_thread(read, n)

    return uploader.stream(size, read_off_loop, what, check_end=True)


async def _upload_large(uploader: Uploader, item: FileItem) -> B3Digest:
    """Stream a large file, checking that it still has the stamp the walk saw, before and after."""
    where = os.fsdecode(item.fs_path)
    changed = IngestError(f"{where}: changed while being imported; retry")
    try:
        f = await asyncio.to_thread(open, item.fs_path, "rb")
    except OSError as e:
        raise IngestError(f"{where}: cannot read: {e.strerror}") from None
    try:
        if stamp_of(os.fstat(f.fileno())) != item.stamp:
            raise changed
        digest = await _stream_blocking(uploader, f.read, item.size, f"{where} (changed while being imported)")
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
    return digest


def _hand_over(uploader: Uploader, item: Item) -> IngestEntry:
    """The entry of one walked item, its contents handed to the uploader."""
    if isinstance(item, IngestEntry):
        return item
    data, item.data = item.data, None  # the uploader holds the bytes until they are stored
    if data is not None:
        if item.digest is not None:
            return IngestEntry(item.path, uploader.small_hashed(B3Digest(item.digest), data, item.executable))
        return IngestEntry(item.path, uploader.small(data, item.executable))
    return IngestEntry(
        item.path, uploader.large(item.size, item.executable, functools.partial(_upload_large, uploader, item))
    )


async def _entries_from_walk(
    root: bytes, uploader: Uploader, observer: WalkObserver | None = None
) -> AsyncGenerator[list[IngestEntry], None]:
    """The walk's entries, a batch at a time: read in a worker thread, uploads started, in walk order."""
    batches = walk(root, TreePath(None, root_name(root)), observer)
    while (batch := await asyncio.to_thread(next, batches, None)) is not None:
        entries = [_hand_over(uploader, item) for item in batch]
        uploader.flush()  # one batch per hand-off: the consumer waits for these files next
        await uploader.room()
        yield entries


async def _entries_from_process(
    walker: WalkProcess, uploader: Uploader, views: bool
) -> AsyncGenerator[list[IngestEntry], None]:
    """The entries of a walk in another process, a batch at a time, each slot handed back once stored.

    ``views``: the blob service stores views of the shared slot as they are; else each small file is
    copied out first (and the slot handed back at once).
    """
    while (handed := await asyncio.to_thread(walker.next_batch)) is not None:
        slot, batch = handed
        if not views:
            for item in batch:
                if isinstance(item, FileItem) and isinstance(item.data, memoryview):
                    item.data = bytes(item.data)
        entries = [_hand_over(uploader, item) for item in batch]
        # one batch per hand-off (as above); its slot is the child's again once nothing of it is held
        uploader.when_stored(functools.partial(walker.release, slot))
        await uploader.room()
        yield entries


async def ingest_path(
    path: str | os.PathLike[str] | bytes,
    blobs: BlobService,
    directories: DirectoryService,
    *,
    progress: Progress | None = None,
    observer: WalkObserver | None = None,
    walker: WalkProcess | None = None,
) -> Node:
    """Import a file, symlink or directory tree; return its root node.

    A root symlink is imported as a symlink.  Errors name the offending path;
    on error no Directory is stored (blobs already uploaded stay, unreferenced).
    ``observer`` sees the tree in canonical order as it is read (:class:`WalkObserver`).
    ``walker``: the walk of ``path`` already running in a process of its own
    (:class:`~nixcas.castore.walkproc.WalkProcess`, with its own observer), closed here.
    """
    root = os.fsencode(Path(os.fsdecode(path)))
    try:
        async with Uploader(blobs, progress) as uploader:

            async def before_commit() -> None:
                await uploader.finish()
                await blobs.sync()

            if walker is None:
                entries = run_ahead(_entries_from_walk(root, uploader, observer))
            else:
                if walker.root != root or observer is not None:
                    raise ValueError("a walk process walks its own root, with its own observer")
                entries = run_ahead(_entries_from_process(walker, uploader, blobs.accepts_views))
            async with contextlib.aclosing(entries):
                return await ingest_entries(entries, directories, before_commit=before_commit)
    finally:
        if walker is not None:
            walker.close()

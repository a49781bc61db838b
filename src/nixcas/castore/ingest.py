"""Turning a filesystem tree (or any post-order entry stream) into castore nodes.

:func:`ingest_entries` is the generic core: it consumes entries children
before parents, builds each Directory when its own entry arrives, validates
the closure as it goes and commits it in one step at the end.
:func:`ingest_path` feeds it from a filesystem walk: symlinks are not
followed, the owner-exec bit becomes ``executable``, sockets/FIFOs/devices
are refused with the path named, and so is anything nested deeper than
:data:`~nixcas.castore.nodes.MAX_DEPTH`.  Reading runs in a worker thread; the
contents go to the one uploader of :mod:`nixcas.castore.upload` (small files
in batches, large ones streamed), which bounds the bytes in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import stat
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from nixcas.castore.blob.base import BlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.base import DirectoryPutter, DirectoryService
from nixcas.castore.nodes import MAX_DEPTH, DirectoryNode, Node, SymlinkNode
from nixcas.castore.treepath import TreePath
from nixcas.castore.upload import BATCH_BYTES, BATCH_FILES, SMALL_BLOB, PendingFile, Progress, Uploader, run_ahead
from nixcas.errors import DepthError, IngestError, StorageError, ValidationError

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
    A file still uploading is a :class:`~nixcas.castore.upload.PendingFile`.
    """

    path: TreePath | tuple[bytes, ...]
    node: Node | PendingFile | None


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


def _visit(fs_path: bytes, path: TreePath, st: os.stat_result | None = None) -> _Item | list[bytes]:
    """One filesystem object (``st``: its ``lstat``, if taken): a directory's entry names, or an item for the rest."""
    if st is None:
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
        data = _read_small(fs_path, st.st_size) if st.st_size <= SMALL_BLOB else None
        return _FileItem(path, fs_path, st.st_size, bool(mode & stat.S_IXUSR), data, stamp_of(st))
    kind = (
        "socket" if stat.S_ISSOCK(mode) else
        "FIFO" if stat.S_ISFIFO(mode) else
        "character device" if stat.S_ISCHR(mode) else
        "block device" if stat.S_ISBLK(mode) else
        f"file of mode {mode:o}"
    )  # fmt: skip
    raise IngestError(f"{os.fsdecode(fs_path)}: cannot import a {kind}")


def _walk(fs_path: bytes, path: TreePath, observer: WalkObserver | None = None) -> Iterator[list[_Item]]:
    """Post-order walk without recursion, in batches; small files come with their contents.

    A batch ends after :data:`~nixcas.castore.upload.BATCH_FILES` items or
    :data:`~nixcas.castore.upload.BATCH_BYTES` bytes of small files' contents.

    Deeper than :data:`~nixcas.castore.nodes.MAX_DEPTH` is refused before it is visited.
    Names are visited sorted, so ``observer`` sees the tree in canonical order.  The walk is
    on the critical path of an import and shares the GIL with its other threads, so a
    regular file, by far the most common entry, is handled here without further calls:
    joined path, ``lstat``, its kind, its contents, its item.
    """
    first = _visit(fs_path, path)
    if not isinstance(first, list):
        if observer is not None:
            _observe(observer, None, first)
        yield [first]
        return
    if observer is not None:
        observer.directory(None)
    batch: list[_Item] = []
    size = 0
    file_seen = observer.file if observer is not None else None
    lstat, read_small, s_ifmt, s_ifreg, s_ixusr = os.lstat, _read_small, 0o170000, stat.S_IFREG, stat.S_IXUSR
    stack = [(fs_path.rstrip(b"/") + b"/", path, iter(first))]
    while stack:
        prefix, parent, names = stack[-1]
        for name in names:
            child_fs, child = prefix + name, TreePath(parent, name)
            if child.depth > MAX_DEPTH:
                raise DepthError(f"{child.show()}: nested deeper than the {MAX_DEPTH} levels a tree may have")
            try:
                st = lstat(child_fs)
            except OSError as e:
                raise IngestError(f"{os.fsdecode(child_fs)}: cannot stat: {e.strerror}") from None
            mode = st.st_mode
            if mode & s_ifmt == s_ifreg:  # the common case, inline
                length = st.st_size
                data = read_small(child_fs, length) if length <= SMALL_BLOB else None
                stamp = stamp_of(st)
                executable = bool(mode & s_ixusr)
                if file_seen is not None:
                    file_seen(name, executable, length, data, child_fs, stamp)
                batch.append(_FileItem(child, child_fs, length, executable, data, stamp))
                if data is not None:
                    size += length
            else:
                visited = _visit(child_fs, child, st)
                if isinstance(visited, list):
                    if observer is not None:
                        observer.directory(name)
                    stack.append((child_fs + b"/", child, iter(visited)))
                    break
                if observer is not None:
                    _observe(observer, name, visited)
                batch.append(visited)
            if len(batch) >= BATCH_FILES or size >= BATCH_BYTES:
                yield batch
                batch, size = [], 0
        else:  # the directory is done
            stack.pop()
            if observer is not None:
                observer.leave()
            batch.append(IngestEntry(parent, None))
            if len(batch) >= BATCH_FILES:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


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
            data = os.read(fd, size + 1)  # size bytes of the size + 1 asked for: the end (a regular file's read)
            while len(data) < size and (more := os.read(fd, size + 1 - len(data))):
                data += more
        finally:
            os.close(fd)
    except OSError as e:
        raise IngestError(f"{os.fsdecode(fs_path)}: cannot read: {e.strerror}") from None
    if len(data) != size:
        raise IngestError(f"{os.fsdecode(fs_path)}: changed while being imported (size {size}, read {len(data)})")
    return data


async def _upload_large(uploader: Uploader, item: _FileItem) -> B3Digest:
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


def _hand_over(uploader: Uploader, item: _Item) -> IngestEntry:
    """The entry of one walked item, its contents handed to the uploader."""
    if isinstance(item, IngestEntry):
        return item
    data, item.data = item.data, None  # the uploader holds the bytes until they are stored
    if data is not None:
        return IngestEntry(item.path, uploader.small(data, item.executable))
    return IngestEntry(
        item.path, uploader.large(item.size, item.executable, functools.partial(_upload_large, uploader, item))
    )


async def _entries_from_walk(
    root: bytes, uploader: Uploader, observer: WalkObserver | None = None
) -> AsyncGenerator[list[IngestEntry], None]:
    """The walk's entries, a batch at a time: read in a worker thread, uploads started, in walk order."""
    name = os.path.basename(os.path.normpath(root)) or b"root"
    batches = _walk(root, TreePath(None, name), observer)
    while (batch := await asyncio.to_thread(next, batches, None)) is not None:
        entries = [_hand_over(uploader, item) for item in batch]
        uploader.flush()  # one batch per hand-off: the consumer waits for these files next
        await uploader.room()
        yield entries


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
    async with Uploader(blobs, progress) as uploader:

        async def before_commit() -> None:
            await uploader.finish()
            await blobs.sync()

        entries = run_ahead(_entries_from_walk(root, uploader, observer))
        async with contextlib.aclosing(entries):
            return await ingest_entries(entries, directories, before_commit=before_commit)

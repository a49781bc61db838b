"""The filesystem walk of an import: post-order, names sorted, small files read, in batches.

:func:`walk` is what :func:`~nixcas.castore.ingest.ingest_path` reads a tree
with, on a thread of its own or in a process of its own
(:mod:`nixcas.castore.walkproc`).  It loads nothing but the data model, so
that a walking process starts at once.
"""

from __future__ import annotations

import os
import stat

from nixcas._record import Record
from nixcas.castore.nodes import MAX_DEPTH, SymlinkNode
from nixcas.castore.treepath import TreePath
from nixcas.errors import DepthError, IngestError, ValidationError

TYPE_CHECKING = False  # not typing's: a walking process loads nothing else of it
if TYPE_CHECKING:
    from collections.abc import Iterator

    from nixcas.castore.ingest import WalkObserver
    from nixcas.castore.nodes import Node
    from nixcas.castore.upload import PendingFile

__all__ = [
    "BATCH_BYTES",
    "BATCH_FILES",
    "SMALL_BLOB",
    "FileItem",
    "IngestEntry",
    "Item",
    "Stamp",
    "observe",
    "read_small",
    "root_name",
    "stamp_of",
    "visit",
    "walk",
]

SMALL_BLOB = 256 << 10
"""Files up to this size are read whole and uploaded in batches; larger ones stream."""
BATCH_FILES = 2048
"""Small files per ``put_many`` (the packed store writes a batch with one ``pwritev`` and one ``fsync``)."""
BATCH_BYTES = 16 << 20
"""Bytes per ``put_many``."""

Stamp = tuple[int, int, int, int, int]
"""A file's identity and version: device, inode, size, mtime and ctime (ns).  Any write, and
any attempt to set the mtime back, changes the ctime: equal stamps mean unchanged contents."""


def stamp_of(st: os.stat_result) -> Stamp:
    """The :data:`Stamp` of a ``stat`` result."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class IngestEntry(Record):
    """One filesystem object, by path relative to the parent of the root.

    ``node`` is ``None`` for a directory, whose node is built from the
    entries that came before it.  The path is a :class:`~nixcas.castore.treepath.TreePath`
    whose root is the root entry (producers share each directory's path among
    its children: memory linear in the depth), or a tuple of names (root first).
    A file still uploading is a :class:`~nixcas.castore.upload.PendingFile`.
    """

    __slots__ = ("node", "path")
    __match_args__ = ("path", "node")
    path: TreePath | tuple[bytes, ...]
    node: Node | PendingFile | None

    def __init__(self, path: TreePath | tuple[bytes, ...], node: Node | PendingFile | None) -> None:
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "node", node)


class FileItem:
    """A regular file as the walk saw it; ``data`` is its contents if it is small (until handed over)."""

    __slots__ = ("data", "digest", "executable", "fs_path", "path", "size", "stamp")

    def __init__(
        self,
        path: TreePath,
        fs_path: bytes,
        size: int,
        executable: bool,
        data: bytes | memoryview | None,
        stamp: Stamp,
        digest: bytes | None = None,
    ) -> None:
        self.path = path
        self.fs_path = fs_path
        self.size = size
        self.executable = executable
        self.data = data
        self.stamp = stamp  # as the walk saw it: a large file's two reads (upload, observer) must see it unchanged
        self.digest = digest  # the BLAKE3 of ``data``, if the walk's process computed it


Item = IngestEntry | FileItem
"""What the walk yields: a file, or the entry of a symlink or of a directory (after its children)."""


def root_name(fs_path: bytes) -> bytes:
    """The name a walk of ``fs_path`` gives its root: the last component (``root`` for ``/``)."""
    return os.path.basename(os.path.normpath(fs_path)) or b"root"


def visit(fs_path: bytes, path: TreePath, st: os.stat_result | None = None) -> Item | list[bytes]:
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
        data = read_small(fs_path, st.st_size) if st.st_size <= SMALL_BLOB else None
        return FileItem(path, fs_path, st.st_size, bool(mode & stat.S_IXUSR), data, stamp_of(st))
    kind = (
        "socket" if stat.S_ISSOCK(mode) else
        "FIFO" if stat.S_ISFIFO(mode) else
        "character device" if stat.S_ISCHR(mode) else
        "block device" if stat.S_ISBLK(mode) else
        f"file of mode {mode:o}"
    )  # fmt: skip
    raise IngestError(f"{os.fsdecode(fs_path)}: cannot import a {kind}")


def walk(fs_path: bytes, path: TreePath, observer: WalkObserver | None = None) -> Iterator[list[Item]]:
    """Post-order walk without recursion, in batches; small files come with their contents.

    A batch ends after :data:`BATCH_FILES` items or :data:`BATCH_BYTES` bytes of small files' contents.

    Deeper than :data:`~nixcas.castore.nodes.MAX_DEPTH` is refused before it is visited.
    Names are visited sorted, so ``observer`` sees the tree in canonical order.  The walk is
    on the critical path of an import and shares the GIL with its other threads, so a
    regular file, by far the most common entry, is handled here without further calls:
    joined path, ``lstat``, its kind, its contents, its item.
    """
    first = visit(fs_path, path)
    if not isinstance(first, list):
        if observer is not None:
            observe(observer, None, first)
        yield [first]
        return
    if observer is not None:
        observer.directory(None)
    batch: list[Item] = []
    size = 0
    file_seen = observer.file if observer is not None else None
    lstat, read, s_ifmt, s_ifreg, s_ixusr = os.lstat, read_small, 0o170000, stat.S_IFREG, stat.S_IXUSR
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
                data = read(child_fs, length) if length <= SMALL_BLOB else None
                stamp = stamp_of(st)
                executable = bool(mode & s_ixusr)
                if file_seen is not None:
                    file_seen(name, executable, length, data, child_fs, stamp)
                batch.append(FileItem(child, child_fs, length, executable, data, stamp))
                if data is not None:
                    size += length
            else:
                visited = visit(child_fs, child, st)
                if isinstance(visited, list):
                    if observer is not None:
                        observer.directory(name)
                    stack.append((child_fs + b"/", child, iter(visited)))
                    break
                if observer is not None:
                    observe(observer, name, visited)
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


def observe(observer: WalkObserver, name: bytes | None, item: Item) -> None:
    """Show ``observer`` a file or symlink (``name``: ``None`` for the root)."""
    if isinstance(item, FileItem):
        data = item.data
        assert not isinstance(data, memoryview)  # the walk's own bytes
        observer.file(name, item.executable, item.size, data, item.fs_path, item.stamp)
    elif isinstance(item.node, SymlinkNode):
        observer.symlink(name, item.node.target)


def read_small(fs_path: bytes, size: int) -> bytes:
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

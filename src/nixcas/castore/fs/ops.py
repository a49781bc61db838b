"""The operations of the read-only castore filesystem, independent of the transport.

:class:`FsCore` answers what a FUSE kernel asks (lookup, getattr, readdir,
open, read, xattrs, ...) from a :class:`RootNodes`, a
:class:`DirectoryService` and a :class:`BlobService`.  It knows nothing of
how requests arrive: the FUSE mount (:mod:`.fuse`) and the virtio-fs
backend (:mod:`.virtiofs`) both call it (through :mod:`.fuseproto`), so inode numbering, shared
inodes, extended attributes, lazy fetching, read-ahead and verification
are the same whichever way a filesystem is served.

A failure is :class:`FsError` carrying the errno to answer with (the
transports translate it to their own error reply).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import signal
import stat
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from nixcas.castore.blob.base import READ_BLOCK, BlobService
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.fs.directories import DirectoryFetcher
from nixcas.castore.fs.inodes import ROOT_INODE, Inode, InodeTable
from nixcas.castore.fs.reader import ChunkedFile, ReadAhead
from nixcas.castore.fs.roots import RootNodes
from nixcas.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode, validate_name
from nixcas.errors import NixcasError

__all__ = [
    "BLKSIZE",
    "CACHE_TIMEOUT",
    "CHUNKED_FROM",
    "MTIME_NS",
    "XATTR_NAMES",
    "Attributes",
    "FsCore",
    "FsError",
    "signals_while_serving",
]

log = logging.getLogger("nixcas.fs")

T = TypeVar("T")

CACHE_TIMEOUT = float(1 << 31)
"""Seconds the kernel may cache entries and attributes: everything below the root is immutable."""

BLKSIZE = 128 << 10
"""``st_blksize``: the I/O size tools like ``cat`` and ``cp`` use for their reads."""

CHUNKED_FROM = 2 * READ_BLOCK
"""Files of at least this size (2 MiB) are read chunk by chunk when the store keeps them chunked
(:class:`ChunkedFile`: parallel fetches); smaller ones skip asking for the chunk list."""

MTIME_NS = 1_000_000_000
"""Every node's times: 1 s after the epoch, as in the Nix store (snix does the same)."""

XATTR_NAMES = {
    "directory": (b"user.tvix.castore.directory.digest", b"user.snix.castore.directory.digest"),
    "file": (b"user.tvix.castore.blob.digest", b"user.snix.castore.blob.digest"),
}
"""The extended attributes of directories and files (``show_xattr``): the tvix name, then the snix name."""

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT
"""``open`` flags that ask for writing: ``EROFS``."""


class FsError(Exception):
    """An operation's answer is the error ``errno``."""

    def __init__(self, code: int) -> None:
        super().__init__(code, os.strerror(code))
        self.errno = code


class Missing(NixcasError):
    """Content a node refers to is not in the store."""


@dataclass(frozen=True, slots=True)
class Attributes:
    """What ``stat`` shows of an inode (every time is :data:`MTIME_NS`, except the root's 0)."""

    ino: int
    mode: int
    size: int
    blocks: int
    time_ns: int
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    blksize: int = BLKSIZE


class RootListing:
    """An open listing of the root: entries pulled from :meth:`RootNodes.list` as the kernel asks.

    Only entries from the last offset asked for on are kept; an earlier offset
    (``rewinddir``) restarts the stream, so a listing of a huge root holds
    little memory.
    """

    def __init__(self, roots: RootNodes) -> None:
        self._roots = roots
        self._stream = roots.list()
        self._base = 0
        """The index of ``_entries[0]`` in the stream."""
        self._entries: list[tuple[bytes, Node]] = []
        self._done = False

    async def entry(self, index: int) -> tuple[bytes, Node] | None:
        """The ``index``-th entry of the listing, or ``None`` past its end."""
        if index < self._base:
            await self.close()
            self._stream, self._base, self._entries, self._done = self._roots.list(), 0, [], False
        while self._base + len(self._entries) <= index and not self._done:
            try:
                self._entries.append(await anext(self._stream))
            except StopAsyncIteration:
                self._done = True
        if index >= self._base + len(self._entries):
            return None
        return self._entries[index - self._base]

    def forget_before(self, index: int) -> None:
        """Entries before ``index`` will not be asked for again (short of a rewind)."""
        drop = min(max(0, index - self._base), len(self._entries))
        del self._entries[:drop]
        self._base += drop

    async def close(self) -> None:
        aclose = getattr(self._stream, "aclose", None)
        if aclose is not None:
            await aclose()


@dataclass(eq=False)
class DirHandle:
    inode: Inode


@dataclass(eq=False)
class FileHandle:
    inode: Inode
    reader: ReadAhead | ChunkedFile


Handle = RootListing | DirHandle | FileHandle

Emit = Callable[[bytes, Inode, int], bool]
"""A readdir sink: ``(name, inode, next_offset)``; False when the reply is full (the entry did not fit)."""


class FsCore:
    """The read-only castore filesystem's operations, by inode and handle number."""

    def __init__(
        self,
        roots: RootNodes,
        blobs: BlobService,
        directories: DirectoryService,
        *,
        list_root: bool = False,
        show_xattr: bool = False,
    ) -> None:
        self.roots = roots
        self.blobs = blobs
        self.directories = directories
        self.list_root = list_root
        self.show_xattr = show_xattr
        self.inodes = InodeTable()
        self.fetcher = DirectoryFetcher(directories)
        self.handles: dict[int, Handle] = {}
        self._handle_ids = itertools.count(1)

    # -- helpers -------------------------------------------------------------------

    def inode(self, ino: int) -> Inode:
        """The live inode ``ino`` (``ENOENT`` if the kernel forgot it or never saw it)."""
        inode = self.inodes.get(ino)
        if inode is None:
            raise FsError(errno.ENOENT)
        return inode

    def _handle(self, fh: int) -> Handle:
        handle = self.handles.get(fh)
        if handle is None:
            raise FsError(errno.EBADF)
        return handle

    def _add_handle(self, handle: Handle) -> int:
        fh = next(self._handle_ids)
        self.handles[fh] = handle
        return fh

    @staticmethod
    async def guard(what: str, inode: Inode | None, op: Awaitable[T]) -> T:
        """Await ``op``; a store failure is logged with the path and answered with ``EIO``."""
        try:
            return await op
        except FsError:
            raise
        except (NixcasError, OSError) as e:
            where = inode.show_path() if inode is not None else "/"
            log.error("%s %s: %s", what, where, e)
            raise FsError(errno.EIO) from None
        except Exception:
            where = inode.show_path() if inode is not None else "/"
            log.exception("%s %s: unexpected error", what, where)
            raise FsError(errno.EIO) from None

    @staticmethod
    def attributes(inode: Inode) -> Attributes:
        """The attributes of ``inode`` (st_size of a directory: its ``size`` field)."""
        node = inode.node
        if node is None:
            mode, size = stat.S_IFDIR | 0o555, 0
        elif isinstance(node, DirectoryNode):
            mode, size = stat.S_IFDIR | 0o555, node.size
        elif isinstance(node, FileNode):
            mode, size = stat.S_IFREG | (0o555 if node.executable else 0o444), node.size
        else:
            mode, size = stat.S_IFLNK | 0o777, len(node.target)
        return Attributes(
            ino=inode.ino, mode=mode, size=size, blocks=(size + 511) // 512, time_ns=0 if node is None else MTIME_NS
        )

    async def directory(self, inode: Inode) -> Directory:
        """The entries of a directory inode, fetched on first use (concurrent callers share the fetch)."""
        if inode.directory is not None:
            return inode.directory
        node = inode.node
        if not isinstance(node, DirectoryNode):
            raise FsError(errno.ENOTDIR)
        if inode.loading is None:
            inode.loading = asyncio.ensure_future(self._fetch_directory(node))
        loading = inode.loading
        try:
            directory = await asyncio.shield(loading)
        except BaseException:
            if inode.loading is loading and loading.done():
                inode.loading = None  # a later access tries again
            raise
        inode.directory = directory
        inode.loading = None
        return directory

    async def _fetch_directory(self, node: DirectoryNode) -> Directory:
        directory = await self.fetcher.get(node)
        if directory is None:
            raise Missing(f"directory {node.digest} not found")
        return directory

    def _entry(self, parent: Inode, name: bytes, node: Node) -> Inode:
        return self.inodes.ref(node, parent.path.child(name))

    # -- lookups and attributes ------------------------------------------------------

    async def lookup(self, parent_ino: int, name: bytes) -> Inode:
        """The inode called ``name`` in ``parent_ino``, with one more kernel reference."""
        parent = self.inode(parent_ino)
        try:
            validate_name(name)
        except NixcasError:
            raise FsError(errno.ENOENT) from None
        if parent.ino == ROOT_INODE:
            node = await self.guard(f"lookup {name!r} in", parent, self.roots.get_by_basename(name))
        else:
            directory = await self.guard("reading directory", parent, self.directory(parent))
            node = directory.get(name)
        if node is None:
            raise FsError(errno.ENOENT)
        return self._entry(parent, name, node)

    def forget(self, ino: int, count: int) -> None:
        self.inodes.forget(ino, count)

    def readlink(self, ino: int) -> bytes:
        node = self.inode(ino).node
        if node is None:  # the root (reference §8.4)
            raise FsError(errno.ENOSYS)
        if not isinstance(node, SymlinkNode):
            raise FsError(errno.EINVAL)
        return node.target

    # -- directories ---------------------------------------------------------------

    def opendir(self, ino: int) -> int:
        dir_inode = self.inode(ino)
        if dir_inode.ino == ROOT_INODE:
            if not self.list_root:
                raise FsError(errno.EPERM)
            return self._add_handle(RootListing(self.roots))
        if not isinstance(dir_inode.node, DirectoryNode):
            raise FsError(errno.ENOTDIR)
        return self._add_handle(DirHandle(dir_inode))

    async def readdir(self, fh: int, start_id: int, emit: Emit) -> None:
        """Hand ``emit`` the entries from ``start_id`` on (each with a new reference) until it says full.

        The entry that did not fit loses its reference again.
        """
        handle = self._handle(fh)
        if isinstance(handle, RootListing):
            root = self.inodes.root
            handle.forget_before(start_id)
            index = start_id
            while entry := await self.guard("listing", root, handle.entry(index)):
                if not self._emit(emit, root, *entry, index + 1):
                    return
                index += 1
        elif isinstance(handle, DirHandle):
            directory = await self.guard("reading directory", handle.inode, self.directory(handle.inode))
            for index, (name, node) in enumerate(directory.entries[start_id:], start_id):
                if not self._emit(emit, handle.inode, name, node, index + 1):
                    return
        else:
            raise FsError(errno.ENOTDIR)

    def _emit(self, emit: Emit, parent: Inode, name: bytes, node: Node, next_id: int) -> bool:
        inode = self._entry(parent, name, node)
        if emit(name, inode, next_id):
            return True
        self.inodes.forget(inode.ino, 1)
        return False

    async def releasedir(self, fh: int) -> None:
        handle = self.handles.pop(fh, None)
        if isinstance(handle, RootListing):
            await self.guard("closing listing of", self.inodes.root, handle.close())

    # -- files ---------------------------------------------------------------------------

    async def open(self, ino: int, flags: int) -> int:
        file_inode = self.inode(ino)
        node = file_inode.node
        if node is None:  # the root (reference §8.4)
            raise FsError(errno.ENOSYS)
        if isinstance(node, DirectoryNode | SymlinkNode):
            raise FsError(errno.EISDIR)
        if flags & WRITE_FLAGS:
            raise FsError(errno.EROFS)
        name = f"{file_inode.show_path()} (blob {node.digest})"
        reader = await self.guard("opening", file_inode, self._open_blob(node, name))
        return self._add_handle(FileHandle(file_inode, reader))

    async def _open_blob(self, node: FileNode, name: str) -> ReadAhead | ChunkedFile:
        """A chunked blob of :data:`CHUNKED_FROM` or more as its chunks (if the service allows); else one stream."""
        if node.size >= CHUNKED_FROM and self.blobs.chunk_reads:
            chunks = await self.blobs.chunks(node.digest)
            if chunks is None:
                raise Missing(f"blob {node.digest} not found")
            if len(chunks) >= 2:
                if (total := sum(c.size for c in chunks)) != node.size:
                    raise Missing(f"blob {node.digest}: its chunks add up to {total} bytes, the file has {node.size}")
                return ChunkedFile(self.blobs, node.digest, chunks, name=name)
        reader = await self.blobs.open_read(node.digest)
        if reader is None:
            raise Missing(f"blob {node.digest} not found")
        return ReadAhead(reader, node.size, name=name)

    async def read(self, fh: int, off: int, size: int) -> list[bytes | memoryview]:
        """Up to ``size`` bytes at ``off``, as the pieces of the blob that hold them (a transport writes them
        out as they are: views of the chunks read, no copy)."""
        handle = self._handle(fh)
        if not isinstance(handle, FileHandle):
            raise FsError(errno.EISDIR)
        return await self.guard(
            f"reading {size} bytes at {off} of", handle.inode, handle.reader.pread_pieces(off, size)
        )

    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh, None)
        if isinstance(handle, FileHandle):
            await self.guard("closing", handle.inode, handle.reader.close())

    # -- extended attributes --------------------------------------------------------------

    def _xattrs(self, inode: Inode) -> dict[bytes, bytes]:
        node = inode.node
        if isinstance(node, DirectoryNode):
            tvix, snix = XATTR_NAMES["directory"]
        elif isinstance(node, FileNode):
            tvix, snix = XATTR_NAMES["file"]
        else:
            return {}
        return {tvix: node.digest.b3().encode(), snix: node.digest.blake3().encode()}

    def getxattr(self, ino: int, name: bytes) -> bytes:
        if not self.show_xattr:
            raise FsError(errno.ENOSYS)
        value = self._xattrs(self.inode(ino)).get(name)
        if value is None:
            raise FsError(errno.ENODATA)
        return value

    def listxattr(self, ino: int) -> list[bytes]:
        if not self.show_xattr:
            raise FsError(errno.ENOSYS)
        return list(self._xattrs(self.inode(ino)))

    # -- state -----------------------------------------------------------------------------

    def stats(self) -> str:
        """What the filesystem holds in memory (logged on SIGUSR1 and at the end of a session)."""
        files = sum(isinstance(h, FileHandle) for h in self.handles.values())
        return (
            f"{len(self.inodes)} inodes, {len(self.fetcher)} directories fetched ahead, "
            f"{files} open files, {len(self.handles) - files} open directories"
        )

    async def close(self) -> None:
        """Close every open file and listing (after the session ended)."""
        handles, self.handles = self.handles, {}
        for handle in handles.values():
            if isinstance(handle, FileHandle):
                await self.guard("closing", handle.inode, handle.reader.close())
            elif isinstance(handle, RootListing):
                await self.guard("closing listing of", self.inodes.root, handle.close())

    def reset(self) -> None:
        """Forget every inode but the root (a new kernel session knows none); open handles stay until :meth:`close`."""
        self.inodes = InodeTable()


@contextlib.contextmanager
def signals_while_serving(core: FsCore, stop: Callable[[], object], logger: logging.Logger) -> Iterator[None]:
    """While serving ``core`` on the running loop: SIGINT and SIGTERM call ``stop``, SIGUSR1 logs what it holds.

    Both transports (the FUSE mount and virtio-fs) serve under this; the handlers go when it ends.
    """
    loop = asyncio.get_running_loop()
    ending = (signal.SIGINT, signal.SIGTERM)
    try:
        for sig in ending:
            loop.add_signal_handler(sig, stop)
        loop.add_signal_handler(signal.SIGUSR1, lambda: logger.info("holding %s", core.stats()))
        yield
    finally:
        for sig in (*ending, signal.SIGUSR1):
            loop.remove_signal_handler(sig)

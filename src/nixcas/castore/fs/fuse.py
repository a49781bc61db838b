"""A read-only FUSE filesystem over castore nodes (pyfuse3, libfuse3, asyncio).

:class:`CastoreFs` answers the kernel's requests from a :class:`RootNodes`
(what the root holds), a :class:`DirectoryService` (directories, fetched on
first access) and a :class:`BlobService` (file contents, opened on ``open``
and read through :class:`ReadAhead`).  :func:`serve` mounts it and runs
until the filesystem is unmounted or the process gets SIGINT/SIGTERM.

Semantics follow tvix/snix (reference §8): invalid or unknown names are
``ENOENT``; a directory or blob the store cannot deliver is ``EIO``;
listing the root without ``list_root`` is ``EPERM``; ``readlink`` of a
non-symlink is ``EINVAL``; opening a directory is ``EISDIR``; extended
attributes are offered only with ``show_xattr`` (else ``ENOSYS``, which
the kernel remembers) and a name other than the digest ones is
``ENODATA``.  Everything is immutable, so the kernel may cache entries,
attributes and file pages for as long as it likes.  Every failure is logged
with the path it concerns.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import re
import signal
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import pyfuse3
import pyfuse3.asyncio

from nixcas.castore.blob.base import READ_BLOCK, BlobService
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.fs.directories import DirectoryFetcher
from nixcas.castore.fs.inodes import ROOT_INODE, Inode, InodeTable
from nixcas.castore.fs.reader import ChunkedFile, ReadAhead
from nixcas.castore.fs.roots import RootNodes
from nixcas.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode, validate_name
from nixcas.errors import NixcasError

__all__ = ["CACHE_TIMEOUT", "XATTR_NAMES", "CastoreFs", "serve"]

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

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


class _Missing(NixcasError):
    """Content a node refers to is not in the store."""


def _fail(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


class _RootListing:
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
class _DirHandle:
    inode: Inode


@dataclass(eq=False)
class _FileHandle:
    inode: Inode
    reader: ReadAhead | ChunkedFile


class CastoreFs(pyfuse3.Operations):
    """The pyfuse3 operations of a read-only castore mount."""

    supports_dot_lookup = False  # no NFS export: the kernel never looks up '.' or '..'

    def __init__(
        self,
        roots: RootNodes,
        blobs: BlobService,
        directories: DirectoryService,
        *,
        list_root: bool = False,
        show_xattr: bool = False,
    ) -> None:
        super().__init__()
        self.roots = roots
        self.blobs = blobs
        self.directories = directories
        self.list_root = list_root
        self.show_xattr = show_xattr
        self.inodes = InodeTable()
        self.fetcher = DirectoryFetcher(directories)
        self.handles: dict[int, _RootListing | _DirHandle | _FileHandle] = {}
        self._handle_ids = itertools.count(1)
        self.after_init: Callable[[], None] | None = None
        """Called once the kernel has taken the answer to its INIT request (it then applies its settings)."""

    def init(self) -> None:
        # libfuse answers INIT right after this returns, within the same step of the loop.
        if self.after_init is not None:
            asyncio.get_running_loop().call_soon(self.after_init)

    # -- helpers -------------------------------------------------------------------

    def _inode(self, ino: int) -> Inode:
        inode = self.inodes.get(ino)
        if inode is None:
            raise _fail(errno.ENOENT)
        return inode

    def _handle(self, fh: int) -> _RootListing | _DirHandle | _FileHandle:
        handle = self.handles.get(fh)
        if handle is None:
            raise _fail(errno.EBADF)
        return handle

    def _add_handle(self, handle: _RootListing | _DirHandle | _FileHandle) -> int:
        fh = next(self._handle_ids)
        self.handles[fh] = handle
        return fh

    @staticmethod
    async def _guard(what: str, inode: Inode | None, op: Awaitable[T]) -> T:
        """Await ``op``; a store failure is logged with the path and answered with ``EIO``."""
        try:
            return await op
        except pyfuse3.FUSEError:
            raise
        except (NixcasError, OSError) as e:
            where = inode.show_path() if inode is not None else "/"
            log.error("%s %s: %s", what, where, e)
            raise _fail(errno.EIO) from None
        except Exception:
            where = inode.show_path() if inode is not None else "/"
            log.exception("%s %s: unexpected error", what, where)
            raise _fail(errno.EIO) from None

    def attributes(self, inode: Inode) -> pyfuse3.EntryAttributes:
        """The attributes of ``inode`` (st_size of a directory: its ``size`` field)."""
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode.ino
        attrs.generation = 0
        attrs.entry_timeout = CACHE_TIMEOUT
        attrs.attr_timeout = CACHE_TIMEOUT
        attrs.st_nlink = 1
        attrs.st_uid = 0
        attrs.st_gid = 0
        attrs.st_blksize = BLKSIZE
        node = inode.node
        if node is None:
            attrs.st_mode = stat.S_IFDIR | 0o555
            attrs.st_size = 0
        elif isinstance(node, DirectoryNode):
            attrs.st_mode = stat.S_IFDIR | 0o555
            attrs.st_size = node.size
        elif isinstance(node, FileNode):
            attrs.st_mode = stat.S_IFREG | (0o555 if node.executable else 0o444)
            attrs.st_size = node.size
        else:
            attrs.st_mode = stat.S_IFLNK | 0o777
            attrs.st_size = len(node.target)
        attrs.st_blocks = (attrs.st_size + 511) // 512
        if node is not None:
            attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = MTIME_NS
        return attrs

    async def _directory(self, inode: Inode) -> Directory:
        """The entries of a directory inode, fetched on first use (concurrent callers share the fetch)."""
        if inode.directory is not None:
            return inode.directory
        node = inode.node
        if not isinstance(node, DirectoryNode):
            raise _fail(errno.ENOTDIR)
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
            raise _Missing(f"directory {node.digest} not found")
        return directory

    def _entry(self, parent: Inode, name: bytes, node: Node) -> Inode:
        return self.inodes.ref(node, parent.path.child(name))

    # -- lookups and attributes ------------------------------------------------------

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        parent = self._inode(parent_inode)
        try:
            validate_name(name)
        except NixcasError:
            raise _fail(errno.ENOENT) from None
        if parent.ino == ROOT_INODE:
            node = await self._guard(f"lookup {name!r} in", parent, self.roots.get_by_basename(name))
        else:
            directory = await self._guard("reading directory", parent, self._directory(parent))
            node = directory.get(name)
        if node is None:
            raise _fail(errno.ENOENT)
        return self.attributes(self._entry(parent, name, node))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            self.inodes.forget(ino, count)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self.attributes(self._inode(inode))

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> bytes:
        node = self._inode(inode).node
        if node is None:  # the root (reference §8.4)
            raise _fail(errno.ENOSYS)
        if not isinstance(node, SymlinkNode):
            raise _fail(errno.EINVAL)
        return node.target

    async def statfs(self, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = BLKSIZE
        data.f_namemax = 255
        return data

    # -- directories ---------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> int:
        dir_inode = self._inode(inode)
        if dir_inode.ino == ROOT_INODE:
            if not self.list_root:
                raise _fail(errno.EPERM)
            return self._add_handle(_RootListing(self.roots))
        if not isinstance(dir_inode.node, DirectoryNode):
            raise _fail(errno.ENOTDIR)
        return self._add_handle(_DirHandle(dir_inode))

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._handle(fh)
        if isinstance(handle, _RootListing):
            root = self.inodes.root
            handle.forget_before(start_id)
            index = start_id
            while entry := await self._guard("listing", root, handle.entry(index)):
                if not self._reply(token, root, *entry, index + 1):
                    return
                index += 1
        elif isinstance(handle, _DirHandle):
            directory = await self._guard("reading directory", handle.inode, self._directory(handle.inode))
            for index, (name, node) in enumerate(directory.entries[start_id:], start_id):
                if not self._reply(token, handle.inode, name, node, index + 1):
                    return
        else:
            raise _fail(errno.ENOTDIR)

    def _reply(self, token: pyfuse3.ReaddirToken, parent: Inode, name: bytes, node: Node, next_id: int) -> bool:
        """One readdirplus entry; the kernel holds a reference to it only if it fit."""
        inode = self._entry(parent, name, node)
        if pyfuse3.readdir_reply(token, name, self.attributes(inode), next_id):
            return True
        self.inodes.forget(inode.ino, 1)
        return False

    async def releasedir(self, fh: int) -> None:
        handle = self.handles.pop(fh, None)
        if isinstance(handle, _RootListing):
            await self._guard("closing listing of", self.inodes.root, handle.close())

    # -- files ---------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.FileInfo:
        file_inode = self._inode(inode)
        node = file_inode.node
        if node is None:  # the root (reference §8.4)
            raise _fail(errno.ENOSYS)
        if isinstance(node, DirectoryNode | SymlinkNode):
            raise _fail(errno.EISDIR)
        if flags & _WRITE_FLAGS:
            raise _fail(errno.EROFS)
        name = f"{file_inode.show_path()} (blob {node.digest})"
        reader = await self._guard("opening", file_inode, self._open_blob(node, name))
        fh = self._add_handle(_FileHandle(file_inode, reader))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def _open_blob(self, node: FileNode, name: str) -> ReadAhead | ChunkedFile:
        """A chunked blob of :data:`CHUNKED_FROM` or more as its chunks (if the service allows); else one stream."""
        if node.size >= CHUNKED_FROM and self.blobs.chunk_reads:
            chunks = await self.blobs.chunks(node.digest)
            if chunks is None:
                raise _Missing(f"blob {node.digest} not found")
            if len(chunks) >= 2:
                if (total := sum(c.size for c in chunks)) != node.size:
                    raise _Missing(f"blob {node.digest}: its chunks add up to {total} bytes, the file has {node.size}")
                return ChunkedFile(self.blobs, node.digest, chunks, name=name)
        reader = await self.blobs.open_read(node.digest)
        if reader is None:
            raise _Missing(f"blob {node.digest} not found")
        return ReadAhead(reader, node.size, name=name)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._handle(fh)
        if not isinstance(handle, _FileHandle):
            raise _fail(errno.EISDIR)
        return await self._guard(f"reading {size} bytes at {off} of", handle.inode, handle.reader.pread(off, size))

    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh, None)
        if isinstance(handle, _FileHandle):
            await self._guard("closing", handle.inode, handle.reader.close())

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

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None) -> bytes:
        if not self.show_xattr:
            raise _fail(errno.ENOSYS)
        value = self._xattrs(self._inode(inode)).get(name)
        if value is None:
            raise _fail(pyfuse3.ENOATTR)
        return value

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> Sequence[bytes]:
        if not self.show_xattr:
            raise _fail(errno.ENOSYS)
        return list(self._xattrs(self._inode(inode)))

    # -- state -----------------------------------------------------------------------------

    def stats(self) -> str:
        """What the mount holds in memory (logged on SIGUSR1 and at unmount)."""
        files = sum(isinstance(h, _FileHandle) for h in self.handles.values())
        return (
            f"{len(self.inodes)} inodes, {len(self.fetcher)} directories fetched ahead, "
            f"{files} open files, {len(self.handles) - files} open directories"
        )

    # -- shutdown -------------------------------------------------------------------------

    async def close(self) -> None:
        """Close every open file and listing (after the session ended)."""
        handles, self.handles = self.handles, {}
        for handle in handles.values():
            if isinstance(handle, _FileHandle):
                await self._guard("closing", handle.inode, handle.reader.close())
            elif isinstance(handle, _RootListing):
                await self._guard("closing listing of", self.inodes.root, handle.close())


READ_AHEAD_KIB = 1024
"""The kernel's read-ahead on the mount (its default for FUSE is 128 KiB): 1 MiB reads, 8x fewer requests."""


MALLOC_MMAP_THRESHOLD = 4 << 20
"""In a mount process, glibc's malloc serves blocks up to this size (every chunk and reply buffer) from its heap."""

MALLOC_TRIM_THRESHOLD = 32 << 20
"""... and keeps up to this much freed memory at the heap's top for reuse instead of handing it back."""


def keep_freed_buffers() -> bool:
    """Make glibc's malloc reuse the memory of freed chunk buffers instead of handing it back to the kernel.

    A sequential read allocates and frees buffers of a few hundred KiB (chunks,
    replies) thousands of times per GiB; with glibc's defaults each can be a
    fresh ``mmap`` whose pages fault in and are zeroed again, about a tenth of
    the mount's CPU.  Fixed thresholds (:data:`MALLOC_MMAP_THRESHOLD`,
    :data:`MALLOC_TRIM_THRESHOLD`) keep them in the heap.  A no-op (False)
    without glibc.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD)) and bool(
        mallopt(m_trim_threshold, MALLOC_TRIM_THRESHOLD)
    )


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def set_read_ahead(mountpoint: str, kib: int) -> bool:
    """Set the kernel's read-ahead for the filesystem mounted at ``mountpoint`` (needs root; else False).

    The device is found in ``/proc/self/mountinfo`` (a ``stat`` of the mount
    point would wait for this very process to answer).
    """
    device = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and _unescape_mountinfo(fields[4]) == mountpoint:
                device = fields[2]  # the last one listed is the newest mount
    if device is None:
        return False
    try:
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w", encoding="ascii") as f:
            f.write(str(kib))
    except OSError as e:
        log.debug("cannot set read-ahead of %s (bdi %s): %s", mountpoint, device, e)
        return False
    return True


async def serve(
    fs: CastoreFs,
    mountpoint: str | os.PathLike[str],
    *,
    allow_other: bool = False,
    fsname: str = "nixcas",
    read_ahead_kib: int = READ_AHEAD_KIB,
    on_mounted: Callable[[], None] | None = None,
) -> None:
    """Mount ``fs`` read-only at ``mountpoint`` and serve it until unmounted or SIGINT/SIGTERM.

    SIGUSR1 logs how many inodes and handles the filesystem holds.  When
    allowed (root), the kernel's read-ahead on the mount is raised to
    ``read_ahead_kib``, so sequential reads arrive as 1 MiB requests instead
    of 128 KiB ones.

    The mount is removed however this returns.  Only one mount per process
    (a libfuse session is process-global in pyfuse3).
    """
    pyfuse3.asyncio.enable()
    keep_freed_buffers()
    options = set(pyfuse3.default_options) | {"ro", f"fsname={fsname}", "subtype=nixcas"}
    if allow_other:
        options.add("allow_other")
    where = os.path.abspath(mountpoint)
    real = os.path.realpath(where)  # now: once mounted, looking at the mount point needs this very loop
    fs.after_init = lambda: log.info(
        "kernel read-ahead %s", f"{read_ahead_kib} KiB" if set_read_ahead(real, read_ahead_kib) else "unchanged"
    )
    pyfuse3.init(fs, where, options)
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    try:
        for sig in signals:
            loop.add_signal_handler(sig, pyfuse3.terminate)
        loop.add_signal_handler(signal.SIGUSR1, lambda: log.info("holding %s", fs.stats()))
        if on_mounted is not None:
            on_mounted()
        await pyfuse3.main()
    finally:
        for sig in (*signals, signal.SIGUSR1):
            loop.remove_signal_handler(sig)
        log.info("session ended holding %s", fs.stats())
        try:
            await fs.close()
        finally:
            pyfuse3.close(unmount=True)

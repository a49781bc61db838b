"""A read-only FUSE filesystem over castore nodes (pyfuse3, libfuse3, asyncio).

:class:`CastoreFs` hands the kernel's requests to :class:`~nixcas.castore.fs.ops.FsCore`
(shared with the virtio-fs backend), which answers them from a :class:`RootNodes`
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
import logging
import os
import re
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import pyfuse3
import pyfuse3.asyncio

from nixcas.castore.blob.base import BlobService
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.fs.directories import DirectoryFetcher
from nixcas.castore.fs.inodes import Inode, InodeTable
from nixcas.castore.fs.ops import (
    BLKSIZE,
    CACHE_TIMEOUT,
    XATTR_NAMES,
    Attributes,
    FileHandle,
    FsCore,
    FsError,
    Handle,
    RootListing,
)
from nixcas.castore.fs.roots import RootNodes

__all__ = ["CACHE_TIMEOUT", "XATTR_NAMES", "CastoreFs", "serve"]

log = logging.getLogger("nixcas.fs")

_FileHandle = FileHandle
_RootListing = RootListing
"""The handle classes under the names they had when they were defined here."""

T = TypeVar("T")


async def _fuse(op: Awaitable[T]) -> T:
    """Await ``op``; its :class:`FsError` becomes pyfuse3's."""
    try:
        return await op
    except FsError as e:
        raise pyfuse3.FUSEError(e.errno) from None


def _sync(op: Callable[[], T]) -> T:
    try:
        return op()
    except FsError as e:
        raise pyfuse3.FUSEError(e.errno) from None


class CastoreFs(pyfuse3.Operations):
    """The pyfuse3 operations of a read-only castore mount: :class:`FsCore`'s, in pyfuse3's types."""

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
        self.core = FsCore(roots, blobs, directories, list_root=list_root, show_xattr=show_xattr)
        self.after_init: Callable[[], None] | None = None
        """Called once the kernel has taken the answer to its INIT request (it then applies its settings)."""

    @property
    def roots(self) -> RootNodes:
        return self.core.roots

    @property
    def blobs(self) -> BlobService:
        return self.core.blobs

    @property
    def directories(self) -> DirectoryService:
        return self.core.directories

    @property
    def inodes(self) -> InodeTable:
        return self.core.inodes

    @property
    def fetcher(self) -> DirectoryFetcher:
        return self.core.fetcher

    @property
    def handles(self) -> dict[int, Handle]:
        return self.core.handles

    def init(self) -> None:
        # libfuse answers INIT right after this returns, within the same step of the loop.
        if self.after_init is not None:
            asyncio.get_running_loop().call_soon(self.after_init)

    @staticmethod
    def entry_attributes(attributes: Attributes) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = attributes.ino
        attrs.generation = 0
        attrs.entry_timeout = CACHE_TIMEOUT
        attrs.attr_timeout = CACHE_TIMEOUT
        attrs.st_nlink = attributes.nlink
        attrs.st_uid = attributes.uid
        attrs.st_gid = attributes.gid
        attrs.st_blksize = attributes.blksize
        attrs.st_mode = attributes.mode
        attrs.st_size = attributes.size
        attrs.st_blocks = attributes.blocks
        if attributes.time_ns:
            attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = attributes.time_ns
        return attrs

    def attributes(self, inode: Inode) -> pyfuse3.EntryAttributes:
        """The attributes of ``inode`` (st_size of a directory: its ``size`` field)."""
        return self.entry_attributes(self.core.attributes(inode))

    # -- lookups and attributes ------------------------------------------------------

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        return self.attributes(await _fuse(self.core.lookup(parent_inode, name)))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            self.core.forget(ino, count)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self.attributes(_sync(lambda: self.core.inode(inode)))

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> bytes:
        return _sync(lambda: self.core.readlink(inode))

    async def statfs(self, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = BLKSIZE
        data.f_namemax = 255
        return data

    # -- directories ---------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> int:
        return _sync(lambda: self.core.opendir(inode))

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        def emit(name: bytes, inode: Inode, next_id: int) -> bool:
            """One readdirplus entry; the kernel holds a reference to it only if it fit."""
            return bool(pyfuse3.readdir_reply(token, name, self.attributes(inode), next_id))

        await _fuse(self.core.readdir(fh, start_id, emit))

    async def releasedir(self, fh: int) -> None:
        await _fuse(self.core.releasedir(fh))

    # -- files ---------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.FileInfo:
        fh = await _fuse(self.core.open(inode, flags))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await _fuse(self.core.read(fh, off, size))

    async def release(self, fh: int) -> None:
        await _fuse(self.core.release(fh))

    # -- extended attributes --------------------------------------------------------------

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None) -> bytes:
        return _sync(lambda: self.core.getxattr(inode, name))

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> Sequence[bytes]:
        return _sync(lambda: self.core.listxattr(inode))

    # -- state -----------------------------------------------------------------------------

    def stats(self) -> str:
        """What the mount holds in memory (logged on SIGUSR1 and at unmount)."""
        return self.core.stats()

    # -- shutdown -------------------------------------------------------------------------

    async def close(self) -> None:
        """Close every open file and listing (after the session ended)."""
        await _fuse(self.core.close())


READ_AHEAD_KIB = 1024
"""The kernel's read-ahead on the mount (its default for FUSE is 128 KiB): 1 MiB reads, 8x fewer requests."""


MALLOC_MMAP_THRESHOLD = 4 << 20
"""In a mount process, glibc's malloc serves blocks up to this size (every chunk and reply buffer) from its heap."""

MALLOC_TRIM_THRESHOLD = 32 << 20
"""... and keeps up to this much freed memory at the heap's top for reuse instead of handing it back."""


async def wait_readable(fd: int) -> None:
    """pyfuse3's asyncio ``wait_readable``, without its race at unmount.

    pyfuse3's version registers ``future.set_result`` as the reader callback;
    when the session closes (``notify_closing`` fails the future) after the
    selector saw the device readable but before that callback ran, the callback
    raises ``InvalidStateError``, which asyncio logs as an ERROR with a
    traceback on an orderly unmount.  Here the callback does nothing to a future
    already done; the bookkeeping ``notify_closing`` relies on is pyfuse3's own.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()
    waiting = pyfuse3.asyncio._read_futures[fd]
    waiting.add(future)

    def readable() -> None:
        if not future.done():
            future.set_result(None)

    try:
        loop.add_reader(fd, readable)
        future.add_done_callback(lambda _: loop.remove_reader(fd))
        await future
    finally:
        waiting.discard(future)
        if not waiting:
            pyfuse3.asyncio._read_futures.pop(fd, None)


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
    pyfuse3.asyncio.wait_readable = wait_readable  # pyfuse3 looks it up at each call
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

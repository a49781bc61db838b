"""The FUSE wire protocol (``linux/fuse.h``, 7.31) for a read-only filesystem, answered by :class:`FsCore`.

Both transports speak it without libfuse: the kernel's ``/dev/fuse``
(:mod:`nixcas.castore.fs.fuse`) and a virtual machine's virtio-fs queues
(:mod:`nixcas.castore.fs.virtiofs`).  Each request arrives as bytes (a
``fuse_in_header`` and its arguments); :class:`FuseSession` decodes it, calls
the transport-neutral operations of :class:`~nixcas.castore.fs.ops.FsCore`
and encodes the answer as the pieces of the reply (a read's are views of the
chunks that hold its bytes).  A request too short for its opcode's arguments
is ``EINVAL``; an opcode a read-only filesystem does not serve is ``ENOSYS``
(or ``EROFS`` for one that would write).
"""

from __future__ import annotations

import errno
import logging
import stat
import struct
from collections.abc import Awaitable, Callable

from nixcas.castore.fs.inodes import Inode
from nixcas.castore.fs.ops import BLKSIZE, CACHE_TIMEOUT, Attributes, FsCore, FsError

__all__ = [
    "IN_HEADER",
    "MAX_INFLIGHT",
    "OUT_HEADER",
    "FuseSession",
    "Op",
    "Reply",
    "parse_attr",
    "parse_entry",
]

log = logging.getLogger("nixcas.fs")

IN_HEADER = struct.Struct("<IIQQIIIHH")
"""``fuse_in_header``: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding (40 bytes)."""
OUT_HEADER = struct.Struct("<IiQ")
"""``fuse_out_header``: len, error (negative errno), unique (16 bytes)."""
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
"""``fuse_attr``: ino, size, blocks, atime, mtime, ctime, their nsecs, mode, nlink, uid, gid, rdev, blksize, flags."""
ENTRY_OUT = struct.Struct("<QQQQII")
"""``fuse_entry_out`` before its ``fuse_attr``: nodeid, generation, entry_valid, attr_valid, their nsecs."""
ATTR_OUT = struct.Struct("<QII")
"""``fuse_attr_out`` before its ``fuse_attr``: attr_valid, its nsec, dummy."""
INIT_IN = struct.Struct("<IIII")
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
OPEN_IN = struct.Struct("<II")
OPEN_OUT = struct.Struct("<QII")
READ_IN = struct.Struct("<QQIIQII")
RELEASE_IN = struct.Struct("<QII")
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
GETXATTR_IN = struct.Struct("<II")
GETXATTR_OUT = struct.Struct("<II")
KSTATFS = struct.Struct("<QQQQQIIII24x")
DIRENT = struct.Struct("<QQII")

FUSE_KERNEL_VERSION = 7
FUSE_KERNEL_MINOR_VERSION = 31

FUSE_ASYNC_READ = 1 << 0
FUSE_DO_READDIRPLUS = 1 << 13
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_MAX_PAGES = 1 << 22
FUSE_CACHE_SYMLINKS = 1 << 23
WANTED_FLAGS = (
    FUSE_ASYNC_READ
    | FUSE_DO_READDIRPLUS  # always plus (not READDIRPLUS_AUTO): an entry's inode stays the one a lookup gives
    | FUSE_PARALLEL_DIROPS
    | FUSE_MAX_PAGES
    | FUSE_CACHE_SYMLINKS
)

FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3

MAX_INFLIGHT = 64
"""Requests a transport answers at once (the others wait in the kernel or in their rings): memory stays bounded
whatever the clients do, each read holding at most :data:`MAX_READ` bytes."""

MAX_PAGES = 256
"""Reads of up to 1 MiB (the kernel lowers this to what its virtqueue can carry)."""
MAX_READ = MAX_PAGES * 4096

_VALID = int(CACHE_TIMEOUT)

Reply = list[bytes | memoryview]
"""A reply as the pieces to write out in order: its ``fuse_out_header``, then its body (a read's body is
views of the chunks that hold the bytes, written out without being joined first)."""


class Op:
    """FUSE opcodes."""

    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    DESTROY = 38
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    COPY_FILE_RANGE = 47
    TMPFILE = 51


WRITING_OPS = frozenset(
    {
        Op.SETATTR,
        Op.SYMLINK,
        Op.MKNOD,
        Op.MKDIR,
        Op.UNLINK,
        Op.RMDIR,
        Op.RENAME,
        Op.LINK,
        Op.WRITE,
        Op.SETXATTR,
        Op.REMOVEXATTR,
        Op.CREATE,
        Op.FALLOCATE,
        Op.RENAME2,
        Op.COPY_FILE_RANGE,
        Op.TMPFILE,
    }
)
NO_REPLY = frozenset({Op.FORGET, Op.BATCH_FORGET, Op.INTERRUPT})
"""Requests the kernel expects no answer to."""


def attr_bytes(a: Attributes) -> bytes:
    t = a.time_ns // 1_000_000_000
    ns = a.time_ns % 1_000_000_000
    return ATTR.pack(a.ino, a.size, a.blocks, t, t, t, ns, ns, ns, a.mode, a.nlink, a.uid, a.gid, 0, a.blksize, 0)


def entry_bytes(a: Attributes) -> bytes:
    return ENTRY_OUT.pack(a.ino, 0, _VALID, _VALID, 0, 0) + attr_bytes(a)


def parse_attr(data: bytes) -> dict[str, int]:
    """A ``fuse_attr`` as a dict (tests and tools)."""
    names = "ino size blocks atime mtime ctime atimensec mtimensec ctimensec mode nlink uid gid rdev blksize flags"
    return dict(zip(names.split(), ATTR.unpack_from(data), strict=True))


def parse_entry(data: bytes) -> dict[str, int]:
    """A ``fuse_entry_out`` as a dict: its fields and its attribute's."""
    nodeid, _generation, entry_valid, _attr_valid, _, _ = ENTRY_OUT.unpack_from(data)
    return {"nodeid": nodeid, "entry_valid": entry_valid, **parse_attr(data[ENTRY_OUT.size :])}


def _cstring(data: bytes) -> bytes:
    end = data.find(b"\0")
    if end < 0:
        raise FsError(errno.EINVAL)
    return data[:end]


def _args(st: struct.Struct, data: bytes) -> tuple[int, ...]:
    if len(data) < st.size:
        raise FsError(errno.EINVAL)
    return st.unpack_from(data)


class FuseSession:
    """One kernel's FUSE session over a transport that carries whole requests and replies."""

    def __init__(self, core: FsCore) -> None:
        self.core = core
        self.initialized = False
        self.minor = 0
        self.max_read = MAX_READ
        self._ops: dict[int, Callable[[int, bytes], Awaitable[bytes | Reply]]] = {
            Op.INIT: self._init,
            Op.DESTROY: self._destroy,
            Op.LOOKUP: self._lookup,
            Op.GETATTR: self._getattr,
            Op.READLINK: self._readlink,
            Op.STATFS: self._statfs,
            Op.OPENDIR: self._opendir,
            Op.READDIR: self._readdir,
            Op.READDIRPLUS: self._readdirplus,
            Op.RELEASEDIR: self._releasedir,
            Op.FSYNCDIR: self._nothing,
            Op.OPEN: self._open,
            Op.READ: self._read,
            Op.RELEASE: self._release,
            Op.FLUSH: self._nothing,
            Op.FSYNC: self._nothing,
            Op.GETXATTR: self._getxattr,
            Op.LISTXATTR: self._listxattr,
        }

    async def handle(self, request: bytes, capacity: int) -> Reply | None:
        """The reply to one request, in pieces (``None`` for one that gets none); ``capacity``: room for it.

        A request shorter than its header or than the length it claims gets
        no reply at all (its ``unique`` cannot be trusted): the caller
        returns the buffer empty.
        """
        if len(request) < IN_HEADER.size:
            log.warning("FUSE request of %d bytes, shorter than its header: dropped", len(request))
            return None
        length, opcode, unique, nodeid, _uid, _gid, _pid, extlen, _ = IN_HEADER.unpack_from(request)
        if length > len(request) or length < IN_HEADER.size:
            log.warning("FUSE request %d claims %d bytes, carries %d: dropped", unique, length, len(request))
            return None
        if opcode in NO_REPLY:
            self._forget(opcode, nodeid, request[IN_HEADER.size : length])
            return None
        args = request[IN_HEADER.size : length - 8 * extlen] if extlen else request[IN_HEADER.size : length]
        if not self.initialized and opcode != Op.INIT:
            return self._error(unique, errno.EIO)
        op = self._ops.get(opcode)
        if op is None:
            return self._error(unique, errno.EROFS if opcode in WRITING_OPS else errno.ENOSYS)
        try:
            body = await op(nodeid, args)
        except FsError as e:
            return self._error(unique, e.errno)
        except Exception:
            log.exception("FUSE request %d (opcode %d) on inode %d failed", unique, opcode, nodeid)
            return self._error(unique, errno.EIO)
        if isinstance(body, bytes):
            size = len(body)
            reply: Reply = [b"", body]
        else:
            size = sum(map(len, body))
            reply = [b"", *body]
        if OUT_HEADER.size + size > capacity:
            log.warning("FUSE request %d (opcode %d): no room for a %d-byte reply", unique, opcode, size)
            return self._error(unique, errno.ERANGE)
        reply[0] = OUT_HEADER.pack(OUT_HEADER.size + size, 0, unique)
        return reply

    def too_large(self, head: bytes, capacity: int) -> Reply | None:
        """The reply to a request larger than we read (a write: ``EROFS``; else ``E2BIG``), from its first bytes."""
        if len(head) < IN_HEADER.size or capacity < OUT_HEADER.size:
            return None
        _, opcode, unique, *_ = IN_HEADER.unpack_from(head)
        log.warning("FUSE request %d (opcode %d) larger than %d bytes: refused", unique, opcode, len(head))
        return self._error(unique, errno.EROFS if opcode in WRITING_OPS else errno.E2BIG)

    @staticmethod
    def _error(unique: int, code: int) -> Reply:
        return [OUT_HEADER.pack(OUT_HEADER.size, -code, unique)]

    def _forget(self, opcode: int, nodeid: int, args: bytes) -> None:
        if opcode == Op.FORGET and len(args) >= FORGET_IN.size:
            self.core.forget(nodeid, FORGET_IN.unpack_from(args)[0])
        elif opcode == Op.BATCH_FORGET and len(args) >= BATCH_FORGET_IN.size:
            count = BATCH_FORGET_IN.unpack_from(args)[0]
            items = args[BATCH_FORGET_IN.size :]
            for i in range(min(count, len(items) // FORGET_ONE.size)):
                ino, n = FORGET_ONE.unpack_from(items, i * FORGET_ONE.size)
                self.core.forget(ino, n)

    # -- session -----------------------------------------------------------------------

    async def _init(self, nodeid: int, args: bytes) -> bytes:
        major, minor, max_readahead, flags = _args(INIT_IN, args)
        if major != FUSE_KERNEL_VERSION:
            # A newer major: the kernel retries with ours; an older one we cannot serve.
            if major < FUSE_KERNEL_VERSION:
                raise FsError(errno.EPROTO)
            return INIT_OUT.pack(FUSE_KERNEL_VERSION, FUSE_KERNEL_MINOR_VERSION, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        if self.initialized:  # a new kernel session (the guest rebooted): it knows none of our inodes
            await self.core.close()
            self.core.reset()
        self.minor = min(minor, FUSE_KERNEL_MINOR_VERSION)
        self.initialized = True
        reply_flags = flags & WANTED_FLAGS
        log.info("FUSE session 7.%d (kernel 7.%d), flags %#x", self.minor, minor, reply_flags)
        return INIT_OUT.pack(
            FUSE_KERNEL_VERSION, self.minor, max_readahead, reply_flags, 16, 12, MAX_READ, 1, MAX_PAGES, 0, 0
        )

    async def _destroy(self, nodeid: int, args: bytes) -> bytes:
        await self.core.close()
        self.core.reset()
        self.initialized = False
        return b""

    async def _nothing(self, nodeid: int, args: bytes) -> bytes:
        return b""

    # -- lookups and attributes ------------------------------------------------------------

    def _entry(self, inode: Inode) -> bytes:
        return entry_bytes(self.core.attributes(inode))

    async def _lookup(self, nodeid: int, args: bytes) -> bytes:
        return self._entry(await self.core.lookup(nodeid, _cstring(args)))

    async def _getattr(self, nodeid: int, args: bytes) -> bytes:
        attrs = self.core.attributes(self.core.inode(nodeid))
        return ATTR_OUT.pack(_VALID, 0, 0) + attr_bytes(attrs)

    async def _readlink(self, nodeid: int, args: bytes) -> bytes:
        return self.core.readlink(nodeid)

    async def _statfs(self, nodeid: int, args: bytes) -> bytes:
        return KSTATFS.pack(0, 0, 0, 0, 0, BLKSIZE, 255, BLKSIZE, 0)

    # -- directories -------------------------------------------------------------------------

    async def _opendir(self, nodeid: int, args: bytes) -> bytes:
        fh = self.core.opendir(nodeid)
        return OPEN_OUT.pack(fh, FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR if nodeid != 1 else 0, 0)

    async def _readdir(self, nodeid: int, args: bytes) -> bytes:
        return await self._listing(args, plus=False)

    async def _readdirplus(self, nodeid: int, args: bytes) -> bytes:
        return await self._listing(args, plus=True)

    async def _listing(self, args: bytes, *, plus: bool) -> bytes:
        fh, offset, size, *_ = _args(READ_IN, args)
        out = bytearray()
        room = min(size, self.max_read)

        def emit(name: bytes, inode: Inode, next_id: int) -> bool:
            attrs = self.core.attributes(inode)
            entry = DIRENT.pack(attrs.ino, next_id, len(name), stat.S_IFMT(attrs.mode) >> 12) + name
            entry += b"\0" * (-len(entry) % 8)
            if plus:
                entry = entry_bytes(attrs) + entry
            if len(out) + len(entry) > room:
                return False
            out.extend(entry)
            if not plus:
                self.core.forget(inode.ino, 1)  # plain readdir hands the kernel no reference
            return True

        await self.core.readdir(fh, offset, emit)
        return bytes(out)

    async def _releasedir(self, nodeid: int, args: bytes) -> bytes:
        fh, *_ = _args(RELEASE_IN, args)
        await self.core.releasedir(fh)
        return b""

    # -- files -------------------------------------------------------------------------------

    async def _open(self, nodeid: int, args: bytes) -> bytes:
        flags, _ = _args(OPEN_IN, args)
        fh = await self.core.open(nodeid, flags)
        return OPEN_OUT.pack(fh, FOPEN_KEEP_CACHE, 0)

    async def _read(self, nodeid: int, args: bytes) -> Reply:
        fh, offset, size, *_ = _args(READ_IN, args)
        return await self.core.read(fh, offset, min(size, self.max_read))

    async def _release(self, nodeid: int, args: bytes) -> bytes:
        fh, *_ = _args(RELEASE_IN, args)
        await self.core.release(fh)
        return b""

    # -- extended attributes -----------------------------------------------------------------

    @staticmethod
    def _sized(value: bytes, size: int) -> bytes:
        if size == 0:
            return GETXATTR_OUT.pack(len(value), 0)
        if len(value) > size:
            raise FsError(errno.ERANGE)
        return value

    async def _getxattr(self, nodeid: int, args: bytes) -> bytes:
        size, _ = _args(GETXATTR_IN, args)
        return self._sized(self.core.getxattr(nodeid, _cstring(args[GETXATTR_IN.size :])), size)

    async def _listxattr(self, nodeid: int, args: bytes) -> bytes:
        size, _ = _args(GETXATTR_IN, args)
        return self._sized(b"".join(name + b"\0" for name in self.core.listxattr(nodeid)), size)

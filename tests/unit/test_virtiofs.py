"""The virtio-fs back-end in process, driven by a fake vhost-user front-end written here.

The front-end is a socket pair (or a connection to the listening socket)
and a memfd as guest memory; it speaks vhost-user to set up the queues, puts
FUSE requests in descriptor chains, kicks, and reads the replies off the
used ring.  Every struct is packed and unpacked here, independently of the
code under test.
"""

from __future__ import annotations

import array
import asyncio
import base64
import contextlib
import errno
import hashlib
import itertools
import mmap
import os
import socket
import stat
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import blake3
import pytest

from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.fs.fuseproto import FuseSession
from nixcas.castore.fs.ops import FsCore
from nixcas.castore.fs.roots import DirectoryRootNodes
from nixcas.castore.fs.virtiofs.server import VirtioFsServer, listen
from nixcas.castore.fs.virtiofs.vhostuser import Backend
from nixcas.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from nixcas.castore.sizerule import SizeRule
from nixcas.testing.fixtures import BLOB_B, DIRECTORY_WITH_KEEP, HELLOWORLD, SYMLINK_TARGET

# -- vhost-user, as a front-end sends it -------------------------------------------------------

HDR = struct.Struct("<III")
GET_FEATURES, SET_FEATURES, SET_OWNER, SET_MEM_TABLE = 1, 2, 3, 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL = 12, 13
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
NEED_REPLY = 0x8
F_VERSION_1, F_INDIRECT, F_PROTOCOL = 1 << 32, 1 << 28, 1 << 30
P_MQ, P_REPLY_ACK = 1 << 0, 1 << 3

MEM_SIZE = 1 << 21
GPA = 0x4000_0000
"""Where guest memory is, guest-physically."""
UVA = 0x7F12_0000_0000
"""... and in the front-end's address space (the rings' addresses)."""
QSIZE = 16
BUFFERS = 0x40000
"""Request and reply buffers from here on (the rings of queue q are at q * 0x10000)."""

# -- FUSE, as the kernel sends it --------------------------------------------------------------

IN_HDR = struct.Struct("<IIQQIIIHH")
OUT_HDR = struct.Struct("<IiQ")
FUSE_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
LOOKUP, FORGET, GETATTR, READLINK, OPEN, READ, STATFS, RELEASE = 1, 2, 3, 5, 14, 15, 17, 18
GETXATTR, LISTXATTR, INIT, OPENDIR, READDIR, RELEASEDIR, READDIRPLUS, WRITE = 22, 23, 26, 27, 28, 29, 44, 16
DESC_NEXT, DESC_WRITE, DESC_INDIRECT = 1, 2, 4

MiB = 1 << 20


def attr_of(data: bytes, at: int = 0) -> dict[str, int]:
    fields = FUSE_ATTR.unpack_from(data, at)
    return {"ino": fields[0], "size": fields[1], "mtime": fields[4], "mode": fields[9], "nlink": fields[10]}


def read_in(fh: int, offset: int, size: int) -> bytes:
    return struct.pack("<QQIIQII", fh, offset, size, 0, 0, 0, 0)


class FrontEnd:
    """A vhost-user front-end with one memfd of guest memory and two queues (hiprio, requests)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)
        self.memfd = os.memfd_create("guest")
        os.ftruncate(self.memfd, MEM_SIZE)
        self.mem = mmap.mmap(self.memfd, MEM_SIZE)
        self.kick = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
        self.call = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
        self.avail_idx = [0, 0]
        self.used_seen = [0, 0]
        self.notified = [0, 0]
        """How many used entries the last notification read covers."""
        self.next_buffer = BUFFERS
        self.uniques = itertools.count(1)

    def close(self) -> None:
        self.sock.close()
        self.mem.close()
        for fd in (self.memfd, *self.kick, *self.call):
            os.close(fd)

    # -- messages --------------------------------------------------------------------------

    def send(self, request: int, payload: bytes = b"", fds: tuple[int, ...] = (), flags: int = 1) -> None:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([HDR.pack(request, flags, len(payload)) + payload], ancillary)

    async def reply(self) -> tuple[int, bytes]:
        loop = asyncio.get_running_loop()
        header = await asyncio.wait_for(loop.sock_recv(self.sock, HDR.size), 5)
        request, flags, size = HDR.unpack(header)
        assert flags == 0x5  # version 1, a reply
        return request, await loop.sock_recv(self.sock, size) if size else b""

    async def u64(self, request: int) -> int:
        self.send(request)
        got, payload = await self.reply()
        assert got == request
        value: int = struct.unpack("<Q", payload)[0]
        return value

    async def closed(self) -> bool:
        """Whether the back-end hung up (EOF within a few seconds)."""
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.sock_recv(self.sock, 1), 5) == b""
        except ConnectionResetError:
            return True

    def mem_table(self, size: int = MEM_SIZE, flags: int = 1) -> None:
        self.send(
            SET_MEM_TABLE, struct.pack("<II", 1, 0) + struct.pack("<QQQQ", GPA, size, UVA, 0), (self.memfd,), flags
        )

    async def setup(self) -> None:
        assert await self.u64(GET_FEATURES) & (F_VERSION_1 | F_PROTOCOL) == F_VERSION_1 | F_PROTOCOL
        self.send(SET_FEATURES, struct.pack("<Q", F_VERSION_1 | F_PROTOCOL | F_INDIRECT))
        assert await self.u64(GET_PROTOCOL_FEATURES) & P_REPLY_ACK
        self.send(SET_PROTOCOL_FEATURES, struct.pack("<Q", P_REPLY_ACK | P_MQ))
        assert await self.u64(GET_QUEUE_NUM) >= 2
        self.send(SET_OWNER)
        self.mem_table(flags=1 | NEED_REPLY)
        assert await self.reply() == (SET_MEM_TABLE, struct.pack("<Q", 0))  # REPLY_ACK: success
        for q in range(2):
            self.ring(q)
        await self.roundtrip()

    def ring(self, q: int, desc: int | None = None) -> None:
        base = UVA + q * 0x10000
        self.send(SET_VRING_NUM, struct.pack("<II", q, QSIZE))
        self.send(
            SET_VRING_ADDR,
            struct.pack("<IIQQQQ", q, 0, base if desc is None else desc, base + 0x2000, base + 0x1000, 0),
        )
        self.send(SET_VRING_BASE, struct.pack("<II", q, 0))
        self.send(SET_VRING_CALL, struct.pack("<Q", q), (self.call[q],))
        self.send(SET_VRING_KICK, struct.pack("<Q", q), (self.kick[q],))
        self.send(SET_VRING_ENABLE, struct.pack("<II", q, 1))

    async def roundtrip(self) -> None:
        """Wait until the back-end handled every message sent so far."""
        assert await self.u64(GET_QUEUE_NUM) >= 2

    # -- guest memory and rings ----------------------------------------------------------------

    def buffer(self, data: bytes | int) -> tuple[int, int]:
        """A buffer in guest memory (holding ``data``, or of that many bytes): its guest address and size."""
        size = data if isinstance(data, int) else len(data)
        at = self.next_buffer
        self.next_buffer += (size + 63) & ~63
        assert self.next_buffer < MEM_SIZE
        if not isinstance(data, int):
            self.mem[at : at + size] = data
        return GPA + at, size

    def read(self, gpa: int, size: int) -> bytes:
        return self.mem[gpa - GPA : gpa - GPA + size]

    def chain(self, q: int, descriptors: list[tuple[int, int, int]]) -> int:
        """Write a chain into queue ``q``'s table, make it available and kick; its head."""
        head = (self.avail_idx[q] * 4) % QSIZE
        table = q * 0x10000
        for i, (addr, length, flags) in enumerate(descriptors):
            last = i == len(descriptors) - 1
            struct.pack_into(
                "<QIHH",
                self.mem,
                table + 16 * (head + i),
                addr,
                length,
                flags | (0 if last else DESC_NEXT),
                head + i + 1,
            )
        avail = table + 0x1000
        struct.pack_into("<H", self.mem, avail + 4 + 2 * (self.avail_idx[q] % QSIZE), head)
        self.avail_idx[q] += 1
        struct.pack_into("<H", self.mem, avail + 2, self.avail_idx[q] & 0xFFFF)
        os.eventfd_write(self.kick[q], 1)
        return head

    async def used(self, q: int) -> tuple[int, int]:
        """The next entry the back-end put on queue ``q``'s used ring: head, bytes written."""
        used = q * 0x10000 + 0x2000
        for _ in range(5000):
            if struct.unpack_from("<H", self.mem, used + 2)[0] != self.used_seen[q]:
                break
            await asyncio.sleep(0.001)
        else:
            raise AssertionError(f"no reply on queue {q}")
        head, written = struct.unpack_from("<II", self.mem, used + 4 + 8 * (self.used_seen[q] % QSIZE))
        self.used_seen[q] += 1
        # ... and the guest is notified (once for the replies put on the ring in one go)
        for _ in range(1000):
            if self.notified[q] >= self.used_seen[q]:
                break
            covered = struct.unpack_from("<H", self.mem, used + 2)[0]
            try:
                os.eventfd_read(self.call[q])
                self.notified[q] = covered
            except BlockingIOError:
                await asyncio.sleep(0.001)
        else:
            raise AssertionError(f"queue {q}: entry {self.used_seen[q]} on the used ring, no notification")
        return head, written

    async def fuse(
        self, opcode: int, nodeid: int = 1, args: bytes = b"", out: int = 4096, q: int = 1
    ) -> tuple[int, bytes]:
        """One FUSE request: its error (0 or -errno) and reply body."""
        unique = next(self.uniques)
        request = IN_HDR.pack(IN_HDR.size + len(args), opcode, unique, nodeid, 0, 0, 0, 0, 0) + args
        # The header and the arguments in two descriptors, the reply buffer split in two as well.
        first, rest = self.buffer(request[: IN_HDR.size]), self.buffer(request[IN_HDR.size :] or b"\0")
        reply_a, reply_b = self.buffer(16 + 8), self.buffer(out)
        readable = [(first[0], first[1], 0)] + ([(rest[0], len(request) - IN_HDR.size, 0)] if args else [])
        head = self.chain(q, [*readable, (reply_a[0], reply_a[1], DESC_WRITE), (reply_b[0], reply_b[1], DESC_WRITE)])
        got_head, written = await self.used(q)
        assert got_head == head
        data = self.read(reply_a[0], reply_a[1]) + self.read(reply_b[0], reply_b[1])
        length, error, got_unique = OUT_HDR.unpack_from(data)
        assert (length, got_unique) == (written, unique)
        return error, data[OUT_HDR.size : length]

    async def init(self) -> int:
        error, body = await self.fuse(INIT, 0, struct.pack("<IIII", 7, 38, 128 << 10, 0xFFFFFFFF) + bytes(48))
        assert error == 0
        major, minor, _, flags = struct.unpack_from("<IIII", body)
        assert (major, minor) == (7, 31)
        return int(flags)


# -- the filesystem -------------------------------------------------------------------------


async def core(*, list_root: bool = True) -> FsCore:
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX)
    hello = await blobs.put(HELLOWORLD)
    big = await blobs.put(BLOB_B)
    await dirs.put(DIRECTORY_WITH_KEEP)
    inner_entries: dict[bytes, Node] = {
        b"big": FileNode(big, len(BLOB_B), executable=True),
        b"keep": DIRECTORY_WITH_KEEP.node(SizeRule.TVIX),
        b"link": SymlinkNode(SYMLINK_TARGET),
        b"plain": FileNode(hello, len(HELLOWORLD)),
    }
    inner = Directory(inner_entries)
    await dirs.put(inner)
    root: dict[bytes, Node] = {
        b"gone": DirectoryNode(B3Digest.of(b"no such directory"), 0),
        b"plain": FileNode(hello, len(HELLOWORLD)),
        b"sub": inner.node(SizeRule.TVIX),
    }
    return FsCore(DirectoryRootNodes(Directory(root)), blobs, dirs, list_root=list_root, show_xattr=True)


@contextlib.asynccontextmanager
async def connected(fs: FsCore | None = None) -> AsyncIterator[tuple[FrontEnd, asyncio.Task[None]]]:
    """A front-end talking to a back-end over a socket pair; the back-end's task (done once it hung up)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    backend = Backend(FuseSession(fs or await core()), theirs)
    task = asyncio.create_task(backend.run())
    front = FrontEnd(ours)
    try:
        yield front, task
    finally:
        front.close()
        await asyncio.wait_for(task, 5)
        theirs.close()


# -- what a guest sees ------------------------------------------------------------------------


async def test_lookup_getattr_readdir_read_over_the_rings() -> None:
    async with connected() as (fe, _):
        await fe.setup()
        flags = await fe.init()
        assert flags & (1 << 13)  # readdirplus

        error, body = await fe.fuse(LOOKUP, 1, b"sub\0")
        assert error == 0
        sub = struct.unpack_from("<Q", body)[0]
        assert sub == 2  # the first inode handed out after the root
        assert attr_of(body, 40)["mode"] == stat.S_IFDIR | 0o555

        error, body = await fe.fuse(LOOKUP, sub, b"big\0")
        big = struct.unpack_from("<Q", body)[0]
        assert (error, attr_of(body, 40)["size"], attr_of(body, 40)["mode"]) == (0, len(BLOB_B), stat.S_IFREG | 0o555)
        assert attr_of(body, 40)["mtime"] == 1

        error, body = await fe.fuse(GETATTR, sub, bytes(16))
        assert error == 0 and attr_of(body, 16)["ino"] == sub

        # the listing: names, types and inodes (big's the same as the lookup's)
        error, body = await fe.fuse(OPENDIR, sub, bytes(8))
        assert error == 0
        fh = struct.unpack_from("<Q", body)[0]
        error, body = await fe.fuse(READDIRPLUS, sub, read_in(fh, 0, 4096))
        assert error == 0
        entries, at = [], 0
        while at < len(body):
            ino, off, namelen, kind = struct.unpack_from("<QQII", body, at + 128)
            name = body[at + 152 : at + 152 + namelen]
            assert struct.unpack_from("<Q", body, at)[0] == ino == attr_of(body, at + 40)["ino"]
            entries.append((name, kind, off, ino))
            at += 152 + (namelen + 7) // 8 * 8
        assert [(n, k, o) for n, k, o, _ in entries] == [
            (b"big", 8, 1),
            (b"keep", 4, 2),
            (b"link", 10, 3),
            (b"plain", 8, 4),
        ]
        assert entries[0][3] == big
        assert (await fe.fuse(READDIRPLUS, sub, read_in(fh, 4, 4096)))[1] == b""  # past the end
        assert (await fe.fuse(RELEASEDIR, sub, struct.pack("<QIIQ", fh, 0, 0, 0)))[0] == 0

        # plain readdir of the root (listing allowed)
        error, body = await fe.fuse(OPENDIR, 1, bytes(8))
        root_fh = struct.unpack_from("<Q", body)[0]
        error, body = await fe.fuse(READDIR, 1, read_in(root_fh, 0, 4096))
        names, at = [], 0
        while at < len(body):
            _, _, namelen, _ = struct.unpack_from("<QQII", body, at)
            names.append(body[at + 24 : at + 24 + namelen])
            at += 24 + (namelen + 7) // 8 * 8
        assert names == [b"gone", b"plain", b"sub"]

        # reading: the whole 1 MiB file in 256 KiB pieces, and a piece across the reply's two descriptors
        error, body = await fe.fuse(OPEN, big, struct.pack("<II", os.O_RDONLY, 0))
        assert error == 0
        fh = struct.unpack_from("<Q", body)[0]
        got = b""
        for offset in range(0, len(BLOB_B), 256 << 10):
            error, piece = await fe.fuse(READ, big, read_in(fh, offset, 256 << 10), out=256 << 10)
            assert error == 0
            got += piece
        assert hashlib.sha256(got).digest() == hashlib.sha256(BLOB_B).digest()
        assert (await fe.fuse(READ, big, read_in(fh, 3, 5), out=5))[1] == BLOB_B[3:8]
        assert (await fe.fuse(RELEASE, big, struct.pack("<QIIQ", fh, 0, 0, 0)))[0] == 0

        error, body = await fe.fuse(LOOKUP, sub, b"link\0")
        link = struct.unpack_from("<Q", body)[0]
        assert await fe.fuse(READLINK, link) == (0, SYMLINK_TARGET)

        # extended attributes: the size first, then the value
        name = b"user.tvix.castore.blob.digest\0"
        error, body = await fe.fuse(GETXATTR, big, struct.pack("<II", 0, 0) + name)
        size = struct.unpack_from("<I", body)[0]
        error, value = await fe.fuse(GETXATTR, big, struct.pack("<II", size, 0) + name)
        assert (error, len(value)) == (0, size)
        assert value == b"b3:" + base64.b64encode(blake3.blake3(BLOB_B).digest())
        assert (await fe.fuse(GETXATTR, big, struct.pack("<II", 3, 0) + name))[0] == -errno.ERANGE
        error, names_blob = await fe.fuse(LISTXATTR, big, struct.pack("<II", 4096, 0))
        assert names_blob.split(b"\0")[:-1] == [b"user.tvix.castore.blob.digest", b"user.snix.castore.blob.digest"]

        error, body = await fe.fuse(STATFS, 1)
        assert error == 0 and struct.unpack_from("<I", body, 40)[0] == 128 << 10  # bsize

        # FORGET on the hiprio queue: no reply, the buffer comes back empty; the inode goes with its last reference
        # (two: the READDIRPLUS entry and the LOOKUP)
        for _ in range(2):
            assert (await fe.fuse(GETATTR, link, bytes(16)))[0] == 0
            forget = IN_HDR.pack(48, FORGET, 99, link, 0, 0, 0, 0, 0) + struct.pack("<Q", 1)
            fe.chain(0, [(*fe.buffer(forget), 0)])
            assert (await fe.used(0))[1] == 0
        assert (await fe.fuse(GETATTR, link, bytes(16)))[0] == -errno.ENOENT


async def test_indirect_descriptors() -> None:
    async with connected() as (fe, _):
        await fe.setup()
        await fe.init()
        request = IN_HDR.pack(44, LOOKUP, 500, 1, 0, 0, 0, 0, 0) + b"sub\0"
        req, reply = fe.buffer(request), fe.buffer(200)
        table = struct.pack("<QIHH", req[0], req[1], DESC_NEXT, 1) + struct.pack(
            "<QIHH", reply[0], reply[1], DESC_WRITE, 0
        )
        where = fe.buffer(table)
        fe.chain(1, [(where[0], where[1], DESC_INDIRECT)])
        _, written = await fe.used(1)
        length, error, unique = OUT_HDR.unpack_from(fe.read(reply[0], 16))
        assert (written, length, error, unique) == (16 + 128, 16 + 128, 0, 500)


# -- bad input ---------------------------------------------------------------------------------


async def test_fuse_errors_unknown_inode_and_truncated_requests() -> None:
    async with connected() as (fe, task):
        await fe.setup()
        assert (await fe.fuse(GETATTR, 1, bytes(16)))[0] == -errno.EIO  # before INIT
        await fe.init()
        assert (await fe.fuse(GETATTR, 999, bytes(16)))[0] == -errno.ENOENT
        assert (await fe.fuse(LOOKUP, 999, b"x\0"))[0] == -errno.ENOENT
        assert (await fe.fuse(OPEN, 999, bytes(8)))[0] == -errno.ENOENT
        assert (await fe.fuse(LOOKUP, 1, b"absent\0"))[0] == -errno.ENOENT
        assert (await fe.fuse(LOOKUP, 1, b"gone\0"))[0] == 0
        assert (await fe.fuse(LOOKUP, 2, b"x\0"))[0] == -errno.EIO  # a directory the store lacks
        assert (await fe.fuse(LOOKUP, 1, b"no terminating nul"))[0] == -errno.EINVAL
        assert (await fe.fuse(READ, 1, b"short"))[0] == -errno.EINVAL  # arguments too short
        assert (await fe.fuse(READ, 1, read_in(12345, 0, 10)))[0] == -errno.EBADF
        assert (await fe.fuse(WRITE, 1, bytes(40)))[0] == -errno.EROFS
        assert (await fe.fuse(777, 1))[0] == -errno.ENOSYS

        # a header cut short, and one claiming more bytes than it carries: no reply, the buffer comes back
        for request in (
            IN_HDR.pack(40, GETATTR, 1, 1, 0, 0, 0, 0, 0)[:20],
            IN_HDR.pack(4000, GETATTR, 2, 1, 0, 0, 0, 0, 0),
        ):
            req, reply = fe.buffer(request), fe.buffer(64)
            fe.chain(1, [(req[0], req[1], 0), (reply[0], reply[1], DESC_WRITE)])
            assert (await fe.used(1))[1] == 0
            assert fe.read(reply[0], 64) == bytes(64)
        # a reply that does not fit its buffer
        req, reply = fe.buffer(IN_HDR.pack(44, LOOKUP, 3, 1, 0, 0, 0, 0, 0) + b"sub\0"), fe.buffer(40)
        fe.chain(1, [(req[0], req[1], 0), (reply[0], reply[1], DESC_WRITE)])
        assert (await fe.used(1))[1] == 16
        assert OUT_HDR.unpack_from(fe.read(reply[0], 16)) == (16, -errno.ERANGE, 3)
        assert (await fe.fuse(LOOKUP, 1, b"plain\0"))[0] == 0  # still serving
        assert not task.done()


async def test_descriptors_outside_guest_memory_come_back_empty() -> None:
    async with connected() as (fe, task):
        await fe.setup()
        await fe.init()
        request = fe.buffer(IN_HDR.pack(44, LOOKUP, 9, 1, 0, 0, 0, 0, 0) + b"sub\0")
        reply = fe.buffer(200)
        bad_chains = [
            [(GPA + MEM_SIZE - 8, 64, 0), (reply[0], reply[1], DESC_WRITE)],  # runs past the end
            [(0xDEAD_0000_0000, 44, 0), (reply[0], reply[1], DESC_WRITE)],  # nowhere
            [(request[0], request[1], 0), (GPA - 4096, 200, DESC_WRITE)],  # reply below guest memory
            [(request[0], request[1], 0), (reply[0], reply[1], DESC_WRITE), (request[0], 8, 0)],  # read after write
            [(GPA + MEM_SIZE, 32, DESC_INDIRECT)],  # an indirect table outside
            [(request[0], 24, DESC_INDIRECT)],  # an indirect table of a size no table has
        ]
        for chain in bad_chains:
            fe.chain(1, chain)
            assert (await fe.used(1))[1] == 0
            assert fe.read(reply[0], 200) == bytes(200)
        # a chain that loops: head -> head+1 -> head (written by hand)
        head = (fe.avail_idx[1] * 4) % QSIZE
        struct.pack_into("<QIHH", fe.mem, 0x10000 + 16 * head, request[0], request[1], DESC_NEXT, head + 1)
        struct.pack_into("<QIHH", fe.mem, 0x10000 + 16 * (head + 1), request[0], request[1], DESC_NEXT, head)
        struct.pack_into("<H", fe.mem, 0x11000 + 4 + 2 * (fe.avail_idx[1] % QSIZE), head)
        fe.avail_idx[1] += 1
        struct.pack_into("<H", fe.mem, 0x11002, fe.avail_idx[1])
        os.eventfd_write(fe.kick[1], 1)
        assert (await fe.used(1))[1] == 0
        assert (await fe.fuse(LOOKUP, 1, b"sub\0"))[0] == 0  # the queue still works
        assert not task.done()


@pytest.mark.parametrize(
    "message",
    [
        HDR.pack(SET_FEATURES, 1, 4) + b"\0\0\0\0",  # a payload of the wrong size
        HDR.pack(SET_FEATURES, 1, 1 << 20),  # a payload too large to accept
        HDR.pack(99, 1, 0),  # an unknown request
        HDR.pack(GET_FEATURES, 2, 0),  # another protocol version
        HDR.pack(SET_VRING_NUM, 1, 8) + struct.pack("<II", 0, 100),  # a queue size not a power of two
        HDR.pack(SET_VRING_NUM, 1, 8) + struct.pack("<II", 5000, 16),  # a queue that does not exist
        HDR.pack(SET_VRING_KICK, 1, 8) + struct.pack("<Q", 0),  # a kick without its eventfd
        HDR.pack(SET_MEM_TABLE, 1, 40) + struct.pack("<II", 1, 0) + bytes(32),  # a region without its fd
        HDR.pack(SET_FEATURES, 1, 8)[:7],  # a header cut short
    ],
)
async def test_malformed_messages_end_the_connection(message: bytes) -> None:
    async with connected() as (fe, task):
        fe.sock.send(message)
        if len(message) < HDR.size:
            fe.sock.shutdown(socket.SHUT_WR)
        assert await fe.closed()
        await asyncio.wait_for(task, 5)  # the back-end returned, without raising


async def test_rings_and_regions_outside_memory_end_the_connection() -> None:
    async with connected() as (fe, _):
        await fe.setup()
        fe.ring(1, desc=UVA + MEM_SIZE - 64)  # a descriptor table running past guest memory
        assert await fe.closed()
    async with connected() as (fe, _task):
        fe.mem_table(size=MEM_SIZE * 2)  # a region larger than its memfd: no map (no SIGBUS later)
        assert await fe.closed()


async def test_get_vring_base_stops_the_queue_and_reports_its_position() -> None:
    async with connected() as (fe, _task):
        await fe.setup()
        await fe.init()
        await fe.fuse(LOOKUP, 1, b"sub\0")
        fe.send(GET_VRING_BASE, struct.pack("<II", 1, 0))
        assert await fe.reply() == (GET_VRING_BASE, struct.pack("<II", 1, 2))  # INIT and LOOKUP taken
        # restarted where it stopped, the queue serves again
        base = UVA + 0x10000
        fe.send(SET_VRING_ADDR, struct.pack("<IIQQQQ", 1, 0, base, base + 0x2000, base + 0x1000, 0))
        fe.send(SET_VRING_BASE, struct.pack("<II", 1, 2))
        fe.send(SET_VRING_KICK, struct.pack("<Q", 1), (fe.kick[1],))
        assert (await fe.fuse(LOOKUP, 1, b"plain\0"))[0] == 0


async def test_a_server_outlives_bad_front_ends_and_serves_the_next(tmp_path: Path) -> None:
    fs = await core()
    path = tmp_path / "vhost.sock"
    listener = listen(path)
    server = VirtioFsServer(fs)
    serving = asyncio.create_task(server.serve_forever(listener))
    loop = asyncio.get_running_loop()
    try:
        for garbage in (HDR.pack(12345, 1, 0), HDR.pack(SET_FEATURES, 1, 3) + b"abc"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            await loop.sock_connect(sock, str(path))
            fe = FrontEnd(sock)
            fe.sock.send(garbage)
            assert await fe.closed()
            fe.close()
        for _ in range(2):  # a guest, then another one (a reboot): a fresh session each time
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            await loop.sock_connect(sock, str(path))
            fe = FrontEnd(sock)
            await fe.setup()
            await fe.init()
            _error, body = await fe.fuse(LOOKUP, 1, b"plain\0")
            ino = struct.unpack_from("<Q", body)[0]
            fh = struct.unpack_from("<Q", (await fe.fuse(OPEN, ino, bytes(8)))[1])[0]
            assert await fe.fuse(READ, ino, read_in(fh, 0, 100)) == (0, HELLOWORLD)
            fe.close()
        assert server.connections == 4
        assert not serving.done()
    finally:
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        listener.close()


# -- the commands -----------------------------------------------------------------------------


def test_bad_socket_and_digest_are_usage_errors(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from nixcas.cli.app import cli

    def run(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(cli, ["--store-dir", str(tmp_path / "store"), *args])
        return result.exit_code, result.output

    code, out = run("castore", "virtiofs", "00" * 32, str(tmp_path / "absent" / "fs.sock"))
    assert code == 2 and "not a directory" in out
    (tmp_path / "file").write_bytes(b"keep me")
    code, out = run("castore", "virtiofs", "00" * 32, str(tmp_path / "file"))
    assert code == 2 and "is not a socket" in out
    assert (tmp_path / "file").read_bytes() == b"keep me"
    code, out = run("castore", "virtiofs", "xyz", str(tmp_path / "fs.sock"))
    assert code == 2
    code, out = run("castore", "virtiofs", "00" * 32, str(tmp_path / "fs.sock"))
    assert code == 1 and "not found" in out
    assert not (tmp_path / "fs.sock").exists()
    code, out = run("virtiofs", str(tmp_path / "absent" / "fs.sock"))
    assert code == 2 and "not a directory" in out


async def test_an_oversized_request_is_refused_from_its_header() -> None:
    async with connected() as (fe, task):
        await fe.setup()
        await fe.init()
        error, _ = await fe.fuse(WRITE, 1, bytes(40) + bytes(200_000))  # more than the back-end reads of a request
        assert error == -errno.EROFS
        error, _ = await fe.fuse(LOOKUP, 1, b"x" * 100_000 + b"\0")
        assert error == -errno.E2BIG
        assert (await fe.fuse(LOOKUP, 1, b"sub\0"))[0] == 0
        assert not task.done()


class SlowRoots:
    """Root nodes whose lookups wait until released, counting how many are waiting."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.release = asyncio.Event()
        self.waiting = 0

    async def get_by_basename(self, name: bytes) -> Node | None:
        self.waiting += 1
        await self.release.wait()
        return self.node

    async def list(self) -> AsyncIterator[tuple[bytes, Node]]:
        yield b"x", self.node


async def test_requests_in_flight_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from nixcas.castore.fs.virtiofs import vhostuser

    monkeypatch.setattr(vhostuser, "MAX_INFLIGHT", 2)
    roots = SlowRoots(SymlinkNode(b"target"))
    fs = FsCore(roots, MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX))
    async with connected(fs) as (fe, _):
        await fe.setup()
        await fe.init()
        replies = []
        for i in range(4):
            reply = fe.buffer(200)
            replies.append(reply)
            name = f"n{i}\0".encode()
            fe.chain(
                1,
                [
                    (*fe.buffer(IN_HDR.pack(40 + len(name), LOOKUP, 1000 + i, 1, 0, 0, 0, 0, 0) + name), 0),
                    (*reply, DESC_WRITE),
                ],
            )
        for _ in range(50):
            await asyncio.sleep(0.002)
        assert roots.waiting == 2  # two answered at once, the other two still in the ring
        roots.release.set()
        got = sorted([(await fe.used(1))[1] for _ in range(4)])
        assert got == [16 + 128] * 4
        assert roots.waiting == 4
        assert sorted(OUT_HDR.unpack_from(fe.read(r[0], 16))[2] for r in replies) == [1000, 1001, 1002, 1003]


async def test_no_notification_while_the_driver_suppresses_them() -> None:
    async with connected() as (fe, _):
        await fe.setup()
        await fe.init()
        struct.pack_into("<H", fe.mem, 0x11000, 1)  # VIRTQ_AVAIL_F_NO_INTERRUPT on the request queue
        request = IN_HDR.pack(44, LOOKUP, 77, 1, 0, 0, 0, 0, 0) + b"sub\0"
        fe.chain(1, [(*fe.buffer(request), 0), (*fe.buffer(200), DESC_WRITE)])
        for _ in range(2000):
            if struct.unpack_from("<H", fe.mem, 0x12002)[0] == fe.used_seen[1] + 1:
                break
            await asyncio.sleep(0.001)
        for _ in range(5):
            await asyncio.sleep(0)
        with pytest.raises(BlockingIOError):
            os.eventfd_read(fe.call[1])
        fe.used_seen[1] += 1
        fe.notified[1] = fe.used_seen[1]
        struct.pack_into("<H", fe.mem, 0x11000, 0)
        assert (await fe.fuse(LOOKUP, 1, b"plain\0"))[0] == 0  # notified again


async def test_a_front_end_that_never_reads_its_replies_stalls_only_its_connection() -> None:
    async with connected() as (fe, task):
        sent = 0
        with contextlib.suppress(BlockingIOError):
            for _ in range(200_000):  # until both socket buffers are full
                fe.send(GET_FEATURES)
                sent += 1
                if sent % 64 == 0:
                    await asyncio.sleep(0)  # let the back-end answer into the full buffer
        for _ in range(20):
            await asyncio.sleep(0.005)
        assert not task.done()
        ticks = 0
        for _ in range(10):  # the event loop still runs
            await asyncio.sleep(0)
            ticks += 1
        assert ticks == 10
        fe.sock.close()  # hanging up ends the stalled connection
        await asyncio.wait_for(asyncio.shield(task), 5)


async def test_a_new_memory_table_and_kick_fd_while_running() -> None:
    """QEMU sends a new table when guest memory changes; the queues go on in the new maps, nothing lost."""
    async with connected() as (fe, task):
        await fe.setup()
        await fe.init()
        fe.mem_table(flags=1 | NEED_REPLY)
        assert await fe.reply() == (SET_MEM_TABLE, struct.pack("<Q", 0))
        assert (await fe.fuse(LOOKUP, 1, b"sub\0"))[0] == 0
        new_kick = os.eventfd(0, os.EFD_NONBLOCK)
        fe.send(SET_VRING_KICK, struct.pack("<Q", 1), (new_kick,))
        await fe.roundtrip()
        os.close(fe.kick[1])
        fe.kick[1] = new_kick
        assert (await fe.fuse(LOOKUP, 1, b"plain\0"))[0] == 0
        assert not task.done()

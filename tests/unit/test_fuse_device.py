"""The FUSE mount's transport without a kernel: :class:`DeviceSession` over a ``SOCK_SEQPACKET`` socket pair.

``/dev/fuse`` hands out one whole request per read and takes one whole reply
per write; a seqpacket socket keeps those boundaries too, so the test plays
the kernel: it packs requests and unpacks replies itself, independently of
the code under test.  The real device is exercised by ``tests/compat/test_fuse.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.fs.fuse import FUSERMOUNT, DeviceSession, MountError, mount_device
from nixcas.castore.fs.fuseproto import FuseSession
from nixcas.castore.fs.ops import FsCore
from nixcas.castore.fs.roots import DirectoryRootNodes
from nixcas.castore.nodes import FileNode, Node
from nixcas.castore.sizerule import SizeRule
from nixcas.testing.fixtures import BLOB_B, HELLOWORLD

IN_HDR = struct.Struct("<IIQQIIIHH")
OUT_HDR = struct.Struct("<IiQ")
LOOKUP, FORGET, GETATTR, OPEN, READ, RELEASE, INIT, WRITE = 1, 2, 3, 14, 15, 18, 26, 16
READ_IN = struct.Struct("<QQIIQII")


class Kernel:
    """The kernel's end of the device: requests packed, replies read and unpacked here."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)
        self.unique = 0

    def send(self, opcode: int, nodeid: int, args: bytes = b"") -> int:
        self.unique += 1
        self.sock.send(IN_HDR.pack(IN_HDR.size + len(args), opcode, self.unique, nodeid, 0, 0, 0, 0, 0) + args)
        return self.unique

    async def reply(self) -> tuple[int, int, bytes]:
        """``(unique, error, body)`` of the next reply (each arrives whole, as one message)."""
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self.sock, 4 << 20), 5)
        length, error, unique = OUT_HDR.unpack_from(data)
        assert length == len(data)
        return unique, error, data[OUT_HDR.size :]

    async def ask(self, opcode: int, nodeid: int, args: bytes = b"") -> tuple[int, bytes]:
        unique = self.send(opcode, nodeid, args)
        got, error, body = await self.reply()
        assert got == unique
        return error, body

    async def nothing_more(self) -> None:
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(loop.sock_recv(self.sock, 1 << 16), 0.2)


class SlowRoots(DirectoryRootNodes):
    """Root lookups that wait for ``release`` (counted in ``waiting``)."""

    def __init__(self, directory: Directory) -> None:
        super().__init__(directory)
        self.waiting = 0
        self.release = asyncio.Event()

    async def get_by_basename(self, name: bytes) -> Node | None:
        self.waiting += 1
        await self.release.wait()
        return await super().get_by_basename(name)


async def core(roots: type[DirectoryRootNodes] = DirectoryRootNodes) -> FsCore:
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX)
    entries: dict[bytes, Node] = {
        b"big": FileNode(await blobs.put(BLOB_B), len(BLOB_B)),
        b"plain": FileNode(await blobs.put(HELLOWORLD), len(HELLOWORLD)),
    }
    return FsCore(roots(Directory(entries)), blobs, dirs)


@contextlib.asynccontextmanager
async def device(
    inits: list[str] | None = None, fs: FsCore | None = None
) -> AsyncIterator[tuple[Kernel, DeviceSession, asyncio.Task[None]]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    after_init = None if inits is None else lambda: inits.append("init")
    session = DeviceSession(FuseSession(fs or await core()), theirs.fileno(), after_init=after_init)
    task = asyncio.create_task(session.run())
    try:
        yield Kernel(ours), session, task
    finally:
        ours.close()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
        theirs.close()


async def init(kernel: Kernel) -> None:
    error, body = await kernel.ask(INIT, 0, struct.pack("<IIII", 7, 45, 128 << 10, 0xFFFFFFFF) + bytes(48))
    assert error == 0
    assert struct.unpack_from("<II", body) == (7, 31)


STEP = 64 << 10
"""Read requests of this size: a seqpacket socket's message stays under its send buffer."""


async def test_a_file_is_looked_up_opened_and_read_whole() -> None:
    inits: list[str] = []
    async with device(inits) as (kernel, session, _):
        await init(kernel)
        assert inits == ["init"]  # called once the reply was written
        error, entry = await kernel.ask(LOOKUP, 1, b"big\0")
        assert error == 0
        ino = struct.unpack_from("<Q", entry)[0]
        error, opened = await kernel.ask(OPEN, ino, struct.pack("<II", os.O_RDONLY, 0))
        assert error == 0
        fh = struct.unpack_from("<Q", opened)[0]
        got = b""
        for offset in range(0, len(BLOB_B) + 1, STEP):
            error, body = await kernel.ask(READ, ino, READ_IN.pack(fh, offset, STEP, 0, 0, 0, 0))
            assert error == 0
            got += body
        assert got == BLOB_B
        assert (await kernel.ask(RELEASE, ino, struct.pack("<QII", fh, 0, 0)))[0] == 0
        assert session.requests == 4 + len(range(0, len(BLOB_B) + 1, STEP))
        assert inits == ["init"]


async def test_requests_in_flight_are_answered_as_each_is_ready() -> None:
    async with device() as (kernel, _, _):
        await init(kernel)
        uniques = {kernel.send(LOOKUP, 1, name + b"\0"): name for name in (b"plain", b"big", b"absent")}
        replies = {}
        for _ in uniques:
            unique, error, _ = await kernel.reply()
            replies[uniques[unique]] = error
        assert replies == {b"plain": 0, b"big": 0, b"absent": -errno.ENOENT}


async def test_bad_requests_get_their_error_or_no_reply_and_the_session_goes_on() -> None:
    async with device() as (kernel, _, task):
        assert (await kernel.ask(GETATTR, 1, bytes(16)))[0] == -errno.EIO  # before INIT
        await init(kernel)
        kernel.sock.send(b"\x01\x02\x03")  # shorter than a header: its unique cannot be trusted, no reply
        kernel.send(FORGET, 1, struct.pack("<Q", 1))  # a forget is never answered
        await kernel.nothing_more()
        assert (await kernel.ask(WRITE, 2, bytes(40)))[0] == -errno.EROFS
        assert (await kernel.ask(LOOKUP, 1, b"no terminator"))[0] == -errno.EINVAL
        assert (await kernel.ask(GETATTR, 1, bytes(16)))[0] == 0
        assert not task.done()


async def test_requests_answered_at_once_are_bounded_the_rest_wait_in_the_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from nixcas.castore.fs import fuse

    monkeypatch.setattr(fuse, "MAX_INFLIGHT", 2)
    fs = await core(SlowRoots)
    roots = fs.roots
    assert isinstance(roots, SlowRoots)
    async with device(fs=fs) as (kernel, session, _):
        await init(kernel)
        sent = [kernel.send(LOOKUP, 1, b"plain\0") for _ in range(4)]
        for _ in range(50):
            await asyncio.sleep(0.002)
        assert (roots.waiting, session.requests) == (2, 3)  # two answered at once; the others not even read
        roots.release.set()
        answered = sorted([(await kernel.reply())[0] for _ in sent])
        assert answered == sent
        assert roots.waiting == 4
        assert (await kernel.ask(GETATTR, 1, bytes(16)))[0] == 0  # reading again


async def test_a_failure_while_answering_is_logged_and_the_session_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with device() as (kernel, session, task):
        await init(kernel)

        async def broken(request: bytes, capacity: int) -> None:
            raise RuntimeError("a bug")

        with monkeypatch.context() as m:
            m.setattr(session.session, "handle", broken)
            kernel.send(GETATTR, 1, bytes(16))
            await kernel.nothing_more()
        assert "answering a FUSE request failed" in caplog.text and "a bug" in caplog.text
        assert (await kernel.ask(GETATTR, 1, bytes(16)))[0] == 0
        assert not task.done()


async def test_the_session_ends_when_the_device_goes_away() -> None:
    async with device() as (kernel, session, task):
        await init(kernel)
        kernel.sock.close()
        await asyncio.wait_for(task, 5)
        assert session.unmounted


async def test_stop_ends_the_session_without_calling_it_unmounted() -> None:
    async with device() as (kernel, session, task):
        await init(kernel)
        session.stop()
        await asyncio.wait_for(task, 5)
        assert not session.unmounted


@pytest.mark.skipif(shutil.which(FUSERMOUNT) is None, reason=f"{FUSERMOUNT} is not installed on this machine")
def test_a_mount_fusermount3_refuses_is_a_mount_error_in_its_words(tmp_path: Path) -> None:
    with pytest.raises(MountError) as info:
        mount_device(str(tmp_path / "absent"), ["ro"])
    assert info.value.strerror is not None and info.value.strerror.startswith(f"{FUSERMOUNT}:")
    assert "absent" in info.value.strerror

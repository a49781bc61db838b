"""The filesystem core without a mount: read-ahead over a blob reader, inode accounting and eviction, errno rules.

The mount itself is tested in ``test_fuse.py``; these tests look at what a
mount cannot show (how often the underlying reader is read and sought, what
the inode table holds) by calling the operations directly.
"""

from __future__ import annotations

import asyncio
import errno
import io
import os
import random
from collections.abc import AsyncIterator

import pyfuse3
import pytest

from nixcas.castore.blob.base import BlobReader, BytesReader, VerifyingReader
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.fs.directories import DirectoryFetcher
from nixcas.castore.fs.fuse import CastoreFs, _RootListing
from nixcas.castore.fs.reader import ReadAhead
from nixcas.castore.fs.roots import DirectoryRootNodes
from nixcas.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from nixcas.errors import ChecksumMismatch, StorageError
from nixcas.testing.fixtures import BLOB_B, DIRECTORY_WITH_KEEP, HELLOWORLD, SYMLINK_TARGET

MiB = 1 << 20
DATA = bytes(range(256)) * (10 * MiB // 256) + b"tail"


class CountingReader(BlobReader):
    """A reader over bytes that records every seek and how many bytes it handed out."""

    def __init__(self, data: bytes) -> None:
        self.inner = BytesReader(data)
        self.seeks: list[int] = []
        self.bytes_read = 0
        self.closed = False

    async def read(self, n: int = -1) -> bytes:
        data = await self.inner.read(n)
        self.bytes_read += len(data)
        return data

    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.seeks.append(offset)
        return await self.inner.seek(offset, whence)

    def tell(self) -> int:
        return self.inner.tell()

    async def close(self) -> None:
        self.closed = True


async def drain(ra: ReadAhead) -> None:
    """Let the background read-ahead finish what it wants to read."""
    task = ra._task
    if task is not None:
        await task


async def test_sequential_reads_never_seek_and_read_each_byte_once() -> None:
    inner = CountingReader(DATA)
    ra = ReadAhead(inner, len(DATA))
    out = bytearray()
    widest = 0
    for offset in range(0, len(DATA), 128 << 10):
        out += await ra.pread(offset, 128 << 10)
        start, end = ra.window()
        widest = max(widest, end - start)
    assert bytes(out) == DATA
    assert inner.seeks == []
    assert inner.bytes_read == len(DATA)
    assert widest <= 10 * MiB  # behind (1 MiB) + read-ahead (8 MiB) + one block
    await ra.close()
    assert inner.closed


async def test_read_ahead_runs_ahead_of_the_reader() -> None:
    inner = CountingReader(DATA)
    ra = ReadAhead(inner, len(DATA), ahead=4 * MiB)
    assert await ra.pread(0, 4096) == DATA[:4096]
    await drain(ra)
    assert inner.bytes_read == 4 * MiB + MiB  # the first block plus 4 MiB past what was asked
    await ra.close()


async def test_far_reads_seek_without_rereading() -> None:
    inner = CountingReader(DATA)
    ra = ReadAhead(inner, len(DATA), ahead=MiB)
    assert await ra.pread(9 * MiB, 100) == DATA[9 * MiB : 9 * MiB + 100]
    assert inner.seeks == [9 * MiB]  # forward: one seek, nothing before it read
    assert inner.bytes_read == MiB
    assert await ra.pread(MiB // 2, 10) == DATA[MiB // 2 : MiB // 2 + 10]
    assert inner.seeks == [9 * MiB, MiB // 2]  # backward: one seek to the offset
    # A slightly out-of-order read right behind the position is served from the window.
    await ra.pread(MiB // 2 + 10, 100_000)
    await drain(ra)
    seeks = len(inner.seeks)
    assert await ra.pread(MiB // 2 + 5, 20) == DATA[MiB // 2 + 5 : MiB // 2 + 25]
    assert len(inner.seeks) == seeks
    await ra.close()


async def test_concurrent_reads_of_one_handle() -> None:
    """The kernel sends several reads of one open file at once; each gets its own bytes."""
    rng = random.Random(8)  # noqa: S311
    ra = ReadAhead(CountingReader(DATA), len(DATA), ahead=2 * MiB)
    sequential = [(o, 128 << 10) for o in range(0, 4 * MiB, 128 << 10)]
    scattered = [(rng.randrange(len(DATA)), rng.randrange(1, 300_000)) for _ in range(60)]
    requests = sequential + scattered
    rng.shuffle(requests)
    results = await asyncio.gather(*(ra.pread(o, n) for o, n in requests))
    for (offset, size), data in zip(requests, results, strict=True):
        assert data == DATA[offset : offset + size], (offset, size)
    await ra.close()


async def test_reads_at_and_past_the_end() -> None:
    ra = ReadAhead(CountingReader(DATA), len(DATA))
    assert await ra.pread(len(DATA) - 2, 100) == b"il"
    assert await ra.pread(len(DATA), 100) == b""
    assert await ra.pread(len(DATA) + 100, 100) == b""
    assert await ra.pread(5, 0) == b""
    await ra.close()
    with pytest.raises(StorageError, match="closed"):
        await ra.pread(0, 1)


async def test_blob_shorter_or_longer_than_its_size_fails() -> None:
    short = ReadAhead(CountingReader(DATA[:1000]), 2000, name="short blob")
    with pytest.raises(StorageError, match="short blob: ended after 1000 bytes, expected 2000"):
        await short.pread(500, 1000)
    long = ReadAhead(CountingReader(DATA[:3000]), 2000, name="long blob")
    assert await long.pread(0, 1000) == DATA[:1000]
    with pytest.raises(StorageError, match="longer than its recorded size 2000"):
        await long.pread(1000, 1000)


async def test_corrupt_blob_fails_the_last_read() -> None:
    wrong = B3Digest.of(b"something else")
    ra = ReadAhead(VerifyingReader(BytesReader(BLOB_B), wrong), len(BLOB_B))
    assert await ra.pread(0, 4096) == BLOB_B[:4096]
    with pytest.raises(ChecksumMismatch):
        await ra.pread(len(BLOB_B) - 10, 10)
    with pytest.raises(ChecksumMismatch):  # and stays failed
        await ra.pread(len(BLOB_B) - 10, 10)


async def test_right_blob_passes_verification() -> None:
    ra = ReadAhead(VerifyingReader(BytesReader(BLOB_B), B3Digest.of(BLOB_B)), len(BLOB_B))
    got = b"".join([await ra.pread(o, 65536) for o in range(0, len(BLOB_B), 65536)])
    assert got == BLOB_B


# -- operations called directly -------------------------------------------------------------


@pytest.fixture
async def fs() -> CastoreFs:
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService()
    digest = await blobs.put(HELLOWORLD)
    await dirs.put(DIRECTORY_WITH_KEEP)
    inner_entries: dict[bytes, Node] = {
        b"plain": FileNode(digest, len(HELLOWORLD)),
        b"exec": FileNode(digest, len(HELLOWORLD), executable=True),
        b"link": SymlinkNode(SYMLINK_TARGET),
        b"keep": DirectoryNode(DIRECTORY_WITH_KEEP.digest, DIRECTORY_WITH_KEEP.size),
    }
    inner = Directory(inner_entries)
    await dirs.put(inner)
    root_entries: dict[bytes, Node] = {
        b"sub": DirectoryNode(inner.digest, inner.size),
        b"gone": DirectoryNode(B3Digest.of(b"no such directory"), 0),
        b"plain": FileNode(digest, len(HELLOWORLD)),
    }
    return CastoreFs(DirectoryRootNodes(Directory(root_entries)), blobs, dirs)


def errno_of(exc: pytest.ExceptionInfo[pyfuse3.FUSEError]) -> int:
    return exc.value.errno


async def test_lookups_are_counted_and_forgotten(fs: CastoreFs) -> None:
    sub = await fs.lookup(1, b"sub")
    plain = await fs.lookup(sub.st_ino, b"plain")
    again = await fs.lookup(1, b"plain")  # the same node at another path: the same inode
    assert again.st_ino == plain.st_ino
    exe = await fs.lookup(sub.st_ino, b"exec")
    assert exe.st_ino != plain.st_ino
    assert (exe.st_mode & 0o777, plain.st_mode & 0o777) == (0o555, 0o444)
    assert len(fs.inodes) == 4
    await fs.forget([(plain.st_ino, 1)])
    assert (await fs.getattr(plain.st_ino)).st_ino == plain.st_ino  # one reference left
    await fs.forget([(plain.st_ino, 1), (exe.st_ino, 1)])
    assert len(fs.inodes) == 2
    with pytest.raises(pyfuse3.FUSEError) as info:
        await fs.getattr(plain.st_ino)
    assert errno_of(info) == errno.ENOENT
    await fs.forget([(sub.st_ino, 1)])
    assert len(fs.inodes) == 1  # only the root; the fetched directory went with its inode
    fresh = await fs.lookup(1, b"plain")
    assert fresh.st_ino > exe.st_ino  # numbers are never reused


async def test_open_read_release_leaves_nothing(fs: CastoreFs) -> None:
    attrs = await fs.lookup(1, b"plain")
    info = await fs.open(attrs.st_ino, 0)
    assert info.keep_cache
    assert await fs.read(info.fh, 6, 100) == HELLOWORLD[6:]
    await fs.release(info.fh)
    await fs.forget([(attrs.st_ino, 1)])
    assert (len(fs.inodes), fs.handles) == (1, {})


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (lambda fs, sub: fs.lookup(1, b"."), errno.ENOENT),
        (lambda fs, sub: fs.lookup(1, b"a/b"), errno.ENOENT),
        (lambda fs, sub: fs.lookup(1, b"absent"), errno.ENOENT),
        (lambda fs, sub: fs.lookup(sub, b"absent"), errno.ENOENT),
        (lambda fs, sub: fs.getattr(999), errno.ENOENT),
        (lambda fs, sub: fs.opendir(1, None), errno.EPERM),
        (lambda fs, sub: fs.readlink(sub), errno.EINVAL),
        (lambda fs, sub: fs.readlink(1), errno.ENOSYS),  # the root (reference §8.4)
        (lambda fs, sub: fs.open(sub, 0, None), errno.EISDIR),
        (lambda fs, sub: fs.open(1, 0, None), errno.ENOSYS),
        (lambda fs, sub: fs.getxattr(sub, b"user.tvix.castore.directory.digest"), errno.ENOSYS),
        (lambda fs, sub: fs.listxattr(sub), errno.ENOSYS),
        (lambda fs, sub: fs.read(12345, 0, 1), errno.EBADF),
    ],
)
async def test_errno_rules(fs: CastoreFs, call: object, code: int) -> None:
    sub = (await fs.lookup(1, b"sub")).st_ino
    assert callable(call)
    with pytest.raises(pyfuse3.FUSEError) as info:
        await call(fs, sub)
    assert errno_of(info) == code


async def test_missing_directory_is_eio_and_retried(fs: CastoreFs, caplog: pytest.LogCaptureFixture) -> None:
    gone = (await fs.lookup(1, b"gone")).st_ino
    for _ in range(2):
        with pytest.raises(pyfuse3.FUSEError) as info:
            await fs.lookup(gone, b"x")
        assert errno_of(info) == errno.EIO
    assert "reading directory /gone: directory b3:" in caplog.text
    assert fs.inodes.get(gone) is not None and fs.inodes.get(gone).loading is None  # type: ignore[union-attr]


async def test_writes_flags_are_erofs(fs: CastoreFs) -> None:
    attrs = await fs.lookup(1, b"plain")
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        with pytest.raises(pyfuse3.FUSEError) as info:
            await fs.open(attrs.st_ino, flags)
        assert errno_of(info) == errno.EROFS


class CountingRoots(DirectoryRootNodes):
    """Root nodes that count how often a listing was started."""

    def __init__(self, directory: Directory) -> None:
        super().__init__(directory)
        self.listings = 0

    async def list(self) -> AsyncIterator[tuple[bytes, Node]]:
        self.listings += 1
        async for entry in super().list():
            yield entry


async def test_root_listing_keeps_only_what_is_still_needed_and_restarts_on_rewind() -> None:
    digest = B3Digest.of(HELLOWORLD)
    roots = CountingRoots(Directory({f"e{i:04d}".encode(): FileNode(digest, 12) for i in range(1000)}))
    listing = _RootListing(roots)
    for index in range(0, 1000, 100):  # the kernel reads in batches, passing back the next offset
        listing.forget_before(index)
        for i in range(index, index + 100):
            entry = await listing.entry(i)
            assert entry is not None and entry[0] == f"e{i:04d}".encode()
        assert len(listing._entries) <= 100
    assert await listing.entry(1000) is None
    assert roots.listings == 1
    listing.forget_before(1000)
    entry = await listing.entry(0)  # rewinddir
    assert entry is not None and entry[0] == b"e0000"
    assert roots.listings == 2
    await listing.close()


# -- directory fetches -----------------------------------------------------------------------


class CountingDirectories(MemoryDirectoryService):
    """Counts the requests a fetcher makes."""

    def __init__(self) -> None:
        super().__init__()
        self.gets = 0
        self.recursive = 0

    async def get(self, digest: B3Digest) -> Directory | None:
        self.gets += 1
        return await super().get(digest)

    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        self.recursive += 1
        async for directory in super().get_recursive(root):
            yield directory


async def three_levels(dirs: DirectoryService, leaves: int = 3) -> tuple[Directory, list[Directory]]:
    """A root with ``leaves`` sub-directories, each holding one file; all stored."""
    digest = B3Digest.of(HELLOWORLD)
    children = [Directory({f"file{i}".encode(): FileNode(digest, 12)}) for i in range(leaves)]
    for child in children:
        await dirs.put(child)
    root = Directory({f"d{i}".encode(): child.node() for i, child in enumerate(children)})
    await dirs.put(root)
    return root, children


async def test_small_subtree_comes_in_one_request() -> None:
    dirs = CountingDirectories()
    root, children = await three_levels(dirs)
    fetcher = DirectoryFetcher(dirs)
    assert await fetcher.get(root.node()) == root
    assert len(fetcher) == 3
    for child in children:
        assert await fetcher.get(child.node()) == child
    assert (dirs.recursive, dirs.gets, len(fetcher)) == (1, 0, 0)


async def test_large_subtree_is_fetched_level_by_level() -> None:
    dirs = CountingDirectories()
    root, children = await three_levels(dirs)
    fetcher = DirectoryFetcher(dirs, closure_max_size=root.size - 1)
    assert await fetcher.get(root.node()) == root
    assert (dirs.recursive, dirs.gets, len(fetcher)) == (0, 1, 0)
    assert await fetcher.get(children[0].node()) == children[0]  # small: its own closure
    assert dirs.recursive == 1


async def test_missing_descendant_falls_back_to_the_directory_alone(caplog: pytest.LogCaptureFixture) -> None:
    dirs = CountingDirectories()
    lost = Directory({b"x": FileNode(B3Digest.of(HELLOWORLD), 12)})
    root = Directory({b"lost": lost.node()})
    await dirs.put(root)  # its child was never stored
    fetcher = DirectoryFetcher(dirs)
    assert await fetcher.get(root.node()) == root
    assert "cannot fetch its closure whole" in caplog.text
    assert await fetcher.get(lost.node()) is None
    assert await fetcher.get(DirectoryNode(B3Digest(bytes(32)), 2)) is None


async def test_directories_kept_ahead_are_bounded() -> None:
    dirs = CountingDirectories()
    root, children = await three_levels(dirs, leaves=10)
    fetcher = DirectoryFetcher(dirs, keep_entries=4)
    await fetcher.get(root.node())
    assert len(fetcher) == 4  # one entry each: the newest four kept
    assert await fetcher.get(children[-1].node()) == children[-1]
    assert await fetcher.get(children[0].node()) == children[0]  # dropped: fetched again
    assert dirs.recursive == 2

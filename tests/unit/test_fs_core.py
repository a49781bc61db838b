"""The filesystem core without a mount: read-ahead over a blob reader, inode accounting and eviction, errno rules.

The mount itself is tested in ``test_fuse.py``; these tests look at what a
mount cannot show (how often the underlying reader is read and sought, what
the inode table holds) by calling the operations directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import itertools
import os
import random
import threading
import time
import types
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import blake3
import pytest

from nixcas.castore.blob.base import BlobChecker, BlobReader, BlobService, BytesReader, ChunkMeta, VerifyingReader
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.fs import reader as reader_module
from nixcas.castore.fs.directories import DirectoryFetcher
from nixcas.castore.fs.ops import FileHandle, FsCore, FsError, RootListing
from nixcas.castore.fs.reader import ChunkedFile, InOrderHash, ReadAhead
from nixcas.castore.fs.roots import DirectoryRootNodes
from nixcas.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from nixcas.castore.sizerule import SizeRule
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
async def fs() -> FsCore:
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX)
    digest = await blobs.put(HELLOWORLD)
    await dirs.put(DIRECTORY_WITH_KEEP)
    inner_entries: dict[bytes, Node] = {
        b"plain": FileNode(digest, len(HELLOWORLD)),
        b"exec": FileNode(digest, len(HELLOWORLD), executable=True),
        b"link": SymlinkNode(SYMLINK_TARGET),
        b"keep": DIRECTORY_WITH_KEEP.node(SizeRule.TVIX),
    }
    inner = Directory(inner_entries)
    await dirs.put(inner)
    root_entries: dict[bytes, Node] = {
        b"sub": inner.node(SizeRule.TVIX),
        b"gone": DirectoryNode(B3Digest.of(b"no such directory"), 0),
        b"plain": FileNode(digest, len(HELLOWORLD)),
    }
    return FsCore(DirectoryRootNodes(Directory(root_entries)), blobs, dirs)


def errno_of(exc: pytest.ExceptionInfo[FsError]) -> int:
    return exc.value.errno


async def completed(result: object) -> object:
    """What an operation gave: awaited if it is a coroutine (some operations are synchronous)."""
    return await result if asyncio.iscoroutine(result) else result


async def test_lookups_are_counted_and_forgotten(fs: FsCore) -> None:
    sub = (await fs.lookup(1, b"sub")).ino
    plain = (await fs.lookup(sub, b"plain")).ino
    again = (await fs.lookup(1, b"plain")).ino  # the same node at another path: the same inode
    assert again == plain
    exe = (await fs.lookup(sub, b"exec")).ino
    assert exe != plain
    modes = fs.attributes(fs.inode(exe)).mode & 0o777, fs.attributes(fs.inode(plain)).mode & 0o777
    assert modes == (0o555, 0o444)
    assert len(fs.inodes) == 4
    fs.forget(plain, 1)
    assert fs.inode(plain).ino == plain  # one reference left
    fs.forget(plain, 1)
    fs.forget(exe, 1)
    assert len(fs.inodes) == 2
    with pytest.raises(FsError) as info:
        fs.inode(plain)
    assert errno_of(info) == errno.ENOENT
    fs.forget(sub, 1)
    assert len(fs.inodes) == 1  # only the root; the fetched directory went with its inode
    fresh = (await fs.lookup(1, b"plain")).ino
    assert fresh > exe  # numbers are never reused


async def test_open_read_release_leaves_nothing(fs: FsCore) -> None:
    ino = (await fs.lookup(1, b"plain")).ino
    fh = await fs.open(ino, 0)
    assert b"".join(await fs.read(fh, 6, 100)) == HELLOWORLD[6:]
    await fs.release(fh)
    fs.forget(ino, 1)
    assert (len(fs.inodes), fs.handles) == (1, {})


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (lambda fs, sub: fs.lookup(1, b"."), errno.ENOENT),
        (lambda fs, sub: fs.lookup(1, b"a/b"), errno.ENOENT),
        (lambda fs, sub: fs.lookup(1, b"absent"), errno.ENOENT),
        (lambda fs, sub: fs.lookup(sub, b"absent"), errno.ENOENT),
        (lambda fs, sub: fs.inode(999), errno.ENOENT),
        (lambda fs, sub: fs.opendir(1), errno.EPERM),
        (lambda fs, sub: fs.readlink(sub), errno.EINVAL),
        (lambda fs, sub: fs.readlink(1), errno.ENOSYS),  # the root (reference §8.4)
        (lambda fs, sub: fs.open(sub, 0), errno.EISDIR),
        (lambda fs, sub: fs.open(1, 0), errno.ENOSYS),
        (lambda fs, sub: fs.getxattr(sub, b"user.tvix.castore.directory.digest"), errno.ENOSYS),
        (lambda fs, sub: fs.listxattr(sub), errno.ENOSYS),
        (lambda fs, sub: fs.read(12345, 0, 1), errno.EBADF),
    ],
)
async def test_errno_rules(fs: FsCore, call: object, code: int) -> None:
    sub = (await fs.lookup(1, b"sub")).ino
    assert callable(call)
    with pytest.raises(FsError) as info:
        await completed(call(fs, sub))
    assert errno_of(info) == code


async def test_missing_directory_is_eio_and_retried(fs: FsCore, caplog: pytest.LogCaptureFixture) -> None:
    gone = (await fs.lookup(1, b"gone")).ino
    for _ in range(2):
        with pytest.raises(FsError) as info:
            await fs.lookup(gone, b"x")
        assert errno_of(info) == errno.EIO
    assert "reading directory /gone: directory b3:" in caplog.text
    assert fs.inodes.get(gone) is not None and fs.inodes.get(gone).loading is None  # type: ignore[union-attr]


async def test_writes_flags_are_erofs(fs: FsCore) -> None:
    ino = (await fs.lookup(1, b"plain")).ino
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        with pytest.raises(FsError) as info:
            await fs.open(ino, flags)
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
    listing = RootListing(roots)
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
        super().__init__(SizeRule.TVIX)
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
    root = Directory({f"d{i}".encode(): child.node(SizeRule.TVIX) for i, child in enumerate(children)})
    await dirs.put(root)
    return root, children


async def test_small_subtree_comes_in_one_request() -> None:
    dirs = CountingDirectories()
    root, children = await three_levels(dirs)
    fetcher = DirectoryFetcher(dirs)
    assert await fetcher.get(root.node(SizeRule.TVIX)) == root
    assert len(fetcher) == 3
    for child in children:
        assert await fetcher.get(child.node(SizeRule.TVIX)) == child
    assert (dirs.recursive, dirs.gets, len(fetcher)) == (1, 0, 0)


async def test_large_subtree_is_fetched_level_by_level() -> None:
    dirs = CountingDirectories()
    root, children = await three_levels(dirs)
    fetcher = DirectoryFetcher(dirs, closure_max_size=root.size_under(SizeRule.TVIX) - 1)
    assert await fetcher.get(root.node(SizeRule.TVIX)) == root
    assert (dirs.recursive, dirs.gets, len(fetcher)) == (0, 1, 0)
    assert await fetcher.get(children[0].node(SizeRule.TVIX)) == children[0]  # small: its own closure
    assert dirs.recursive == 1


async def test_missing_descendant_falls_back_to_the_directory_alone(caplog: pytest.LogCaptureFixture) -> None:
    dirs = CountingDirectories()
    lost = Directory({b"x": FileNode(B3Digest.of(HELLOWORLD), 12)})
    root = Directory({b"lost": lost.node(SizeRule.TVIX)})
    await dirs.put(root)  # its child was never stored
    fetcher = DirectoryFetcher(dirs)
    assert await fetcher.get(root.node(SizeRule.TVIX)) == root
    assert "cannot fetch its closure whole" in caplog.text
    assert await fetcher.get(lost.node(SizeRule.TVIX)) is None
    assert await fetcher.get(DirectoryNode(B3Digest(bytes(32)), 2)) is None


async def test_directories_kept_ahead_are_bounded() -> None:
    dirs = CountingDirectories()
    root, children = await three_levels(dirs, leaves=10)
    fetcher = DirectoryFetcher(dirs, keep_entries=4)
    await fetcher.get(root.node(SizeRule.TVIX))
    assert len(fetcher) == 4  # one entry each: the newest four kept
    assert await fetcher.get(children[-1].node(SizeRule.TVIX)) == children[-1]
    assert await fetcher.get(children[0].node(SizeRule.TVIX)) == children[0]  # dropped: fetched again
    assert dirs.recursive == 2


# -- chunked blobs: parallel fetches, per-chunk and whole-blob verification ----------------------------------


class ChunkedMemory(MemoryBlobService):
    """Memory blobs plus chunk lists: a blob put with :meth:`put_chunked` is its chunks, each a blob here.

    Records every chunk read; :meth:`corrupt` swaps a chunk's stored bytes for others of the same length.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lists: dict[B3Digest, list[ChunkMeta]] = {}
        self.fetched: list[B3Digest] = []

    async def put_chunked(self, data: bytes, cuts: list[int]) -> tuple[B3Digest, list[ChunkMeta]]:
        bounds = [0, *cuts, len(data)]
        chunks = []
        for lo, hi in itertools.pairwise(bounds):
            chunks.append(ChunkMeta(await self.put(data[lo:hi]), hi - lo))
        digest = B3Digest.of(data)
        self.lists[digest] = chunks
        return digest, chunks

    def corrupt(self, chunk: ChunkMeta) -> None:
        good = self._blobs[chunk.digest]
        self._blobs[chunk.digest] = bytes(b ^ 0x5A for b in good)

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        found = self.lists.get(digest)
        return list(found) if found is not None else await super().chunks(digest)

    async def read_chunk(self, chunk: ChunkMeta) -> bytes | None:
        self.fetched.append(chunk.digest)
        await asyncio.sleep(0)  # let other fetches interleave
        return await super().read_chunk(chunk)

    async def _read_many(
        self, max_sizes: Mapping[B3Digest, int], checker: BlobChecker, parallel: int
    ) -> dict[B3Digest, bytes]:
        self.fetched.extend(max_sizes)
        await asyncio.sleep(0)
        return await super()._read_many(max_sizes, checker, parallel)


def chunk_cuts(size: int, seed: int) -> list[int]:
    """Chunk boundaries 20-200 KiB apart (independent of any chunker)."""
    rng = random.Random(seed)  # noqa: S311
    cuts, at = [], 0
    while (at := at + rng.randrange(20 << 10, 200 << 10)) < size:
        cuts.append(at)
    return cuts


BIG = random.Random(15).randbytes(7 * MiB + 4321)  # noqa: S311


async def chunked_file(**options: int) -> tuple[ChunkedMemory, ChunkedFile, list[ChunkMeta]]:
    blobs = ChunkedMemory()
    digest, chunks = await blobs.put_chunked(BIG, chunk_cuts(len(BIG), 3))
    return blobs, ChunkedFile(blobs, digest, chunks, name="big", **options), chunks


async def test_chunked_file_random_concurrent_reads_are_exact() -> None:
    """Parallel read-ahead and concurrent reads at random offsets and sizes give exactly the source bytes."""
    rng = random.Random(21)  # noqa: S311
    for ahead, behind, group in ((16 * MiB, 4 * MiB, 2 * MiB), (MiB, 256 << 10, 300 << 10), (0, 0, 0)):
        _, cf, _ = await chunked_file(ahead=ahead, behind=behind, group=group, parallel=3)
        sequential = [(o, MiB) for o in range(0, len(BIG), MiB)]
        scattered = [(rng.randrange(len(BIG) + 10), rng.randrange(0, 3 * MiB)) for _ in range(150)]
        requests = sequential + scattered
        rng.shuffle(requests)
        for start in range(0, len(requests), 12):  # twelve reads in flight at a time, as the kernel sends them
            batch = requests[start : start + 12]
            results = await asyncio.gather(*(cf.pread(o, n) for o, n in batch))
            for (offset, size), data in zip(batch, results, strict=True):
                assert data == BIG[offset : offset + size], (ahead, offset, size)
        await cf.close()


async def test_chunked_file_sequential_read_fetches_each_chunk_once_in_a_bounded_window() -> None:
    blobs, cf, chunks = await chunked_file(ahead=2 * MiB, behind=MiB, group=512 << 10)
    out = bytearray()
    widest = 0
    for offset in range(0, len(BIG), 128 << 10):
        out += await cf.pread(offset, 128 << 10)
        held = cf.window()
        widest = max(widest, sum(chunks[i].size for i in held))
    assert bytes(out) == BIG
    assert sorted(blobs.fetched) == sorted(c.digest for c in chunks)  # each chunk once, none again
    # ahead + behind + one read + a group (and a chunk) at either end
    assert widest <= 2 * MiB + MiB + (128 << 10) + 2 * ((512 << 10) + (200 << 10))
    await cf.close()
    assert cf.window() == []


async def test_chunked_file_damaged_chunk_fails_only_the_reads_that_cover_it() -> None:
    blobs, cf, chunks = await chunked_file()
    starts = list(itertools.accumulate((c.size for c in chunks), initial=0))
    bad = len(chunks) // 2
    blobs.corrupt(chunks[bad])
    lo, hi = starts[bad], starts[bad + 1]
    got = bytearray()

    async def read_on() -> None:
        while len(got) < len(BIG):
            got.extend(await cf.pread(len(got), 64 << 10))

    with pytest.raises(ChecksumMismatch):  # reading on from the start: the first read reaching the chunk fails
        await read_on()
    assert bytes(got) == BIG[: len(got)]
    assert lo - (64 << 10) < len(got) <= lo
    for offset, size in [(lo, 1), (hi - 1, 1), (lo - 10, 20), (hi - 10, 20), (0, len(BIG))]:
        with pytest.raises(ChecksumMismatch):
            await cf.pread(offset, size)
    assert await cf.pread(lo - 10, 10) == BIG[lo - 10 : lo]
    assert await cf.pread(hi, 100_000) == BIG[hi : hi + 100_000]
    assert await cf.pread(len(BIG) - 5, 5) == BIG[-5:]  # the end, not read in order: chunk-checked only
    await cf.close()


async def test_chunked_file_chunk_list_not_making_up_the_blob_fails_at_the_end() -> None:
    """Every chunk is right but the list is not the blob's (two chunks swapped): the last read fails, and so does
    every read after the whole blob was hashed (read ahead, it may be before the end is asked for)."""
    blobs = ChunkedMemory()
    digest, chunks = await blobs.put_chunked(BIG, chunk_cuts(len(BIG), 3))
    swapped = [chunks[1], chunks[0], *chunks[2:]]
    cf = ChunkedFile(blobs, digest, swapped, name="swapped")
    as_listed = (
        BIG[chunks[0].size : chunks[0].size + chunks[1].size]
        + BIG[: chunks[0].size]
        + BIG[chunks[0].size + chunks[1].size :]
    )
    failed = False
    for offset in range(0, len(BIG) - MiB, MiB):
        try:
            assert await cf.pread(offset, MiB) == as_listed[offset : offset + MiB]
            assert not failed
        except ChecksumMismatch:
            failed = True
    with pytest.raises(ChecksumMismatch, match="swapped"):
        await cf.pread(len(BIG) - MiB, MiB)
    with pytest.raises(ChecksumMismatch):  # and stays failed
        await cf.pread(0, 10)
    await cf.close()
    # All reads at once, the last one first (the kernel sends read-ahead requests together):
    # the read of the end waits for the chunks before it and fails.
    at_once = ChunkedFile(blobs, digest, swapped, name="swapped")
    offsets = list(range(0, len(BIG), MiB))[::-1]
    results = await asyncio.gather(*(at_once.pread(o, MiB) for o in offsets), return_exceptions=True)
    assert isinstance(results[0], ChecksumMismatch)
    await at_once.close()
    right = ChunkedFile(blobs, digest, chunks)
    assert b"".join([await right.pread(o, 300_000) for o in range(0, len(BIG), 300_000)]) == BIG
    await right.close()


def _groups_of(data: bytes, n: int) -> list[list[bytes]]:
    """``data`` cut into ``n`` groups of two pieces each."""
    step = -(-len(data) // n)
    out = []
    for lo in range(0, len(data), step):
        group = data[lo : lo + step]
        out.append([group[: len(group) // 2], group[len(group) // 2 :]])
    return out


def test_in_order_hash_takes_groups_offered_out_of_order_from_many_threads() -> None:
    groups = _groups_of(BIG, 40)
    order = list(range(len(groups)))
    random.Random(3).shuffle(order)  # noqa: S311
    for expected, mismatch in ((B3Digest.of(BIG), None), (B3Digest.of(b"other"), blake3.blake3(BIG).hexdigest())):
        whole = InOrderHash(bytes(expected), len(groups))

        def offer(part: list[int], whole: InOrderHash = whole) -> None:
            for g in part:
                whole.offer(g, groups[g])

        threads = [threading.Thread(target=offer, args=(order[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        whole.settle()
        assert whole.finished and whole.position == len(groups)
        assert whole.mismatch == mismatch


async def test_chunked_file_read_in_order_is_hashed_whole_however_far_the_hash_lags(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A slow whole-blob hash, with a window that keeps nothing behind the reader: a file read in order is still
    hashed whole (no group is dropped before it is hashed), so a wrong chunk list still fails the read of the end."""

    real = blake3.blake3

    class SlowHasher:
        def __init__(self) -> None:
            self._inner = real()

        def update(self, data: bytes | memoryview) -> None:
            time.sleep(0.002)
            self._inner.update(data)

        def digest(self) -> bytes:
            return self._inner.digest()

    monkeypatch.setattr(reader_module, "blake3", types.SimpleNamespace(blake3=SlowHasher))
    blobs = ChunkedMemory()
    digest, chunks = await blobs.put_chunked(BIG, chunk_cuts(len(BIG), 3))
    swapped = [chunks[1], chunks[0], *chunks[2:]]
    cf = ChunkedFile(blobs, digest, swapped, name="swapped", ahead=256 << 10, behind=0, group=128 << 10)

    async def read_all() -> None:
        for offset in range(0, len(BIG), 128 << 10):
            await cf.pread(offset, 128 << 10)

    with pytest.raises(ChecksumMismatch, match="swapped"):
        await read_all()
    await cf.close()


def test_in_order_hash_lets_go_only_what_waits_behind_a_gap() -> None:
    groups = _groups_of(BIG, 10)
    whole = InOrderHash(bytes(B3Digest.of(BIG)), len(groups))
    for g in (1, 2, 3):
        whole.offer(g, groups[g])
    assert whole.position == 0  # group 0 not offered yet: they wait
    whole.let_go(lambda g: g == 0)  # group 0 is being read: the hash can go on, nothing is let go
    whole.offer(0, groups[0])
    assert whole.position == 4
    for g in (5, 6, 7):
        whole.offer(g, groups[g])
    whole.let_go(lambda g: g == 7)  # group 4 is held nowhere (a jump): 5 and 6 go, 7 is still held
    whole.offer(4, groups[4])
    assert whole.position == 5 and not whole.finished  # stopped at the gap left by 5
    for g in range(5, 10):
        whole.offer(g, groups[g])
    assert whole.finished and whole.mismatch is None
    closed = InOrderHash(bytes(B3Digest.of(BIG)), len(groups))
    closed.offer(0, groups[0])
    closed.close()
    closed.offer(1, groups[1])
    assert closed.position == 1 and not closed.finished


@contextlib.asynccontextmanager
async def packed_chunked_blob(
    tmp_path: Path, seed: bytes
) -> AsyncIterator[tuple[BlobService, bytes, B3Digest, list[ChunkMeta]]]:
    """A packed:// store holding one 6 MiB blob made from ``seed``, kept in chunks: (store, bytes, digest, chunks)."""
    from nixcas.composition import blob_service_from_url

    blobs = await blob_service_from_url(f"packed://{tmp_path / 'blobs'}")
    try:
        data = blake3.blake3(seed).digest(length=6 << 20)
        digest = await blobs.put(data)
        chunks = await blobs.chunks(digest)
        assert chunks is not None and len(chunks) > 4
        yield blobs, data, digest, chunks
    finally:
        await blobs.close()


async def test_chunked_file_over_the_embedded_store_reads_chunk_objects_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over packed:// (BulkReads) groups are read as chunk objects, not through read_many; a damaged object fails
    the reads that cover it (then found through the async API) and only those; all bytes read in order are right."""
    from nixcas.castore.objectstore.layout import chunk_key

    async with packed_chunked_blob(tmp_path, b"mounted") as (blobs, data, digest, chunks):
        async_reads: list[str] = []
        with monkeypatch.context() as m:
            for name in ("read_many", "read_chunk"):
                original = getattr(blobs, name)

                async def counted(*args: object, _name: str = name, _original: Any = original) -> object:
                    async_reads.append(_name)
                    return await _original(*args)

                m.setattr(blobs, name, counted)
            cf = ChunkedFile(blobs, digest, chunks, name="big")
            got = b"".join([await cf.pread(o, 128 << 10) for o in range(0, len(data), 128 << 10)])
            assert got == data
            await cf.close()
        assert async_reads == []
        starts = list(itertools.accumulate((c.size for c in chunks), initial=0))
        bad = len(chunks) // 2
        path = tmp_path / "blobs" / chunk_key(chunks[bad].digest)
        stored = bytearray(path.read_bytes())
        stored[-2] ^= 0xFF
        path.write_bytes(stored)
        cf = ChunkedFile(blobs, digest, chunks, name="big")
        with pytest.raises(StorageError):
            await cf.pread(starts[bad] + 5, 10)
        assert await cf.pread(starts[bad] - 10, 10) == data[starts[bad] - 10 : starts[bad]]
        assert await cf.pread(starts[bad + 1], 1000) == data[starts[bad + 1] : starts[bad + 1] + 1000]
        await cf.close()


async def test_chunked_file_asks_the_disk_for_each_group_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before reading a group of chunk objects one after another, the reader hints all but the first (read at
    once anyway) to the store, which asks the kernel to read them ahead; a digest that is no chunk file is
    ignored."""
    async with packed_chunked_blob(tmp_path, b"hinted") as (blobs, data, digest, chunks):
        reads = blobs.bulk_reads()
        assert reads is not None
        reads.will_read_chunks([bytes(c.digest) for c in chunks] + [b"\0" * 32])  # the real hint: no error
        hinted: list[list[bytes]] = []
        monkeypatch.setattr(type(reads), "will_read_chunks", lambda self, digests: hinted.append(list(digests)))
        cf = ChunkedFile(blobs, digest, chunks, name="big")
        assert b"".join([await cf.pread(o, 1 << 20) for o in range(0, len(data), 1 << 20)]) == data
        await cf.close()
        index = {bytes(c.digest): i for i, c in enumerate(chunks)}
        groups = []
        for h in hinted:  # each: a group's chunks in order, but its first
            first = index[h[0]] - 1
            assert h == [bytes(c.digest) for c in chunks[first + 1 : first + 1 + len(h)]]
            groups.append((first, first + 1 + len(h)))
        groups.sort()
        assert groups[0][0] == 0 and groups[-1][1] == len(chunks)
        assert all(a[1] == b[0] for a, b in itertools.pairwise(groups))  # every chunk, each group once


async def test_chunked_file_missing_chunk_is_an_error_and_retried() -> None:
    blobs, cf, chunks = await chunked_file()
    data = blobs._blobs.pop(chunks[3].digest)
    offset = sum(c.size for c in chunks[:3])
    with pytest.raises(StorageError, match=f"chunk {chunks[3].digest.hex()} at {offset} not found"):
        await cf.pread(offset, 10)
    blobs._blobs[chunks[3].digest] = data
    assert await cf.pread(offset, 10) == BIG[offset : offset + 10]
    await cf.close()
    with pytest.raises(StorageError, match="closed"):
        await cf.pread(0, 1)


async def test_large_chunked_files_open_as_chunked_files() -> None:
    blobs, dirs = ChunkedMemory(), MemoryDirectoryService(SizeRule.TVIX)
    digest, _ = await blobs.put_chunked(BIG, chunk_cuts(len(BIG), 3))
    small = await blobs.put(HELLOWORLD)
    root = Directory({b"big": FileNode(digest, len(BIG)), b"small": FileNode(small, len(HELLOWORLD))})
    fs = FsCore(DirectoryRootNodes(root), blobs, dirs)
    big_fh = await fs.open((await fs.lookup(1, b"big")).ino, os.O_RDONLY)
    small_fh = await fs.open((await fs.lookup(1, b"small")).ino, os.O_RDONLY)
    assert isinstance(fs.handles[big_fh], FileHandle)
    assert isinstance(fs.handles[big_fh].reader, ChunkedFile)  # type: ignore[union-attr]
    assert isinstance(fs.handles[small_fh].reader, ReadAhead)  # type: ignore[union-attr]
    pieces = await fs.read(big_fh, 5 * MiB, MiB)
    assert len(pieces) > 1 and all(isinstance(p, memoryview) for p in pieces)  # the chunks' views, not joined
    assert b"".join(pieces) == BIG[5 * MiB : 6 * MiB]
    assert b"".join(await fs.read(small_fh, 0, 100)) == HELLOWORLD
    await fs.release(big_fh)
    await fs.release(small_fh)

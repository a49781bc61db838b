"""``ingest_archive``: tar archives (plain and compressed) into castore."""

from __future__ import annotations

import asyncio
import bz2
import gzip
import io
import lzma
import os
import sqlite3
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Self

import blake3
import pytest
import pytest_asyncio
import zstandard

from nixcas.castore.archive import ingest_archive
from nixcas.castore.blob.base import BlobService, BlobWriter
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.ingest import ingest_path
from nixcas.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from nixcas.castore.sizerule import SizeRule
from nixcas.composition import blob_service_from_url, directory_service_from_url
from nixcas.errors import IngestError

COMPRESSIONS = ["none", "gz", "bz2", "xz", "zst"]
BIG = 5 * (1 << 20) + 123  # more than one 4 MiB upload block


def compress(data: bytes, kind: str) -> bytes:
    if kind == "gz":
        return gzip.compress(data, compresslevel=1)
    if kind == "bz2":
        return bz2.compress(data, 1)
    if kind == "xz":
        return lzma.compress(data, preset=0)
    if kind == "zst":
        return zstandard.ZstdCompressor(level=1, write_checksum=True).compress(data)
    assert kind == "none"
    return data


class TarBuilder:
    """Writes tar members by hand, so that any member (also a malformed one) can be made."""

    def __init__(self, fmt: int = tarfile.PAX_FORMAT, pax_headers: dict[str, str] | None = None) -> None:
        self._buf = io.BytesIO()
        self._tar = tarfile.open(  # noqa: SIM115 - closed by data()
            fileobj=self._buf,
            mode="w",
            format=fmt,
            encoding="utf-8",
            errors="surrogateescape",
            pax_headers=pax_headers,
        )

    def _add(self, name: str, kind: bytes, mode: int, data: bytes | None = None, linkname: str = "") -> Self:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.linkname = linkname
        info.size = len(data) if data is not None else 0
        self._tar.addfile(info, io.BytesIO(data) if data is not None else None)
        return self

    def file(self, name: str, data: bytes = b"", mode: int = 0o644, kind: bytes = tarfile.REGTYPE) -> Self:
        return self._add(name, kind, mode, data)

    def dir(self, name: str) -> Self:
        return self._add(name, tarfile.DIRTYPE, 0o755)

    def symlink(self, name: str, target: str) -> Self:
        return self._add(name, tarfile.SYMTYPE, 0o777, linkname=target)

    def special(self, name: str, kind: bytes, linkname: str = "") -> Self:
        return self._add(name, kind, 0o644, linkname=linkname)

    def data(self) -> bytes:
        self._tar.close()
        return self._buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def make_tree(root: Path, big: bytes) -> None:
    """A tree with every kind of node, an empty and a nested directory, and a large file."""
    (root / "bin").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"hello\n")
    (root / "zero").write_bytes(b"")
    run = root / "bin" / "run"
    run.write_bytes(b"#!/bin/sh\necho hi\n")
    run.chmod(0o755)
    (root / "empty").mkdir()
    (root / "nested" / "deep").mkdir(parents=True)
    (root / "nested" / "deep" / "x").write_bytes(b"x" * 1000)
    (root / "link").symlink_to("a.txt")
    (root / "nested" / "up").symlink_to("../../elsewhere")
    (root / "big.bin").write_bytes(big)


async def listing(dirs: DirectoryService, node: Node) -> object:
    """The tree under ``node`` as nested dicts and tuples."""
    if isinstance(node, FileNode):
        return ("file", node.size, node.executable, node.digest.hex())
    if isinstance(node, SymlinkNode):
        return ("symlink", node.target)
    directory = await dirs.get(node.digest)
    assert directory is not None
    return {name: await listing(dirs, child) for name, child in directory}


async def memory_stores() -> tuple[BlobService, MemoryDirectoryService]:
    dirs = await directory_service_from_url("memory://")
    assert isinstance(dirs, MemoryDirectoryService)
    return await blob_service_from_url("memory://"), dirs


@pytest_asyncio.fixture
async def blobs() -> BlobService:
    return await blob_service_from_url("memory://")


@pytest_asyncio.fixture
async def dirs() -> MemoryDirectoryService:
    svc = await directory_service_from_url("memory://")
    assert isinstance(svc, MemoryDirectoryService)
    return svc


def b3file(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


# -- well-formed archives --------------------------------------------------------------


async def test_tree(tmp_path: Path, blobs: BlobService, dirs: MemoryDirectoryService) -> None:
    tar = (
        TarBuilder(pax_headers={"comment": "a global PAX header"})  # like `git archive` writes
        .dir("top")
        .file("top/a.txt", b"hello\n")
        .file("top/bin/run", b"#!/bin/sh\n", mode=0o755)
        .file("top/bin/not-mine", b"#!/bin/sh\n", mode=0o655)  # only the owner's x bit counts
        .file("top/old-style", b"hello\n", kind=tarfile.AREGTYPE)
        .file("top/contiguous", b"c" * 600, mode=0o700, kind=tarfile.CONTTYPE)
        .symlink("top/link", "a.txt")
        .dir("top/empty")
        .file("top/nested/deep/x", b"x" * 1000)
        .data()
    )
    node = await ingest_archive(write(tmp_path / "t.tar", tar), blobs, dirs)
    assert isinstance(node, DirectoryNode)
    assert await listing(dirs, node) == {
        b"a.txt": ("file", 6, False, b3file(b"hello\n")),
        b"bin": {
            b"not-mine": ("file", 10, False, b3file(b"#!/bin/sh\n")),
            b"run": ("file", 10, True, b3file(b"#!/bin/sh\n")),
        },
        b"contiguous": ("file", 600, True, b3file(b"c" * 600)),
        b"empty": {},
        b"link": ("symlink", b"a.txt"),
        b"nested": {b"deep": {b"x": ("file", 1000, False, b3file(b"x" * 1000))}},
        b"old-style": ("file", 6, False, b3file(b"hello\n")),
    }
    empty = await dirs.get(node.digest)
    assert empty is not None
    assert empty.get(b"empty") == Directory().node(SizeRule.TVIX)
    assert await blobs.read(B3Digest(bytes.fromhex(b3file(b"hello\n")))) == b"hello\n"


@pytest.mark.parametrize("compression", COMPRESSIONS)
async def test_same_as_ingest_path(tmp_path: Path, compression: str) -> None:
    big = os.urandom(BIG)
    make_tree(tmp_path / "tree", big)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.add(tmp_path / "tree", arcname="tree")
    archive = write(tmp_path / "archive", compress(buf.getvalue(), compression))  # no telling suffix

    blobs, dirs = await memory_stores()
    node = await ingest_archive(archive, blobs, dirs)
    expected = await ingest_path(tmp_path / "tree", *await memory_stores())
    assert node == expected
    assert isinstance(node, DirectoryNode)
    root = await dirs.get(node.digest)
    assert root is not None
    big_node = root.get(b"big.bin")
    assert isinstance(big_node, FileNode)
    assert big_node.size == BIG
    assert await blobs.read(big_node.digest) == big


async def test_implicit_parents(blobs: BlobService, dirs: MemoryDirectoryService) -> None:
    explicit = TarBuilder().dir("top").dir("top/a").dir("top/a/b").file("top/a/b/f", b"1").file("top/g", b"2").data()
    implicit = TarBuilder().file("top/a/b/f", b"1").file("top/g", b"2").data()
    node = await ingest_archive(io.BytesIO(implicit), blobs, dirs)
    assert node == await ingest_archive(io.BytesIO(explicit), *await memory_stores())
    assert await listing(dirs, node) == {
        b"a": {b"b": {b"f": ("file", 1, False, b3file(b"1"))}},
        b"g": ("file", 1, False, b3file(b"2")),
    }


async def test_directory_after_its_contents_and_dot_paths(blobs: BlobService, dirs: MemoryDirectoryService) -> None:
    tar = (
        TarBuilder()
        .dir("./")
        .file("./top/./a", b"a")
        .dir("top/sub/..//sub")
        .file("top/sub/b", b"b")
        .dir("./top")
        .file("top/sub/../c", b"c")
        .data()
    )
    node = await ingest_archive(io.BytesIO(tar), blobs, dirs)
    assert await listing(dirs, node) == {
        b"a": ("file", 1, False, b3file(b"a")),
        b"c": ("file", 1, False, b3file(b"c")),
        b"sub": {b"b": ("file", 1, False, b3file(b"b"))},
    }


async def test_replaced_entries(blobs: BlobService, dirs: MemoryDirectoryService) -> None:
    tar = (
        TarBuilder()
        .file("top/f", b"first")
        .file("top/f", b"second", mode=0o755)  # file replaces file
        .file("top/d/old", b"old")
        .file("top/d", b"now a file")  # file replaces directory and its contents
        .symlink("top/s", "x")
        .dir("top/s")  # directory replaces symlink
        .file("top/s/in", b"in")
        .file("top/p", b"p")
        .file("top/p/q", b"q")  # an implicit parent replaces a file
        .dir("top/m")
        .file("top/m/1", b"1")
        .dir("top/m")  # directories merge
        .file("top/m/2", b"2")
        .data()
    )
    node = await ingest_archive(io.BytesIO(tar), blobs, dirs)
    assert await listing(dirs, node) == {
        b"d": ("file", 10, False, b3file(b"now a file")),
        b"f": ("file", 6, True, b3file(b"second")),
        b"m": {b"1": ("file", 1, False, b3file(b"1")), b"2": ("file", 1, False, b3file(b"2"))},
        b"p": {b"q": ("file", 1, False, b3file(b"q"))},
        b"s": {b"in": ("file", 2, False, b3file(b"in"))},
    }
    # The replaced file's blob was still uploaded.
    assert await blobs.read(B3Digest(bytes.fromhex(b3file(b"first")))) == b"first"


async def test_non_utf8_and_long_names(blobs: BlobService, dirs: MemoryDirectoryService) -> None:
    long = "n" * 255
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        tar = TarBuilder(fmt).file("top/caf\udce9", b"latin-1").file(f"top/{long}/{long}", b"deep").data()
        node = await ingest_archive(io.BytesIO(tar), blobs, dirs)
        name = long.encode()
        assert await listing(dirs, node) == {
            b"caf\xe9": ("file", 7, False, b3file(b"latin-1")),
            name: {name: ("file", 4, False, b3file(b"deep"))},
        }


class _RecordingWriter(BlobWriter):
    def __init__(self, inner: BlobWriter, sizes: list[int]) -> None:
        self._inner = inner
        self._sizes = sizes

    async def write(self, data: bytes) -> None:
        self._sizes.append(len(data))
        await self._inner.write(data)

    async def close(self) -> B3Digest:
        return await self._inner.close()

    async def abort(self) -> None:
        await self._inner.abort()


class RecordingBlobService(MemoryBlobService):
    """Remembers the sizes of the writes of every blob written."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[list[int]] = []

    async def open_write(self, expected_size: int | None = None) -> BlobWriter:
        sizes: list[int] = []
        self.writes.append(sizes)
        return _RecordingWriter(await super().open_write(expected_size), sizes)


async def test_large_member_streams_in_blocks(dirs: MemoryDirectoryService) -> None:
    big = os.urandom(BIG)
    small = [bytes([i]) * (1000 + i) for i in range(20)]
    builder = TarBuilder()
    for i, data in enumerate(small):
        builder.file(f"top/s{i}", data)
    tar = builder.file("top/big", big).file("top/after", b"after").data()
    blobs = RecordingBlobService()
    seen: list[int] = []
    node = await ingest_archive(io.BytesIO(tar), blobs, dirs, progress=seen.append)
    assert sum(seen) == BIG + sum(map(len, small)) + 5
    big_writes = [w for w in blobs.writes if sum(w) == BIG]
    assert len(big_writes) == 1
    assert len(big_writes[0]) >= 2
    assert max(big_writes[0]) <= 4 << 20
    root = await dirs.get(node.digest) if isinstance(node, DirectoryNode) else None
    assert root is not None
    big_node = root.get(b"big")
    assert isinstance(big_node, FileNode)
    reader = await blobs.open_read(big_node.digest)
    assert reader is not None
    async with reader:
        assert b"".join([block async for block in reader.iter_blocks(1 << 20)]) == big


async def test_local_backends(tmp_path: Path) -> None:
    make_tree(tmp_path / "tree", os.urandom(300 << 10))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(tmp_path / "tree", arcname="tree")
    archive = write(tmp_path / "tree.tgz", buf.getvalue())
    blobs = await blob_service_from_url(f"objectstore+file://{tmp_path}/blobs")
    dirs = await directory_service_from_url(f"sqlite://{tmp_path}/d.sqlite")
    try:
        node = await ingest_archive(archive, blobs, dirs)
        assert node == await ingest_path(tmp_path / "tree", *await memory_stores())
        assert isinstance(node, DirectoryNode)
        digests = [d.digest async for d in dirs.get_recursive(node.digest)]
        assert digests[0] == node.digest
        assert len(digests) == 5  # tree, bin, empty, nested, nested/deep
        root = await dirs.get(node.digest)
        assert root is not None
        a = root.get(b"a.txt")
        assert isinstance(a, FileNode)
        assert await blobs.read(a.digest) == b"hello\n"
    finally:
        await blobs.close()
        await dirs.close()


async def test_file_object_sources(tmp_path: Path) -> None:
    tar = compress(TarBuilder().file("top/a", b"a" * 5000).symlink("top/l", "a").data(), "xz")
    expected = await ingest_archive(io.BytesIO(tar), *await memory_stores())

    # An open file, read from its current position and left open.
    path = write(tmp_path / "x", b"junk" + tar)
    with path.open("rb") as f:
        f.seek(4)
        assert await ingest_archive(f, *await memory_stores()) == expected
        assert not f.closed

    # A pipe, which hands out short reads.
    r, w = os.pipe()

    def feed() -> None:
        with os.fdopen(w, "wb", buffering=0) as out:
            for i in range(0, len(tar), 3):
                out.write(tar[i : i + 3])

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        with os.fdopen(r, "rb", buffering=0) as source:
            assert await ingest_archive(source, *await memory_stores()) == expected
    finally:
        feeder.join()


async def test_multi_frame_and_skippable_zstd(blobs: BlobService, dirs: MemoryDirectoryService) -> None:
    tar = TarBuilder().file("top/a", os.urandom(100_000)).file("top/b", b"b").data()
    expected = await ingest_archive(io.BytesIO(tar), *await memory_stores())
    cctx = zstandard.ZstdCompressor(level=1, write_checksum=True)
    frames = cctx.compress(tar[:70_000]) + cctx.compress(tar[70_000:])
    skippable = b"\x50\x2a\x4d\x18" + (3).to_bytes(4, "little") + b"abc"
    assert await ingest_archive(io.BytesIO(skippable + frames + skippable), blobs, dirs) == expected


async def test_multi_member_gzip(blobs: BlobService, dirs: MemoryDirectoryService) -> None:
    tar = TarBuilder().file("top/a", b"a" * 3000).data()
    expected = await ingest_archive(io.BytesIO(tar), *await memory_stores())
    assert await ingest_archive(io.BytesIO(gzip.compress(tar[:1000]) + gzip.compress(tar[1000:])), blobs, dirs) == (
        expected
    )


async def test_missing_end_of_archive_blocks_is_accepted(blobs: BlobService, dirs: MemoryDirectoryService) -> None:
    tar = TarBuilder(tarfile.USTAR_FORMAT).file("top/a", b"a" * 100).data()
    expected = await ingest_archive(io.BytesIO(tar), *await memory_stores())
    assert await ingest_archive(io.BytesIO(tar[:1024]), blobs, dirs) == expected  # header + one data block


# -- bad archives ----------------------------------------------------------------------------


async def assert_refused(
    data: bytes, match: str, blobs: BlobService, dirs: MemoryDirectoryService, tmp_path: Path
) -> None:
    with pytest.raises(IngestError, match=match):
        await ingest_archive(io.BytesIO(data), blobs, dirs)
    assert dirs._data == {}
    # Also from a file, named in the error.
    with pytest.raises(IngestError, match=r"bad\.tar: "):
        await ingest_archive(write(tmp_path / "bad.tar", data), blobs, dirs)
    assert dirs._data == {}


def valid_prefix() -> TarBuilder:
    """Some good members, so an error comes after work was done."""
    return TarBuilder().dir("top").file("top/a", b"a").file("top/sub/b", b"b" * 300_000)


BAD_MEMBERS: dict[str, tuple[Callable[[TarBuilder], TarBuilder], str]] = {
    "dotdot": (lambda t: t.file("top/../../x", b"x"), r"top/\.\./\.\./x: escapes the archive root"),
    "dotdot-dir": (lambda t: t.dir("top/sub/../../.."), r"escapes the archive root"),
    "absolute": (lambda t: t.file("/etc/passwd", b"x"), r"/etc/passwd: absolute path"),
    "hardlink": (lambda t: t.special("top/h", tarfile.LNKTYPE, "top/a"), r"top/h: cannot import a hard link"),
    "fifo": (lambda t: t.special("top/p", tarfile.FIFOTYPE), r"top/p: cannot import a FIFO"),
    "chardev": (lambda t: t.special("top/c", tarfile.CHRTYPE), r"top/c: cannot import a character device"),
    "blockdev": (lambda t: t.special("top/b", tarfile.BLKTYPE), r"top/b: cannot import a block device"),
    "unknown-type": (lambda t: t.special("top/v", b"V"), r"top/v: cannot import a member of type b'V'"),
    "long-name": (lambda t: t.file("top/" + "n" * 256, b"x"), r"invalid name .*longer than 255 bytes"),
    "empty-symlink": (lambda t: t.symlink("top/l", ""), r"top/l: invalid symlink target b'': empty"),
    "root-file": (lambda t: t.file("top/..", b"x"), r"top/\.\.: names the archive root"),
    # Issue 16, defect 9: a member below a symlink silently turned the symlink into a directory.
    "below-symlink": (
        lambda t: t.symlink("top/s", "/etc").file("top/s/x", b"x"),
        r"top/s/x: is below top/s, which is a symlink",
    ),
    "below-symlink-deeper": (
        lambda t: t.symlink("top/s", "elsewhere").dir("top/s/d/e"),
        r"top/s/d/e: is below top/s, which is a symlink",
    ),
    "second-top-level": (lambda t: t.file("other", b"x"), r"exactly one top-level directory, got 2 entries"),
    "top-level-file": (lambda t: t.file("top", b"x"), r"exactly one top-level directory, got a file 'top'"),
}


@pytest.mark.parametrize("case", sorted(BAD_MEMBERS))
async def test_bad_member(case: str, tmp_path: Path, blobs: BlobService, dirs: MemoryDirectoryService) -> None:
    add, match = BAD_MEMBERS[case]
    await assert_refused(add(valid_prefix()).data(), match, blobs, dirs, tmp_path)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: TarBuilder(), r"exactly one top-level directory, got nothing"),
        (lambda: TarBuilder().dir("./"), r"exactly one top-level directory, got nothing"),
        (lambda: TarBuilder().file("a").file("b").dir("c"), r"got 3 entries \('a', 'b', 'c'\)"),
        (lambda: TarBuilder().file("f", b"x"), r"got a file 'f'"),
        (lambda: TarBuilder().symlink("s", "t"), r"got a symlink 's'"),
    ],
)
async def test_bad_top_level(
    build: Callable[[], TarBuilder], match: str, tmp_path: Path, blobs: BlobService, dirs: MemoryDirectoryService
) -> None:
    await assert_refused(build().data(), match, blobs, dirs, tmp_path)


def good_archive() -> bytes:
    return valid_prefix().file("top/c", os.urandom(50_000)).file("top/z", b"z").data()


def corrupt(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


DAMAGED: dict[str, Callable[[], bytes]] = {
    "empty-file": lambda: b"",
    "garbage": lambda: b"garbage " * 400,
    "cut-in-member": lambda: good_archive()[:100_000],
    "cut-in-small-member": lambda: good_archive()[:1024],
    "cut-in-header": lambda: good_archive()[: 1536 + 100],
    "bad-header-checksum": lambda: corrupt(good_archive(), 1536 + 10),
    "gz-cut": lambda: compress(good_archive(), "gz")[:-5],
    "gz-cut-in-trailer": lambda: compress(good_archive(), "gz")[:-1],
    "gz-corrupt": lambda: corrupt(compress(good_archive(), "gz"), 5000),
    "gz-bad-crc": lambda: corrupt(compress(good_archive(), "gz"), -6),
    "bz2-cut": lambda: compress(good_archive(), "bz2")[:-5],
    "xz-cut": lambda: compress(good_archive(), "xz")[:-5],
    "xz-corrupt": lambda: corrupt(compress(good_archive(), "xz"), 5000),
    "zst-cut": lambda: compress(good_archive(), "zst")[:-1],
    "zst-cut-early": lambda: compress(good_archive(), "zst")[:3000],
    "zst-corrupt": lambda: corrupt(compress(good_archive(), "zst"), 5000),
    "zst-trailing-garbage": lambda: compress(good_archive(), "zst") + b"garbage!",
    "zst-cut-skippable": lambda: compress(good_archive(), "zst") + b"\x50\x2a\x4d\x18\x10\x00\x00\x00abc",
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
async def test_damaged_archive(case: str, tmp_path: Path, blobs: BlobService, dirs: MemoryDirectoryService) -> None:
    await assert_refused(DAMAGED[case](), r"invalid or truncated .*archive", blobs, dirs, tmp_path)


async def test_zst_cut_anywhere(blobs: BlobService, dirs: MemoryDirectoryService) -> None:
    # Members of exactly 128 KiB (header and data) fill exactly one zstd block each, so
    # cutting the compressed stream between blocks cuts the tar between members.
    builder = TarBuilder(tarfile.USTAR_FORMAT)
    for i in range(6):
        builder.file(f"top/f{i}", os.urandom((128 << 10) - 512))
    data = compress(builder.data(), "zst")
    for cut in range(4, len(data), 1009):
        with pytest.raises(IngestError, match="invalid or truncated"):
            await ingest_archive(io.BytesIO(data[:cut]), blobs, dirs)
    assert dirs._data == {}


class StuckBlobService(MemoryBlobService):
    """Accepts small blobs; the writes of large ones never finish."""

    def __init__(self) -> None:
        super().__init__()
        self.stuck = asyncio.Event()

    async def open_write(self, expected_size: int | None = None) -> BlobWriter:
        writer = await super().open_write(expected_size)
        if expected_size is None or expected_size < 1 << 20:
            return writer
        stuck = self.stuck

        class Stuck(_RecordingWriter):
            async def write(self, data: bytes) -> None:
                stuck.set()
                await asyncio.Event().wait()

        return Stuck(writer, [])


async def test_cancel(dirs: MemoryDirectoryService) -> None:
    tar = TarBuilder().file("top/a", b"a").file("top/big", os.urandom(BIG)).data()
    blobs = StuckBlobService()
    task = asyncio.create_task(ingest_archive(io.BytesIO(tar), blobs, dirs))
    await asyncio.wait_for(blobs.stuck.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    assert dirs._data == {}


async def test_unreadable_path(tmp_path: Path, blobs: BlobService, dirs: MemoryDirectoryService) -> None:
    with pytest.raises(IngestError, match=r"missing\.tar: cannot open"):
        await ingest_archive(tmp_path / "missing.tar", blobs, dirs)


async def test_error_leaves_sqlite_empty(tmp_path: Path) -> None:
    tar = valid_prefix().special("top/h", tarfile.LNKTYPE, "top/a").data()
    blobs = await blob_service_from_url(f"objectstore+file://{tmp_path}/blobs")
    dirs = await directory_service_from_url(f"sqlite://{tmp_path}/d.sqlite")
    try:
        with pytest.raises(IngestError, match="hard link"):
            await ingest_archive(io.BytesIO(tar), blobs, dirs)
    finally:
        await blobs.close()
        await dirs.close()
    with sqlite3.connect(tmp_path / "d.sqlite") as db:
        assert db.execute("SELECT count(*) FROM directories").fetchone() == (0,)

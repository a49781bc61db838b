"""NarSource: size, checks, stream and ranges of a root node's NAR, on every kind of blob service."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import blake3
import pytest

from nixcas.castore.blob.base import BlobService
from nixcas.castore.blob.local import LocalBlobService
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.blob.packed import PackedBlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.ingest import ingest_path
from nixcas.castore.nodes import FileNode, Node
from nixcas.errors import ChecksumMismatch, NotFoundError
from nixcas.store.nar import bulk
from nixcas.store.nar.plan import BlobSizeMismatch, NarContentNotFound
from nixcas.store.nar.source import NarSource
from nixcas.testing import packed


def _str(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little") + data + bytes(-len(data) % 8)


def nar_of(path: Path) -> bytes:
    """The NAR of ``path``, written here from the format's definition (independent of the code under test)."""

    def node(p: Path) -> bytes:
        if p.is_symlink():
            return _str(b"type") + _str(b"symlink") + _str(b"target") + _str(os.readlink(p).encode())
        if p.is_file():
            exe = _str(b"executable") + _str(b"") if os.access(p, os.X_OK) else b""
            return _str(b"type") + _str(b"regular") + exe + _str(b"contents") + _str(p.read_bytes())
        out = _str(b"type") + _str(b"directory")
        for child in sorted(p.iterdir(), key=lambda c: c.name.encode()):
            out += _str(b"entry") + _str(b"(") + _str(b"name") + _str(child.name.encode())
            out += _str(b"node") + _str(b"(") + node(child) + _str(b")") + _str(b")")
        return out

    return _str(b"nix-archive-1") + _str(b"(") + node(path) + _str(b")")


BIG = 1 << 20


def write_tree(root: Path) -> None:
    rng = random.Random(20)  # noqa: S311
    files = {f"d{i // 30}/f{i:03d}": rng.randbytes(rng.randint(1, 4000)) for i in range(90)}
    files["a/twice-1"] = files["a/twice-2"] = b"one blob, two files\n"
    files["a/empty"] = b""
    files["a/exe"] = b"#!/bin/sh\n"
    files["m/medium"] = rng.randbytes(300 << 10)
    files["m/big"] = rng.randbytes(BIG)
    files["z/last"] = b"after the big one"
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "a/exe").chmod(0o755)
    (root / "a/link").symlink_to("exe")
    (root / "empty-dir").mkdir()


def make_blobs(kind: str, root: Path) -> BlobService:
    if kind == "memory":
        return MemoryBlobService()
    if kind == "objectstore":
        return LocalBlobService(root)
    return PackedBlobService(root, compress=kind == "packed-compressed")


@pytest.fixture(params=["packed", "packed-compressed", "objectstore", "memory"])
async def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobService]:
    service = make_blobs(request.param, tmp_path / "blobs")
    yield service
    await service.close()


async def tree_in(tmp_path: Path, blobs: BlobService) -> tuple[Node, DirectoryService, bytes]:
    write_tree(tmp_path / "tree")
    directories = MemoryDirectoryService()
    node = await ingest_path(tmp_path / "tree", blobs, directories)
    return node, directories, nar_of(tmp_path / "tree")


async def collect(source: NarSource) -> tuple[bytes, BaseException | None]:
    """What the stream yielded, and the error it ended with (if any)."""
    parts: list[bytes] = []
    try:
        async for piece in source.stream():
            parts.append(bytes(piece))
    except Exception as e:
        return b"".join(parts), e
    return b"".join(parts), None


async def test_every_answer_agrees_with_the_nar(blobs: BlobService, tmp_path: Path) -> None:
    node, directories, nar = await tree_in(tmp_path, blobs)
    source = NarSource(node, blobs, directories)
    assert await source.size() == len(nar)
    await source.check()
    assert await source.present()
    assert await collect(source) == (nar, None)
    assert await source.size_sha256() == (len(nar), hashlib.sha256(nar).digest())
    for start, length in [(0, 1), (0, len(nar)), (100, 70_000), (len(nar) - 5, 100), (len(nar) // 2, BIG)]:
        got = b"".join([piece async for piece in source.range(start, length)])
        assert got == nar[start : start + length]


async def test_big_files_stream_in_steps_through_a_small_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bulk, "WHOLE_MAX", 256 << 10)  # the medium and big files go chunk by chunk
    monkeypatch.setattr(bulk, "STEP", 100 << 10)
    monkeypatch.setattr(bulk, "WINDOW_BYTES", 20_000)
    monkeypatch.setattr(bulk, "RUN_BYTES", 5_000)
    monkeypatch.setattr(bulk, "JOBS_AHEAD", 2)
    blobs = PackedBlobService(tmp_path / "blobs")
    try:
        node, directories, nar = await tree_in(tmp_path, blobs)
        assert await collect(NarSource(node, blobs, directories)) == (nar, None)
    finally:
        await blobs.close()


def contents_offset(nar: bytes, data: bytes) -> int:
    """Where ``data`` (unique in the NAR, preceded by its length) begins."""
    return nar.index(len(data).to_bytes(8, "little") + data) + 8


@pytest.mark.parametrize(("damaged", "whole_max"), [("d1/f050", bulk.WHOLE_MAX), ("m/big", 512 << 10), ("m/big", BIG)])
async def test_damage_is_never_yielded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damaged: str, whole_max: int
) -> None:
    """A flipped byte: the stream yields a correct prefix, stops before the damaged bytes and says why."""
    monkeypatch.setattr(bulk, "WHOLE_MAX", whole_max)  # 512 KiB: the big file is read chunk by chunk
    monkeypatch.setattr(bulk, "STEP", 64 << 10)
    root = tmp_path / "blobs"
    blobs = PackedBlobService(root)
    try:
        node, directories, nar = await tree_in(tmp_path, blobs)
        data = (tmp_path / "tree" / damaged).read_bytes()
        digest = B3Digest(blake3.blake3(data).digest())
        if len(data) <= blobs.inline_max:
            assert packed.corrupt_blob(root, digest, data[:-1] + bytes([data[-1] ^ 1]), compress=False)
        else:  # one byte of the last chunk object (a zstd frame of raw blocks: still a valid frame)
            h = ((await blobs.chunks(digest)) or [])[-1].digest.hex()
            path = root / "chunks" / "b3" / h[:4] / h
            stored = bytearray(path.read_bytes())
            stored[-10] ^= 1
            path.write_bytes(bytes(stored))
        yielded, error = await collect(NarSource(node, blobs, directories))
        assert isinstance(error, ChecksumMismatch)
        assert nar.startswith(yielded)
        start = contents_offset(nar, data)
        assert start - 200 < len(yielded) <= start + len(data) - 10  # up to the file, never the damaged byte
    finally:
        await blobs.close()


@pytest.mark.parametrize("kind", ["packed", "objectstore", "memory"])
async def test_a_missing_blob(kind: str, tmp_path: Path) -> None:
    blobs = make_blobs(kind, tmp_path / "blobs")
    try:
        await check_a_missing_blob(blobs, tmp_path)
    finally:
        await blobs.close()


async def check_a_missing_blob(blobs: BlobService, tmp_path: Path) -> None:
    node, directories, nar = await tree_in(tmp_path, blobs)
    data = (tmp_path / "tree" / "d2/f070").read_bytes()
    if isinstance(blobs, PackedBlobService):
        assert packed.delete_blob(tmp_path / "blobs", blake3.blake3(data).digest())
    elif isinstance(blobs, MemoryBlobService):
        del blobs._blobs[B3Digest(blake3.blake3(data).digest())]  # what a lost blob looks like
    else:
        h = blake3.blake3(data).hexdigest()
        for d, _, names in os.walk(tmp_path / "blobs"):  # the object and whatever else is kept under its digest
            if h in names:
                (Path(d) / h).unlink()
    source = NarSource(node, blobs, directories)
    assert not await source.present()
    with pytest.raises(NotFoundError):
        await source.check()
    assert await source.size() == len(nar)  # known from the directories alone
    yielded, error = await collect(source)
    assert isinstance(error, NarContentNotFound)
    assert "/d2/f070" in str(error)
    assert nar.startswith(yielded), (len(yielded), contents_offset(nar, data))
    if blobs.bulk_reads() is not None:  # everything up to the file (render_nar may hold back its last output chunk)
        assert len(yielded) == contents_offset(nar, data), (len(yielded), contents_offset(nar, data))


async def test_a_missing_directory(tmp_path: Path) -> None:
    blobs = MemoryBlobService()
    node, _, _ = await tree_in(tmp_path, blobs)
    source = NarSource(node, blobs, MemoryDirectoryService())
    assert not await source.present()
    with pytest.raises(NarContentNotFound):
        await source.size()


async def test_a_file_node_that_contradicts_its_blob(blobs: BlobService) -> None:
    data = b"x" * 5000
    digest = await blobs.put(data)
    for declared in (4999, 5001):
        source = NarSource(FileNode(digest, declared), blobs, MemoryDirectoryService())
        with pytest.raises(BlobSizeMismatch):
            await source.check()
        _, error = await collect(source)
        assert isinstance(error, BlobSizeMismatch)
    good = NarSource(FileNode(digest, 5000), blobs, MemoryDirectoryService())
    assert (await collect(good))[0] == _str(b"nix-archive-1") + _str(b"(") + _str(b"type") + _str(b"regular") + _str(
        b"contents"
    ) + _str(data) + _str(b")")


async def test_a_stream_closed_early_leaves_the_worker_free(tmp_path: Path) -> None:
    blobs = PackedBlobService(tmp_path / "blobs")
    try:
        node, directories, nar = await tree_in(tmp_path, blobs)
        for _ in range(3):
            stream = NarSource(node, blobs, directories).stream()
            assert nar.startswith(bytes(await anext(stream)))
            await stream.aclose()
        assert await collect(NarSource(node, blobs, directories)) == (nar, None)
    finally:
        await blobs.close()


async def test_a_chunk_list_that_does_not_make_the_blob(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every chunk intact but listed in the wrong order: the blob's digest catches it before its end is yielded."""
    monkeypatch.setattr(bulk, "WHOLE_MAX", 256 << 10)
    monkeypatch.setattr(bulk, "STEP", 64 << 10)
    blobs = PackedBlobService(tmp_path / "blobs")
    try:
        node, directories, nar = await tree_in(tmp_path, blobs)
        data = (tmp_path / "tree" / "m/big").read_bytes()
        digest = B3Digest(blake3.blake3(data).digest())
        listed = (await blobs.chunks(digest)) or []
        assert len(listed) >= 3
        real_chunks = blobs.chunks

        async def swapped(asked: B3Digest) -> object:
            if asked == digest:
                return [listed[1], listed[0], *listed[2:]]
            return await real_chunks(asked)

        monkeypatch.setattr(blobs, "chunks", swapped)
        yielded, error = await collect(NarSource(node, blobs, directories))
        assert isinstance(error, ChecksumMismatch)
        assert "/m/big" in str(error)
        start = contents_offset(nar, data)
        assert len(yielded) <= start + len(data) - listed[-1].size  # the last chunk never went out
        assert yielded[:start] == nar[:start]
    finally:
        await blobs.close()


async def test_the_bridge_serves_the_bulk_stream(tmp_path: Path) -> None:
    """Over HTTP from the embedded store: whole, ranges, HEAD, and a damaged blob cuts the body short."""
    import aiohttp
    from aiohttp.test_utils import TestClient, TestServer

    from nixcas.bridge.app import NarBridge, nar_url
    from nixcas.store.narindex import NarIndex
    from nixcas.store.pathinfo.memory import MemoryPathInfoService

    root = tmp_path / "blobs"
    blobs = PackedBlobService(root)
    try:
        node, directories, nar = await tree_in(tmp_path, blobs)
        bridge = NarBridge(blobs, directories, MemoryPathInfoService(), NarIndex(None))
        url = "/" + nar_url(node, len(nar))
        identity = {"Accept-Encoding": "identity"}
        async with TestClient(TestServer(bridge.application())) as client:
            response = await client.get(url, headers=identity)
            assert response.status == 200 and response.content_length == len(nar)
            assert await response.read() == nar
            response = await client.get(url, headers={"Accept-Encoding": "gzip"})
            assert response.headers["Content-Encoding"] == "gzip" and await response.read() == nar
            response = await client.get(url, headers={"Range": "bytes=1000-400000"})
            assert response.status == 206 and await response.read() == nar[1000:400001]
            response = await client.head(url)
            assert response.status == 200 and response.content_length == len(nar)
            data = (tmp_path / "tree" / "d2/f070").read_bytes()
            assert packed.corrupt_blob(root, B3Digest(blake3.blake3(data).digest()), b"x" * len(data), compress=False)
            response = await client.get(url, headers=identity)
            assert response.status == 200  # the sizes still agree: the damage shows only when read
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
    finally:
        await blobs.close()


async def test_calculate_nar_reads_through_the_source(tmp_path: Path) -> None:
    from nixcas.store.nar.hashing import SimpleNarCalculationService

    blobs = PackedBlobService(tmp_path / "blobs")
    try:
        node, directories, nar = await tree_in(tmp_path, blobs)
        service = SimpleNarCalculationService(blobs, directories)
        assert await service.calculate_nar(node) == (len(nar), hashlib.sha256(nar).digest())
    finally:
        await blobs.close()

"""Content-defined chunking in ``objectstore+file``: layout, dedup, write order and bad chunks.

Expected chunk boundaries come from ``pyfastcdc`` called directly with the
snix parameters (not through nixcas), digests from the ``blake3`` package,
and index bytes from the hand encoder of ``test_blobservice``.
"""

from __future__ import annotations

import io
import json
import random
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import blake3
import pytest
import pytest_asyncio
import zstandard
from pyfastcdc import FastCDC
from test_blobservice import files_under, key_path, stat_blob_response, write_chunked_blob, write_object

from nixcas.castore.blob.base import ChunkMeta
from nixcas.castore.blob.chunking import Chunker
from nixcas.castore.blob.local import LocalBlobService
from nixcas.castore.digest import B3Digest
from nixcas.errors import ChecksumMismatch, StorageError, ValidationError

SNIX_CDC = {"min_size": 128 << 10, "max_size": 512 << 10, "normalized_chunking": 1}


def b3(data: bytes) -> B3Digest:
    return B3Digest(blake3.blake3(data).digest())


def noise(seed: bytes, size: int) -> bytes:
    return blake3.blake3(seed).digest(length=size)


def snix_chunks(data: bytes) -> list[bytes]:
    """The chunks snix's FastCDC 2020 (avg 256 KiB, min 128 KiB, max 512 KiB, NC 1) cuts ``data`` into."""
    return [bytes(c.data) for c in FastCDC(256 << 10, **SNIX_CDC).cut_buf(data)]  # type: ignore[arg-type]


def unzstd(data: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


@pytest_asyncio.fixture
async def local(tmp_path: Path) -> AsyncIterator[LocalBlobService]:
    svc = LocalBlobService(tmp_path / "objects")
    yield svc
    await svc.close()


async def write_in_pieces(svc: LocalBlobService, data: bytes, seed: int = 1) -> B3Digest:
    rng = random.Random(seed)  # noqa: S311 - reproducible test data
    async with await svc.open_write() as writer:
        pos = 0
        while pos < len(data):
            n = rng.choice([1, 100, 4096, 65536, 300_000, 1 << 20])
            await writer.write(data[pos : pos + n])
            pos += n
        return await writer.close()


# -- the chunker -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_chunker_feeds_match_one_pass(seed: int) -> None:
    data = noise(b"chunker %d" % seed, 7 * (1 << 20) + seed * 12345)
    chunker = Chunker()
    rng = random.Random(seed)  # noqa: S311 - reproducible test data
    got: list[bytes] = []
    pos = 0
    while pos < len(data):
        n = rng.randrange(1, 700_000)
        got += map(bytes, chunker.feed(data[pos : pos + n]))
        assert chunker.buffered <= 2 * (512 << 10) + n
        pos += n
    got += map(bytes, chunker.finish())
    assert got == snix_chunks(data)
    assert all((128 << 10) <= len(c) <= (512 << 10) for c in got[:-1])


# -- layout ------------------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["writer", "put"])
async def test_chunked_layout(local: LocalBlobService, tmp_path: Path, via: str) -> None:
    data = noise(b"layout", 5 * (1 << 20) + 777)
    digest = await (write_in_pieces(local, data) if via == "writer" else local.put(data))
    assert digest == b3(data)
    expected = snix_chunks(data)
    assert len(expected) >= 10
    root = tmp_path / "objects"
    # the index: a StatBlobResponse listing the chunks, byte for byte what the hand encoder makes
    assert key_path(root, "blobs", digest).read_bytes() == stat_blob_response([(b3(c), len(c)) for c in expected])
    for c in expected:
        assert unzstd(key_path(root, "chunks", b3(c)).read_bytes()) == c
    assert not key_path(root, "chunks", digest).exists()
    assert len(files_under(root / "chunks")) == len({b3(c) for c in expected})
    assert files_under(root / "tmp") == []
    assert await local.chunks(digest) == [ChunkMeta(b3(c), len(c)) for c in expected]
    assert await local.read(digest) == data


@pytest.mark.parametrize("size", [(128 << 10) + 1, 300_000, 512 << 10])
async def test_small_blobs_may_be_one_chunk(local: LocalBlobService, tmp_path: Path, size: int) -> None:
    """Below 2·min a blob is one chunk unless FastCDC cuts it; either way the layout follows snix."""
    data = noise(b"small %d" % size, size)
    digest = await local.put(data)
    expected = snix_chunks(data)
    root = tmp_path / "objects"
    if len(expected) == 1:
        assert key_path(root, "blobs", digest).read_bytes() == b""
        assert unzstd(key_path(root, "chunks", digest).read_bytes()) == data
    else:
        assert await local.chunks(digest) == [ChunkMeta(b3(c), len(c)) for c in expected]
    assert await local.read(digest) == data


async def test_index_written_last_and_chunks_only_if_absent(
    local: LocalBlobService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    root = tmp_path / "objects"
    first = noise(b"v1", 6 << 20)
    await write_in_pieces(local, first)
    inodes = {p: p.stat().st_ino for p in (root / "chunks").rglob("*") if p.is_file()}
    # version 2: 64 KiB changed in the middle
    second = first[: 3 << 20] + noise(b"patch", 65536) + first[(3 << 20) + 65536 :]
    renamed: list[str] = []
    real_rename = os.rename

    def record(src: str, dst: str) -> None:
        renamed.append(dst)
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", record)
    digest = await write_in_pieces(local, second, seed=2)
    assert renamed[-1] == str(key_path(root, "blobs", digest))  # the index last
    assert all("/chunks/" in p for p in renamed[:-1])
    new_chunks = {b3(c) for c in snix_chunks(second)} - {b3(c) for c in snix_chunks(first)}
    assert 1 <= len(new_chunks) <= 3
    assert sorted(renamed[:-1]) == sorted(str(key_path(root, "chunks", d)) for d in new_chunks)
    # chunks already there were not rewritten
    for path, ino in inodes.items():
        assert path.stat().st_ino == ino
    assert await local.read(digest) == second


async def test_writer_memory_is_bounded(local: LocalBlobService) -> None:
    size = 48 << 20
    block = 1 << 20
    tracemalloc.start()
    try:
        async with await local.open_write(size) as writer:
            for i in range(size // block):
                await writer.write(noise(b"mem %d" % i, block))
            digest = await writer.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak
    chunks = await local.chunks(digest)
    assert chunks is not None and sum(c.size for c in chunks) == size


async def test_aborted_chunked_write_leaves_nothing(local: LocalBlobService, tmp_path: Path) -> None:
    root = tmp_path / "objects"
    writer = await local.open_write()
    await writer.write(noise(b"aborted", 4 << 20))
    assert files_under(root / "tmp")  # chunks are staged ...
    await writer.abort()
    assert files_under(root) == []  # ... and gone


# -- snix-written objects ------------------------------------------------------------------------


async def test_reads_streamed_zstd_frames_without_content_size(local: LocalBlobService, tmp_path: Path) -> None:
    """snix compresses with a streaming encoder: frames that do not record their size."""
    root = tmp_path / "objects"
    chunks = snix_chunks(noise(b"snix", 2 << 20))
    for c in chunks:
        out = io.BytesIO()
        with zstandard.ZstdCompressor(level=3).stream_writer(out, closefd=False) as w:
            w.write(c)
        assert zstandard.frame_content_size(out.getvalue()) == -1
        write_object(key_path(root, "chunks", b3(c)), out.getvalue())
    digest = b3(b"".join(chunks))
    write_object(key_path(root, "blobs", digest), stat_blob_response([(b3(c), len(c)) for c in chunks]))
    assert await local.read(digest) == b"".join(chunks)


# -- bad input -------------------------------------------------------------------------------------

CHUNKS = [noise(b"bad %d" % i, 1000 + i) for i in range(4)]


async def test_chunk_not_hashing_to_its_name(local: LocalBlobService, tmp_path: Path) -> None:
    root = tmp_path / "objects"
    blob = write_chunked_blob(root, CHUNKS)
    bad = bytearray(CHUNKS[2])
    bad[5] ^= 1
    key_path(root, "chunks", b3(CHUNKS[2])).write_bytes(zstandard.ZstdCompressor().compress(bytes(bad)))
    reader = await local.open_read(blob)
    assert reader is not None
    async with reader:
        await reader.seek(sum(map(len, CHUNKS[:2])) + 10)  # a range read inside the bad chunk
        with pytest.raises(ChecksumMismatch, match=b3(CHUNKS[2]).hex()):
            await reader.read(5)
    with pytest.raises(ChecksumMismatch):
        await local.read(blob)
    assert await local.read_chunk(ChunkMeta(b3(CHUNKS[1]), len(CHUNKS[1]))) == CHUNKS[1]
    with pytest.raises(ChecksumMismatch):
        await local.read_chunk(ChunkMeta(b3(CHUNKS[2]), len(CHUNKS[2])))


async def test_index_not_adding_up_to_the_blob(local: LocalBlobService, tmp_path: Path) -> None:
    """Every chunk is fine, but together they are another blob: a full read fails at the end."""
    root = tmp_path / "objects"
    for c in CHUNKS:
        write_object(key_path(root, "chunks", b3(c)), zstandard.ZstdCompressor().compress(c))
    claimed = b3(b"something else entirely")
    write_object(key_path(root, "blobs", claimed), stat_blob_response([(b3(c), len(c)) for c in CHUNKS[::-1]]))
    with pytest.raises(ChecksumMismatch):
        await local.read(claimed)


@pytest.mark.parametrize("size", [0, 65 << 20], ids=["empty-chunk", "huge-chunk"])
async def test_index_declaring_impossible_chunk_sizes(local: LocalBlobService, tmp_path: Path, size: int) -> None:
    root = tmp_path / "objects"
    claimed = b3(b"impossible")
    write_object(key_path(root, "blobs", claimed), stat_blob_response([(b3(CHUNKS[0]), size), (b3(CHUNKS[1]), 10)]))
    with pytest.raises(StorageError, match="declares"):
        await local.chunks(claimed)


@pytest.mark.parametrize("records_size", [True, False])
async def test_zstd_bomb(local: LocalBlobService, tmp_path: Path, records_size: bool) -> None:
    """A chunk object that expands far beyond its declared size is refused without expanding it."""
    root = tmp_path / "objects"
    small = [b"a" * 100_000, b"b" * 100_000]
    blob = write_chunked_blob(root, small)
    bomb_input = b"a" * (256 << 20)
    if records_size:
        bomb = zstandard.ZstdCompressor(level=1).compress(bomb_input)
    else:
        out = io.BytesIO()
        with zstandard.ZstdCompressor(level=1).stream_writer(out, closefd=False) as w:
            for i in range(0, len(bomb_input), 1 << 24):
                w.write(bomb_input[i : i + (1 << 24)])
        bomb = out.getvalue()
    del bomb_input
    assert len(bomb) < 100_000
    key_path(root, "chunks", b3(small[0])).write_bytes(bomb)
    tracemalloc.start()
    try:
        with pytest.raises(StorageError, match="expands"):
            await local.read(blob)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


async def test_put_chunk_and_index_refuse_bad_input(local: LocalBlobService) -> None:
    good = ChunkMeta(b3(CHUNKS[0]), len(CHUNKS[0]))
    with pytest.raises(ChecksumMismatch):
        await local.put_chunk(good, CHUNKS[1][: len(CHUNKS[0])])
    with pytest.raises(StorageError):
        await local.put_chunk(good, CHUNKS[0] + b"x")
    assert await local.missing_chunks([good]) == [good]
    await local.put_chunk(good, CHUNKS[0])
    other = ChunkMeta(b3(CHUNKS[1]), len(CHUNKS[1]))
    assert await local.missing_chunks([good, other]) == [other]
    blob = b3(CHUNKS[0] + CHUNKS[1])
    with pytest.raises(StorageError, match="missing chunk"):
        await local.put_index(blob, [good, other])
    assert not await local.has(blob)
    with pytest.raises(ValidationError):
        await local.put_index(blob, [good])
    await local.put_chunk(other, CHUNKS[1])
    await local.put_index(blob, [good, other])
    assert await local.read(blob) == CHUNKS[0] + CHUNKS[1]


# -- the chunked reader ----------------------------------------------------------------------------


async def test_chunked_reader_fetches_each_chunk_once_and_bounds_its_window() -> None:
    import asyncio

    from nixcas.castore.blob.chunked import ChunkedReader

    pieces = [noise(b"piece %d" % i, 1000 + 10 * i) for i in range(20)]
    metas = [ChunkMeta(b3(p), len(p)) for p in pieces]
    by_digest = {b3(p): p for p in pieces}
    fetched: list[int] = []
    in_flight = 0
    most = 0

    async def fetch(meta: ChunkMeta, offset: int) -> bytes:
        nonlocal in_flight, most
        fetched.append(metas.index(meta))
        in_flight += 1
        most = max(most, in_flight)
        try:
            await asyncio.sleep(0.001)
        finally:
            in_flight -= 1
        return by_digest[meta.digest]

    blob = b"".join(pieces)
    reader = ChunkedReader(fetch, metas, window_bytes=3 * 1100)
    async with reader:
        await reader.seek(5000)  # chunk 4 (offsets by binary search), and the window after it
        assert await reader.read(10) == blob[5000:5010]
        assert fetched == [4, 5, 6, 7]
        # seeks and reads inside the current chunk fetch nothing
        await reader.seek(5003)
        assert await reader.read(5) == blob[5003:5008]
        await reader.seek(4990)
        assert await reader.read(3) == blob[4990:4993]
        assert fetched == [4, 5, 6, 7]
        # a sequential read fetches ahead, but never more than the window (3 chunks) beyond the current one
        await reader.seek(0)
        before = len(fetched)
        out = bytearray()
        while data := await reader.read(700):
            out += data
        assert bytes(out) == blob
        assert 2 <= most <= 4
        assert sorted(fetched[before:]) == list(range(20))  # each once


# -- avg_chunk_size (the snix composition field) ----------------------------------------------------


async def test_avg_chunk_size_from_a_composition(tmp_path: Path) -> None:
    from nixcas.composition import Composition

    toml = tmp_path / "c.toml"
    toml.write_text(
        f'[blobservices.root]\ntype = "objectstore"\nobject_store_url = "file://{tmp_path}/o"\navg_chunk_size = 65536\n'
    )
    comp = Composition.from_toml(toml)
    try:
        svc = await comp.blob_service("root")
        data = noise(b"avg 64k", 3 << 20)
        digest = await svc.put(data)
        want = [bytes(c.data) for c in FastCDC(65536, min_size=32768, max_size=131072).cut_buf(data)]
        assert await svc.chunks(digest) == [ChunkMeta(b3(c), len(c)) for c in want]
        assert await svc.read(digest) == data
    finally:
        await comp.close()


@pytest.mark.parametrize("value", ["100000", "512", "4194304", '"big"'])
def test_avg_chunk_size_refused(tmp_path: Path, value: str) -> None:
    from nixcas.composition import Composition
    from nixcas.errors import ConfigurationError

    toml = tmp_path / "c.toml"
    url = f"file://{tmp_path}/o"
    toml.write_text(
        f'[blobservices.root]\ntype = "objectstore"\nobject_store_url = "{url}"\navg_chunk_size = {value}\n'
    )
    with pytest.raises(ConfigurationError, match="avg_chunk_size"):
        Composition.from_toml(toml)


# -- pyfastcdc against the Rust fastcdc crate (what snix uses) ---------------------------------------

FASTCDC_VECTORS = json.loads((Path(__file__).parents[1] / "data" / "fastcdc_v2020_vectors.json").read_text())


@pytest.mark.parametrize("case", FASTCDC_VECTORS["cases"], ids=lambda c: f"{c['avg']}-seed{c['seed']}")
def test_pyfastcdc_cuts_where_the_rust_crate_cuts(case: dict[str, Any]) -> None:
    data = (Path(__file__).parents[1] / "data" / "SekienAkashita.jpg").read_bytes()
    cdc = FastCDC(case["avg"], min_size=case["min"], max_size=case["max"], normalized_chunking=1, seed=case["seed"])
    chunks = list(cdc.cut_buf(data))
    assert [[c.gear_hash, c.length] for c in chunks] == case["chunks"]
    if "blake3" in case:
        assert [blake3.blake3(c.data).hexdigest() for c in chunks] == case["blake3"]


def snix_vector_input(name: str) -> bytes:
    data = blake3.blake3(b"snix fastcdc " + name.encode()).digest(length=8 << 20)
    return data if name == "random" else data.translate(bytes(b"etaoinshrdlucmfw"[i & 15] for i in range(256)))


@pytest.mark.parametrize("case", FASTCDC_VECTORS["snix"], ids=lambda c: c["input"])
async def test_chunks_match_the_rust_crate_with_snix_parameters(case: dict[str, Any], tmp_path: Path) -> None:
    """The Rust crate's StreamCDC with avg 256 KiB, min 128 KiB, max 512 KiB (snix's) cut these inputs so."""
    data = snix_vector_input(case["input"])
    lengths = [length for _, length in case["chunks"]]
    cdc = FastCDC(256 << 10, min_size=128 << 10, max_size=512 << 10, normalized_chunking=1, seed=0)
    assert [[c.gear_hash, c.length] for c in cdc.cut_buf(data)] == case["chunks"]
    # and the store's streaming writer stores exactly those chunks
    svc = LocalBlobService(tmp_path / "o")
    digest = await write_in_pieces(svc, data)
    chunks = await svc.chunks(digest)
    assert chunks is not None and [c.size for c in chunks] == lengths

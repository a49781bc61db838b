"""BlobService backends built from URLs, bound to the shared contract suite, plus
checks of the on-disk object layout of ``objectstore+file://``."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import blake3
import pytest
import pytest_asyncio
import zstandard

from nixcas.castore.blob.base import BlobService, ChunkMeta
from nixcas.castore.blob.local import LocalBlobService
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.blob.packed import PackedBlobService
from nixcas.castore.digest import B3Digest
from nixcas.composition import blob_service_from_url
from nixcas.errors import ChecksumMismatch, StorageError
from nixcas.testing import packed
from nixcas.testing.blobservice import BlobCorrupter, BlobServiceSuite, TempFiles, read_exactly

# blake3("Hello World"), the example of the object-store layout docs
HELLO_WORLD_HEX = "41f8394111eb713a22165c46c90ab8f0fd9399c92028fd6d288944b23ff5bf76"


def b3(data: bytes) -> B3Digest:
    return B3Digest(blake3.blake3(data).digest())


def key_path(root: Path, kind: str, digest: bytes) -> Path:
    """``<root>/<kind>/b3/<4 hex>/<hex>``, computed independently of nixcas."""
    h = digest.hex()
    return root / kind / "b3" / h[:4] / h


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(data)


def unzstd(data: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


def files_under(root: Path) -> list[str]:
    """Object files below ``root`` (the shared empty-index file under ``.links/`` is not an object)."""
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir() and p.relative_to(root).parts[0] != ".links"
    )


# -- the contract, per backend ---------------------------------------------------


class TestMemoryBlobService(BlobServiceSuite):
    covers = ("memory",)

    @pytest_asyncio.fixture
    async def blob_service(self) -> AsyncIterator[BlobService]:
        svc = await blob_service_from_url("memory://")
        assert isinstance(svc, MemoryBlobService)
        yield svc
        await svc.close()

    @pytest.fixture
    def corrupt_blob(self, blob_service: BlobService) -> BlobCorrupter:
        assert isinstance(blob_service, MemoryBlobService)
        blobs = blob_service._blobs

        async def corrupt(digest: B3Digest, data: bytes) -> None:
            assert digest in blobs
            blobs[digest] = data

        return corrupt


def corrupt_object(root: Path, digest: B3Digest, data: bytes) -> None:
    """Make ``digest`` a single chunk object holding ``data`` (the object layout)."""
    path = key_path(root, "chunks", digest)
    index = key_path(root, "blobs", digest)
    assert path.is_file() or index.stat().st_size  # one chunk, or a chunk list
    index.unlink()
    index.write_bytes(b"")  # now "one chunk": the chunk object named by the blob
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zstd(data))


class TestLocalBlobService(BlobServiceSuite):
    URL = "objectstore+file://{root}"
    KIND: type[LocalBlobService] = LocalBlobService

    @pytest.fixture
    def root(self, tmp_path: Path) -> Path:
        return tmp_path / "blobs"

    @pytest_asyncio.fixture
    async def blob_service(self, root: Path) -> AsyncIterator[BlobService]:
        svc = await blob_service_from_url(self.URL.format(root=root))
        assert type(svc) is self.KIND
        yield svc
        await svc.close()

    @pytest.fixture
    def corrupt_blob(self, root: Path) -> BlobCorrupter:
        async def corrupt(digest: B3Digest, data: bytes) -> None:
            corrupt_object(root, digest, data)

        return corrupt

    @pytest.fixture
    def temp_files(self, root: Path) -> TempFiles:
        return lambda: files_under(root / "tmp")


class TestPackedBlobService(TestLocalBlobService):
    """The embedded store: small blobs are pack rows, large ones objects of the same layout."""

    covers = ("packed",)

    URL = "packed://{root}"
    KIND = PackedBlobService

    @pytest.fixture
    def corrupt_blob(self, root: Path) -> BlobCorrupter:
        async def corrupt(digest: B3Digest, data: bytes) -> None:
            if not packed.corrupt_blob(root, digest, data):
                corrupt_object(root, digest, data)

        return corrupt


# -- objectstore+file: layout on disk ----------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "blobs"


@pytest_asyncio.fixture
async def local(root: Path) -> AsyncIterator[BlobService]:
    svc = await blob_service_from_url(f"objectstore+file://{root}")
    yield svc
    await svc.close()


async def test_layout_hello_world(local: BlobService, root: Path) -> None:
    digest = await local.put(b"Hello World")
    assert digest.hex() == HELLO_WORLD_HEX
    index = root / "blobs" / "b3" / "41f8" / HELLO_WORLD_HEX
    chunk = root / "chunks" / "b3" / "41f8" / HELLO_WORLD_HEX
    assert index.is_file()
    assert index.read_bytes() == b""  # one chunk: empty chunk list
    assert unzstd(chunk.read_bytes()) == b"Hello World"
    assert files_under(root) == [f"blobs/b3/41f8/{HELLO_WORLD_HEX}", f"chunks/b3/41f8/{HELLO_WORLD_HEX}"]


@pytest.mark.parametrize("size", [1, 100_000, 128 << 10])
@pytest.mark.parametrize("declare_size", [True, False])
async def test_layout_via_writer(local: BlobService, root: Path, size: int, declare_size: bool) -> None:
    data = bytes(range(251)) * (size // 251) + b"\x07" * (size % 251)
    writer = await local.open_write(size if declare_size else None)
    for i in range(0, size, 65536):
        await writer.write(data[i : i + 65536])
    digest = await writer.close()
    assert digest == b3(data)
    assert key_path(root, "blobs", digest).read_bytes() == b""
    assert unzstd(key_path(root, "chunks", digest).read_bytes()) == data
    assert files_under(root) == sorted(
        [f"blobs/b3/{digest.hex()[:4]}/{digest.hex()}", f"chunks/b3/{digest.hex()[:4]}/{digest.hex()}"]
    )
    # seeking to the end works whether or not the frame records its size
    reader = await local.open_read(digest)
    assert reader is not None
    async with reader:
        assert await reader.seek(-1, io.SEEK_END) == size - 1
        assert await reader.read() == data[-1:]


async def test_layout_empty_blob(local: BlobService, root: Path) -> None:
    digest = await local.put(b"")
    assert digest.hex() == blake3.blake3(b"").hexdigest()
    assert key_path(root, "blobs", digest).read_bytes() == b""
    assert not key_path(root, "chunks", digest).exists()
    assert files_under(root) == [f"blobs/b3/af13/{digest.hex()}"]
    assert await local.has(digest)
    assert await local.chunks(digest) == []
    assert await local.read(digest) == b""


async def test_layout_zstd_level_option(root: Path) -> None:
    data = b"abc" * 10_000
    svc = await blob_service_from_url(f"objectstore+file://{root}?zstd_level=19")
    digest = await svc.put(data)
    assert unzstd(key_path(root, "chunks", digest).read_bytes()) == data
    assert await svc.read(digest) == data


async def test_persistence_across_reopen(root: Path) -> None:
    url = f"objectstore+file://{root}"
    first = await blob_service_from_url(url)
    small = await first.put(b"Hello World!")
    writer = await first.open_write()
    big = bytes(range(256)) * 8192  # 2 MiB, written through the spill path
    await writer.write(big)
    big_digest = await writer.close()
    await first.sync()
    await first.close()
    second = await blob_service_from_url(url)
    assert await second.read(small) == b"Hello World!"
    assert await second.read(big_digest) == big


async def test_index_without_chunk_object(local: BlobService, root: Path) -> None:
    digest = await local.put(b"Hello World")
    key_path(root, "chunks", digest).unlink()
    assert await local.has(digest)
    with pytest.raises(StorageError):
        await local.open_read(digest)


async def test_corrupt_index(local: BlobService, root: Path) -> None:
    digest = b3(b"whatever")
    index = key_path(root, "blobs", digest)
    index.parent.mkdir(parents=True)
    index.write_bytes(b"\xff\xff\xff")
    with pytest.raises(StorageError):
        await local.chunks(digest)
    with pytest.raises(StorageError):
        await local.open_read(digest)


# -- hand-written multi-chunk blobs ---------------------------------------------------

# The ChunkedReader vector of the reference (§4.4): 16 bytes in five chunks.
CHUNKS = [bytes.fromhex(h) for h in ["0001", "02030405", "06", "0708", "090a0b0c0d0e0f"]]
CHUNKED = b"".join(CHUNKS)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def stat_blob_response(chunks: Sequence[tuple[bytes, int]]) -> bytes:
    """A ``StatBlobResponse`` (``repeated ChunkMeta chunks = 2``), encoded by hand."""
    out = bytearray()
    for digest, size in chunks:
        meta = b"\x0a" + varint(len(digest)) + digest + (b"\x10" + varint(size) if size else b"")
        out += b"\x12" + varint(len(meta)) + meta
    return bytes(out)


def write_object(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def write_chunked_blob(root: Path, chunks: list[bytes], declared: list[int] | None = None) -> B3Digest:
    """Store ``chunks`` as chunk objects plus an index; return the blob digest."""
    sizes = declared if declared is not None else [len(c) for c in chunks]
    blob = b3(b"".join(chunks))
    for c in chunks:
        write_object(key_path(root, "chunks", b3(c)), zstd(c))
    write_object(
        key_path(root, "blobs", blob), stat_blob_response([(b3(c), s) for c, s in zip(chunks, sizes, strict=True)])
    )
    return blob


def test_stat_blob_response_encoding() -> None:
    """The hand encoder agrees with the generated protobuf code."""
    from nixcas._proto.tvix.castore.protos import rpc_blobstore_pb2 as pb

    pairs = [(b3(c), len(c)) for c in CHUNKS] + [(b3(b"x" * 300), 300)]
    msg = pb.StatBlobResponse()
    msg.ParseFromString(stat_blob_response(pairs))
    assert [(m.digest, m.size) for m in msg.chunks] == pairs


async def test_multi_chunk_read(local: BlobService, root: Path) -> None:
    blob = write_chunked_blob(root, CHUNKS)
    assert await local.has(blob)
    assert await local.chunks(blob) == [ChunkMeta(b3(c), len(c)) for c in CHUNKS]
    assert await local.read(blob) == CHUNKED
    # every chunk is a blob of its own, too
    for c in CHUNKS:
        assert await local.chunks(b3(c)) == []
        assert await local.read(b3(c)) == c


async def test_multi_chunk_seek(local: BlobService, root: Path) -> None:
    blob = write_chunked_blob(root, CHUNKS)
    reader = await local.open_read(blob)
    assert reader is not None
    async with reader:
        assert await reader.seek(0, io.SEEK_END) == 16
        assert await reader.read(1) == b""
        assert await reader.seek(0) == 0
        assert await read_exactly(reader, 16) == CHUNKED
        for start in range(17):
            for length in (1, 2, 3, 5, 16):
                assert await reader.seek(start) == start
                assert await read_exactly(reader, length) == CHUNKED[start : start + length], (start, length)
                assert reader.tell() == min(16, start + length)
        assert await reader.seek(3) == 3
        assert await reader.seek(4, io.SEEK_CUR) == 7
        assert await read_exactly(reader, 2) == bytes([7, 8])
        assert await reader.seek(-2, io.SEEK_CUR) == 7
        assert await read_exactly(reader, 3) == bytes([7, 8, 9])
        assert await reader.seek(-7, io.SEEK_END) == 9
        assert await reader.read() == CHUNKED[9:]


async def test_multi_chunk_missing_chunk(local: BlobService, root: Path) -> None:
    blob = write_chunked_blob(root, CHUNKS)
    key_path(root, "chunks", b3(CHUNKS[2])).unlink()
    reader = await local.open_read(blob)
    assert reader is not None
    async with reader:
        assert await read_exactly(reader, 6) == CHUNKED[:6]  # the first two chunks are fine
        with pytest.raises(StorageError):
            await reader.read(1)
    with pytest.raises(StorageError):
        await local.read(blob)


@pytest.mark.parametrize(
    "declared",
    [
        pytest.param([2, 5, 1, 2, 7], id="chunk-shorter-than-declared"),
        pytest.param([2, 3, 1, 2, 7], id="chunk-longer-than-declared"),
        pytest.param([2, 4, 1, 2, 8], id="last-shorter-than-declared"),
        pytest.param([2, 4, 1, 2, 6], id="last-longer-than-declared"),
    ],
)
async def test_multi_chunk_wrong_size(local: BlobService, root: Path, declared: list[int]) -> None:
    blob = write_chunked_blob(root, CHUNKS, declared)
    with pytest.raises(StorageError):
        await local.read(blob)
    reader = await local.open_read(blob)
    assert reader is not None
    async with reader:

        async def drain() -> None:
            while await reader.read(3):
                pass

        with pytest.raises(StorageError):
            await drain()


@pytest.mark.parametrize(
    ("declared", "start"),
    [
        pytest.param([2, 3, 1, 2, 7], 2, id="chunk-longer-than-declared"),
        pytest.param([2, 5, 1, 2, 7], 2, id="chunk-shorter-than-declared"),
        pytest.param([2, 4, 1, 2, 6], 10, id="last-longer-than-declared"),
        pytest.param([2, 4, 1, 2, 8], 10, id="last-shorter-than-declared"),
    ],
)
async def test_multi_chunk_wrong_size_range_read(
    local: BlobService, root: Path, declared: list[int], start: int
) -> None:
    """A range read (not covered by whole-blob verification) still checks each chunk's size."""
    blob = write_chunked_blob(root, CHUNKS, declared)
    reader = await local.open_read(blob)
    assert reader is not None
    async with reader:
        await reader.seek(start)
        with pytest.raises(StorageError):
            await read_exactly(reader, sum(declared) - start)


async def test_multi_chunk_corrupt_chunk(local: BlobService, root: Path) -> None:
    blob = write_chunked_blob(root, CHUNKS)
    key_path(root, "chunks", b3(CHUNKS[1])).write_bytes(zstd(b"\x02\x03\x04\xff"))
    with pytest.raises(ChecksumMismatch):
        await local.read(blob)


def _index(root: Path, data: bytes) -> Path:
    h = blake3.blake3(data).hexdigest()
    return root / "blobs" / "b3" / h[:4] / h


async def test_empty_indexes_share_one_inode(local: BlobService, root: Path) -> None:
    await local.put_many([b"one", b"two", b""])
    await local.put(b"three")
    indexes = [_index(root, d) for d in (b"one", b"two", b"", b"three")]
    assert all(p.read_bytes() == b"" for p in indexes)
    assert len({p.stat().st_ino for p in indexes}) == 1
    assert len(list((root / ".links").iterdir())) == 1


async def test_link_count_limit_starts_a_new_shared_file(
    local: BlobService, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    real_link = os.link
    calls = {"n": 0}

    def link_full_once(src: str, dst: str) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.EMLINK, "Too many links", src)
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link_full_once)
    await local.put(b"first")
    await local.put(b"second")  # the first source is "full": a new one is started
    await local.put(b"third")
    inodes = [_index(root, d).stat().st_ino for d in (b"first", b"second", b"third")]
    assert inodes[0] != inodes[1] == inodes[2]
    assert len(list((root / ".links").iterdir())) == 2
    assert all(_index(root, d).read_bytes() == b"" for d in (b"first", b"second", b"third"))


async def test_without_hard_links_indexes_are_plain_files(
    local: BlobService, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    def no_links(src: str, dst: str) -> None:
        raise OSError(errno.EPERM, "Operation not permitted", src)

    monkeypatch.setattr(os, "link", no_links)
    await local.put(b"alpha")
    await local.put(b"beta")
    a, b = _index(root, b"alpha"), _index(root, b"beta")
    assert a.read_bytes() == b.read_bytes() == b""
    assert a.stat().st_ino != b.stat().st_ino
    assert await local.read(B3Digest(blake3.blake3(b"beta").digest())) == b"beta"


# -- objectstore+file: read_many ----------------------------------------------------------


async def test_read_many_one_thread_round_trip(local: BlobService, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch of single-chunk blobs costs one worker-thread hop (open, read, unzstd, hash each)."""
    import asyncio

    blobs = [b"small blob %d" % i * (i + 1) for i in range(100)]
    await local.put_many(blobs)
    real_to_thread = asyncio.to_thread
    calls = []

    async def counting_to_thread(fn: object, /, *args: object, **kwargs: object) -> object:
        calls.append(fn)
        return await real_to_thread(fn, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(asyncio, "to_thread", counting_to_thread)
    wanted = {b3(b): len(b) for b in blobs} | {b3(b"missing"): 7}
    assert await local.read_many(wanted) == {b3(b): b for b in blobs}
    assert len(calls) == 1


async def test_read_many_multi_chunk(local: BlobService, root: Path) -> None:
    blob = write_chunked_blob(root, CHUNKS)
    small = await local.put(b"single")
    assert await local.read_many({blob: 16, small: 6}) == {blob: CHUNKED, small: b"single"}
    assert await local.read_many({blob: 15, small: 6}) == {small: b"single"}


@pytest.mark.parametrize("declared", [[2, 5, 1, 2, 7], [2, 3, 1, 2, 7], [2, 4, 1, 2, 6]])
async def test_read_many_multi_chunk_wrong_size(local: BlobService, root: Path, declared: list[int]) -> None:
    blob = write_chunked_blob(root, CHUNKS, declared)
    with pytest.raises(StorageError):
        await local.read_many({blob: 100})


async def test_read_many_multi_chunk_broken(local: BlobService, root: Path) -> None:
    blob = write_chunked_blob(root, CHUNKS)
    key_path(root, "chunks", b3(CHUNKS[1])).write_bytes(zstd(b"\x02\x03\x04\xff"))
    with pytest.raises(ChecksumMismatch):
        await local.read_many({blob: 16})
    key_path(root, "chunks", b3(CHUNKS[2])).unlink()
    with pytest.raises(StorageError):
        await local.read_many({blob: 16})


async def test_read_many_index_without_chunk_object(local: BlobService, root: Path) -> None:
    digest = await local.put(b"Hello World")
    key_path(root, "chunks", digest).unlink()
    with pytest.raises(StorageError, match="chunk object missing"):
        await local.read_many({digest: 11})


def zstd_unsized(data: bytes) -> bytes:
    """One zstd frame that does not record its content size (as streaming writers make them)."""
    out = io.BytesIO()
    with zstandard.ZstdCompressor(write_content_size=False).stream_writer(out, closefd=False) as w:
        w.write(data)
    assert zstandard.frame_content_size(out.getvalue()) == -1
    return out.getvalue()


SKIPPABLE = b"\x50\x2a\x4d\x18" + (1 << 20).to_bytes(4, "little") + bytes(1 << 20)
"""A skippable zstd frame of 1 MiB (decoders ignore it)."""


@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(zstd_unsized, id="no-content-size"),
        pytest.param(lambda d: zstd(d[:7]) + zstd(d[7:]), id="two-frames"),
        pytest.param(lambda d: zstd(d) + SKIPPABLE, id="skippable-frame-after"),
        pytest.param(lambda d: zstd(d)[:-2], id="truncated"),
    ],
)
async def test_read_many_unusual_chunk_files(local: BlobService, root: Path, encode: Callable[[bytes], bytes]) -> None:
    """Chunk files the fast path does not take are read like open_read reads them."""
    data = b"unusual chunk file " * 20
    digest = await local.put(data)
    key_path(root, "chunks", digest).write_bytes(encode(data))
    try:
        expected = await local.read(digest)
    except ChecksumMismatch:
        with pytest.raises(ChecksumMismatch):
            await local.read_many({digest: len(data)})
        return
    assert expected == data
    assert await local.read_many({digest: len(data)}) == {digest: data}
    assert await local.read_many({digest: len(data) - 1}) == {}


@pytest.mark.parametrize("sized", [True, False])
@pytest.mark.parametrize("cap", [pytest.param(1000, id="per-blob-path"), pytest.param(100_000, id="batch-path")])
async def test_read_many_does_not_inflate_too_large_blobs(
    local: BlobService, root: Path, sized: bool, cap: int
) -> None:
    """A blob whose frame holds far more than the maximum is never decompressed whole.

    (The compressed file, ~2 KiB, is too big for a 1000-byte blob: that one
    takes the per-blob path; for 100,000 bytes the batch path checks the frame.)
    """
    import tracemalloc

    bomb = bytes(64 << 20)
    digest = b3(bomb)
    compressed = zstd(bomb) if sized else zstd_unsized(bomb)
    assert len(compressed) < 1 << 20
    write_object(key_path(root, "chunks", digest), compressed)
    write_object(key_path(root, "blobs", digest), b"")
    tracemalloc.start()
    try:
        assert await local.read_many({digest: cap}) == {}
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


async def test_garbage_chunk_is_a_storage_error(local: BlobService, root: Path) -> None:
    digest = await local.put(b"hello world" * 100)
    key_path(root, "chunks", digest).write_bytes(b"garbage, not a zstd frame")
    with pytest.raises(StorageError, match="cannot decompress"):
        await local.read(digest)
    with pytest.raises(StorageError, match="cannot decompress"):
        await local.read_many({digest: 1100})

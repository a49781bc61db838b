"""Chunks and bao across services: Stat(send_chunks/send_bao) over gRPC, chunk-wise client reads,
chunk-level ``combined`` copies (bytes on the wire counted), and verified ranges from lying peers."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import blake3
import grpc
import grpc.aio
import pytest
import pytest_asyncio
import zstandard
from pyfastcdc import FastCDC
from test_nar import InstrumentedBlobs

from nixcas._proto.tvix.castore.protos import rpc_blobstore_pb2 as blob_pb
from nixcas.castore import bao
from nixcas.castore.blob.base import BlobReader, BlobService, BytesReader, ChunkMeta
from nixcas.castore.blob.combined import FILL_WINDOW, CombinedBlobService
from nixcas.castore.blob.grpc import GrpcBlobService
from nixcas.castore.blob.local import LocalBlobService
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.blob.verified import read_verified_range
from nixcas.castore.digest import B3Digest
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.sizerule import SizeRule
from nixcas.composition import blob_service_from_url
from nixcas.errors import ChecksumMismatch, NotFoundError, StorageError, ValidationError
from nixcas.server import RunningServer, start_server


def b3(data: bytes) -> B3Digest:
    return B3Digest(blake3.blake3(data).digest())


def noise(seed: bytes, size: int) -> bytes:
    return blake3.blake3(seed).digest(length=size)


def snix_chunks(data: bytes) -> list[bytes]:
    cdc = FastCDC(256 << 10, min_size=128 << 10, max_size=512 << 10, normalized_chunking=1)
    return [bytes(c.data) for c in cdc.cut_buf(data)]


def key_path(root: Path, kind: str, digest: bytes) -> Path:
    h = digest.hex()
    return root / kind / "b3" / h[:4] / h


class LyingLocal(LocalBlobService):
    """Serves whatever its files hold, unchecked, and an outboard set by the test."""

    fake_outboard: bytes | None = None

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        path = key_path(self.root, "chunks", digest)
        if path.exists():  # a single-chunk blob or a chunk: its object's bytes, unchecked
            return BytesReader(zstandard.ZstdDecompressor().decompressobj().decompress(path.read_bytes()))
        return await self._open_read(digest)

    async def outboard(self, digest: B3Digest) -> bytes | None:
        return self.fake_outboard if self.fake_outboard is not None else await super().outboard(digest)


class LyingMemory(MemoryBlobService):
    fake_outboard: bytes | None = None

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        return await self._open_read(digest)

    async def outboard(self, digest: B3Digest) -> bytes | None:
        return self.fake_outboard


async def liar_with_bad_chunk(tmp_path: Path, index: int) -> tuple[LyingLocal, B3Digest, list[bytes]]:
    """A store holding BIG whose chunk ``index`` has one flipped bit on disk (served unchecked)."""
    liar = LyingLocal(tmp_path / "liar")
    digest = await liar.put(BIG)
    chunks = snix_chunks(BIG)
    bad = bytearray(chunks[index])
    bad[100] ^= 1
    path = key_path(tmp_path / "liar", "chunks", b3(chunks[index]))
    path.write_bytes(zstandard.ZstdCompressor().compress(bytes(bad)))
    return liar, digest, chunks


async def serve(blobs: BlobService) -> RunningServer:
    return await start_server("127.0.0.1:0", blobs, MemoryDirectoryService(SizeRule.TVIX))


@contextlib.asynccontextmanager
async def client_of(blobs: BlobService) -> AsyncIterator[BlobService]:
    """A gRPC client of a daemon (in this process) serving ``blobs``."""
    running = await serve(blobs)
    try:
        async with await blob_service_from_url(running.url) as svc:
            yield svc
    finally:
        await running.stop(0)


@pytest_asyncio.fixture
async def far_store(tmp_path: Path) -> LocalBlobService:
    return LocalBlobService(tmp_path / "far")


@pytest_asyncio.fixture
async def far_counted(far_store: LocalBlobService) -> InstrumentedBlobs:
    """Counts the blob bytes the far daemon's readers hand to its servicer: the bytes on the wire."""
    return InstrumentedBlobs(far_store)


@pytest_asyncio.fixture
async def far_server(far_counted: InstrumentedBlobs) -> AsyncIterator[RunningServer]:
    running = await serve(far_counted)
    yield running
    await running.stop(0)


@pytest_asyncio.fixture
async def client(far_server: RunningServer) -> AsyncIterator[GrpcBlobService]:
    svc = await blob_service_from_url(far_server.url)
    assert isinstance(svc, GrpcBlobService)
    yield svc
    await svc.close()


BIG = noise(b"big v1", 8 << 20)
BIG_V2 = BIG[: 5 << 20] + noise(b"patch", 50_000) + BIG[(5 << 20) + 50_000 :]


# -- Stat ---------------------------------------------------------------------------------------


async def test_stat_send_chunks_and_send_bao(far_store: LocalBlobService, far_server: RunningServer) -> None:
    digest = await far_store.put(BIG)
    target = far_server.url.removeprefix("grpc+http://")
    async with grpc.aio.insecure_channel(target) as channel:
        stat = channel.unary_unary(
            "/tvix.castore.v1.BlobService/Stat",
            request_serializer=blob_pb.StatBlobRequest.SerializeToString,
            response_deserializer=blob_pb.StatBlobResponse.FromString,
        )
        plain = await stat(blob_pb.StatBlobRequest(digest=digest))
        assert list(plain.chunks) == [] and plain.bao == b""
        with_chunks = await stat(blob_pb.StatBlobRequest(digest=digest, send_chunks=True))
        assert [(c.digest, c.size) for c in with_chunks.chunks] == [(b3(c), len(c)) for c in snix_chunks(BIG)]
        with_bao = await stat(blob_pb.StatBlobRequest(digest=digest, send_bao=True))
        assert list(with_bao.chunks) == []
        assert len(with_bao.bao) == 8 + 64 * (len(BIG) // 16384 - 1)
        assert bao.verify_groups(digest, with_bao.bao, {g: BIG[g * 16384 : (g + 1) * 16384] for g in range(512)})
        both = await stat(blob_pb.StatBlobRequest(digest=digest, send_chunks=True, send_bao=True))
        assert both.bao == with_bao.bao and len(both.chunks) == len(with_chunks.chunks)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stat(blob_pb.StatBlobRequest(digest=b3(b"missing"), send_bao=True))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # the object store computes it once, then keeps it
    assert await far_store.outboard(digest) == with_bao.bao
    assert key_path(far_store.root, "bao", digest).read_bytes() == with_bao.bao
    assert await far_store.outboard(digest) == with_bao.bao


# -- the gRPC client reads chunk by chunk -------------------------------------------------------------


async def test_client_reads_chunked_blob_chunk_by_chunk(client: GrpcBlobService, far_store: LocalBlobService) -> None:
    digest = await far_store.put(BIG)
    reader = await client.open_read(digest)
    assert reader is not None
    async with reader:
        assert await reader.read_all() == BIG
        await reader.seek(3_000_000)
        assert await reader.read(10) == BIG[3_000_000:3_000_010]
    assert await client.read(digest) == BIG


async def test_client_checks_each_chunk(tmp_path: Path) -> None:
    """A server handing out a chunk with wrong bytes: the client refuses it before handing any of them out."""
    liar, digest, chunks = await liar_with_bad_chunk(tmp_path, 3)
    async with client_of(liar) as svc:
        reader = await svc.open_read(digest)
        assert reader is not None
        async with reader:
            await reader.seek(sum(map(len, chunks[:3])) + 50)
            with pytest.raises(ChecksumMismatch, match=b3(chunks[3]).hex()):
                await reader.read(100)


# -- chunk-level combined ------------------------------------------------------------------------------


async def test_combined_second_version_costs_only_changed_chunks(
    client: GrpcBlobService, far_store: LocalBlobService, far_counted: InstrumentedBlobs, tmp_path: Path
) -> None:
    v1, v2 = await far_store.put(BIG), await far_store.put(BIG_V2)
    near = LocalBlobService(tmp_path / "near")
    combined = CombinedBlobService(near, client)
    far_counted.bytes_read = 0
    assert await combined.read(v1) == BIG
    assert far_counted.bytes_read == len(BIG)  # every chunk once
    far_counted.bytes_read = 0
    assert await combined.read(v2) == BIG_V2
    old = {b3(c) for c in snix_chunks(BIG)}
    changed = [c for c in snix_chunks(BIG_V2) if b3(c) not in old]
    assert 1 <= len(changed) <= 6
    assert far_counted.bytes_read == sum(map(len, changed)) < len(BIG_V2) // 4
    # near now serves both by itself
    far_counted.bytes_read = 0
    assert await combined.read(v1) == BIG and await combined.read(v2) == BIG_V2
    assert far_counted.bytes_read == 0
    assert await near.chunks(v2) == [ChunkMeta(b3(c), len(c)) for c in snix_chunks(BIG_V2)]


async def test_combined_far_sends_wrong_chunk_bytes(tmp_path: Path) -> None:
    liar, digest, chunks = await liar_with_bad_chunk(tmp_path, 5)
    running = await serve(liar)
    near = LocalBlobService(tmp_path / "near")
    try:
        async with await blob_service_from_url(running.url) as far:
            combined = CombinedBlobService(near, far)
            with pytest.raises(ChecksumMismatch, match=b3(chunks[5]).hex()):
                await combined.read(digest)
    finally:
        await running.stop(0)
    # nothing wrong near: no index, not the bad chunk; every chunk that is there is right
    assert not await near.has(digest)
    assert not key_path(tmp_path / "near", "chunks", b3(chunks[5])).exists()
    for path in (tmp_path / "near" / "chunks").rglob("*"):
        if path.is_file():
            assert b3(zstandard.ZstdDecompressor().decompressobj().decompress(path.read_bytes())).hex() == path.name


async def test_combined_far_chunk_list_not_adding_up(tmp_path: Path) -> None:
    """Far lists real chunks for a blob, but together they are another blob: no index near."""
    far = LocalBlobService(tmp_path / "far")
    chunks = snix_chunks(BIG)
    await far.put(BIG)
    claimed = b3(b"claimed blob")
    listed = [ChunkMeta(b3(c), len(c)) for c in chunks[::-1]]
    await far.put_index(claimed, listed)
    near = LocalBlobService(tmp_path / "near")
    combined = CombinedBlobService(near, far)
    with pytest.raises(ChecksumMismatch):
        await combined.read(claimed)
    assert not await near.has(claimed)
    assert not key_path(tmp_path / "near", "blobs", claimed).exists()


def chunk_starts(chunks: list[bytes]) -> list[int]:
    return [sum(map(len, chunks[:i])) for i in range(len(chunks))]


def chunks_near(root: Path, chunks: list[bytes]) -> set[int]:
    """Indexes of ``chunks`` whose objects are in the store at ``root``; every chunk object there must be right."""
    dctx = zstandard.ZstdDecompressor()
    for path in (root / "chunks").rglob("*"):
        if path.is_file():
            assert b3(dctx.decompressobj().decompress(path.read_bytes())).hex() == path.name
    return {i for i, c in enumerate(chunks) if key_path(root, "chunks", b3(c)).is_file()}


async def test_combined_streams_a_chunked_far_blob(
    client: GrpcBlobService, far_store: LocalBlobService, far_counted: InstrumentedBlobs, tmp_path: Path
) -> None:
    """The first bytes come before the blob is copied; a partial read leaves its chunks near but no index;
    a later full read fetches only the rest from far, then writes the index."""
    digest = await far_store.put(BIG)
    chunks = snix_chunks(BIG)
    starts = chunk_starts(chunks)
    assert len(chunks) > 12 + FILL_WINDOW
    near = LocalBlobService(tmp_path / "near")
    combined = CombinedBlobService(near, client)
    far_counted.opens = far_counted.bytes_read = 0
    reader = await combined.open_read(digest)
    assert reader is not None
    async with reader:
        assert far_counted.opens == 0  # nothing fetched before the first read
        assert await reader.read(1) == BIG[:1]
        await asyncio.sleep(0.2)  # the read-ahead window, and nothing more
        assert 1 <= far_counted.opens <= FILL_WINDOW
        assert far_counted.bytes_read <= sum(map(len, chunks[:FILL_WINDOW]))
        middle = starts[12] + 5
        await reader.seek(middle)
        assert await reader.read(100) == BIG[middle : middle + 100]
    await asyncio.sleep(0.2)  # cancelled fetches settle
    present = chunks_near(tmp_path / "near", chunks)
    assert {0, 12} <= present <= set(range(FILL_WINDOW)) | set(range(12, 12 + FILL_WINDOW))
    assert not key_path(tmp_path / "near", "blobs", digest).exists()
    assert not await near.has(digest)
    far_counted.bytes_read = 0
    assert await combined.read(digest) == BIG
    assert far_counted.bytes_read == sum(len(c) for i, c in enumerate(chunks) if i not in present)
    assert await near.chunks(digest) == [ChunkMeta(b3(c), len(c)) for c in chunks]
    far_counted.bytes_read = 0
    assert await combined.read(digest) == BIG
    assert far_counted.bytes_read == 0


async def test_combined_index_once_every_chunk_passed_in_order(tmp_path: Path) -> None:
    """Skipping chunks writes no index; coming back and reading on to the end does (backward seeks are fine)."""
    far = LocalBlobService(tmp_path / "far")
    digest = await far.put(BIG)
    chunks = snix_chunks(BIG)
    starts = chunk_starts(chunks)
    near = LocalBlobService(tmp_path / "near")
    combined = CombinedBlobService(near, far)
    reader = await combined.open_read(digest)
    assert reader is not None
    async with reader:
        assert await reader.read(10) == BIG[:10]
        await reader.seek(-10, io.SEEK_END)  # chunks 1.. skipped
        assert await reader.read() == BIG[-10:]
        assert not await near.has(digest)
        await reader.seek(starts[1] - 3)  # back: chunk 0 again, then everything in order
        assert await reader.read(starts[3]) == BIG[starts[1] - 3 : starts[1] - 3 + starts[3]]
        await reader.seek(5)
        assert await reader.read(5) == BIG[5:10]
        await reader.seek(starts[1] - 3 + starts[3])
        assert await reader.read() == BIG[starts[1] - 3 + starts[3] :]
    assert await near.chunks(digest) == [ChunkMeta(b3(c), len(c)) for c in chunks]
    assert await near.read(digest) == BIG


async def test_combined_streaming_stops_at_a_wrong_chunk(tmp_path: Path) -> None:
    """The chunks before a wrong one are handed out and kept near; none of the wrong one, and no index."""
    liar, digest, chunks = await liar_with_bad_chunk(tmp_path, 5)
    good = sum(map(len, chunks[:5]))
    near = LocalBlobService(tmp_path / "near")
    async with client_of(liar) as far:
        combined = CombinedBlobService(near, far)
        reader = await combined.open_read(digest)
        assert reader is not None
        async with reader:
            assert await reader.read(good) == BIG[:good]
            with pytest.raises(ChecksumMismatch, match=b3(chunks[5]).hex()):
                await reader.read(1)
    present = chunks_near(tmp_path / "near", chunks)
    assert set(range(5)) <= present and 5 not in present
    assert not await near.has(digest)


async def test_combined_far_missing_a_chunk(tmp_path: Path) -> None:
    far = LocalBlobService(tmp_path / "far")
    digest = await far.put(BIG)
    chunks = snix_chunks(BIG)
    key_path(tmp_path / "far", "chunks", b3(chunks[3])).unlink()
    near = LocalBlobService(tmp_path / "near")
    with pytest.raises(StorageError, match=f"chunk {b3(chunks[3]).hex()} .*not found"):
        await CombinedBlobService(near, far).read(digest)
    assert not await near.has(digest)
    assert 3 not in chunks_near(tmp_path / "near", chunks)


class FailingChunkNear(LocalBlobService):
    async def put_chunk(self, chunk: ChunkMeta, data: bytes) -> None:
        raise StorageError("near: disk full")


async def test_combined_failing_near_does_not_fail_the_stream(tmp_path: Path) -> None:
    far = LocalBlobService(tmp_path / "far")
    digest = await far.put(BIG)
    near = FailingChunkNear(tmp_path / "near")
    assert await CombinedBlobService(near, far).read(digest) == BIG
    assert not await near.has(digest)


async def test_combined_far_chunk_list_lie_fails_before_the_last_chunk(tmp_path: Path) -> None:
    """Real chunks that are not the blob: the read fails when the last chunk comes, before its bytes."""
    far = LocalBlobService(tmp_path / "far")
    chunks = snix_chunks(BIG)
    await far.put(BIG)
    claimed = b3(b"claimed blob")
    listed = chunks[::-1]
    await far.put_index(claimed, [ChunkMeta(b3(c), len(c)) for c in listed])
    near = LocalBlobService(tmp_path / "near")
    combined = CombinedBlobService(near, far)
    head = sum(map(len, listed[:-1]))
    reader = await combined.open_read(claimed)
    assert reader is not None
    async with reader:
        assert await reader.read(head) == b"".join(listed[:-1])  # each chunk checked, in the listed order
        for _ in range(2):
            with pytest.raises(ChecksumMismatch, match=claimed.hex()):
                await reader.read(1)
    assert chunks_near(tmp_path / "near", chunks) == set(range(len(chunks)))  # all right, as chunks
    assert not await near.has(claimed)
    assert not key_path(tmp_path / "near", "blobs", claimed).exists()
    with pytest.raises(ChecksumMismatch):  # now from near alone: still no index
        await combined.read(claimed)
    assert not await near.has(claimed)


# -- verified ranges ----------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [True, False])
async def test_verified_range_from_a_daemon(tmp_path: Path, chunked: bool) -> None:
    store: BlobService = LocalBlobService(tmp_path / "s") if chunked else MemoryBlobService()
    digest = await store.put(BIG)
    async with client_of(store) as svc:
        for start, length in [(0, 1), (16383, 2), (3_000_000, 700_000), (len(BIG) - 5, 5), (100, 0)]:
            assert await read_verified_range(svc, digest, start, length) == BIG[start : start + length]
        with pytest.raises(ValidationError, match="past the end"):
            await read_verified_range(svc, digest, len(BIG) - 5, 6)
        with pytest.raises(NotFoundError):
            await read_verified_range(svc, b3(b"missing"), 0, 1)


async def lying_daemon_range(liar: LyingMemory, digest: B3Digest, start: int, length: int) -> bytes:
    async with client_of(liar) as svc:
        return await read_verified_range(svc, digest, start, length)


async def test_verified_range_names_the_group_a_peer_lied_about() -> None:
    liar = LyingMemory()
    digest = b3(BIG)
    tampered = bytearray(BIG)
    tampered[5 * 16384 + 77] ^= 0x40
    liar._blobs[digest] = bytes(tampered)
    liar.fake_outboard = bao.encode_outboard(BIG)  # the true outboard: only the data lies
    assert await lying_daemon_range(liar, digest, 0, 16384) == BIG[:16384]  # untouched groups verify
    with pytest.raises(bao.BaoMismatch, match="chunk group 5 ") as info:
        await lying_daemon_range(liar, digest, 4 * 16384, 3 * 16384)
    assert info.value.group == 5


async def test_verified_range_outboard_not_matching_the_root() -> None:
    liar = LyingMemory()
    digest = b3(BIG)
    liar._blobs[digest] = BIG
    liar.fake_outboard = bao.encode_outboard(BIG_V2)
    with pytest.raises(bao.BaoMismatch, match="outboard parent node 0"):
        await lying_daemon_range(liar, digest, 0, 100)


async def test_verified_range_truncated_outboard() -> None:
    liar = LyingMemory()
    digest = b3(BIG)
    liar._blobs[digest] = BIG
    liar.fake_outboard = bao.encode_outboard(BIG)[:-64]
    with pytest.raises(StorageError, match="truncated"):
        await lying_daemon_range(liar, digest, 0, 100)


async def test_verified_range_snix_daemon_without_outboard() -> None:
    liar = LyingMemory()
    digest = b3(BIG)
    liar._blobs[digest] = BIG
    liar.fake_outboard = b""  # what a tvix/snix daemon answers to send_bao
    with pytest.raises(StorageError, match="no bao outboard"):
        await lying_daemon_range(liar, digest, 0, 100)


# -- nixcas castore cat --range ----------------------------------------------------------------------


def test_cat_range_verified(tmp_path: Path) -> None:
    from test_cli import assert_one_line_error, nixcas

    data = noise(b"cat range", (1 << 20) + 12345)
    (tmp_path / "f").write_bytes(data)
    store = tmp_path / "s"
    digest = nixcas("castore", "ingest", str(tmp_path / "f"), "--json", store=store)
    hexdigest = json.loads(digest.stdout)["digest"]

    def cat_range(spec: str) -> bytes:
        cli = [sys.executable, "-m", "nixcas.cli.main", "--store-dir", str(store)]
        return subprocess.run(
            [*cli, "castore", "cat", hexdigest, "--range", spec], capture_output=True, check=True
        ).stdout

    for spec, want in [("100:200", data[100:200]), ("1000000:", data[1000000:]), ("5:5", b"")]:
        assert cat_range(spec) == want
    assert_one_line_error(
        nixcas("castore", "cat", hexdigest, "--range", f"0:{len(data) + 1}", store=store), 1, "past the end"
    )
    assert_one_line_error(nixcas("castore", "cat", hexdigest, "--range", "9:3", store=store), 2, "START:END")
    # another blob's outboard in the store's bao/ cache: found when loaded, replaced by the right one
    cached = key_path(store / "blobs", "bao", b3(data))
    cached.write_bytes(bao.encode_outboard(noise(b"other", len(data))))
    assert cat_range("0:10") == data[:10]
    assert cached.read_bytes() == bao.encode_outboard(data)


async def test_client_sequential_read_is_one_stream_seeks_fetch_chunks(
    client: GrpcBlobService, far_store: LocalBlobService, far_counted: InstrumentedBlobs
) -> None:
    digest = await far_store.put(BIG)
    chunks = snix_chunks(BIG)
    far_counted.opens = 0
    assert await client.read(digest) == BIG
    assert far_counted.opens == 1  # the whole blob streamed once, cut into checked chunks
    reader = await client.open_read(digest)
    assert reader is not None
    async with reader:
        assert await reader.read(1000) == BIG[:1000]
        start = sum(map(len, chunks[:10])) + 5
        far_counted.opens = 0
        await reader.seek(start)
        assert await reader.read(100) == BIG[start : start + 100]
        assert far_counted.opens >= 1  # chunk 10 (and the window after it) by their own Reads
        assert await reader.read_all() == BIG[start + 100 :]


class TamperedStream(LocalBlobService):
    """Streams other bytes for a whole chunked blob than its (intact) chunks hold."""

    tampered: dict[B3Digest, bytes]

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        if digest in self.tampered:
            return BytesReader(self.tampered[digest])
        return await super().open_read(digest)


async def test_client_sequential_read_checks_each_chunk(tmp_path: Path) -> None:
    liar = TamperedStream(tmp_path / "liar")
    digest = await liar.put(BIG)
    chunks = snix_chunks(BIG)
    bad = bytearray(BIG)
    bad[sum(map(len, chunks[:3])) + 77] ^= 1
    liar.tampered = {digest: bytes(bad)}
    async with client_of(liar) as svc:
        reader = await svc.open_read(digest)
        assert reader is not None
        async with reader:
            got = await reader.read(sum(map(len, chunks[:3])))
            assert got == BIG[: len(got)]
            with pytest.raises(ChecksumMismatch, match=b3(chunks[3]).hex()):
                await reader.read(10)

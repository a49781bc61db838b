"""snix's ChunkStoreService / BlobStoreService: the servicers over each blob backend (raw stubs),
the refusals of bad input, and the ``grpc+…?chunkstore=1`` client moving only missing chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, cast

import blake3
import grpc
import grpc.aio
import pytest
import pytest_asyncio
from grpc_reflection.v1alpha import reflection_pb2
from pyfastcdc import FastCDC
from test_daemon import file_descriptors, reflect
from test_nar import InstrumentedBlobs

from nixcas._proto.snix.castore.protos import blobstore_pb2 as meta_pb
from nixcas._proto.snix.castore.protos import rpc_blobstore_pb2 as bs_pb
from nixcas._proto.snix.castore.protos import rpc_chunkstore_pb2 as cs_pb
from nixcas._proto.tvix.castore.protos import rpc_blobstore_pb2 as blob_pb
from nixcas.castore.blob.base import BlobService, ChunkMeta
from nixcas.castore.blob.combined import CombinedBlobService
from nixcas.castore.blob.grpc import GrpcBlobService, GrpcChunkStoreBlobService
from nixcas.castore.blob.local import LocalBlobService
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.grpc.register import add_servicer
from nixcas.castore.grpc.servicers import add_castore_servicers
from nixcas.composition import blob_service_from_url
from nixcas.errors import ChecksumMismatch, ConfigurationError, StorageError, ValidationError
from nixcas.server import RunningServer, start_server
from nixcas.store.pathinfo.memory import MemoryPathInfoService

# the BLAKE3 of no bytes (the published test vector)
EMPTY_DIGEST = bytes.fromhex("af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262")


def b3(data: bytes) -> B3Digest:
    return B3Digest(blake3.blake3(data).digest())


def noise(seed: bytes, size: int) -> bytes:
    return blake3.blake3(seed).digest(length=size)


def snix_chunks(data: bytes) -> list[bytes]:
    """FastCDC 2020 with snix's parameters, straight from pyfastcdc."""
    cdc = FastCDC(256 << 10, min_size=128 << 10, max_size=512 << 10, normalized_chunking=1)
    return [bytes(c.data) for c in cdc.cut_buf(data)]


BLOB = noise(b"chunkstore v1", 3 << 19)
BLOB_V2 = BLOB[: 1 << 20] + noise(b"chunkstore patch", 20_000) + BLOB[(1 << 20) + 20_000 :]
CHUNKS = snix_chunks(BLOB)


class CountingLocal(LocalBlobService):
    """Counts the chunk bytes that arrive through ``put_chunk`` (what a PutChunk or a fill sent)."""

    chunk_bytes_in = 0

    async def put_chunk(self, chunk: ChunkMeta, data: bytes) -> None:
        self.chunk_bytes_in += len(data)
        await super().put_chunk(chunk, data)


BACKENDS: dict[str, Callable[[Path], str]] = {
    "memory": lambda tmp: "memory://",
    "objectstore+file": lambda tmp: f"objectstore+file://{tmp}/blobs",
    "objectstore+memory": lambda tmp: "objectstore+memory:///",
    "packed": lambda tmp: f"packed://{tmp}/packed",
}


@pytest_asyncio.fixture(params=sorted(BACKENDS))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobService]:
    blobs = await blob_service_from_url(BACKENDS[request.param](tmp_path))
    yield blobs
    await blobs.close()


async def serve(blobs: BlobService) -> RunningServer:
    return await start_server("127.0.0.1:0", blobs, MemoryDirectoryService())


class Stubs:
    """Raw calls of the snix services (and the old BlobService) on one channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        def m(service: str, name: str) -> str:
            return f"/snix.castore.v1.{service}/{name}"

        self.stat_chunk = channel.unary_unary(
            m("ChunkStoreService", "StatChunk"),
            request_serializer=cs_pb.StatChunkRequest.SerializeToString,
            response_deserializer=cs_pb.StatChunkResponse.FromString,
        )
        self.get_chunk = channel.unary_stream(
            m("ChunkStoreService", "GetChunk"),
            request_serializer=cs_pb.GetChunkRequest.SerializeToString,
            response_deserializer=cs_pb.GetChunkResponse.FromString,
        )
        self.put_chunk = channel.stream_unary(
            m("ChunkStoreService", "PutChunk"),
            request_serializer=cs_pb.PutChunkRequest.SerializeToString,
            response_deserializer=cs_pb.PutChunkResponse.FromString,
        )
        self.stat_blob = channel.unary_unary(
            m("BlobStoreService", "StatBlob"),
            request_serializer=bs_pb.BSStatBlobRequest.SerializeToString,
            response_deserializer=bs_pb.BSStatBlobResponse.FromString,
        )
        self.get_blob = channel.unary_unary(
            m("BlobStoreService", "GetBlob"),
            request_serializer=bs_pb.GetBlobRequest.SerializeToString,
            response_deserializer=bs_pb.GetBlobResponse.FromString,
        )
        self.put_blob = channel.unary_unary(
            m("BlobStoreService", "PutBlob"),
            request_serializer=bs_pb.PutBlobRequest.SerializeToString,
            response_deserializer=bs_pb.BSPutBlobResponse.FromString,
        )
        self.stat = channel.unary_unary(
            "/snix.castore.v1.BlobService/Stat",
            request_serializer=blob_pb.StatBlobRequest.SerializeToString,
            response_deserializer=blob_pb.StatBlobResponse.FromString,
        )
        self.read_call = channel.unary_stream(
            "/snix.castore.v1.BlobService/Read",
            request_serializer=blob_pb.ReadBlobRequest.SerializeToString,
            response_deserializer=blob_pb.BlobChunk.FromString,
        )

    async def put(self, data: bytes, message: int = 100_000) -> bytes:
        requests = [cs_pb.PutChunkRequest(data=data[i : i + message]) for i in range(0, len(data), message)]
        response = await self.put_chunk(iter(requests))
        return cast(cs_pb.PutChunkResponse, response).digest

    async def get(self, digest: bytes) -> bytes:
        call = self.get_chunk(cs_pb.GetChunkRequest(digest=digest))
        return b"".join([cast(cs_pb.GetChunkResponse, r).data async for r in call])

    async def read(self, digest: bytes) -> bytes:
        call = self.read_call(blob_pb.ReadBlobRequest(digest=digest))
        return b"".join([cast(blob_pb.BlobChunk, r).data async for r in call])


def meta(chunks: Sequence[tuple[bytes, int]]) -> meta_pb.BlobMeta:
    return meta_pb.BlobMeta(chunks=[meta_pb.BlobMeta.ChunkMeta(digest=d, size=s) for d, s in chunks])


@pytest_asyncio.fixture
async def server(store: BlobService) -> AsyncIterator[RunningServer]:
    running = await serve(store)
    yield running
    await running.stop(0)


@pytest_asyncio.fixture
async def stubs(server: RunningServer) -> AsyncIterator[Stubs]:
    async with grpc.aio.insecure_channel(server.url.removeprefix("grpc+http://")) as channel:
        yield Stubs(channel)


async def status_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return cast(grpc.StatusCode, info.value.code())


# -- the servicers, over every backend ----------------------------------------------------------------


async def test_chunks_then_blob_reads_through_every_service(stubs: Stubs, store: BlobService) -> None:
    for chunk in CHUNKS:
        assert await stubs.put(chunk) == b3(chunk)
        await stubs.stat_chunk(cs_pb.StatChunkRequest(digest=b3(chunk)))
    assert await stubs.get(b3(CHUNKS[2])) == CHUNKS[2]
    digest = b3(BLOB)
    assert await status_of(stubs.stat_blob(bs_pb.BSStatBlobRequest(digest=digest))) == grpc.StatusCode.NOT_FOUND
    await stubs.put_blob(bs_pb.PutBlobRequest(digest=digest, blob_meta=meta([(b3(c), len(c)) for c in CHUNKS])))
    await stubs.stat_blob(bs_pb.BSStatBlobRequest(digest=digest))
    # the old BlobService sees it: Read, and Stat(send_chunks) where the backend keeps chunk lists
    assert await stubs.read(digest) == BLOB
    stat = await stubs.stat(blob_pb.StatBlobRequest(digest=digest, send_chunks=True))
    listed = [(c.digest, c.size) for c in stat.chunks]
    assert listed in ([], [(b3(c), len(c)) for c in CHUNKS])
    got = await stubs.get_blob(bs_pb.GetBlobRequest(digest=digest))
    assert [(c.digest, c.size) for c in got.blob_meta.chunks] == (listed or [(digest, len(BLOB))])
    assert await store.read(digest) == BLOB


async def test_missing_is_not_found(stubs: Stubs) -> None:
    missing = b3(b"not stored")
    for call in (
        stubs.stat_chunk(cs_pb.StatChunkRequest(digest=missing)),
        stubs.get(missing),
        stubs.stat_blob(bs_pb.BSStatBlobRequest(digest=missing)),
        stubs.get_blob(bs_pb.GetBlobRequest(digest=missing)),
    ):
        assert await status_of(call) == grpc.StatusCode.NOT_FOUND
    assert await status_of(stubs.get(b"short")) == grpc.StatusCode.INVALID_ARGUMENT


async def test_empty_blob_has_the_empty_chunk_list(stubs: Stubs, store: BlobService) -> None:
    await stubs.put_blob(bs_pb.PutBlobRequest(digest=EMPTY_DIGEST, blob_meta=meta([])))
    got = await stubs.get_blob(bs_pb.GetBlobRequest(digest=EMPTY_DIGEST))
    assert got.HasField("blob_meta") and list(got.blob_meta.chunks) == []
    assert await stubs.read(EMPTY_DIGEST) == b""
    assert await store.read(B3Digest(EMPTY_DIGEST)) == b""


async def test_small_blob_is_its_own_chunk(stubs: Stubs, store: BlobService) -> None:
    digest = await store.put(b"hello chunks")
    got = await stubs.get_blob(bs_pb.GetBlobRequest(digest=digest))
    assert [(c.digest, c.size) for c in got.blob_meta.chunks] == [(digest, 12)]
    assert await stubs.get(digest) == b"hello chunks"


async def test_put_chunk_of_an_empty_stream(stubs: Stubs, store: BlobService) -> None:
    for requests in ([], [cs_pb.PutChunkRequest(data=b"")] * 3):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stubs.put_chunk(iter(requests))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "empty chunk" in (info.value.details() or "")
    assert not await store.has(B3Digest(EMPTY_DIGEST))


async def test_put_chunk_too_large(stubs: Stubs, store: BlobService) -> None:
    data = noise(b"huge", (8 << 20) + 1)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stubs.put(data, message=1 << 20)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not await store.has(b3(data))


BAD_METAS: dict[str, tuple[Callable[[], Sequence[tuple[bytes, int]]], grpc.StatusCode, str]] = {
    "size too large": (
        lambda: [(b3(c), len(c) + (i == 1)) for i, c in enumerate(CHUNKS)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "chunk 1",
    ),
    "size too small": (
        lambda: [(b3(c), len(c) - (i == 2)) for i, c in enumerate(CHUNKS)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "chunk 2",
    ),
    "missing chunk": (
        lambda: [(b3(c), len(c)) for c in CHUNKS[:3]] + [(b3(b"never put"), 9)] + [(b3(c), len(c)) for c in CHUNKS[3:]],
        grpc.StatusCode.FAILED_PRECONDITION,
        "not stored",
    ),
    "another blob": (
        lambda: [(b3(c), len(c)) for c in [CHUNKS[1], CHUNKS[0], *CHUNKS[2:]]],
        grpc.StatusCode.INVALID_ARGUMENT,
        "make up blob",
    ),
    "one chunk short": (
        lambda: [(b3(c), len(c)) for c in CHUNKS[:-1]],
        grpc.StatusCode.INVALID_ARGUMENT,
        "make up blob",
    ),
    "empty list": (lambda: [], grpc.StatusCode.INVALID_ARGUMENT, "empty chunk list"),
    "a chunk twice, once with a lying size": (
        lambda: (
            [(b3(CHUNKS[0]), len(CHUNKS[0])), (b3(CHUNKS[0]), len(CHUNKS[0]) - 1)]
            + [(b3(c), len(c)) for c in CHUNKS[1:]]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "chunk 1",
    ),
    "empty chunk": (
        lambda: [(b3(c), len(c)) for c in CHUNKS] + [(EMPTY_DIGEST, 0)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "declares 0 bytes",
    ),
}


@pytest.mark.parametrize("store", ["memory", "objectstore+file"], indirect=True)  # both ways PutBlob stores
@pytest.mark.parametrize("case", sorted(BAD_METAS))
async def test_put_blob_refuses_a_lying_chunk_list(stubs: Stubs, store: BlobService, case: str) -> None:
    for chunk in CHUNKS:
        await stubs.put(chunk)
    chunks, code, words = BAD_METAS[case]
    listed = chunks()
    request = bs_pb.PutBlobRequest(digest=b3(BLOB), blob_meta=meta(listed))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stubs.put_blob(request)
    assert info.value.code() == code
    assert words in (info.value.details() or ""), info.value.details()
    # nothing stored: not the blob asked for, nor whatever the list does assemble into
    assert not await store.has(b3(BLOB))
    if case == "another blob":
        assert not await store.has(b3(CHUNKS[1] + CHUNKS[0] + b"".join(CHUNKS[2:])))
    if case == "one chunk short":
        assert not await store.has(b3(b"".join(CHUNKS[:-1])))
    assert await status_of(stubs.stat_blob(bs_pb.BSStatBlobRequest(digest=b3(BLOB)))) == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("store", ["objectstore+file"], indirect=True)
async def test_put_blob_refuses_a_blob_of_several_chunks_listed_as_a_chunk(stubs: Stubs, store: BlobService) -> None:
    """Its bytes are stored and fit, but it is no chunk: INVALID_ARGUMENT, not an internal error; nothing stored."""
    several = noise(b"several", 2 << 20)
    assert len(await store.chunks(await store.put(several)) or []) >= 2
    await stubs.put(CHUNKS[0])
    target = b3(several + CHUNKS[0])
    listed = [(b3(several), len(several)), (b3(CHUNKS[0]), len(CHUNKS[0]))]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stubs.put_blob(bs_pb.PutBlobRequest(digest=target, blob_meta=meta(listed)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "blob of several chunks" in (info.value.details() or "")
    assert not await store.has(target)


async def test_put_blob_without_blob_meta(stubs: Stubs, store: BlobService) -> None:
    """As snix: a PutBlob must carry a BlobMeta, even the empty blob's (which is then empty)."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stubs.put_blob(bs_pb.PutBlobRequest(digest=EMPTY_DIGEST))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no blob_meta" in (info.value.details() or "")
    assert not await store.has(B3Digest(EMPTY_DIGEST))


async def test_get_chunk_checks_before_sending() -> None:
    """A store holding wrong bytes under a digest: GetChunk sends none of them."""
    blobs = MemoryBlobService()
    digest = await blobs.put(b"the right bytes")
    blobs._blobs[digest] = b"the wrong bytes"
    running = await serve(blobs)
    try:
        async with grpc.aio.insecure_channel(running.url.removeprefix("grpc+http://")) as channel:
            call = Stubs(channel).get_chunk(cs_pb.GetChunkRequest(digest=digest))
            received: list[bytes] = []

            async def drain() -> None:
                async for response in call:
                    received.append(cast(cs_pb.GetChunkResponse, response).data)

            with pytest.raises(grpc.aio.AioRpcError) as info:
                await drain()
            assert info.value.code() == grpc.StatusCode.DATA_LOSS
            assert received == []
    finally:
        await running.stop(0)


# -- the client: grpc+…?chunkstore=1 ----------------------------------------------------------------


def changed_chunks(old: bytes, new: bytes) -> list[bytes]:
    known = {b3(c) for c in snix_chunks(old)}
    return [c for c in snix_chunks(new) if b3(c) not in known]


async def test_url_option(tmp_path: Path) -> None:
    running = await serve(MemoryBlobService())
    try:
        async with await blob_service_from_url(running.url + "?chunkstore=1") as svc:
            assert isinstance(svc, GrpcChunkStoreBlobService)
        async with await blob_service_from_url(running.url + "?chunkstore=0&protocol=snix") as svc:
            assert type(svc) is GrpcBlobService
        with pytest.raises(ConfigurationError, match="chunkstore must be 0 or 1"):
            await blob_service_from_url(running.url + "?chunkstore=maybe")
    finally:
        await running.stop(0)


async def test_writer_sends_only_the_chunks_the_server_lacks(tmp_path: Path) -> None:
    far = CountingLocal(tmp_path / "far")
    running = await serve(far)
    try:
        async with await blob_service_from_url(running.url + "?chunkstore=1") as svc:
            assert await svc.put(BLOB) == b3(BLOB)
            assert far.chunk_bytes_in == len(BLOB)
            far.chunk_bytes_in = 0
            assert await svc.put(BLOB_V2) == b3(BLOB_V2)
            changed = changed_chunks(BLOB, BLOB_V2)
            assert 1 <= len(changed) <= 3
            assert far.chunk_bytes_in == sum(map(len, changed)) < len(BLOB_V2) // 2
            far.chunk_bytes_in = 0
            assert await svc.put(b"") == B3Digest(EMPTY_DIGEST)
            assert await svc.put(b"tiny") == b3(b"tiny")
            assert far.chunk_bytes_in == 0  # small blobs go by one Put, not PutChunk + PutBlob
            small = noise(b"just above", (64 << 10) + 1)
            assert await svc.put(small) == b3(small)
            assert far.chunk_bytes_in == len(small)
        # the old BlobService reads them, with the chunk list
        async with await blob_service_from_url(running.url) as plain:
            assert await plain.read(b3(BLOB_V2)) == BLOB_V2
            assert await plain.chunks(b3(BLOB_V2)) == [ChunkMeta(b3(c), len(c)) for c in snix_chunks(BLOB_V2)]
            assert await plain.read(B3Digest(EMPTY_DIGEST)) == b""
            assert await plain.read(b3(b"tiny")) == b"tiny"
    finally:
        await running.stop(0)


async def test_client_put_index_refusals(tmp_path: Path) -> None:
    running = await serve(LocalBlobService(tmp_path / "far"))
    try:
        async with await blob_service_from_url(running.url + "?chunkstore=1") as svc:
            assert isinstance(svc, GrpcChunkStoreBlobService)
            metas = [ChunkMeta(b3(c), len(c)) for c in CHUNKS]
            assert await svc.missing_chunks(metas) == metas
            for meta_, chunk in zip(metas[:-1], CHUNKS[:-1], strict=True):
                await svc.put_chunk(meta_, chunk)
            assert await svc.missing_chunks(metas) == metas[-1:]
            with pytest.raises(StorageError, match=f"FAILED_PRECONDITION.*chunk {len(CHUNKS) - 1} .*not stored"):
                await svc.put_index(b3(BLOB), metas)
            await svc.put_chunk(metas[-1], CHUNKS[-1])
            with pytest.raises(ValidationError, match="make up blob"):
                await svc.put_index(b3(b"something else"), metas)
            assert not await svc.has(b3(BLOB))
            await svc.put_index(b3(BLOB), metas)
            assert await svc.has(b3(BLOB)) and await svc.read(b3(BLOB)) == BLOB
            assert await svc.size(b3(BLOB)) == len(BLOB)
    finally:
        await running.stop(0)


async def test_combined_far_chunkstore_fetches_only_missing_chunks(tmp_path: Path) -> None:
    far_store = LocalBlobService(tmp_path / "far")
    counted = InstrumentedBlobs(far_store)
    v1, v2 = await far_store.put(BLOB), await far_store.put(BLOB_V2)
    running = await serve(counted)
    try:
        async with await blob_service_from_url(running.url + "?chunkstore=1") as far:
            near = LocalBlobService(tmp_path / "near")
            combined = CombinedBlobService(near, far)
            counted.bytes_read = 0
            assert await combined.read(v1) == BLOB
            assert counted.bytes_read == len(BLOB)
            counted.bytes_read = 0
            assert await combined.read(v2) == BLOB_V2
            assert counted.bytes_read == sum(map(len, changed_chunks(BLOB, BLOB_V2)))
            assert await near.chunks(v2) == [ChunkMeta(b3(c), len(c)) for c in snix_chunks(BLOB_V2)]
    finally:
        await running.stop(0)


@pytest.mark.parametrize("far_kind", ["chunked", "whole"])
async def test_combined_near_chunkstore_receives_only_missing_chunks(tmp_path: Path, far_kind: str) -> None:
    """near is a daemon: a far blob kept in chunks fills it chunk by chunk, one kept whole through the
    chunking writer; either way only the chunks the daemon lacks cross the wire."""
    near_store = CountingLocal(tmp_path / "near")
    far: BlobService = LocalBlobService(tmp_path / "far") if far_kind == "chunked" else MemoryBlobService()
    v1, v2 = await far.put(BLOB), await far.put(BLOB_V2)
    running = await serve(near_store)
    try:
        async with await blob_service_from_url(running.url + "?chunkstore=1") as near:
            combined = CombinedBlobService(near, far)
            assert await combined.read(v1) == BLOB
            assert near_store.chunk_bytes_in == len(BLOB)
            near_store.chunk_bytes_in = 0
            assert await combined.read(v2) == BLOB_V2
            assert near_store.chunk_bytes_in == sum(map(len, changed_chunks(BLOB, BLOB_V2)))
        assert await near_store.read(v2) == BLOB_V2
        assert await near_store.chunks(v2) == [ChunkMeta(b3(c), len(c)) for c in snix_chunks(BLOB_V2)]
    finally:
        await running.stop(0)


# -- reflection: snix names are the 2026 ones, tvix names the 2024 ones ----------------------------------


async def test_reflection_shows_the_names_of_each_package() -> None:
    running = await start_server(
        "127.0.0.1:0", MemoryBlobService(), MemoryDirectoryService(), pathinfos=MemoryPathInfoService()
    )
    symbols = [
        "snix.castore.v1.BlobService",
        "snix.castore.v1.ChunkStoreService",
        "snix.castore.v1.BlobStoreService",
        "snix.store.v1.PathInfoService",
        "tvix.castore.v1.BlobService",
        "tvix.store.v1.PathInfoService",
        "snix.castore.v1.Node",
        "tvix.castore.v1.ChunkStoreService",
    ]
    try:
        async with grpc.aio.insecure_channel(running.url.removeprefix("grpc+http://")) as channel:
            listed, *answers = await reflect(
                channel,
                "v1",
                [
                    reflection_pb2.ServerReflectionRequest(list_services=""),
                    *(reflection_pb2.ServerReflectionRequest(file_containing_symbol=s) for s in symbols),
                ],
            )
    finally:
        await running.stop(0)
    services = {s.name for s in listed.list_services_response.service}
    assert {"snix.castore.v1.ChunkStoreService", "snix.castore.v1.BlobStoreService"} <= services
    assert not {"tvix.castore.v1.ChunkStoreService", "tvix.castore.v1.BlobStoreService"} & services
    snix_blob, chunkstore, blobstore, snix_pathinfo, tvix_blob, tvix_pathinfo, *missing = answers

    assert "snix/castore/protos/rpc_blobservice.proto" in file_descriptors(snix_blob)
    assert "snix/castore/protos/rpc_blobstore.proto" not in file_descriptors(snix_blob)
    assert "tvix/castore/protos/rpc_blobstore.proto" in file_descriptors(tvix_blob)
    (service,) = file_descriptors(chunkstore)["snix/castore/protos/rpc_chunkstore.proto"].service
    assert [m.name for m in service.method] == ["StatChunk", "GetChunk", "PutChunk"]
    files = file_descriptors(blobstore)
    assert "snix/castore/protos/blobstore.proto" in files
    (service,) = files["snix/castore/protos/rpc_blobstore.proto"].service
    put_blob = next(m for m in service.method if m.name == "PutBlob")
    assert (put_blob.input_type, put_blob.output_type) == (
        ".snix.castore.v1.PutBlobRequest",
        ".snix.castore.v1.BSPutBlobResponse",
    )

    for answer, prefix, node, field in (
        (snix_pathinfo, "snix", "Entry", "entry"),
        (tvix_pathinfo, "tvix", "Node", "node"),
    ):
        files = file_descriptors(answer)
        (service,) = files[f"{prefix}/store/protos/rpc_pathinfo.proto"].service
        calculate = next(m for m in service.method if m.name == "CalculateNAR")
        assert calculate.input_type == f".{prefix}.castore.v1.{node}"
        (path_info,) = (m for m in files[f"{prefix}/store/protos/pathinfo.proto"].message_type if m.name == "PathInfo")
        assert (path_info.field[0].name, path_info.field[0].number) == (field, 1)
        assert path_info.field[0].type_name == f".{prefix}.castore.v1.{node}"
        castore = {m.name for m in files[f"{prefix}/castore/protos/castore.proto"].message_type}
        assert castore >= (
            {"Entry", "DirectoryEntry", "FileEntry", "SymlinkEntry"}
            if prefix == "snix"
            else {"Node", "DirectoryNode", "FileNode", "SymlinkNode"}
        )
        assert not castore & ({"Node", "FileNode"} if prefix == "snix" else {"Entry", "FileEntry"})
    for answer in missing:
        assert answer.WhichOneof("message_response") == "error_response"
        assert answer.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


async def test_chunkstore_option_against_a_server_without_the_services() -> None:
    """A daemon with only the 2024 services (tvix, snix before 2026): a one-line error naming the option."""
    server = grpc.aio.server()
    add_castore_servicers(server, MemoryBlobService(), MemoryDirectoryService())
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with await blob_service_from_url(f"grpc+http://127.0.0.1:{port}?chunkstore=1") as svc:
            with pytest.raises(StorageError, match=r"no snix\.castore\.v1 ChunkStoreService.*remove chunkstore=1"):
                await svc.has(b3(b"x"))
            with pytest.raises(StorageError, match="remove chunkstore=1"):
                await svc.put(noise(b"above the small-blob put", 100_000))
    finally:
        await server.stop(0)


async def test_put_blob_refuses_too_many_chunks(stubs: Stubs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("nixcas.castore.grpc.chunkstore.MAX_BLOB_CHUNKS", 4)
    for chunk in CHUNKS[:5]:
        await stubs.put(chunk)
    request = bs_pb.PutBlobRequest(
        digest=b3(b"".join(CHUNKS[:5])), blob_meta=meta([(b3(c), len(c)) for c in CHUNKS[:5]])
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stubs.put_blob(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "5 chunks listed (at most 4)" in (info.value.details() or "")


SNIX_ONLY = [
    (service, method)
    for module in (cs_pb, bs_pb)
    for service in module.DESCRIPTOR.services_by_name.values()
    for method in service.methods
]


async def test_undecodable_requests_on_the_snix_only_methods() -> None:
    """Bytes that are not the method's message: INVALID_ARGUMENT naming the method, nothing stored."""
    blobs = MemoryBlobService()
    running = await serve(blobs)
    raw = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    try:
        async with grpc.aio.insecure_channel(running.url.removeprefix("grpc+http://")) as channel:
            for service, method in SNIX_ONLY:
                path = f"/snix.castore.v1.{service.name}/{method.name}"
                for garbage in (b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f"):
                    if method.client_streaming:
                        call = channel.stream_unary(path, **raw)(iter([garbage]))
                    elif method.server_streaming:
                        call = channel.unary_stream(path, **raw)(garbage).read()
                    else:
                        call = channel.unary_unary(path, **raw)(garbage)
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call
                    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, info.value)
                    assert f"{service.name}.{method.name}: undecodable" in (info.value.details() or "")
    finally:
        await running.stop(0)
    assert blobs._blobs == {}


class LyingBlobStore:
    """A BlobStoreService + ChunkStoreService that answers whatever the test sets."""

    def __init__(self) -> None:
        self.meta: meta_pb.BlobMeta | None = None
        self.chunk = b""

    async def StatBlob(self, request: bs_pb.BSStatBlobRequest, context: object) -> bs_pb.BSStatBlobResponse:
        return bs_pb.BSStatBlobResponse()

    async def GetBlob(self, request: bs_pb.GetBlobRequest, context: object) -> bs_pb.GetBlobResponse:
        return bs_pb.GetBlobResponse() if self.meta is None else bs_pb.GetBlobResponse(blob_meta=self.meta)

    async def PutBlob(self, request: bs_pb.PutBlobRequest, context: object) -> bs_pb.BSPutBlobResponse:
        return bs_pb.BSPutBlobResponse()

    async def StatChunk(self, request: cs_pb.StatChunkRequest, context: object) -> cs_pb.StatChunkResponse:
        return cs_pb.StatChunkResponse()

    async def GetChunk(self, request: cs_pb.GetChunkRequest, context: object) -> AsyncIterator[cs_pb.GetChunkResponse]:
        yield cs_pb.GetChunkResponse(data=self.chunk)

    async def PutChunk(self, requests: AsyncIterator[cs_pb.PutChunkRequest], context: object) -> cs_pb.PutChunkResponse:
        async for _ in requests:
            pass
        return cs_pb.PutChunkResponse(digest=b3(b"not what was sent"))


async def test_client_checks_what_a_lying_server_answers() -> None:
    liar = LyingBlobStore()
    server = grpc.aio.server()
    for module, name in ((bs_pb, "BlobStoreService"), (cs_pb, "ChunkStoreService")):
        add_servicer(server, liar, module.DESCRIPTOR.services_by_name[name], prefixes=("snix",))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    digest = b3(BLOB)
    try:
        async with await blob_service_from_url(f"grpc+http://127.0.0.1:{port}?chunkstore=1") as svc:
            assert isinstance(svc, GrpcChunkStoreBlobService)
            with pytest.raises(StorageError, match="no blob_meta"):
                await svc.chunks(digest)
            liar.meta = meta([])
            with pytest.raises(StorageError, match="empty chunk list for a blob that is not empty"):
                await svc.chunks(digest)
            liar.meta = meta([(b3(CHUNKS[0]), len(BLOB))])
            with pytest.raises(StorageError, match=r"single chunk \w+ that is not the blob"):
                await svc.chunks(digest)
            liar.meta = meta([(b3(c), len(c)) for c in CHUNKS])
            assert await svc.chunks(digest) == [ChunkMeta(b3(c), len(c)) for c in CHUNKS]
            wanted = ChunkMeta(b3(CHUNKS[0]), len(CHUNKS[0]))
            liar.chunk = noise(b"other", len(CHUNKS[0]))  # the right size, other bytes
            with pytest.raises(ChecksumMismatch):
                await svc.read_chunk(wanted)
            liar.chunk = CHUNKS[0] + b"!"
            with pytest.raises(StorageError, match="more than the"):
                await svc.read_chunk(wanted)
            liar.chunk = CHUNKS[0]
            assert await svc.read_chunk(wanted) == CHUNKS[0]
            with pytest.raises(StorageError, match="the server answered"):
                await svc.put_chunk(wanted, CHUNKS[0])
    finally:
        await server.stop(0)

"""The castore over gRPC, in process: contract suites through the clients, status codes, hostile peers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import blake3
import grpc
import grpc.aio
import pytest
import pytest_asyncio

from nixcas._proto.tvix.castore.protos import castore_pb2 as pb
from nixcas._proto.tvix.castore.protos import rpc_blobstore_pb2 as blob_pb
from nixcas._proto.tvix.castore.protos import rpc_directory_pb2 as dir_pb
from nixcas.castore.blob.base import BlobReader, BlobService
from nixcas.castore.blob.grpc import GrpcBlobService, GrpcChunkStoreBlobService
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.dirs.grpc import GrpcDirectoryService
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.grpc.codec import identity
from nixcas.castore.grpc.register import add_servicer
from nixcas.castore.grpc.status import RemoteError
from nixcas.castore.nodes import DirectoryNode, FileNode
from nixcas.castore.sizerule import SizeRule
from nixcas.composition import blob_service_from_url, directory_service_from_url
from nixcas.errors import ChecksumMismatch, ClosureError, ConfigurationError, StorageError, ValidationError
from nixcas.server import RunningServer, start_server
from nixcas.testing.blobservice import BlobCorrupter, BlobServiceSuite
from nixcas.testing.directoryservice import DirectoryServiceSuite, RawStore
from nixcas.testing.fixtures import (
    DIRECTORY_A,
    DIRECTORY_B,
    DIRECTORY_COMPLICATED,
    DIRECTORY_D,
    DIRECTORY_WITH_KEEP,
    HELLOWORLD,
)

PREFIXES = ("tvix", "snix")


def b3(data: bytes) -> B3Digest:
    return B3Digest(blake3.blake3(data).digest())


class LyingMemoryBlobService(MemoryBlobService):
    """Hands out stored bytes without checking them: a server that serves whatever it holds."""

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        return await self._open_read(digest)


Listen = Callable[[Path], str]
TRANSPORTS: dict[str, Listen] = {
    "tcp": lambda tmp: "127.0.0.1:0",
    "unix": lambda tmp: str(tmp / "castore.sock"),
}


@pytest.fixture(params=sorted(TRANSPORTS))
def listen(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return TRANSPORTS[request.param](tmp_path)


@pytest_asyncio.fixture
async def backing() -> tuple[LyingMemoryBlobService, MemoryDirectoryService]:
    return LyingMemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX)


@pytest_asyncio.fixture
async def server(listen: str, backing: tuple[BlobService, DirectoryService]) -> AsyncIterator[RunningServer]:
    running = await start_server(listen, *backing)
    yield running
    await running.stop(0)


@pytest_asyncio.fixture
async def channel(server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    target = server.url.removeprefix("grpc+http://").replace("grpc+unix://", "unix:")
    async with grpc.aio.insecure_channel(target) as ch:
        yield ch


# -- the contract suites through the clients ------------------------------------


class TestGrpcBlobService(BlobServiceSuite):
    covers = ("grpc",)

    @pytest_asyncio.fixture
    async def blob_service(self, server: RunningServer) -> AsyncIterator[BlobService]:
        svc = await blob_service_from_url(server.url + "?wait-connect=1")
        assert isinstance(svc, GrpcBlobService)
        yield svc
        await svc.close()

    @pytest.fixture
    def corrupt_blob(self, backing: tuple[LyingMemoryBlobService, MemoryDirectoryService]) -> BlobCorrupter:
        """The server hands out the corrupted bytes unchecked: the client must notice."""
        blobs = backing[0]._blobs

        async def corrupt(digest: B3Digest, data: bytes) -> None:
            assert digest in blobs
            blobs[digest] = data

        return corrupt


class TestGrpcBlobServiceSnix(TestGrpcBlobService):
    @pytest_asyncio.fixture
    async def blob_service(self, server: RunningServer) -> AsyncIterator[BlobService]:
        svc = await blob_service_from_url(server.url + "?protocol=snix")
        yield svc
        await svc.close()


class TestGrpcChunkStoreBlobService(TestGrpcBlobService):
    """The contract through ``?chunkstore=1`` (GetBlob/GetChunk, chunking writer, PutChunk/PutBlob)."""

    @pytest.fixture
    def listen(self) -> str:
        return "127.0.0.1:0"

    @pytest_asyncio.fixture
    async def blob_service(self, server: RunningServer) -> AsyncIterator[BlobService]:
        svc = await blob_service_from_url(server.url + "?chunkstore=1")
        assert isinstance(svc, GrpcChunkStoreBlobService)
        yield svc
        await svc.close()


class TestGrpcDirectoryService(DirectoryServiceSuite):
    covers = ("grpc",)
    corruption_error = RemoteError

    @pytest_asyncio.fixture
    async def directory_service(self, server: RunningServer) -> AsyncIterator[DirectoryService]:
        svc = await directory_service_from_url(server.url)
        assert isinstance(svc, GrpcDirectoryService)
        yield svc
        await svc.close()

    @pytest.fixture
    def store_raw(self, backing: tuple[LyingMemoryBlobService, MemoryDirectoryService]) -> RawStore:
        """Bytes in the server's own store: it checks them and answers DATA_LOSS, which the client raises."""
        data = backing[1]._data

        async def store(digest: B3Digest, raw: bytes) -> None:
            data[digest] = raw

        return store


class TestGrpcDirectoryServiceSnix(TestGrpcDirectoryService):
    @pytest_asyncio.fixture
    async def directory_service(self, server: RunningServer) -> AsyncIterator[DirectoryService]:
        svc = await directory_service_from_url(server.url + "?protocol=snix&wait-connect=1")
        yield svc
        await svc.close()


# -- raw calls: status codes -----------------------------------------------------


def blob_method(channel: grpc.aio.Channel, prefix: str, name: str, req: Any, resp: Any, kind: str) -> Any:
    path = f"/{prefix}.castore.v1.BlobService/{name}"
    factory = getattr(channel, kind)
    return factory(path, request_serializer=req.SerializeToString, response_deserializer=resp.FromString)


def dir_method(channel: grpc.aio.Channel, prefix: str, name: str, kind: str) -> Any:
    path = f"/{prefix}.castore.v1.DirectoryService/{name}"
    if name == "Get":
        return getattr(channel, kind)(
            path, request_serializer=dir_pb.GetDirectoryRequest.SerializeToString, response_deserializer=identity
        )
    return getattr(channel, kind)(
        path, request_serializer=identity, response_deserializer=dir_pb.PutDirectoryResponse.FromString
    )


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("length", [0, 31, 33, 64])
async def test_wrong_digest_length_is_invalid_argument(channel: grpc.aio.Channel, prefix: str, length: int) -> None:
    bad = b"\x01" * length
    stat = blob_method(channel, prefix, "Stat", blob_pb.StatBlobRequest, blob_pb.StatBlobResponse, "unary_unary")
    read = blob_method(channel, prefix, "Read", blob_pb.ReadBlobRequest, blob_pb.BlobChunk, "unary_stream")
    get = dir_method(channel, prefix, "Get", "unary_stream")
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: stat(blob_pb.StatBlobRequest(digest=bad)),
        lambda: read(blob_pb.ReadBlobRequest(digest=bad)).read(),
        lambda: get(dir_pb.GetDirectoryRequest(digest=bad)).read(),
        lambda: get(dir_pb.GetDirectoryRequest(digest=bad, recursive=True)).read(),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "invalid digest length" in (info.value.details() or "")


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_unknown_digest_is_not_found(channel: grpc.aio.Channel, prefix: str) -> None:
    unknown = b3(b"never stored")
    stat = blob_method(channel, prefix, "Stat", blob_pb.StatBlobRequest, blob_pb.StatBlobResponse, "unary_unary")
    read = blob_method(channel, prefix, "Read", blob_pb.ReadBlobRequest, blob_pb.BlobChunk, "unary_stream")
    get = dir_method(channel, prefix, "Get", "unary_stream")
    for send_chunks in (False, True):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stat(blob_pb.StatBlobRequest(digest=unknown, send_chunks=send_chunks))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await read(blob_pb.ReadBlobRequest(digest=unknown)).read()
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await get(dir_pb.GetDirectoryRequest(digest=unknown)).read()
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # recursive: a missing root is an empty stream with status OK
    call = get(dir_pb.GetDirectoryRequest(digest=unknown, recursive=True))
    assert [m async for m in call] == []
    assert await call.code() == grpc.StatusCode.OK


async def test_get_without_by_what_is_invalid_argument(channel: grpc.aio.Channel) -> None:
    get = dir_method(channel, "tvix", "Get", "unary_stream")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await get(dir_pb.GetDirectoryRequest(recursive=True)).read()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "by_what" in (info.value.details() or "")


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_stat_honours_send_chunks(
    channel: grpc.aio.Channel, prefix: str, backing: tuple[MemoryBlobService, MemoryDirectoryService]
) -> None:
    digest = await backing[0].put(HELLOWORLD)
    stat = blob_method(channel, prefix, "Stat", blob_pb.StatBlobRequest, blob_pb.StatBlobResponse, "unary_unary")
    for send_chunks in (False, True):
        response = await stat(blob_pb.StatBlobRequest(digest=digest, send_chunks=send_chunks))
        assert list(response.chunks) == []  # a memory blob has no finer chunking
        assert response.bao == b""


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_put_and_read_message_boundaries_do_not_matter(channel: grpc.aio.Channel, prefix: str) -> None:
    data = blake3.blake3(b"boundaries").digest(length=3 * (1 << 20) + 7)
    put = blob_method(channel, prefix, "Put", blob_pb.BlobChunk, blob_pb.PutBlobResponse, "stream_unary")
    pieces = [data[:1], b"", data[1:100_000], data[100_000:]]
    response = await put(iter([blob_pb.BlobChunk(data=p) for p in pieces]))
    assert response.digest == b3(data)
    read = blob_method(channel, prefix, "Read", blob_pb.ReadBlobRequest, blob_pb.BlobChunk, "unary_stream")
    messages = [m.data async for m in read(blob_pb.ReadBlobRequest(digest=response.digest))]
    assert b"".join(messages) == data
    assert len(messages) > 1
    assert max(len(m) for m in messages) <= 4 << 20  # stays under a default gRPC client's limit


async def test_recursive_get_sends_each_directory_once_root_first(
    channel: grpc.aio.Channel, backing: tuple[MemoryBlobService, MemoryDirectoryService]
) -> None:
    putter = backing[1].put_multiple_start()
    for d in (DIRECTORY_A, DIRECTORY_B, DIRECTORY_D):
        await putter.put(d)
    root = await putter.close()
    get = dir_method(channel, "snix", "Get", "unary_stream")
    raw = [m async for m in get(dir_pb.GetDirectoryRequest(digest=root, recursive=True))]
    assert [b3(r) for r in raw] == [DIRECTORY_D.digest, DIRECTORY_A.digest, DIRECTORY_B.digest]


# -- Directory.Put: invalid closures store nothing --------------------------------


def _bad_closures() -> dict[str, list[bytes]]:
    keep = DIRECTORY_WITH_KEEP
    wrong_size = Directory({b"keep": DirectoryNode(keep.digest, keep.size_under(SizeRule.TVIX) + 1)})
    unsorted = pb.Directory()
    unsorted.files.add(name=b"b", digest=bytes(32), size=1)
    unsorted.files.add(name=b"a", digest=bytes(32), size=1)
    bad_name = pb.Directory()
    bad_name.files.add(name=b"..", digest=bytes(32), size=1)
    short_digest = pb.Directory()
    short_digest.files.add(name=b"a", digest=bytes(31), size=1)
    return {
        "dangling": [DIRECTORY_COMPLICATED.encode()],
        "wrong-size": [keep.encode(), wrong_size.encode()],
        "disconnected": [DIRECTORY_A.encode(), keep.encode()],
        "child-after-parent": [DIRECTORY_B.encode(), DIRECTORY_A.encode()],
        "unsorted": [unsorted.SerializeToString()],
        "bad-name": [bad_name.SerializeToString()],
        "short-digest": [short_digest.SerializeToString()],
        "empty": [],
    }


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("case", sorted(_bad_closures()))
async def test_directory_put_rejects_invalid_closures(
    channel: grpc.aio.Channel, backing: tuple[MemoryBlobService, MemoryDirectoryService], prefix: str, case: str
) -> None:
    put = dir_method(channel, prefix, "Put", "stream_unary")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await put(iter(_bad_closures()[case]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details()  # the reason travels along
    assert backing[1]._data == {}


async def test_directory_put_error_reasons(channel: grpc.aio.Channel) -> None:
    put = dir_method(channel, "tvix", "Put", "stream_unary")
    expectations = {
        "dangling": "dangling",
        "wrong-size": "wrong size",
        "disconnected": "root",
        "empty": "no directories",
    }
    for case, words in expectations.items():
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await put(iter(_bad_closures()[case]))
        assert words in (info.value.details() or ""), case


async def test_client_putter_rejects_before_sending(server: RunningServer) -> None:
    svc = await directory_service_from_url(server.url)
    try:
        async with svc.put_multiple_start() as putter:
            with pytest.raises(ClosureError):
                await putter.put(DIRECTORY_COMPLICATED)
        # the server refuses a lone directory with children (its closure is not in the stream)
        with pytest.raises(ValidationError):
            await svc.put(DIRECTORY_B)
    finally:
        await svc.close()


async def test_large_directory_over_4_mib(
    server: RunningServer, backing: tuple[MemoryBlobService, MemoryDirectoryService]
) -> None:
    blob = b3(b"x")
    entries = {b"%0250d" % i: FileNode(blob, 1, executable=False) for i in range(20_000)}
    big = Directory(entries)
    assert len(big.encode()) > 4 << 20
    svc = await directory_service_from_url(server.url)
    try:
        assert await svc.put(big) == big.digest
        got = await svc.get(big.digest)
        assert got is not None
        assert got.digest == big.digest
        assert [d.digest async for d in svc.get_recursive(big.digest)] == [big.digest]
    finally:
        await svc.close()
    assert big.digest in backing[1]._data


# -- a client going away mid-Put leaves nothing ----------------------------------


async def test_client_disconnect_mid_put_leaves_no_blob(server: RunningServer, tmp_path: Path) -> None:
    # serve a file-backed store to also check that no temp files remain
    store = await blob_service_from_url(f"objectstore+file://{tmp_path}/blobs")
    running = await start_server("127.0.0.1:0", store, MemoryDirectoryService(SizeRule.TVIX))
    data = blake3.blake3(b"half").digest(length=4 << 20)
    try:
        svc = await blob_service_from_url(running.url)
        assert isinstance(svc, GrpcBlobService)
        writer = await svc.open_write()
        await writer.write(data[: 2 << 20])
        await asyncio.sleep(0.2)  # the server is now holding a half-written blob
        await svc.close()  # the channel goes away with the call open
        for _ in range(50):
            await asyncio.sleep(0.05)
            if not list((tmp_path / "blobs" / "tmp").iterdir()):
                break
        assert not await store.has(b3(data))
        assert list((tmp_path / "blobs" / "tmp").iterdir()) == []
    finally:
        await running.stop(0)
        await store.close()


async def test_client_abort_mid_put_leaves_no_blob(
    server: RunningServer, backing: tuple[MemoryBlobService, MemoryDirectoryService]
) -> None:
    svc = await blob_service_from_url(server.url)
    data = b"partial upload " * 1000
    try:
        writer = await svc.open_write()
        await writer.write(data)
        await writer.abort()
        await asyncio.sleep(0.1)
        assert backing[0]._blobs == {}
        assert not await svc.has(b3(data))
    finally:
        await svc.close()


# -- hostile servers --------------------------------------------------------------


class HostileDirectories:
    """A DirectoryService servicer answering Get from a fixed script of raw messages."""

    SERIALIZERS: ClassVar = {"Get": identity}

    def __init__(self) -> None:
        self.answers: list[bytes] = []
        self.put_answer = b""

    async def Get(self, request: dir_pb.GetDirectoryRequest, context: object) -> AsyncIterator[bytes]:
        for raw in self.answers:
            yield raw

    async def Put(self, requests: AsyncIterator[pb.Directory], context: object) -> dir_pb.PutDirectoryResponse:
        async for _ in requests:
            pass
        return dir_pb.PutDirectoryResponse(root_digest=self.put_answer)


class HostileBlobs:
    """A BlobService servicer that answers with fixed data and digests."""

    def __init__(self) -> None:
        self.data = b""
        self.put_digest = b""
        self.chunks: list[tuple[bytes, int]] = []

    async def Stat(self, request: blob_pb.StatBlobRequest, context: object) -> blob_pb.StatBlobResponse:
        response = blob_pb.StatBlobResponse()
        for digest, size in self.chunks:
            response.chunks.add(digest=digest, size=size)
        return response

    async def Read(self, request: blob_pb.ReadBlobRequest, context: object) -> AsyncIterator[blob_pb.BlobChunk]:
        yield blob_pb.BlobChunk(data=self.data)

    async def Put(self, requests: AsyncIterator[blob_pb.BlobChunk], context: object) -> blob_pb.PutBlobResponse:
        async for _ in requests:
            pass
        return blob_pb.PutBlobResponse(digest=self.put_digest)


@pytest_asyncio.fixture
async def hostile() -> AsyncIterator[tuple[str, HostileBlobs, HostileDirectories]]:
    blobs, directories = HostileBlobs(), HostileDirectories()
    server = grpc.aio.server()
    add_servicer(server, blobs, blob_pb.DESCRIPTOR.services_by_name["BlobService"])
    add_servicer(server, directories, dir_pb.DESCRIPTOR.services_by_name["DirectoryService"])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"grpc+http://127.0.0.1:{port}", blobs, directories
    await server.stop(0)


async def test_hostile_blob_read_wrong_bytes(hostile: tuple[str, HostileBlobs, HostileDirectories]) -> None:
    url, blobs, _ = hostile
    blobs.data = b"not what you asked for"
    svc = await blob_service_from_url(url)
    try:
        with pytest.raises(ChecksumMismatch):
            await svc.read(b3(HELLOWORLD))
    finally:
        await svc.close()


async def test_hostile_blob_put_wrong_digest(hostile: tuple[str, HostileBlobs, HostileDirectories]) -> None:
    url, blobs, _ = hostile
    blobs.put_digest = bytes(b3(b"something else"))
    svc = await blob_service_from_url(url)
    try:
        with pytest.raises(StorageError, match="Put answered"):
            await svc.put(HELLOWORLD)
    finally:
        await svc.close()


@pytest.mark.parametrize("chunks", [[(b"\x01" * 31, 5)], [(bytes(b3(b"c")), 0)]])
async def test_hostile_blob_bad_chunk_list(
    hostile: tuple[str, HostileBlobs, HostileDirectories], chunks: list[tuple[bytes, int]]
) -> None:
    url, blobs, _ = hostile
    blobs.chunks = chunks
    svc = await blob_service_from_url(url)
    try:
        with pytest.raises(StorageError):
            await svc.chunks(b3(HELLOWORLD))
    finally:
        await svc.close()


async def test_hostile_directory_get_wrong_directory(hostile: tuple[str, HostileBlobs, HostileDirectories]) -> None:
    url, _, directories = hostile
    directories.answers = [DIRECTORY_B.encode()]
    svc = await directory_service_from_url(url)
    try:
        with pytest.raises(ChecksumMismatch):
            await svc.get(DIRECTORY_WITH_KEEP.digest)
        with pytest.raises(ChecksumMismatch):
            [d async for d in svc.get_recursive(DIRECTORY_WITH_KEEP.digest)]
    finally:
        await svc.close()


async def test_hostile_directory_garbage(hostile: tuple[str, HostileBlobs, HostileDirectories]) -> None:
    url, _, directories = hostile
    garbage = b"\xff\xff\xff"
    directories.answers = [garbage]
    svc = await directory_service_from_url(url)
    try:
        with pytest.raises(ChecksumMismatch):
            await svc.get(DIRECTORY_WITH_KEEP.digest)
        # the right digest for bytes that are no Directory: not a checksum problem, still refused
        with pytest.raises(StorageError) as info:
            await svc.get(b3(garbage))
        assert not isinstance(info.value, ChecksumMismatch)
    finally:
        await svc.close()


@pytest.mark.parametrize(
    ("answers", "message"),
    [
        pytest.param([DIRECTORY_D, DIRECTORY_A], "still expected 1", id="incomplete"),
        pytest.param([DIRECTORY_D, DIRECTORY_A, DIRECTORY_B, DIRECTORY_WITH_KEEP], "unexpected", id="extra"),
        pytest.param([DIRECTORY_D, DIRECTORY_WITH_KEEP], "unexpected", id="stranger"),
    ],
)
async def test_hostile_directory_recursive(
    hostile: tuple[str, HostileBlobs, HostileDirectories], answers: list[Directory], message: str
) -> None:
    url, _, directories = hostile
    directories.answers = [d.encode() for d in answers]
    svc = await directory_service_from_url(url)
    try:
        with pytest.raises(StorageError, match=message):
            [d async for d in svc.get_recursive(DIRECTORY_D.digest)]
    finally:
        await svc.close()


async def test_hostile_directory_put_wrong_root(hostile: tuple[str, HostileBlobs, HostileDirectories]) -> None:
    url, _, directories = hostile
    directories.put_answer = bytes(DIRECTORY_A.digest)
    svc = await directory_service_from_url(url)
    try:
        with pytest.raises(StorageError, match="root"):
            await svc.put(DIRECTORY_WITH_KEEP)
    finally:
        await svc.close()


# -- clients: URLs and unreachable servers ------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "grpc+unix://host/x.sock",
        "grpc+unix://",
        "grpc+unix:///",
        "grpc+unix:relative.sock",
        "grpc+http://localhost/x",
        "grpc+http://",
        "grpc+http://localhost:99999",
        "grpc+http://user:pw@localhost:1",
        "grpc+ftp://localhost:1",
        "grpc://localhost:1",
        "grpc+http://localhost:1?wait-connect=maybe",
        "grpc+http://localhost:1?connect-timeout=-1",
        "grpc+http://localhost:1?protocol=nix",
        "grpc+http://localhost:1?bogus=1",
    ],
)
async def test_bad_grpc_urls(url: str) -> None:
    with pytest.raises(ConfigurationError):
        await blob_service_from_url(url)
    with pytest.raises(ConfigurationError):
        await directory_service_from_url(url)


async def test_unreachable_server(tmp_path: Path) -> None:
    url = f"grpc+unix://{tmp_path}/nobody.sock"
    with pytest.raises(StorageError, match="cannot connect"):
        await blob_service_from_url(url + "?wait-connect=1&connect-timeout=0.3")
    lazy = await blob_service_from_url(url)  # lazy: fails on use, with the URL in the message
    try:
        with pytest.raises(RemoteError, match=r"nobody\.sock") as info:
            await lazy.has(b3(b"x"))
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        await lazy.close()


async def test_proxy_passes_status_codes_through(server: RunningServer, tmp_path: Path) -> None:
    """A daemon serving a gRPC client backend answers with the upstream's codes."""
    upstream_blobs = await blob_service_from_url(server.url)
    upstream_dirs = await directory_service_from_url(server.url)
    proxy = await start_server(str(tmp_path / "proxy.sock"), upstream_blobs, upstream_dirs)
    try:
        client = await blob_service_from_url(proxy.url)
        dirs = await directory_service_from_url(proxy.url)
        digest = await client.put(HELLOWORLD)
        assert await client.read(digest) == HELLOWORLD
        assert await client.read(b3(b"absent")) is None
        with pytest.raises(ValidationError):
            await dirs.put(DIRECTORY_B)  # dangling: INVALID_ARGUMENT travels through both hops
        await client.close()
        await dirs.close()
    finally:
        await proxy.stop(0)
        await upstream_blobs.close()
        await upstream_dirs.close()


# -- review findings: limits, broken channels, durability, protocol hints -------------


async def test_put_many_thousands_of_blobs(server: RunningServer) -> None:
    svc = await blob_service_from_url(server.url)
    try:
        blobs = [b"blob %d" % i for i in range(3000)]
        digests = await svc.put_many(blobs)
        assert digests == [b3(b) for b in blobs]
        assert all([await svc.has(d) for d in digests[::300]])
    finally:
        await svc.close()


@pytest.mark.parametrize("data", [b"", b"x", b"y" * (1 << 20)])
async def test_put_to_unreachable_server_is_a_storage_error(tmp_path: Path, data: bytes) -> None:
    svc = await blob_service_from_url(f"grpc+unix://{tmp_path}/nobody.sock")
    try:
        with pytest.raises(StorageError):
            await svc.put(data)
    finally:
        await svc.close()


class SyncCountingBlobService(MemoryBlobService):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    async def sync(self) -> None:
        self.log.append("sync")


class LoggingDirectoryService(MemoryDirectoryService):
    def __init__(self, log: list[str]) -> None:
        super().__init__(SizeRule.TVIX)
        self.log = log

    async def _put_raw(self, items: Sequence[tuple[B3Digest, bytes]]) -> None:
        self.log.append("directories")
        await super()._put_raw(items)


async def test_daemon_syncs_blobs_before_committing_directories(tmp_path: Path) -> None:
    log: list[str] = []
    running = await start_server(str(tmp_path / "s.sock"), SyncCountingBlobService(log), LoggingDirectoryService(log))
    try:
        dirs = await directory_service_from_url(running.url)
        async with dirs.put_multiple_start() as putter:
            await putter.put(DIRECTORY_WITH_KEEP)
            await putter.put(DIRECTORY_COMPLICATED)
            await putter.close()
        await dirs.close()
    finally:
        await running.stop(0)
    assert log == ["sync", "directories"]


async def test_wrong_protocol_names_the_option(tmp_path: Path) -> None:
    bare = grpc.aio.server()
    bare.add_insecure_port(f"unix:{tmp_path}/bare.sock")
    await bare.start()
    try:
        svc = await blob_service_from_url(f"grpc+unix://{tmp_path}/bare.sock")
        with pytest.raises(RemoteError, match=r"protocol=snix") as info:
            await svc.has(b3(b"x"))
        assert info.value.code == grpc.StatusCode.UNIMPLEMENTED
        await svc.close()
    finally:
        await bare.stop(0)

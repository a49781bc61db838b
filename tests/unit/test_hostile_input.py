"""Issue 16, defect 4: hostile input gets a 4xx / a client-error status, never a 500, INTERNAL or a traceback."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from nixcas._proto.tvix.castore.protos import castore_pb2 as castore_pb
from nixcas._proto.tvix.castore.protos import rpc_blobstore_pb2 as blob_pb
from nixcas._proto.tvix.castore.protos import rpc_directory_pb2 as dir_pb
from nixcas._proto.tvix.store.protos import rpc_pathinfo_pb2 as rpc_pb
from nixcas.bridge.app import NarBridge, nar_url
from nixcas.bridge.http import Unsatisfiable, parse_range
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.nodes import FileNode
from nixcas.castore.proto import encode_node
from nixcas.castore.sizerule import SizeRule
from nixcas.errors import PathInfoError
from nixcas.server import HEALTH, REFLECTION_V1, REFLECTION_V1ALPHA, RunningServer, start_server
from nixcas.store import nixbase32
from nixcas.store.nar.plan import plan_size
from nixcas.store.narindex import NarIndex
from nixcas.store.narinfo import NarInfo
from nixcas.store.pathinfo.memory import MemoryPathInfoService
from nixcas.testing.daemon import raw_calculate_nar
from nixcas.testing.samples import Sample, make_sample

NON_ASCII_SIGS = [
    "cache.example.org-1:AAAA\u00e9AAA",  # a Latin-1 letter in the base64
    "cache.example.org-1:" + "\u0663" * 88,  # Arabic-Indic digits
    "cach\u00e9:AAAA",  # in the key name
]


@pytest.mark.parametrize("sig", NON_ASCII_SIGS)
def test_narinfo_sig_with_non_ascii_is_a_parse_error(sig: str) -> None:
    text = (
        "StorePath: /nix/store/" + "1" * 32 + "-x\nURL: nar/x.nar\nCompression: none\n"
        "NarHash: sha256:" + "1" * 52 + "\nNarSize: 8\nReferences: \n" + f"Sig: {sig}\n"
    )
    with pytest.raises(PathInfoError, match="Sig"):
        NarInfo.parse(text)


@pytest_asyncio.fixture
async def bridge(tmp_path: Path) -> AsyncIterator[tuple[TestClient, MemoryBlobService, MemoryDirectoryService]]:  # type: ignore[type-arg]
    blobs, dirs, infos = MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX), MemoryPathInfoService()
    index = NarIndex(None)
    async with TestClient(TestServer(NarBridge(blobs, dirs, infos, index, allow_writes=True).application())) as c:
        yield c, blobs, dirs
    await index.close()


@pytest_asyncio.fixture
async def sample(tmp_path: Path) -> Sample:
    return await make_sample(tmp_path, "hostile-1.0", {"f": b"hello", "g": b"x" * 5000})


async def put_nar(client: TestClient, sample: Sample) -> None:  # type: ignore[type-arg]
    """Upload the sample's NAR (under its NarHash name) to the bridge."""
    name = nixbase32.encode(hashlib.sha256(sample.nar).digest())
    async with client.put(f"/nar/{name}.nar", data=sample.nar) as r:
        assert r.status == 200


async def test_bridge_put_narinfo_with_non_ascii_sig_is_400(
    bridge: tuple[TestClient, MemoryBlobService, MemoryDirectoryService],  # type: ignore[type-arg]
    sample: Sample,
) -> None:
    client = bridge[0]
    await put_nar(client, sample)
    for sig in NON_ASCII_SIGS:
        text = sample.narinfo(extra=f"Sig: {sig}\n")
        async with client.put(f"/{sample.store_path.hash_part}.narinfo", data=text.encode()) as r:
            assert r.status == 400, await r.text()
            assert "Sig" in await r.text()


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=" + "9" * 5000 + "-", Unsatisfiable),  # starts past any end
        ("bytes=0-" + "9" * 5000, (0, 100)),  # to the end
        ("bytes=-" + "9" * 5000, (0, 100)),  # a suffix longer than the body
        ("bytes=" + "0" * 5000 + "5-9", (5, 10)),  # leading zeros
        ("bytes=" + "9" * 5000 + "-" + "9" * 4999, Unsatisfiable),  # both past any end
    ],
)
def test_range_with_thousands_of_digits(header: str, expected: object) -> None:
    if expected is Unsatisfiable:
        with pytest.raises(Unsatisfiable):
            parse_range(header, 100)
        return
    got = parse_range(header, 100)
    assert (None if got is None else (got.start, got.end)) == expected


async def test_bridge_range_with_thousands_of_digits_is_not_a_500(
    bridge: tuple[TestClient, MemoryBlobService, MemoryDirectoryService],  # type: ignore[type-arg]
    sample: Sample,
) -> None:
    client = bridge[0]
    await put_nar(client, sample)
    url = "/" + nar_url(sample.node, len(sample.nar))
    async with client.get(url, headers={"Range": "bytes=" + "1" * 5000 + "-"}) as r:
        assert r.status == 416
    async with client.get(url, headers={"Range": "bytes=1-" + "1" * 5000}) as r:
        assert r.status == 206
        assert await r.read() == sample.nar[1:]


# -- the gRPC daemon -------------------------------------------------------------------------


@pytest_asyncio.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[tuple[RunningServer, MemoryBlobService, MemoryDirectoryService]]:
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX)
    running = await start_server(str(tmp_path / "d.sock"), blobs, dirs, pathinfos=MemoryPathInfoService())
    yield running, blobs, dirs
    await running.stop(0)


SERVICES = [
    blob_pb.DESCRIPTOR.services_by_name["BlobService"],
    dir_pb.DESCRIPTOR.services_by_name["DirectoryService"],
    rpc_pb.DESCRIPTOR.services_by_name["PathInfoService"],
]
METHODS = [(s, m) for s in SERVICES for m in s.methods]
GARBAGE = [b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f"]  # an invalid tag; a length past the end


async def call_raw(channel: grpc.aio.Channel, path: str, method: MethodDescriptor, request: bytes) -> None:
    """Call ``path`` with ``request`` as the raw bytes of its (only) request message."""
    kw: dict[str, Any] = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    if method.client_streaming and method.server_streaming:
        async for _ in channel.stream_stream(path, **kw)(iter([request])):
            pass
    elif method.client_streaming:
        await channel.stream_unary(path, **kw)(iter([request]))
    elif method.server_streaming:
        async for _ in channel.unary_stream(path, **kw)(request):
            pass
    else:
        await channel.unary_unary(path, **kw)(request)


@pytest.mark.parametrize("prefix", ["tvix", "snix"])
@pytest.mark.parametrize(("service", "method"), METHODS, ids=[f"{s.name}.{m.name}" for s, m in METHODS])
async def test_undecodable_request_is_invalid_argument_on_every_method(
    daemon: tuple[RunningServer, MemoryBlobService, MemoryDirectoryService],
    caplog: pytest.LogCaptureFixture,
    prefix: str,
    service: object,
    method: object,
) -> None:
    assert isinstance(service, ServiceDescriptor) and isinstance(method, MethodDescriptor)
    running = daemon[0]
    path = f"/{prefix}.{service.full_name.partition('.')[2]}/{method.name}"
    target = running.url.replace("grpc+unix://", "unix:")
    caplog.set_level(logging.DEBUG)
    async with grpc.aio.insecure_channel(target) as channel:
        for garbage in GARBAGE:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call_raw(channel, path, method, garbage)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
            assert method.name in (err.value.details() or "")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "Traceback" not in caplog.text


GRPC_OWN = [
    (name, service, method)
    for name, service in (
        (HEALTH, health_pb2.DESCRIPTOR.services_by_name["Health"]),
        (REFLECTION_V1ALPHA, reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]),
        (REFLECTION_V1, reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]),
    )
    for method in service.methods
]


@pytest.mark.parametrize(("name", "service", "method"), GRPC_OWN, ids=[f"{n}.{m.name}" for n, _, m in GRPC_OWN])
async def test_undecodable_request_to_health_and_reflection_is_invalid_argument(
    daemon: tuple[RunningServer, MemoryBlobService, MemoryDirectoryService],
    caplog: pytest.LogCaptureFixture,
    name: str,
    service: ServiceDescriptor,
    method: MethodDescriptor,
) -> None:
    """grpc's own services on the daemon's socket too (they answered UNKNOWN and logged an ERROR traceback)."""
    target = daemon[0].url.replace("grpc+unix://", "unix:")
    caplog.set_level(logging.DEBUG)
    async with grpc.aio.insecure_channel(target) as channel:
        for garbage in GARBAGE:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call_raw(channel, f"/{name}/{method.name}", method, garbage)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
            assert f"{service.name}.{method.name}" in (err.value.details() or "")
        if method.name == "Check":  # a well-formed request is still answered
            await call_raw(channel, f"/{name}/Check", method, health_pb2.HealthCheckRequest().SerializeToString())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "Traceback" not in caplog.text


async def test_file_node_whose_size_disagrees_with_its_blob(
    daemon: tuple[RunningServer, MemoryBlobService, MemoryDirectoryService],
) -> None:
    running, blobs, dirs = daemon
    digest = await blobs.put(b"twelve bytes")
    wrong_file = FileNode(digest, 13)
    directory = Directory({b"f": wrong_file, b"ok": FileNode(await blobs.put(b"fine"), 4)})
    await dirs.put(directory)
    target = running.url.replace("grpc+unix://", "unix:")
    async with grpc.aio.insecure_channel(target) as channel:
        call = raw_calculate_nar(channel)
        for node in (wrong_file, directory.node(SizeRule.TVIX)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(castore_pb.Node.FromString(encode_node(b"", node)))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value
            assert digest.hex() in (err.value.details() or "")
    # The bridge decides before the status line: a 409, no 200 with a Content-Length then a cut.
    index = NarIndex(None)
    bridge = NarBridge(blobs, dirs, MemoryPathInfoService(), index)
    async with TestClient(TestServer(bridge.application())) as client:
        for node, size in ((wrong_file, plan_size(wrong_file, {})), (directory.node(SizeRule.TVIX), 1000)):
            for method in ("GET", "HEAD"):
                async with client.request(method, "/" + nar_url(node, size)) as r:
                    assert r.status == 409, (method, r.status, await r.text())
            async with client.get("/" + nar_url(node, size), headers={"Range": "bytes=0-10"}) as r:
                assert r.status == 409
        right = FileNode(digest, 12)
        async with client.get("/" + nar_url(right, plan_size(right, {}))) as r:
            assert r.status == 200 and (await r.read()).count(b"twelve bytes") == 1
    await index.close()

"""PathInfo: model, protobuf validation (reference §1.8), and the services (memory, SQLite, gRPC)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from nixcas._proto.tvix.store.protos import pathinfo_pb2 as pb
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.sizerule import SizeRule
from nixcas.composition import pathinfo_service_from_url
from nixcas.errors import ConfigurationError, PathInfoError, StorageError
from nixcas.server import RunningServer, start_server
from nixcas.store.hashes import CAHash, CAKind, HashAlgo, NixHash
from nixcas.store.pathinfo.base import PathInfoService
from nixcas.store.pathinfo.grpc import GrpcPathInfoService
from nixcas.store.pathinfo.memory import MemoryPathInfoService
from nixcas.store.pathinfo.model import PathInfo, Signature
from nixcas.store.pathinfo.sqlite import SqlitePathInfoService
from nixcas.testing.pathinfoservice import PathInfoServiceSuite, RawPathInfoStore, dummy_path_info, make_path_info

# reference §10.5: PATH_INFO and its protobuf encoding
DUMMY = "00000000000000000000000000000000-dummy"
PATH_INFO_PROTO_HEX = (
    "0a4c0a4a0a26" + DUMMY.encode().hex() + "1220" + "00" * 32 + "1214" + "00" * 20
    + "1a6e1220" + "00" * 32 + "2226" + DUMMY.encode().hex() + "32221220" + "00" * 32
)  # fmt: skip


def test_dummy_path_info_encoding() -> None:
    assert dummy_path_info().encode().hex() == PATH_INFO_PROTO_HEX
    decoded = PathInfo.decode(bytes.fromhex(PATH_INFO_PROTO_HEX))
    assert decoded == dummy_path_info()
    assert str(decoded.ca) == "fixed:r:sha256:" + "0" * 52


def valid_proto() -> pb.PathInfo:
    msg = pb.PathInfo()
    msg.ParseFromString(bytes.fromhex(PATH_INFO_PROTO_HEX))
    return msg


Mutation = Callable[[pb.PathInfo], None]


def _no_narinfo(m: pb.PathInfo) -> None:
    m.ClearField("narinfo")


def _short_reference(m: pb.PathInfo) -> None:
    m.references[0] = bytes(19)


def _extra_reference_name(m: pb.PathInfo) -> None:
    m.narinfo.reference_names.append(DUMMY)


def _bad_reference_name(m: pb.PathInfo) -> None:
    m.narinfo.reference_names[0] = "not a store path"


def _reference_name_digest_mismatch(m: pb.PathInfo) -> None:
    m.narinfo.reference_names[0] = "10000000000000000000000000000000-dummy"


def _no_node(m: pb.PathInfo) -> None:
    m.ClearField("node")


def _bad_node_digest(m: pb.PathInfo) -> None:
    m.node.directory.digest = bytes(31)


def _node_name_not_store_path(m: pb.PathInfo) -> None:
    m.node.directory.name = b"dummy"


def _node_name_bad_chars(m: pb.PathInfo) -> None:
    m.node.directory.name = b"00000000000000000000000000000000-du mmy"


def _short_nar_sha256(m: pb.PathInfo) -> None:
    m.narinfo.nar_sha256 = bytes(20)


def _bad_deriver(m: pb.PathInfo) -> None:
    m.narinfo.deriver.name = "foo"
    m.narinfo.deriver.digest = bytes(19)


def _bad_deriver_name(m: pb.PathInfo) -> None:
    m.narinfo.deriver.name = "fo o"
    m.narinfo.deriver.digest = bytes(20)


def _short_signature(m: pb.PathInfo) -> None:
    m.narinfo.signatures.add(name="k-1", data=bytes(63))


def _unknown_ca(m: pb.PathInfo) -> None:
    m.narinfo.ca.type = 42  # type: ignore[assignment]


def _short_ca_digest(m: pb.PathInfo) -> None:
    m.narinfo.ca.digest = bytes(20)


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (_no_narinfo, "narinfo"),
        (_short_reference, "reference 0"),
        (_extra_reference_name, "reference names"),
        (_bad_reference_name, "reference name 0"),
        (_reference_name_digest_mismatch, "does not match"),
        (_no_node, "no root node"),
        (_bad_node_digest, "root node"),
        (_node_name_not_store_path, "no store path"),
        (_node_name_bad_chars, "no store path"),
        (_short_nar_sha256, "nar_sha256"),
        (_bad_deriver, "deriver"),
        (_bad_deriver_name, "deriver"),
        (_short_signature, "signature 0"),
        (_unknown_ca, "CA"),
        (_short_ca_digest, "CA"),
    ],
)
def test_from_proto_rejects(mutate: Mutation, words: str) -> None:
    msg = valid_proto()
    mutate(msg)
    with pytest.raises(PathInfoError, match=words):
        PathInfo.from_proto(msg)


def test_check_order_narinfo_before_node() -> None:
    msg = valid_proto()
    msg.ClearField("node")
    msg.references[0] = bytes(3)
    with pytest.raises(PathInfoError, match="reference 0"):
        PathInfo.from_proto(msg)


def test_ca_all_kinds_round_trip() -> None:
    base = dummy_path_info()
    for kind in CAKind:
        for algo in HashAlgo:
            if kind is CAKind.TEXT and algo is not HashAlgo.SHA256:
                continue
            ca = CAHash(kind, NixHash(algo, bytes(range(algo.digest_size))))
            info = PathInfo(base.store_path, base.node, (), 1, bytes(32), ca=ca)
            assert PathInfo.decode(info.encode()).ca == ca


def test_signature_text() -> None:
    sig = Signature.parse(
        "cache.nixos.org-1:TsTTb3WGTZKphvYdBHXwo6weVILmTytUjLB+vcX89fOjjRicCHmKA4RCPMVLkj6TMJ4GMX3HPVWRdD1hkeKZBQ=="
    )
    assert sig.name == "cache.nixos.org-1"
    assert len(sig.data) == 64
    assert str(sig).startswith("cache.nixos.org-1:TsTTb3")
    for bad in ["nocolon", ":AAAA", "k-1:@@@", "k 1:" + "A" * 88, "k-1:" + "A" * 4]:
        with pytest.raises(PathInfoError):
            Signature.parse(bad)


# -- the services ---------------------------------------------------------------------


class TestMemoryPathInfoService(PathInfoServiceSuite):
    covers = ("memory",)

    @pytest_asyncio.fixture
    async def pathinfo_service(self) -> AsyncIterator[PathInfoService]:
        svc = await pathinfo_service_from_url("memory://")
        assert isinstance(svc, MemoryPathInfoService)
        yield svc
        await svc.close()

    @pytest.fixture
    def store_raw(self, pathinfo_service: PathInfoService) -> RawPathInfoStore:
        assert isinstance(pathinfo_service, MemoryPathInfoService)
        data = pathinfo_service._data

        async def store(digest: bytes, raw: bytes) -> None:
            data[digest] = raw

        return store


class TestSqlitePathInfoService(PathInfoServiceSuite):
    covers = ("sqlite",)

    @pytest_asyncio.fixture
    async def pathinfo_service(self, tmp_path: Path) -> AsyncIterator[PathInfoService]:
        svc = await pathinfo_service_from_url(f"sqlite://{tmp_path}/pathinfo.sqlite")
        assert isinstance(svc, SqlitePathInfoService)
        yield svc
        await svc.close()

    @pytest.fixture
    def store_raw(self, pathinfo_service: PathInfoService) -> RawPathInfoStore:
        assert isinstance(pathinfo_service, SqlitePathInfoService)
        db = pathinfo_service._db

        async def store(digest: bytes, raw: bytes) -> None:
            def write() -> None:
                db.conn.execute("INSERT OR REPLACE INTO pathinfo (digest, data) VALUES (?, ?)", (digest, raw))

            await db.run(write)

        return store


class TestGrpcPathInfoService(PathInfoServiceSuite):
    covers = ("grpc",)

    @pytest_asyncio.fixture
    async def backing(self) -> MemoryPathInfoService:
        return MemoryPathInfoService()

    @pytest_asyncio.fixture
    async def server(self, tmp_path: Path, backing: MemoryPathInfoService) -> AsyncIterator[RunningServer]:
        running = await start_server(
            str(tmp_path / "s.sock"), MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX), pathinfos=backing
        )
        yield running
        await running.stop(0)

    @pytest_asyncio.fixture(params=["tvix", "snix"])
    async def pathinfo_service(
        self, server: RunningServer, request: pytest.FixtureRequest
    ) -> AsyncIterator[PathInfoService]:
        svc = await pathinfo_service_from_url(f"{server.url}?protocol={request.param}")
        assert isinstance(svc, GrpcPathInfoService)
        yield svc
        await svc.close()

    @pytest.fixture
    def store_raw(self, backing: MemoryPathInfoService) -> RawPathInfoStore:
        """The server validates what it hands out: corruption arrives as an error status."""

        async def store(digest: bytes, raw: bytes) -> None:
            backing._data[digest] = raw

        return store


async def test_sqlite_persists(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/p.sqlite"
    info = make_path_info("persist", 3)
    async with await pathinfo_service_from_url(url) as svc:
        await svc.put(info)
    async with await pathinfo_service_from_url(url) as svc:
        assert await svc.get(info.store_path.digest) == info
    rows = sqlite3.connect(tmp_path / "p.sqlite").execute("SELECT digest, data FROM pathinfo").fetchall()
    assert [(bytes(d), bytes(v)) for d, v in rows] == [(info.store_path.digest, info.encode())]


async def test_sqlite_list_pages(tmp_path: Path) -> None:
    async with await pathinfo_service_from_url(f"sqlite://{tmp_path}/p.sqlite") as svc:
        infos = [make_path_info(f"n{i}", i) for i in range(2500)]
        for info in infos:
            await svc.put(info)
        listed = [i.store_path async for i in svc.list()]
    assert len(listed) == len(set(listed)) == 2500


@pytest.mark.parametrize(
    "url", ["memory://x", "sqlite://host/x", "sqlite:///", "sqlite:///rel/", "grpc+unix://h/x", "nix://"]
)
async def test_bad_urls(url: str) -> None:
    with pytest.raises(ConfigurationError):
        await pathinfo_service_from_url(url)


async def test_grpc_corrupt_backend_reports_error(tmp_path: Path) -> None:
    backing = MemoryPathInfoService()
    running = await start_server(
        str(tmp_path / "c.sock"), MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX), pathinfos=backing
    )
    try:
        info = make_path_info("x", 1)
        backing._data[info.store_path.digest] = b"\xff"
        async with await pathinfo_service_from_url(running.url) as svc:
            with pytest.raises(StorageError):
                await svc.get(info.store_path.digest)
    finally:
        await running.stop(0)

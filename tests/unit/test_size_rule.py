"""The two directory size rules (tvix: 2·#entries + Σ; snix 2026: #files + #symlinks + 2·#dirs + Σ).

Expected digests and sizes below were computed by hand from the formulas
(protobuf bytes written field by field, hashed with BLAKE3), not by the code
under test; the same hand encoder reproduces the tvix reference vectors.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from nixcas.api import Store
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.dirs.cache import CacheDirectoryService
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.dirs.sqlite import SqliteDirectoryService
from nixcas.castore.fsck import CastoreChecker
from nixcas.castore.ingest import ingest_path
from nixcas.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from nixcas.castore.sizerule import SizeRule
from nixcas.composition import directory_service_from_url
from nixcas.errors import ClosureError, ConfigurationError, DirectoryError, StorageError
from nixcas.server import start_server
from nixcas.store.nar.ingest import ingest_nar_bytes
from nixcas.store.nar.render import render_nar
from nixcas.testing.fixtures import (
    DIRECTORY_COMPLICATED,
    DIRECTORY_COMPLICATED_SNIX,
    DIRECTORY_WITH_KEEP,
    EMPTY_DIGEST,
    HELLOWORLD_DIGEST,
)

TVIX, SNIX = SizeRule.TVIX, SizeRule.SNIX

# top/{e (executable "Hello World!"), sub/{f ("Hello World!"), l -> f, inner/{x (empty)}}}
DEEP = {
    TVIX: {
        "inner": ("8272655650e34503d1cd9b82a1a203df4464bf7cbcdd69738f46b04b54f46667", 2),
        "sub": ("cf2453a8b0c4f96fc157fd1a6f48a06be541bfd6e10c0860c484884be0184b42", 8),
        "top": ("46ebfa7b21baefd517769f7d85d79eb7e0f23c0c2dc3cb0e40b98d694cb11dc0", 12),
    },
    SNIX: {
        "inner": ("8272655650e34503d1cd9b82a1a203df4464bf7cbcdd69738f46b04b54f46667", 1),
        "sub": ("3f2564a3b038ff6b6316d31de4a4bf1707e2c5108dc6438388376dda2c62ce6e", 5),
        "top": ("817080f4a23bbbec1ec49b7fdbb4cfb2c840c7d41ef665b9dc90048453c582bf", 8),
    },
}
COMPLICATED_HEX = {
    TVIX: ("424a7f6ce08d805d15b428062faae96299a1675d708c3a39261afe38cdd04feb", 8),  # tvix fixture
    SNIX: ("3f951a15afd586fb3121ef4d13d582e811ce0e5a7f21c0497fd87490e9e2355a", 5),  # 1 file + 1 link + 2·1 dir + 1
}


@pytest.fixture
def no_rule_env() -> Iterator[None]:
    """No rule asked for through the environment (the test suite asks for tvix by default)."""
    saved = os.environ.pop("NIXCAS_DIRECTORY_SIZE_RULE", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["NIXCAS_DIRECTORY_SIZE_RULE"] = saved


def make_tree(root: Path) -> Path:
    top = root / "top"
    (top / "sub" / "inner").mkdir(parents=True)
    (top / "e").write_bytes(b"Hello World!")
    (top / "e").chmod(stat.S_IRWXU)
    (top / "sub" / "f").write_bytes(b"Hello World!")
    (top / "sub" / "l").symlink_to("f")
    (top / "sub" / "inner" / "x").write_bytes(b"")
    return top


def deep_directories(rule: SizeRule) -> list[Directory]:
    """The DEEP tree built from nodes, leaves first."""
    inner = Directory({b"x": FileNode(EMPTY_DIGEST, 0)})
    sub_entries: dict[bytes, Node] = {
        b"inner": inner.node(rule),
        b"f": FileNode(HELLOWORLD_DIGEST, 12),
        b"l": SymlinkNode(b"f"),
    }
    sub = Directory(sub_entries)
    top_entries: dict[bytes, Node] = {b"sub": sub.node(rule), b"e": FileNode(HELLOWORLD_DIGEST, 12, executable=True)}
    return [inner, sub, Directory(top_entries)]


# -- the formulas ----------------------------------------------------------------------


@pytest.mark.parametrize("rule", [TVIX, SNIX])
def test_hand_vectors(rule: SizeRule) -> None:
    for directory, name in zip(deep_directories(rule), ["inner", "sub", "top"], strict=True):
        assert (directory.digest.hex(), directory.size_under(rule)) == DEEP[rule][name]
    complicated = DIRECTORY_COMPLICATED if rule is TVIX else DIRECTORY_COMPLICATED_SNIX
    assert (complicated.digest.hex(), complicated.size_under(rule)) == COMPLICATED_HEX[rule]


def test_rules_agree_without_files_below() -> None:
    leaf_dirs = Directory({b"a": Directory().node(TVIX), b"b": Directory().node(SNIX)})
    assert leaf_dirs.size_under(TVIX) == leaf_dirs.size_under(SNIX) == 4
    assert DIRECTORY_WITH_KEEP.size_under(TVIX) == 2 and DIRECTORY_WITH_KEEP.size_under(SNIX) == 1


# -- ingest follows the store's rule ---------------------------------------------------------


@pytest.mark.parametrize("rule", [TVIX, SNIX])
async def test_ingest_and_nar_ingest_follow_the_rule(tmp_path: Path, rule: SizeRule) -> None:
    top = make_tree(tmp_path)
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService(rule)
    node = await ingest_path(top, blobs, dirs)
    assert node == DirectoryNode(B3Digest(bytes.fromhex(DEEP[rule]["top"][0])), DEEP[rule]["top"][1])
    nar = b"".join([c async for c in render_nar(node, blobs, dirs)])
    # the same NAR into a store of the other rule gives that rule's tree
    other = MemoryDirectoryService(rule.other)
    got, _, _ = await ingest_nar_bytes(nar, MemoryBlobService(), other)
    want = DEEP[rule.other]["top"]
    assert got == DirectoryNode(B3Digest(bytes.fromhex(want[0])), want[1])
    assert b"".join([c async for c in render_nar(got, blobs, other)]) == nar


# -- uploads of the other rule are refused, naming the rule ------------------------------------


async def upload(svc: DirectoryService, directories: list[Directory]) -> B3Digest:
    async with svc.put_multiple_start() as putter:
        for d in directories:
            await putter.put(d)
        return await putter.close()


@pytest.mark.parametrize("rule", [TVIX, SNIX])
async def test_upload_of_the_other_rule_is_refused(tmp_path: Path, rule: SizeRule) -> None:
    svc = await directory_service_from_url(f"sqlite://{tmp_path / 'd.sqlite'}", size_rule=rule)
    try:
        assert svc.size_rule is rule
        with pytest.raises(ClosureError, match=f"under the {rule} directory size rule.*follows the {rule.other} rule"):
            await upload(svc, deep_directories(rule.other))
        assert await svc.get(deep_directories(rule.other)[1].digest) is None  # nothing stored
        assert (await upload(svc, deep_directories(rule))).hex() == DEEP[rule]["top"][0]
    finally:
        await svc.close()


async def test_grpc_put_of_the_other_rule_is_invalid_argument(tmp_path: Path) -> None:
    from nixcas._proto.tvix.castore.protos import rpc_directory_pb2_grpc as dir_grpc
    from nixcas.testing.daemon import short_tmpdir

    with short_tmpdir() as sockets:
        running = await start_server(str(sockets / "s.sock"), MemoryBlobService(), MemoryDirectoryService(SNIX))
        try:
            async with grpc.aio.insecure_channel(f"unix:{sockets / 's.sock'}") as channel:
                stub = dir_grpc.DirectoryServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Put(iter([d.to_proto() for d in deep_directories(TVIX)]))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "snix directory size rule" in (info.value.details() or "")
            assert "follows the tvix rule" in (info.value.details() or "")
        finally:
            await running.stop(0)


async def test_grpc_client_declares_the_peer_rule(tmp_path: Path) -> None:
    from nixcas.testing.daemon import short_tmpdir

    with short_tmpdir() as sockets:
        server_dirs = MemoryDirectoryService(SNIX)
        await upload(server_dirs, deep_directories(SNIX))
        running = await start_server(str(sockets / "s.sock"), MemoryBlobService(), server_dirs)
        url = f"grpc+unix://{sockets / 's.sock'}"
        try:
            right = await directory_service_from_url(f"{url}?size-rule=snix", size_rule=TVIX)
            wrong = await directory_service_from_url(f"{url}?size-rule=tvix")
            default = await directory_service_from_url(url, size_rule=TVIX)  # no option: the rule asked for
            try:
                assert (right.size_rule, wrong.size_rule, default.size_rule) == (SNIX, TVIX, TVIX)
                top = B3Digest(bytes.fromhex(DEEP[SNIX]["top"][0]))
                assert len([d async for d in right.get_recursive(top)]) == 3
                # a client that declared the wrong rule refuses what it receives, naming the rule
                with pytest.raises(StorageError, match="under the tvix directory size rule"):
                    _ = [d async for d in wrong.get_recursive(top)]
                # and checks uploads before sending them
                with pytest.raises(ClosureError, match="tvix directory size rule"):
                    await upload(wrong, deep_directories(SNIX))
                # copying into a local store of the other rule is refused, not translated
                local = MemoryDirectoryService(TVIX)
                closure = [d async for d in right.get_recursive(top)]
                with pytest.raises(ClosureError, match="tvix directory size rule"):
                    await upload(local, closure[::-1])
            finally:
                for svc in (right, wrong, default):
                    await svc.close()
        finally:
            await running.stop(0)


def test_grpc_size_rule_option_is_checked() -> None:
    from nixcas.registry import parse_service_url

    with pytest.raises(ConfigurationError, match="size-rule must be snix or tvix"):
        parse_service_url("directoryservices", "grpc+unix:///tmp/x.sock?size-rule=nix")


# -- a store records its rule ---------------------------------------------------------------------


async def test_new_store_records_snix_and_refuses_tvix(tmp_path: Path, no_rule_env: None) -> None:
    store = await Store.open(tmp_path / "s")
    async with store:
        assert store.directories.size_rule is SNIX
        node = await store.ingest(make_tree(tmp_path))
        assert isinstance(node, DirectoryNode) and node.digest.hex() == DEEP[SNIX]["top"][0]
    rows = sqlite3.connect(tmp_path / "s" / "directories.sqlite").execute("SELECT key, value FROM meta").fetchall()
    assert rows == [("directory_size_rule", "snix")]
    with pytest.raises(ConfigurationError) as info:
        await Store.open(tmp_path / "s", size_rule=TVIX)
    message = str(info.value)
    assert "\n" not in message and "follows the snix directory size rule" in message and "requested tvix" in message
    async with await Store.open(tmp_path / "s", size_rule=SNIX) as store:  # agreeing is fine
        assert store.directories.size_rule is SNIX


async def test_env_chooses_the_rule_of_a_new_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NIXCAS_DIRECTORY_SIZE_RULE", "tvix")
    async with await Store.open(tmp_path / "s") as store:
        assert store.directories.size_rule is TVIX
    monkeypatch.setenv("NIXCAS_DIRECTORY_SIZE_RULE", "snix")
    with pytest.raises(ConfigurationError, match="follows the tvix directory size rule, not the requested snix"):
        await Store.open(tmp_path / "s")
    monkeypatch.setenv("NIXCAS_DIRECTORY_SIZE_RULE", "bogus")
    with pytest.raises(ConfigurationError, match="NIXCAS_DIRECTORY_SIZE_RULE: directory size rule must be"):
        await Store.open(tmp_path / "s")


async def test_store_without_a_record_follows_tvix(tmp_path: Path, no_rule_env: None) -> None:
    # a store written before rules were recorded: directories, no meta table
    path = tmp_path / "old.sqlite"
    legacy = SqliteDirectoryService(str(path), size_rule=TVIX)
    await upload(legacy, deep_directories(TVIX))
    await legacy.close()
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE meta")
    conn.commit()
    conn.close()
    svc = await directory_service_from_url(f"sqlite://{path}")
    try:
        assert svc.size_rule is TVIX
    finally:
        await svc.close()
    assert sqlite3.connect(path).execute("SELECT value FROM meta").fetchall() == [("tvix",)]


async def test_objectstore_records_its_rule(tmp_path: Path, no_rule_env: None) -> None:
    url = f"objectstore+file://{tmp_path / 'bucket'}"
    svc = await directory_service_from_url(url)
    await svc.close()
    assert svc.size_rule is SNIX
    assert (tmp_path / "bucket" / "dirs" / "size-rule").read_bytes() == b"snix\n"
    with pytest.raises(ConfigurationError, match="follows the snix directory size rule, not the requested tvix"):
        await directory_service_from_url(url, size_rule=TVIX)


async def test_cache_follows_far(tmp_path: Path) -> None:
    far = MemoryDirectoryService(SNIX)
    cache = CacheDirectoryService(MemoryDirectoryService(TVIX), far)
    assert cache.size_rule is SNIX and cache.near.size_rule is SNIX
    recorded = await directory_service_from_url(f"sqlite://{tmp_path / 'near.sqlite'}", size_rule=TVIX)
    try:
        with pytest.raises(ConfigurationError, match=r"tvix directory size rule, far .* the snix rule"):
            CacheDirectoryService(recorded, far)
    finally:
        await recorded.close()


async def test_fsck_names_the_rule(tmp_path: Path) -> None:
    blobs = MemoryBlobService()
    dirs = MemoryDirectoryService(TVIX)
    for d in deep_directories(SNIX):  # stored one by one, bypassing the closure check
        await dirs.put(d)
    top = deep_directories(SNIX)[2]
    checker = CastoreChecker(blobs, dirs)
    problems = [p async for p in checker.walk("top", top.node(SNIX))]
    text = " ".join(str(p) for p in problems)
    assert "under the tvix directory size rule" in text and "follows the snix rule" in text


async def test_postgres_records_its_rule(pg_url: str, no_rule_env: None) -> None:
    svc = await directory_service_from_url(pg_url)
    try:
        assert svc.size_rule is SNIX
        await upload(svc, deep_directories(SNIX))
    finally:
        await svc.close()
    with pytest.raises(ConfigurationError, match="follows the snix directory size rule, not the requested tvix"):
        await directory_service_from_url(pg_url, size_rule=TVIX)
    again = await directory_service_from_url(pg_url)
    try:
        assert again.size_rule is SNIX
        assert (await upload(again, deep_directories(SNIX))).hex() == DEEP[SNIX]["top"][0]
    finally:
        await again.close()


def test_overflow_is_per_rule() -> None:
    # one file and a sub-directory of size 2^64 - 4: snix 1 + 2 + (2^64 - 4) fits, tvix 4 + (2^64 - 4) does not
    d = Directory([(b"d", DirectoryNode(EMPTY_DIGEST, 2**64 - 4)), (b"f", FileNode(EMPTY_DIGEST, 0))])
    assert d.size_under(SNIX) == 2**64 - 1
    with pytest.raises(DirectoryError, match="overflows 64 bits under the tvix rule"):
        d.size_under(TVIX)
    with pytest.raises(DirectoryError, match="overflows 64 bits"):
        Directory([(b"d", DirectoryNode(EMPTY_DIGEST, 2**64 - 3)), (b"f", FileNode(EMPTY_DIGEST, 0))])


async def test_bridge_ingests_under_the_store_rule(tmp_path: Path) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from nixcas.bridge.app import NarBridge
    from nixcas.store.narindex import NarIndex
    from nixcas.store.pathinfo.memory import MemoryPathInfoService
    from nixcas.testing.samples import make_sample

    files = {"sub/f": b"Hello World!", "sub/inner/x": b"", "e": b"Hello World!"}
    sample = await make_sample(tmp_path, "deep-1.0", files)  # its node: the tvix rule
    blobs, dirs, infos = MemoryBlobService(), MemoryDirectoryService(SNIX), MemoryPathInfoService()
    index = NarIndex(None)
    client = TestClient(TestServer(NarBridge(blobs, dirs, infos, index, allow_writes=True).application()))
    await client.start_server()
    try:
        async with client.put(f"/nar/{sample.nb32}.nar", data=sample.nar) as r:
            assert r.status == 200
        async with client.put(f"/{sample.store_path.hash_part}.narinfo", data=sample.narinfo().encode()) as r:
            assert r.status == 200
        info = await infos.get(sample.store_path.digest)
        snix = await ingest_path(tmp_path / "trees" / "deep-1.0", MemoryBlobService(), MemoryDirectoryService(SNIX))
        assert info is not None and info.node == snix and snix != sample.node
        async with client.get(f"/nar/{sample.nb32}.nar") as r:
            assert r.status == 200 and await r.read() == sample.nar
    finally:
        await client.close()
        await index.close()

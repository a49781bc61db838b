"""The PathInfoService contract, as a pytest suite every backend reuses.

Usage::

    class TestMyPathInfoService(PathInfoServiceSuite):
        @pytest_asyncio.fixture
        async def pathinfo_service(self) -> AsyncIterator[PathInfoService]:
            svc = await pathinfo_service_from_url("my://...")
            yield svc
            await svc.close()

        # optional raw hook: store bytes under a digest, bypassing every check
        @pytest.fixture
        def store_raw(self, pathinfo_service: PathInfoService) -> RawPathInfoStore: ...
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import ClassVar

import pytest

from nixcas.castore.digest import B3Digest
from nixcas.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from nixcas.castore.sizerule import SizeRule
from nixcas.errors import StorageError, ValidationError
from nixcas.store.hashes import CAHash, CAKind, HashAlgo, NixHash
from nixcas.store.pathinfo.base import PathInfoService
from nixcas.store.pathinfo.model import PathInfo, Signature
from nixcas.store.store_path import StorePath
from nixcas.testing.fixtures import DIRECTORY_COMPLICATED, HELLOWORLD_DIGEST
from nixcas.testing.matrix import check_covers

__all__ = ["PathInfoServiceSuite", "RawPathInfoStore", "dummy_path_info", "make_path_info"]

RawPathInfoStore = Callable[[bytes, bytes], Awaitable[None]]
"""Store (or overwrite) raw bytes under a 20-byte digest, bypassing the service's checks."""


def dummy_path_info() -> PathInfo:
    """PATH_INFO of reference §10.5: ``0…0-dummy`` referring to itself, an empty root, zero NAR hash and size."""
    path = StorePath(bytes(20), "dummy")
    return PathInfo(
        store_path=path,
        node=DirectoryNode(B3Digest(bytes(32)), 0),
        references=(path,),
        nar_size=0,
        nar_sha256=bytes(32),
        ca=CAHash(CAKind.NAR, NixHash(HashAlgo.SHA256, bytes(32))),
    )


def make_path_info(name: str, seed: int = 0, *, references: tuple[StorePath, ...] = ()) -> PathInfo:
    """A valid PathInfo with a digest derived from ``name``/``seed`` (not a real CA path)."""
    digest = hashlib.sha256(f"{name}/{seed}".encode()).digest()[:20]
    nodes: list[Node] = [
        DIRECTORY_COMPLICATED.node(SizeRule.TVIX),
        FileNode(HELLOWORLD_DIGEST, 12, executable=seed % 3 == 1),
        SymlinkNode(b"/nix/store/somewhereelse"),
    ]
    return PathInfo(
        store_path=StorePath(digest, name),
        node=nodes[seed % 3],
        references=references,
        nar_size=1000 + seed,
        nar_sha256=hashlib.sha256(f"nar {name} {seed}".encode()).digest(),
        signatures=(Signature("cache.example.org-1", bytes(range(64))),) if seed % 2 else (),
        deriver=StorePath(hashlib.sha1(name.encode()).digest(), f"{name}") if seed % 2 else None,  # noqa: S324
        ca=CAHash(CAKind.NAR, NixHash(HashAlgo.SHA256, hashlib.sha256(name.encode()).digest())) if seed % 4 else None,
    )


class PathInfoServiceSuite:
    """Contract tests; a subclass provides the ``pathinfo_service`` fixture."""

    covers: ClassVar[tuple[str, ...]] = ()
    """The tags of :data:`nixcas.registry.PATHINFO_SERVICES` this subclass runs (checked before every test)."""

    @pytest.fixture(autouse=True)
    def _runs_the_covered_backends(self, pathinfo_service: PathInfoService) -> None:
        check_covers("pathinfoservices", self.covers, pathinfo_service)

    supports_list = True

    @pytest.fixture
    def store_raw(self) -> RawPathInfoStore:
        pytest.skip("this backend provides no raw storage hook")

    async def test_not_found(self, pathinfo_service: PathInfoService) -> None:
        assert await pathinfo_service.get(bytes(20)) is None

    @pytest.mark.parametrize("length", [0, 19, 21, 32])
    async def test_wrong_digest_length(self, pathinfo_service: PathInfoService, length: int) -> None:
        with pytest.raises(ValidationError):
            await pathinfo_service.get(b"\x01" * length)

    @pytest.mark.parametrize("seed", range(6))
    async def test_put_get(self, pathinfo_service: PathInfoService, seed: int) -> None:
        ref = make_path_info("dependency", 99)
        info = make_path_info("hello-2.12", seed, references=(ref.store_path,))
        stored = await pathinfo_service.put(info)
        assert stored.store_path == info.store_path
        got = await pathinfo_service.get(info.store_path.digest)
        assert got is not None
        assert got == stored
        # every field survives the round trip
        assert got.node == info.node
        assert got.references == info.references
        assert (got.nar_size, got.nar_sha256) == (info.nar_size, info.nar_sha256)
        assert got.deriver == info.deriver
        assert got.ca == info.ca
        assert set(info.signatures) <= set(got.signatures)

    async def test_put_replaces(self, pathinfo_service: PathInfoService) -> None:
        first = make_path_info("twice", 0)
        second = first.with_signatures([Signature("k-1", bytes(64))])
        await pathinfo_service.put(first)
        await pathinfo_service.put(second)
        got = await pathinfo_service.get(first.store_path.digest)
        assert got is not None
        assert Signature("k-1", bytes(64)) in got.signatures

    async def test_list(self, pathinfo_service: PathInfoService) -> None:
        if not self.supports_list:
            pytest.skip("this backend cannot list")
        infos = [make_path_info(f"p{i}", i) for i in range(25)]
        for info in infos:
            await pathinfo_service.put(info)
        listed = [i async for i in pathinfo_service.list()]
        assert sorted(str(i.store_path) for i in listed) == sorted(str(i.store_path) for i in infos)
        by_path = {i.store_path: i for i in listed}
        for info in infos:
            assert by_path[info.store_path].node == info.node

    async def test_get_corrupted(self, pathinfo_service: PathInfoService, store_raw: RawPathInfoStore) -> None:
        a, b = make_path_info("a", 1), make_path_info("b", 2)
        await store_raw(a.store_path.digest, b.encode())  # a valid record, filed under the wrong key
        with pytest.raises(StorageError):
            await pathinfo_service.get(a.store_path.digest)

    async def test_get_garbage(self, pathinfo_service: PathInfoService, store_raw: RawPathInfoStore) -> None:
        digest = bytes(range(20))
        await store_raw(digest, b"\xff\xff\xff")
        with pytest.raises(StorageError):
            await pathinfo_service.get(digest)

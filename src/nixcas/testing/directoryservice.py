"""The DirectoryService contract, as a pytest suite every backend reuses.

It mirrors the tvix ``directoryservice`` test suite (``test_non_exist``,
``put_get``, ``put_get_multiple_success``, ``put_get_multiple_dedup``,
``put_get_foo``, ``upload_reject_unconnected``,
``upload_reject_dangling_pointer``, ``upload_reject_wrong_size``) and adds
atomicity and verify-on-read checks.

Usage in a backend's test module::

    class TestMyDirectoryService(DirectoryServiceSuite):
        @pytest_asyncio.fixture
        async def directory_service(self) -> AsyncIterator[DirectoryService]:
            svc = await directory_service_from_url("my://...")
            yield svc
            await svc.close()

        # optional raw hook: store bytes under a digest, bypassing every check
        @pytest.fixture
        def store_raw(self, directory_service: DirectoryService) -> RawStore: ...
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import ClassVar

import blake3
import pytest

from nixcas.castore.digest import B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.nodes import DirectoryNode
from nixcas.castore.sizerule import SizeRule
from nixcas.errors import ChecksumMismatch, ClosureError, NixcasError, StorageError
from nixcas.testing.fixtures import (
    DIRECTORY_A,
    DIRECTORY_B,
    DIRECTORY_C,
    DIRECTORY_COMPLICATED,
    DIRECTORY_COMPLICATED_SNIX,
    DIRECTORY_D,
    DIRECTORY_WITH_KEEP,
    DUMMY_DIGEST,
)
from nixcas.testing.matrix import check_covers

__all__ = ["DirectoryServiceSuite", "RawStore"]

RawStore = Callable[[B3Digest, bytes], Awaitable[None]]
"""Store (or overwrite) raw bytes under a digest, bypassing the service's checks."""

# Digests from the reference vectors (tvix fixtures, deployed size rule), so the
# suite does not trust the Directory encoder it is testing.
DIGEST_HEX = {
    "A": "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
    "WITH_KEEP": "8b5b5d642b646bb8ed504b0862c39413e87e57491497de7bd075953f7b83810e",
    "COMPLICATED": "424a7f6ce08d805d15b428062faae96299a1675d708c3a39261afe38cdd04feb",
    "B": "8701f4722d8dae7f2c40fa003331b8437a3825f9e1bfd3a77998c64cc226b9cc",
    "C": "78eb200ae0cc95d4ea954655fbcf91e285013a261310e161927f2401d2bca803",
    "D": "76cd8b55b37333961c1778ba997e57df92e219926ae5a66c414b810331a77603",
}


def _digest(name: str) -> B3Digest:
    return B3Digest(bytes.fromhex(DIGEST_HEX[name]))


async def collect(svc: DirectoryService, root: B3Digest) -> list[Directory]:
    """Everything ``get_recursive`` yields."""
    return [d async for d in svc.get_recursive(root)]


async def collect_into(svc: DirectoryService, root: B3Digest, seen: list[B3Digest]) -> None:
    """Append the digests ``get_recursive`` yields to ``seen`` (kept if it fails midway)."""
    async for d in svc.get_recursive(root):
        seen.append(d.digest)


async def upload(svc: DirectoryService, directories: Sequence[Directory]) -> B3Digest:
    """Upload a closure through one putter."""
    putter = svc.put_multiple_start()
    for d in directories:
        await putter.put(d)
    return await putter.close()


async def upload_rejected(svc: DirectoryService, directories: Sequence[Directory]) -> None:
    """Upload must fail with ClosureError (at a put or at close)."""
    putter = svc.put_multiple_start()

    async def put_all_and_close() -> None:
        for d in directories:
            await putter.put(d)
        await putter.close()

    with pytest.raises(ClosureError):
        await put_all_and_close()
    await putter.abort()


class DirectoryServiceSuite:
    """Contract tests; a subclass provides the ``directory_service`` fixture."""

    covers: ClassVar[tuple[str, ...]] = ()
    """The tags of :data:`nixcas.registry.DIRECTORY_SERVICES` this subclass runs (checked before every test)."""

    @pytest.fixture(autouse=True)
    def _runs_the_covered_backends(self, directory_service: DirectoryService) -> None:
        check_covers("directoryservices", self.covers, directory_service)

    corruption_error: ClassVar[type[StorageError]] = ChecksumMismatch
    """What reading bytes stored under the wrong digest raises (its message says "checksum mismatch").
    A gRPC client's server checks them first and answers ``DATA_LOSS``: a RemoteError there."""

    ROOTS_ONLY = False
    """The backend answers ``get``/``get_recursive`` only for closure roots (the snix
    object-store layout); directories inside a closure are then checked absent instead."""

    def raises_corruption(self, also: str = "") -> pytest.RaisesExc[StorageError]:
        """``pytest.raises`` for :attr:`corruption_error` (other than ChecksumMismatch: saying "checksum mismatch")."""
        if self.corruption_error is ChecksumMismatch:
            return pytest.raises(ChecksumMismatch, match=also or None)
        return pytest.raises(self.corruption_error, match=f"{also}.*checksum mismatch" if also else "checksum mismatch")

    # -- hooks ---------------------------------------------------------------------

    @pytest.fixture
    def store_raw(self) -> RawStore:
        pytest.skip("this backend provides no raw storage hook")

    # -- helpers -------------------------------------------------------------------

    async def check_stored(self, svc: DirectoryService, directory: Directory, digest: B3Digest) -> None:
        got = await svc.get(digest)
        assert got is not None
        assert got.digest == digest
        assert got.entries == directory.entries
        assert got.size_under(svc.size_rule) == directory.size_under(svc.size_rule)

    async def check_absent(self, svc: DirectoryService, *digests: B3Digest) -> None:
        for digest in digests:
            assert await svc.get(digest) is None
            assert await collect(svc, digest) == []

    # -- tvix suite ------------------------------------------------------------------

    async def test_non_exist(self, directory_service: DirectoryService) -> None:
        await self.check_absent(directory_service, _digest("WITH_KEEP"), _digest("A"), DUMMY_DIGEST)

    async def test_put_get(self, directory_service: DirectoryService) -> None:
        digest = await directory_service.put(DIRECTORY_WITH_KEEP)
        assert digest == _digest("WITH_KEEP")
        await self.check_stored(directory_service, DIRECTORY_WITH_KEEP, digest)
        assert [d.digest for d in await collect(directory_service, digest)] == [digest]
        # idempotent
        assert await directory_service.put(DIRECTORY_WITH_KEEP) == digest
        await self.check_stored(directory_service, DIRECTORY_WITH_KEEP, digest)

    async def test_put_get_empty(self, directory_service: DirectoryService) -> None:
        assert await directory_service.put(DIRECTORY_A) == _digest("A")
        got = await directory_service.get(_digest("A"))
        assert got is not None
        assert len(got) == 0
        assert got.size_under(SizeRule.TVIX) == got.size_under(SizeRule.SNIX) == 0

    async def test_put_get_multiple_success(self, directory_service: DirectoryService) -> None:
        root = await upload(directory_service, [DIRECTORY_A, DIRECTORY_C])
        assert root == _digest("C")
        await self.check_stored(directory_service, DIRECTORY_C, _digest("C"))
        if self.ROOTS_ONLY:
            await self.check_absent(directory_service, _digest("A"))
        else:
            await self.check_stored(directory_service, DIRECTORY_A, _digest("A"))
        # root first, each directory once (C points to A twice)
        assert [d.digest for d in await collect(directory_service, root)] == [_digest("C"), _digest("A")]

    async def test_put_get_multiple_dedup(self, directory_service: DirectoryService) -> None:
        root = await upload(directory_service, [DIRECTORY_A, DIRECTORY_A, DIRECTORY_C, DIRECTORY_C])
        assert root == _digest("C")
        assert [d.digest for d in await collect(directory_service, root)] == [_digest("C"), _digest("A")]

    async def test_put_get_complicated(self, directory_service: DirectoryService) -> None:
        root = await upload(directory_service, [DIRECTORY_WITH_KEEP, DIRECTORY_COMPLICATED])
        assert root == _digest("COMPLICATED")
        got = await collect(directory_service, root)
        assert [d.digest for d in got] == [_digest("COMPLICATED"), _digest("WITH_KEEP")]
        assert got[0].entries == DIRECTORY_COMPLICATED.entries
        assert got[1].entries == DIRECTORY_WITH_KEEP.entries

    async def test_put_get_foo(self, directory_service: DirectoryService) -> None:
        root = await upload(directory_service, [DIRECTORY_A, DIRECTORY_B, DIRECTORY_D])
        assert root == _digest("D")
        got = [d.digest for d in await collect(directory_service, root)]
        # D first; A and B (both children of D) in either order; A only once
        assert got in (
            [_digest("D"), _digest("A"), _digest("B")],
            [_digest("D"), _digest("B"), _digest("A")],
        )
        if self.ROOTS_ONLY:
            # only the closure's root is retrievable
            await self.check_absent(directory_service, _digest("B"), _digest("A"))
        else:
            # the sub-closure is retrievable on its own
            assert [d.digest for d in await collect(directory_service, _digest("B"))] == [_digest("B"), _digest("A")]

    async def test_separate_uploads(self, directory_service: DirectoryService) -> None:
        """A closure may repeat directories stored by an earlier upload."""
        await upload(directory_service, [DIRECTORY_A, DIRECTORY_B])
        root = await upload(directory_service, [DIRECTORY_A, DIRECTORY_B, DIRECTORY_D])
        assert root == _digest("D")
        assert len(await collect(directory_service, root)) == 3

    # -- rejected uploads: nothing of the closure becomes visible ---------------------

    async def test_upload_reject_unconnected(self, directory_service: DirectoryService) -> None:
        await upload_rejected(directory_service, [DIRECTORY_A, DIRECTORY_WITH_KEEP])
        await self.check_absent(directory_service, _digest("A"), _digest("WITH_KEEP"))

    async def test_upload_reject_unconnected_after_root(self, directory_service: DirectoryService) -> None:
        await upload_rejected(directory_service, [DIRECTORY_A, DIRECTORY_B, DIRECTORY_WITH_KEEP])
        await self.check_absent(directory_service, _digest("A"), _digest("B"), _digest("WITH_KEEP"))

    async def test_upload_reject_dangling_pointer(self, directory_service: DirectoryService) -> None:
        # A exists in the store, but was not uploaded earlier in *this* putter
        await upload(directory_service, [DIRECTORY_A])
        await upload_rejected(directory_service, [DIRECTORY_B])
        await self.check_absent(directory_service, _digest("B"))
        await self.check_stored(directory_service, DIRECTORY_A, _digest("A"))

    async def test_upload_reject_dangling_pointer_empty_store(self, directory_service: DirectoryService) -> None:
        await upload_rejected(directory_service, [DIRECTORY_WITH_KEEP, DIRECTORY_D])
        await self.check_absent(directory_service, _digest("WITH_KEEP"), _digest("D"))

    async def test_upload_reject_child_after_parent(self, directory_service: DirectoryService) -> None:
        await upload_rejected(directory_service, [DIRECTORY_C, DIRECTORY_A])
        await self.check_absent(directory_service, _digest("A"), _digest("C"))

    @pytest.mark.parametrize("wrong_size", [1, 2, 2**64 - 3])
    async def test_upload_reject_wrong_size(self, directory_service: DirectoryService, wrong_size: int) -> None:
        wrong_b = Directory({b"a": DirectoryNode(_digest("A"), wrong_size)})
        await upload_rejected(directory_service, [DIRECTORY_A, wrong_b])
        await self.check_absent(directory_service, _digest("A"), wrong_b.digest)

    async def test_upload_reject_wrong_size_deeper(self, directory_service: DirectoryService) -> None:
        wrong_d = Directory({b"a": DirectoryNode(_digest("A"), 0), b"b": DirectoryNode(_digest("B"), 1)})
        await upload_rejected(directory_service, [DIRECTORY_A, DIRECTORY_B, wrong_d])
        await self.check_absent(directory_service, _digest("A"), _digest("B"), wrong_d.digest)

    async def test_upload_reject_other_size_rule(self, directory_service: DirectoryService) -> None:
        """A tree whose recorded sizes follow the other rule is refused, the message naming the rule."""
        rule = directory_service.size_rule
        other = DIRECTORY_COMPLICATED_SNIX if rule is SizeRule.TVIX else DIRECTORY_COMPLICATED
        putter = directory_service.put_multiple_start()
        await putter.put(DIRECTORY_WITH_KEEP)
        with pytest.raises(ClosureError, match=f"under the {rule} directory size rule"):
            await putter.put(other)
        await putter.abort()
        await self.check_absent(directory_service, other.digest)

    async def test_upload_reject_empty(self, directory_service: DirectoryService) -> None:
        putter = directory_service.put_multiple_start()
        with pytest.raises(ClosureError):
            await putter.close()

    # -- putter lifecycle ----------------------------------------------------------

    async def test_putter_nothing_visible_before_close(self, directory_service: DirectoryService) -> None:
        putter = directory_service.put_multiple_start()
        await putter.put(DIRECTORY_A)
        await putter.put(DIRECTORY_B)
        await self.check_absent(directory_service, _digest("A"), _digest("B"))
        assert await putter.close() == _digest("B")
        await self.check_stored(directory_service, DIRECTORY_B, _digest("B"))

    async def test_putter_close_twice(self, directory_service: DirectoryService) -> None:
        putter = directory_service.put_multiple_start()
        await putter.put(DIRECTORY_A)
        await putter.put(DIRECTORY_B)
        assert await putter.close() == _digest("B")
        assert await putter.close() == _digest("B")
        with pytest.raises(NixcasError):
            await putter.put(DIRECTORY_D)
        await self.check_absent(directory_service, _digest("D"))

    async def test_putter_abort(self, directory_service: DirectoryService) -> None:
        putter = directory_service.put_multiple_start()
        await putter.put(DIRECTORY_A)
        await putter.put(DIRECTORY_B)
        await putter.abort()
        with pytest.raises(NixcasError):
            await putter.close()
        with pytest.raises(NixcasError):
            await putter.put(DIRECTORY_A)
        await self.check_absent(directory_service, _digest("A"), _digest("B"))

    async def test_putter_async_with_exception(self, directory_service: DirectoryService) -> None:
        class Boom(Exception):
            pass

        async def put_and_fail() -> None:
            async with directory_service.put_multiple_start() as putter:
                await putter.put(DIRECTORY_A)
                await putter.put(DIRECTORY_B)
                raise Boom

        with pytest.raises(Boom):
            await put_and_fail()
        await self.check_absent(directory_service, _digest("A"), _digest("B"))

    async def test_putter_async_with_success(self, directory_service: DirectoryService) -> None:
        async with directory_service.put_multiple_start() as putter:
            await putter.put(DIRECTORY_WITH_KEEP)
            await putter.put(DIRECTORY_COMPLICATED)
            root = await putter.close()
        assert root == _digest("COMPLICATED")
        assert len(await collect(directory_service, root)) == 2

    # -- verify-on-read (raw hook) ---------------------------------------------------

    async def test_get_corrupted(self, directory_service: DirectoryService, store_raw: RawStore) -> None:
        digest = await directory_service.put(DIRECTORY_WITH_KEEP)
        await store_raw(digest, DIRECTORY_B.encode())  # valid Directory, wrong digest
        with self.raises_corruption():
            await directory_service.get(digest)
        with self.raises_corruption():
            await collect(directory_service, digest)

    async def test_get_corrupted_garbage(self, directory_service: DirectoryService, store_raw: RawStore) -> None:
        digest = await directory_service.put(DIRECTORY_WITH_KEEP)
        await store_raw(digest, b"\xff\xff\xff")
        with self.raises_corruption():
            await directory_service.get(digest)

    async def test_get_undecodable(self, directory_service: DirectoryService, store_raw: RawStore) -> None:
        raw = b"\xff\xff\xff"  # hashes to its key, but is not a Directory message
        digest = B3Digest(blake3.blake3(raw).digest())
        await store_raw(digest, raw)
        with pytest.raises(StorageError) as info:
            await directory_service.get(digest)
        assert not isinstance(info.value, ChecksumMismatch)

    async def test_get_recursive_missing_child(self, directory_service: DirectoryService, store_raw: RawStore) -> None:
        # D stored without its children (bypassing the closure check)
        await store_raw(_digest("D"), DIRECTORY_D.encode())
        seen: list[B3Digest] = []
        with pytest.raises(StorageError):
            await collect_into(directory_service, _digest("D"), seen)
        assert seen in ([], [_digest("D")])

    async def test_get_recursive_missing_grandchild(
        self, directory_service: DirectoryService, store_raw: RawStore
    ) -> None:
        top = Directory({b"x": DIRECTORY_B.node(SizeRule.TVIX)})  # top -> B -> A; A is missing
        await store_raw(top.digest, top.encode())
        await store_raw(_digest("B"), DIRECTORY_B.encode())
        seen: list[B3Digest] = []
        with pytest.raises(StorageError):
            await collect_into(directory_service, top.digest, seen)
        assert seen in ([], [top.digest], [top.digest, _digest("B")])

    # -- raw closures (what servers pass on) ----------------------------------------

    async def test_get_recursive_raw_matches(self, directory_service: DirectoryService) -> None:
        root = await upload(directory_service, [DIRECTORY_A, DIRECTORY_B, DIRECTORY_D])
        raw = [item async for item in directory_service.get_recursive_raw(root)]
        assert [d.hex() for d, _ in raw] == [DIGEST_HEX["D"], DIGEST_HEX["A"], DIGEST_HEX["B"]]
        for digest, data in raw:
            assert blake3.blake3(data).digest() == digest  # the canonical bytes, independently hashed
        assert [item async for item in directory_service.get_recursive_raw(DUMMY_DIGEST)] == []

    async def test_get_recursive_raw_corrupted(self, directory_service: DirectoryService, store_raw: RawStore) -> None:
        digest = await directory_service.put(DIRECTORY_WITH_KEEP)
        await store_raw(digest, DIRECTORY_B.encode())
        with self.raises_corruption():
            [item async for item in directory_service.get_recursive_raw(digest)]

"""``priority`` and ``race`` over blob, directory and path info services.

The shared contract suites run over both combinators (writes seed a member
directly: the combinators are read-only); the rest checks the semantics: a
slow member never blocks a fast correct one in ``race`` (and is cancelled),
a failing or wrong member counts as no answer, absence and all-failures are
told apart, writes are refused (also over gRPC and on the command line), and
the URL and composition forms.  Expected digests come from the ``blake3``
package or the reference vectors, never from nixcas.
"""

from __future__ import annotations

import asyncio
import io
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

import blake3
import grpc
import pytest
import pytest_asyncio

from nixcas.castore.blob.base import BlobChecker, BlobReader, BlobService, BlobWriter, BytesReader, ChunkMeta
from nixcas.castore.blob.members import WHOLE_READ, MembersBlobService
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.base import DirectoryPutter, DirectoryService
from nixcas.castore.dirs.members import MembersDirectoryService
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.grpc.status import RemoteError
from nixcas.castore.sizerule import SizeRule
from nixcas.composition import Composition, blob_service_from_url, directory_service_from_url, pathinfo_service_from_url
from nixcas.errors import ChecksumMismatch, ConfigurationError, ReadOnlyError, StorageError, UnavailableError
from nixcas.server import start_server
from nixcas.store.pathinfo.base import PathInfoService
from nixcas.store.pathinfo.members import MembersPathInfoService
from nixcas.store.pathinfo.memory import MemoryPathInfoService
from nixcas.store.pathinfo.model import PathInfo
from nixcas.testing.blobservice import BlobCorrupter, BlobServiceSuite
from nixcas.testing.directoryservice import DIGEST_HEX, DirectoryServiceSuite, RawStore
from nixcas.testing.fixtures import DIRECTORY_A, DIRECTORY_B, DIRECTORY_COMPLICATED, DIRECTORY_WITH_KEEP, HELLOWORLD
from nixcas.testing.pathinfoservice import PathInfoServiceSuite, RawPathInfoStore, make_path_info

MODES = ["priority", "race"]

LARGE = blake3.blake3(b"nixcas members LARGE").digest(length=WHOLE_READ * 2 + 4321)


def b3(data: bytes) -> B3Digest:
    """Independent digest computation (the ``blake3`` package, not nixcas)."""
    return B3Digest(blake3.blake3(data).digest())


def ref(name: str) -> B3Digest:
    """A fixture Directory's digest, from the reference vectors."""
    return B3Digest(bytes.fromhex(DIGEST_HEX[name]))


def other_tasks() -> set[asyncio.Task[object]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


# -- members that are slow, failing or wrong -----------------------------------------------


class Gate:
    """Holds calls until opened; counts the calls cancelled while waiting."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.entered = 0
        self.cancelled = 0

    async def wait(self) -> None:
        self.entered += 1
        try:
            await self.opened.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


class SlowBlobs(MemoryBlobService):
    def __init__(self, gate: Gate) -> None:
        super().__init__()
        self.gate = gate

    async def has(self, digest: B3Digest) -> bool:
        await self.gate.wait()
        return await super().has(digest)

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        await self.gate.wait()
        return await super().chunks(digest)

    async def _open_read(self, digest: B3Digest) -> BlobReader | None:
        await self.gate.wait()
        return await super()._open_read(digest)

    async def _read_many(
        self, max_sizes: Mapping[B3Digest, int], checker: BlobChecker, parallel: int
    ) -> dict[B3Digest, bytes]:
        await self.gate.wait()
        return await super()._read_many(max_sizes, checker, parallel)


class FailingBlobs(MemoryBlobService):
    async def has(self, digest: B3Digest) -> bool:
        raise UnavailableError("blob member down")

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        raise UnavailableError("blob member down")

    async def _open_read(self, digest: B3Digest) -> BlobReader | None:
        raise UnavailableError("blob member down")

    async def _read_many(
        self, max_sizes: Mapping[B3Digest, int], checker: BlobChecker, parallel: int
    ) -> dict[B3Digest, bytes]:
        raise UnavailableError("blob member down")


class _BreakingReader(BytesReader):
    """Serves the blob, but every read past ``limit`` fails (a connection lost part-way)."""

    def __init__(self, data: bytes, limit: int) -> None:
        super().__init__(data)
        self.limit = limit

    async def read(self, n: int = -1) -> bytes:
        if self.tell() >= self.limit:
            raise UnavailableError("connection lost mid-blob")
        return await super().read(n if n < 0 else min(n, self.limit - self.tell()))


class BreakingBlobs(MemoryBlobService):
    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    async def _open_read(self, digest: B3Digest) -> BlobReader | None:
        data = self._blobs.get(digest)
        return None if data is None else _BreakingReader(data, self.limit)


def wrong_blobs(data: bytes, instead: bytes) -> MemoryBlobService:
    """A member that holds ``instead`` under the digest of ``data``."""
    svc = MemoryBlobService()
    svc._blobs[b3(data)] = instead
    return svc


async def seeded_blobs(*blobs: bytes) -> MemoryBlobService:
    svc = MemoryBlobService()
    await svc.put_many(list(blobs))
    return svc


class SlowDirs(MemoryDirectoryService):
    def __init__(self, gate: Gate) -> None:
        super().__init__(SizeRule.TVIX)
        self.gate = gate

    async def _get_raw(self, digest: B3Digest) -> bytes | None:
        await self.gate.wait()
        return await super()._get_raw(digest)

    async def _get_many_raw(self, digests: Sequence[B3Digest]) -> dict[B3Digest, bytes]:
        await self.gate.wait()
        return await super()._get_many_raw(digests)


class FailingDirs(MemoryDirectoryService):
    async def _get_raw(self, digest: B3Digest) -> bytes | None:
        raise UnavailableError("directory member down")

    async def _get_many_raw(self, digests: Sequence[B3Digest]) -> dict[B3Digest, bytes]:
        raise UnavailableError("directory member down")


def seeded_dirs(*directories: Directory) -> MemoryDirectoryService:
    svc = MemoryDirectoryService(SizeRule.TVIX)
    for d in directories:
        svc._data[d.digest] = d.encode()
    return svc


class SlowPathInfos(MemoryPathInfoService):
    def __init__(self, gate: Gate) -> None:
        super().__init__()
        self.gate = gate

    async def _get_raw(self, digest: bytes) -> bytes | None:
        await self.gate.wait()
        return await super()._get_raw(digest)


class FailingPathInfos(MemoryPathInfoService):
    async def _get_raw(self, digest: bytes) -> bytes | None:
        raise UnavailableError("path info member down")


async def seeded_pathinfos(*infos: PathInfo) -> MemoryPathInfoService:
    svc = MemoryPathInfoService()
    for info in infos:
        await svc.put(info)
    return svc


# -- the contract suites, with writes seeding the last member -----------------------------


class SeededBlobs(MembersBlobService):
    """Reads through the combinator; writes go straight into ``seed`` (one of the members)."""

    def __init__(self, mode: str, members: Sequence[BlobService], seed: BlobService) -> None:
        super().__init__(mode, members)
        self.seed = seed

    async def open_write(self, expected_size: int | None = None) -> BlobWriter:
        return await self.seed.open_write(expected_size)


class SeededDirs(MembersDirectoryService):
    def __init__(self, mode: str, members: Sequence[DirectoryService], seed: DirectoryService) -> None:
        super().__init__(mode, members)
        self.seed = seed

    async def _put_raw(self, items: Sequence[tuple[B3Digest, bytes]]) -> None:
        await self.seed._put_raw(items)

    def put_multiple_start(self) -> DirectoryPutter:
        return DirectoryPutter(self)


class SeededPathInfos(MembersPathInfoService):
    def __init__(self, mode: str, members: Sequence[PathInfoService], seed: PathInfoService) -> None:
        super().__init__(mode, members)
        self.seed = seed

    async def put(self, info: PathInfo) -> PathInfo:
        return await self.seed.put(info)


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class TestMembersBlobService(BlobServiceSuite):
    """An empty member first, the seeded one second: every read finds its blob in the second member."""

    covers = ("priority", "race")

    @pytest_asyncio.fixture
    async def blob_service(self, mode: str) -> AsyncIterator[BlobService]:
        seed = MemoryBlobService()
        yield SeededBlobs(mode, [MemoryBlobService(), seed], seed)

    @pytest.fixture
    def corrupt_blob(self, blob_service: BlobService) -> BlobCorrupter:
        assert isinstance(blob_service, SeededBlobs) and isinstance(blob_service.seed, MemoryBlobService)
        blobs = blob_service.seed._blobs

        async def corrupt(digest: B3Digest, data: bytes) -> None:
            assert digest in blobs
            blobs[digest] = data

        return corrupt


class TestMembersDirectoryService(DirectoryServiceSuite):
    covers = ("priority", "race")

    @pytest_asyncio.fixture
    async def directory_service(self, mode: str) -> AsyncIterator[DirectoryService]:
        seed = MemoryDirectoryService(SizeRule.TVIX)
        yield SeededDirs(mode, [MemoryDirectoryService(SizeRule.TVIX), seed], seed)

    @pytest.fixture
    def store_raw(self, directory_service: DirectoryService) -> RawStore:
        assert isinstance(directory_service, SeededDirs) and isinstance(directory_service.seed, MemoryDirectoryService)
        data = directory_service.seed._data

        async def store(digest: B3Digest, raw: bytes) -> None:
            data[digest] = raw

        return store


class TestMembersPathInfoService(PathInfoServiceSuite):
    covers = ("priority", "race")

    @pytest_asyncio.fixture
    async def pathinfo_service(self, mode: str) -> AsyncIterator[PathInfoService]:
        seed = MemoryPathInfoService()
        yield SeededPathInfos(mode, [MemoryPathInfoService(), seed], seed)

    @pytest.fixture
    def store_raw(self, pathinfo_service: PathInfoService) -> RawPathInfoStore:
        assert isinstance(pathinfo_service, SeededPathInfos)
        assert isinstance(pathinfo_service.seed, MemoryPathInfoService)
        data = pathinfo_service.seed._data

        async def store(digest: bytes, raw: bytes) -> None:
            data[digest] = raw

        return store


# -- blobs ------------------------------------------------------------------------------


async def read_all(svc: BlobService, digest: B3Digest) -> bytes | None:
    reader = await svc.open_read(digest)
    if reader is None:
        return None
    async with reader:
        return await reader.read_all()


async def test_race_slow_member_does_not_block_and_is_cancelled() -> None:
    gate = Gate()
    slow = SlowBlobs(gate)
    await slow.put(HELLOWORLD)  # slow has it too, but never answers in time
    svc = MembersBlobService("race", [slow, await seeded_blobs(HELLOWORLD)])
    before = other_tasks()
    digest = b3(HELLOWORLD)
    assert await svc.has(digest)
    assert await read_all(svc, digest) == HELLOWORLD
    assert await svc.read_many({digest: 100}) == {digest: HELLOWORLD}
    assert await svc.chunks(digest) == []
    assert gate.entered == 4 and gate.cancelled == 4  # every slow call was cancelled, none left waiting
    assert other_tasks() == before


async def test_race_large_blob_cancels_the_slow_probe_before_streaming() -> None:
    gate = Gate()
    slow = SlowBlobs(gate)
    await slow.put(LARGE)
    svc = MembersBlobService("race", [slow, await seeded_blobs(LARGE)])
    before = other_tasks()
    reader = await svc.open_read(b3(LARGE))
    assert reader is not None
    assert gate.entered == 1 and gate.cancelled == 1  # decided on the fast member: no probe left running
    assert other_tasks() == before
    async with reader:
        assert await reader.read_all() == LARGE


async def test_race_member_still_probing_stays_a_fallback() -> None:
    """Its probe was cancelled when the fast member was chosen; when that one breaks mid-stream it continues."""
    gate = Gate()
    slow = SlowBlobs(gate)
    await slow.put(LARGE)
    breaking = BreakingBlobs(limit=WHOLE_READ + 100_000)
    await breaking.put(LARGE)
    svc = MembersBlobService("race", [slow, breaking])
    reader = await svc.open_read(b3(LARGE))
    assert reader is not None and gate.cancelled == 1
    gate.opened.set()
    async with reader:
        assert await reader.read_all() == LARGE


class _StallingReader(BytesReader):
    def __init__(self, data: bytes, gate: Gate, closed: list[bool]) -> None:
        super().__init__(data)
        self.gate = gate
        self.closed = closed

    async def read(self, n: int = -1) -> bytes:
        await self.gate.wait()
        return await super().read(n)

    async def close(self) -> None:
        self.closed.append(True)


class StallingBlobs(MemoryBlobService):
    """Opens at once, then sends no byte until the gate opens."""

    def __init__(self, gate: Gate) -> None:
        super().__init__()
        self.gate = gate
        self.closed: list[bool] = []

    async def _open_read(self, digest: B3Digest) -> BlobReader | None:
        data = self._blobs.get(digest)
        return None if data is None else _StallingReader(data, self.gate, self.closed)


@pytest.mark.parametrize("data", [HELLOWORLD, LARGE], ids=["small", "large"])
async def test_race_member_stalling_after_opening_does_not_block(data: bytes) -> None:
    gate = Gate()
    stalling = StallingBlobs(gate)
    await stalling.put(data)
    svc = MembersBlobService("race", [stalling, await seeded_blobs(data)])
    before = other_tasks()
    assert await read_all(svc, b3(data)) == data
    assert gate.cancelled == 1 and stalling.closed == [True]  # its read was cancelled, its reader closed
    assert other_tasks() == before


async def test_priority_waits_for_its_first_member() -> None:
    """priority asks in order: a slow first member is waited for (and answers)."""
    gate = Gate()
    slow = SlowBlobs(gate)
    await slow.put(HELLOWORLD)
    svc = MembersBlobService("priority", [slow, wrong_blobs(HELLOWORLD, b"other bytes")])
    task = asyncio.ensure_future(read_all(svc, b3(HELLOWORLD)))
    await asyncio.sleep(0)
    assert not task.done() and gate.entered == 1
    gate.opened.set()
    assert await task == HELLOWORLD


@pytest.mark.parametrize("mode", MODES)
async def test_failing_member_counts_as_no_answer(mode: str) -> None:
    svc = MembersBlobService(mode, [FailingBlobs(), await seeded_blobs(HELLOWORLD, LARGE)])
    assert await read_all(svc, b3(HELLOWORLD)) == HELLOWORLD
    assert await read_all(svc, b3(LARGE)) == LARGE
    assert await svc.has(b3(LARGE))
    assert await svc.read_many({b3(HELLOWORLD): 12}) == {b3(HELLOWORLD): HELLOWORLD}


@pytest.mark.parametrize("mode", MODES)
async def test_wrong_small_blob_counts_as_no_answer(mode: str) -> None:
    """The wrong member answers first (its bytes do not hash to the digest): the next member's bytes win."""
    svc = MembersBlobService(mode, [wrong_blobs(HELLOWORLD, b"Hello World?"), await seeded_blobs(HELLOWORLD)])
    assert await read_all(svc, b3(HELLOWORLD)) == HELLOWORLD
    assert await svc.read(b3(HELLOWORLD)) == HELLOWORLD
    assert await svc.read_many({b3(HELLOWORLD): 12}) == {b3(HELLOWORLD): HELLOWORLD}


async def test_race_wrong_fast_member_loses_to_slower_correct_one() -> None:
    gate = Gate()
    slow = SlowBlobs(gate)
    await slow.put(HELLOWORLD)
    wrong = wrong_blobs(HELLOWORLD, b"Hello World?")
    svc = MembersBlobService("race", [wrong, slow])
    task = asyncio.ensure_future(read_all(svc, b3(HELLOWORLD)))
    for _ in range(10):
        await asyncio.sleep(0)
    assert not task.done()  # the wrong answer did not win
    gate.opened.set()
    assert await task == HELLOWORLD


class BatchWrongThenDown(MemoryBlobService):
    """Its batch holds a wrong blob; asked blob by blob, it is down."""

    async def _read_many(
        self, max_sizes: Mapping[B3Digest, int], checker: BlobChecker, parallel: int
    ) -> dict[B3Digest, bytes]:
        if len(max_sizes) > 1:
            raise ChecksumMismatch("blob in a batch", "a", "b")
        raise UnavailableError("blob member down")


@pytest.mark.parametrize("mode", MODES)
async def test_read_many_member_failing_blob_by_blob(mode: str) -> None:
    svc = MembersBlobService(mode, [BatchWrongThenDown(), await seeded_blobs(HELLOWORLD, b"x")])
    wanted = {b3(HELLOWORLD): 12, b3(b"x"): 1}
    assert await svc.read_many(wanted) == {b3(HELLOWORLD): HELLOWORLD, b3(b"x"): b"x"}


@pytest.mark.parametrize("mode", MODES)
async def test_wrong_answer_only_is_an_error_not_absence(mode: str) -> None:
    svc = MembersBlobService(mode, [MemoryBlobService(), wrong_blobs(HELLOWORLD, b"Hello World?")])
    with pytest.raises(ChecksumMismatch, match=b3(HELLOWORLD).hex()):
        await svc.read(b3(HELLOWORLD))
    with pytest.raises(ChecksumMismatch):
        await svc.read_many({b3(HELLOWORLD): 12})


@pytest.mark.parametrize("mode", MODES)
async def test_absent_everywhere_is_not_found(mode: str, caplog: pytest.LogCaptureFixture) -> None:
    svc = MembersBlobService(mode, [MemoryBlobService(), FailingBlobs(), MemoryBlobService()])
    with caplog.at_level(logging.WARNING, logger="nixcas._members"):
        assert await svc.open_read(b3(HELLOWORLD)) is None
    assert "blob member down" in caplog.text  # the failing member is not hidden from the log
    assert not await svc.has(b3(HELLOWORLD))
    assert await svc.chunks(b3(HELLOWORLD)) is None
    assert await svc.read_many({b3(HELLOWORLD): 12}) == {}


@pytest.mark.parametrize("mode", MODES)
async def test_all_members_failing_surfaces_the_errors(mode: str) -> None:
    svc = MembersBlobService(mode, [FailingBlobs(), FailingBlobs()])
    with pytest.raises(UnavailableError, match=r"no member gave a valid answer.*blob member down.*blob member down"):
        await svc.open_read(b3(HELLOWORLD))
    with pytest.raises(UnavailableError):
        await svc.has(b3(HELLOWORLD))
    with pytest.raises(UnavailableError):
        await svc.read_many({b3(HELLOWORLD): 12})
    single = MembersBlobService(mode, [FailingBlobs()])
    with pytest.raises(UnavailableError, match=r"^blob member down$"):
        await single.open_read(b3(HELLOWORLD))


@pytest.mark.parametrize("mode", MODES)
async def test_large_blob_continues_on_the_next_member_mid_stream(mode: str) -> None:
    """The first member's connection drops past the read-ahead: the next member continues at that offset."""
    breaking = BreakingBlobs(limit=WHOLE_READ + 100_000)
    await breaking.put(LARGE)
    svc = MembersBlobService(mode, [breaking, await seeded_blobs(LARGE)])
    assert await read_all(svc, b3(LARGE)) == LARGE
    reader = await svc.open_read(b3(LARGE))
    assert reader is not None
    async with reader:
        assert await reader.seek(-10, io.SEEK_END) == len(LARGE) - 10
        assert await reader.read() == LARGE[-10:]
        await reader.seek(5)
        assert await reader.read(7) == LARGE[5:12]


@pytest.mark.parametrize("mode", MODES)
async def test_large_blob_breaking_everywhere_fails(mode: str) -> None:
    breaking = BreakingBlobs(limit=WHOLE_READ + 100_000)
    await breaking.put(LARGE)
    svc = MembersBlobService(mode, [breaking, MemoryBlobService()])
    reader = await svc.open_read(b3(LARGE))
    assert reader is not None
    async with reader:
        with pytest.raises(UnavailableError, match="connection lost mid-blob"):
            await reader.read_all()


async def test_large_wrong_blob_never_ends_cleanly() -> None:
    """Beyond WHOLE_READ the bytes stream: a member serving a wrong large blob fails the read at its end."""
    bad = LARGE[:-1] + bytes([LARGE[-1] ^ 1])
    svc = MembersBlobService("priority", [wrong_blobs(LARGE, bad), await seeded_blobs(LARGE)])
    with pytest.raises(ChecksumMismatch):
        await read_all(svc, b3(LARGE))


async def test_outboard_is_checked() -> None:
    from nixcas.castore.bao import encode_outboard

    class LyingOutboard(MemoryBlobService):
        async def outboard(self, digest: B3Digest) -> bytes | None:
            good = await super().outboard(digest)
            return None if good is None else good[:8] + bytes(len(good) - 8)

    lying = LyingOutboard()
    await lying.put(LARGE)
    svc = MembersBlobService("priority", [lying, await seeded_blobs(LARGE)])
    assert await svc.outboard(b3(LARGE)) == encode_outboard(LARGE)
    only_lying = MembersBlobService("race", [lying])
    with pytest.raises(ChecksumMismatch):
        await only_lying.outboard(b3(LARGE))


@pytest.mark.parametrize("mode", MODES)
async def test_blob_writes_are_refused(mode: str) -> None:
    member = MemoryBlobService()
    svc = MembersBlobService(mode, [member])
    with pytest.raises(ReadOnlyError, match=f"{mode} blob service is read-only"):
        await svc.put(HELLOWORLD)
    with pytest.raises(ReadOnlyError):
        await svc.open_write()
    assert not await member.has(b3(HELLOWORLD))


# -- directories --------------------------------------------------------------------------


async def collect(svc: DirectoryService, root: B3Digest) -> list[B3Digest]:
    return [d.digest async for d in svc.get_recursive(root)]


CLOSURE = [ref("COMPLICATED"), ref("WITH_KEEP")]


@pytest.mark.parametrize("mode", MODES)
async def test_closure_completed_by_the_next_member(mode: str) -> None:
    """The first member lacks a descendant: the closure is finished from the next one, each directory once."""
    partial = seeded_dirs(DIRECTORY_COMPLICATED)
    svc = MembersDirectoryService(mode, [partial, seeded_dirs(DIRECTORY_COMPLICATED, DIRECTORY_WITH_KEEP)])
    assert await collect(svc, ref("COMPLICATED")) == CLOSURE
    assert [d async for d in svc.get_recursive_raw(ref("COMPLICATED"))] == [
        (DIRECTORY_COMPLICATED.digest, DIRECTORY_COMPLICATED.encode()),
        (DIRECTORY_WITH_KEEP.digest, DIRECTORY_WITH_KEEP.encode()),
    ]


@pytest.mark.parametrize("mode", MODES)
async def test_closure_no_member_completes_is_an_error(mode: str) -> None:
    svc = MembersDirectoryService(mode, [seeded_dirs(DIRECTORY_COMPLICATED), MemoryDirectoryService(SizeRule.TVIX)])
    got: list[B3Digest] = []

    async def consume() -> None:
        async for d in svc.get_recursive(ref("COMPLICATED")):
            got.append(d.digest)

    with pytest.raises(StorageError, match="missing"):
        await consume()
    assert got == []  # a closure that fits the read-ahead is handed out only once it is whole


@pytest.mark.parametrize("mode", MODES)
async def test_large_closure_streams_and_continues_on_the_next_member(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the read-ahead a closure streams from one member; where it breaks off the next one continues."""
    from nixcas.castore.dirs import members

    monkeypatch.setattr(members, "CLOSURE_READ", 0)  # every closure is "large": streamed after its root
    partial = seeded_dirs(DIRECTORY_COMPLICATED)
    svc = MembersDirectoryService(mode, [partial, seeded_dirs(DIRECTORY_COMPLICATED, DIRECTORY_WITH_KEEP)])
    assert await collect(svc, ref("COMPLICATED")) == CLOSURE
    alone = MembersDirectoryService(mode, [partial, MemoryDirectoryService(SizeRule.TVIX)])
    got: list[B3Digest] = []

    async def consume() -> None:
        async for d in alone.get_recursive(ref("COMPLICATED")):
            got.append(d.digest)

    with pytest.raises(StorageError, match="missing"):
        await consume()
    assert got == [ref("COMPLICATED")]


async def test_a_closure_left_early_closes_the_members_stream(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller that stops while the read-ahead is handed out: the winning member's stream is closed at once."""
    from nixcas.castore.dirs import members

    monkeypatch.setattr(members, "CLOSURE_READ", 0)
    closed: list[bool] = []

    class Tracked(MemoryDirectoryService):
        async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
            try:
                async for d in super().get_recursive(root):
                    yield d
            finally:
                closed.append(True)

    member = Tracked(SizeRule.TVIX)
    member._data.update(seeded_dirs(DIRECTORY_COMPLICATED, DIRECTORY_WITH_KEEP)._data)
    stream = aiter(MembersDirectoryService(mode, [member]).get_recursive(ref("COMPLICATED")))
    assert (await anext(stream)).digest == ref("COMPLICATED")
    await stream.aclose()  # type: ignore[attr-defined]
    assert closed == [True]


class StallingDirs(MemoryDirectoryService):
    """Sends a closure's root at once, then nothing until the gate opens."""

    def __init__(self, gate: Gate) -> None:
        super().__init__(SizeRule.TVIX)
        self.gate = gate

    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        first = True
        async for d in super().get_recursive(root):
            if not first:
                await self.gate.wait()
            first = False
            yield d


async def test_race_closure_member_stalling_after_its_root_does_not_block() -> None:
    gate = Gate()
    stalling = StallingDirs(gate)
    stalling._data.update(seeded_dirs(DIRECTORY_COMPLICATED, DIRECTORY_WITH_KEEP)._data)
    svc = MembersDirectoryService("race", [stalling, seeded_dirs(DIRECTORY_COMPLICATED, DIRECTORY_WITH_KEEP)])
    before = other_tasks()
    assert await collect(svc, ref("COMPLICATED")) == CLOSURE
    assert gate.entered == 1 and gate.cancelled == 1
    assert other_tasks() == before


@pytest.mark.parametrize("mode", MODES)
async def test_wrong_directory_counts_as_no_answer(mode: str) -> None:
    wrong = MemoryDirectoryService(SizeRule.TVIX)
    wrong._data[ref("B")] = DIRECTORY_A.encode()  # the encoding does not hash to the digest it is filed under
    wrong._data[ref("COMPLICATED")] = DIRECTORY_B.encode()
    good = seeded_dirs(DIRECTORY_B, DIRECTORY_A, DIRECTORY_COMPLICATED, DIRECTORY_WITH_KEEP)
    svc = MembersDirectoryService(mode, [wrong, good])
    assert await svc.get(ref("B")) == DIRECTORY_B
    assert await collect(svc, ref("COMPLICATED")) == CLOSURE
    assert await svc.get_many_raw([ref("B"), ref("A")]) == {ref("B"): DIRECTORY_B.encode(), ref("A"): b""}
    only_wrong = MembersDirectoryService(mode, [MemoryDirectoryService(SizeRule.TVIX), wrong])
    with pytest.raises(ChecksumMismatch):
        await only_wrong.get(ref("B"))
    with pytest.raises(ChecksumMismatch):
        await collect(only_wrong, ref("COMPLICATED"))


async def test_race_directories_slow_member_cancelled() -> None:
    gate = Gate()
    slow = SlowDirs(gate)
    slow._data.update(seeded_dirs(DIRECTORY_COMPLICATED, DIRECTORY_WITH_KEEP)._data)
    svc = MembersDirectoryService("race", [slow, seeded_dirs(DIRECTORY_COMPLICATED, DIRECTORY_WITH_KEEP)])
    before = other_tasks()
    assert await svc.get(ref("COMPLICATED")) == DIRECTORY_COMPLICATED
    assert await collect(svc, ref("COMPLICATED")) == CLOSURE
    assert gate.entered == 2 and gate.cancelled == 2
    assert other_tasks() == before


@pytest.mark.parametrize("mode", MODES)
async def test_directories_failing_and_absent(mode: str) -> None:
    good = seeded_dirs(DIRECTORY_COMPLICATED, DIRECTORY_WITH_KEEP)
    svc = MembersDirectoryService(mode, [FailingDirs(SizeRule.TVIX), good])
    assert await collect(svc, ref("COMPLICATED")) == CLOSURE
    assert await svc.get(ref("WITH_KEEP")) == DIRECTORY_WITH_KEEP
    assert await svc.get(ref("B")) is None  # absent in one member, the other failing: absent
    assert await collect(svc, ref("B")) == []
    down = MembersDirectoryService(mode, [FailingDirs(SizeRule.TVIX), FailingDirs(SizeRule.TVIX)])
    with pytest.raises(UnavailableError, match="directory member down"):
        await down.get(ref("B"))
    with pytest.raises(UnavailableError):
        await collect(down, ref("B"))


@pytest.mark.parametrize("mode", MODES)
async def test_directory_writes_are_refused(mode: str) -> None:
    member = MemoryDirectoryService(SizeRule.TVIX)
    svc = MembersDirectoryService(mode, [member])
    with pytest.raises(ReadOnlyError, match=f"{mode} directory service is read-only"):
        await svc.put(DIRECTORY_A)
    with pytest.raises(ReadOnlyError):
        svc.put_multiple_start()
    assert await member.get(ref("A")) is None


# -- path infos ---------------------------------------------------------------------------


INFO = make_path_info("hello-2.12", 1)
OTHER = make_path_info("other-1.0", 2)


@pytest.mark.parametrize("mode", MODES)
async def test_pathinfo_for_another_path_counts_as_no_answer(mode: str) -> None:
    wrong = MemoryPathInfoService()
    wrong._data[INFO.digest] = OTHER.encode()  # a valid record, of another store path
    svc = MembersPathInfoService(mode, [wrong, await seeded_pathinfos(INFO)])
    assert await svc.get(INFO.digest) == INFO
    only_wrong = MembersPathInfoService(mode, [MemoryPathInfoService(), wrong])
    with pytest.raises(StorageError, match=f"describes {OTHER.store_path} instead"):
        await only_wrong.get(INFO.digest)


async def test_race_pathinfo_slow_member_cancelled() -> None:
    gate = Gate()
    slow = SlowPathInfos(gate)
    await slow.put(INFO)
    svc = MembersPathInfoService("race", [slow, FailingPathInfos(), await seeded_pathinfos(INFO)])
    before = other_tasks()
    assert await svc.get(INFO.digest) == INFO
    assert gate.entered == 1 and gate.cancelled == 1
    assert other_tasks() == before


@pytest.mark.parametrize("mode", MODES)
async def test_pathinfo_failing_absent_and_list(mode: str) -> None:
    svc = MembersPathInfoService(mode, [FailingPathInfos(), await seeded_pathinfos(INFO)])
    assert await svc.get(INFO.digest) == INFO
    assert await svc.get(OTHER.digest) is None
    down = MembersPathInfoService(mode, [FailingPathInfos(), FailingPathInfos()])
    with pytest.raises(UnavailableError, match="path info member down"):
        await down.get(INFO.digest)
    both = MembersPathInfoService(mode, [await seeded_pathinfos(INFO), await seeded_pathinfos(INFO, OTHER)])
    assert sorted([str(i.store_path) async for i in both.list()]) == sorted(
        [str(INFO.store_path), str(OTHER.store_path)]
    )
    with pytest.raises(ReadOnlyError, match=f"{mode} path info service is read-only"):
        await svc.put(OTHER)


# -- URL and composition forms ----------------------------------------------------------------


def member(url: str) -> str:
    return "member=" + quote(url, safe="")


@pytest.mark.parametrize("mode", MODES)
async def test_by_url(mode: str, tmp_path: Path) -> None:
    blobs = await blob_service_from_url(f"{mode}://?{member('memory://')}&{member(f'objectstore+file://{tmp_path}/b')}")
    assert isinstance(blobs, MembersBlobService) and blobs.mode == mode and len(blobs.members) == 2
    await blobs.close()
    dirs = await directory_service_from_url(f"{mode}://?{member('memory://')}&{member('sqlite://')}")
    assert isinstance(dirs, MembersDirectoryService) and dirs.mode == mode
    await dirs.close()
    infos = await pathinfo_service_from_url(f"{mode}://?{member('memory://')}")
    assert isinstance(infos, MembersPathInfoService) and len(infos.members) == 1
    await infos.close()


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("race://", "needs at least one member"),
        ("race://?near=memory%3A%2F%2F", "unknown option 'near'"),
        ("race://host?member=memory%3A%2F%2F", "takes only ?member="),
        ("race+x://?member=memory%3A%2F%2F", "unknown type"),
        ("priority://?member=bogus%3A%2F%2F", "unknown type 'bogus'"),
        ("priority://?member=", "must name a service"),
        ("race://?member", "invalid options"),
        ("race://?member=memory%3A%2F%2F&", "invalid options"),
        ("combined://?near", "invalid options"),  # was a ValueError traceback, not a configuration error
    ],
)
async def test_bad_urls(url: str, fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment.replace("?", r"\?")):
        await blob_service_from_url(url)


async def test_composition(tmp_path: Path) -> None:
    composition = tmp_path / "c.toml"
    composition.write_text(
        """
[blobservices.root]
type = "race"
members = ["a", "memory://"]

[blobservices.a]
type = "memory"

[directoryservices.root]
type = "priority"
members = ["d"]

[directoryservices.d]
type = "memory"

[pathinfoservices.root]
type = "priority"
members = ["memory://", "p"]

[pathinfoservices.p]
type = "memory"
"""
    )
    comp = Composition.from_toml(composition)
    blobs = await comp.blob_service("root")
    a = await comp.blob_service("a")
    assert isinstance(blobs, MembersBlobService) and blobs.mode == "race" and blobs.members[0] is a
    await a.put(HELLOWORLD)  # seeded directly
    assert await blobs.read(b3(HELLOWORLD)) == HELLOWORLD
    dirs = await comp.directory_service("root")
    assert isinstance(dirs, MembersDirectoryService) and dirs.mode == "priority"
    infos = await comp.pathinfo_service("root")
    assert isinstance(infos, MembersPathInfoService) and infos.members[1] is await comp.pathinfo_service("p")
    await comp.close()


@pytest.mark.parametrize(
    ("table", "fragment"),
    [
        ({"root": {"type": "race", "members": ["nope"]}}, "no blob service named 'nope'"),
        ({"root": {"type": "race", "members": []}}, "needs at least one member"),
        ({"root": {"type": "race", "members": "a"}}, "expected a list of strings"),
        (
            {"root": {"type": "race", "members": ["x"]}, "x": {"type": "priority", "members": ["root"]}},
            "recursion not allowed",
        ),
    ],
)
def test_bad_compositions(table: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        Composition.from_dict({"blobservices": table})


# -- writes refused at the edges: gRPC and the command line ----------------------------------


async def test_grpc_put_is_failed_precondition() -> None:
    blobs = MembersBlobService("race", [await seeded_blobs(HELLOWORLD)])
    dirs = MembersDirectoryService("race", [seeded_dirs(DIRECTORY_COMPLICATED, DIRECTORY_WITH_KEEP)])
    infos = MembersPathInfoService("priority", [await seeded_pathinfos(INFO)])
    running = await start_server("127.0.0.1:0", blobs, dirs, pathinfos=infos)
    try:
        client_blobs = await blob_service_from_url(running.url)
        client_dirs = await directory_service_from_url(running.url)
        client_infos = await pathinfo_service_from_url(running.url)
        try:
            assert await client_blobs.read(b3(HELLOWORLD)) == HELLOWORLD
            assert await collect(client_dirs, ref("COMPLICATED")) == CLOSURE
            assert await client_infos.get(INFO.digest) == INFO
            for write in (client_blobs.put(b"new"), client_dirs.put(DIRECTORY_A), client_infos.put(OTHER)):
                with pytest.raises(RemoteError, match="read-only") as info:
                    await write
                assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        finally:
            for client in (client_blobs, client_dirs, client_infos):
                await client.close()
    finally:
        await running.stop(0)


def test_cli_write_is_a_one_line_error(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_text("hello")
    url = "race://?member=memory%3A%2F%2F"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "nixcas.cli.main",
            "--blob-service-addr",
            url,
            "--directory-service-addr",
            url,
            "castore",
            "ingest",
            str(tree),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "read-only" in lines[0], result.stderr


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("mode", MODES)
async def test_unreachable_grpc_member_counts_as_no_answer(mode: str) -> None:
    down = member(f"grpc+http://127.0.0.1:{closed_port()}")
    blobs = await blob_service_from_url(f"{mode}://?{down}&{member('memory://')}")
    dirs = await directory_service_from_url(f"{mode}://?{down}&{member('memory://')}")
    infos = await pathinfo_service_from_url(f"{mode}://?{down}&{member('memory://')}")
    assert isinstance(blobs, MembersBlobService) and isinstance(dirs, MembersDirectoryService)
    assert isinstance(infos, MembersPathInfoService)
    try:
        await blobs.members[1].put(HELLOWORLD)
        await dirs.members[1].put(DIRECTORY_WITH_KEEP)
        await infos.members[1].put(INFO)
        assert await blobs.read(b3(HELLOWORLD)) == HELLOWORLD
        assert await dirs.get(ref("WITH_KEEP")) == DIRECTORY_WITH_KEEP
        assert await infos.get(INFO.digest) == INFO
        assert await blobs.read(b3(b"absent")) is None  # the other member says absent
        only_down = await blob_service_from_url(f"{mode}://?{down}")
        try:
            with pytest.raises(StorageError, match="unavailable"):
                await only_down.read(b3(HELLOWORLD))
        finally:
            await only_down.close()
    finally:
        for svc in (blobs, dirs, infos):
            await svc.close()


@pytest.mark.parametrize("mode", MODES)
async def test_large_blob_bad_chunk_continues_on_the_next_member(mode: str, tmp_path: Path) -> None:
    """A chunked member checks each chunk before its bytes pass: a damaged chunk past the read-ahead
    makes the next member continue at its offset, and the read ends verified."""
    import zstandard

    from nixcas.castore.objectstore.layout import chunk_key

    local = await blob_service_from_url(f"objectstore+file://{tmp_path}/b")
    try:
        await local.put(LARGE)
        chunks = await local.chunks(b3(LARGE))
        assert chunks is not None and len(chunks) >= 2
        offset = 0
        for chunk in chunks:
            if offset > WHOLE_READ:
                break
            offset += chunk.size
        (tmp_path / "b" / chunk_key(chunk.digest)).write_bytes(zstandard.compress(bytes(chunk.size)))
        svc = MembersBlobService(mode, [local, await seeded_blobs(LARGE)])
        assert await read_all(svc, b3(LARGE)) == LARGE
        alone = MembersBlobService(mode, [local])
        with pytest.raises(ChecksumMismatch, match=chunk.digest.hex()):
            await read_all(alone, b3(LARGE))
    finally:
        await local.close()


def test_member_url_secrets_are_not_echoed() -> None:
    secret_member = quote("objectstore+s3://b/p?aws_secret_access_key=SEKRIT&endpoint=http://127.0.0.1:1", safe="")
    for url in (f"race://?member={secret_member}&member=bogus%3A%2F%2F", f"priority://?member={secret_member}&x=1"):
        with pytest.raises(ConfigurationError) as info:
            Composition.from_dict({"blobservices": {"root": {"type": "race", "members": [url]}}})
        assert "SEKRIT" not in str(info.value) and "***" in str(info.value)

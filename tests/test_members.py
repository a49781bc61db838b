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
from nixcas.composition import Composition
from nixcas.errors import ChecksumMismatch, ConfigurationError, ReadOnlyError, StorageError, UnavailableError
from nixcas.registry import blob_service_from_url, directory_service_from_url, pathinfo_service_from_url
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
        super().__init__()
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
    svc = MemoryDirectoryService()
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
    @pytest_asyncio.fixture
    async def directory_service(self, mode: str) -> AsyncIterator[DirectoryService]:
        seed = MemoryDirectoryService()
        yield SeededDirs(mode, [MemoryDirectoryService(), seed], seed)

    @pytest.fixture
    def store_raw(self, directory_service: DirectoryService) -> RawStore:
        assert isinstance(directory_service, SeededDirs) and isinstance(directory_service.seed, MemoryDirectoryService)
        data = directory_service.seed._data

        async def store(digest: B3Digest, raw: bytes) -> None:
            data[digest] = raw

        return store


class TestMembersPathInfoService(PathInfoServiceSuite):
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

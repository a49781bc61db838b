"""``memory://`` — blobs in a dict, for tests and ephemeral use."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

import blake3

from nixcas.castore.blob.base import (
    BlobChecker,
    BlobReader,
    BlobService,
    BlobWriter,
    BytesReader,
    ChunkMeta,
    WriterState,
)
from nixcas.castore.digest import B3Digest
from nixcas.castore.sweep import Deletion, StoredObject, delete_in_memory, scan_in_memory
from nixcas.config import Resolver, ServiceConfig
from nixcas.urls import MemoryUrlConfig

__all__ = ["MemoryBlobService", "MemoryBlobServiceConfig"]


@dataclass(frozen=True)
class MemoryBlobServiceConfig(MemoryUrlConfig, ServiceConfig[BlobService]):
    """``memory://`` (no host, path or options); composition: ``type = "memory"``."""

    async def build(self, resolver: Resolver) -> BlobService:
        return MemoryBlobService()


class MemoryBlobService(BlobService):
    """Keeps every blob in process memory."""

    def __init__(self) -> None:
        self._blobs: dict[B3Digest, bytes] = {}
        self._mtimes: dict[B3Digest, int] = {}

    async def has(self, digest: B3Digest) -> bool:
        return digest in self._blobs

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        return [] if digest in self._blobs else None

    async def size(self, digest: B3Digest) -> int | None:
        data = self._blobs.get(digest)
        return None if data is None else len(data)

    async def _open_read(self, digest: B3Digest) -> BlobReader | None:
        data = self._blobs.get(digest)
        return None if data is None else BytesReader(data)

    async def _read_many(
        self, max_sizes: Mapping[B3Digest, int], checker: BlobChecker, parallel: int
    ) -> dict[B3Digest, bytes]:
        blobs = self._blobs
        return {d: data for d, cap in max_sizes.items() if (data := blobs.get(d)) is not None and len(data) <= cap}

    async def open_write(self, expected_size: int | None = None) -> BlobWriter:
        return _MemoryBlobWriter(self._blobs, expected_size, self._mtimes)

    # -- garbage collection (nixcas.castore.sweep) ----------------------------------

    async def scan_blobs(self) -> AsyncIterator[list[StoredObject]]:
        for batch in scan_in_memory(self._blobs, self._mtimes):
            yield batch

    async def scan_chunks(self) -> AsyncIterator[list[StoredObject]]:
        return  # blobs are kept whole
        yield

    async def delete_blobs(self, objects: Sequence[StoredObject], cutoff_ns: int) -> Deletion:
        return delete_in_memory(self._blobs, self._mtimes, objects, cutoff_ns)

    async def delete_chunks(self, objects: Sequence[StoredObject], cutoff_ns: int) -> Deletion:
        return Deletion()


class _MemoryBlobWriter(BlobWriter):
    def __init__(self, blobs: dict[B3Digest, bytes], expected_size: int | None, mtimes: dict[B3Digest, int]) -> None:
        self._blobs = blobs
        self._mtimes = mtimes
        self._parts: list[bytes] = []
        self._hasher = blake3.blake3()
        self._state = WriterState(expected_size)

    async def write(self, data: bytes) -> None:
        await self._admit(self._state, len(data))
        self._hasher.update(data)
        self._parts.append(bytes(data))

    async def close(self) -> B3Digest:
        if self._state.digest is None:
            self._state.check_complete()
            digest = B3Digest(self._hasher.digest())
            self._blobs.setdefault(digest, b"".join(self._parts))
            self._mtimes[digest] = time.time_ns()  # a re-put makes it young again (GC)
            self._parts = []
            self._state.digest = digest
        return self._state.digest

    async def abort(self) -> None:
        if self._state.digest is None:
            self._state.aborted = True
            self._parts = []

"""``memory://`` — directories in a dict, for tests and ephemeral use."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from nixcas.castore.digest import B3Digest
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.sizerule import DEFAULT_SIZE_RULE, SizeRule
from nixcas.castore.sweep import Deletion, StoredObject, delete_in_memory, scan_in_memory
from nixcas.config import Resolver, ServiceConfig
from nixcas.urls import MemoryUrlConfig

__all__ = ["MemoryDirectoryService", "MemoryDirectoryServiceConfig"]


@dataclass(frozen=True)
class MemoryDirectoryServiceConfig(MemoryUrlConfig, ServiceConfig[DirectoryService]):
    """``memory://`` (no host, path or options); composition: ``type = "memory"``."""

    async def build(self, resolver: Resolver) -> DirectoryService:
        return MemoryDirectoryService(resolver.size_rule or DEFAULT_SIZE_RULE)


class MemoryDirectoryService(DirectoryService):
    """Keeps canonical Directory bytes in process memory."""

    def __init__(self, size_rule: SizeRule = DEFAULT_SIZE_RULE) -> None:
        self.size_rule = size_rule
        self._data: dict[B3Digest, bytes] = {}
        self._mtimes: dict[B3Digest, int] = {}

    async def _get_raw(self, digest: B3Digest) -> bytes | None:
        return self._data.get(digest)

    async def _get_many_raw(self, digests: Sequence[B3Digest]) -> dict[B3Digest, bytes]:
        return {d: self._data[d] for d in digests if d in self._data}

    async def _put_raw(self, items: Sequence[tuple[B3Digest, bytes]]) -> None:
        now = time.time_ns()
        for digest, raw in items:
            self._data.setdefault(digest, raw)
            self._mtimes[digest] = now

    # -- garbage collection (nixcas.castore.sweep) ----------------------------------

    async def scan_directories(self) -> AsyncIterator[list[StoredObject]]:
        for batch in scan_in_memory(self._data, self._mtimes):
            yield batch

    async def delete_directories(self, objects: Sequence[StoredObject], cutoff_ns: int) -> Deletion:
        return delete_in_memory(self._data, self._mtimes, objects, cutoff_ns)

"""``memory://`` — directories in a dict, for tests and ephemeral use."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Self
from urllib.parse import SplitResult

from nixcas.castore.digest import B3Digest
from nixcas.castore.dirs.base import DirectoryService
from nixcas.config import Resolver, ServiceConfig
from nixcas.urls import require_bare_url

__all__ = ["MemoryDirectoryService", "MemoryDirectoryServiceConfig"]


@dataclass(frozen=True)
class MemoryDirectoryServiceConfig(ServiceConfig[DirectoryService]):
    """``memory://`` (no host, path or options); composition: ``type = "memory"``."""

    type_tag: ClassVar[str] = "memory"

    @classmethod
    def from_url(cls, url: SplitResult) -> Self:
        require_bare_url(url)
        return cls()

    async def build(self, resolver: Resolver) -> DirectoryService:
        return MemoryDirectoryService()


class MemoryDirectoryService(DirectoryService):
    """Keeps canonical Directory bytes in process memory."""

    def __init__(self) -> None:
        self._data: dict[B3Digest, bytes] = {}

    async def _get_raw(self, digest: B3Digest) -> bytes | None:
        return self._data.get(digest)

    async def _get_many_raw(self, digests: Sequence[B3Digest]) -> dict[B3Digest, bytes]:
        return {d: self._data[d] for d in digests if d in self._data}

    async def _put_raw(self, items: Sequence[tuple[B3Digest, bytes]]) -> None:
        for digest, raw in items:
            self._data.setdefault(digest, raw)

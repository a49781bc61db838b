"""``lru`` — an in-memory path info service holding the N most recently used records.

Meant as the *near* side of a ``cache`` in front of a remote (``nix+https://…``):
a bounded working set.  Composition: ``type = "lru"``, ``capacity = 1000``.
URL: ``lru://?capacity=N``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from nixcas._lru import LruBytes, LruConfig
from nixcas.config import Resolver, ServiceConfig
from nixcas.store.pathinfo.base import PathInfoService

__all__ = ["LruPathInfoService", "LruPathInfoServiceConfig"]


@dataclass(frozen=True)
class LruPathInfoServiceConfig(LruConfig, ServiceConfig[PathInfoService]):
    """``capacity``: how many records are kept (at least 1)."""

    async def build(self, resolver: Resolver) -> PathInfoService:
        return LruPathInfoService(self.capacity)


class LruPathInfoService(PathInfoService):
    """Up to ``capacity`` serialized records in memory; the least recently used go first."""

    def __init__(self, capacity: int) -> None:
        self._data: LruBytes[bytes] = LruBytes(capacity)
        self.capacity = capacity

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"LruPathInfoService(capacity={self.capacity})"

    async def _get_raw(self, digest: bytes) -> bytes | None:
        return self._data.recall(digest)

    async def _put_raw(self, digest: bytes, raw: bytes) -> None:
        self._data.remember(digest, raw)

    async def _list_raw(self) -> AsyncIterator[tuple[bytes, bytes]]:
        for item in list(self._data.items()):
            yield item

"""``lru`` — an in-memory directory service holding the most recently used N directories.

Meant as the *near* side of a ``cache``: a bounded working set in front of a
remote.  Evicting a directory can leave a closure incomplete; ``cache`` then
fetches it from far again.

Composition: ``type = "lru"``, ``capacity = 100000``.  URL: ``lru://?capacity=N``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from nixcas._lru import LruBytes, LruConfig
from nixcas.castore.digest import B3Digest
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.sizerule import DEFAULT_SIZE_RULE, SizeRule
from nixcas.config import Resolver, ServiceConfig

__all__ = ["LruDirectoryService", "LruDirectoryServiceConfig"]


@dataclass(frozen=True)
class LruDirectoryServiceConfig(LruConfig, ServiceConfig[DirectoryService]):
    """``capacity``: how many directories are kept (at least 1)."""

    async def build(self, resolver: Resolver) -> DirectoryService:
        return LruDirectoryService(self.capacity, resolver.size_rule or DEFAULT_SIZE_RULE)


class LruDirectoryService(DirectoryService):
    """Up to ``capacity`` directories in memory; the least recently used go first."""

    def __init__(self, capacity: int, size_rule: SizeRule = DEFAULT_SIZE_RULE) -> None:
        self.size_rule = size_rule
        self._data: LruBytes[B3Digest] = LruBytes(capacity)
        self.capacity = capacity

    def __len__(self) -> int:
        return len(self._data)

    async def _get_raw(self, digest: B3Digest) -> bytes | None:
        return self._data.recall(digest)

    async def _put_raw(self, items: Sequence[tuple[B3Digest, bytes]]) -> None:
        for digest, raw in items:
            self._data.remember(digest, raw)

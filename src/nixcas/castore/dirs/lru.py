"""``lru`` — an in-memory directory service holding the most recently used N directories.

Meant as the *near* side of a ``cache``: a bounded working set in front of a
remote.  Evicting a directory can leave a closure incomplete; ``cache`` then
fetches it from far again.

Composition: ``type = "lru"``, ``capacity = 100000``.  URL: ``lru://?capacity=N``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Self
from urllib.parse import SplitResult

from nixcas.castore.digest import B3Digest
from nixcas.castore.dirs.base import DirectoryService
from nixcas.config import Resolver, ServiceConfig
from nixcas.errors import ConfigurationError
from nixcas.urls import query_options, require_plain_scheme

__all__ = ["LruDirectoryService", "LruDirectoryServiceConfig"]


@dataclass(frozen=True)
class LruDirectoryServiceConfig(ServiceConfig[DirectoryService]):
    """``capacity``: how many directories are kept (at least 1)."""

    type_tag: ClassVar[str] = "lru"
    capacity: int

    @classmethod
    def from_url(cls, url: SplitResult) -> Self:
        require_plain_scheme(url)
        if url.netloc or url.path or url.fragment:
            raise ConfigurationError(f"{url.geturl()!r}: lru:// takes only ?capacity=N")
        options = query_options(url, {"capacity"})
        if "capacity" not in options:
            raise ConfigurationError(f"{url.geturl()!r}: missing capacity (write lru://?capacity=N)")
        try:
            capacity = int(options["capacity"])
        except ValueError:
            raise ConfigurationError(f"{url.geturl()!r}: capacity must be an integer") from None
        config = cls(capacity)
        config.validate(repr(url.geturl()))
        return config

    def validate(self, where: str) -> None:
        if self.capacity < 1:
            raise ConfigurationError(f"{where}: capacity must be at least 1")

    async def build(self, resolver: Resolver) -> DirectoryService:
        return LruDirectoryService(self.capacity)


class LruDirectoryService(DirectoryService):
    """Up to ``capacity`` directories in memory; the least recently used go first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ConfigurationError("lru capacity must be at least 1")
        self.capacity = capacity
        self._data: OrderedDict[B3Digest, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    async def _get_raw(self, digest: B3Digest) -> bytes | None:
        raw = self._data.get(digest)
        if raw is not None:
            self._data.move_to_end(digest)
        return raw

    async def _put_raw(self, items: Sequence[tuple[B3Digest, bytes]]) -> None:
        for digest, raw in items:
            self._data[digest] = raw
            self._data.move_to_end(digest)
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)

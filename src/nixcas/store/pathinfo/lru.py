"""``lru`` — an in-memory path info service holding the N most recently used records.

Meant as the *near* side of a ``cache`` in front of a remote (``nix+https://…``):
a bounded working set.  Composition: ``type = "lru"``, ``capacity = 1000``.
URL: ``lru://?capacity=N``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import ClassVar, Self
from urllib.parse import SplitResult

from nixcas.config import Resolver, ServiceConfig
from nixcas.errors import ConfigurationError
from nixcas.store.pathinfo.base import PathInfoService
from nixcas.urls import query_options, require_plain_scheme

__all__ = ["LruPathInfoService", "LruPathInfoServiceConfig"]


@dataclass(frozen=True)
class LruPathInfoServiceConfig(ServiceConfig[PathInfoService]):
    """``capacity``: how many records are kept (at least 1)."""

    type_tag: ClassVar[str] = "lru"
    capacity: int

    @classmethod
    def from_url(cls, url: SplitResult) -> Self:
        require_plain_scheme(url)
        if url.netloc or url.path or url.fragment:
            raise ConfigurationError(f"{url.geturl()!r}: lru:// takes only ?capacity=N")
        options = query_options(url, {"capacity"})
        try:
            config = cls(int(options["capacity"]))
        except KeyError:
            raise ConfigurationError(f"{url.geturl()!r}: missing capacity (write lru://?capacity=N)") from None
        except ValueError:
            raise ConfigurationError(f"{url.geturl()!r}: capacity must be an integer") from None
        config.validate(repr(url.geturl()))
        return config

    def validate(self, where: str) -> None:
        if self.capacity < 1:
            raise ConfigurationError(f"{where}: capacity must be at least 1")

    async def build(self, resolver: Resolver) -> PathInfoService:
        return LruPathInfoService(self.capacity)


class LruPathInfoService(PathInfoService):
    """Up to ``capacity`` serialized records in memory; the least recently used go first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ConfigurationError("lru capacity must be at least 1")
        self.capacity = capacity
        self._data: OrderedDict[bytes, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"LruPathInfoService(capacity={self.capacity})"

    async def _get_raw(self, digest: bytes) -> bytes | None:
        raw = self._data.get(digest)
        if raw is not None:
            self._data.move_to_end(digest)
        return raw

    async def _put_raw(self, digest: bytes, raw: bytes) -> None:
        self._data[digest] = raw
        self._data.move_to_end(digest)
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)

    async def _list_raw(self) -> AsyncIterator[tuple[bytes, bytes]]:
        for item in list(self._data.items()):
            yield item

"""``memory://`` — PathInfo records in a dict."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from nixcas.config import Resolver, ServiceConfig
from nixcas.store.pathinfo.base import PathInfoService
from nixcas.urls import MemoryUrlConfig

__all__ = ["MemoryPathInfoService", "MemoryPathInfoServiceConfig"]


@dataclass(frozen=True)
class MemoryPathInfoServiceConfig(MemoryUrlConfig, ServiceConfig[PathInfoService]):
    """``memory://`` (no host, path or options); composition: ``type = "memory"``."""

    async def build(self, resolver: Resolver) -> PathInfoService:
        return MemoryPathInfoService()


class MemoryPathInfoService(PathInfoService):
    """Keeps serialized PathInfo messages in process memory."""

    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}

    async def _get_raw(self, digest: bytes) -> bytes | None:
        return self._data.get(digest)

    async def _put_raw(self, digest: bytes, raw: bytes) -> None:
        self._data[digest] = raw

    async def _list_raw(self) -> AsyncIterator[tuple[bytes, bytes]]:
        for item in list(self._data.items()):
            yield item

    async def delete(self, digest: bytes) -> bool:
        """Remove the record of this store path digest; whether there was one."""
        return self._data.pop(digest, None) is not None

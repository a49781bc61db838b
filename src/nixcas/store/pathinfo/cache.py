"""``cache`` — a near path info service in front of a far one.

``get`` answers from *near*; otherwise it asks *far* and keeps the answer in
near, so the second lookup is local.  With a ``nix+https://…`` far side, far
has already ingested the NAR into its blob and directory services by then:
only the record travels.  Writes go to near; ``list`` lists near.

Composition::

    [pathinfoservices.root]
    type = "cache"
    near = "local"
    far = "upstream"

URL form: ``cache://?near=URL&far=URL`` (percent-encoded URLs or names).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import ClassVar

from nixcas._aio import NearFar
from nixcas.config import NearFarConfig, Resolver
from nixcas.ops import stats
from nixcas.store.nar.hashing import NarCalculationService
from nixcas.store.pathinfo.base import PathInfoService, PathInfoServiceWrapper
from nixcas.store.pathinfo.model import PathInfo

__all__ = ["CachePathInfoService", "CachePathInfoServiceConfig"]


@dataclass(frozen=True)
class CachePathInfoServiceConfig(NearFarConfig[PathInfoService]):
    """``near`` and ``far``: names (or URLs) of two path info services."""

    type_tag: ClassVar[str] = "cache"
    references: ClassVar[dict[str, str]] = {"near": "pathinfoservices", "far": "pathinfoservices"}

    async def build(self, resolver: Resolver) -> PathInfoService:
        near, far = await self.open_pair(resolver)
        return CachePathInfoService(near, far, close_inner=resolver.owns_instances)


class CachePathInfoService(NearFar[PathInfoService], PathInfoServiceWrapper):
    """Records come from near if there, else from far (and are then kept near)."""

    async def get(self, digest: bytes) -> PathInfo | None:
        found = await self.near.get(digest)
        stats.lookup("pathinfo", found is not None)
        if found is not None:
            return found
        with stats.upstream("pathinfo"):
            found = await self.far.get(digest)
        if found is not None:
            await self.near.put(found)
        return found

    async def put(self, info: PathInfo) -> PathInfo:
        return await self.near.put(info)

    async def list(self) -> AsyncIterator[PathInfo]:
        async for info in self.near.list():
            yield info

    def nar_calculation_service(self) -> NarCalculationService | None:
        return self.near.nar_calculation_service()

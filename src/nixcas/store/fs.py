"""The store's path infos as the root of a mount (``nixcas mount``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from nixcas.castore.nodes import Node
from nixcas.errors import StorePathError
from nixcas.store.pathinfo.base import PathInfoService
from nixcas.store.store_path import StorePath

__all__ = ["PathInfoRootNodes"]


class PathInfoRootNodes:
    """Store path basenames (``<hash>-<name>``) as root entries, each showing its path's root node.

    A name resolves only if it is the whole basename of a stored path: tvix
    looks up the hash part alone, so any name after a right hash would do.
    """

    def __init__(self, pathinfos: PathInfoService) -> None:
        self.pathinfos = pathinfos

    async def get_by_basename(self, name: bytes) -> Node | None:
        try:
            path = StorePath.from_basename(name)
        except StorePathError:
            return None
        info = await self.pathinfos.get(path.digest)
        if info is None or info.store_path != path:
            return None
        return info.node

    async def list(self) -> AsyncIterator[tuple[bytes, Node]]:
        async for info in self.pathinfos.list():
            yield info.store_path.basename.encode(), info.node

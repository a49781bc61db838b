"""``cache`` — a near directory service in front of a far one.

``get``/``get_recursive`` answer from *near* when it holds the whole closure;
otherwise the closure is fetched from *far*, checked root-to-leaves (every
directory announced by its parent, nothing missing), stored into near as one
validated leaves-first upload, and then served.  Writes go to near.

Composition::

    [directoryservices.root]
    type = "cache"
    near = "lru"
    far = "upstream"

URL form: ``cache://?near=URL&far=URL`` (percent-encoded URLs or names).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

from nixcas._aio import NearFar
from nixcas.castore.digest import B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.graph import RootToLeavesValidator, leaves_first
from nixcas.config import NearFarConfig, Resolver
from nixcas.errors import ConfigurationError, StorageError
from nixcas.ops import stats

__all__ = ["CacheDirectoryService", "CacheDirectoryServiceConfig"]


@dataclass(frozen=True)
class CacheDirectoryServiceConfig(NearFarConfig[DirectoryService]):
    """``near`` and ``far``: names (or URLs) of two directory services."""

    type_tag: ClassVar[str] = "cache"
    references: ClassVar[dict[str, str]] = {"near": "directoryservices", "far": "directoryservices"}

    async def build(self, resolver: Resolver) -> DirectoryService:
        near, far = await self.open_pair(resolver)
        return CacheDirectoryService(near, far, close_inner=resolver.owns_instances)


class CacheDirectoryService(NearFar[DirectoryService], DirectoryService):
    """Closures come from near if complete there, else from far (and are then kept near)."""

    rewritable = False  # convert far itself; near then refills from it

    def __init__(self, near: DirectoryService, far: DirectoryService, *, close_inner: bool = False) -> None:
        super().__init__(near, far, close_inner=close_inner)
        if near.size_rule != far.size_rule:
            if near.rule_recorded:
                raise ConfigurationError(
                    f"cache: near {near!r} follows the {near.size_rule} directory size rule, "
                    f"far {far!r} the {far.size_rule} rule"
                )
            near.size_rule = far.size_rule  # a memory or LRU cache holds whatever far holds
        self.size_rule = far.size_rule

    async def _near_closure(self, root: B3Digest) -> list[Directory] | None:
        """The closure from near, or ``None`` if near lacks any part of it (e.g. evicted)."""
        try:
            closure = [d async for d in self.near.get_recursive(root)]
        except StorageError:
            return None
        return closure or None

    async def _far_closure(self, root: B3Digest) -> list[Directory]:
        """The closure from far, validated and stored near; ``[]`` if far lacks the root."""
        validator = RootToLeavesValidator(root, self.size_rule)
        closure: list[Directory] = []
        with stats.upstream("directory"):
            async for directory in self.far.get_recursive(root):
                validator.add(directory)
                closure.append(directory)
        if not closure:
            return []
        validator.finish()
        async with self.near.put_multiple_start() as putter:
            for directory in leaves_first(closure):
                await putter.put(directory)
            await putter.close()
        return closure

    async def get(self, digest: B3Digest) -> Directory | None:
        found = await self.near.get(digest)
        stats.lookup("directory", found is not None)
        if found is not None:
            return found
        closure = await self._far_closure(digest)
        return closure[0] if closure else None

    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        closure = await self._near_closure(root)
        stats.lookup("directory", closure is not None)
        if closure is None:
            closure = await self._far_closure(root)
        for directory in closure:
            yield directory

    async def _get_raw(self, digest: B3Digest) -> bytes | None:
        found = await self.get(digest)
        return None if found is None else found.encode()

    async def _put_raw(self, items: Sequence[tuple[B3Digest, bytes]]) -> None:
        await self.near.put_validated(items)

"""NAR size and SHA-256 of castore nodes, with a cache.

:class:`NarCalculationService` is what PathInfo services and the gRPC
``CalculateNAR`` call need.  :class:`SimpleNarCalculationService` renders
locally and remembers results per node: a node names its content completely
(digests and sizes, executable bit, symlink target), so a result can never go
stale.  Concurrent requests for the same node share one rendering.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections import OrderedDict

from nixcas.castore.blob.base import BlobService
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.nodes import Node
from nixcas.store.nar.hasher import NarHasher
from nixcas.store.nar.render import BUFFER_BYTES, PREFETCH

__all__ = ["NarCalculationService", "NarHasher", "SimpleNarCalculationService"]


class NarCalculationService(ABC):
    """Computes the NAR size and SHA-256 of a castore node."""

    @abstractmethod
    async def calculate_nar(self, node: Node) -> tuple[int, bytes]:
        """``(nar_size, nar_sha256)`` of ``node``; the digest is 32 raw bytes."""


class SimpleNarCalculationService(NarCalculationService):
    """Renders nodes from a blob and a directory service and caches the results (LRU).

    ``cache_size`` results are kept (``0`` disables the cache; concurrent
    requests for one node are still computed once).  Failures are not cached.
    """

    def __init__(
        self,
        blobs: BlobService,
        directories: DirectoryService,
        *,
        cache_size: int = 10000,
        prefetch: int = PREFETCH,
        buffer_bytes: int = BUFFER_BYTES,
    ) -> None:
        self._blobs = blobs
        self._directories = directories
        self._cache_size = cache_size
        self._prefetch = prefetch
        self._buffer_bytes = buffer_bytes
        self._cache: OrderedDict[Node, tuple[int, bytes]] = OrderedDict()
        self._running: dict[Node, asyncio.Task[tuple[int, bytes]]] = {}

    async def calculate_nar(self, node: Node) -> tuple[int, bytes]:
        """``(nar_size, nar_sha256)``; from the cache, a running computation, or a new rendering."""
        cached = self._cache.get(node)
        if cached is not None:
            self._cache.move_to_end(node)
            return cached
        task = self._running.get(node)
        if task is None:
            task = asyncio.ensure_future(self._compute(node))
            self._running[node] = task
            task.add_done_callback(lambda t: self._finished(node, t))
        # shield: one caller giving up must not cancel the others' computation.
        return await asyncio.shield(task)

    async def _compute(self, node: Node) -> tuple[int, bytes]:
        from nixcas.store.nar.source import NarSource  # loaded by the first calculation, not by imports

        source = NarSource(
            node, self._blobs, self._directories, prefetch=self._prefetch, buffer_bytes=self._buffer_bytes
        )
        return await source.size_sha256()

    def _finished(self, node: Node, task: asyncio.Task[tuple[int, bytes]]) -> None:
        if self._running.get(node) is task:
            del self._running[node]
        if task.cancelled() or task.exception() is not None:  # exception() marks it retrieved
            return
        if self._cache_size > 0:
            self._cache[node] = task.result()
            self._cache.move_to_end(node)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def cache_info(self) -> tuple[int, int]:
        """``(cached results, computations running)``."""
        return len(self._cache), len(self._running)

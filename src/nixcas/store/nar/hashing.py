"""NAR size and SHA-256 of castore nodes, with a cache.

:class:`NarCalculationService` is what PathInfo services and the gRPC
``CalculateNAR`` call need.  :class:`SimpleNarCalculationService` renders
locally and remembers results per node: a node names its content completely
(digests and sizes, executable bit, symlink target), so a result can never go
stale.  Concurrent requests for the same node share one rendering.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from abc import ABC, abstractmethod
from collections import OrderedDict

import blake3

from nixcas.castore.blob.base import BlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.nodes import Node
from nixcas.errors import IngestError
from nixcas.store.nar.render import BUFFER_BYTES, PREFETCH, nar_size_sha256
from nixcas.store.nar.wire import (
    ENTRY_PREFIX,
    NAR_MAGIC,
    NODE_DIRECTORY,
    NODE_EXECUTABLE,
    NODE_REGULAR,
    NODE_SYMLINK,
    TOK_CLOSE,
    TOK_NODE,
    encode_str,
    padding,
    u64_le,
)

__all__ = ["NarCalculationService", "NarHasher", "SimpleNarCalculationService"]

_CLOSE2 = TOK_CLOSE + TOK_CLOSE
"""A node's ``)`` and that of the entry holding it."""

_READ_BLOCK = 1 << 20


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
        return await self.calculate_nar_from(node, self._blobs)

    async def calculate_nar_from(self, node: Node, blobs: BlobService) -> tuple[int, bytes]:
        """:meth:`calculate_nar`, reading blobs (if it must render) from ``blobs``, which must hold the same
        bytes by digest (an importer's source files, say); the result is cached as any other."""
        cached = self._cache.get(node)
        if cached is not None:
            self._cache.move_to_end(node)
            return cached
        if blobs is not self._blobs:
            # Not shared with other callers: its source may fail where the store would not.
            own = asyncio.ensure_future(self._compute(node, blobs))
            own.add_done_callback(lambda t: self._finished(node, t))
            return await own
        task = self._running.get(node)
        if task is None:
            task = asyncio.ensure_future(self._compute(node, blobs))
            self._running[node] = task
            task.add_done_callback(lambda t: self._finished(node, t))
        # shield: one caller giving up must not cancel the others' computation.
        return await asyncio.shield(task)

    async def _compute(self, node: Node, blobs: BlobService) -> tuple[int, bytes]:
        return await nar_size_sha256(
            node, blobs, self._directories, prefetch=self._prefetch, buffer_bytes=self._buffer_bytes
        )

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


class NarHasher:
    """A :class:`~nixcas.castore.ingest.WalkObserver` that hashes the NAR of the tree being imported.

    The walk presents the tree in NAR order, so the archive is hashed as it
    is read, from the very bytes that are imported: no second pass over the
    files, no read back from the store.  Small files arrive with their
    contents; large ones are read here in blocks (and their BLAKE3 returned,
    so the import fails if the stored file differs from what was hashed).
    """

    def __init__(self) -> None:
        self._sha = hashlib.sha256(NAR_MAGIC)
        self._size = len(NAR_MAGIC)
        self._depth = 0

    def _add(self, data: bytes) -> None:
        self._sha.update(data)
        self._size += len(data)

    def _entry(self, name: bytes | None) -> bytes:
        return b"" if name is None else ENTRY_PREFIX + encode_str(name) + TOK_NODE

    def directory(self, name: bytes | None) -> None:
        self._depth += 1
        self._add(self._entry(name) + NODE_DIRECTORY)

    def leave(self) -> None:
        # the directory's ")", and the ")" of the entry that holds it (the root has none)
        self._depth -= 1
        self._add(TOK_CLOSE if self._depth == 0 else _CLOSE2)

    def symlink(self, name: bytes | None, target: bytes) -> None:
        self._add(self._entry(name) + NODE_SYMLINK + encode_str(target) + (TOK_CLOSE if name is None else _CLOSE2))

    def file(
        self, name: bytes | None, executable: bool, size: int, data: bytes | None, fs_path: bytes
    ) -> B3Digest | None:
        head = self._entry(name) + (NODE_EXECUTABLE if executable else NODE_REGULAR) + u64_le(size)
        tail = padding(size) + (TOK_CLOSE if name is None else _CLOSE2)
        if data is not None:
            self._sha.update(head)
            self._sha.update(data)
            self._sha.update(tail)
            self._size += len(head) + size + len(tail)
            return None
        self._add(head)
        digest = self._read(size, fs_path)
        self._add(tail)
        return digest

    def _read(self, size: int, fs_path: bytes) -> B3Digest:
        where = os.fsdecode(fs_path)
        b3 = blake3.blake3()
        try:
            fd = os.open(fs_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as e:
            raise IngestError(f"{where}: cannot read: {e.strerror}") from None
        try:
            remaining = size
            while remaining > 0:
                block = os.read(fd, min(_READ_BLOCK, remaining))
                if not block:
                    raise IngestError(f"{where}: changed while being imported (ended after {size - remaining} bytes)")
                self._sha.update(block)
                b3.update(block)
                remaining -= len(block)
            if os.read(fd, 1):
                raise IngestError(f"{where}: changed while being imported (longer than {size} bytes)")
        except OSError as e:
            raise IngestError(f"{where}: cannot read: {e.strerror}") from None
        finally:
            os.close(fd)
        self._size += size
        return B3Digest(b3.digest())

    def result(self) -> tuple[int, bytes]:
        """``(nar_size, nar_sha256)`` of what was walked."""
        return self._size, self._sha.digest()

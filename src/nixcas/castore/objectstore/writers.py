"""The streaming blob writers: small blobs buffered, large ones cut into chunks as they arrive.

Both keep at most :data:`~.layout.SPILL_THRESHOLD` bytes in memory before
they start cutting (a small blob is then stored in one step at close), hash
the whole blob as it streams, store each chunk not stored yet, and publish
the index last; an aborted upload publishes nothing.

The common part is :class:`~.blobs.ChunkingWriter`; the two stores differ in how a chunk is kept:

* :class:`LocalBlobWriter` (local disk) stages chunks as temp files and
  renames them into place at close, refreshing the ages of what it relies on
  while it runs;
* :class:`ObjectStoreBlobWriter` (object storage) uploads chunks in the
  background, a bounded window at once, and checks at close that nothing it
  relied on has grown old enough to be collected.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import blake3

from nixcas._aio import to_thread_uninterrupted
from nixcas.castore.blob.base import (
    ChunkMeta,
)
from nixcas.castore.blob.chunking import (
    Chunker,
)
from nixcas.castore.digest import B3Digest
from nixcas.castore.objectstore.blobs import ChunkingWriter
from nixcas.castore.objectstore.disk import start_writeback
from nixcas.castore.objectstore.layout import (
    blob_index_key,
    chunk_key,
    encode_index,
)
from nixcas.errors import StorageError

if TYPE_CHECKING:
    from nixcas.castore.objectstore.diskblobs import LocalBlobService
    from nixcas.castore.objectstore.io import ObjectMeta
    from nixcas.castore.objectstore.remoteblobs import ObjectStoreBlobService

__all__ = ["KEEP_ALIVE_SECONDS", "PRIME_CHUNKS", "UPLOAD_WINDOW", "LocalBlobWriter", "ObjectStoreBlobWriter"]


def _b3(data: bytes | memoryview) -> bytes:
    return blake3.blake3(data).digest()


KEEP_ALIVE_SECONDS = 10.0
"""How often a long upload refreshes the ages of the chunks it staged or reuses (see GC in README)."""


class LocalBlobWriter(ChunkingWriter):
    """Buffers small blobs in memory; cuts larger ones into chunks staged as temp files.

    Up to :data:`SPILL_THRESHOLD` bytes stay in memory (a small blob is then
    stored in one step at close).  Past that, bytes go through a
    :class:`~nixcas.castore.blob.chunking.Chunker`; each final chunk that is
    not stored yet is compressed into a temp file under ``tmp/`` in a worker
    thread, so memory stays bounded by the chunker's buffer.  :meth:`close`
    renames the staged chunks into place and writes the index last;
    :meth:`abort` deletes them, so an abandoned upload leaves nothing.
    """

    def __init__(self, service: LocalBlobService, expected_size: int | None) -> None:
        super().__init__(service, expected_size)
        self._service = service
        self._staged: dict[B3Digest, str] = {}  # chunk digest -> its temp file
        self._reused: set[B3Digest] = set()  # chunks found stored: the index will refer to them
        self._kept_alive = time.monotonic()

    def _stage_sync(self, chunks: Sequence[bytes | memoryview]) -> None:
        service = self._service
        for data in chunks:
            digest = B3Digest(blake3.blake3(data).digest())
            self._chunks.append(ChunkMeta(digest, len(data)))
            if digest in self._staged or digest in self._reused:
                continue
            if service._refresh_chunk_sync(digest):  # stored already: refreshed so a running GC keeps it
                self._reused.add(digest)
                continue
            tmp_path, fd = service._new_temp()
            self._staged[digest] = tmp_path
            with contextlib.closing(os.fdopen(fd, "wb")) as f:
                f.write(service._compressor().compress(data))
                f.flush()
                start_writeback(fd)

    def _feed_sync(self, data: list[bytes]) -> None:
        if self._chunker is None:
            self._chunker = Chunker(self._service.avg_chunk_size)
        for block in data:
            self._hasher.update(block)
            self._stage_sync(self._chunker.feed(block))
        if time.monotonic() - self._kept_alive > KEEP_ALIVE_SECONDS:
            self._keep_alive_sync()

    def _keep_alive_sync(self) -> None:
        """Refresh what this upload has staged or reused, so GC finds it young however long the upload runs.

        GC deletes unreferenced objects (and stray temp files) older than its
        cutoff; until the index is written nothing refers to these chunks.
        """
        service = self._service
        for tmp_path in self._staged.values():
            if not service._refresh_sync(tmp_path):
                raise StorageError(f"{service}: a staged chunk of this upload was removed ({tmp_path}); retry")
        for digest in self._reused:
            if not service._refresh_chunk_sync(digest):
                raise StorageError(
                    f"{service}: chunk {digest.hex()} of this upload was deleted while it ran "
                    "(a gc with a grace period shorter than the upload?); nothing was written, retry"
                )
        self._kept_alive = time.monotonic()

    async def _feed(self, blocks: list[bytes]) -> None:
        await to_thread_uninterrupted(lambda: self._feed_sync(blocks))

    def _finish_sync(self) -> B3Digest:
        assert self._chunker is not None
        chunker, self._chunker = self._chunker, None
        self._stage_sync(chunker.finish())
        digest = B3Digest(self._hasher.digest())
        service = self._service
        self._keep_alive_sync()  # every chunk the index will list is present and young ...
        while self._staged:  # ... the new ones are published first ...
            chunk, tmp_path = self._staged.popitem()
            service._publish(tmp_path, service._chunk_path(chunk))
        service._dirty = True
        if len(self._chunks) == 1:  # ... then the index (one chunk: it is the blob; empty index)
            service._write_index(service._index_path(digest))
        else:
            service._put_index_sync(digest, self._chunks)
        return digest

    async def _finish(self) -> B3Digest:
        return await to_thread_uninterrupted(self._finish_sync)

    def _discard_sync(self) -> None:
        while self._staged:
            _, tmp_path = self._staged.popitem()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_path)

    async def _discard(self) -> None:
        await asyncio.to_thread(self._discard_sync)


UPLOAD_WINDOW = 8
"""Chunks a streaming writer keeps in flight (compressing or uploading) at once."""

PRIME_CHUNKS = 32
"""A streaming upload expected to cut at least this many chunks lists the chunk ranges first (if cheaper)."""


class ObjectStoreBlobWriter(ChunkingWriter):
    """Small blobs: buffered, stored in one step at close.  Large: chunks uploaded as they are cut.

    Past :data:`SPILL_THRESHOLD` bytes, data goes through a
    :class:`~nixcas.castore.blob.chunking.Chunker`; each chunk not stored yet
    (fresh) is compressed and uploaded in the background, at most
    :data:`UPLOAD_WINDOW` at once (a write waits for a slot, which bounds
    memory).  :meth:`close` waits for them all, then writes the index.  An
    aborted upload writes no index: its chunks stay invisible until GC frees
    them.
    """

    def __init__(self, service: ObjectStoreBlobService, expected_size: int | None) -> None:
        super().__init__(service, expected_size)
        self._service = service
        self._handled: set[B3Digest] = set()
        self._relied: list[ObjectMeta] = []  # chunks found stored (fresh), not written again
        self._uploads: set[asyncio.Task[None]] = set()

    async def _reap(self, limit: int) -> None:
        """Wait until at most ``limit`` uploads are in flight; raise the first upload error."""
        while self._uploads:
            done = {t for t in self._uploads if t.done()}
            for task in done:
                self._uploads.discard(task)
                task.result()
            if len(self._uploads) <= limit:
                return
            await asyncio.wait(self._uploads, return_when=asyncio.FIRST_COMPLETED)

    async def _upload(self, digest: B3Digest, data: bytes) -> None:
        service = self._service
        meta = (await service.presence.check([chunk_key(digest)]))[chunk_key(digest)]
        if meta is not None and service._fresh(meta):
            self._relied.append(meta)
        else:
            await service._put_chunk_data(digest, data)

    async def _take(self, pieces: Sequence[memoryview]) -> None:
        for piece in pieces:
            data = bytes(piece)
            digest = B3Digest(await asyncio.to_thread(_b3, data))
            self._chunks.append(ChunkMeta(digest, len(data)))
            if digest in self._handled:
                continue
            self._handled.add(digest)
            await self._reap(UPLOAD_WINDOW - 1)
            self._uploads.add(asyncio.ensure_future(self._upload(digest, data)))

    async def _feed(self, blocks: list[bytes]) -> None:
        if self._chunker is None:
            self._chunker = Chunker(self._service.avg_chunk_size)
            expected = self._state.expected_size
            if expected is not None and expected >= PRIME_CHUNKS * self._service.avg_chunk_size:
                await self._service.presence.prime("chunks", expected // self._service.avg_chunk_size)
        for block in blocks:
            self._hasher.update(block)
            await self._take(self._chunker.feed(block))

    async def _finish(self) -> B3Digest:
        assert self._chunker is not None
        service = self._service
        chunker, self._chunker = self._chunker, None
        await self._take(chunker.finish())
        await self._reap(0)
        digest = B3Digest(self._hasher.digest())
        stale = [m for m in self._relied if not service._still_safe(m)]
        if stale:
            raise StorageError(
                f"{service}: this upload took so long that chunk {stale[0].key} it found stored may "
                "be collected by now (see refresh_after); nothing was published, retry"
            )
        # One chunk: the chunk object (its digest is the blob's) is the blob, no index (see blob_object_key).
        if len(self._chunks) > 1 and not service._fresh(service.presence.cached(blob_index_key(digest))):
            await service._put_object(blob_index_key(digest), encode_index(self._chunks))
        return digest

    async def _discard(self) -> None:
        for task in self._uploads:
            task.cancel()
        for task in self._uploads:
            with contextlib.suppress(BaseException):
                await task
        self._uploads.clear()

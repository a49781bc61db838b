"""What the two blob stores of the layout share, written once; each store supplies the storage steps.

:class:`LayoutBlobService` is the :class:`~nixcas.castore.blob.base.BlobService`
and :class:`~nixcas.castore.blob.base.ChunkStore` of the snix layout: whole
blobs stored through :meth:`~LayoutBlobService._store_blobs`, chunks and
indexes checked before they are published, chunked blobs read chunk by chunk.
:class:`ChunkingWriter` is the streaming writer both stores use: up to
:data:`~.layout.SPILL_THRESHOLD` bytes buffered (then stored as a whole blob
at close), beyond that cut into chunks as they arrive, hashed as a whole,
the index published last, nothing published by an aborted upload.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import blake3

from nixcas.castore.blob.base import (
    BlobReader,
    BlobService,
    BlobWriter,
    BytesReader,
    ChunkMeta,
    ChunkStore,
    WriterState,
    check_chunk,
)
from nixcas.castore.blob.chunked import ChunkedReader
from nixcas.castore.blob.chunking import Chunker, check_chunk_list
from nixcas.castore.digest import EMPTY_DIGEST, B3Digest
from nixcas.castore.objectstore.layout import SPILL_THRESHOLD
from nixcas.errors import StorageError, ValidationError
from nixcas.ops import stats

__all__ = ["ChunkingWriter", "LayoutBlobService"]


class LayoutBlobService(BlobService, ChunkStore):
    """The blob service of the snix layout over one storage adapter (see the module docstring)."""

    stats_name: ClassVar[str]
    """The backend's label in the write statistics."""

    avg_chunk_size: int

    @abstractmethod
    async def _store_blobs(self, blobs: Sequence[bytes]) -> list[B3Digest]:
        """Store whole blobs (cut, chunks not stored yet, index last); their digests."""

    @abstractmethod
    async def _store_chunk(self, chunk: ChunkMeta, data: bytes) -> None:
        """Store one checked chunk unless it is stored (and may be relied on)."""

    @abstractmethod
    async def _publish_index(self, digest: B3Digest, chunks: Sequence[ChunkMeta]) -> None:
        """Publish the index of a checked chunk list whose chunks are all stored."""

    async def _store_written(self, data: bytes) -> B3Digest:
        """Store a small blob a writer buffered whole, at its close (see :class:`ChunkingWriter`)."""
        return (await self._store_blobs([data]))[0]

    async def put(self, data: bytes) -> B3Digest:
        digest = (await self._store_blobs([data]))[0]
        stats.written(self.stats_name, [len(data)])
        return digest

    async def put_many(self, blobs: Sequence[bytes]) -> list[B3Digest]:
        digests = await self._store_blobs(blobs)
        stats.written(self.stats_name, map(len, blobs))
        return digests

    async def put_chunk(self, chunk: ChunkMeta, data: bytes) -> None:
        check_chunk(chunk, data, "put_chunk")
        await self._store_chunk(chunk, data)

    async def put_index(self, digest: B3Digest, chunks: Sequence[ChunkMeta]) -> None:
        check_chunk_list(digest, chunks, "put_index")
        if len(chunks) < 2:
            raise ValidationError(f"put_index: blob {digest.hex()}: a chunk list needs at least two chunks")
        missing = await self.missing_chunks(chunks)  # present ones are refreshed: a running GC keeps them
        if missing:
            raise StorageError(f"{self}: index of {digest.hex()} refers to missing chunk {missing[0].digest.hex()}")
        await self._publish_index(digest, chunks)

    def _chunk_list_reader(self, digest: B3Digest, chunks: list[ChunkMeta] | None, window: int) -> BlobReader | None:
        """The reader of a blob by its chunk list (``None``: missing; ``[]``: an index without its chunk object)."""
        if chunks is None:
            return None
        if not chunks:
            if digest == EMPTY_DIGEST:
                return BytesReader(b"")
            raise StorageError(f"{self}: blob {digest.hex()}: index present but chunk object missing")
        return ChunkedReader(self._fetch_chunk, chunks, window_bytes=window)

    async def _fetch_chunk(self, chunk: ChunkMeta, offset: int = 0) -> bytes:
        data = await self.read_chunk(chunk)
        if data is None:
            raise StorageError(f"{self}: chunk {chunk.digest.hex()} not found")
        return data


class ChunkingWriter(BlobWriter, ABC):
    """The streaming writer of the layout (see the module docstring); stores supply the chunk steps."""

    def __init__(self, service: LayoutBlobService, expected_size: int | None) -> None:
        self._layout = service
        self._state = WriterState(expected_size)
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._hasher = blake3.blake3()
        self._chunker: Chunker | None = None
        self._chunks: list[ChunkMeta] = []

    @abstractmethod
    async def _feed(self, blocks: list[bytes]) -> None:
        """Hash ``blocks``, cut them (starting :attr:`_chunker` if needed) and store or stage the chunks."""

    @abstractmethod
    async def _finish(self) -> B3Digest:
        """After the last block: the last chunks, then the index; the blob's digest."""

    @abstractmethod
    async def _discard(self) -> None:
        """Drop what an aborted upload staged or has in flight."""

    async def write(self, data: bytes) -> None:
        await self._admit(self._state, len(data))
        if not data:
            return
        if self._chunker is None and self._buffered + len(data) <= SPILL_THRESHOLD:
            self._buffer.append(bytes(data))
            self._buffered += len(data)
            return
        pending, self._buffer, self._buffered = [*self._buffer, bytes(data)], [], 0
        try:
            await self._feed(pending)
        except BaseException:
            await self.abort()
            raise

    async def close(self) -> B3Digest:
        if self._state.digest is not None:
            return self._state.digest
        try:
            self._state.check_complete()
            if self._chunker is None:
                data, self._buffer = b"".join(self._buffer), []
                digest = await self._layout._store_written(data)
            else:
                digest = await self._finish()
        except BaseException:
            await self.abort()
            raise
        self._state.digest = digest
        stats.written(self._layout.stats_name, [self._state.written])
        return digest

    async def abort(self) -> None:
        if self._state.digest is None and not self._state.aborted:
            self._state.aborted = True
            self._buffer = []
            self._chunker = None
            await self._discard()

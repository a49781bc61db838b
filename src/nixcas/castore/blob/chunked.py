"""A seekable reader that stitches a blob together from its chunks."""

from __future__ import annotations

import bisect
import io
from collections.abc import Awaitable, Callable

from nixcas.castore.blob.base import BlobReader, ChunkMeta, resolve_seek
from nixcas.castore.digest import B3Digest
from nixcas.errors import StorageError

__all__ = ["ChunkedReader"]

OpenChunk = Callable[[B3Digest], Awaitable[BlobReader | None]]


class ChunkedReader(BlobReader):
    """Reads chunk after chunk; seeks find the chunk by binary search.

    Each chunk is opened through ``open_chunk`` (a verifying reader), read to
    its declared end and then probed for EOF, so a chunk that is longer or
    shorter than the index says, or that hashes wrong, fails the read.
    Seeking inside the current chunk reuses its reader.
    """

    def __init__(self, open_chunk: OpenChunk, chunks: list[ChunkMeta]) -> None:
        self._open_chunk = open_chunk
        self._chunks = chunks
        self._starts: list[int] = []
        total = 0
        for c in chunks:
            self._starts.append(total)
            total += c.size
        self._size = total
        self._pos = 0
        self._cur: tuple[int, BlobReader] | None = None

    @property
    def size(self) -> int:
        """Total blob size, from the chunk list."""
        return self._size

    async def _reader_for(self, index: int, offset: int) -> BlobReader:
        if self._cur is not None and self._cur[0] == index:
            reader = self._cur[1]
            if reader.tell() != offset:
                await reader.seek(offset)
            return reader
        await self._drop_current()
        chunk = self._chunks[index]
        opened = await self._open_chunk(chunk.digest)
        if opened is None:
            raise StorageError(f"chunk {chunk.digest.hex()} not found")
        if offset:
            await opened.seek(offset)
        self._cur = (index, opened)
        return opened

    async def _drop_current(self) -> None:
        if self._cur is not None:
            await self._cur[1].close()
            self._cur = None

    async def read(self, n: int = -1) -> bytes:
        if n < 0:
            return b"".join([b async for b in self.iter_blocks()])
        if n == 0 or self._pos >= self._size:
            return b""
        index = bisect.bisect_right(self._starts, self._pos) - 1
        chunk = self._chunks[index]
        offset = self._pos - self._starts[index]
        reader = await self._reader_for(index, offset)
        data = await reader.read(min(n, chunk.size - offset))
        if not data:
            raise StorageError(f"chunk {chunk.digest.hex()} is shorter than its declared size {chunk.size}")
        self._pos += len(data)
        if offset + len(data) == chunk.size and await reader.read(1):
            raise StorageError(f"chunk {chunk.digest.hex()} is longer than its declared size {chunk.size}")
        return data

    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = resolve_seek(self._pos, self._size, offset, whence)
        return self._pos

    def tell(self) -> int:
        return self._pos

    async def close(self) -> None:
        await self._drop_current()

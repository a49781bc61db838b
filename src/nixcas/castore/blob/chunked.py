"""A seekable reader that stitches a blob together from its chunks."""

from __future__ import annotations

import asyncio
import bisect
import io
from collections.abc import Awaitable, Callable, Sequence

from nixcas.castore.blob.base import BlobReader, ChunkMeta, resolve_seek

__all__ = ["ChunkedReader", "FetchChunk"]

FetchChunk = Callable[[ChunkMeta, int], Awaitable[bytes]]
"""Fetch one chunk (given with its offset in the blob): its bytes, checked against its size and digest
(raise if missing or wrong)."""


class ChunkedReader(BlobReader):
    """Reads a chunked blob one verified chunk at a time.

    ``fetch`` returns a chunk's whole bytes, checked (so nothing unverified
    is handed out at chunk granularity).  The reader keeps the current
    chunk: reads and seeks inside it cost nothing; a seek elsewhere finds the
    chunk by binary search over the chunk offsets (O(log n)).  While reading
    sequentially it keeps the following chunks in flight, as many as fit in
    ``window_bytes`` (by their declared sizes; 0 fetches on demand), and at
    most ``window_chunks`` chunks in flight (the one being read included) if
    given, so memory stays bounded by the current chunk plus that window.
    """

    def __init__(
        self,
        fetch: FetchChunk,
        chunks: Sequence[ChunkMeta],
        *,
        window_bytes: int = 0,
        window_chunks: int | None = None,
    ) -> None:
        self._fetch = fetch
        self._chunks = list(chunks)
        self._starts: list[int] = []
        total = 0
        for c in self._chunks:
            self._starts.append(total)
            total += c.size
        self._size = total
        self._window_bytes = window_bytes
        self._window_chunks = len(self._chunks) if window_chunks is None else max(1, window_chunks)
        self._pos = 0
        self._cur: tuple[int, memoryview] | None = None
        self._ahead: dict[int, asyncio.Future[bytes]] = {}

    @property
    def size(self) -> int:
        """Total blob size, from the chunk list."""
        return self._size

    def _cancel_ahead(self, keep: range) -> None:
        for index in [i for i in self._ahead if i not in keep]:
            task = self._ahead.pop(index)
            if task.done() and not task.cancelled():
                task.exception()  # a prefetch nobody will read: its error is dropped with it
            task.cancel()

    async def _chunk(self, index: int) -> memoryview:
        if self._cur is not None and self._cur[0] == index:
            return self._cur[1]
        sequential = self._cur is None or self._cur[0] + 1 == index
        self._cur = None
        end = index + 1
        budget = self._window_bytes if sequential else 0
        last = min(len(self._chunks), index + self._window_chunks)
        while end < last and budget >= self._chunks[end].size:
            budget -= self._chunks[end].size
            end += 1
        wanted = range(index, end)
        self._cancel_ahead(wanted)
        for i in wanted:
            if i not in self._ahead:
                self._ahead[i] = asyncio.ensure_future(self._fetch(self._chunks[i], self._starts[i]))
        data = memoryview(await self._ahead.pop(index))
        self._cur = (index, data)
        return data

    async def read(self, n: int = -1) -> bytes:
        if n < 0:
            return b"".join([b async for b in self.iter_blocks()])
        parts: list[memoryview] = []
        want = min(n, self._size - self._pos)
        while want > 0:  # across chunk ends, so callers get the n bytes they asked for
            index = bisect.bisect_right(self._starts, self._pos) - 1
            data = await self._chunk(index)
            offset = self._pos - self._starts[index]
            part = data[offset : offset + want]
            parts.append(part)
            self._pos += len(part)
            want -= len(part)
        return b"".join(parts)

    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = resolve_seek(self._pos, self._size, offset, whence)
        return self._pos

    def tell(self) -> int:
        return self._pos

    async def close(self) -> None:
        self._cur = None
        tasks = list(self._ahead.values())
        self._cancel_ahead(range(0))
        await asyncio.gather(*tasks, return_exceptions=True)

"""Positional reads over one blob reader, with read-ahead for sequential access.

The kernel asks a FUSE filesystem for ``(offset, size)`` pieces, usually
128 KiB at a time and sometimes a little out of order.  :class:`ReadAhead`
keeps a window of the blob in memory around the reader's position:

- a read inside the window is answered from memory;
- a read just past the window (within the read-ahead distance) extends it;
- a read anywhere else seeks the underlying reader (forward seeks skip
  without re-reading from the start; backward seeks restart the stream);
- after a sequential read, a background task keeps reading up to
  ``ahead`` bytes past the furthest byte asked for, so decompression,
  disk and network work overlap with the kernel's requests.

Only one coroutine at a time talks to the underlying reader (a lock, taken
per block), and the window never holds more than ``behind + ahead`` bytes
plus one block, so memory stays bounded per open file.  When a read reaches
the end of the blob, the reader is probed for EOF: a sequential read from
the start is thereby verified against the blob's digest, and a blob longer
than its recorded size is an error, before the last bytes are handed out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from nixcas.castore.blob.base import READ_BLOCK, BlobReader
from nixcas.errors import StorageError

__all__ = ["AHEAD", "BEHIND", "ReadAhead"]

AHEAD = 8 * READ_BLOCK
"""How far past the furthest byte asked for the background task reads (8 MiB)."""

BEHIND = READ_BLOCK
"""How much already-read data stays in the window for slightly out-of-order reads (1 MiB)."""


class ReadAhead:
    """``pread`` over a sequential-ish :class:`BlobReader` of a known size."""

    def __init__(
        self,
        reader: BlobReader,
        size: int,
        *,
        block: int = READ_BLOCK,
        ahead: int = AHEAD,
        behind: int = BEHIND,
        name: str = "blob",
    ) -> None:
        self._reader = reader
        self._size = size
        self._block = block
        self._ahead = ahead
        self._behind = behind
        self._name = name
        self._blocks: deque[bytes] = deque()
        """Full blocks of ``block`` bytes (the last one of the blob may be shorter) from ``_start`` on."""
        self._start = 0
        self._end = 0
        """Where the window ends; always the underlying reader's position."""
        self._furthest = 0
        """The end of the furthest read of the current sequential run."""
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._eof_error: BaseException | None = None
        self._eof_checked = False
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    def window(self) -> tuple[int, int]:
        """The byte range held in memory (for tests and diagnostics)."""
        return self._start, self._end

    async def pread(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``offset`` (fewer only at the end of the blob)."""
        if self._closed:
            raise StorageError(f"{self._name}: reader is closed")
        if offset < 0 or n < 0:
            raise ValueError(f"negative offset or size ({offset}, {n})")
        stop = min(self._size, offset + n)
        if offset >= stop:
            return b""
        sequential = self._start <= offset <= self._end + self._ahead
        data = self._take(offset, stop)
        if data is None:
            async with self._lock:
                first = True
                while (data := self._take(offset, stop)) is None:
                    continues = await self._position(offset)
                    sequential, first = (continues if first else sequential), False
                    if self._end < stop:
                        await self._read_block()
        if stop == self._size:
            await self._check_eof()
        self._furthest = max(self._furthest, stop) if sequential else stop
        self._trim(offset)
        if sequential:
            self._prefetch()
        return data

    # -- the window -------------------------------------------------------------

    def _take(self, start: int, stop: int) -> bytes | None:
        """Bytes ``[start, stop)`` if the window holds all of them."""
        if start < self._start or stop > self._end:
            return None
        first, skip = divmod(start - self._start, self._block)
        block = self._blocks[first]
        if skip + (stop - start) <= len(block):  # the usual case: one block
            return block[skip : skip + stop - start]
        parts = [memoryview(block)[skip:]]
        need = stop - start - len(parts[0])
        index = first + 1
        while need > 0:
            piece = memoryview(self._blocks[index])[:need]
            parts.append(piece)
            need -= len(piece)
            index += 1
        return b"".join(parts)

    def _trim(self, offset: int) -> None:
        """Drop whole blocks that end more than ``behind`` bytes before ``offset``."""
        keep_from = offset - self._behind
        while self._blocks and self._start + len(self._blocks[0]) <= keep_from:
            self._start += len(self._blocks.popleft())

    async def _position(self, offset: int) -> bool:
        """Make the window reach ``offset`` (lock held); whether the read continues the window."""
        if self._start <= offset <= self._end + self._ahead:
            return True
        await self._reader.seek(offset)
        self._blocks.clear()
        self._start = self._end = offset
        return False

    async def _read_block(self) -> None:
        """Append one block read from the underlying reader (lock held)."""
        want = min(self._block, self._size - self._end)
        parts: list[bytes] = []
        got = 0
        while got < want:
            data = await self._reader.read(want - got)
            if not data:
                raise StorageError(f"{self._name}: ended after {self._end + got} bytes, expected {self._size}")
            parts.append(data)
            got += len(data)
        self._blocks.append(parts[0] if len(parts) == 1 else b"".join(parts))
        self._end += got

    async def _check_eof(self) -> None:
        """Probe the reader at the end of the blob once (verifies a read from the start)."""
        if not self._eof_checked:
            async with self._lock:
                if not self._eof_checked and self._end == self._size:
                    try:
                        if await self._reader.read(1):
                            raise StorageError(f"{self._name}: longer than its recorded size {self._size}")
                    except Exception as e:
                        self._eof_error = e
                    self._eof_checked = True
        if self._eof_error is not None:
            raise self._eof_error

    # -- read-ahead -----------------------------------------------------------------

    def _prefetch(self) -> None:
        if self._closed or (self._task is not None and not self._task.done()):
            return
        if self._end < min(self._size, self._furthest + self._ahead):
            self._task = asyncio.create_task(self._read_ahead())

    async def _read_ahead(self) -> None:
        try:
            while not self._closed:
                async with self._lock:
                    if self._closed or self._end >= min(self._size, self._furthest + self._ahead):
                        break
                    await self._read_block()
            if self._end == self._size and not self._closed:
                await self._check_eof()
        except Exception:  # noqa: S110 - the read that needs these bytes retries and reports the error
            pass

    async def close(self) -> None:
        """Stop the read-ahead (after its current block) and close the reader."""
        if self._closed:
            return
        self._closed = True
        task = self._task
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), 10)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        async with self._lock:
            self._blocks.clear()
            await self._reader.close()

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
import bisect
import contextlib
from collections import deque
from collections.abc import Sequence

import blake3

from nixcas.castore.blob.base import READ_BLOCK, BlobReader, BlobService, ChunkMeta
from nixcas.castore.digest import B3Digest
from nixcas.errors import ChecksumMismatch, StorageError

__all__ = ["AHEAD", "BEHIND", "CHUNKS_AHEAD", "CHUNKS_BEHIND", "CHUNKS_PARALLEL", "ChunkedFile", "ReadAhead"]

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


CHUNKS_AHEAD = 16 * READ_BLOCK
"""How far past the furthest byte asked for :class:`ChunkedFile` keeps chunks fetched (16 MiB)."""

CHUNKS_BEHIND = 4 * READ_BLOCK
"""How much already-read data :class:`ChunkedFile` keeps for reads the kernel sends out of order (4 MiB)."""

CHUNKS_PARALLEL = 4
"""Chunk fetches of one :class:`ChunkedFile` in flight at once (each decompresses and hashes on a thread)."""


class ChunkedFile:
    """``pread`` over a chunked blob: chunks fetched and checked in parallel, the blob hashed whole on the side.

    Built from the blob's chunk list (:meth:`BlobService.chunks`).  Every
    chunk comes from :meth:`BlobService.read_chunk`, which checks it against
    its size and BLAKE3 before it returns (in a worker thread for the local
    store), so a read never hands out a byte of a chunk that did not verify:
    a damaged chunk fails exactly the reads that cover it.  While the reader
    goes forward, up to ``parallel`` chunk fetches run at once, up to
    ``ahead`` bytes past the furthest byte asked for; chunks more than
    ``behind`` bytes behind the reader are dropped (unless a read still
    waits on them), so memory stays bounded by the window.

    The chunk list itself is checked the way :class:`VerifyingReader` checks a
    stream: the chunks fetched in order from the first one are fed, in
    order, to one BLAKE3 hasher of the whole blob, on a worker thread and
    overlapped with serving; a read that reaches the end of the blob waits
    for that hash and fails unless it is the blob's digest (and every later
    read fails the same way).  A read that jumped over chunks leaves the
    whole-blob hash behind at the first chunk not read, as a seek does for
    :class:`VerifyingReader`; it resumes when that chunk is read.
    """

    def __init__(
        self,
        blobs: BlobService,
        digest: B3Digest,
        chunks: Sequence[ChunkMeta],
        *,
        ahead: int = CHUNKS_AHEAD,
        behind: int = CHUNKS_BEHIND,
        parallel: int = CHUNKS_PARALLEL,
        name: str = "blob",
    ) -> None:
        self._blobs = blobs
        self._digest = digest
        self._chunks = list(chunks)
        self._starts: list[int] = []
        total = 0
        for chunk in self._chunks:
            self._starts.append(total)
            total += chunk.size
        self._size = total
        self._ahead = ahead
        self._behind = behind
        self._name = name
        self._slots = asyncio.Semaphore(max(1, parallel))
        self._window: dict[int, asyncio.Future[bytes]] = {}
        """Chunk index -> its fetch (running or done): the chunks held around the reader."""
        self._pins: dict[int, int] = {}
        """Chunk index -> reads waiting on it (never dropped while pinned)."""
        self._furthest = 0
        """The end of the furthest read of the current sequential run."""
        self._hasher = blake3.blake3()
        self._queued = 0
        """Chunks handed to the whole-blob hash so far (always the first ones, in order)."""
        self._backlog: deque[bytes] = deque()
        self._hash_task: asyncio.Task[None] | None = None
        self._whole_error: StorageError | None = None
        self._whole_checked = False
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    def window(self) -> list[int]:
        """The chunk indexes held or being fetched (for tests and diagnostics)."""
        return sorted(self._window)

    async def pread(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``offset`` (fewer only at the end of the blob), every one verified."""
        if self._closed:
            raise StorageError(f"{self._name}: reader is closed")
        if offset < 0 or n < 0:
            raise ValueError(f"negative offset or size ({offset}, {n})")
        if self._whole_error is not None:
            raise self._whole_error
        stop = min(self._size, offset + n)
        if offset >= stop:
            return b""
        first, last = self._index(offset), self._index(stop - 1)
        if self._furthest - self._ahead <= offset <= self._furthest + self._ahead:
            self._furthest = max(self._furthest, stop)
            low = self._index(max(0, offset - self._behind))
            high = self._index(min(self._size, self._furthest + self._ahead) - 1)
        else:  # a jump: only what this read needs
            self._furthest = stop
            low, high = first, last
        self._trim(min(low, first), max(high, last))
        needed = [self._fetch(i) for i in range(first, last + 1)]
        for i in range(last + 1, high + 1):  # after the needed ones: the fetches start in this order
            self._fetch(i)
        for i in range(first, last + 1):
            self._pins[i] = self._pins.get(i, 0) + 1
        try:
            parts = [await fetch for fetch in needed]
        except Exception:
            for i, fetch in zip(range(first, last + 1), needed, strict=True):
                if fetch.done() and self._window.get(i) is fetch:
                    del self._window[i]  # the next read of it tries again
            raise
        finally:
            for i in range(first, last + 1):
                if (left := self._pins[i] - 1) > 0:
                    self._pins[i] = left
                else:
                    del self._pins[i]
        if stop == self._size:
            await self._check_whole()
        skip = offset - self._starts[first]
        if len(parts) == 1:
            return parts[0][skip : skip + stop - offset]
        views = [memoryview(p) for p in parts]
        views[0] = views[0][skip:]
        views[-1] = views[-1][: stop - self._starts[last]]
        return b"".join(views)

    def _index(self, offset: int) -> int:
        """The chunk holding byte ``offset``."""
        return bisect.bisect_right(self._starts, offset) - 1

    def _trim(self, low: int, high: int) -> None:
        """Drop (and stop fetching) the chunks outside ``[low, high]`` that no read waits on."""
        self._feed_hash()  # first, so nothing fetched in order is dropped before it is hashed
        for i in [i for i in self._window if (i < low or i > high) and i not in self._pins]:
            fetch = self._window.pop(i)
            if fetch.done():
                if not fetch.cancelled():
                    fetch.exception()  # fetched ahead and never read: its error goes with it
            else:
                fetch.cancel()

    def _fetch(self, i: int) -> asyncio.Future[bytes]:
        fetch = self._window.get(i)
        if fetch is None:
            fetch = self._window[i] = asyncio.ensure_future(self._read_chunk(i))
            fetch.add_done_callback(lambda _: self._feed_hash())
        return fetch

    async def _read_chunk(self, i: int) -> bytes:
        chunk = self._chunks[i]
        async with self._slots:
            data = await self._blobs.read_chunk(chunk)  # checked against the chunk's size and digest
        if data is None:
            raise StorageError(f"{self._name}: chunk {chunk.digest.hex()} at {self._starts[i]} not found")
        return data

    # -- the whole-blob hash ------------------------------------------------------------

    def _feed_hash(self) -> None:
        """Queue for the whole-blob hash every chunk fetched right after those already queued."""
        while (fetch := self._window.get(self._queued)) is not None and fetch.done():
            if fetch.cancelled() or fetch.exception() is not None:
                return
            self._backlog.append(fetch.result())
            self._queued += 1
        if self._backlog and (self._hash_task is None or self._hash_task.done()) and not self._closed:
            self._hash_task = asyncio.ensure_future(self._hash())

    async def _hash(self) -> None:
        while self._backlog:
            batch = list(self._backlog)
            self._backlog.clear()
            await asyncio.to_thread(self._hash_batch, batch)
        if self._queued == len(self._chunks) and not self._whole_checked:
            self._whole_checked = True
            got = B3Digest(self._hasher.digest())
            if got != self._digest:
                self._whole_error = ChecksumMismatch(f"{self._name}", self._digest.hex(), got.hex())

    def _hash_batch(self, batch: list[bytes]) -> None:
        for data in batch:
            self._hasher.update(data)

    async def _check_whole(self) -> None:
        """At the end of the blob: if it was read in order from the start, its digest must match (waits)."""
        if self._queued == len(self._chunks):
            while (task := self._hash_task) is not None and not task.done():
                await asyncio.shield(task)
        if self._whole_error is not None:
            raise self._whole_error

    async def close(self) -> None:
        """Stop every fetch and the whole-blob hash; drop what is held."""
        if self._closed:
            return
        self._closed = True
        fetches = list(self._window.values())
        self._window.clear()
        self._backlog.clear()
        for fetch in fetches:
            fetch.cancel()
        await asyncio.gather(*fetches, return_exceptions=True)
        if self._hash_task is not None:
            await asyncio.gather(self._hash_task, return_exceptions=True)

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
import threading
from collections import deque
from collections.abc import Callable, Sequence

import blake3

from nixcas.castore.blob.base import READ_BLOCK, BlobReader, BlobService, BulkReads, ChunkMeta
from nixcas.castore.blob.buffers import ReusedBuffers, chunk_room, read_in_rooms
from nixcas.castore.digest import B3Digest
from nixcas.errors import ChecksumMismatch, StorageError

__all__ = [
    "AHEAD",
    "BEHIND",
    "CHUNKS_AHEAD",
    "CHUNKS_BEHIND",
    "CHUNKS_PARALLEL",
    "CHUNKS_PARALLEL_LOCAL",
    "ChunkedFile",
    "InOrderHash",
    "ReadAhead",
]

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

    async def pread_pieces(self, offset: int, n: int) -> list[bytes | memoryview]:
        """:meth:`pread` as the pieces a reply is written from (one here)."""
        return [await self.pread(offset, n)]

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

CHUNKS_PARALLEL = 3
"""Groups of chunks one :class:`ChunkedFile` fetches at once from a store it waits on (a network's latency)."""

CHUNKS_PARALLEL_LOCAL = 2
"""The same for a store read on this machine's threads (:class:`BulkReads`): as many as a small machine has
cores; a third adds CPU (the threads take turns) and no speed (BENCHMARKS.md, FUSE run L)."""

CHUNKS_GROUP = 2 * READ_BLOCK
"""Consecutive chunks :class:`ChunkedFile` fetches together, in one :meth:`BlobService.read_many` (2 MiB)."""

_GROUP_BUFFERS = ReusedBuffers(32 << 20)
"""The buffers groups are read into by a store with :class:`BulkReads` (every open file of the process)."""


class ChunkedFile:
    """``pread`` over a chunked blob: chunks fetched and checked in parallel, the blob hashed whole on the side.

    Built from the blob's chunk list (:meth:`BlobService.chunks`).  Chunks
    are fetched in groups of consecutive ones (about ``group`` bytes) with
    one :meth:`BlobService.read_many` each, which checks every chunk against
    its BLAKE3 before it returns; a store with :class:`BulkReads` (the
    embedded one) reads a group on one worker thread instead, each chunk
    object into a buffer reused once no reply refers to it
    (:meth:`BulkReads.read_chunk_into`, checked the same way);
    a chunk of the wrong size, a missing one, or any failure of the group
    sends that group's chunks through :meth:`BlobService.read_chunk` one by
    one, so a read never hands out a byte of a chunk that did not verify and
    a damaged chunk fails exactly the reads that cover it.  While the reader
    goes forward, up to ``parallel`` groups are fetched at once (by default
    :data:`CHUNKS_PARALLEL_LOCAL` with :class:`BulkReads`, else
    :data:`CHUNKS_PARALLEL`), up to
    ``ahead`` bytes past the furthest byte asked for; groups more than
    ``behind`` bytes behind the reader are dropped (unless a read still waits
    on them), so memory stays bounded by the window.

    The chunk list itself is checked the way :class:`VerifyingReader` checks a
    stream: the groups fetched in order from the first one are fed, in
    order, to one BLAKE3 hasher of the whole blob (:class:`InOrderHash`), by
    the worker thread that read each group, right after reading it (its bytes
    still in the CPU's cache), overlapped with serving; a read that reaches
    the end of the blob waits for that hash (and for the groups before it
    still on their way) and fails unless it is the blob's digest; once the
    whole blob hashed to another digest, every read fails.  A read that
    jumped over chunks leaves the whole-blob hash behind at the first group
    not read, as a seek does for :class:`VerifyingReader`; it resumes when
    that group is read.
    """

    def __init__(
        self,
        blobs: BlobService,
        digest: B3Digest,
        chunks: Sequence[ChunkMeta],
        *,
        ahead: int = CHUNKS_AHEAD,
        behind: int = CHUNKS_BEHIND,
        parallel: int | None = None,
        group: int = CHUNKS_GROUP,
        name: str = "blob",
    ) -> None:
        self._blobs = blobs
        self._reads = blobs.bulk_reads()
        if parallel is None:
            parallel = CHUNKS_PARALLEL if self._reads is None else CHUNKS_PARALLEL_LOCAL
        self._digest = digest
        self._chunks = list(chunks)
        self._starts: list[int] = []
        """Where each chunk starts in the blob."""
        self._groups: list[int] = []
        """The first chunk of each group."""
        total = filled = 0
        for i, chunk in enumerate(self._chunks):
            if not self._groups or filled >= group:
                self._groups.append(i)
                filled = 0
            self._starts.append(total)
            total += chunk.size
            filled += chunk.size
        self._group_starts = [self._starts[i] for i in self._groups]
        self._size = total
        self._ahead = ahead
        self._behind = behind
        self._name = name
        self._slots = asyncio.Semaphore(max(1, parallel))
        self._window: dict[int, asyncio.Future[list[bytes | memoryview | Exception]]] = {}
        """Group index -> its fetch (running or done): the groups held around the reader."""
        self._pins: dict[int, int] = {}
        """Group index -> reads waiting on it (never dropped while pinned)."""
        self._furthest = 0
        """The end of the furthest read of the current sequential run."""
        self._whole = InOrderHash(bytes(digest), len(self._groups))
        self._whole_error: StorageError | None = None
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    def window(self) -> list[int]:
        """The chunk indexes held or being fetched (for tests and diagnostics)."""
        return [i for g in sorted(self._window) for i in range(*self._group_chunks(g))]

    async def pread(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``offset`` (fewer only at the end of the blob), every one verified."""
        pieces = await self.pread_pieces(offset, n)
        return bytes(pieces[0]) if len(pieces) == 1 else b"".join(pieces)

    async def pread_pieces(self, offset: int, n: int) -> list[bytes | memoryview]:
        """:meth:`pread` as pieces of the chunks that hold the bytes (views, not copies), in order."""
        if self._closed:
            raise StorageError(f"{self._name}: reader is closed")
        if offset < 0 or n < 0:
            raise ValueError(f"negative offset or size ({offset}, {n})")
        self._raise_whole_error()
        stop = min(self._size, offset + n)
        if offset >= stop:
            return []
        first, last = self._group(offset), self._group(stop - 1)
        if self._furthest - self._ahead <= offset <= self._furthest + self._ahead:
            self._furthest = max(self._furthest, stop)
            low = self._group(max(0, offset - self._behind))
            high = self._group(min(self._size, self._furthest + self._ahead) - 1)
        else:  # a jump: only what this read needs
            self._furthest = stop
            low, high = first, last
        self._trim(min(low, first), max(high, last))
        needed = [self._fetch(g) for g in range(first, last + 1)]
        for g in range(last + 1, high + 1):  # after the needed ones: the fetches start in this order
            self._fetch(g)
        for g in range(first, last + 1):
            self._pins[g] = self._pins.get(g, 0) + 1
        try:
            groups = [await fetch for fetch in needed]
        finally:
            for g in range(first, last + 1):
                if (left := self._pins[g] - 1) > 0:
                    self._pins[g] = left
                else:
                    del self._pins[g]
        lo, hi = self._index(offset), self._index(stop - 1)
        parts: list[bytes | memoryview] = []
        for g, fetched in zip(range(first, last + 1), groups, strict=True):
            base = self._groups[g]
            for i in range(max(lo, base), min(hi + 1, base + len(fetched))):
                part = fetched[i - base]
                if isinstance(part, Exception):
                    if self._window.get(g) is needed[g - first]:
                        del self._window[g]  # the next read of it tries again
                    raise part
                parts.append(part)
        if stop == self._size:
            await self._check_whole()
        skip = offset - self._starts[lo]
        views: list[bytes | memoryview] = [memoryview(p) for p in parts]
        if len(views) == 1:
            return [views[0][skip : skip + stop - offset]]
        views[0] = views[0][skip:]
        views[-1] = views[-1][: stop - self._starts[hi]]
        return views

    def _index(self, offset: int) -> int:
        """The chunk holding byte ``offset``."""
        return bisect.bisect_right(self._starts, offset) - 1

    def _group(self, offset: int) -> int:
        """The group holding byte ``offset``."""
        return bisect.bisect_right(self._group_starts, offset) - 1

    def _group_chunks(self, g: int) -> tuple[int, int]:
        """The chunk indexes of group ``g``: ``range(*_group_chunks(g))``."""
        return self._groups[g], self._groups[g + 1] if g + 1 < len(self._groups) else len(self._chunks)

    def _trim(self, low: int, high: int) -> None:
        """Drop (and stop fetching) the groups outside ``[low, high]`` that no read waits on."""
        for g in [g for g in self._window if (g < low or g > high) and g not in self._pins]:
            fetch = self._window.pop(g)
            if fetch.done():
                if not fetch.cancelled():
                    fetch.exception()  # fetched ahead and never read: its error goes with it
            else:
                fetch.cancel()
        self._whole.let_go(self._window.__contains__)

    def _fetch(self, g: int) -> asyncio.Future[list[bytes | memoryview | Exception]]:
        fetch = self._window.get(g)
        if fetch is None:
            fetch = self._window[g] = asyncio.ensure_future(self._read_group(g))
        return fetch

    async def _read_group(self, g: int) -> list[bytes | memoryview | Exception]:
        """The chunks of group ``g``, each checked against its digest, or the error that stopped it.

        A group read whole is offered to the whole-blob hash by the thread that read it, right away.
        """
        chunks = self._chunks[slice(*self._group_chunks(g))]
        async with self._slots:
            if self._reads is not None:
                read = await asyncio.to_thread(_read_chunks, self._reads, chunks, self._whole, g)
                if read is not None:
                    return list(read)
            try:  # every chunk is a blob by itself: read_many checks each against its digest
                found = await self._blobs.read_many({c.digest: c.size for c in chunks})
                if all(len(found.get(c.digest, b"")) == c.size for c in chunks):
                    pieces: list[bytes | memoryview] = [found[c.digest] for c in chunks]
                    await asyncio.to_thread(self._whole.offer, g, pieces)
                    return list(pieces)
            except Exception:  # noqa: S110 - one by one below, to tell which chunk is wrong
                pass
            out: list[bytes | memoryview | Exception] = []
            for i, chunk in enumerate(chunks, self._groups[g]):
                try:
                    data = await self._blobs.read_chunk(chunk)  # checked against its size and digest
                    if data is None:
                        raise StorageError(f"{self._name}: chunk {chunk.digest.hex()} at {self._starts[i]} not found")
                    out.append(data)
                except Exception as e:
                    out.append(e)
            if not any(isinstance(c, Exception) for c in out):
                await asyncio.to_thread(self._whole.offer, g, [c for c in out if not isinstance(c, Exception)])
            return out

    # -- the whole-blob hash ------------------------------------------------------------

    async def _check_whole(self) -> None:
        """At the end of the blob: if it was read in order from the start, its digest must match (waits).

        Reads of one file arrive concurrently, so the groups between the
        whole-blob hash and the end may still be on their way: while they are
        all held, wait for them (each is offered to the hash by the thread that
        read it), then for the hash.  A gap (a group never fetched, or dropped
        after a jump) means the blob was not read in order; only its chunks are
        checked.
        """
        g = self._whole.position
        while g < len(self._groups):
            fetch = self._window.get(g)
            if fetch is None:
                break
            await asyncio.wait([fetch])
            if fetch.cancelled() or fetch.exception() is not None:
                break
            g += 1
        if g == len(self._groups) and not self._whole.finished:
            await asyncio.to_thread(self._whole.settle)
        self._raise_whole_error()

    def _raise_whole_error(self) -> None:
        """Once the whole blob hashed to another digest, every read fails."""
        if self._whole_error is None and (got := self._whole.mismatch) is not None:
            self._whole_error = ChecksumMismatch(f"{self._name}", self._digest.hex(), got)
        if self._whole_error is not None:
            raise self._whole_error

    async def close(self) -> None:
        """Stop every fetch and the whole-blob hash; drop what is held."""
        if self._closed:
            return
        self._closed = True
        fetches = list(self._window.values())
        self._window.clear()
        self._whole.close()
        for fetch in fetches:
            fetch.cancel()
        await asyncio.gather(*fetches, return_exceptions=True)


def _read_chunks(
    reads: BulkReads, chunks: Sequence[ChunkMeta], whole: InOrderHash, g: int
) -> list[bytes | memoryview] | None:
    """Each chunk read and checked into one reused buffer (views of it), then offered to the whole-blob hash as
    group ``g``; ``None`` if one cannot be (the caller then reads the group through the async API, which tells
    which chunk is wrong and why)."""
    if len(chunks) > 1:  # from the disk at once, if they must be
        reads.will_read_chunks([bytes(c.digest) for c in chunks[1:]])
    buffer = _GROUP_BUFFERS.take(sum(chunk_room(c.size) for c in chunks))
    try:
        pieces = read_in_rooms(reads, chunks, buffer)
        if len(pieces) != len(chunks) or any(len(p) != c.size for p, c in zip(pieces, chunks, strict=True)):
            return None
    finally:
        _GROUP_BUFFERS.give(buffer)  # taken again only once no view of it is alive
    whole.offer(g, pieces)
    return pieces


class InOrderHash:
    """The BLAKE3 of a whole blob, fed its groups of chunks in order by whichever threads read them.

    The first thread that offers the next group hashes it, and every group
    waiting after it, while the others only leave theirs: no thread ever
    waits for another, and a group is hashed right after it was read, while
    its bytes are still in the CPU's cache.  Once all ``groups`` are hashed,
    :attr:`finished` is true and :attr:`mismatch` the hex digest found if it
    is not ``expected``.

    Nothing offered is let go while the hash can still go on, so a blob read
    in order is always hashed whole; groups that wait behind a gap (a jump
    left the next group unread) are let go with the window that held them
    (:meth:`let_go`).  The thread that hashes hands back the group it read only
    once nothing is left waiting, so a reader going in order is never more
    than the groups being read ahead of the hash, and what waits stays within
    the window.
    """

    def __init__(self, expected: bytes, groups: int) -> None:
        self._expected = expected
        self._groups = groups
        self._hasher = blake3.blake3()
        self._cond = threading.Condition()
        self._waiting: dict[int, Sequence[bytes | memoryview]] = {}
        self._busy = False
        self._closed = False
        self.position = 0
        """Groups hashed so far (always the first ones)."""
        self.mismatch: str | None = None
        """The whole blob's BLAKE3 (hex), once every group is hashed, if it is not the expected one."""

    @property
    def finished(self) -> bool:
        return self.position == self._groups

    def offer(self, g: int, pieces: Sequence[bytes | memoryview]) -> None:
        """Group ``g``'s verified chunks; hashed now if it is the next group (and those waiting after it)."""
        with self._cond:
            if self._closed or g < self.position or g in self._waiting:
                return
            self._waiting[g] = pieces
            if self._busy:
                return  # the thread hashing now takes it too
            self._busy = True
        try:
            while True:
                with self._cond:
                    batch = None if self._closed else self._waiting.pop(self.position, None)
                    if batch is None:  # no longer hashing, in the same locked step: a group offered next finds none
                        self._busy = False
                        self._cond.notify_all()
                        return
                for data in batch:
                    self._hasher.update(data)
                with self._cond:
                    self.position += 1
                    if self.position == self._groups and (got := self._hasher.digest()) != self._expected:
                        self.mismatch = got.hex()
        except BaseException:  # an error: no longer hashing either
            with self._cond:
                self._busy = False
                self._cond.notify_all()
            raise

    def let_go(self, held: Callable[[int], bool]) -> None:
        """Let waiting groups go that are no longer ``held``, if the hash is stuck: the next group is neither
        being hashed, nor waiting, nor held (being read, or read) by the caller."""
        with self._cond:
            if self._busy or self.position in self._waiting or held(self.position):
                return
            for g in [g for g in self._waiting if not held(g)]:
                del self._waiting[g]

    def settle(self) -> None:
        """Wait until no thread is hashing (blocking: from a worker thread)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._busy)

    def close(self) -> None:
        """Stop hashing and let every waiting group go."""
        with self._cond:
            self._closed = True
            self._waiting.clear()

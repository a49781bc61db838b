"""Rendering castore nodes as NAR streams, with blob reads prefetched ahead of the writer.

The directory closure is fetched once (``get_recursive``) and turned into a
plan of framing bytes and blob holes (:mod:`nixcas.store.nar.plan`).  The
renderer walks that plan with a bounded *window* of work in flight:

* at most ``prefetch`` *fetches* are in flight or held at a time (the one
  being written included).  A fetch is one file, or a *batch*: up to
  ``batch_files`` consecutive small files (and the framing between them),
  read with one :meth:`~nixcas.castore.blob.base.BlobService.read_many` call
  (one worker-thread round trip on ``objectstore+file``; backends that read
  blob by blob read at most ``prefetch`` of a batch's blobs at a time).
  At most :data:`BATCHES` of the fetches are batches, so at most
  ``prefetch`` blob readers of big files plus ``BATCHES * prefetch`` reads
  of small ones are open at once;
* files up to ``min(SMALL_FILE, buffer_bytes // 4)`` go into batches of at
  most ``min(BATCH_BYTES, buffer_bytes)`` bytes; files up to a quarter of
  ``buffer_bytes`` are read whole ahead of time, one reader each; all of it
  as long as the bytes held by the window stay within ``buffer_bytes``;
* bigger files get their reader opened and their first block read ahead;
  the rest streams block by block (one block read ahead) when the writer
  reaches them, so no file is ever held whole in memory.

Peak memory is about ``buffer_bytes`` plus two blocks plus one output chunk.
Every blob must yield exactly the size its file node declares; a short blob,
a long blob, a missing blob or a missing directory raise errors that name the
digest and the file's path inside the NAR.  Errors surface in stream order:
when a batch read fails, or leaves a blob out (missing, or larger than
declared), the writer reads that batch's files one by one through the
per-file path, which raises the same error the file would raise alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from nixcas.castore.blob.base import BlobReader, BlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.nodes import Node
from nixcas.store.nar.plan import Closure, Hole, fetch_closure, iter_plan, plan_size

__all__ = [
    "BATCHES",
    "BATCH_BYTES",
    "BATCH_FILES",
    "BLOCK",
    "BUFFER_BYTES",
    "OUTPUT_CHUNK",
    "PREFETCH",
    "SMALL_FILE",
    "file_contents",
    "nar_size",
    "nar_size_sha256",
    "render_nar",
    "write_nar",
]

log = logging.getLogger(__name__)

PREFETCH = 8
"""Default number of fetches (files, or batches of small files) in flight."""
BUFFER_BYTES = 64 << 20
"""Default byte budget of the prefetch window."""
BLOCK = 1 << 20
"""Block size for reading big blobs."""
OUTPUT_CHUNK = 128 << 10
"""Small pieces (framing, small files) are coalesced into output chunks of at least this size."""
SMALL_FILE = 1 << 20
"""Files up to this size (and a quarter of the buffer) are fetched in batches."""
BATCH_FILES = 64
"""Default number of files in one batch (one ``read_many`` call)."""
BATCH_BYTES = 16 << 20
"""Largest batch in bytes (file contents plus the framing between them)."""
BATCHES = 2
"""Batches in the window at once: one being written, one being read.

More only adds contention: a local batch is CPU work in a worker thread
(open, unzstd, BLAKE3 of every file), and on two cores a third or fourth
concurrent batch made rendering many small files slower (0.44 s with 2,
0.58 s with up to 8 for the small tree of ``bench/nar.py``); backends that
read blob by blob already read ``prefetch`` blobs of a batch at a time.
"""


@dataclass(slots=True)
class _Fetch:
    """A file in the window: its hole, the task fetching it, and what it costs in the budget."""

    hole: Hole
    cost: int
    streamed: bool
    task: asyncio.Future[list[bytes]] | None = None
    reader: BlobReader | None = None
    pending: asyncio.Future[bytes] | None = None


@dataclass(slots=True)
class _Batch:
    """Consecutive small files in the window: framing and holes in order, fetched by one ``read_many``."""

    parts: list[bytes | Hole] = field(default_factory=list)
    sizes: dict[B3Digest, int] = field(default_factory=dict)
    """The digests to read, each with the largest size a hole of the batch declares."""
    holes: int = 0
    cost: int = 0
    task: asyncio.Future[dict[B3Digest, bytes]] | None = None

    def add(self, item: bytes | Hole) -> None:
        self.parts.append(item)
        if isinstance(item, bytes):
            self.cost += len(item)
            return
        self.holes += 1
        self.cost += item.size
        if item.size > self.sizes.get(item.digest, -1):
            self.sizes[item.digest] = item.size


async def _batch_parts(blobs: BlobService, batch: _Batch) -> AsyncGenerator[bytes, None]:
    """A batch's framing and file contents, in order, each file exactly its declared size.

    A blob the batch read left out (missing, or longer than declared), and
    every file of a batch whose read failed, is read again alone through
    :func:`_fetch_whole`, which raises the precise error (in stream order).
    """
    assert batch.task is not None
    found: dict[B3Digest, bytes] | None = None
    failure: Exception | None = None
    try:
        found = await batch.task
    except Exception as e:  # e.g. a corrupt blob: find (in order) the first file that fails alone
        failure = e
    if found is not None and len(found) == len(batch.sizes):
        # The common case: every blob is here.  One joined piece for the whole batch
        # (sizes are checked as they are placed), instead of a piece per file.
        joined = _join_batch(batch, found)
        if joined is not None:
            yield joined
            return
    for part in batch.parts:
        if isinstance(part, bytes):
            yield part
            continue
        data = None if found is None else found.get(part.digest)
        if data is None:
            for piece in await _fetch_whole(blobs, part):
                yield piece
        elif len(data) == part.size:
            yield data
        elif len(data) < part.size:  # verified: the blob really is shorter
            raise part.short(len(data))
        else:  # verified, and longer (another hole of the batch declares it bigger)
            raise part.long()
    if failure is not None:  # yet every file read fine alone
        log.warning("reading %d files in one batch failed (%s); they were read one by one", batch.holes, failure)


def _join_batch(batch: _Batch, found: dict[B3Digest, bytes]) -> bytes | None:
    """The batch's bytes in one piece; ``None`` if a blob's size differs from its hole's (the slow path reports it)."""
    pieces: list[bytes] = []
    for part in batch.parts:
        if isinstance(part, bytes):
            pieces.append(part)
            continue
        data = found[part.digest]
        if len(data) != part.size:
            return None
        pieces.append(data)
    return b"".join(pieces)


async def _open(blobs: BlobService, hole: Hole) -> BlobReader:
    reader = await blobs.open_read(hole.digest)
    if reader is None:
        raise hole.missing()
    return reader


async def _read_exact_end(reader: BlobReader, hole: Hole) -> None:
    """At the declared end: the blob must be exhausted (this also completes verification)."""
    if await reader.read(1):
        raise hole.long()


async def _fetch_whole(blobs: BlobService, hole: Hole) -> list[bytes]:
    """A small file's contents, exactly ``hole.size`` bytes."""
    reader = await _open(blobs, hole)
    async with reader:
        parts: list[bytes] = []
        got = 0
        while got < hole.size:
            data = await reader.read(hole.size - got)
            if not data:
                raise hole.short(got)
            got += len(data)
            if got > hole.size:
                raise hole.long()
            parts.append(data)
        await _read_exact_end(reader, hole)
    return parts


async def _fetch_head(blobs: BlobService, fetch: _Fetch) -> list[bytes]:
    """Open a big file's reader (kept in ``fetch``) and read its first block."""
    hole = fetch.hole
    reader = await _open(blobs, hole)
    fetch.reader = reader  # closed by whoever finishes or abandons the fetch
    first = await reader.read(min(BLOCK, hole.size))
    if not first:
        raise hole.short(0)
    if len(first) > hole.size:
        raise hole.long()
    return [first]


class _Output:
    """Coalesces pieces into output chunks of at least :data:`OUTPUT_CHUNK` bytes.

    A big piece passes through uncopied when nothing is pending (the common
    case for blocks of big files); otherwise it is joined to the pending bytes.
    """

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._len = 0

    def push(self, piece: bytes) -> Iterator[bytes]:
        if len(piece) >= OUTPUT_CHUNK and not self._parts:
            yield piece
            return
        self._parts.append(piece)
        self._len += len(piece)
        if self._len >= OUTPUT_CHUNK:
            yield self._take()

    def _take(self) -> bytes:
        out = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._parts = []
        self._len = 0
        return out

    def flush(self) -> Iterator[bytes]:
        if self._parts:
            yield self._take()


@dataclass(frozen=True, slots=True)
class _Limits:
    """The window's bounds, derived once from :func:`render_nar`'s arguments."""

    prefetch: int
    buffer_bytes: int
    batch_files: int
    stream_above: int
    """Files bigger than this are streamed block by block."""
    batch_up_to: int
    """Files up to this size go into batches."""
    batch_bytes: int
    max_batches: int

    @classmethod
    def of(cls, prefetch: int, buffer_bytes: int, batch_files: int) -> _Limits:
        prefetch, buffer_bytes, batch_files = max(1, prefetch), max(1, buffer_bytes), max(1, batch_files)
        stream_above = buffer_bytes // 4
        return cls(
            prefetch=prefetch,
            buffer_bytes=buffer_bytes,
            batch_files=batch_files,
            stream_above=stream_above,
            batch_up_to=min(SMALL_FILE, stream_above),
            batch_bytes=min(BATCH_BYTES, buffer_bytes),
            max_batches=min(prefetch, BATCHES),
        )


class _Window:
    """The plan's next items with their fetches started, within the limits' budget.

    ``items`` holds framing (``bytes``), files (:class:`_Fetch`) and batches
    (:class:`_Batch`) in stream order; :meth:`fill` starts fetches until a
    bound is reached, :meth:`pop` releases the written head.
    """

    def __init__(self, plan: Iterator[bytes | Hole], blobs: BlobService, limits: _Limits) -> None:
        self.items: deque[bytes | _Fetch | _Batch] = deque()
        self._plan = plan
        self._blobs = blobs
        self._limits = limits
        self._held = 0  # budget used by the items
        self._fetches = 0  # files and batches among the items
        self._batches = 0  # batches among the items
        self._peeked: bytes | Hole | None = None
        self._exhausted = False

    def _take(self) -> bytes | Hole | None:
        item = self._peeked if self._peeked is not None else next(self._plan, None)
        self._peeked = None
        if item is None:
            self._exhausted = True
        return item

    def fill(self) -> None:
        """Take plan items into the window (starting their fetches) while the bounds allow."""
        limits = self._limits
        while not self._exhausted:
            item = self._take()
            if item is None:
                return
            if isinstance(item, bytes):
                if self.items and self._held + len(item) > limits.buffer_bytes:
                    self._peeked = item
                    return
                self.items.append(item)
                self._held += len(item)
                continue
            streamed = item.size > limits.stream_above
            cost = min(item.size, BLOCK) if streamed else item.size
            batched = item.size <= limits.batch_up_to
            if self.items and (
                self._fetches >= limits.prefetch
                or self._held + cost > limits.buffer_bytes
                or (batched and self._batches >= limits.max_batches)
            ):
                self._peeked = item
                return
            if batched:
                self._start_batch(item)
            else:
                self._start_fetch(item, cost, streamed)
            self._fetches += 1

    def _start_fetch(self, hole: Hole, cost: int, streamed: bool) -> None:
        fetch = _Fetch(hole, cost, streamed)
        blobs = self._blobs
        fetch.task = asyncio.ensure_future(_fetch_head(blobs, fetch) if streamed else _fetch_whole(blobs, hole))
        self.items.append(fetch)
        self._held += cost

    def _start_batch(self, hole: Hole) -> None:
        batch = _Batch()
        batch.add(hole)
        self._fill_batch(batch)
        batch.task = asyncio.ensure_future(self._blobs.read_many(batch.sizes, parallel=self._limits.prefetch))
        self.items.append(batch)
        self._held += batch.cost
        self._batches += 1

    def _fill_batch(self, batch: _Batch) -> None:
        """Extend ``batch`` (holding one hole) with framing and small holes while they fit."""
        limits = self._limits
        while not self._exhausted:
            item = self._take()
            if item is None:
                return
            cost = len(item) if isinstance(item, bytes) else item.size
            if (
                (isinstance(item, Hole) and (item.size > limits.batch_up_to or batch.holes >= limits.batch_files))
                or batch.cost + cost > limits.batch_bytes
                or self._held + batch.cost + cost > limits.buffer_bytes
            ):
                self._peeked = item
                return
            batch.add(item)

    def pop(self) -> None:
        """Release the head (written out) from the budget."""
        item = self.items.popleft()
        if isinstance(item, bytes):
            self._held -= len(item)
            return
        self._held -= item.cost
        self._fetches -= 1
        if isinstance(item, _Batch):
            self._batches -= 1


async def _write_item(item: bytes | _Fetch | _Batch, blobs: BlobService, out: _Output) -> AsyncGenerator[bytes, None]:
    """The output chunks that writing one window item completes."""
    if isinstance(item, bytes):
        for chunk in out.push(item):
            yield chunk
        return
    if isinstance(item, _Batch):
        async with contextlib.aclosing(_batch_parts(blobs, item)) as parts:
            async for part in parts:
                for chunk in out.push(part):
                    yield chunk
        return
    assert item.task is not None
    pieces = await item.task
    for part in pieces:
        for chunk in out.push(part):
            yield chunk
    if item.streamed:
        async with contextlib.aclosing(_stream_rest(item, len(pieces[0]), out)) as rest:
            async for chunk in rest:
                yield chunk


async def render_nar(
    node: Node,
    blobs: BlobService,
    directories: DirectoryService,
    *,
    prefetch: int = PREFETCH,
    buffer_bytes: int = BUFFER_BYTES,
    batch_files: int = BATCH_FILES,
    closure: Closure | None = None,
    plan: Iterable[bytes | Hole] | None = None,
) -> AsyncGenerator[bytes, None]:
    """Stream the NAR of an (anonymous) castore node, in chunks of about 128 KiB or more.

    Depth first, entries in Directory order.  ``prefetch`` bounds the
    fetches in flight: files, or (at most :data:`BATCHES`) batches of up to
    ``batch_files`` small files read with one ``read_many`` (which reads at
    most ``prefetch`` of its blobs at a time on backends without a batched
    read; ``prefetch=1`` reads strictly one blob after another).  ``buffer_bytes`` bounds the
    bytes held ahead of the writer.  Errors: :class:`~nixcas.store.nar.plan.NarContentNotFound`
    for a missing blob or directory, :class:`~nixcas.store.nar.plan.BlobSizeMismatch`
    for a blob shorter or longer than declared; both name the digest and the
    path in the NAR.  Closing the iterator early cancels all prefetching.  A ``closure`` already
    fetched with :func:`~nixcas.store.nar.plan.fetch_closure` is used instead of fetching it again,
    and a ``plan`` already made (the items :func:`~nixcas.store.nar.plan.iter_plan` yields) instead
    of the closure.
    """
    if plan is None:
        if closure is None:
            closure = await fetch_closure(node, directories)
        plan = iter_plan(node, closure)
    window = _Window(iter(plan), blobs, _Limits.of(prefetch, buffer_bytes, batch_files))
    out = _Output()
    try:
        window.fill()
        while window.items:
            async with contextlib.aclosing(_write_item(window.items[0], blobs, out)) as chunks:
                async for chunk in chunks:
                    yield chunk
            window.pop()
            window.fill()
        for chunk in out.flush():
            yield chunk
    finally:
        await _abandon(window.items)


async def _stream_rest(fetch: _Fetch, got: int, out: _Output) -> AsyncGenerator[bytes, None]:
    """The rest of a big file after its first block, one block read ahead; closes its reader."""
    hole, reader = fetch.hole, fetch.reader
    assert reader is not None
    while got < hole.size:
        if fetch.pending is None:
            fetch.pending = asyncio.ensure_future(reader.read(min(BLOCK, hole.size - got)))
        data = await fetch.pending
        fetch.pending = None
        if not data:
            raise hole.short(got)
        got += len(data)
        if got > hole.size:
            raise hole.long()
        if got < hole.size:
            fetch.pending = asyncio.ensure_future(reader.read(min(BLOCK, hole.size - got)))
        for chunk in out.push(data):
            yield chunk
    await _read_exact_end(reader, hole)
    fetch.reader = None
    await reader.close()


async def _abandon(window: deque[bytes | _Fetch | _Batch]) -> None:
    """Cancel the fetches and batches still in the window and close their readers."""
    fetches = [f for f in window if isinstance(f, _Fetch)]
    futures: list[asyncio.Future[Any]] = []
    for item in window:
        if isinstance(item, _Fetch):
            futures.extend(fut for fut in (item.task, item.pending) if fut is not None)
        elif isinstance(item, _Batch) and item.task is not None:
            futures.append(item.task)
    window.clear()
    if not futures and not fetches:
        return
    for fut in futures:
        fut.cancel()
    await asyncio.gather(*futures, return_exceptions=True)
    for f in fetches:
        if f.reader is not None:
            with contextlib.suppress(Exception):
                await f.reader.close()
            f.reader = None


async def file_contents(blobs: BlobService, hole: Hole) -> AsyncGenerator[bytes, None]:
    """One file's contents through the async API, exactly ``hole.size`` bytes, with its precise error.

    A small file is read whole and to its end (so verified) before a byte is
    yielded; a big one block by block, each block verified by the blob reader.
    """
    if hole.size <= SMALL_FILE:
        for piece in await _fetch_whole(blobs, hole):
            yield piece
        return
    reader = await _open(blobs, hole)
    async with reader:
        got = 0
        while got < hole.size:
            data = await reader.read(min(BLOCK, hole.size - got))
            if not data:
                raise hole.short(got)
            got += len(data)
            if got > hole.size:
                raise hole.long()
            yield data
        await _read_exact_end(reader, hole)


async def write_nar(
    out: Callable[[bytes], Awaitable[None] | None],
    node: Node,
    blobs: BlobService,
    directories: DirectoryService,
    *,
    prefetch: int = PREFETCH,
    buffer_bytes: int = BUFFER_BYTES,
) -> int:
    """Render ``node`` into ``out`` (a sync or async callable taking each chunk); return the NAR size."""
    total = 0
    async with contextlib.aclosing(
        render_nar(node, blobs, directories, prefetch=prefetch, buffer_bytes=buffer_bytes)
    ) as chunks:
        async for chunk in chunks:
            result = out(chunk)
            if inspect.isawaitable(result):
                await result
            total += len(chunk)
    return total


async def nar_size_sha256(
    node: Node,
    blobs: BlobService,
    directories: DirectoryService,
    *,
    prefetch: int = PREFETCH,
    buffer_bytes: int = BUFFER_BYTES,
) -> tuple[int, bytes]:
    """The NAR's size and raw SHA-256 digest (32 bytes), rendering it once."""
    h = hashlib.sha256()
    size = await write_nar(h.update, node, blobs, directories, prefetch=prefetch, buffer_bytes=buffer_bytes)
    return size, h.digest()


async def nar_size(node: Node, directories: DirectoryService) -> int:
    """The NAR's size, from the directory closure alone (no blob is read)."""
    return plan_size(node, await fetch_closure(node, directories))

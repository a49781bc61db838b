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
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
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


async def render_nar(
    node: Node,
    blobs: BlobService,
    directories: DirectoryService,
    *,
    prefetch: int = PREFETCH,
    buffer_bytes: int = BUFFER_BYTES,
    batch_files: int = BATCH_FILES,
    closure: Closure | None = None,
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
    fetched with :func:`~nixcas.store.nar.plan.fetch_closure` is used instead of fetching it again.
    """
    if closure is None:
        closure = await fetch_closure(node, directories)
    prefetch = max(1, prefetch)
    buffer_bytes = max(1, buffer_bytes)
    batch_files = max(1, batch_files)
    stream_above = buffer_bytes // 4
    batch_up_to = min(SMALL_FILE, stream_above)  # file sizes that go into batches
    batch_bytes = min(BATCH_BYTES, buffer_bytes)
    plan = iter_plan(node, closure)
    window: deque[bytes | _Fetch | _Batch] = deque()
    held = 0  # budget used by the window
    fetches = 0  # files and batches in the window
    batches = 0  # batches in the window
    max_batches = min(prefetch, BATCHES)
    peeked: bytes | Hole | None = None
    exhausted = False

    def take() -> bytes | Hole | None:
        nonlocal peeked, exhausted
        item = peeked if peeked is not None else next(plan, None)
        peeked = None
        if item is None:
            exhausted = True
        return item

    def fill_batch(batch: _Batch) -> None:
        """Extend ``batch`` (holding one hole) with framing and small holes while they fit."""
        nonlocal peeked
        while not exhausted:
            item = take()
            if item is None:
                return
            cost = len(item) if isinstance(item, bytes) else item.size
            if (
                (isinstance(item, Hole) and (item.size > batch_up_to or batch.holes >= batch_files))
                or batch.cost + cost > batch_bytes
                or held + batch.cost + cost > buffer_bytes
            ):
                peeked = item
                return
            batch.add(item)

    def fill() -> None:
        nonlocal held, fetches, batches, peeked
        while not exhausted:
            item = take()
            if item is None:
                return
            if isinstance(item, bytes):
                if window and held + len(item) > buffer_bytes:
                    peeked = item
                    return
                window.append(item)
                held += len(item)
                continue
            streamed = item.size > stream_above
            cost = min(item.size, BLOCK) if streamed else item.size
            batched = item.size <= batch_up_to
            if window and (fetches >= prefetch or held + cost > buffer_bytes or (batched and batches >= max_batches)):
                peeked = item
                return
            if batched:
                batches += 1
                batch = _Batch()
                batch.add(item)
                fill_batch(batch)
                batch.task = asyncio.ensure_future(blobs.read_many(batch.sizes, parallel=prefetch))
                window.append(batch)
                held += batch.cost
            else:
                fetch = _Fetch(item, cost, streamed)
                fetch.task = asyncio.ensure_future(_fetch_head(blobs, fetch) if streamed else _fetch_whole(blobs, item))
                window.append(fetch)
                held += cost
            fetches += 1

    out = _Output()
    try:
        fill()
        while window:
            item = window[0]
            if isinstance(item, bytes):
                for chunk in out.push(item):
                    yield chunk
                cost = len(item)
            elif isinstance(item, _Batch):
                async with contextlib.aclosing(_batch_parts(blobs, item)) as parts:
                    async for part in parts:
                        for chunk in out.push(part):
                            yield chunk
                cost = item.cost
                fetches -= 1
                batches -= 1
            else:
                assert item.task is not None
                pieces = await item.task
                for part in pieces:
                    for chunk in out.push(part):
                        yield chunk
                if item.streamed:
                    async with contextlib.aclosing(_stream_rest(item, len(pieces[0]), out)) as rest:
                        async for chunk in rest:
                            yield chunk
                cost = item.cost
                fetches -= 1
            window.popleft()
            held -= cost
            fill()
        for chunk in out.flush():
            yield chunk
    finally:
        await _abandon(window)


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

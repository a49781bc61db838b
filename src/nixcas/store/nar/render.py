"""Rendering castore nodes as NAR streams, with blob reads prefetched ahead of the writer.

The directory closure is fetched once (``get_recursive``) and turned into a
plan of framing bytes and blob holes (:mod:`nixcas.store.nar.plan`).  The
renderer walks that plan with a bounded *window* of work in flight:

* at most ``prefetch`` files are being fetched or held at a time (the one
  being written included), so at most that many blob readers are open;
* files up to a quarter of ``buffer_bytes`` are read whole ahead of time,
  as long as the bytes held by the window stay within ``buffer_bytes``;
* bigger files get their reader opened and their first block read ahead;
  the rest streams block by block (one block read ahead) when the writer
  reaches them, so no file is ever held whole in memory.

Peak memory is about ``buffer_bytes`` plus two blocks plus one output chunk.
Every blob must yield exactly the size its file node declares; a short blob,
a long blob, a missing blob or a missing directory raise errors that name the
digest and the file's path inside the NAR.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from dataclasses import dataclass

from nixcas.castore.blob.base import BlobReader, BlobService
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.nodes import Node
from nixcas.store.nar.plan import Hole, fetch_closure, iter_plan, plan_size

__all__ = [
    "BLOCK",
    "BUFFER_BYTES",
    "OUTPUT_CHUNK",
    "PREFETCH",
    "nar_size",
    "nar_size_sha256",
    "render_nar",
    "write_nar",
]

PREFETCH = 8
"""Default number of files in flight."""
BUFFER_BYTES = 64 << 20
"""Default byte budget of the prefetch window."""
BLOCK = 1 << 20
"""Block size for reading big blobs."""
OUTPUT_CHUNK = 128 << 10
"""Small pieces (framing, small files) are coalesced into output chunks of at least this size."""


@dataclass(slots=True)
class _Fetch:
    """A file in the window: its hole, the task fetching it, and what it costs in the budget."""

    hole: Hole
    cost: int
    streamed: bool
    task: asyncio.Future[list[bytes]] | None = None
    reader: BlobReader | None = None
    pending: asyncio.Future[bytes] | None = None


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
) -> AsyncGenerator[bytes, None]:
    """Stream the NAR of an (anonymous) castore node, in chunks of about 128 KiB or more.

    Depth first, entries in Directory order.  ``prefetch`` bounds the files
    fetched concurrently (and so the blob readers open at once; ``1`` reads
    strictly one blob after another), ``buffer_bytes`` bounds the bytes held
    ahead of the writer.  Errors: :class:`~nixcas.store.nar.plan.NarContentNotFound`
    for a missing blob or directory, :class:`~nixcas.store.nar.plan.BlobSizeMismatch`
    for a blob shorter or longer than declared; both name the digest and the
    path in the NAR.  Closing the iterator early cancels all prefetching.
    """
    closure = await fetch_closure(node, directories)
    prefetch = max(1, prefetch)
    buffer_bytes = max(1, buffer_bytes)
    stream_above = buffer_bytes // 4
    plan = iter_plan(node, closure)
    window: deque[bytes | _Fetch] = deque()
    held = 0  # budget used by the window
    files = 0  # files in the window
    peeked: bytes | Hole | None = None
    exhausted = False

    def fill() -> None:
        nonlocal held, files, peeked, exhausted
        while not exhausted:
            item = peeked if peeked is not None else next(plan, None)
            peeked = None
            if item is None:
                exhausted = True
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
            if window and (files >= prefetch or held + cost > buffer_bytes):
                peeked = item
                return
            fetch = _Fetch(item, cost, streamed)
            fetch.task = asyncio.ensure_future(_fetch_head(blobs, fetch) if streamed else _fetch_whole(blobs, item))
            window.append(fetch)
            held += cost
            files += 1

    out = _Output()
    try:
        fill()
        while window:
            item = window[0]
            if isinstance(item, bytes):
                for chunk in out.push(item):
                    yield chunk
                cost = len(item)
            else:
                assert item.task is not None
                parts = await item.task
                for part in parts:
                    for chunk in out.push(part):
                        yield chunk
                if item.streamed:
                    async with contextlib.aclosing(_stream_rest(item, len(parts[0]), out)) as rest:
                        async for chunk in rest:
                            yield chunk
                cost = item.cost
                files -= 1
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


async def _abandon(window: deque[bytes | _Fetch]) -> None:
    """Cancel the fetches still in the window and close their readers."""
    fetches = [f for f in window if isinstance(f, _Fetch)]
    window.clear()
    if not fetches:
        return
    futures: list[asyncio.Future[object]] = []
    for f in fetches:
        for fut in (f.task, f.pending):
            if fut is not None:
                fut.cancel()
                futures.append(fut)  # type: ignore[arg-type]
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

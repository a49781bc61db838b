"""Importing a NAR stream into castore.

:func:`ingest_nar` parses the NAR strictly (:func:`~nixcas.store.nar.parser.parse_nar`)
while hashing every byte read (SHA-256 and a byte count).  File contents go
to the blob service as they arrive: small files are collected into batches
uploaded in the background (``put_many``), big files stream into a blob
writer in the blocks the parser yields, with their size declared up front.
Directories are assembled through :func:`~nixcas.castore.ingest.ingest_entries`
and committed in one step only after the whole NAR was parsed, every blob was
stored and synced, and the NAR's size and SHA-256 matched the expectations (if
given).  A malformed or mismatching NAR therefore never makes a Directory
visible.  Blobs uploaded before a failure stay in the blob service: they are
content-addressed, so they are valid (if unreferenced) data.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from nixcas.castore.blob.base import BlobService
from nixcas.castore.digest import EMPTY_DIGEST, B3Digest
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.ingest import IngestEntry, ingest_entries
from nixcas.castore.nodes import FileNode, Node, SymlinkNode
from nixcas.castore.treepath import TreePath
from nixcas.errors import NarError
from nixcas.store.nar.parser import (
    AsyncByteSource,
    NarDirectoryEnd,
    NarEvent,
    NarFile,
    NarFileChunk,
    NarSymlink,
    as_source,
    parse_nar,
)

__all__ = ["ingest_nar", "ingest_nar_bytes"]

SMALL_FILE = 1 << 20
"""Files up to this size are collected in memory and uploaded in batches."""
BATCH_FILES = 512
BATCH_BYTES = 16 << 20
BATCHES_AHEAD = 3
"""Batches uploading in the background while parsing goes on (bounds memory to about 64 MiB)."""
THREAD_HASH_MIN = 256 << 10
"""Reads at least this big are SHA-256-hashed on a worker thread."""
HASH_AHEAD = 4
WRITE_BLOCK = 1 << 20
"""Big files are written to the blob writer in blocks of at least this size."""


class _HashingSource:
    """Counts and SHA-256-hashes everything read; fails early once past ``expected_size``.

    Big reads are hashed on a private worker thread (hashlib releases the GIL),
    in order, overlapping with parsing and blob uploads; at most
    :data:`HASH_AHEAD` blocks wait to be hashed.  Call :meth:`finish` at the end.
    """

    def __init__(self, inner: AsyncByteSource, expected_size: int | None) -> None:
        self._inner = inner
        self._expected_size = expected_size
        self._sha256 = hashlib.sha256()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: deque[asyncio.Future[None]] = deque()
        self.size = 0

    async def read(self, n: int, /) -> bytes:
        data = await self._inner.read(n)
        if data:
            self.size += len(data)
            if self._expected_size is not None and self.size > self._expected_size:
                raise NarError(f"NAR is longer than its expected size {self._expected_size}")
            await self._update(data)
        return data

    async def _update(self, data: bytes) -> None:
        pending = self._pending
        while pending and pending[0].done():
            pending.popleft().result()
        if len(data) < THREAD_HASH_MIN and not pending:
            self._sha256.update(data)
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="nar-sha256")
        pending.append(asyncio.get_running_loop().run_in_executor(self._executor, self._sha256.update, data))
        while len(pending) > HASH_AHEAD:
            await pending.popleft()

    async def finish(self) -> bytes:
        """Wait for outstanding hashing; the SHA-256 of everything read."""
        while self._pending:
            await self._pending.popleft()
        return self._sha256.digest()

    def close(self) -> None:
        """Stop the worker thread (queued hashing is finished first)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None


@dataclass(slots=True)
class _Batch:
    """Small files uploaded together."""

    data: list[bytes] = field(default_factory=list)
    size: int = 0
    task: asyncio.Future[list[B3Digest]] | None = None


@dataclass(frozen=True, slots=True)
class _Small:
    """A small file whose digest comes from its batch."""

    path: TreePath
    size: int
    executable: bool
    batch: _Batch
    index: int


async def _next_chunk(events: AsyncGenerator[NarEvent, None]) -> bytes:
    """The next piece of the current file's contents."""
    event = await anext(events)
    assert isinstance(event, NarFileChunk), event
    return event.data


async def _read_small(events: AsyncGenerator[NarEvent, None], size: int) -> bytes:
    """The whole contents of a small file."""
    chunks: list[bytes] = []
    got = 0
    while got < size:
        chunks.append(await _next_chunk(events))
        got += len(chunks[-1])
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _upload_large(blobs: BlobService, events: AsyncGenerator[NarEvent, None], size: int) -> B3Digest:
    """Stream a big file into a blob writer in blocks of at least :data:`WRITE_BLOCK` bytes.

    Small pieces from the source are coalesced; the next block is parsed while
    the previous one is being written.
    """
    writer = await blobs.open_write(size)
    async with writer:
        pending: asyncio.Future[None] | None = None
        try:
            got = 0
            parts: list[bytes] = []
            held = 0
            while got < size:
                data = await _next_chunk(events)
                got += len(data)
                if held + len(data) < WRITE_BLOCK and got < size:
                    parts.append(data)
                    held += len(data)
                    continue
                if parts:
                    parts.append(data)
                    data = b"".join(parts)
                    parts, held = [], 0
                if pending is not None:
                    await pending
                pending = asyncio.ensure_future(writer.write(data))
            if pending is not None:
                await pending
                pending = None
        finally:
            if pending is not None:
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)
        return await writer.close()


async def _put_empty(blobs: BlobService) -> list[B3Digest]:
    return [await blobs.put(b"")]


async def ingest_nar(
    source: AsyncByteSource | AsyncIterable[bytes],
    blobs: BlobService,
    directories: DirectoryService,
    *,
    expected_size: int | None = None,
    expected_sha256: bytes | None = None,
    sync: Callable[[], Awaitable[None]] | None = None,
) -> tuple[Node, int, bytes]:
    """Import a NAR; return ``(root node, NAR size, NAR SHA-256)``.

    ``source`` is read to its end (anything after the root node is an
    error).  With ``expected_size`` / ``expected_sha256`` the NAR must match
    them, else :class:`~nixcas.errors.NarError` (reading stops as soon as the
    NAR exceeds ``expected_size``).  On any error no Directory is stored;
    blobs uploaded before the error remain (content-addressed, unreferenced).
    ``sync`` is the durability barrier run before the Directories commit
    (default: ``blobs.sync``; a server passes a shared group commit).
    """
    hashing = _HashingSource(as_source(source), expected_size)
    events = parse_nar(hashing)
    entries: list[IngestEntry | _Small] = []
    batch = _Batch()
    running: deque[_Batch] = deque()
    any_empty = False

    def start_batch() -> None:
        nonlocal batch
        if batch.data:
            data = batch.data
            batch.task = asyncio.ensure_future(blobs.put_many(data))
            batch.data = []
            running.append(batch)
            batch = _Batch()

    try:
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, NarFile):
                    path = event.path
                    if event.size == 0:
                        any_empty = True
                        entries.append(IngestEntry(path, FileNode(EMPTY_DIGEST, 0, event.executable)))
                    elif event.size <= SMALL_FILE:
                        data = await _read_small(events, event.size)
                        entries.append(_Small(path, event.size, event.executable, batch, len(batch.data)))
                        batch.data.append(data)
                        batch.size += len(data)
                        if len(batch.data) >= BATCH_FILES or batch.size >= BATCH_BYTES:
                            start_batch()
                            while len(running) > BATCHES_AHEAD:
                                task = running.popleft().task
                                assert task is not None
                                await task
                    else:
                        digest = await _upload_large(blobs, events, event.size)
                        entries.append(IngestEntry(path, FileNode(digest, event.size, event.executable)))
                elif isinstance(event, NarSymlink):
                    entries.append(IngestEntry(event.path, SymlinkNode(event.target)))
                elif isinstance(event, NarDirectoryEnd):
                    entries.append(IngestEntry(event.path, None))
        start_batch()
        if any_empty:
            running.append(_Batch(task=asyncio.ensure_future(_put_empty(blobs))))
        for b in running:
            assert b.task is not None
            await b.task

        size, sha256 = hashing.size, await hashing.finish()
        if expected_size is not None and size != expected_size:
            raise NarError(f"NAR size mismatch: expected {expected_size} bytes, got {size}")
        if expected_sha256 is not None and sha256 != expected_sha256:
            raise NarError(f"NAR sha256 mismatch: expected {expected_sha256.hex()}, got {sha256.hex()}")

        resolved: list[IngestEntry] = []
        for entry in entries:
            if isinstance(entry, _Small):
                assert entry.batch.task is not None
                digest = entry.batch.task.result()[entry.index]
                resolved.append(IngestEntry(entry.path, FileNode(digest, entry.size, entry.executable)))
            else:
                resolved.append(entry)
        entries.clear()
        root = await ingest_entries(resolved, directories, before_commit=sync or blobs.sync)
        return root, size, sha256
    finally:
        hashing.close()
        tasks = [b.task for b in running if b.task is not None]
        for t in tasks:
            t.cancel()
        if tasks:  # also retrieves the errors of failed uploads nobody awaited
            await asyncio.gather(*tasks, return_exceptions=True)


async def ingest_nar_bytes(
    data: bytes,
    blobs: BlobService,
    directories: DirectoryService,
    *,
    expected_size: int | None = None,
    expected_sha256: bytes | None = None,
) -> tuple[Node, int, bytes]:
    """:func:`ingest_nar` over a NAR held in memory."""
    return await ingest_nar(
        as_source(data), blobs, directories, expected_size=expected_size, expected_sha256=expected_sha256
    )

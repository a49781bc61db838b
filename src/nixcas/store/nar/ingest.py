"""Importing a NAR stream into castore.

:func:`ingest_nar` parses the NAR strictly (:func:`~nixcas.store.nar.parser.parse_nar`)
while hashing every byte read (SHA-256 and a byte count).  File contents go
to castore's one uploader (:mod:`nixcas.castore.upload`) as they arrive: small
files in batches uploaded in the background, big files streamed into a blob
writer, with their size declared up front.  Directories are assembled through
:func:`~nixcas.castore.ingest.ingest_entries` while parsing goes on, and
committed in one step only after the whole NAR was parsed, every blob was
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

from nixcas.castore.blob.base import BlobService
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.ingest import IngestEntry, ingest_entries
from nixcas.castore.nodes import FileNode, Node, SymlinkNode
from nixcas.castore.upload import BATCH_FILES, SMALL_BLOB, PendingFile, Uploader, run_ahead
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
from nixcas.store.nar.plan import show_path

__all__ = ["ingest_nar", "ingest_nar_bytes"]

THREAD_HASH_MIN = 256 << 10
"""Reads at least this big are SHA-256-hashed on a worker thread."""
HASH_AHEAD = 4


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


async def _file_node(
    event: NarFile, events: AsyncGenerator[NarEvent, None], uploader: Uploader
) -> FileNode | PendingFile:
    """Hand a file's contents (the chunk events after ``event``) to the uploader."""
    if event.size <= SMALL_BLOB:
        data = await _read_small(events, event.size) if event.size else b""
        return uploader.small(data, event.executable)

    def read(n: int) -> Awaitable[bytes]:
        return _next_chunk(events)  # pieces of at most the parser's chunk size, never past the file

    digest = await uploader.stream(event.size, read, show_path(event.path))
    return FileNode(digest, event.size, event.executable)


async def _entries(source: AsyncByteSource, uploader: Uploader) -> AsyncGenerator[list[IngestEntry], None]:
    """The NAR's entries in post-order, handed over whenever the uploader started a batch (and at the end)."""
    events = parse_nar(source)
    entries: list[IngestEntry] = []
    started = uploader.batches_started
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, NarFile):
                entries.append(IngestEntry(event.path, await _file_node(event, events, uploader)))
            elif isinstance(event, NarSymlink):
                entries.append(IngestEntry(event.path, SymlinkNode(event.target)))
            elif isinstance(event, NarDirectoryEnd):
                entries.append(IngestEntry(event.path, None))
            else:
                continue
            if uploader.batches_started != started or len(entries) >= BATCH_FILES:
                await uploader.room()
                started = uploader.batches_started
                yield entries
                entries = []
    uploader.flush(synced=True)  # the last batch: the barrier before the commit follows it
    yield entries


async def _check(hashing: _HashingSource, expected_size: int | None, expected_sha256: bytes | None) -> bytes:
    """The NAR's SHA-256, once its size and hash are what was expected."""
    size, sha256 = hashing.size, await hashing.finish()
    if expected_size is not None and size != expected_size:
        raise NarError(f"NAR size mismatch: expected {expected_size} bytes, got {size}")
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise NarError(f"NAR sha256 mismatch: expected {expected_sha256.hex()}, got {sha256.hex()}")
    return sha256


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
    sha256 = b""

    async def before_commit() -> None:
        nonlocal sha256
        await uploader.finish()
        sha256 = await _check(hashing, expected_size, expected_sha256)
        await (sync or blobs.sync)()

    try:
        async with Uploader(blobs) as uploader:
            entries = run_ahead(_entries(hashing, uploader))
            async with contextlib.aclosing(entries):
                root = await ingest_entries(entries, directories, before_commit=before_commit)
        return root, hashing.size, sha256
    finally:
        hashing.close()


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

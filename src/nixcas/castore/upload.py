"""One uploader for every way into castore: a filesystem walk, a tar archive, a NAR.

A source hands each file to an :class:`Uploader` as it reads it and carries on:

* a small file (up to :data:`SMALL_BLOB` bytes, read whole) joins the current
  batch, which is uploaded with one ``put_many`` once it holds
  :data:`BATCH_FILES` files or :data:`BATCH_BYTES` bytes; the caller gets a
  :class:`PendingFile` that becomes a :class:`~nixcas.castore.nodes.FileNode`
  when its batch is stored.  An empty file needs no upload (its digest is
  known); the empty blob is stored once, with the batch of the first one;
* a large file is streamed into a blob writer in blocks of at least
  :data:`BLOCK` bytes, the next block read while the previous one is written —
  either inline (:meth:`Uploader.stream`, for sources read front to back) or
  as a task of its own (:meth:`Uploader.large`, at most :data:`LARGE_PARALLEL`
  at once, for files the source can open by themselves).

Memory is bounded: at most :data:`BATCHES_AHEAD` batches upload while the
next one fills (:meth:`Uploader.room` waits for the oldest), and
:func:`run_ahead` lets a source run at most that many hand-offs ahead of the
consumer that builds Directories.  The consumer resolves each
:class:`PendingFile` in the order of the source (children before their
directory), so Directories are uploaded leaves to root.

This module knows nothing of Nix: the Nix layer feeds it NAR contents.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, cast

from nixcas.castore.blob.base import BlobService, BlobWriter
from nixcas.castore.digest import EMPTY_DIGEST, B3Digest
from nixcas.castore.nodes import FileNode
from nixcas.castore.walk import BATCH_BYTES, BATCH_FILES, SMALL_BLOB
from nixcas.errors import IngestError

__all__ = [
    "BATCHES_AHEAD",
    "BATCH_BYTES",
    "BATCH_FILES",
    "BLOCK",
    "LARGE_PARALLEL",
    "SMALL_BLOB",
    "PendingFile",
    "Progress",
    "Uploader",
    "run_ahead",
]

BATCHES_AHEAD = 3
"""Batches uploading while the next one fills; also hand-offs a source may run ahead of its consumer."""
LARGE_PARALLEL = 2
"""Large files uploading at once (as :meth:`Uploader.large` tasks)."""
BLOCK = 1 << 20
"""Large files are read and written in blocks of (at least) this size."""

T = TypeVar("T")

Progress = Callable[[int], None]
"""Called with the number of content bytes just ingested."""


class _Batch:
    """Small files uploaded together."""

    __slots__ = ("data", "digests", "size", "task", "uploader")

    def __init__(self, uploader: Uploader) -> None:
        self.data: list[bytes | memoryview] = []
        self.digests: list[B3Digest] | None = None  # given with the contents (small_hashed), else computed
        self.size = 0
        self.task: asyncio.Future[list[B3Digest]] | None = None
        self.uploader = uploader


class PendingFile:
    """A file whose blob is being uploaded; :meth:`node` is its FileNode once it is stored."""

    __slots__ = ("_batch", "_future", "_index", "executable", "size")

    def __init__(
        self,
        size: int,
        executable: bool,
        batch: _Batch | None = None,
        index: int = 0,
        future: asyncio.Future[B3Digest] | None = None,
    ) -> None:
        self.size = size
        self.executable = executable
        self._batch = batch
        self._index = index
        self._future = future

    def ready(self) -> FileNode | None:
        """The node if the upload has finished (its error if it failed), else ``None``."""
        batch = self._batch
        if batch is not None:
            task = batch.task
            if task is None or not task.done():
                return None
            return FileNode(task.result()[self._index], self.size, self.executable)
        assert self._future is not None
        if not self._future.done():
            return None
        return FileNode(self._future.result(), self.size, self.executable)

    async def node(self) -> FileNode:
        """The node, waiting for the upload (a batch not started yet is started now)."""
        batch = self._batch
        if batch is not None:
            if batch.task is None:
                batch.uploader.flush()
            assert batch.task is not None
            return FileNode((await batch.task)[self._index], self.size, self.executable)
        assert self._future is not None
        return FileNode(await self._future, self.size, self.executable)


class Uploader:
    """Schedules the blob uploads of one ingest (see the module docstring).

    Use as ``async with``: leaving it cancels whatever is still uploading.
    :meth:`finish` waits for every upload and raises the first failure.
    """

    def __init__(self, blobs: BlobService, progress: Progress | None = None) -> None:
        self._blobs = blobs
        self._progress = progress
        self._batch = _Batch(self)
        self._running: deque[_Batch] = deque()
        self._tasks: set[asyncio.Future[Any]] = set()
        self._large_slots = asyncio.Semaphore(LARGE_PARALLEL)
        self._empty_stored = False
        self._unwatched: list[asyncio.Future[list[B3Digest]]] = []  # batches started since the last when_stored
        self.batches_started = 0

    async def __aenter__(self) -> Uploader:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def small(self, data: bytes | memoryview, executable: bool) -> PendingFile | FileNode:
        """Queue a small file's contents for the current batch (held, not copied, until it is stored)."""
        return self._queue(data, executable, None)

    def small_hashed(self, digest: B3Digest, data: bytes | memoryview, executable: bool) -> FileNode:
        """:meth:`small`, for contents whose BLAKE3 ``digest`` this program has just computed from these bytes.

        The node is known at once; the blob is stored with the batch
        (:meth:`~nixcas.castore.blob.base.BlobService.put_many_hashed`) before
        :meth:`finish` returns.  For an import's walk in a process of its own,
        which hashes each file where it has the GIL to itself.
        """
        node = self._queue(data, executable, digest)
        assert isinstance(node, FileNode)
        return node

    def _queue(self, data: bytes | memoryview, executable: bool, digest: B3Digest | None) -> PendingFile | FileNode:
        size = len(data)
        batch = self._batch
        if (batch.digests is None) != (digest is None):  # a batch is either all given digests or none
            if batch.data:
                self.flush()
                batch = self._batch
            batch.digests = None if digest is None else []
        digests = batch.digests
        if not size:
            if not self._empty_stored:
                self._empty_stored = True
                batch.data.append(data)
                if digests is not None:
                    digests.append(EMPTY_DIGEST)
            return FileNode(EMPTY_DIGEST, 0, executable)
        node: PendingFile | FileNode
        if digests is None or digest is None:
            node = PendingFile(size, executable, batch, len(batch.data))
        else:
            node = FileNode(digest, size, executable)
            digests.append(digest)
        batch.data.append(data)
        batch.size += size
        if len(batch.data) >= BATCH_FILES or batch.size >= BATCH_BYTES:
            self.flush()
        return node

    def flush(self, *, synced: bool = False) -> None:
        """Start uploading the current batch (if it holds anything); ``synced``: the last one, a sync follows."""
        batch = self._batch
        if not batch.data:
            return
        self._batch = _Batch(self)
        put = self._put_batch(batch.data, batch.size, synced, batch.digests)
        batch.task = self._track(asyncio.ensure_future(put))
        batch.data = []
        self._running.append(batch)
        self._unwatched.append(batch.task)
        self.batches_started += 1

    def when_stored(self, callback: Callable[[], object]) -> None:
        """Start the current batch, and call ``callback`` once every batch started since the last call is done.

        Done means stored, failed or cancelled: after that the uploader holds none of their
        contents (a source can then reuse the memory they were in).
        """
        self.flush()
        tasks, self._unwatched = self._unwatched, []
        if not tasks:
            callback()
            return
        asyncio.gather(*tasks, return_exceptions=True).add_done_callback(lambda _: callback())

    async def _put_batch(
        self, data: list[bytes | memoryview], size: int, synced: bool, given: list[B3Digest] | None
    ) -> list[B3Digest]:
        blobs = self._blobs
        held = cast("list[bytes]", data)  # views only where the service takes them (BlobService.accepts_views)
        if given is not None:
            digests = await blobs.put_many_hashed(given, held)
        else:
            digests = await (blobs.put_many_before_sync(held) if synced else blobs.put_many(held))
        if self._progress is not None:
            self._progress(size)
        return digests

    async def room(self) -> None:
        """Wait until at most :data:`BATCHES_AHEAD` batches are uploading (bounds the bytes held)."""
        running = self._running
        while running:
            task = running[0].task
            assert task is not None
            if len(running) <= BATCHES_AHEAD and not task.done():
                return
            running.popleft()
            await task  # at once if it is done; its error, if it failed

    def large(self, size: int, executable: bool, upload: Callable[[], Awaitable[B3Digest]]) -> PendingFile:
        """Run ``upload`` (which streams one large file, e.g. with :meth:`stream`) as a task of its own."""

        async def run() -> B3Digest:
            async with self._large_slots:
                return await upload()

        return PendingFile(size, executable, future=self._track(asyncio.ensure_future(run())))

    async def stream(
        self, size: int, read: Callable[[int], Awaitable[bytes]], what: str, *, check_end: bool = False
    ) -> B3Digest:
        """Upload ``size`` bytes from ``read(n)`` (up to ``n`` bytes, ``b""`` at the end); the blob's digest.

        Pieces smaller than :data:`BLOCK` are joined; the next block is read
        while the previous one is written.  With ``check_end``, ``read`` must be
        at its end after ``size`` bytes.
        """
        writer = await self._blobs.open_write(size)
        async with writer:
            pending: asyncio.Future[None] | None = None
            try:
                got, held = 0, 0
                parts: list[bytes] = []
                while got < size:
                    data = await read(min(BLOCK, size - got))
                    if not data:
                        raise IngestError(f"{what}: ended after {got} of {size} bytes")
                    got += len(data)
                    if held + len(data) < BLOCK and got < size:
                        parts.append(data)
                        held += len(data)
                        continue
                    if parts:
                        parts.append(data)
                        data, parts, held = b"".join(parts), [], 0
                    if pending is not None:
                        await pending
                    pending = asyncio.ensure_future(self._write(writer, data))
                if pending is not None:
                    await pending
                    pending = None
                if check_end and await read(1):
                    raise IngestError(f"{what}: longer than its declared size {size}")
            finally:
                if pending is not None:
                    pending.cancel()
                    await asyncio.gather(pending, return_exceptions=True)
            return await writer.close()

    async def _write(self, writer: BlobWriter, data: bytes) -> None:
        await writer.write(data)
        if self._progress is not None:
            self._progress(len(data))

    async def finish(self) -> None:
        """Upload what is queued and wait for every upload; the first failure is raised."""
        self.flush()
        while self._running:
            task = self._running.popleft().task
            assert task is not None
            await task
        for task in list(self._tasks):
            await task

    async def aclose(self) -> None:
        """Cancel whatever is still uploading (and collect its errors, which nobody awaits any more)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _track(self, future: asyncio.Future[T]) -> asyncio.Future[T]:
        self._tasks.add(future)
        future.add_done_callback(self._done)
        return future

    def _done(self, future: asyncio.Future[Any]) -> None:
        self._tasks.discard(future)
        if not future.cancelled():
            future.exception()  # seen: a failure nobody awaits (the consumer stopped at another) is not logged


async def run_ahead(batches: AsyncIterator[list[T]], depth: int = BATCHES_AHEAD) -> AsyncGenerator[T, None]:
    """The items of ``batches``, which is driven by a task of its own up to ``depth`` lists ahead.

    The source goes on reading (and starting uploads) while the consumer waits
    for an upload; an error of the source is raised here, in order.
    """
    queue: asyncio.Queue[list[T] | BaseException | None] = asyncio.Queue(maxsize=depth)

    async def produce() -> None:
        try:
            async for batch in batches:
                await queue.put(batch)
            await queue.put(None)
        except asyncio.CancelledError:
            raise  # the consumer is gone (it cancelled us): nobody would take a queued error
        except BaseException as e:  # handed to the consumer, which raises it
            await queue.put(e)

    producer = asyncio.ensure_future(produce())
    try:
        while (batch := await queue.get()) is not None:
            if isinstance(batch, BaseException):
                raise batch
            for item in batch:
                yield item
    finally:
        producer.cancel()
        await asyncio.gather(producer, return_exceptions=True)
        if isinstance(batches, AsyncGenerator):
            await batches.aclose()  # its producer is done: closing runs the source's own clean-up now

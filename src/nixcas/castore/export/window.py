"""The window of reads ahead of the writers: batches of small files, large files streamed, memory bounded."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import TypeVar

from nixcas._aio import to_thread_uninterrupted, uninterrupted
from nixcas.castore.blob.base import BlobReader, BlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.export.base import (
    BATCH_BYTES,
    BATCH_FILES,
    BATCH_OPS,
    BATCHES,
    BLOCK,
    FILE,
    MKDIR,
    SMALL_FILE,
    STREAMS,
    BadBlob,
    Op,
)
from nixcas.castore.export.bulk import bulk_batch, bulk_copier
from nixcas.castore.export.plan import Plan
from nixcas.castore.export.writer import Writer, write_all
from nixcas.castore.nodes import FileNode
from nixcas.errors import NixcasError, NotFoundError, StorageError

T = TypeVar("T")
# -- the window of reads ahead of the writer -----------------------------------------------


@dataclass(slots=True)
class _Batch:
    """Consecutive entries written by one step of the writer thread; their small files read by one ``read_many``."""

    ops: list[Op]
    """Every entry but the new directories."""
    sizes: dict[B3Digest, int]
    dirs: list[Op] = field(default_factory=list)
    """The new directories, created first (in order)."""
    cost: int = 0
    task: asyncio.Future[dict[B3Digest, bytes | memoryview]] | None = None
    data: Future[dict[B3Digest, bytes | memoryview]] | None = None
    """The read's result, for the writer thread."""
    done: asyncio.Future[object] | None = None
    """Set once the writer thread has written the batch (or failed to)."""
    after: threading.Event | None = None
    """The previous unit's :attr:`made`: its directories exist."""
    made: threading.Event = field(default_factory=threading.Event)


@dataclass(slots=True)
class _Big:
    """A large file: created in order by the writer thread, then streamed in the background."""

    op: Op
    node: FileNode
    cost: int
    task: asyncio.Future[bytes] | None = None
    """The reader opened and the first block read ahead (blob services without BulkReads)."""
    reader: BlobReader | None = None
    done: asyncio.Future[object] | None = None
    """The writer thread's answer: ``(fd, copy)``, the copy a future of the BulkReads copier (or ``None``)."""
    streamed: bool = False
    """Whether a stream took the answer over (it then closes the file)."""
    after: threading.Event | None = None
    made: threading.Event = field(default_factory=threading.Event)


class _WriterThread:
    """Writes the units of the window, in threads that keep going while there is work.

    The event loop queues each unit as soon as its read is started; a
    thread waits for the read's result itself, so no round trip through the
    event loop separates one write from the next.  With several writers
    (each with its own :class:`Writer`), units are dealt out in turn; a
    unit's new directories are created first, and the next unit starts only
    once they exist (its files may be in them), so files of consecutive
    units are created in parallel.  With BulkReads, large files
    are copied by :data:`STREAMS` further threads.
    """

    def __init__(self, writers: list[Writer], copier: Callable[[int, FileNode, threading.Event], bool] | None) -> None:
        self.copier = copier
        self.stop = threading.Event()
        self.loop = asyncio.get_running_loop()
        self.queues: list[SimpleQueue[_Batch | _Big | None]] = [SimpleQueue() for _ in writers]
        self.submitted = 0
        self.last: threading.Event | None = None
        self.copies = ThreadPoolExecutor(STREAMS, "nixcas-export-copy") if copier is not None else None
        self.threads = [
            threading.Thread(target=self._main, args=(w, q), name="nixcas-export-writer", daemon=True)
            for w, q in zip(writers, self.queues, strict=True)
        ]
        for thread in self.threads:
            thread.start()

    def submit(self, unit: _Batch | _Big) -> None:
        unit.done = self.loop.create_future()
        unit.after, self.last = self.last, unit.made
        self.queues[self.submitted % len(self.queues)].put(unit)
        self.submitted += 1

    def _main(self, writer: Writer, queue: SimpleQueue[_Batch | _Big | None]) -> None:
        while (unit := queue.get()) is not None:
            try:
                if unit.after is not None:
                    unit.after.wait()
                if self.stop.is_set():
                    raise asyncio.CancelledError
                result = self._write(writer, unit)
            except BaseException as e:
                self.stop.set()
                self._answer(unit, None, e)
            else:
                self._answer(unit, result, None)
            finally:
                unit.made.set()

    def _write(self, writer: Writer, unit: _Batch | _Big) -> object:
        if isinstance(unit, _Batch):
            writer.run(unit.dirs, {})
            unit.made.set()
            writer.run(unit.ops, unit.data.result() if unit.data is not None else {})
            return None
        op = unit.op
        fd = writer.create(op[1], op[2], unit.node)
        unit.made.set()
        if self.copies is None or self.copier is None:
            return fd, None
        try:
            return fd, self.copies.submit(self.copier, fd, unit.node, self.stop)
        except BaseException:
            os.close(fd)
            raise

    def _answer(self, unit: _Batch | _Big, result: object, error: BaseException | None) -> None:
        done = unit.done
        assert done is not None

        def settle() -> None:
            if done.cancelled():
                if error is None and isinstance(result, tuple):
                    _close_when_done(result[0], result[1])  # a big file nobody will stream
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result)

        self.loop.call_soon_threadsafe(settle)

    async def close(self) -> None:
        """Stop after the current units; wait for the threads and every copy (no write runs afterwards)."""
        for queue in self.queues:
            queue.put(None)
        for thread in self.threads:
            await to_thread_uninterrupted(thread.join)
        if self.copies is not None:
            copies = self.copies
            await to_thread_uninterrupted(lambda: copies.shutdown(wait=True, cancel_futures=True))


def _close_when_done(fd: int, copy: Future[bool] | None) -> None:
    """Close ``fd`` now, or once ``copy`` (which writes to it) has finished."""
    if copy is None:
        os.close(fd)
    else:
        copy.add_done_callback(lambda _: os.close(fd))


class Materializer:
    def __init__(self, plan: Plan, writers: list[Writer], blobs: BlobService, prefetch: int, buffer_bytes: int) -> None:
        self.plan = plan
        self.writers = writers
        self.blobs = blobs
        self.prefetch = max(1, prefetch)
        self.buffer_bytes = max(1, buffer_bytes)
        self.small = min(SMALL_FILE, self.buffer_bytes // 4)
        self.batch_bytes = min(BATCH_BYTES, self.buffer_bytes)
        self.ops = plan.ops()
        self.peeked: Op | None = None
        self.window: deque[_Batch | _Big] = deque()
        self.held = 0
        self.batches = 0
        self.reads = blobs.bulk_reads()
        whole = min(self.reads.whole_max, self.buffer_bytes // 8) if self.reads is not None else 0
        self.copier = bulk_copier(self.reads, whole) if self.reads is not None else None
        self.streams: dict[asyncio.Future[None], _Big] = {}
        self.thread: _WriterThread | None = None

    def _take(self) -> Op | None:
        op, self.peeked = self.peeked, None
        return op if op is not None else next(self.ops, None)

    def _is_big(self, op: Op) -> bool:
        return op[0] == FILE and isinstance(op[3], FileNode) and op[3].size > self.small

    def _fill(self) -> None:
        assert self.thread is not None
        while len(self.window) < self.prefetch and (not self.window or self.held < self.buffer_bytes):
            op = self._take()
            if op is None:
                return
            if self._is_big(op):
                node = op[3]
                assert isinstance(node, FileNode)
                big = _Big(op, node, 0 if self.copier is not None else min(node.size, BLOCK))
                if self.copier is None:  # the head is read ahead; the BulkReads copier reads it
                    big.task = asyncio.ensure_future(self._open_big(big))
                self.window.append(big)
                self.thread.submit(big)
                self.held += big.cost
                continue
            if self.batches >= BATCHES:
                self.peeked = op
                return
            batch = _Batch([], {})
            files = 0
            while True:
                (batch.dirs if op[0] == MKDIR else batch.ops).append(op)
                if op[0] == FILE:
                    node = op[3]
                    assert isinstance(node, FileNode)
                    if node.size:
                        files += 1
                        batch.cost += node.size
                        if node.size > batch.sizes.get(node.digest, 0):
                            batch.sizes[node.digest] = node.size
                nxt = self._take()
                if nxt is None:
                    break
                size = nxt[3].size if nxt[0] == FILE and isinstance(nxt[3], FileNode) else 0
                if (
                    self._is_big(nxt)
                    or len(batch.ops) + len(batch.dirs) >= BATCH_OPS
                    or (size and (files >= BATCH_FILES or batch.cost + size > self.batch_bytes))
                ):
                    self.peeked = nxt
                    break
                op = nxt
            if batch.sizes:
                batch.task = asyncio.ensure_future(self._read(batch.sizes))
                batch.data = _bridge(batch.task)
            self.window.append(batch)
            self.thread.submit(batch)
            self.held += batch.cost
            self.batches += 1

    async def _read(self, sizes: dict[B3Digest, int]) -> dict[B3Digest, bytes | memoryview]:
        """The blobs of a batch, each verified (missing ones, and ones of another size, may be left out)."""
        if self.reads is None:
            return dict(await self.blobs.read_many(sizes, parallel=self.prefetch))
        found, rest = await asyncio.to_thread(bulk_batch, self.reads, sizes)
        if rest:
            found.update(await self.blobs.read_many({d: sizes[d] for d in rest}, parallel=self.prefetch))
        return found

    async def _open_big(self, big: _Big) -> bytes:
        reader = await self.blobs.open_read(big.node.digest)
        if reader is None:
            raise self._missing(big.op)
        big.reader = reader
        first = await reader.read(min(BLOCK, big.node.size))
        if not first:
            raise self._short(big.op, 0)
        return first

    def _missing(self, op: Op) -> NotFoundError:
        assert isinstance(op[3], FileNode)
        return NotFoundError(f"blob {op[3].digest.hex()} not found (needed at {self.plan.show(op[1], op[2])})")

    def _short(self, op: Op, got: int) -> StorageError:
        assert isinstance(op[3], FileNode)
        return StorageError(
            f"blob {op[3].digest.hex()} ended after {got} of the {op[3].size} bytes "
            f"file {self.plan.show(op[1], op[2])} declares"
        )

    def _long(self, op: Op) -> StorageError:
        assert isinstance(op[3], FileNode)
        return StorageError(
            f"blob {op[3].digest.hex()} is longer than the {op[3].size} bytes "
            f"file {self.plan.show(op[1], op[2])} declares"
        )

    async def _explain(self, op: Op, found: dict[B3Digest, bytes | memoryview]) -> NixcasError:
        """Why a batch had no fitting bytes for ``op``'s blob."""
        node = op[3]
        assert isinstance(node, FileNode)
        data = found.get(node.digest)
        if data is not None and len(data) < node.size:
            return self._short(op, len(data))
        if data is None and not await self.blobs.has(node.digest):
            return self._missing(op)
        return self._long(op)

    async def _finish(self, unit: _Batch | _Big) -> None:
        """Wait for the writer thread to have written ``unit``; a large file then streams in the background."""
        assert unit.done is not None
        if isinstance(unit, _Batch):
            try:
                await unit.done
            except BadBlob as e:
                assert unit.task is not None
                raise await self._explain(e.op, unit.task.result()) from None
            return
        answer = await unit.done
        assert isinstance(answer, tuple)
        fd: int = answer[0]
        copy: Future[bool] | None = answer[1]
        task = asyncio.ensure_future(self._stream(unit, fd, copy))
        task.add_done_callback(lambda _: _close_when_done(fd, copy))  # also when cancelled before it ran
        unit.streamed = True
        self.streams[task] = unit
        await self._drain(STREAMS)

    async def _drain(self, left: int) -> None:
        """Wait until at most ``left`` streams run; the first failure raises."""
        while len(self.streams) > left:
            done, _ = await asyncio.wait(self.streams, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                del self.streams[task]
                task.result()

    async def _stream(self, big: _Big, fd: int, copy: Future[bool] | None) -> None:
        if copy is not None:
            if await uninterrupted(asyncio.wrap_future(copy)):
                return
            big.task = asyncio.ensure_future(self._open_big(big))
        await self._write_big(big, fd)

    async def _write_big(self, big: _Big, fd: int) -> None:
        """A large file through the blob service's verifying reader, one block read ahead of the write."""
        assert big.task is not None
        op, size = big.op, big.node.size
        pending: asyncio.Future[bytes] | None = None
        try:
            data = await big.task
            reader = big.reader
            assert reader is not None
            got = 0
            while True:
                got += len(data)
                if got > size:
                    raise self._long(op)
                if got < size:
                    pending = asyncio.ensure_future(reader.read(min(BLOCK, size - got)))
                await to_thread_uninterrupted(functools.partial(write_all, fd, data))
                if pending is None:
                    break
                data = await pending
                pending = None
                if not data:
                    raise self._short(op, got)
            if await reader.read(1):  # the end of the blob: this completes its verification
                raise self._long(op)
        finally:
            if pending is not None:
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)
            if big.reader is not None:
                reader, big.reader = big.reader, None
                await reader.close()

    async def run(self) -> None:
        self.thread = _WriterThread(self.writers, self.copier)
        try:
            self._fill()
            while self.window:
                unit = self.window[0]
                await self._finish(unit)
                self.window.popleft()
                self.held -= unit.cost
                if isinstance(unit, _Batch):
                    self.batches -= 1
                self._fill()
            await self._drain(0)
        finally:
            await self._abandon()

    async def _abandon(self) -> None:
        """Stop the writer thread and the streams, cancel the reads still in the window, close their readers."""
        assert self.thread is not None
        self.thread.stop.set()
        units: list[_Batch | _Big] = [*self.window, *self.streams.values()]
        futures: list[asyncio.Future[object]] = list(self.streams)  # type: ignore[arg-type]
        self.streams.clear()
        for unit in units:
            if unit.task is not None:
                futures.append(unit.task)  # type: ignore[arg-type]
        for fut in futures:
            fut.cancel()
        await asyncio.gather(*futures, return_exceptions=True)
        await self.thread.close()
        for unit in units:
            if isinstance(unit, _Big) and unit.reader is not None:
                with contextlib.suppress(Exception):
                    await unit.reader.close()
                unit.reader = None
            if unit.done is not None and unit.done.done() and not unit.done.cancelled():
                answer = unit.done.exception() or unit.done.result()  # retrieved: no "never retrieved" warning
                if isinstance(unit, _Big) and not unit.streamed and isinstance(answer, tuple):
                    _close_when_done(answer[0], answer[1])  # created, never streamed
        self.window.clear()


def _bridge(task: asyncio.Future[T]) -> Future[T]:
    """A :class:`concurrent.futures.Future` with ``task``'s outcome, for a thread to wait on."""
    out: Future[T] = Future()

    def copy(done: asyncio.Future[T]) -> None:
        if done.cancelled():
            out.set_exception(asyncio.CancelledError())
        elif (error := done.exception()) is not None:
            out.set_exception(error)
        else:
            out.set_result(done.result())

    task.add_done_callback(copy)
    return out

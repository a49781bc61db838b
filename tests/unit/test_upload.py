"""The one uploader every ingest feeds (castore/upload.py): batching, streaming, bounds, errors."""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import blake3
import pytest

import nixcas.castore.upload as upload_module
from nixcas.castore.blob.base import BlobWriter
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.digest import EMPTY_DIGEST, B3Digest
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.ingest import ingest_path
from nixcas.castore.nodes import FileNode
from nixcas.castore.upload import PendingFile, Uploader, run_ahead
from nixcas.errors import IngestError, StorageError
from nixcas.store.nar.ingest import ingest_nar_bytes
from nixcas.store.nar.wire import NAR_MAGIC


def b3(data: bytes) -> B3Digest:
    return B3Digest(blake3.blake3(data).digest())


class Recording(MemoryBlobService):
    """Records every ``put_many`` and the writes of streamed blobs.

    ``gate`` (if set) holds ``put_many`` until it is set; ``fail_batch`` fails it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[bytes]] = []
        self.writes: list[int] = []
        self.gate: asyncio.Event | None = None
        self.fail_batch = False

    async def put_many(self, blobs: Sequence[bytes]) -> list[B3Digest]:
        self.batches.append(list(blobs))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_batch:
            raise StorageError("disk full")
        return await super().put_many(blobs)

    async def open_write(self, expected_size: int | None = None) -> BlobWriter:
        writer = await super().open_write(expected_size)
        if expected_size is not None and expected_size <= upload_module.SMALL_BLOB:
            return writer  # put_many of the memory service writes each small blob this way
        writes = self.writes
        inner_write = writer.write

        async def write(data: bytes) -> None:
            writes.append(len(data))
            await inner_write(data)

        writer.write = write  # type: ignore[method-assign]
        return writer


async def node_of(pending: PendingFile | FileNode) -> FileNode:
    return pending if isinstance(pending, FileNode) else await pending.node()


async def test_small_files_go_in_batches_by_count_and_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upload_module, "BATCH_FILES", 4)
    monkeypatch.setattr(upload_module, "BATCH_BYTES", 100)
    blobs = Recording()
    files = [b"x%d" % i for i in range(10)] + [b"y" * 60, b"z" * 60, b"w"]
    async with Uploader(blobs) as uploader:
        pending = [uploader.small(data, i % 3 == 0) for i, data in enumerate(files)]
        await uploader.finish()
        nodes = [await node_of(p) for p in pending]
    assert [len(b) for b in blobs.batches] == [4, 4, 4, 1]  # 2 + 60 + 60 bytes ended the third batch
    assert nodes == [FileNode(b3(data), len(data), i % 3 == 0) for i, data in enumerate(files)]


async def test_empty_files_need_no_upload_and_the_empty_blob_is_stored_once() -> None:
    blobs = Recording()
    async with Uploader(blobs) as uploader:
        nodes = [uploader.small(b"", True), uploader.small(b"a", False), uploader.small(b"", False)]
        await uploader.finish()
    assert nodes[0] == FileNode(EMPTY_DIGEST, 0, True) and nodes[2] == FileNode(EMPTY_DIGEST, 0, False)
    assert blobs.batches == [[b"", b"a"]]
    assert await blobs.has(EMPTY_DIGEST)


async def test_a_pending_file_of_a_batch_not_started_starts_it() -> None:
    blobs = Recording()
    async with Uploader(blobs) as uploader:
        pending = uploader.small(b"alone", False)
        assert isinstance(pending, PendingFile) and pending.ready() is None and blobs.batches == []
        assert await asyncio.wait_for(pending.node(), 5) == FileNode(b3(b"alone"), 5, False)
        assert pending.ready() == FileNode(b3(b"alone"), 5, False)


async def test_room_waits_while_too_many_batches_upload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upload_module, "BATCH_FILES", 1)
    blobs = Recording()
    blobs.gate = asyncio.Event()
    async with Uploader(blobs) as uploader:
        for i in range(upload_module.BATCHES_AHEAD):
            uploader.small(b"%d" % i, False)
        await asyncio.wait_for(uploader.room(), 5)  # BATCHES_AHEAD uploading: still room
        uploader.small(b"one more", False)
        waiting = asyncio.ensure_future(uploader.room())
        await asyncio.sleep(0.01)
        assert not waiting.done()  # the bytes held stay bounded: the source must wait
        blobs.gate.set()
        await asyncio.wait_for(waiting, 5)
        await uploader.finish()
    assert len(blobs.batches) == upload_module.BATCHES_AHEAD + 1


async def test_a_failed_batch_fails_finish_and_its_files() -> None:
    blobs = Recording()
    blobs.fail_batch = True
    async with Uploader(blobs) as uploader:
        pending = uploader.small(b"lost", False)
        with pytest.raises(StorageError, match="disk full"):
            await uploader.finish()
        assert isinstance(pending, PendingFile)
        with pytest.raises(StorageError, match="disk full"):
            pending.ready()


async def test_leaving_cancels_uploads_still_running() -> None:
    blobs = Recording()
    blobs.gate = asyncio.Event()  # never set
    async with Uploader(blobs) as uploader:
        pending = uploader.small(b"stuck", False)
        uploader.flush()
        await asyncio.sleep(0)
    assert isinstance(pending, PendingFile)
    with pytest.raises(asyncio.CancelledError):
        await pending.node()


async def test_stream_joins_small_pieces_into_blocks_and_checks_the_length(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upload_module, "BLOCK", 10)
    monkeypatch.setattr(upload_module, "SMALL_BLOB", 0)  # record every write
    data = bytes(range(47))
    pieces = [data[i : i + 3] for i in range(0, len(data), 3)]

    def reader(parts: list[bytes]) -> AsyncIterator[bytes]:
        async def read_all() -> AsyncIterator[bytes]:
            for p in parts:
                yield p
            while True:
                yield b""

        return read_all()

    blobs = Recording()
    async with Uploader(blobs) as uploader:
        source = reader(pieces)
        digest = await uploader.stream(len(data), lambda n: anext(source), "f")
        assert digest == b3(data)
        assert blobs.writes == [12, 12, 12, 11]  # pieces of 3 joined until a block of 10 is reached; the rest

        short = reader(pieces)
        with pytest.raises(IngestError, match=r"^g: ended after 47 of 50 bytes$"):
            await uploader.stream(50, lambda n: anext(short), "g")

        long = reader([*pieces, b"extra"])
        with pytest.raises(IngestError, match=r"^h: longer than its declared size 47$"):
            await uploader.stream(len(data), lambda n: anext(long), "h", check_end=True)


async def test_large_uploads_run_at_most_large_parallel_at_once() -> None:
    blobs = Recording()
    running = 0
    most = 0
    release = asyncio.Event()

    async def upload(i: int) -> B3Digest:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1
        return b3(b"%d" % i)

    async with Uploader(blobs) as uploader:
        pending = [uploader.large(10, False, functools.partial(upload, i)) for i in range(5)]
        await asyncio.sleep(0.01)
        assert running == upload_module.LARGE_PARALLEL
        release.set()
        await uploader.finish()
        assert [await p.node() for p in pending] == [FileNode(b3(b"%d" % i), 10, False) for i in range(5)]
    assert most == upload_module.LARGE_PARALLEL


async def test_run_ahead_is_bounded_and_raises_a_source_error_in_order() -> None:
    produced = 0

    async def source() -> AsyncIterator[list[int]]:
        nonlocal produced
        for i in range(20):
            produced += 1
            yield [2 * i, 2 * i + 1]
        raise IngestError("broken at the end")

    items = run_ahead(source(), depth=2)
    assert await anext(items) == 0
    await asyncio.sleep(0.01)
    assert produced <= 4  # one taken, two queued, one waiting to be queued
    seen = [0]

    async def consume() -> None:
        async for item in items:
            seen.append(item)

    with pytest.raises(IngestError, match="broken at the end"):
        await consume()
    assert seen == list(range(40))


async def test_every_ingest_feeds_the_uploader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The walk and NAR ingest batch small files with the same constants and stream large ones."""
    monkeypatch.setattr(upload_module, "BATCH_FILES", 3)
    tree = tmp_path / "t"
    tree.mkdir()
    for i in range(7):
        (tree / f"f{i}").write_bytes(b"small %d" % i)
    (tree / "big").write_bytes(os.urandom(upload_module.SMALL_BLOB + 1))
    blobs, directories = Recording(), MemoryDirectoryService()
    root = await ingest_path(tree, blobs, directories)
    assert sorted(len(b) for b in blobs.batches) == [1, 3, 3]
    assert sum(blobs.writes) == upload_module.SMALL_BLOB + 1

    def s(b: bytes) -> bytes:
        return len(b).to_bytes(8, "little") + b + b"\0" * (-len(b) % 8)

    def file(contents: bytes) -> bytes:
        return s(b"(") + s(b"type") + s(b"regular") + s(b"contents") + s(contents) + s(b")")

    names = sorted([b"big", *(b"f%d" % i for i in range(7))])
    body = b"".join(
        s(b"entry") + s(b"(") + s(b"name") + s(n) + s(b"node") + file((tree / n.decode()).read_bytes()) + s(b")")
        for n in names
    )
    nar = NAR_MAGIC + s(b"(") + s(b"type") + s(b"directory") + body + s(b")")
    nar_blobs = Recording()
    nar_root, size, _ = await ingest_nar_bytes(nar, nar_blobs, MemoryDirectoryService())
    assert nar_root == root and size == len(nar)
    assert sorted(len(b) for b in nar_blobs.batches) == [1, 3, 3]
    assert sum(nar_blobs.writes) == upload_module.SMALL_BLOB + 1


async def test_files_given_with_their_digests_have_their_nodes_at_once() -> None:
    """small_hashed: the node at once, the blob stored with its batch (apart from files without a digest)."""
    blobs = Recording()
    blobs.gate = asyncio.Event()
    async with Uploader(blobs) as uploader:
        plain = uploader.small(b"plain", False)
        hashed = uploader.small_hashed(b3(b"given"), memoryview(b"given"), True)  # a batch of its own
        assert hashed == FileNode(b3(b"given"), 5, True)
        empty = uploader.small_hashed(EMPTY_DIGEST, b"", False)
        assert empty == FileNode(EMPTY_DIGEST, 0, False)
        uploader.flush()
        blobs.gate.set()
        await uploader.finish()
        assert await node_of(plain) == FileNode(b3(b"plain"), 5, False)
    assert [[bytes(b) for b in batch] for batch in blobs.batches] == [[b"plain"], [b"given", b""]]
    assert await blobs.read(b3(b"given")) == b"given"


async def test_when_stored_waits_for_the_batches_started_since_the_last_call() -> None:
    blobs = Recording()
    blobs.gate = asyncio.Event()
    called: list[str] = []
    async with Uploader(blobs) as uploader:
        uploader.when_stored(lambda: called.append("nothing held"))
        assert called == ["nothing held"]  # nothing uploading: at once
        uploader.small(b"a", False)
        uploader.when_stored(lambda: called.append("a stored"))
        uploader.small(b"b", False)
        uploader.when_stored(lambda: called.append("b stored"))
        await asyncio.sleep(0.05)
        assert called == ["nothing held"]  # both batches wait at the gate
        blobs.gate.set()
        await uploader.finish()
        await asyncio.sleep(0.01)  # the callbacks of the finished batches run
        assert called == ["nothing held", "a stored", "b stored"]
        blobs.gate = None
        blobs.fail_batch = True
        uploader.small(b"c", False)
        uploader.when_stored(lambda: called.append("c done"))  # failed is done too
        with pytest.raises(StorageError):
            await uploader.finish()
        await asyncio.sleep(0.01)
        assert called[-1] == "c done"


async def test_a_file_without_its_digest_after_an_empty_one_with_it_is_hashed_by_the_store() -> None:
    """A batch that held only the empty file's turn (nothing queued) takes either kind next."""
    blobs = Recording()
    async with Uploader(blobs) as uploader:
        uploader.small_hashed(EMPTY_DIGEST, b"", False)  # stored with this batch
        uploader.small_hashed(EMPTY_DIGEST, b"", False)  # stored already: nothing queued
        uploader.flush()
        plain = uploader.small(b"plain", False)
        await uploader.finish()
        assert await node_of(plain) == FileNode(b3(b"plain"), 5, False)
    assert [[bytes(b) for b in batch] for batch in blobs.batches] == [[b""], [b"plain"]]

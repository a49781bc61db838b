"""The embedded store's blob backend, ``packed://``: small blobs as SQLite rows, large ones as object files."""

from __future__ import annotations

import sqlite3
import stat
import time
from collections.abc import Callable
from pathlib import Path

import blake3
import pytest

from nixcas.castore.blob.base import BlobService, ChunkMeta
from nixcas.castore.blob.local import LocalBlobService
from nixcas.castore.blob.packed import PackedBlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.gc import StoredObject
from nixcas.composition import blob_service_from_url
from nixcas.errors import ChecksumMismatch, ConfigurationError, StorageError
from nixcas.testing import packed


def b3(data: bytes) -> B3Digest:
    return B3Digest(blake3.blake3(data).digest())


def object_files(root: Path, kind: str) -> list[str]:
    base = root / kind / "b3"
    return sorted(p.name for p in base.rglob("*") if p.is_file()) if base.exists() else []


SMALL = b"small blob " * 100  # compressible, well below the inline limit
TINY = b"x"  # stored raw
LARGE = blake3.blake3(b"large").digest(length=3 << 20)  # chunked


async def open_packed(root: Path, options: str = "?compress=true") -> PackedBlobService:
    svc = await blob_service_from_url(f"packed://{root}{options}")
    assert isinstance(svc, PackedBlobService)
    return svc


async def test_small_blobs_are_rows_and_large_ones_object_files(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    svc = await open_packed(root)
    try:
        small, tiny = await svc.put_many([SMALL, TINY])
        large = await svc.put(LARGE)
        await svc.sync()
    finally:
        await svc.close()
    assert packed.row_digests(root) == sorted([bytes(small), bytes(tiny)])
    assert object_files(root, "chunks") and bytes(small).hex() not in object_files(root, "chunks")
    assert object_files(root, "blobs") == [bytes(large).hex()]  # the index of the chunked blob only
    with sqlite3.connect(root / "packs.sqlite") as db:
        codecs = dict(db.execute("SELECT size, codec FROM blobs"))
    assert codecs == {len(SMALL): 1, len(TINY): 0}
    svc = await open_packed(root)  # a new process sees them
    try:
        assert await svc.read_many({small: len(SMALL), tiny: 1, large: len(LARGE)}) == {
            small: SMALL,
            tiny: TINY,
            large: LARGE,
        }
        assert await svc.chunks(small) == []
        assert await svc.has(small) and await svc.has(large)
    finally:
        await svc.close()


async def test_reads_a_store_written_in_the_object_layout(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    old = LocalBlobService(root)  # what the embedded store was before packed://
    digests = await old.put_many([SMALL, TINY, LARGE])
    await old.close()
    svc = await open_packed(root)
    try:
        assert await svc.read_many(dict(zip(digests, (len(SMALL), 1, len(LARGE)), strict=True))) == dict(
            zip(digests, (SMALL, TINY, LARGE), strict=True)
        )
        reader = await svc.open_read(digests[0])
        assert reader is not None
        async with reader:
            assert await reader.read_all() == SMALL
        scanned = {o.digest async for batch in svc.scan_blobs() for o in batch}
        assert scanned == set(digests)
    finally:
        await svc.close()
    assert packed.row_digests(root) == []  # nothing moved


@pytest.mark.parametrize("compress", [True, False])
async def test_a_damaged_row_is_never_served(tmp_path: Path, compress: bool) -> None:
    root = tmp_path / "blobs"
    svc = await open_packed(root)
    try:
        digest = await svc.put(SMALL)
        assert packed.corrupt_blob(root, digest, SMALL[:-1] + b"?", compress=compress)
        reader = await svc.open_read(digest)
        assert reader is not None
        with pytest.raises(ChecksumMismatch):
            await reader.read_all()
        with pytest.raises(ChecksumMismatch):
            await svc.read_many({digest: len(SMALL)})
    finally:
        await svc.close()


async def test_a_row_whose_bytes_disagree_with_its_size_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    svc = await open_packed(root)
    try:
        digest = await svc.put(SMALL)
        with sqlite3.connect(root / "packs.sqlite") as db:
            db.execute("UPDATE blobs SET size = size - 1 WHERE digest = ?", (bytes(digest),))
        with pytest.raises(StorageError, match=r"cannot decompress|recorded"):
            await svc.read_many({digest: len(SMALL)})
    finally:
        await svc.close()


async def test_gc_deletes_rows_only_while_they_are_old(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    svc = await open_packed(root)
    try:
        keep, drop = await svc.put_many([SMALL, TINY])
        scanned = [o async for batch in svc.scan_blobs() for o in batch]
        assert {o.digest for o in scanned} == {keep, drop}
        cutoff = time.time_ns()
        await svc.put(SMALL)  # re-put after the scan: young again
        done = await svc.delete_blobs(scanned, cutoff)
        assert [o.digest for o in done.deleted] == [drop]
        assert [o.digest for o in done.kept] == [keep]
        assert not await svc.has(drop) and await svc.has(keep)
        again = await svc.delete_blobs([StoredObject(drop, 0, 0)], time.time_ns())
        assert not again.deleted and not again.kept  # already gone: done
    finally:
        await svc.close()


async def test_rows_are_raw_by_default(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    svc = await open_packed(root, "")
    try:
        digest = await svc.put(SMALL)
        assert await svc.read_many({digest: len(SMALL)}) == {digest: SMALL}
    finally:
        await svc.close()
    with sqlite3.connect(root / "packs.sqlite") as db:
        assert db.execute("SELECT codec FROM blobs").fetchall() == [(0,)]
    assert packed.rows(root, [digest]) == [SMALL]
    (pack,) = (root / "packs").iterdir()
    assert pack.read_bytes() == SMALL  # raw bytes, appended


@pytest.mark.parametrize("url", ["packed://relative", "packed://host/p", "packed:///p?compress=yes"])
async def test_bad_urls(url: str) -> None:
    with pytest.raises(ConfigurationError):
        await blob_service_from_url(url)


async def test_the_embedded_store_uses_packed(tmp_path: Path) -> None:
    from nixcas.api import service_urls

    blob_url, _, _ = service_urls(tmp_path)
    svc: BlobService = await blob_service_from_url(blob_url)
    try:
        assert isinstance(svc, PackedBlobService)
        assert svc.root == tmp_path.absolute() / "blobs"
    finally:
        await svc.close()


async def test_gc_compacts_packs_and_keeps_what_lives(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    svc = await open_packed(root, "")
    live = [b"live %d " % i * 50 for i in range(10)]
    dead = [b"dead %d " % i * 500 for i in range(10)]
    try:
        await svc.put_many(live + dead)
        before = {p.name: p.stat().st_size for p in (root / "packs").iterdir()}
        scanned = [o async for batch in svc.scan_blobs() for o in batch]
        await svc.delete_blobs([o for o in scanned if o.digest in {b3(d) for d in dead}], time.time_ns())
        # this service's own pack is locked by it as long as it may append: not compacted
        assert await svc.sweep_temporary(time.time_ns(), dry_run=False) == []
    finally:
        await svc.close()
    svc = await open_packed(root, "")
    try:
        dry = await svc.sweep_temporary(time.time_ns(), dry_run=True)
        assert [o.size for o in dry] == [sum(len(d) for d in dead)]
        assert {p.name: p.stat().st_size for p in (root / "packs").iterdir()} == before
        freed = await svc.sweep_temporary(time.time_ns(), dry_run=False)
        assert [o.size for o in freed] == [sum(len(d) for d in dead)]
        (pack,) = (root / "packs").iterdir()
        assert pack.name not in before and pack.stat().st_size == sum(len(d) for d in live)
        assert await svc.read_many({b3(d): len(d) for d in live}) == {b3(d): d for d in live}
        assert await svc.sweep_temporary(time.time_ns(), dry_run=False) == []  # nothing left to do
    finally:
        await svc.close()


async def test_a_pack_without_rows_is_removed_after_the_cutoff(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    svc = await open_packed(root, "")
    try:
        orphan = root / "packs" / "deadbeef.pack"  # a writer died before committing its first rows
        orphan.write_bytes(b"x" * 100)
        assert await svc.sweep_temporary(time.time_ns() - 3600 * 10**9, dry_run=False) == []  # young: kept
        freed = await svc.sweep_temporary(time.time_ns() + 10**9, dry_run=False)
        assert [o.size for o in freed] == [100] and not orphan.exists()
    finally:
        await svc.close()


async def test_a_row_never_names_bytes_that_were_not_synced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pack is fsync-ed before the rows naming its bytes are committed; a failing fsync commits nothing."""
    import os

    root = tmp_path / "blobs"
    svc = await open_packed(root, "")
    calls: list[str] = []
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):  # a new pack's directory: fine
            return real_fsync(fd)
        calls.append("fsync")
        raise OSError(5, "Input/output error")

    try:
        monkeypatch.setattr(os, "fsync", failing_fsync)
        with pytest.raises(OSError, match="Input/output"):
            await svc.put_many([SMALL])
        assert calls == ["fsync"] and packed.row_digests(root) == []
        monkeypatch.setattr(os, "fsync", real_fsync)
        digest = (await svc.put_many([SMALL]))[0]  # a new pack: the failed one's bytes are dead space
        assert await svc.read_many({digest: len(SMALL)}) == {digest: SMALL}
        assert len(list((root / "packs").iterdir())) == 2
    finally:
        await svc.close()


async def test_a_pack_holding_only_the_empty_blob_is_left_alone(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    svc = await open_packed(root, "")
    try:
        empty = await svc.put(b"")
    finally:
        await svc.close()
    svc = await open_packed(root, "")
    try:
        assert await svc.sweep_temporary(time.time_ns(), dry_run=False) == []  # 0 live bytes of 0: not garbage
        assert await svc.read_many({empty: 0}) == {empty: b""}
    finally:
        await svc.close()


async def test_reads_across_more_packs_than_it_keeps_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nixcas.castore.blob.packed as packed_module

    monkeypatch.setattr(packed_module, "MAX_OPEN_PACKS", 2)
    root = tmp_path / "blobs"
    blobs = [b"blob in pack %d\n" % i for i in range(5)]
    for data in blobs:  # each service (each process) appends to a pack of its own
        svc = await open_packed(root, "")
        await svc.put(data)
        await svc.close()
    assert len(list((root / "packs").iterdir())) == 5
    svc = await open_packed(root, "")
    try:
        for _ in range(2):
            assert await svc.read_many({b3(d): len(d) for d in blobs}) == {b3(d): d for d in blobs}
            assert len(svc._readers) == 2
    finally:
        await svc.close()


async def test_gc_merges_many_small_packs_into_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nixcas.castore.blob.packcompact as packcompact

    monkeypatch.setattr(packcompact, "MERGE_COUNT", 4)
    root = tmp_path / "blobs"
    blobs = [b"one import's blob %d\n" % i for i in range(5)]
    for data in blobs[:3]:
        svc = await open_packed(root, "")
        await svc.put(data)
        await svc.close()
    svc = await open_packed(root, "")
    try:
        assert await svc.sweep_temporary(time.time_ns(), dry_run=False) == []
        assert len(list((root / "packs").iterdir())) == 3  # fewer than MERGE_COUNT: left alone
    finally:
        await svc.close()
    for data in blobs[3:]:
        svc = await open_packed(root, "")
        await svc.put(data)
        await svc.close()
    svc = await open_packed(root, "")
    try:
        assert await svc.sweep_temporary(time.time_ns(), dry_run=False) == []  # nothing dead: nothing freed
        (pack,) = (root / "packs").iterdir()
        assert pack.stat().st_size == sum(map(len, blobs))
        assert await svc.read_many({b3(d): len(d) for d in blobs}) == {b3(d): d for d in blobs}
    finally:
        await svc.close()


async def test_a_new_pack_removed_before_its_writer_locked_it_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GC may take a just-created, not yet locked pack for an orphan and remove it: the writer starts another."""
    import fcntl
    import os

    root = tmp_path / "blobs"
    svc = await open_packed(root, "")
    real_flock = fcntl.flock
    removed: list[str] = []

    def flock_after_a_gc(fd: int, operation: int) -> None:
        if not removed:  # the first pack vanishes between its creation and its lock
            (victim,) = (root / "packs").iterdir()
            victim.unlink()
            removed.append(victim.name)
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock_after_a_gc)
    try:
        digest = await svc.put(SMALL)
        (pack,) = (root / "packs").iterdir()
        assert pack.name != removed[0]
        monkeypatch.setattr(fcntl, "flock", real_flock)
        assert await svc.read_many({digest: len(SMALL)}) == {digest: SMALL}
        assert os.path.getsize(pack) == len(SMALL)
    finally:
        await svc.close()


@pytest.mark.parametrize("url", ["packed://{}", "objectstore+file://{}"])
async def test_read_chunks_checks_each_chunk_and_the_whole_blob(tmp_path: Path, url: str) -> None:
    """BulkReads.read_chunks: a chunked blob piece by piece; a chunk list of another blob fails at its end."""
    from nixcas.castore.objectstore.layout import blob_index_key

    svc = await blob_service_from_url(url.format(tmp_path / "blobs"))
    other = blake3.blake3(b"other").digest(length=len(LARGE))
    try:
        large, wrong = await svc.put(LARGE), await svc.put(other)
        small = await svc.put(SMALL)
        reads = svc.bulk_reads()
        assert reads is not None
        got = reads.read_chunks(bytes(large), len(LARGE))
        assert got is not None
        pieces = list(got)
        assert len(pieces) > 1 and b"".join(pieces) == LARGE
        assert reads.read_chunks(bytes(large), len(LARGE) - 1) is None  # another size
        assert reads.read_chunks(bytes(small), len(SMALL)) is None  # not chunked
        assert reads.read_chunks(b"\0" * 32, 5) is None  # missing
        index = tmp_path / "blobs" / blob_index_key(large)
        index.write_bytes((tmp_path / "blobs" / blob_index_key(wrong)).read_bytes())
        swapped = reads.read_chunks(bytes(large), len(LARGE))
        assert swapped is not None
        with pytest.raises(ChecksumMismatch, match=f"blob {bytes(large).hex()}"):
            list(swapped)  # every chunk is sound: only the whole blob's hash tells
    finally:
        await svc.close()


@pytest.mark.parametrize("url", ["packed://{}", "objectstore+file://{}"])
async def test_read_chunk_into_reads_the_chunk_object_verified(
    tmp_path: Path, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BulkReads.read_chunk_into: a chunk object read directly (no lookup of a blob of that digest first) and
    checked; damaged, it is not served; a chunk kept as a small blob (another form) is still found."""
    from nixcas.castore.objectstore.layout import chunk_key

    svc = await blob_service_from_url(url.format(tmp_path / "blobs"))
    try:
        large = await svc.put(LARGE)
        chunks = await svc.chunks(large)
        assert chunks is not None and len(chunks) > 1
        reads = svc.bulk_reads()
        assert reads is not None
        buffer = memoryview(bytearray(1 << 20))
        first, second = chunks[0], chunks[1]
        start = first.size
        with monkeypatch.context() as m:

            def no_lookup(digest: B3Digest) -> None:
                raise AssertionError(f"looked up {digest.hex()} as a blob")

            m.setattr(svc, "_chunks_sync", no_lookup)
            got = reads.read_chunk_into(bytes(second.digest), second.size, buffer)
        assert got is not None and bytes(got) == LARGE[start : start + second.size]
        assert reads.read_chunk_into(bytes(second.digest), second.size - 1, buffer) is None  # another size
        assert reads.read_chunk_into(b"\0" * 32, 5, buffer) is None  # missing
        path = tmp_path / "blobs" / chunk_key(first.digest)
        stored = bytearray(path.read_bytes())
        stored[-2] ^= 0xFF  # one byte of the contents (the frame's last block ends the file)
        path.write_bytes(stored)
        assert reads.read_chunk_into(bytes(first.digest), first.size, buffer) is None
        small = await svc.put(SMALL)  # a blob of one chunk: kept as a pack row by packed://
        got = reads.read_chunk_into(bytes(small), len(SMALL), buffer)
        assert got is not None and bytes(got) == SMALL
    finally:
        await svc.close()


async def _read_while_closing(
    blobs: PackedBlobService, monkeypatch: pytest.MonkeyPatch, slowed: str, read: Callable[[], object]
) -> object:
    """``read()`` on another thread, its ``slowed`` method held up until ``close()`` has begun; its result."""
    import asyncio
    import threading

    original = getattr(blobs, slowed)
    started = threading.Event()

    def slow(*args: object) -> object:
        started.set()
        time.sleep(0.3)
        return original(*args)

    monkeypatch.setattr(blobs, slowed, slow)
    result: list[object] = []
    reader = threading.Thread(target=lambda: result.append(read()))
    reader.start()
    assert await asyncio.to_thread(started.wait, 5)
    await blobs.close()
    reader.join()
    assert result and result[0] is not None, "the read was cut off by close()"
    assert read() is None  # closed: the caller falls back
    return result[0]


async def test_close_waits_for_bulk_reads_of_other_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read_run running on another thread finishes before close() closes the connections it uses.

    (NAR streams abandon reads that keep running on worker threads; closing a SQLite connection under a query
    of another thread crashed the process.)
    """
    blobs = PackedBlobService(tmp_path / "blobs")
    data = b"read while closing" * 50
    raw = bytes(await blobs.put(data))
    got = await _read_while_closing(
        blobs, monkeypatch, "_preadv", lambda: blobs.read_run([(raw, len(data))], memoryview(bytearray(1 << 16)))
    )
    assert [bytes(piece) for piece in got] == [data]  # type: ignore[attr-defined]


async def test_close_waits_for_whole_reads_of_chunked_blobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """read_whole of a chunked blob (its chunk list looked up in the thread's SQLite connection) running on
    another thread finishes before close() closes the connections (a pytest worker crashed there)."""
    blobs = PackedBlobService(tmp_path / "blobs")
    digest = await blobs.put(LARGE)
    assert await blobs.chunks(digest)
    buffer = memoryview(bytearray(len(LARGE)))
    got = await _read_while_closing(
        blobs, monkeypatch, "_chunks_sync", lambda: blobs.read_whole(bytes(digest), len(LARGE), buffer)
    )
    assert bytes(got) == LARGE  # type: ignore[call-overload]


async def test_close_waits_for_every_query_of_other_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only bulk reads: any read of a worker thread (here a chunk's, as read_many and NAR streams do) holds
    close() until its queries are done; once closed, a read is refused, never run on a closed connection
    (a pytest worker crashed in test_read_many_large)."""
    blobs = PackedBlobService(tmp_path / "blobs")
    digest = await blobs.put(SMALL)
    chunk = ChunkMeta(digest, len(SMALL))

    def read() -> bytes | None:
        try:
            return blobs._read_chunk_sync(chunk)
        except StorageError:
            return None

    assert await _read_while_closing(blobs, monkeypatch, "_select_sync", read) == SMALL


async def test_chunk_files_start_their_writeback_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every chunk file a large blob's writer stages, and every object put whole, has its disk write started
    when it is written (not at the final syncfs), and the blob reads back."""
    import os

    from nixcas.castore.objectstore import disk, writers

    started: list[int] = []
    start = disk.start_writeback

    def record(fd: int) -> None:
        started.append(os.fstat(fd).st_size)
        start(fd)

    monkeypatch.setattr(writers, "start_writeback", record)
    monkeypatch.setattr(disk, "start_writeback", record)
    root = tmp_path / "blobs"
    svc = await open_packed(root)
    try:
        writer = await svc.open_write(len(LARGE))
        async with writer:
            await writer.write(LARGE)
            digest = await writer.close()
        chunks = await svc.chunks(digest)
        assert chunks and len(started) == len({c.digest for c in chunks}) + 1  # each new chunk, then the index
        assert all(size > 0 for size in started)
        assert await svc.read_many({digest: len(LARGE)}) == {digest: LARGE}
    finally:
        await svc.close()


async def test_small_blobs_need_only_an_fsync_of_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``sync`` after small blobs alone is one ``fsync`` of SQLite's write-ahead log (their pack was ``fsync``-ed
    when appended, its name when created), no ``syncfs``; after a large blob's chunk files, one ``syncfs``."""
    import os

    from nixcas.castore.objectstore import disk

    barriers: list[Path] = []
    synced: list[int] = []
    real_fsync = os.fsync

    def record(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(disk, "_syncfs", barriers.append)
    monkeypatch.setattr(os, "fsync", record)
    root = tmp_path / "blobs"
    svc = await open_packed(root, "")
    try:
        small = (await svc.put_many([SMALL]))[0]
        await svc.put(TINY)
        pack = next((root / "packs").iterdir()).stat().st_ino
        assert pack in synced and (root / "packs").stat().st_ino in synced  # the bytes, the new pack's name
        synced.clear()
        await svc.sync()
        wal = (root / "packs.sqlite-wal").stat().st_ino
        assert barriers == [] and synced == [wal, root.stat().st_ino]  # the log, and once its name
        synced.clear()
        await svc.sync()  # nothing written since
        await svc.put(SMALL)  # present: its time refreshed, a row written
        await svc.sync()
        assert barriers == [] and synced == [wal]
        synced.clear()
        await svc.put_many_before_sync([b"the last batch of an ingest"])  # its log fsync in the same hand-off
        assert synced[-1] == wal
        count = len(synced)
        await svc.sync()
        assert len(synced) == count  # nothing left for the sync
        await svc.put(LARGE)
        await svc.sync()
        assert barriers == [root]
        assert await svc.read_many({small: len(SMALL)}) == {small: SMALL}
    finally:
        await svc.close()


async def test_a_sync_returns_only_after_a_log_fsync_that_covers_its_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Callers of ``sync`` while the write-ahead log's ``fsync`` runs wait for it (or a later one) and share it;
    rows committed after it started get their own."""
    import asyncio
    import threading

    from nixcas.castore.blob import packcompact

    started, release = threading.Event(), threading.Event()
    calls: list[int] = []
    real_sync_wal = packcompact.sync_wal

    def slow_sync_wal(path: str, named: int) -> int:
        calls.append(len(calls))
        started.set()
        release.wait(10)
        return real_sync_wal(path, named)

    monkeypatch.setattr(packcompact, "sync_wal", slow_sync_wal)
    svc = await open_packed(tmp_path / "blobs", "")
    try:
        await svc.put_many([SMALL])
        first = asyncio.ensure_future(svc.sync())
        assert await asyncio.to_thread(started.wait, 10)
        await svc.put_many([TINY])  # committed while the first fsync runs: not covered by it
        second, third = asyncio.ensure_future(svc.sync()), asyncio.ensure_future(svc.sync())
        await asyncio.sleep(0.02)
        assert not first.done() and not second.done() and not third.done()
        release.set()
        await asyncio.gather(first, second, third)
        assert calls == [0, 1]  # the second and third shared one fsync, started after TINY's commit
        await svc.sync()
        assert calls == [0, 1]  # nothing new
    finally:
        release.set()
        await svc.close()


async def test_missing_knows_rows_and_object_files(tmp_path: Path) -> None:
    """``missing`` (many ``has`` at once) sees the small blobs in packs, not only the object files."""
    root = tmp_path / "blobs"
    svc = await open_packed(root, "")
    try:
        small, tiny = await svc.put_many([SMALL, TINY])
        large = await svc.put(LARGE)
        absent = b3(b"never stored")
        assert await svc.missing([small, absent, large, tiny]) == [absent]
        assert await svc.missing([]) == []
    finally:
        await svc.close()

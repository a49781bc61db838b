"""``packed:///abs/path`` — the embedded store's blobs: small ones appended to pack files, large ones chunked.

Every blob small enough to be a single chunk (at most half the average
chunk size, 128 KiB by default) is appended to a *pack file*
(``DIR/packs/<name>.pack``) and indexed by one row of ``DIR/packs.sqlite``:
digest, size, the time it was last written or re-put, and where its bytes
are (pack, offset, length).  The bytes are stored raw, as Nix's own store
keeps files (reading them back is one ``pread`` and a BLAKE3), or
zstd-compressed with ``compress`` when that makes them smaller.  A
batch of small blobs is one append, one ``fsync`` and one SQLite
transaction, instead of two files, a rename and shard directories per blob:
what an import of many small files spends its time on.  Larger blobs keep
the snix chunk layout of ``objectstore+file://`` (:class:`~nixcas.castore.blob.local.LocalBlobService`)
in the same directory (chunk objects are zstd frames; without ``compress`` frames of raw blocks, written
and read at about the speed of a copy), and every read falls back to that layout, so a store written
before this backend existed is read as it is (new small blobs go to packs).

Guarantees are those of the object layout:

* **verify on read** -- a blob's bytes are decompressed (bounded by the
  recorded size) and hashed against its digest before one is returned;
* **crash safety** -- a batch's bytes are appended and ``fsync``-ed before
  the rows naming them are committed, so no row can ever point at bytes that
  a crash lost; bytes without a row (an interrupted batch) are dead space;
* **durability** -- :meth:`sync` (called by importers before they publish metadata) is one ``syncfs`` if
  the object layout wrote since the last one (it covers SQLite's write-ahead log too), else one ``fsync`` of
  the write-ahead log if rows were committed (their packs were ``fsync``-ed already), else nothing;
* **GC** -- a put of a present blob refreshes its time; a sweep deletes a row
  only ``WHERE`` it is still older than the cutoff (one atomic statement).
  Pack files are then compacted in the sweep of temporary objects: a pack
  whose live bytes are less than half its size is rewritten (live blobs
  copied to a new pack, rows moved in one transaction, old file removed), an
  empty one removed, and many small packs (each writing process has its
  own) merged into one.  A pack being appended to is locked (``flock``) by its
  writer and never compacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Self, TypeVar
from urllib.parse import SplitResult, unquote

import blake3
import zstandard

from nixcas._sqlite import ConnectionUses, delete_if_older, select_in, using_connection
from nixcas.castore.blob.base import BlobChecker, BlobService, ChunkMeta, check_chunk
from nixcas.castore.blob.chunking import AVG_CHUNK_SIZE, check_avg_chunk_size
from nixcas.castore.blob.local import LocalBlobService, _Slow
from nixcas.castore.blob.packcompact import LockedPack, LogBarrier, OpenPack, copy_live_blobs, create_pack, survey_packs
from nixcas.castore.blob.packfile import (
    CODEC_RAW,
    CODEC_ZSTD,
    DB_NAME,
    PACKS_DIR,
    Row,
    load,
    pack_name,
    read_run,
    select_row,
    verified,
)
from nixcas.castore.blob.wholeread import pread_into
from nixcas.castore.digest import EMPTY_DIGEST, B3Digest
from nixcas.castore.objectstore.layout import ZSTD_LEVEL
from nixcas.castore.sweep import Deletion, StoredObject
from nixcas.config import Resolver, ServiceConfig
from nixcas.errors import ConfigurationError, StorageError
from nixcas.ops import stats
from nixcas.urls import query_options

__all__ = ["DB_NAME", "PACKS_DIR", "PackedBlobService", "PackedBlobServiceConfig"]

PACK_MAX = 1 << 30
"""A writer starts a new pack file once its current one is this large."""

MAX_OPEN_PACKS = 64
"""Pack files a service keeps open for reading (least recently used closed first)."""

T = TypeVar("T")

STORE_LEVEL = -(1 << 17)
"""zstd's fastest level: frames of raw blocks (chunk objects must be zstd frames), at about the speed of a copy."""

_COMPRESS_FROM = 64  # blobs shorter than this are stored raw (zstd's frame overhead would eat any gain)
_SCAN_BATCH = 4096  # rows per batch of a GC scan

_SCHEMA = """
CREATE TABLE IF NOT EXISTS packs (
    id   INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS blobs (
    digest   BLOB PRIMARY KEY,
    size     INTEGER NOT NULL,
    codec    INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    pack     INTEGER NOT NULL,
    offset   INTEGER NOT NULL,
    length   INTEGER NOT NULL
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class PackedBlobServiceConfig(ServiceConfig[BlobService]):
    """``packed:///abs/path[?compress=true&zstd_level=N]``.

    Composition: ``type = "packed"``, ``path``, ``compress``, ``zstd_level``, ``avg_chunk_size``.
    Without ``compress`` (the default) bytes are kept as they are, like Nix's own store: small
    blobs raw in packs, chunks of large ones as zstd frames of raw blocks (``zstd_level`` unused).
    """

    type_tag: ClassVar[str] = "packed"
    path: str
    zstd_level: int = ZSTD_LEVEL
    compress: bool = False
    avg_chunk_size: int = AVG_CHUNK_SIZE

    @classmethod
    def from_url(cls, url: SplitResult) -> Self:
        options = query_options(url, {"zstd_level", "compress"})
        if url.netloc:
            raise ConfigurationError(f"{url.geturl()!r}: takes no host (write packed:///abs/path)")
        try:
            level = int(options.get("zstd_level", ZSTD_LEVEL))
        except ValueError:
            raise ConfigurationError(f"{url.geturl()!r}: zstd_level must be an integer") from None
        compress = options.get("compress", "false")
        if compress not in ("true", "false"):
            raise ConfigurationError(f"{url.geturl()!r}: compress must be true or false")
        config = cls(path=unquote(url.path), zstd_level=level, compress=compress == "true")
        config.validate(repr(url.geturl()))
        return config

    def validate(self, where: str) -> None:
        if not self.path.startswith("/") or self.path.rstrip("/") == "":
            raise ConfigurationError(f"{where}: needs an absolute path other than / (write packed:///abs/path)")
        if not -7 <= self.zstd_level <= 22:
            raise ConfigurationError(f"{where}: zstd_level must be between -7 and 22")
        check_avg_chunk_size(self.avg_chunk_size, where)

    async def build(self, resolver: Resolver) -> BlobService:
        return await asyncio.to_thread(
            PackedBlobService,
            self.path,
            zstd_level=self.zstd_level,
            avg_chunk_size=self.avg_chunk_size,
            compress=self.compress,
        )


class PackedBlobService(LocalBlobService):
    """Single-chunk blobs appended to pack files indexed in SQLite; larger blobs as :class:`LocalBlobService` chunks."""

    accepts_views = True

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        zstd_level: int = ZSTD_LEVEL,
        avg_chunk_size: int = AVG_CHUNK_SIZE,
        compress: bool = False,
    ) -> None:
        super().__init__(root, zstd_level=zstd_level if compress else STORE_LEVEL, avg_chunk_size=avg_chunk_size)
        self.inline_max = avg_chunk_size // 2
        self.compress = compress
        self._db_path = f"{self._root}/{DB_NAME}"
        self._packs_dir = f"{self._root}/{PACKS_DIR}"
        os.makedirs(self._packs_dir, exist_ok=True)
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._closed = False
        self._uses = ConnectionUses(self._connections_lock)  # close waits for the queries of other threads
        self._write_lock = threading.Lock()  # one batch appended at a time (they share the pack)
        self._log = LogBarrier(self._db_path)  # the rows' durability (their packs are fsync-ed when appended)
        self._pack: OpenPack | None = None
        self._readers: OrderedDict[int, int] = OrderedDict()  # pack id -> read-only fd, least recent first
        self._readers_lock = threading.Lock()
        self._db().executescript(_SCHEMA)

    def __repr__(self) -> str:
        return f"PackedBlobService({str(self.root)!r})"

    def _db(self) -> sqlite3.Connection:
        """This thread's connection (SQLite connections are cheap; threads read in parallel under WAL)."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            if self._closed:
                raise StorageError(f"{self}: closed")
            db = sqlite3.connect(self._db_path, timeout=60, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # durability comes from sync() (an fsync of the WAL, or syncfs)
            with self._connections_lock:
                self._connections.append(db)
            self._local.db = db
        return db

    async def close(self) -> None:
        def close_all() -> None:
            with self._connections_lock:
                self._uses.close()
                self._closed = True
                connections, self._connections = self._connections, []
            with self._write_lock:
                if self._pack is not None:
                    os.close(self._pack.fd)  # releases the pack's lock
                    self._pack = None
            with self._readers_lock:
                for fd in self._readers.values():
                    os.close(fd)
                self._readers.clear()
            for db in connections:
                db.close()

        await asyncio.to_thread(close_all)
        self._local = threading.local()

    # -- writes ----------------------------------------------------------------------

    def _pack_path(self, name: str) -> str:
        return f"{self._packs_dir}/{name}.pack"

    def _open_pack(self, db: sqlite3.Connection) -> OpenPack:
        """A new pack file, locked, its name durable, and its row (in the caller's transaction)."""
        name, fd = create_pack(self._pack_path)
        pack_id = db.execute("INSERT INTO packs (name) VALUES (?)", (name,)).lastrowid
        assert pack_id is not None
        return OpenPack(pack_id, fd, 0)

    def _encode(self, data: bytes | memoryview) -> tuple[int, bytes | memoryview]:
        if self.compress and len(data) >= _COMPRESS_FROM:
            packed = self._compressor().compress(data)
            if len(packed) < len(data):
                return CODEC_ZSTD, packed
        return CODEC_RAW, data

    @using_connection
    def _append_sync(self, items: Sequence[tuple[B3Digest, bytes | memoryview]]) -> None:
        """Store small blobs: refresh those present, append the others to the pack, ``fsync``, then index them.

        One write transaction holds SQLite's lock throughout, so a GC cannot
        delete a row this batch relies on between the check and the refresh.
        """
        now = time.time_ns()
        with self._write_lock:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                wanted = {bytes(d): data for d, data in items}
                present = self._present(db, list(wanted))
                if present:
                    db.executemany("UPDATE blobs SET mtime_ns = ? WHERE digest = ?", [(now, d) for d in present])
                new = [(d, data) for d, data in wanted.items() if d not in present]
                if new:
                    self._write_rows(db, new, now)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self._log.committed()

    def _present(self, db: sqlite3.Connection, digests: list[bytes]) -> set[bytes]:
        return {row[0] for row in select_in(db, "SELECT digest FROM blobs WHERE digest IN ({})", digests)}

    def _write_rows(self, db: sqlite3.Connection, new: list[tuple[bytes, bytes | memoryview]], now: int) -> None:
        pack = self._pack
        if pack is None or pack.size >= PACK_MAX:
            if pack is not None:
                os.close(pack.fd)  # full: unlocked, GC may merge it now
                self._pack = None
            pack = self._pack = self._open_pack(db)
        rows = []
        pieces = []
        offset = pack.size
        for digest, data in new:
            codec, stored = self._encode(data)
            rows.append((digest, len(data), codec, now, pack.id, offset, len(stored)))
            pieces.append(stored)
            offset += len(stored)
        try:
            written = self._pwrite_all(pack, pieces)
            if written != offset - pack.size:
                raise StorageError(f"{self}: short write to a pack file ({written} of {offset - pack.size} bytes)")
            os.fsync(pack.fd)  # the bytes are on disk before any row names them
        except BaseException:
            os.close(pack.fd)  # what was written is dead space; start a new pack next time
            self._pack = None
            raise
        pack.size = offset
        db.executemany(
            "INSERT INTO blobs (digest, size, codec, mtime_ns, pack, offset, length) VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )

    @staticmethod
    def _pwrite_all(pack: OpenPack, pieces: list[bytes | memoryview]) -> int:
        """``pieces`` at the end of ``pack``, in ``pwritev`` calls of at most 1,024 (IOV_MAX); bytes written."""
        written = 0
        for i in range(0, len(pieces), 1024):
            written += os.pwritev(pack.fd, pieces[i : i + 1024], pack.size + written)
        return written

    def _store_sync(self, data: bytes | memoryview) -> B3Digest:
        if len(data) > self.inline_max:
            return super()._store_sync(data)
        digest = B3Digest(blake3.blake3(data).digest())
        self._append_sync([(digest, data)])
        return digest

    def _store_many_sync(self, blobs: Sequence[bytes | memoryview], synced: bool = False) -> list[B3Digest]:
        digests: list[B3Digest] = []
        small: list[tuple[B3Digest, bytes | memoryview]] = []
        for data in blobs:
            if len(data) > self.inline_max:
                digests.append(super()._store_sync(data))
                continue
            digest = B3Digest(blake3.blake3(data).digest())
            digests.append(digest)
            small.append((digest, data))
        if small:
            self._append_sync(small)
            if synced and not self._dirty:  # the sync that follows would be this log fsync: done in this hand-off
                self._log.sync_now()
        return digests

    def _store_hashed_sync(self, digests: Sequence[B3Digest], blobs: Sequence[bytes | memoryview]) -> None:
        small: list[tuple[B3Digest, bytes | memoryview]] = []
        for digest, data in zip(digests, blobs, strict=True):
            if len(data) <= self.inline_max:
                small.append((digest, data))
            elif super()._store_sync(data) != digest:  # chunked: hashed here in any case
                raise StorageError(f"a blob given as {digest.hex()} was stored under another digest: a bug")
        if small:
            self._append_sync(small)

    async def put_many_hashed(self, digests: Sequence[B3Digest], blobs: Sequence[bytes | memoryview]) -> list[B3Digest]:
        """Small blobs under the digests given, as :meth:`ChunkStore.put_index` takes an index's; larger ones checked.

        The digests come from this program's own walking process, which hashed the very bytes it hands over
        (:mod:`nixcas.castore.walkproc`); every read still checks each blob against its digest.
        """
        await asyncio.to_thread(self._store_hashed_sync, digests, blobs)
        stats.written("local", map(len, blobs))
        return list(digests)

    async def put_many(self, blobs: Sequence[bytes | memoryview], synced: bool = False) -> list[B3Digest]:
        digests = await asyncio.to_thread(self._store_many_sync, blobs, synced)
        stats.written("local", map(len, blobs))
        return digests

    async def put_many_before_sync(self, blobs: Sequence[bytes | memoryview]) -> list[B3Digest]:
        return await self.put_many(blobs, True)

    @using_connection
    def _touch_sync(self, digest: B3Digest) -> bool:
        db = self._db()
        if db.execute("UPDATE blobs SET mtime_ns = ? WHERE digest = ?", (time.time_ns(), bytes(digest))).rowcount:
            self._log.committed()
            return True
        return super()._touch_sync(digest)

    # -- reads ------------------------------------------------------------------------

    @using_connection
    def _select_sync(self, digest: B3Digest) -> Row | None:
        return select_row(self._db(), bytes(digest))

    def _pread(self, pack_id: int, length: int, offset: int, db: sqlite3.Connection) -> bytes:
        """``length`` bytes at ``offset`` of pack ``pack_id``, through a bounded cache of open files.

        Every use of a cached descriptor happens under the cache's lock, so one
        evicted (closed) by another thread can never be read under a new meaning.
        """
        return self._with_pack(pack_id, db, lambda fd: os.pread(fd, length, offset))

    def _preadv(self, pack_id: int, into: memoryview, offset: int, db: sqlite3.Connection) -> int:
        """Fill ``into`` from ``offset`` of pack ``pack_id`` (as :meth:`_pread`); the bytes read (fewer: the end)."""

        return self._with_pack(pack_id, db, lambda fd: pread_into(fd, into, offset))

    def _with_pack(self, pack_id: int, db: sqlite3.Connection, read: Callable[[int], T]) -> T:
        """``read(fd)`` on pack ``pack_id``'s descriptor, under the lock of the cache of open packs."""
        with self._readers_lock:
            fd = self._readers.get(pack_id)
            if fd is not None:
                self._readers.move_to_end(pack_id)
                return read(fd)
        name = pack_name(db, pack_id)
        if name is None:
            raise FileNotFoundError(f"pack {pack_id}")
        fd = os.open(self._pack_path(name), os.O_RDONLY | os.O_CLOEXEC)
        with self._readers_lock:
            if self._closed:
                os.close(fd)
                raise StorageError(f"{self}: closed")
            cached = self._readers.get(pack_id)
            if cached is not None:
                os.close(fd)
                fd = cached
            else:
                self._readers[pack_id] = fd
                while len(self._readers) > MAX_OPEN_PACKS:
                    os.close(self._readers.popitem(last=False)[1])
            return read(fd)

    def _forget_reader(self, pack_id: int) -> None:
        with self._readers_lock:
            fd = self._readers.pop(pack_id, None)
            if fd is not None:
                os.close(fd)

    def _load(self, digest: bytes, row: Row, db: sqlite3.Connection) -> bytes:
        """A row's bytes, checked against its recorded size (not yet against the digest)."""

        def pread(pack: int, length: int, offset: int) -> bytes:
            return self._pread(pack, length, offset, db)

        return load(f"{self}: blob {digest.hex()}", row, pread, self._decompressor)

    @using_connection
    def _fetch_sync(self, digest: B3Digest) -> bytes | None:
        """A small blob's bytes (size-checked); ``None`` if it is not a row.  A pack compacted meanwhile is retried."""
        db = self._db()
        for attempt in (1, 2):
            row = self._select_sync(digest)
            if row is None:
                return None
            try:
                return self._load(bytes(digest), row, db)
            except FileNotFoundError:
                self._forget_reader(row[2])
                if attempt == 2:
                    raise StorageError(f"{self}: blob {digest.hex()}: its pack file is missing") from None
        return None

    async def has(self, digest: B3Digest) -> bool:
        if await asyncio.to_thread(self._select_sync, digest) is not None:
            return True
        return await super().has(digest)

    async def sync(self) -> None:  # syncfs if object files were written, then the rows' log if anything is left
        await self._log.sync(super().sync if self._dirty else None)

    @using_connection
    def _missing_sync(self, digests: Sequence[B3Digest]) -> list[B3Digest]:  # rows first, then object files
        rows = self._present(self._db(), [bytes(d) for d in digests])
        return super()._missing_sync([d for d in digests if bytes(d) not in rows])

    def _chunks_sync(self, digest: B3Digest) -> list[ChunkMeta] | None:
        if self._select_sync(digest) is not None:
            return []  # a single-chunk blob: it is its own chunk
        return super()._chunks_sync(digest)

    def _read_object_sync(self, digest: B3Digest) -> bytes | StorageError | _Slow | None:
        try:
            data = self._fetch_sync(digest)
            return super()._read_object_sync(digest) if data is None else verified(digest, data)
        except StorageError as e:
            return e

    def _read_chunk_sync(self, chunk: ChunkMeta) -> bytes | None:
        data = self._fetch_sync(chunk.digest)
        if data is None:
            return super()._read_chunk_sync(chunk)
        return check_chunk(chunk, data, str(self))

    def _blob_size_sync(self, digest: B3Digest) -> int | None:
        row = self._select_sync(digest)
        return row[0] if row is not None else super()._blob_size_sync(digest)

    @using_connection
    def _sizes_sync(self, digests: Sequence[B3Digest]) -> list[int | None]:
        keys = [bytes(d) for d in digests]
        recorded = dict(select_in(self._db(), "SELECT digest, size FROM blobs WHERE digest IN ({})", keys))
        in_files = super()._blob_size_sync  # (a comprehension has no zero-argument super())
        return [recorded[k] if k in recorded else in_files(d) for k, d in zip(keys, digests, strict=True)]

    @using_connection
    def _read_many_sync(
        self, max_sizes: Mapping[B3Digest, int], checker: BlobChecker
    ) -> tuple[dict[B3Digest, bytes], list[B3Digest]]:
        db = self._db()
        query = "SELECT digest, size, codec, pack, offset, length FROM blobs WHERE digest IN ({})"
        rows: list[tuple[bytes, Row]] = [
            (r[0], (r[1], r[2], r[3], r[4], r[5])) for r in select_in(db, query, [bytes(d) for d in max_sizes])
        ]
        rows.sort(key=lambda r: (r[1][2], r[1][3]))  # pack, offset: sequential reads
        found: dict[B3Digest, bytes] = {}
        here: set[B3Digest] = set()  # rows, whether they fit or not (a larger one is left out, not looked for again)
        slow: list[B3Digest] = []
        for raw, row in rows:
            digest = B3Digest(raw)
            here.add(digest)
            if row[0] > max_sizes[digest]:
                continue
            try:
                found[digest] = checker.check(digest, self._load(raw, row, db))
            except FileNotFoundError:  # compacted meanwhile: the per-blob path looks again
                self._forget_reader(row[2])
                slow.append(digest)
        rest = {d: cap for d, cap in max_sizes.items() if d not in here}
        if rest:
            more, slower = super()._read_many_sync(rest, checker)
            found.update(more)
            slow.extend(slower)
        return found, slow

    # -- BulkReads (``nixcas dump-path``) ------------------------------------------------

    def _bulk_read(self, read: Callable[[], T]) -> T | None:  # None when closing: the caller falls back
        if not self._uses.begin():
            return None
        try:
            return read()
        finally:
            self._uses.end()

    def read_run(self, wanted: Sequence[tuple[bytes, int]], buffer: memoryview) -> list[bytes | memoryview] | None:
        """One indexed lookup for the run, then its pack bytes in offset order, nearby blobs in one ``preadv``."""
        if not wanted:
            return []

        def read() -> list[bytes | memoryview] | None:
            db = self._db()
            try:
                return read_run(
                    db, wanted, buffer, lambda p, into, at: self._preadv(p, into, at, db), self._decompressor
                )
            except (OSError, StorageError, zstandard.ZstdError):
                return None

        return self._bulk_read(read)

    def read_whole(self, digest: bytes, size: int, buffer: memoryview) -> bytes | memoryview | None:
        if not 0 < size <= self.whole_max:
            return None
        if size <= self.inline_max:  # a pack row, unless written by a store with bigger packed blobs
            run = self.read_run([(digest, size)], buffer)
            if run is not None:
                return run[0]
        return self._bulk_read(lambda: super(PackedBlobService, self).read_whole(digest, size, buffer))  # (SQLite too)

    # -- garbage collection -------------------------------------------------------------

    @using_connection
    def _scan_rows_sync(self, after: bytes) -> list[StoredObject]:
        rows = self._db().execute(
            "SELECT digest, length, mtime_ns FROM blobs WHERE digest > ? ORDER BY digest LIMIT ?",
            (after, _SCAN_BATCH),
        )
        return [StoredObject(B3Digest(raw), size, mtime) for raw, size, mtime in rows]

    async def scan_blobs(self) -> AsyncIterator[list[StoredObject]]:
        after = b""
        while batch := await asyncio.to_thread(self._scan_rows_sync, after):
            yield batch
            after = bytes(batch[-1].digest)
        async for batch in super().scan_blobs():
            yield batch

    @using_connection
    def _delete_rows_sync(self, objects: Sequence[StoredObject], cutoff_ns: int) -> tuple[Deletion, list[StoredObject]]:
        """Rows deleted or kept; the objects that are no row (files of the object layout)."""
        db = self._db()
        done = Deletion()
        files: list[StoredObject] = []
        for obj in objects:
            if obj.digest == EMPTY_DIGEST:
                done.kept.append(obj)
                continue
            deleted = delete_if_older(db, "blobs", "mtime_ns", bytes(obj.digest), cutoff_ns)
            if deleted is None:
                files.append(obj)
            else:  # kept: re-put since it was scanned, young again
                (done.deleted if deleted else done.kept).append(obj)
        return done, files

    async def delete_blobs(self, objects: Sequence[StoredObject], cutoff_ns: int) -> Deletion:
        done, files = await asyncio.to_thread(self._delete_rows_sync, objects, cutoff_ns)
        if files:
            more = await super().delete_blobs(files, cutoff_ns)
            done.deleted.extend(more.deleted)
            done.kept.extend(more.kept)
        return done

    @using_connection
    def _compact_sync(self, cutoff_ns: int, dry_run: bool) -> list[StoredObject]:
        """Free the dead space of pack files no writer holds (:mod:`~nixcas.castore.blob.packcompact`)."""
        db = self._db()
        survey = survey_packs(db, self._packs_dir, cutoff_ns, dry_run)
        try:
            if survey.rewrite and not dry_run:
                self._rewrite_sync(db, survey.rewrite)
        finally:
            survey.close()
        return survey.freed

    def _rewrite_sync(self, db: sqlite3.Connection, packs: Sequence[LockedPack]) -> None:
        """Copy the live blobs of ``packs`` into one new pack; drop them."""
        with self._write_lock:
            copy_live_blobs(db, packs, self._open_pack, str(self))
        for pack_id, _, path in packs:
            self._forget_reader(pack_id)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._dirty = True

    async def sweep_temporary(self, cutoff_ns: int, dry_run: bool) -> list[StoredObject]:
        swept = await super().sweep_temporary(cutoff_ns, dry_run)
        return swept + await asyncio.to_thread(self._compact_sync, cutoff_ns, dry_run)

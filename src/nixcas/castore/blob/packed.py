"""``packed:///abs/path`` — the embedded store's blobs: small ones packed into SQLite, large ones chunked.

Every blob small enough to be a single chunk (at most half the average
chunk size, 128 KiB by default) is one row of ``DIR/small.sqlite``: its
digest, size, the time it was last written or re-put, and its bytes --
raw, as Nix's own store keeps files (reading them back is then a copy and
a BLAKE3, no decompression), or zstd-compressed with ``compress_small``
when that makes them smaller.  A batch of small blobs is
one SQLite transaction instead of two files, a rename and shard
directories per blob, which is what an import of many small files spends
its time on.  Larger blobs keep the snix chunk layout of
``objectstore+file://`` (:class:`~nixcas.castore.blob.local.LocalBlobService`)
under the same directory, and every read falls back to that layout, so a
store written before this backend existed is read as it is (new small
blobs go to SQLite).

Guarantees are those of the object layout:

* **verify on read** — a row is decompressed (bounded by its recorded size)
  and hashed against its digest before a byte is returned;
* **crash safety** — a row appears with its transaction or not at all;
  SQLite's write-ahead log keeps the database consistent after ``kill -9``
  or a power cut;
* **durability** — :meth:`sync` (called by importers before they publish
  metadata) is one ``syncfs`` of the store's file system, which includes the
  write-ahead log;
* **GC** — a put of a present blob refreshes its time; a sweep deletes a row
  only ``WHERE`` it is still older than the cutoff (one atomic statement),
  and SQLite reuses the freed pages.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Self
from urllib.parse import SplitResult, unquote

import blake3
import zstandard

from nixcas.castore.blob.base import BlobChecker, BlobService, ChunkMeta, check_chunk
from nixcas.castore.blob.chunking import AVG_CHUNK_SIZE, check_avg_chunk_size
from nixcas.castore.blob.layout import ZSTD_LEVEL
from nixcas.castore.blob.local import LocalBlobService, _Slow
from nixcas.castore.digest import EMPTY_DIGEST, B3Digest
from nixcas.castore.gc import Deletion, StoredObject
from nixcas.config import Resolver, ServiceConfig
from nixcas.errors import ChecksumMismatch, ConfigurationError, StorageError
from nixcas.urls import query_options

__all__ = ["DB_NAME", "PackedBlobService", "PackedBlobServiceConfig"]

DB_NAME = "small.sqlite"
"""The database of small blobs, in the store's directory."""

_RAW, _ZSTD = 0, 1
"""How a row's bytes are stored."""

_COMPRESS_FROM = 64
"""Blobs shorter than this are stored raw (zstd's frame overhead would eat any gain)."""

_SELECT_BATCH = 500
"""Digests per ``IN (…)`` query."""

_SCAN_BATCH = 4096
"""Rows per batch of a GC scan."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    digest   BLOB PRIMARY KEY,
    size     INTEGER NOT NULL,
    codec    INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    data     BLOB NOT NULL
);
"""

_UPSERT = (
    "INSERT INTO blobs (digest, size, codec, mtime_ns, data) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (digest) DO UPDATE SET mtime_ns = excluded.mtime_ns"
)


@dataclass(frozen=True)
class PackedBlobServiceConfig(ServiceConfig[BlobService]):
    """``packed:///abs/path[?zstd_level=N&compress_small=true]``.

    Composition: ``type = "packed"``, ``path``, ``zstd_level``, ``compress_small``, ``avg_chunk_size``.
    ``zstd_level`` applies to chunk objects, and to rows only with ``compress_small``.
    """

    type_tag: ClassVar[str] = "packed"
    path: str
    zstd_level: int = ZSTD_LEVEL
    compress_small: bool = False
    avg_chunk_size: int = AVG_CHUNK_SIZE

    @classmethod
    def from_url(cls, url: SplitResult) -> Self:
        options = query_options(url, {"zstd_level", "compress_small"})
        if url.netloc:
            raise ConfigurationError(f"{url.geturl()!r}: takes no host (write packed:///abs/path)")
        try:
            level = int(options.get("zstd_level", ZSTD_LEVEL))
        except ValueError:
            raise ConfigurationError(f"{url.geturl()!r}: zstd_level must be an integer") from None
        compress = options.get("compress_small", "false")
        if compress not in ("true", "false"):
            raise ConfigurationError(f"{url.geturl()!r}: compress_small must be true or false")
        config = cls(path=unquote(url.path), zstd_level=level, compress_small=compress == "true")
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
            compress_small=self.compress_small,
        )


class PackedBlobService(LocalBlobService):
    """Single-chunk blobs as rows of ``small.sqlite``; larger blobs as :class:`LocalBlobService` chunks."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        zstd_level: int = ZSTD_LEVEL,
        avg_chunk_size: int = AVG_CHUNK_SIZE,
        compress_small: bool = False,
    ) -> None:
        super().__init__(root, zstd_level=zstd_level, avg_chunk_size=avg_chunk_size)
        self.inline_max = avg_chunk_size // 2
        self.compress_small = compress_small
        self._db_path = f"{self._root}/{DB_NAME}"
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._closed = False
        db = self._db()
        db.executescript(_SCHEMA)

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
            db.execute("PRAGMA synchronous=NORMAL")  # durability comes from sync() (syncfs covers the WAL)
            with self._connections_lock:
                self._connections.append(db)
            self._local.db = db
        return db

    async def close(self) -> None:
        def close_all() -> None:
            with self._connections_lock:
                self._closed = True
                connections, self._connections = self._connections, []
            for db in connections:
                db.close()

        await asyncio.to_thread(close_all)
        self._local = threading.local()

    # -- rows ----------------------------------------------------------------------

    def _row(
        self, digest: B3Digest, size: int, data: bytes | memoryview, now: int
    ) -> tuple[bytes, int, int, int, bytes]:
        if self.compress_small and size >= _COMPRESS_FROM:
            packed = self._compressor().compress(data)
            if len(packed) < size:
                return (bytes(digest), size, _ZSTD, now, packed)
        return (bytes(digest), size, _RAW, now, bytes(data))

    def _put_rows_sync(self, rows: Iterable[tuple[bytes, int, int, int, bytes]]) -> None:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(_UPSERT, rows)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._dirty = True

    def _decode(self, digest: bytes, size: int, codec: int, data: bytes) -> bytes:
        """A row's bytes, checked against its size; a :class:`StorageError` if they are not what it records."""
        where = f"{self}: blob {digest.hex()}"
        if codec == _ZSTD:
            try:
                out = self._decompressor().decompress(data, max_output_size=size)
            except zstandard.ZstdError as e:
                raise StorageError(f"{where}: cannot decompress: {e}") from None
        elif codec == _RAW:
            out = data
        else:
            raise StorageError(f"{where}: unknown codec {codec}")
        if len(out) != size:
            raise StorageError(f"{where}: {len(out)} bytes stored, {size} recorded")
        return out

    def _verified(self, digest: bytes, size: int, codec: int, data: bytes) -> bytes:
        out = self._decode(digest, size, codec, data)
        got = blake3.blake3(out).digest()
        if got != digest:
            raise ChecksumMismatch(f"blob {digest.hex()}", digest.hex(), got.hex())
        return out

    def _select_sync(self, digest: B3Digest) -> tuple[int, int, bytes] | None:
        row = self._db().execute("SELECT size, codec, data FROM blobs WHERE digest = ?", (bytes(digest),)).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def _inline_sync(self, digest: B3Digest) -> bool:
        row = self._db().execute("SELECT 1 FROM blobs WHERE digest = ?", (bytes(digest),)).fetchone()
        return row is not None

    # -- writes (LocalBlobService's hooks) ------------------------------------------

    def _store_sync(self, data: bytes | memoryview) -> B3Digest:
        if len(data) > self.inline_max:
            return super()._store_sync(data)
        digest = B3Digest(blake3.blake3(data).digest())
        self._put_rows_sync([self._row(digest, len(data), data, time.time_ns())])
        return digest

    def _store_many_sync(self, blobs: Sequence[bytes]) -> list[B3Digest]:
        now = time.time_ns()
        digests: list[B3Digest] = []
        rows = []
        for data in blobs:
            if len(data) > self.inline_max:
                digests.append(super()._store_sync(data))
                continue
            digest = B3Digest(blake3.blake3(data).digest())
            digests.append(digest)
            rows.append(self._row(digest, len(data), data, now))
        if rows:
            self._put_rows_sync(rows)
        return digests

    async def put_many(self, blobs: Sequence[bytes]) -> list[B3Digest]:
        return await asyncio.to_thread(self._store_many_sync, blobs)

    def _touch_sync(self, digest: B3Digest) -> bool:
        db = self._db()
        if db.execute("UPDATE blobs SET mtime_ns = ? WHERE digest = ?", (time.time_ns(), bytes(digest))).rowcount:
            self._dirty = True
            return True
        return super()._touch_sync(digest)

    # -- reads ------------------------------------------------------------------------

    async def has(self, digest: B3Digest) -> bool:
        if await asyncio.to_thread(self._inline_sync, digest):
            return True
        return await super().has(digest)

    def _chunks_sync(self, digest: B3Digest) -> list[ChunkMeta] | None:
        if self._inline_sync(digest):
            return []  # a single-chunk blob: it is its own chunk
        return super()._chunks_sync(digest)

    def _read_object_sync(self, digest: B3Digest) -> bytes | StorageError | _Slow | None:
        row = self._select_sync(digest)
        if row is None:
            return super()._read_object_sync(digest)
        try:
            return self._verified(bytes(digest), *row)
        except StorageError as e:
            return e

    def _read_chunk_sync(self, chunk: ChunkMeta) -> bytes | None:
        row = self._select_sync(chunk.digest)
        if row is None:
            return super()._read_chunk_sync(chunk)
        return check_chunk(chunk, self._decode(bytes(chunk.digest), *row), str(self))

    def _blob_size_sync(self, digest: B3Digest) -> int | None:
        row = self._db().execute("SELECT size FROM blobs WHERE digest = ?", (bytes(digest),)).fetchone()
        return int(row[0]) if row is not None else super()._blob_size_sync(digest)

    def _read_many_sync(
        self, max_sizes: Mapping[B3Digest, int], checker: BlobChecker
    ) -> tuple[dict[B3Digest, bytes], list[B3Digest]]:
        db = self._db()
        found: dict[B3Digest, bytes] = {}
        here: set[B3Digest] = set()  # rows, whether they fit or not (a larger one is left out, not looked for again)
        wanted = list(max_sizes)
        for i in range(0, len(wanted), _SELECT_BATCH):
            keys = [bytes(d) for d in wanted[i : i + _SELECT_BATCH]]
            query = f"SELECT digest, size, codec, data FROM blobs WHERE digest IN ({','.join('?' * len(keys))})"  # noqa: S608
            for raw, size, codec, data in db.execute(query, keys):
                digest = B3Digest(raw)
                here.add(digest)
                if size <= max_sizes[digest]:
                    found[digest] = checker.check(digest, self._decode(raw, size, codec, data))
        rest = {d: cap for d, cap in max_sizes.items() if d not in here}
        if not rest:
            return found, []
        more, slow = super()._read_many_sync(rest, checker)
        found.update(more)
        return found, slow

    # -- garbage collection -------------------------------------------------------------

    def _scan_rows_sync(self, after: bytes) -> list[StoredObject]:
        rows = self._db().execute(
            "SELECT digest, length(data), mtime_ns FROM blobs WHERE digest > ? ORDER BY digest LIMIT ?",
            (after, _SCAN_BATCH),
        )
        return [StoredObject(B3Digest(raw), size, mtime) for raw, size, mtime in rows]

    async def _scan_inline(self) -> AsyncIterator[list[StoredObject]]:
        after = b""
        while batch := await asyncio.to_thread(self._scan_rows_sync, after):
            yield batch
            after = bytes(batch[-1].digest)

    async def scan_blobs(self) -> AsyncIterator[list[StoredObject]]:
        async for batch in self._scan_inline():
            yield batch
        async for batch in super().scan_blobs():
            yield batch

    def _delete_inline_sync(
        self, objects: Sequence[StoredObject], cutoff_ns: int
    ) -> tuple[Deletion, list[StoredObject]]:
        """Rows deleted or kept; the objects that are no row (files of the object layout)."""
        db = self._db()
        done = Deletion()
        files: list[StoredObject] = []
        for obj in objects:
            if obj.digest == EMPTY_DIGEST:
                done.kept.append(obj)
                continue
            key = bytes(obj.digest)
            if db.execute("DELETE FROM blobs WHERE digest = ? AND mtime_ns < ?", (key, cutoff_ns)).rowcount:
                done.deleted.append(obj)
            elif db.execute("SELECT 1 FROM blobs WHERE digest = ?", (key,)).fetchone() is not None:
                done.kept.append(obj)  # re-put since it was scanned: young again
            else:
                files.append(obj)
        return done, files

    async def delete_blobs(self, objects: Sequence[StoredObject], cutoff_ns: int) -> Deletion:
        done, files = await asyncio.to_thread(self._delete_inline_sync, objects, cutoff_ns)
        if files:
            more = await super().delete_blobs(files, cutoff_ns)
            done.deleted.extend(more.deleted)
            done.kept.extend(more.kept)
        return done

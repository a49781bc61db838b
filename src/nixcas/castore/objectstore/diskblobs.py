"""The snix blob layout on a local disk (``objectstore+file:///abs/path``).

Blobs are cut into chunks by FastCDC 2020 (:mod:`~nixcas.castore.blob.chunking`,
the snix parameters) and stored through the local-disk adapter
(:class:`~.disk.DiskObjects`): chunks first, each only if absent, the index
last, so readers never see a partial blob and an interrupted write leaves
only a file under ``tmp/`` (and, for a multi-chunk blob, chunks no index
refers to yet).  Durability is batched: :meth:`LocalBlobService.sync` is a
barrier (``syncfs``) that importers call once before they publish metadata
referring to the blobs, instead of an ``fsync`` per file.

Batched synchronous reads live in :mod:`.bulk`, enumeration and deletion for
garbage collection in :mod:`.scan`, the streaming writer in :mod:`.writers`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from typing import ClassVar

import blake3
import zstandard

from nixcas._aio import to_thread_uninterrupted
from nixcas.castore.blob.base import (
    BlobChecker,
    BlobReader,
    BlobWriter,
    ChunkMeta,
    FailedReader,
    VerifiedBytesReader,
)
from nixcas.castore.blob.chunking import (
    AVG_CHUNK_SIZE,
    compressed_bound,
    decompress_at_most,
)
from nixcas.castore.digest import EMPTY_DIGEST, B3Digest
from nixcas.castore.objectstore.blobs import LayoutBlobService
from nixcas.castore.objectstore.bulk import _SLOW, DiskReads, _Slow
from nixcas.castore.objectstore.codec import blob_mismatch
from nixcas.castore.objectstore.disk import READ_ONLY
from nixcas.castore.objectstore.layout import (
    SINGLE_CHUNK_CAP,
    ZSTD_LEVEL,
    bao_key,
    decode_index,
    encode_index,
    split_blob,
)
from nixcas.castore.objectstore.readers import LegacyObjectReader
from nixcas.castore.objectstore.writers import LocalBlobWriter
from nixcas.errors import StorageError
from nixcas.ops import stats

__all__ = ["READ_WINDOW", "LocalBlobService", "_Slow"]

READ_WINDOW = 2 << 20
"""Bytes of chunks a sequential read of a chunked blob keeps in flight (decompressed in worker threads)."""


class LocalBlobService(DiskReads, LayoutBlobService):
    """Blobs as zstd-compressed chunk files plus index files under ``root``."""

    stats_name: ClassVar[str] = "local"

    def __init__(
        self, root: str | os.PathLike[str], *, zstd_level: int = ZSTD_LEVEL, avg_chunk_size: int = AVG_CHUNK_SIZE
    ) -> None:
        super().__init__(root, zstd_level=zstd_level)
        self.avg_chunk_size = avg_chunk_size
        self.run_max = avg_chunk_size // 2  # at most the smallest chunk: always a single chunk object

    def __repr__(self) -> str:
        return f"LocalBlobService({str(self.root)!r})"

    # -- writing -------------------------------------------------------------------

    def _write_chunk_sync(self, digest: B3Digest, data: bytes | memoryview) -> None:
        """Compress ``data`` into chunk object ``digest`` (replacing any leftover: same bytes)."""
        self._put_object_sync(self._chunk_path(digest), self._compressor().compress(data))
        stats.count("nixcas_chunks_written", "local")

    def _put_chunks_sync(self, chunks: Sequence[bytes | memoryview]) -> list[ChunkMeta]:
        """Store each chunk unless present (a chunk of a multi-chunk blob); their metadata."""
        metas = []
        for data in chunks:
            digest = B3Digest(blake3.blake3(data).digest())
            if not self._refresh_chunk_sync(digest):  # present: refreshed, so a running GC keeps it
                self._write_chunk_sync(digest, data)
            metas.append(ChunkMeta(digest, len(data)))
        return metas

    def _put_index_sync(self, digest: B3Digest, chunks: Sequence[ChunkMeta]) -> None:
        """Publish the index of a multi-chunk blob (after its chunks); if present, refresh its age instead."""
        path = self._index_path(digest)
        if not self._refresh_sync(path):
            self._put_object_sync(path, encode_index(list(chunks)))

    def _store_sync(self, data: bytes | memoryview) -> B3Digest:
        digest = B3Digest(blake3.blake3(data).digest())
        index_path = self._index_path(digest)
        if os.path.exists(index_path) and self._touch_sync(digest):
            return digest
        pieces = split_blob(data, self.avg_chunk_size)
        if len(pieces) > 1:
            self._put_index_sync(digest, self._put_chunks_sync(pieces))
            return digest
        # No index: write the chunk even if a crash left one behind (same bytes).
        if len(data):
            self._write_chunk_sync(digest, data)
        self._write_index(index_path)
        self._dirty = True
        return digest

    # -- BlobService ---------------------------------------------------------------

    async def has(self, digest: B3Digest) -> bool:
        return await asyncio.to_thread(
            lambda: os.path.exists(self._index_path(digest)) or os.path.exists(self._chunk_path(digest))
        )

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        return await asyncio.to_thread(self._chunks_sync, digest)

    async def missing(self, digests: Sequence[B3Digest]) -> list[B3Digest]:
        return await asyncio.to_thread(self._missing_sync, digests)

    def _missing_sync(self, digests: Sequence[B3Digest]) -> list[B3Digest]:
        exists = os.path.exists
        return [d for d in digests if not exists(self._index_path(d)) and not exists(self._chunk_path(d))]

    def _read_object_sync(self, digest: B3Digest) -> bytes | StorageError | _Slow | None:
        """A single-chunk blob's bytes, verified; ``None`` if absent; :data:`_SLOW`: a big legacy object.

        An object whose compressed size fits :data:`SINGLE_CHUNK_CAP` is
        decompressed bounded (to at most that many bytes) and hashed against
        ``digest`` before anything is returned: a tampered or swapped object
        gives the error every read then raises.  Larger objects (written
        before blobs were chunked), and objects that expand past the cap, go
        to :class:`~.readers.LegacyObjectReader`, which verifies them in a first pass
        (as it does objects of several zstd frames).
        """
        try:
            fd = os.open(self._chunk_path(digest), READ_ONLY)
        except FileNotFoundError:
            return None
        try:
            limit = compressed_bound(SINGLE_CHUNK_CAP)
            if os.fstat(fd).st_size > limit:
                return _SLOW
            parts = []
            while part := os.read(fd, limit + 1):
                parts.append(part)
        finally:
            os.close(fd)
        try:
            data = decompress_at_most(self._decompressor(), b"".join(parts), SINGLE_CHUNK_CAP)
        except zstandard.ZstdError:
            return _SLOW  # several frames, say: the verifying streaming reader takes it (or reports the error)
        if data is None:
            return _SLOW
        return blob_mismatch(digest, data) or data

    async def _open_read(self, digest: B3Digest) -> BlobReader | None:
        found = await asyncio.to_thread(self._read_object_sync, digest)
        if isinstance(found, bytes):
            return VerifiedBytesReader(found)
        if isinstance(found, StorageError):
            return FailedReader(found)
        if found is _SLOW:
            return LegacyObjectReader(self._chunk_path(digest), digest)
        return self._chunk_list_reader(digest, await self.chunks(digest), READ_WINDOW)

    async def size(self, digest: B3Digest) -> int | None:
        """From the index or the object's zstd frame header, without reading the blob."""
        size = await asyncio.to_thread(self._blob_size_sync, digest)
        return size if size is not None else await super().size(digest)

    async def sizes(self, digests: Sequence[B3Digest]) -> list[int | None]:
        """All in one worker-thread round trip; only blobs whose size is recorded nowhere are read."""
        found = await asyncio.to_thread(self._sizes_sync, digests)
        for i, size in enumerate(found):
            if size is None:
                found[i] = await super().size(digests[i])
        return found

    def _sizes_sync(self, digests: Sequence[B3Digest]) -> list[int | None]:
        return [self._blob_size_sync(d) for d in digests]

    def _blob_size_sync(self, digest: B3Digest) -> int | None:
        """The blob's size from its chunk list or its object's zstd frame header; ``None``: not recorded there."""
        try:
            with open(self._index_path(digest), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raw = b""
        if raw:
            return sum(c.size for c in decode_index(digest, raw))
        try:
            with open(self._chunk_path(digest), "rb") as f:
                size = zstandard.frame_content_size(f.read(18))
        except (FileNotFoundError, zstandard.ZstdError):
            return None
        return size if size >= 0 else None

    def _cached_outboard_sync(self, digest: B3Digest) -> tuple[bytes | None, str | None, int | None]:
        """The cached outboard (``None``: absent), what is wrong with it (``None``: nothing), the blob's size if known.

        The tree is checked to the root against ``digest`` (:func:`~nixcas.castore.bao.check_outboard`),
        the length header against the size the blob's index or frame header records.
        """
        from nixcas.castore.bao import check_outboard  # NumPy: loaded only when outboards are asked for

        try:
            with open(f"{self._root}/{bao_key(digest)}", "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, None, None
        size = self._blob_size_sync(digest)
        try:
            check_outboard(digest, data, size)
        except StorageError as e:
            return data, str(e), size
        return data, None, size

    async def outboard_problem(self, digest: B3Digest) -> str | None:
        """What is wrong with the cached outboard of ``digest`` (``None``: nothing found, or none cached)."""
        return (await asyncio.to_thread(self._cached_outboard_sync, digest))[1]

    async def outboard(self, digest: B3Digest) -> bytes | None:
        """Computed on first use from a verified read, then kept as ``bao/b3/<4 hex>/<hex>``.

        A cached outboard is checked whole against the digest each time it is
        loaded; a damaged one is computed anew and replaced (atomically).
        Where the blob's size is recorded nowhere but in its data (objects
        without a size in their zstd header), the outboard is computed and
        compared, and the cached file replaced only if it differs.
        """
        path = f"{self._root}/{bao_key(digest)}"
        cached, problem, size = await asyncio.to_thread(self._cached_outboard_sync, digest)
        if cached is not None and problem is None and size is not None:
            return cached
        computed = await super().outboard(digest)
        if computed is not None and computed != cached:
            await to_thread_uninterrupted(lambda: self._put_object_sync(path, computed))
        return computed

    # -- ChunkStore ----------------------------------------------------------------

    async def missing_chunks(self, chunks: Sequence[ChunkMeta]) -> list[ChunkMeta]:
        # The caller is about to reference the present ones: refresh them, so a running GC keeps them.
        return await asyncio.to_thread(lambda: [c for c in chunks if not self._refresh_chunk_sync(c.digest)])

    async def read_chunk(self, chunk: ChunkMeta) -> bytes | None:
        return await asyncio.to_thread(self._read_chunk_sync, chunk)

    async def _read_many(
        self, max_sizes: Mapping[B3Digest, int], checker: BlobChecker, parallel: int
    ) -> dict[B3Digest, bytes]:
        # One worker-thread round trip for the whole batch (reading, decompressing
        # and hashing); the rare blobs it cannot take go through the per-blob path.
        found, slow = await asyncio.to_thread(self._read_many_sync, max_sizes, checker)
        if slow:
            found.update(await self._read_each({d: max_sizes[d] for d in slow}, parallel))
        return found

    async def open_write(self, expected_size: int | None = None) -> BlobWriter:
        return LocalBlobWriter(self, expected_size)

    async def _store_blobs(self, blobs: Sequence[bytes]) -> list[B3Digest]:
        if len(blobs) == 1:
            return [await asyncio.to_thread(self._store_sync, blobs[0])]
        return await asyncio.to_thread(lambda: [self._store_sync(b) for b in blobs])

    async def _store_written(self, data: bytes) -> B3Digest:
        return await to_thread_uninterrupted(lambda: self._store_sync(data))

    async def _store_chunk(self, chunk: ChunkMeta, data: bytes) -> None:
        await to_thread_uninterrupted(lambda: self._put_chunks_sync([data]))

    async def _publish_index(self, digest: B3Digest, chunks: Sequence[ChunkMeta]) -> None:
        await to_thread_uninterrupted(lambda: self._put_index_sync(digest, chunks))

    # -- ages (nixcas.castore.sweep) -----------------------------------------------
    #
    # A blob's age is the mtime of its chunk object (single-chunk blobs; the
    # empty index is a hard link shared by many blobs, so its own mtime means
    # nothing) or of its index when the index lists chunks.  A put that finds
    # the blob present refreshes that age (_touch_sync); deletions move the
    # object aside first and look at the age again (.scan), so a refresh racing
    # the sweep either lands before (the object is put back) or fails (the put
    # writes the object anew).

    def _touch_sync(self, digest: B3Digest) -> bool:
        """A put found ``digest``'s index: refresh the blob's age; ``False`` if it must be written anew."""
        if digest == EMPTY_DIGEST:
            return True
        try:
            index_size = os.stat(self._index_path(digest)).st_size
        except FileNotFoundError:
            return False
        if index_size:
            if not self._refresh_sync(self._index_path(digest)):
                return False
        elif not self._refresh_chunk_sync(digest):
            return False  # the chunk is missing: the blob is damaged, the put repairs it
        return os.path.exists(self._index_path(digest))

    def _refresh_chunk_sync(self, digest: B3Digest) -> bool:
        """A writer found chunk ``digest`` stored: refresh its age so GC keeps it; ``False``: gone, write it.

        Every writer that skips writing a chunk because it exists must call this
        (a content-defined chunker deduplicating chunks included).
        """
        return self._refresh_sync(self._chunk_path(digest))

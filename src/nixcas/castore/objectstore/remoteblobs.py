"""The snix blob layout in object storage (S3 and compatibles, GCS, Azure, memory) through obstore.

The layout is :mod:`.layout`'s (``blobs/b3/…`` indexes, ``chunks/b3/…``
zstd-compressed chunks), the chunking FastCDC 2020 with the snix parameters,
so a bucket written by snix reads here and the other way round.

Requests are what costs in object storage, so:

* uploads run concurrently in a bounded window (the store's
  ``concurrency`` option, default 32 requests in flight; a streaming writer
  keeps at most :data:`~.writers.UPLOAD_WINDOW` chunks in flight, so memory
  stays bounded);
* existence checks go through :class:`~.presence.Presence`: cached, and for a
  batch (``put_many`` of an import's small files) a key range is listed once
  instead of one ``HEAD`` per key when that is cheaper, so re-importing a tree
  already stored costs a handful of requests;
* a chunk is written only if absent, the index always last (a reader never
  sees a blob before all its chunks exist);
* a blob of one chunk (every small file) is that chunk object alone, one
  ``PUT`` (see :func:`~.layout.blob_object_key`).

Garbage collection cannot refresh an object's age in place here (object
stores have no ``touch``).  Instead a writer trusts an existing object only if
it was written within ``refresh_after`` seconds (default 1,200); an older one
is written again (a blob's index: a few bytes; a chunk: its bytes, which the
writer holds).  A streaming upload checks before it publishes that nothing it
relied on has grown older than 1.5 times that; a collection keeps everything
younger than its grace period, which ``nixcas gc`` requires to be at least
twice ``refresh_after`` (:attr:`~.presence.ObjectStoreBacked.min_grace_ns`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import ClassVar

import blake3
import zstandard

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
    check_chunk_list,
    compressed_bound,
    decompress_at_most,
)
from nixcas.castore.digest import EMPTY_DIGEST, B3Digest
from nixcas.castore.objectstore.blobs import LayoutBlobService
from nixcas.castore.objectstore.client import ObjectStore
from nixcas.castore.objectstore.codec import blob_mismatch, decode_chunk
from nixcas.castore.objectstore.io import ObjectMeta
from nixcas.castore.objectstore.layout import (
    SINGLE_CHUNK_CAP,
    ZSTD_LEVEL,
    blob_index_key,
    blob_object_key,
    chunk_key,
    decode_index,
    encode_index,
    split_blob,
)
from nixcas.castore.objectstore.options import REFRESH_AFTER
from nixcas.castore.objectstore.presence import ObjectStoreBacked
from nixcas.castore.objectstore.scan import MAX_INDEX_BYTES, scan_listing
from nixcas.castore.objectstore.writers import ObjectStoreBlobWriter
from nixcas.castore.sweep import Deletion, StoredObject
from nixcas.errors import ChecksumMismatch, StorageError
from nixcas.ops import stats

__all__ = ["READ_WINDOW", "ObjectStoreBlobService"]

READ_WINDOW = 8 << 20
"""Bytes of chunks a sequential read of a chunked blob keeps in flight."""


class ObjectStoreBlobService(ObjectStoreBacked, LayoutBlobService):
    """Chunked blobs in an object store (see the module docstring)."""

    stats_name: ClassVar[str] = "objectstore"

    def __init__(
        self,
        store: ObjectStore,
        *,
        avg_chunk_size: int = AVG_CHUNK_SIZE,
        zstd_level: int = ZSTD_LEVEL,
        refresh_after: float = REFRESH_AFTER,
    ) -> None:
        super().__init__(store, refresh_after)
        self.avg_chunk_size = avg_chunk_size
        self.zstd_level = zstd_level

    def __repr__(self) -> str:
        return f"ObjectStoreBlobService({self.store.where!r})"

    # -- helpers ---------------------------------------------------------------------

    def _compress(self, data: bytes | memoryview) -> bytes:
        # One compressor per call: zstandard contexts are not thread-safe, and this runs in worker threads.
        return zstandard.ZstdCompressor(level=self.zstd_level).compress(data)

    async def _put_object(self, key: str, data: bytes) -> None:
        await self.store.put(key, data)
        self.presence.noted(key, len(data))

    async def _put_chunk_data(self, digest: B3Digest, data: bytes | memoryview) -> None:
        compressed = await asyncio.to_thread(self._compress, data)
        await self._put_object(chunk_key(digest), compressed)
        stats.count("nixcas_chunks_written", "objectstore")

    async def _store_pieces(
        self, digest: B3Digest, pieces: Sequence[bytes | memoryview], chunk_state: Mapping[str, ObjectMeta | None]
    ) -> None:
        """Write what is missing of a blob cut into ``pieces``: the chunks not stored (fresh), then the index."""
        if len(pieces) == 1:
            # One chunk: it is the blob, and needs no index (see blob_object_key); written unless a fresh copy exists.
            if not pieces[0]:
                await self._put_object(blob_index_key(digest), b"")  # the empty blob: an empty index, no chunk
            elif not self._fresh(chunk_state.get(chunk_key(digest))):
                await self._put_chunk_data(digest, pieces[0])
            return
        metas = [ChunkMeta(B3Digest(blake3.blake3(p).digest()), len(p)) for p in pieces]
        todo: dict[B3Digest, bytes | memoryview] = {}
        for meta, piece in zip(metas, pieces, strict=True):
            if not self._fresh(chunk_state.get(chunk_key(meta.digest))):
                todo.setdefault(meta.digest, piece)
        await asyncio.gather(*(self._put_chunk_data(d, p) for d, p in todo.items()))
        await self._put_object(blob_index_key(digest), encode_index(metas))

    async def _store_blobs(self, blobs: Sequence[bytes]) -> list[B3Digest]:
        """Store whole blobs, with one batched existence check for all of them (and one for their chunks)."""

        def digest_and_cut() -> list[tuple[B3Digest, Sequence[bytes | memoryview]]]:
            out: list[tuple[B3Digest, Sequence[bytes | memoryview]]] = []
            for data in blobs:
                d = B3Digest(blake3.blake3(data).digest())
                pieces = split_blob(data, self.avg_chunk_size)
                out.append((d, pieces))
            return out

        cutted = await asyncio.to_thread(digest_and_cut)
        stored = await self.presence.check([blob_object_key(d, p) for d, p in cutted])
        todo = [(d, p) for d, p in cutted if not self._fresh(stored[blob_object_key(d, p)])]
        if todo:
            chunk_keys: list[str] = []
            for d, pieces in todo:
                if len(pieces) > 1:
                    chunk_keys.extend(chunk_key(B3Digest(blake3.blake3(p).digest())) for p in pieces)
                elif pieces[0]:
                    chunk_keys.append(chunk_key(d))
            state = await self.presence.check(list(dict.fromkeys(chunk_keys)))
            seen: set[B3Digest] = set()
            jobs = []
            for d, pieces in todo:
                if d not in seen:
                    seen.add(d)
                    jobs.append(self._store_pieces(d, pieces, state))
            await asyncio.gather(*jobs)
        return [d for d, _ in cutted]

    # -- BlobService -----------------------------------------------------------------

    async def has(self, digest: B3Digest) -> bool:
        # Most blobs are single chunk objects: look for that first.
        return await self._exists(chunk_key(digest)) or await self._exists(blob_index_key(digest))

    async def missing(self, digests: Sequence[B3Digest]) -> list[B3Digest]:
        # Batched (cache, key-range listings) for what is present; an "absent" from a listing may be
        # stale for a reader (another process may have written since), so those are asked again.
        unique = list(dict.fromkeys(digests))
        found = await self.presence.check([chunk_key(d) for d in unique])
        rest = [d for d in unique if found[chunk_key(d)] is None]
        if rest:
            found.update(await self.presence.check([blob_index_key(d) for d in rest]))
            rest = [d for d in rest if found[blob_index_key(d)] is None]
        present = set(unique) - set(rest)
        if rest:
            again = await asyncio.gather(*(self.has(d) for d in rest))
            present.update(d for d, here in zip(rest, again, strict=True) if here)
        return [d for d in digests if d not in present]

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        raw = await self.store.get(blob_index_key(digest), cap=MAX_INDEX_BYTES)
        if raw is None:
            return [] if await self.store.head(chunk_key(digest)) is not None else None
        chunks = decode_index(digest, raw)
        check_chunk_list(digest, chunks, repr(self))
        return chunks

    def _decompress_verified(self, digest: B3Digest, compressed: bytes, cap: int) -> bytes | None:
        """A single-chunk blob's bytes (``None``: more than ``cap``); a wrong hash raises."""
        try:
            data = decompress_at_most(zstandard.ZstdDecompressor(), compressed, cap)
        except zstandard.ZstdError as e:
            raise StorageError(f"{self}: blob {digest.hex()}: cannot decompress: {e}") from None
        if data is None:
            return None
        mismatch = blob_mismatch(digest, data)
        if mismatch is not None:
            raise mismatch
        return data

    async def _read_single(self, digest: B3Digest, cap: int) -> bytes | None:
        """The blob if it is stored as one chunk object of at most ``cap`` bytes, else ``None``."""
        compressed = await self.store.get(chunk_key(digest), cap=compressed_bound(cap))
        if compressed is None:
            return None
        data = await asyncio.to_thread(self._decompress_verified, digest, compressed, cap)
        if data is None:
            raise StorageError(f"{self}: blob {digest.hex()} is one object larger than {cap} bytes")
        return data

    async def _open_read(self, digest: B3Digest) -> BlobReader | None:
        try:
            single = await self._read_single(digest, SINGLE_CHUNK_CAP)
        except ChecksumMismatch as e:
            return FailedReader(e)
        if single is not None:
            return VerifiedBytesReader(single)
        return self._chunk_list_reader(digest, await self.chunks(digest), READ_WINDOW)

    async def read_chunk(self, chunk: ChunkMeta) -> bytes | None:
        compressed = await self.store.get(chunk_key(chunk.digest), cap=compressed_bound(chunk.size))
        if compressed is None:
            return None
        return await asyncio.to_thread(decode_chunk, zstandard.ZstdDecompressor(), chunk, compressed, repr(self))

    async def _read_many(
        self, max_sizes: Mapping[B3Digest, int], checker: BlobChecker, parallel: int
    ) -> dict[B3Digest, bytes]:
        # Every blob as one GET of its chunk object, all at once (the store's window bounds them);
        # those stored in several chunks (or missing) take the general path.
        found: dict[B3Digest, bytes] = {}
        rest: dict[B3Digest, int] = {}

        async def one(digest: B3Digest, cap: int) -> None:
            if digest == EMPTY_DIGEST:
                if await self.has(digest):
                    found[digest] = b""
                return
            compressed = await self.store.get(chunk_key(digest), cap=compressed_bound(SINGLE_CHUNK_CAP))
            if compressed is None:
                rest[digest] = cap
                return
            data = await asyncio.to_thread(self._decompress_verified, digest, compressed, cap)
            if data is not None:
                found[digest] = checker.check(digest, data)

        await asyncio.gather(*(one(d, c) for d, c in max_sizes.items()))
        if rest:
            found.update(await self._read_each(rest, parallel))
        return found

    async def open_write(self, expected_size: int | None = None) -> BlobWriter:
        return ObjectStoreBlobWriter(self, expected_size)

    async def _store_chunk(self, chunk: ChunkMeta, data: bytes) -> None:
        await self._put_chunk_data(chunk.digest, data)

    async def _publish_index(self, digest: B3Digest, chunks: Sequence[ChunkMeta]) -> None:
        await self._put_object(blob_index_key(digest), encode_index(list(chunks)))

    # -- ChunkStore ------------------------------------------------------------------

    async def missing_chunks(self, chunks: Sequence[ChunkMeta]) -> list[ChunkMeta]:
        state = await self.presence.check([chunk_key(c.digest) for c in chunks])
        return [c for c in chunks if not self._fresh(state[chunk_key(c.digest)])]

    # -- garbage collection (nixcas.castore.sweep) ------------------------------------
    #
    # A blob's age is its index's modification time (a writer that relies on an old
    # blob writes its index again).  Deletion looks at the age again first (HEAD);
    # object stores have no conditional delete, so a refresh landing in the few
    # milliseconds between that HEAD and the DELETE is lost: the reason writers
    # refresh objects long (refresh_after) before any grace period ends.

    def _scan(self, kind: str) -> AsyncIterator[list[StoredObject]]:
        return scan_listing(self.store, kind)

    def scan_blobs(self) -> AsyncIterator[list[StoredObject]]:
        return self._scan("blobs")

    def scan_chunks(self) -> AsyncIterator[list[StoredObject]]:
        return self._scan("chunks")

    async def delete_blobs(self, objects: Sequence[StoredObject], cutoff_ns: int) -> Deletion:
        kept = [o for o in objects if o.digest == EMPTY_DIGEST]  # the empty blob is always kept (as locally)
        done = await self._delete_old([o for o in objects if o.digest != EMPTY_DIGEST], cutoff_ns, blob_index_key)
        done.kept.extend(kept)
        return done

    async def delete_chunks(self, objects: Sequence[StoredObject], cutoff_ns: int) -> Deletion:
        return await self._delete_old(objects, cutoff_ns, chunk_key)

"""``objectstore+<s3|gs|az|memory|http(s)>://…`` — blobs in object storage, in the snix layout.

The layout is :mod:`.layout`'s (``blobs/b3/…`` indexes, ``chunks/b3/…``
zstd-compressed chunks), the chunking :mod:`.chunking`'s (FastCDC 2020 with
the snix parameters), so a bucket written by snix reads here and the other
way round.  ``objectstore+file://`` is the same layout on a local disk and
has its own backend (:mod:`.local`); :class:`ObjectStoreBlobServiceConfig`
builds either, by the URL.

Requests are what costs in object storage, so:

* uploads run concurrently in a bounded window (the store's
  ``concurrency`` option, default 32 requests in flight; a streaming writer
  keeps at most :data:`UPLOAD_WINDOW` chunks in flight, so memory stays
  bounded);
* existence checks go through :class:`~nixcas.castore.objectstore.Presence`:
  cached, and for a batch (``put_many`` of an import's small files) a key
  range is listed once instead of one ``HEAD`` per key when that is cheaper,
  so re-importing a tree already stored costs a handful of requests;
* a chunk is written only if absent, the index always last (a reader never
  sees a blob before all its chunks exist);
* a blob of one chunk (every small file) is that chunk object alone, one
  ``PUT``: snix also writes an empty index for it, which its readers never
  need (see :func:`_blob_key`).

Garbage collection (:mod:`nixcas.castore.gc`) cannot refresh an object's age
in place here (object stores have no ``touch``).  Instead a writer trusts an
existing object only if it was written within ``refresh_after`` seconds
(default 1,200); an older one is written again (a blob's index: a few bytes;
a chunk: its bytes, which the writer holds).  A streaming upload checks
before it publishes that nothing it relied on has grown older than 1.5 times
that; a collection keeps everything younger than its grace period, which
``nixcas gc`` requires to be at least twice ``refresh_after``
(:attr:`~nixcas.castore.objectstore.ObjectStoreBacked.min_grace_ns`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Self
from urllib.parse import SplitResult, urlsplit, urlunsplit

import blake3
import zstandard

from nixcas.castore.blob.base import (
    BlobChecker,
    BlobReader,
    BlobService,
    BlobWriter,
    BytesReader,
    ChunkMeta,
    ChunkStore,
    FailedReader,
    VerifiedBytesReader,
    WriterState,
    check_chunk,
)
from nixcas.castore.blob.chunked import ChunkedReader
from nixcas.castore.blob.chunking import (
    AVG_CHUNK_SIZE,
    Chunker,
    check_avg_chunk_size,
    check_chunk_list,
    compressed_bound,
    cut,
    decompress_at_most,
    decompress_chunk,
)
from nixcas.castore.blob.layout import ZSTD_LEVEL, blob_index_key, chunk_key, decode_index, encode_index, key_digest
from nixcas.castore.digest import EMPTY_DIGEST, B3Digest
from nixcas.castore.objectstore import (
    REFRESH_AFTER,
    ObjectMeta,
    ObjectStore,
    ObjectStoreBacked,
    check_client_options,
    open_object_store,
    parse_objectstore_url,
    refresh_after_option,
    zstd_level_option,
)
from nixcas.castore.sweep import Deletion, StoredObject
from nixcas.config import Resolver, ServiceConfig
from nixcas.errors import ChecksumMismatch, ConfigurationError, StorageError, ValidationError
from nixcas.ops import stats
from nixcas.urls import query_options, shown

__all__ = ["ObjectStoreBlobService", "ObjectStoreBlobServiceConfig"]

SPILL_THRESHOLD = 1 << 20
"""A writer keeps a blob of up to this many bytes in memory and stores it in one step at close."""

SINGLE_CHUNK_CAP = 4 << 20
"""The largest single-chunk blob read (whole, decompressed bounded, verified before a byte is returned)."""

MAX_INDEX_BYTES = 64 << 20
"""The largest blob index read (about 1.6 million chunks: blobs of 200 GiB and more)."""

READ_WINDOW = 8 << 20
"""Bytes of chunks a sequential read of a chunked blob keeps in flight."""

UPLOAD_WINDOW = 8
"""Chunks a streaming writer keeps in flight (compressing or uploading) at once."""

PRIME_CHUNKS = 32
"""A streaming upload expected to cut at least this many chunks lists the chunk ranges first (if cheaper)."""

_BLOB_OPTIONS = {"zstd_level", "refresh_after"}


@dataclass(frozen=True)
class ObjectStoreBlobServiceConfig(ServiceConfig[BlobService]):
    """``objectstore+<url>``: ``file:///abs/path`` (local disk) or any obstore URL.

    Composition: ``type = "objectstore"``, ``object_store_url = "s3://bucket/prefix"``,
    ``object_store_options = { endpoint = "…", region = "…", … }``, ``avg_chunk_size``
    (the tvix/snix field names; the URL form always uses the default chunk size).
    Options of our own: ``zstd_level``, ``refresh_after`` and
    :data:`~nixcas.castore.objectstore.CLIENT_OPTIONS`; all others are obstore's.
    """

    type_tag: ClassVar[str] = "objectstore"
    object_store_url: str
    object_store_options: dict[str, str] = field(default_factory=dict, repr=False)  # may hold credentials
    avg_chunk_size: int = AVG_CHUNK_SIZE

    @classmethod
    def from_url(cls, url: SplitResult) -> Self:
        inner = url.scheme.partition("+")[2]
        if inner == "file":
            options = query_options(url, {"zstd_level"})
            if url.path and not url.path.startswith("/"):
                raise ConfigurationError(f"{shown(url)!r}: needs an absolute path (write objectstore+file:///abs/path)")
            config = cls(urlunsplit((inner, url.netloc, url.path, "", "")), options)
        else:
            bare, options = parse_objectstore_url(url)
            config = cls(bare, options)
        config.validate(repr(shown(url)))
        return config

    def _local(self) -> ServiceConfig[BlobService]:
        from nixcas.castore.blob.local import LocalBlobServiceConfig

        return LocalBlobServiceConfig(self.object_store_url, self.object_store_options, self.avg_chunk_size)

    def validate(self, where: str) -> None:
        if urlsplit(self.object_store_url).scheme == "file":
            self._local().validate(where)
            return
        check_avg_chunk_size(self.avg_chunk_size, where)
        zstd_level_option(self.object_store_options, where)
        refresh_after_option(self.object_store_options, where)
        client = {k: v for k, v in self.object_store_options.items() if k not in _BLOB_OPTIONS}
        check_client_options(self.object_store_url, client, where)

    async def build(self, resolver: Resolver) -> BlobService:
        if urlsplit(self.object_store_url).scheme == "file":
            return await self._local().build(resolver)
        where = repr(shown(self.object_store_url))
        options = self.object_store_options
        client = {k: v for k, v in options.items() if k not in _BLOB_OPTIONS}
        store = await open_object_store(self.object_store_url, client)
        return ObjectStoreBlobService(
            store,
            avg_chunk_size=self.avg_chunk_size,
            zstd_level=zstd_level_option(options, where),
            refresh_after=refresh_after_option(options, where),
        )


def _blob_key(digest: B3Digest, pieces: Sequence[bytes | memoryview]) -> str:
    """The object whose presence says a blob cut into ``pieces`` is stored.

    A blob of one chunk is its chunk object alone: snix writes an empty index
    beside it, but its readers (``has``, ``open_read``, ``Stat``) all fall back
    to the chunk object, so leaving the index out halves the requests for
    small files at no cost in compatibility.  Blobs of several chunks are
    their index (written last), the empty blob its empty index.
    """
    return chunk_key(digest) if len(pieces) == 1 and pieces[0] else blob_index_key(digest)


def _b3(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


class ObjectStoreBlobService(ObjectStoreBacked, BlobService, ChunkStore):
    """Chunked blobs in an object store (see the module docstring)."""

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
            # One chunk: it is the blob, and needs no index (see _blob_key); written unless a fresh copy exists.
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

        def digest_and_cut() -> list[tuple[B3Digest, list[memoryview] | list[bytes]]]:
            out: list[tuple[B3Digest, list[memoryview] | list[bytes]]] = []
            for data in blobs:
                d = B3Digest(blake3.blake3(data).digest())
                pieces = cut(data, self.avg_chunk_size) if len(data) > self.avg_chunk_size // 2 else [data]
                out.append((d, pieces))
            return out

        cutted = await asyncio.to_thread(digest_and_cut)
        stored = await self.presence.check([_blob_key(d, p) for d, p in cutted])
        todo = [(d, p) for d, p in cutted if not self._fresh(stored[_blob_key(d, p)])]
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
        got = blake3.blake3(data).digest()
        if got != digest:
            raise ChecksumMismatch(f"blob {digest.hex()}", digest.hex(), got.hex())
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
        if digest == EMPTY_DIGEST and await self.has(digest):
            return BytesReader(b"")
        try:
            single = await self._read_single(digest, SINGLE_CHUNK_CAP)
        except ChecksumMismatch as e:
            return FailedReader(e)
        if single is not None:
            return VerifiedBytesReader(single)
        chunks = await self.chunks(digest)
        if chunks is None:
            return None
        if not chunks:
            raise StorageError(f"{self}: blob {digest.hex()}: index present but chunk object missing")
        return ChunkedReader(self._fetch_chunk, chunks, window_bytes=READ_WINDOW)

    async def _fetch_chunk(self, chunk: ChunkMeta, offset: int = 0) -> bytes:
        data = await self.read_chunk(chunk)
        if data is None:
            raise StorageError(f"{self}: chunk {chunk.digest.hex()} not found")
        return data

    async def read_chunk(self, chunk: ChunkMeta) -> bytes | None:
        compressed = await self.store.get(chunk_key(chunk.digest), cap=compressed_bound(chunk.size))
        if compressed is None:
            return None
        where = f"{self}: chunk {chunk.digest.hex()}"

        def decode() -> bytes:
            data = decompress_chunk(zstandard.ZstdDecompressor(), compressed, chunk.size, where)
            return check_chunk(chunk, data, repr(self))

        return await asyncio.to_thread(decode)

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
        return _ObjectStoreBlobWriter(self, expected_size)

    async def put(self, data: bytes) -> B3Digest:
        digest = (await self._store_blobs([data]))[0]
        stats.written("objectstore", [len(data)])
        return digest

    async def put_many(self, blobs: Sequence[bytes]) -> list[B3Digest]:
        digests = await self._store_blobs(blobs)
        stats.written("objectstore", map(len, blobs))
        return digests

    # -- ChunkStore ------------------------------------------------------------------

    async def missing_chunks(self, chunks: Sequence[ChunkMeta]) -> list[ChunkMeta]:
        state = await self.presence.check([chunk_key(c.digest) for c in chunks])
        return [c for c in chunks if not self._fresh(state[chunk_key(c.digest)])]

    async def put_chunk(self, chunk: ChunkMeta, data: bytes) -> None:
        check_chunk(chunk, data, "put_chunk")
        await self._put_chunk_data(chunk.digest, data)

    async def put_index(self, digest: B3Digest, chunks: Sequence[ChunkMeta]) -> None:
        check_chunk_list(digest, chunks, "put_index")
        if len(chunks) < 2:
            raise ValidationError(f"put_index: blob {digest.hex()}: a chunk list needs at least two chunks")
        missing = await self.missing_chunks(chunks)
        if missing:
            raise StorageError(f"{self}: index of {digest.hex()} refers to missing chunk {missing[0].digest.hex()}")
        await self._put_object(blob_index_key(digest), encode_index(list(chunks)))

    # -- garbage collection (nixcas.castore.sweep) ------------------------------------
    #
    # A blob's age is its index's modification time (a writer that relies on an old
    # blob writes its index again).  Deletion looks at the age again first (HEAD);
    # object stores have no conditional delete, so a refresh landing in the few
    # milliseconds between that HEAD and the DELETE is lost: the reason writers
    # refresh objects long (refresh_after) before any grace period ends.

    async def _scan(self, kind: str) -> AsyncIterator[list[StoredObject]]:
        async for page in self.store.list(f"{kind}/b3/"):
            objects = []
            for meta in page:
                digest = key_digest(meta.key)
                if digest is not None:
                    objects.append((digest, meta))
            if kind != "blobs":
                yield [StoredObject(d, m.size, m.mtime_ns) for d, m in objects]
                continue

            async def stored(digest: B3Digest, meta: ObjectMeta) -> StoredObject | None:
                chunks: tuple[B3Digest, ...] = ()
                if meta.size:
                    raw = await self.store.get(meta.key, cap=MAX_INDEX_BYTES)
                    if raw is None:
                        return None
                    chunks = tuple(c.digest for c in decode_index(digest, raw))
                return StoredObject(digest, meta.size, meta.mtime_ns, chunks)

            found = await asyncio.gather(*(stored(d, m) for d, m in objects))
            yield [o for o in found if o is not None]

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


class _ObjectStoreBlobWriter(BlobWriter):
    """Small blobs: buffered, stored in one step at close.  Large: chunks uploaded as they are cut.

    Past :data:`SPILL_THRESHOLD` bytes, data goes through a
    :class:`~nixcas.castore.blob.chunking.Chunker`; each chunk not stored yet
    (fresh) is compressed and uploaded in the background, at most
    :data:`UPLOAD_WINDOW` at once (a write waits for a slot, which bounds
    memory).  :meth:`close` waits for them all, then writes the index.  An
    aborted upload writes no index: its chunks stay invisible until GC frees
    them.
    """

    def __init__(self, service: ObjectStoreBlobService, expected_size: int | None) -> None:
        self._service = service
        self._state = WriterState(expected_size)
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._hasher = blake3.blake3()
        self._chunker: Chunker | None = None
        self._chunks: list[ChunkMeta] = []
        self._handled: set[B3Digest] = set()
        self._relied: list[ObjectMeta] = []  # chunks found stored (fresh), not written again
        self._uploads: set[asyncio.Task[None]] = set()

    async def _reap(self, limit: int) -> None:
        """Wait until at most ``limit`` uploads are in flight; raise the first upload error."""
        while self._uploads:
            done = {t for t in self._uploads if t.done()}
            for task in done:
                self._uploads.discard(task)
                task.result()
            if len(self._uploads) <= limit:
                return
            await asyncio.wait(self._uploads, return_when=asyncio.FIRST_COMPLETED)

    async def _upload(self, digest: B3Digest, data: bytes) -> None:
        service = self._service
        meta = (await service.presence.check([chunk_key(digest)]))[chunk_key(digest)]
        if meta is not None and service._fresh(meta):
            self._relied.append(meta)
        else:
            await service._put_chunk_data(digest, data)

    async def _take(self, pieces: Sequence[memoryview]) -> None:
        for piece in pieces:
            data = bytes(piece)
            digest = B3Digest(await asyncio.to_thread(_b3, data))
            self._chunks.append(ChunkMeta(digest, len(data)))
            if digest in self._handled:
                continue
            self._handled.add(digest)
            await self._reap(UPLOAD_WINDOW - 1)
            self._uploads.add(asyncio.ensure_future(self._upload(digest, data)))

    async def write(self, data: bytes) -> None:
        await self._admit(self._state, len(data))
        if not data:
            return
        try:
            if self._chunker is None and self._buffered + len(data) <= SPILL_THRESHOLD:
                self._buffer.append(bytes(data))
                self._buffered += len(data)
                return
            if self._chunker is None:
                self._chunker = Chunker(self._service.avg_chunk_size)
                expected = self._state.expected_size
                if expected is not None and expected >= PRIME_CHUNKS * self._service.avg_chunk_size:
                    await self._service.presence.prime("chunks", expected // self._service.avg_chunk_size)
            pending, self._buffer, self._buffered = [*self._buffer, bytes(data)], [], 0
            for block in pending:
                self._hasher.update(block)
                await self._take(self._chunker.feed(block))
        except BaseException:
            await self.abort()
            raise

    async def close(self) -> B3Digest:
        if self._state.digest is not None:
            return self._state.digest
        try:
            self._state.check_complete()
            service = self._service
            if self._chunker is None:
                data, self._buffer = b"".join(self._buffer), []
                digest = (await service._store_blobs([data]))[0]
            else:
                chunker, self._chunker = self._chunker, None
                await self._take(chunker.finish())
                await self._reap(0)
                digest = B3Digest(self._hasher.digest())
                stale = [m for m in self._relied if not service._still_safe(m)]
                if stale:
                    raise StorageError(
                        f"{service}: this upload took so long that chunk {stale[0].key} it found stored may "
                        "be collected by now (see refresh_after); nothing was published, retry"
                    )
                # One chunk: the chunk object (its digest is the blob's) is the blob, no index (see _blob_key).
                if len(self._chunks) > 1 and not service._fresh(service.presence.cached(blob_index_key(digest))):
                    await service._put_object(blob_index_key(digest), encode_index(self._chunks))
        except BaseException:
            await self.abort()
            raise
        self._state.digest = digest
        stats.written("objectstore", [self._state.written])
        return digest

    async def abort(self) -> None:
        if self._state.digest is None and not self._state.aborted:
            self._state.aborted = True
            self._buffer = []
            self._chunker = None
            for task in self._uploads:
                task.cancel()
            for task in self._uploads:
                with contextlib.suppress(BaseException):
                    await task
            self._uploads.clear()

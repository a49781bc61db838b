"""``combined`` — a near blob service in front of a far one, filled as it is read.

Reads are served from *near* when it has the blob.  Otherwise, when far
keeps the blob in chunks and near can hold chunks (a
:class:`~nixcas.castore.blob.base.ChunkStore`: an object store, or a daemon
through ``grpc+…?chunkstore=1``), the
read streams chunk by chunk at once: a chunk near already holds is read
from near, one it lacks is fetched from far (up to :data:`FILL_WINDOW`
chunks in flight ahead of a sequential read), checked against its digest
before any of its bytes are handed out or it is written near, and then kept
near.  Seeks find their chunk by binary search.  Chunks touched by a partial
or seeking read stay near (they are content-addressed and verified), but the
blob index is written near only once every chunk has passed through the
reader in blob order and their concatenation hashed to the blob's digest;
a chunk list from far that does not add up raises
:class:`~nixcas.errors.ChecksumMismatch` when the last chunk is reached,
before its bytes are handed out.  A second version of a large file thus
costs only its changed chunks, and a later full read of a partly read blob
fetches only the chunks still missing.  Otherwise the blob is streamed from
*far* and, while the caller reads it from the start, copied into *near*;
once the whole blob has passed and hashed to its digest the copy is
committed, so the next read is local.  A read that stops early or seeks
away abandons that copy (nothing partial becomes visible).  Writes go to
near only.  (tvix reads through without filling; see reference §4.5.)

Composition::

    [blobservices.root]
    type = "combined"
    near = "local"        # tvix spelling: local
    far = "upstream"      # tvix spelling: remote

URL form: ``combined://?near=URL&far=URL`` (percent-encoded URLs or names).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import blake3

from nixcas._aio import NearFar
from nixcas.castore.blob.base import (
    BlobChecker,
    BlobReader,
    BlobService,
    BlobWriter,
    ChunkMeta,
    ChunkStore,
    check_chunk,
)
from nixcas.castore.blob.chunked import ChunkedReader
from nixcas.castore.digest import B3Digest
from nixcas.config import NearFarConfig, Resolver
from nixcas.errors import ChecksumMismatch, StorageError
from nixcas.ops import stats

__all__ = ["CombinedBlobService", "CombinedBlobServiceConfig"]

log = logging.getLogger(__name__)

FILL_WINDOW = 8
"""Chunks in flight (the one being read included) while a chunked far blob streams into near."""

FILL_WINDOW_BYTES = 8 << 20
"""Bytes of chunks in flight (by their declared sizes) while a chunked far blob streams into near."""


@dataclass(frozen=True)
class CombinedBlobServiceConfig(NearFarConfig[BlobService]):
    """``near`` and ``far``: names (or URLs) of two blob services."""

    type_tag: ClassVar[str] = "combined"
    aliases: ClassVar[dict[str, str]] = {"local": "near", "remote": "far"}
    references: ClassVar[dict[str, str]] = {"near": "blobservices", "far": "blobservices"}

    async def build(self, resolver: Resolver) -> BlobService:
        near, far = await self.open_pair(resolver)
        return CombinedBlobService(near, far, close_inner=resolver.owns_instances)


class CombinedBlobService(NearFar[BlobService], BlobService):
    """Near first; far-fetched blobs are written into near while they stream."""

    chunk_reads: ClassVar[bool] = False  # open_read fills near and publishes the index once the blob passed

    async def has(self, digest: B3Digest) -> bool:
        return await self.near.has(digest) or await self.far.has(digest)

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        found = await self.near.chunks(digest)
        return found if found is not None else await self.far.chunks(digest)

    async def _open_read(self, digest: B3Digest) -> BlobReader | None:
        # The outer VerifyingReader (base class) checks the bytes handed out;
        # inner readers come unverified to avoid hashing everything twice.
        reader = await self.near.open_raw(digest)
        stats.lookup("blob", reader is not None)
        if reader is not None:
            return reader
        if isinstance(self.near, ChunkStore):
            with stats.upstream("blob"):
                chunks = await self.far.chunks(digest)
            if chunks is None:
                return None
            if len(chunks) >= 2:
                return _FillingChunkedReader(self.far, self.near, digest, chunks)
        with stats.upstream("blob"):
            reader = await self.far.open_raw(digest)
        if reader is None:
            return None
        return _FillingReader(reader, digest, await self.near.open_write())

    async def outboard(self, digest: B3Digest) -> bytes | None:
        return await (self.near if await self.near.has(digest) else self.far).outboard(digest)

    async def _read_many(
        self, max_sizes: Mapping[B3Digest, int], checker: BlobChecker, parallel: int
    ) -> dict[B3Digest, bytes]:
        """Near's batch first; the rest from far, verified, then kept near too."""
        found = await self.near.read_many_raw(max_sizes, checker, parallel=parallel)
        rest = {digest: cap for digest, cap in max_sizes.items() if digest not in found}
        if rest:
            fetched = await self.far.read_many_raw(rest, checker, parallel=parallel)
            for digest, data in fetched.items():
                if not checker.checked(digest, data):
                    checker.check(digest, data)  # only verified bytes land near
            try:
                await self.near.put_many(list(fetched.values()))
            except Exception as e:  # the near store failing must not fail the read
                log.warning("combined: copying %d blobs into near failed: %s", len(fetched), e)
            found.update(fetched)
        return found

    async def open_write(self, expected_size: int | None = None) -> BlobWriter:
        return await self.near.open_write(expected_size)

    async def sync(self) -> None:
        await self.near.sync()


class _FillingChunkedReader(ChunkedReader):
    """Streams a chunked far blob: near's chunks from near, the others from far, checked, then kept near.

    Every chunk fetched goes through :meth:`_chunk`; while they arrive in
    blob order (seeks back and forth are fine as long as no chunk is
    skipped) they are hashed, and when the last one arrives the hash must be
    the blob digest: then the index is written near, else the read fails.
    """

    def __init__(self, far: BlobService, near: BlobService, digest: B3Digest, chunks: Sequence[ChunkMeta]) -> None:
        super().__init__(self._fetch_chunk, chunks, window_bytes=FILL_WINDOW_BYTES, window_chunks=FILL_WINDOW)
        assert isinstance(near, ChunkStore)
        self._far = far
        self._near = near
        self._store: ChunkStore = near
        self._digest = digest
        self._hasher = blake3.blake3()
        self._hashed = 0  # chunks hashed, in blob order
        self._wrong: ChecksumMismatch | None = None  # the chunks do not make up the blob: every read fails

    async def _fetch_chunk(self, chunk: ChunkMeta, offset: int) -> bytes:
        data = await self._near.read_chunk(chunk)
        if data is not None:
            return data
        where = f"combined: far: blob {self._digest.hex()}"
        data = await self._far.read_chunk(chunk)
        if data is None:
            raise StorageError(f"{where}: chunk {chunk.digest.hex()} (at offset {offset}) not found")
        check_chunk(chunk, data, where)  # before anything is stored or handed out, whatever far's reader does
        try:
            await self._store.put_chunk(chunk, data)
        except Exception as e:  # the near store failing must not fail the read
            log.warning("combined: copying chunk %s into near failed: %s", chunk.digest.hex(), e)
        return data

    async def _chunk(self, index: int) -> memoryview:
        if self._wrong is not None:
            raise self._wrong
        data = await super()._chunk(index)
        if index == self._hashed:
            self._hasher.update(data)
            self._hashed += 1
            if self._hashed == len(self._chunks):
                await self._finish()
        return data

    async def _finish(self) -> None:
        """All chunks passed in order: check they make up the blob, then publish its index near."""
        got = self._hasher.digest()
        if got != self._digest:
            self._cur = None  # nothing of the last chunk is handed out, now or later
            self._wrong = ChecksumMismatch(
                f"combined: the chunks far lists for blob {self._digest.hex()}", self._digest.hex(), got.hex()
            )
            raise self._wrong
        try:
            await self._store.put_index(self._digest, self._chunks)
        except Exception as e:  # a chunk lost near meanwhile (GC), a failing disk: the read goes on
            log.warning("combined: storing the index of blob %s near failed: %s", self._digest.hex(), e)


class _FillingReader(BlobReader):
    """Reads far; copies a sequential read from the start into a near writer, committed if it verifies."""

    def __init__(self, inner: BlobReader, digest: B3Digest, writer: BlobWriter) -> None:
        self._inner = inner
        self._digest = digest
        self._writer: BlobWriter | None = writer
        self._hasher = blake3.blake3()
        self._copied = 0

    async def read(self, n: int = -1) -> bytes:
        pos = self._inner.tell()
        data = await self._inner.read(n)
        if self._writer is None:
            return data
        if pos != self._copied:
            await self._abandon()
        elif data:
            self._hasher.update(data)
            self._copied += len(data)
            try:
                await self._writer.write(data)
            except Exception as e:  # the near store failing must not fail the read
                log.warning("combined: copying blob %s into near failed: %s", self._digest.hex(), e)
                await self._abandon()
            if n < 0:
                await self._commit()
        elif n != 0:
            await self._commit()
        return data

    async def _commit(self) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        if self._hasher.digest() != self._digest:
            await writer.abort()  # far sent wrong bytes; the outer reader raises
            return
        try:
            await writer.close()
        except Exception as e:
            log.warning("combined: storing blob %s near failed: %s", self._digest.hex(), e)

    async def _abandon(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            await writer.abort()

    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return await self._inner.seek(offset, whence)

    def tell(self) -> int:
        return self._inner.tell()

    async def close(self) -> None:
        try:
            await self._abandon()
        finally:
            await self._inner.close()

"""``combined`` — a near blob service in front of a far one, filled as it is read.

Reads are served from *near* when it has the blob.  Otherwise, when far
keeps the blob in chunks and near can hold chunks (a
:class:`~nixcas.castore.blob.base.ChunkStore`, i.e. an object store), the
copy is chunk-level: far's chunk list is fetched, only the chunks near lacks
are read from far (several in parallel, each checked against its digest) and
written near, the whole blob is hashed in order, and only if it matches is
the index written near; the read is then served from near.  A second version
of a large file thus costs only its changed chunks.  Otherwise the blob is
streamed from *far* and, while the caller reads it from the start, copied
into *near*; once the whole blob has passed and hashed to its digest the
copy is committed, so the next read is local.  A read that stops early or
seeks away abandons the copy (nothing partial becomes visible).  Writes go
to near only.  (tvix reads through without filling; see reference §4.5.)

Composition::

    [blobservices.root]
    type = "combined"
    near = "local"        # tvix spelling: local
    far = "upstream"      # tvix spelling: remote

URL form: ``combined://?near=URL&far=URL`` (percent-encoded URLs or names).
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import blake3

from nixcas._aio import close_all
from nixcas.castore.blob.base import BlobChecker, BlobReader, BlobService, BlobWriter, ChunkMeta, ChunkStore
from nixcas.castore.digest import B3Digest
from nixcas.config import NearFarConfig, Resolver
from nixcas.errors import ChecksumMismatch, StorageError

__all__ = ["CombinedBlobService", "CombinedBlobServiceConfig"]

log = logging.getLogger(__name__)

FILL_WINDOW = 8
"""Chunks fetched from far at once during a chunk-level copy."""


@dataclass(frozen=True)
class CombinedBlobServiceConfig(NearFarConfig[BlobService]):
    """``near`` and ``far``: names (or URLs) of two blob services."""

    type_tag: ClassVar[str] = "combined"
    aliases: ClassVar[dict[str, str]] = {"local": "near", "remote": "far"}
    references: ClassVar[dict[str, str]] = {"near": "blobservices", "far": "blobservices"}

    async def build(self, resolver: Resolver) -> BlobService:
        near, far = await self.open_pair(resolver)
        return CombinedBlobService(near, far, close_inner=resolver.owns_instances)


class CombinedBlobService(BlobService):
    """Near first; far-fetched blobs are written into near while they stream."""

    def __init__(self, near: BlobService, far: BlobService, *, close_inner: bool = False) -> None:
        self.near = near
        self.far = far
        self._close_inner = close_inner

    def __repr__(self) -> str:
        return f"CombinedBlobService(near={self.near!r}, far={self.far!r})"

    async def has(self, digest: B3Digest) -> bool:
        return await self.near.has(digest) or await self.far.has(digest)

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        found = await self.near.chunks(digest)
        return found if found is not None else await self.far.chunks(digest)

    async def _open_read(self, digest: B3Digest) -> BlobReader | None:
        # The outer VerifyingReader (base class) checks the bytes handed out;
        # inner readers come unverified to avoid hashing everything twice.
        reader = await self.near._open_read(digest)
        if reader is not None:
            return reader
        if isinstance(self.near, ChunkStore):
            chunks = await self.far.chunks(digest)
            if chunks is None:
                return None
            if len(chunks) >= 2:
                await self._copy_chunks(digest, self.near, chunks)
                reader = await self.near._open_read(digest)
                if reader is None:
                    raise StorageError(f"combined: blob {digest.hex()} vanished from near right after the copy")
                return reader
        reader = await self.far._open_read(digest)
        if reader is None:
            return None
        return _FillingReader(reader, digest, await self.near.open_write())

    async def _copy_chunks(self, digest: B3Digest, near: ChunkStore, chunks: Sequence[ChunkMeta]) -> None:
        """Fetch the chunks near lacks from far, store them near, and the index once the blob verifies.

        Chunks are taken in order, up to :data:`FILL_WINDOW` of them in flight;
        each chunk from far is checked against its digest before it is
        written near (so nothing near is ever wrong), and the index is only
        written once all chunks, near and fetched, hash to ``digest``.
        """
        missing = {c.digest for c in await near.missing_chunks(chunks)}
        hasher = blake3.blake3()

        async def fetch(chunk: ChunkMeta) -> bytes:
            source = self.far if chunk.digest in missing else self.near
            data = await source.read_chunk(chunk)
            if data is None:
                raise StorageError(f"combined: chunk {chunk.digest.hex()} of blob {digest.hex()} not found")
            if chunk.digest in missing:
                await near.put_chunk(chunk, data)
            return data

        pending: dict[int, asyncio.Future[bytes]] = {}
        try:
            for i in range(len(chunks)):
                for j in range(i, min(len(chunks), i + FILL_WINDOW)):
                    if j not in pending:
                        pending[j] = asyncio.ensure_future(fetch(chunks[j]))
                hasher.update(await pending.pop(i))
        finally:
            for task in pending.values():
                task.cancel()
            await asyncio.gather(*pending.values(), return_exceptions=True)
        got = hasher.digest()
        if got != digest:
            raise ChecksumMismatch(f"combined: the chunks far lists for blob {digest.hex()}", digest.hex(), got.hex())
        await near.put_index(digest, chunks)

    async def outboard(self, digest: B3Digest) -> bytes | None:
        return await (self.near if await self.near.has(digest) else self.far).outboard(digest)

    async def _read_many(
        self, max_sizes: Mapping[B3Digest, int], checker: BlobChecker, parallel: int
    ) -> dict[B3Digest, bytes]:
        """Near's batch first; the rest from far, verified, then kept near too."""
        found = await self.near._read_many(max_sizes, checker, parallel)
        rest = {digest: cap for digest, cap in max_sizes.items() if digest not in found}
        if rest:
            fetched = await self.far._read_many(rest, checker, parallel)
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

    async def close(self) -> None:
        if self._close_inner:
            await close_all(self.near, self.far)


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

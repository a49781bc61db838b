"""``snix.castore.v1.ChunkStoreService`` and ``BlobStoreService`` over any :class:`BlobService`.

snix (2026) splits the blob service in two: a chunk store (chunks by their
BLAKE3, ``StatChunk``/``GetChunk``/``PutChunk``) and a blob store that only
knows which chunks a blob is made of (``BlobMeta``: ``StatBlob``/``GetBlob``/
``PutBlob``).  A client that has a blob's chunk list asks for the chunks it
lacks and uploads only the chunks the server lacks.  Both services exist
only under the ``snix`` package name (tvix never had them).

How any backend maps onto them:

* A *chunk* is any stored object of at most :data:`CHUNK_LIMIT` bytes named
  by its BLAKE3: a chunk of a chunked blob, or a blob kept whole (a small
  blob is its own single chunk).  ``StatChunk`` is ``has``; ``GetChunk``
  reads the whole chunk, checks it against its digest, and only then sends
  it; a larger object is ``FAILED_PRECONDITION`` (read it with
  ``BlobService.Read``).  ``PutChunk`` takes 1 to :data:`CHUNK_LIMIT`
  bytes: backends with chunk objects (:class:`~nixcas.castore.blob.base.ChunkStore`)
  store a chunk, the others a blob.
* ``GetBlob`` answers the backend's chunk list; a blob stored whole answers
  one chunk, itself; the empty blob answers an empty list (and only it).
* ``PutBlob`` checks the ``BlobMeta`` before anything becomes visible: every
  chunk is read back from the store (a window of them at a time, at most
  :data:`PUT_BLOB_WINDOW` bytes), must have its declared size and digest,
  and the chunks, hashed in order, must make up the blob's digest.  Then a
  :class:`~nixcas.castore.blob.base.ChunkStore` publishes the index; any
  other backend gets the verified bytes streamed into a writer that is
  closed only once the whole hash matched (otherwise it is aborted).  So a
  blob put this way reads through ``BlobService.Read`` and
  ``Stat(send_chunks)`` like any other.

Refusals: an empty ``PutChunk``, a chunk list that lies about a size, or
does not hash to the digest → ``INVALID_ARGUMENT``; a chunk not stored →
``FAILED_PRECONDITION`` naming it; a missing blob or chunk on ``Stat*`` /
``Get*`` → ``NOT_FOUND``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Final, NoReturn, TypeAlias

import blake3
import grpc
import grpc.aio

from nixcas._proto.snix.castore.protos import rpc_blobstore_pb2 as bs_pb
from nixcas._proto.snix.castore.protos import rpc_chunkstore_pb2 as cs_pb
from nixcas.castore.blob.base import BlobService, ChunkMeta, ChunkStore
from nixcas.castore.blob.chunking import CHUNK_TRANSFER_LIMIT, EMPTY_BLOB
from nixcas.castore.digest import B3Digest
from nixcas.castore.grpc.codec import blob_meta, decode_blob_chunk, encode_blob_chunk
from nixcas.castore.grpc.register import add_servicer
from nixcas.castore.grpc.servicers import _ensure_not_cancelled
from nixcas.castore.grpc.status import rpc_errors
from nixcas.errors import NotFoundError, ValidationError

__all__ = [
    "CHUNK_LIMIT",
    "EMPTY_BLOB",
    "BlobStoreServiceServicer",
    "ChunkStoreServiceServicer",
    "add_chunkstore_servicers",
]

CHUNK_LIMIT: Final = CHUNK_TRANSFER_LIMIT
"""Largest chunk ``PutChunk`` takes, ``GetChunk`` sends and a ``BlobMeta`` may declare."""

PUT_BLOB_WINDOW: Final = 8 << 20
"""Bytes of chunks ``PutBlob`` reads back at once (one batched ``read_many``) while checking a BlobMeta."""

PUT_BLOB_WINDOW_CHUNKS: Final = 256
"""Chunks ``PutBlob`` reads back at once, however small they are."""

MAX_BLOB_CHUNKS: Final = 1 << 20
"""Most chunks one ``BlobMeta`` may list (a 256 GiB blob at snix's average chunk size): the list is held in memory."""

GET_MESSAGE_SIZE: Final = 1 << 20
"""Bytes per ``GetChunkResponse``."""

Context: TypeAlias = "grpc.aio.ServicerContext[object, object]"


def _digest(raw: bytes, what: str) -> B3Digest:
    try:
        return B3Digest(raw)
    except ValidationError as e:
        raise ValidationError(f"{what}: {e}") from None


async def _stat(blobs: BlobService, raw: bytes, method: str, what: str) -> None:
    """What both ``Stat`` calls answer: NOT_FOUND unless ``blobs`` has the ``what`` (chunk or blob) ``raw`` names."""
    digest = _digest(raw, method)
    if not await blobs.has(digest):
        raise NotFoundError(f"{what} {digest.hex()} not found")


class ChunkStoreServiceServicer:
    """``StatChunk``, ``GetChunk`` (checked before sending), ``PutChunk`` (1 to :data:`CHUNK_LIMIT` bytes)."""

    SERIALIZERS: Final = {"GetChunk": encode_blob_chunk}
    DESERIALIZERS: Final = {"PutChunk": decode_blob_chunk}

    def __init__(self, blobs: BlobService) -> None:
        self._blobs = blobs

    async def StatChunk(self, request: cs_pb.StatChunkRequest, context: Context) -> cs_pb.StatChunkResponse:
        async with rpc_errors(context, "ChunkStoreService.StatChunk"):
            await _stat(self._blobs, request.digest, "StatChunk", "chunk")
            return cs_pb.StatChunkResponse()

    async def GetChunk(self, request: cs_pb.GetChunkRequest, context: Context) -> AsyncIterator[bytes]:
        async with rpc_errors(context, "ChunkStoreService.GetChunk"):
            digest = _digest(request.digest, "GetChunk")
            # read_many hashes what it returns against the digest: nothing unchecked is sent.
            data = (await self._blobs.read_many({digest: CHUNK_LIMIT})).get(digest)
            if data is None:
                if await self._blobs.has(digest):
                    await context.abort(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"GetChunk: {digest.hex()} is a blob larger than a chunk may be ({CHUNK_LIMIT} bytes):"
                        " read it with BlobService.Read",
                    )
                raise NotFoundError(f"chunk {digest.hex()} not found")
        view = memoryview(data)
        for start in range(0, len(view), GET_MESSAGE_SIZE):
            yield bytes(view[start : start + GET_MESSAGE_SIZE])

    async def PutChunk(self, requests: AsyncIterator[bytes], context: Context) -> cs_pb.PutChunkResponse:
        async with rpc_errors(context, "ChunkStoreService.PutChunk"):
            parts: list[bytes] = []
            size = 0
            async for data in requests:
                size += len(data)
                if size > CHUNK_LIMIT:
                    raise ValidationError(f"PutChunk: a chunk has at most {CHUNK_LIMIT} bytes (got more)")
                if data:
                    parts.append(data)
            if not size:
                raise ValidationError("PutChunk: empty chunk (a chunk has at least one byte)")
            data = b"".join(parts)
            del parts
            digest = B3Digest(blake3.blake3(data).digest())
            await _ensure_not_cancelled(context)
            if isinstance(self._blobs, ChunkStore):
                await self._blobs.put_chunk(ChunkMeta(digest, size), data)
            else:
                await self._blobs.put(data)
            return cs_pb.PutChunkResponse(digest=digest)


async def _refuse(context: Context, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable")  # abort raises


class BlobStoreServiceServicer:
    """``StatBlob``, ``GetBlob`` (the chunk list), ``PutBlob`` (a checked chunk list)."""

    def __init__(self, blobs: BlobService) -> None:
        self._blobs = blobs

    async def StatBlob(self, request: bs_pb.BSStatBlobRequest, context: Context) -> bs_pb.BSStatBlobResponse:
        async with rpc_errors(context, "BlobStoreService.StatBlob"):
            await _stat(self._blobs, request.digest, "StatBlob", "blob")
            return bs_pb.BSStatBlobResponse()

    async def GetBlob(self, request: bs_pb.GetBlobRequest, context: Context) -> bs_pb.GetBlobResponse:
        async with rpc_errors(context, "BlobStoreService.GetBlob"):
            digest = _digest(request.digest, "GetBlob")
            chunks = await self._blobs.chunks(digest)
            if chunks is None:
                raise NotFoundError(f"blob {digest.hex()} not found")
            if not chunks and digest != EMPTY_BLOB:  # kept whole: it is its own single chunk
                size = await self._blobs.size(digest)
                if size is None:
                    raise NotFoundError(f"blob {digest.hex()} not found")
                chunks = [ChunkMeta(digest, size)]
            return bs_pb.GetBlobResponse(blob_meta=blob_meta(chunks))

    async def PutBlob(self, request: bs_pb.PutBlobRequest, context: Context) -> bs_pb.BSPutBlobResponse:
        async with rpc_errors(context, "BlobStoreService.PutBlob"):
            digest = _digest(request.digest, "PutBlob")
            where = f"PutBlob {digest.hex()}"
            if not request.HasField("blob_meta"):  # as snix: even the empty blob sends an (empty) BlobMeta
                raise ValidationError(f"{where}: no blob_meta")
            if len(request.blob_meta.chunks) > MAX_BLOB_CHUNKS:
                raise ValidationError(
                    f"{where}: {len(request.blob_meta.chunks)} chunks listed (at most {MAX_BLOB_CHUNKS})"
                )
            chunks = [
                ChunkMeta(_digest(c.digest, f"{where}: chunk {i}"), c.size)
                for i, c in enumerate(request.blob_meta.chunks)
            ]
            if not chunks:
                if digest != EMPTY_BLOB:
                    raise ValidationError(f"{where}: an empty chunk list is only the empty blob's")
                await self._blobs.put(b"")
                return bs_pb.BSPutBlobResponse()
            for i, c in enumerate(chunks):
                if not 0 < c.size <= CHUNK_LIMIT:
                    raise ValidationError(f"{where}: chunk {i} declares {c.size} bytes (allowed: 1..{CHUNK_LIMIT})")
            await _ensure_not_cancelled(context)
            if len(chunks) >= 2 and isinstance(self._blobs, ChunkStore):
                async for _ in self._checked(context, where, digest, chunks):
                    pass
                # each listed digest is stored and its bytes fit; but a blob of several chunks is no chunk
                not_chunks = await self._blobs.missing_chunks(chunks)
                if not_chunks:
                    raise ValidationError(
                        f"{where}: {not_chunks[0].digest.hex()} is a blob of several chunks, not a chunk"
                    )
                await self._blobs.put_index(digest, chunks)
            else:
                async with await self._blobs.open_write(sum(c.size for c in chunks)) as writer:
                    async for data in self._checked(context, where, digest, chunks):
                        await writer.write(data)
                    await writer.close()
            return bs_pb.BSPutBlobResponse()

    async def _checked(
        self, context: Context, where: str, digest: B3Digest, chunks: Sequence[ChunkMeta]
    ) -> AsyncIterator[bytes]:
        """Each chunk's stored bytes in order, checked; the last one only once the whole hashes to ``digest``."""
        hasher = blake3.blake3()
        pending: bytes | None = None
        start = 0
        while start < len(chunks):
            end, window = start, 0
            while end < len(chunks) and (
                end == start or (window + chunks[end].size <= PUT_BLOB_WINDOW and end - start < PUT_BLOB_WINDOW_CHUNKS)
            ):
                window += chunks[end].size
                end += 1
            group = chunks[start:end]
            caps: dict[B3Digest, int] = {}
            for c in group:  # a chunk listed twice: read up to the larger size, each entry is checked below
                caps[c.digest] = max(caps.get(c.digest, 0), c.size)
            found = await self._blobs.read_many(caps)  # each checked against its digest
            for i, c in enumerate(group, start):
                data = found.get(c.digest)
                if data is None:
                    if await self._blobs.has(c.digest):
                        raise ValidationError(
                            f"{where}: chunk {i} ({c.digest.hex()}) is larger than the {c.size} bytes declared"
                        )
                    await _refuse(
                        context,
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"{where}: chunk {i} ({c.digest.hex()}) is not stored (PutChunk it first)",
                    )
                if len(data) != c.size:
                    raise ValidationError(
                        f"{where}: chunk {i} ({c.digest.hex()}) has {len(data)} bytes, not the {c.size} declared"
                    )
                hasher.update(data)
                if pending is not None:
                    yield pending
                pending = data
            start = end
        got = hasher.digest()
        if got != digest:
            raise ValidationError(f"{where}: the chunks make up blob {got.hex()}, not {digest.hex()}")
        if pending is not None:
            yield pending


def add_chunkstore_servicers(server: grpc.aio.Server, blobs: BlobService) -> list[str]:
    """Serve ``ChunkStoreService`` and ``BlobStoreService`` over ``blobs`` (``snix.castore.v1`` only)."""
    return [
        *add_servicer(
            server,
            ChunkStoreServiceServicer(blobs),
            cs_pb.DESCRIPTOR.services_by_name["ChunkStoreService"],
            prefixes=("snix",),
        ),
        *add_servicer(
            server,
            BlobStoreServiceServicer(blobs),
            bs_pb.DESCRIPTOR.services_by_name["BlobStoreService"],
            prefixes=("snix",),
        ),
    ]

"""``chunkstore=1``: the client of snix's ``ChunkStoreService`` and ``BlobStoreService``.

Chunk lists from ``GetBlob``, single chunks by ``GetChunk``, and uploads that
send only the chunks the server lacks.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Final, cast

import blake3
import grpc
import grpc.aio

from nixcas._proto.snix.castore.protos import rpc_blobstore_pb2 as bs_pb
from nixcas._proto.snix.castore.protos import rpc_chunkstore_pb2 as cs_pb
from nixcas.castore.blob.base import BlobWriter, ChunkMeta, ChunkStore, WriterState, check_chunk, run_bounded
from nixcas.castore.blob.chunking import CHUNK_TRANSFER_LIMIT, EMPTY_BLOB, Chunker, check_chunk_list
from nixcas.castore.blob.grpc.client import GrpcBlobService
from nixcas.castore.blob.grpc.writing import WRITE_MESSAGE_SIZE, GrpcBlobWriter
from nixcas.castore.digest import B3Digest
from nixcas.castore.grpc.channel import GrpcConnection
from nixcas.castore.grpc.codec import blob_meta, decode_blob_chunk, encode_blob_chunk
from nixcas.castore.grpc.status import RemoteError, client_errors
from nixcas.errors import InvalidDigestError, NotFoundError, StorageError

STAT_PARALLEL: Final = 32
"""Concurrent ``StatChunk`` calls of one ``missing_chunks``."""

SMALL_BLOB_PUT: Final = 64 << 10
"""A ``chunkstore=1`` writer sends a blob of at most this many bytes (one chunk) by one ``Put``: cheaper than
``StatChunk`` + ``PutChunk`` + ``PutBlob`` (the path of many small files), and the same blob on the server."""

UPLOAD_WINDOW_BYTES: Final = 8 << 20
"""Bytes of chunks a ``chunkstore=1`` writer has in flight (``StatChunk``, then ``PutChunk`` if missing)."""


def _snix_method(service: str, name: str) -> str:
    """The path of a method that exists only under the snix names, whatever ``protocol=`` says."""
    return f"/snix.castore.v1.{service}/{name}"


class GrpcChunkStoreBlobService(GrpcBlobService, ChunkStore):
    """``grpc+…?chunkstore=1``: a daemon's blobs as chunks, through snix's ChunkStore/BlobStore services.

    Chunk lists come from ``GetBlob``, single chunks from ``GetChunk`` (checked
    against their digest before use), so ``combined`` with this service as
    far fetches exactly the chunks near lacks.  As a
    :class:`~nixcas.castore.blob.base.ChunkStore` it takes ``combined``'s
    chunk-level fill when near.  A writer cuts the blob with FastCDC (the
    snix parameters) as it streams, asks ``StatChunk`` for each chunk and
    sends only the missing ones (``PutChunk``, up to
    :data:`UPLOAD_WINDOW_BYTES` in flight), then ``PutBlob``, which the server
    checks against the digest computed here; a blob of at most
    :data:`SMALL_BLOB_PUT` bytes goes by one ``Put``.  Whole sequential reads still
    stream through ``BlobService.Read`` (one call instead of one per chunk).
    """

    def __init__(self, connection: GrpcConnection) -> None:
        super().__init__(connection)
        channel = connection.channel
        self._stat_chunk = channel.unary_unary(
            _snix_method("ChunkStoreService", "StatChunk"),
            request_serializer=cs_pb.StatChunkRequest.SerializeToString,
            response_deserializer=cs_pb.StatChunkResponse.FromString,
        )
        self._get_chunk = channel.unary_stream(
            _snix_method("ChunkStoreService", "GetChunk"),
            request_serializer=cs_pb.GetChunkRequest.SerializeToString,
            response_deserializer=decode_blob_chunk,
        )
        self._put_chunk = channel.stream_unary(
            _snix_method("ChunkStoreService", "PutChunk"),
            request_serializer=encode_blob_chunk,
            response_deserializer=cs_pb.PutChunkResponse.FromString,
        )
        self._stat_blob = channel.unary_unary(
            _snix_method("BlobStoreService", "StatBlob"),
            request_serializer=bs_pb.BSStatBlobRequest.SerializeToString,
            response_deserializer=bs_pb.BSStatBlobResponse.FromString,
        )
        self._get_blob = channel.unary_unary(
            _snix_method("BlobStoreService", "GetBlob"),
            request_serializer=bs_pb.GetBlobRequest.SerializeToString,
            response_deserializer=bs_pb.GetBlobResponse.FromString,
        )
        self._put_blob = channel.unary_unary(
            _snix_method("BlobStoreService", "PutBlob"),
            request_serializer=bs_pb.PutBlobRequest.SerializeToString,
            response_deserializer=bs_pb.BSPutBlobResponse.FromString,
        )

    @contextlib.asynccontextmanager
    async def _snix_call(self, where: str) -> AsyncIterator[None]:
        """:func:`client_errors`, and a server without the snix services named as such."""
        try:
            async with client_errors(where):
                yield
        except RemoteError as e:
            if e.code != grpc.StatusCode.UNIMPLEMENTED:
                raise
            raise RemoteError(
                f"{where}: the server has no snix.castore.v1 ChunkStoreService/BlobStoreService"
                " (tvix daemons and snix before 2026 do not): remove chunkstore=1 from the URL",
                e.code,
            ) from None

    async def has(self, digest: B3Digest) -> bool:
        try:
            async with self._snix_call(f"{self.url}: StatBlob {digest.hex()}"):
                await self._stat_blob(bs_pb.BSStatBlobRequest(digest=digest))
        except NotFoundError:
            return False
        return True

    async def get_blob_meta(self, digest: B3Digest) -> list[ChunkMeta] | None:
        """``GetBlob``: the chunks the blob is made of, as the server lists them (validated); ``None`` if missing."""
        where = f"{self.url}: GetBlob {digest.hex()}"
        try:
            async with self._snix_call(where):
                response = cast(bs_pb.GetBlobResponse, await self._get_blob(bs_pb.GetBlobRequest(digest=digest)))
        except NotFoundError:
            return None
        if not response.HasField("blob_meta"):
            raise StorageError(f"{where}: the answer has no blob_meta")
        chunks: list[ChunkMeta] = []
        for chunk in response.blob_meta.chunks:
            try:
                chunks.append(ChunkMeta(B3Digest(chunk.digest), chunk.size))
            except InvalidDigestError as e:
                raise StorageError(f"{where}: bad chunk digest: {e}") from None
        check_chunk_list(digest, chunks, where)
        if not chunks and digest != EMPTY_BLOB:
            raise StorageError(f"{where}: an empty chunk list for a blob that is not empty")
        if len(chunks) == 1 and chunks[0].digest != digest:
            raise StorageError(f"{where}: a single chunk {chunks[0].digest.hex()} that is not the blob")
        return chunks

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        found = await self.get_blob_meta(digest)
        return None if found is None else found if len(found) >= 2 else []

    async def size(self, digest: B3Digest) -> int | None:
        found = await self.get_blob_meta(digest)
        return None if found is None else sum(c.size for c in found)

    async def read_chunk(self, chunk: ChunkMeta) -> bytes | None:
        """``GetChunk`` (at most ``chunk.size + 1`` bytes taken), checked; larger chunks go through ``Read``."""
        if chunk.size > CHUNK_TRANSFER_LIMIT:
            return await super().read_chunk(chunk)
        where = f"{self.url}: GetChunk {chunk.digest.hex()}"
        call = self._get_chunk(cs_pb.GetChunkRequest(digest=chunk.digest))
        parts: list[bytes] = []
        got = 0
        try:
            async with self._snix_call(where):
                async for data in call:
                    got += len(data)
                    if got > chunk.size:
                        raise StorageError(f"{where}: more than the {chunk.size} bytes declared")
                    parts.append(cast(bytes, data))
        except NotFoundError:
            return None
        finally:
            call.cancel()
        return check_chunk(chunk, b"".join(parts), where)

    async def has_chunk(self, digest: B3Digest) -> bool:
        """``StatChunk``."""
        try:
            async with self._snix_call(f"{self.url}: StatChunk {digest.hex()}"):
                await self._stat_chunk(cs_pb.StatChunkRequest(digest=digest))
        except NotFoundError:
            return False
        return True

    async def missing_chunks(self, chunks: Sequence[ChunkMeta]) -> list[ChunkMeta]:
        """``StatChunk`` for each distinct chunk, :data:`STAT_PARALLEL` at a time."""
        distinct = list(dict.fromkeys(c.digest for c in chunks))
        missing: set[B3Digest] = set()

        async def one(digest: B3Digest) -> None:
            if not await self.has_chunk(digest):
                missing.add(digest)

        await run_bounded(distinct, one, STAT_PARALLEL)
        return [c for c in chunks if c.digest in missing]

    async def put_chunk(self, chunk: ChunkMeta, data: bytes) -> None:
        check_chunk(chunk, data, f"{self.url}: PutChunk")
        await self._send_chunk(chunk, data)

    async def _send_chunk(self, chunk: ChunkMeta, data: bytes) -> None:
        where = f"{self.url}: PutChunk {chunk.digest.hex()}"
        view = memoryview(data)
        messages = [bytes(view[i : i + WRITE_MESSAGE_SIZE]) for i in range(0, len(view), WRITE_MESSAGE_SIZE)]
        async with self._snix_call(where):
            response = cast(cs_pb.PutChunkResponse, await self._put_chunk(iter(messages)))
        if response.digest != chunk.digest:
            raise StorageError(f"{where}: the server answered {response.digest.hex()}")

    async def _ensure_chunk(self, chunk: ChunkMeta, data: bytes) -> None:
        """Send ``chunk`` unless the server has it already."""
        if not await self.has_chunk(chunk.digest):
            await self._send_chunk(chunk, data)

    async def put_index(self, digest: B3Digest, chunks: Sequence[ChunkMeta]) -> None:
        """``PutBlob``: the server checks that the chunks are there and make up ``digest``."""
        async with self._snix_call(f"{self.url}: PutBlob {digest.hex()}"):
            await self._put_blob(bs_pb.PutBlobRequest(digest=digest, blob_meta=blob_meta(chunks)))

    async def open_write(self, expected_size: int | None = None) -> BlobWriter:
        return ChunkingGrpcWriter(self, expected_size)


class ChunkingGrpcWriter(BlobWriter):
    """Cuts the blob as it streams; sends the chunks the server lacks, then ``PutBlob``."""

    def __init__(self, service: GrpcChunkStoreBlobService, expected_size: int | None) -> None:
        self._service = service
        self._state = WriterState(expected_size)
        self._hasher = blake3.blake3()
        self._chunker = Chunker()
        self._chunks: list[ChunkMeta] = []
        self._queued: set[B3Digest] = set()
        self._inflight: collections.deque[tuple[asyncio.Future[None], int]] = collections.deque()
        self._inflight_bytes = 0

    async def write(self, data: bytes) -> None:
        await self._admit(self._state, len(data))
        if not data:
            return
        self._hasher.update(data)
        try:
            for piece in self._chunker.feed(data):
                await self._queue(piece)
        except BaseException:
            await self.abort()
            raise

    async def _queue(self, piece: memoryview) -> None:
        data = bytes(piece)
        chunk = ChunkMeta(B3Digest(blake3.blake3(data).digest()), len(data))
        self._chunks.append(chunk)
        if chunk.digest in self._queued:  # repeated within the blob: sent once
            return
        self._queued.add(chunk.digest)
        self._inflight.append((asyncio.ensure_future(self._service._ensure_chunk(chunk, data)), len(data)))
        self._inflight_bytes += len(data)
        while self._inflight_bytes > UPLOAD_WINDOW_BYTES:
            await self._settle_one()

    async def _settle_one(self) -> None:
        task, size = self._inflight.popleft()
        self._inflight_bytes -= size
        await task

    async def close(self) -> B3Digest:
        if self._state.digest is not None:
            return self._state.digest
        try:
            self._state.check_complete()
            pieces = self._chunker.finish()
            if not self._chunks and self._state.written <= SMALL_BLOB_PUT:
                digest = await self._put_whole(b"".join(pieces))
            else:
                for piece in pieces:
                    await self._queue(piece)
                while self._inflight:
                    await self._settle_one()
                digest = B3Digest(self._hasher.digest())
                await self._service.put_index(digest, self._chunks)
        except BaseException:
            await self.abort()
            raise
        self._state.digest = digest
        return digest

    async def _put_whole(self, data: bytes) -> B3Digest:
        """A small blob in one ``BlobService.Put`` (one round trip instead of three)."""
        writer = GrpcBlobWriter(self._service, len(data))
        async with writer:
            await writer.write(data)
            digest = await writer.close()
        if digest != self._hasher.digest():
            raise StorageError(f"{self._service.url}: Put: the blob changed while it was written")
        return digest

    async def abort(self) -> None:
        if self._state.digest is None and not self._state.aborted:
            self._state.aborted = True
            tasks = [task for task, _ in self._inflight]
            self._inflight.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

"""``grpc+unix:///sock``, ``grpc+http(s)://host:port`` — a remote BlobService.

Nothing a remote sends is trusted: ``Read`` data goes through the base
class's :class:`~nixcas.castore.blob.base.VerifyingReader` (a sequential read
ends in :class:`~nixcas.errors.ChecksumMismatch` instead of EOF when the bytes
do not hash to the digest asked for), the digest a ``Put`` answers with is
compared with the one computed locally while sending, and chunk lists are
validated.  Blobs stream in both directions; nothing is buffered whole.

A blob the server stores in chunks (``Stat`` lists two or more) is read
chunk by chunk, each chunk checked against its BLAKE3 before any of its
bytes are handed out, up to :data:`READ_WINDOW` bytes of chunks in flight.
While the reader goes sequentially from the start, the chunks are cut from
one streaming ``Read`` of the whole blob (one call instead of one per chunk:
per-call cost dominates on fast links); a chunk anywhere else (after a
seek) is fetched by its own ``Read``, several in parallel.

With ``?chunkstore=1`` (:class:`GrpcChunkStoreBlobService`) the client also
speaks snix's ``ChunkStoreService``/``BlobStoreService`` (under the ``snix``
names whatever ``protocol=`` says): chunk lists from ``GetBlob``, single
chunks by ``GetChunk``, and uploads that send only the chunks the server
lacks.  tvix and snix daemons before 2026 do not have these services
(``UNIMPLEMENTED``); nixcas daemons serve them over every blob backend.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import ClassVar, Final, TypeAlias, cast

import blake3
import grpc
import grpc.aio

from nixcas._proto.snix.castore.protos import rpc_blobstore_pb2 as bs_pb
from nixcas._proto.snix.castore.protos import rpc_chunkstore_pb2 as cs_pb
from nixcas._proto.tvix.castore.protos import rpc_blobstore_pb2 as blob_pb
from nixcas.castore.blob.base import (
    BlobReader,
    BlobService,
    BlobWriter,
    ChunkMeta,
    ChunkStore,
    WriterState,
    check_chunk,
    resolve_seek,
    run_bounded,
)
from nixcas.castore.blob.chunked import ChunkedReader
from nixcas.castore.blob.chunking import CHUNK_TRANSFER_LIMIT, EMPTY_BLOB, Chunker, check_chunk_list
from nixcas.castore.digest import B3Digest
from nixcas.castore.grpc.channel import GrpcClient, GrpcConnection, GrpcUrlConfig
from nixcas.castore.grpc.codec import blob_meta, decode_blob_chunk, encode_blob_chunk
from nixcas.castore.grpc.status import RemoteError, client_errors, error_from_status
from nixcas.config import Resolver, ServiceConfig
from nixcas.errors import InvalidDigestError, NotFoundError, StorageError

__all__ = ["WRITE_MESSAGE_SIZE", "GrpcBlobService", "GrpcBlobServiceConfig", "GrpcChunkStoreBlobService"]

WRITE_MESSAGE_SIZE: Final = 1 << 20
"""Largest ``BlobChunk`` a writer sends (larger writes are split); 1 MiB was fastest in bench/grpc_throughput.py."""

READ_WINDOW: Final = 8 << 20
"""Bytes of chunks a sequential read of a chunked blob fetches ahead, in parallel ``Read`` calls."""

PUT_MANY_PARALLEL: Final = 32
"""Concurrent Put streams of one ``put_many`` (a channel fails somewhere past a thousand)."""

STAT_PARALLEL: Final = 32
"""Concurrent ``StatChunk`` calls of one ``missing_chunks``."""

SMALL_BLOB_PUT: Final = 64 << 10
"""A ``chunkstore=1`` writer sends a blob of at most this many bytes (one chunk) by one ``Put``: cheaper than
``StatChunk`` + ``PutChunk`` + ``PutBlob`` (the path of many small files), and the same blob on the server."""

UPLOAD_WINDOW_BYTES: Final = 8 << 20
"""Bytes of chunks a ``chunkstore=1`` writer has in flight (``StatChunk``, then ``PutChunk`` if missing)."""

_PACKAGE = "castore.v1"


@dataclass(frozen=True)
class GrpcBlobServiceConfig(GrpcUrlConfig, ServiceConfig[BlobService]):
    """``grpc+unix:///abs/socket`` or ``grpc+http(s)://host[:port]``; composition: ``url``."""

    async def build(self, resolver: Resolver) -> BlobService:
        connection = await self.connect()
        if connection.endpoint.chunkstore:
            return GrpcChunkStoreBlobService(connection)
        return GrpcBlobService(connection)


_ReadCall: TypeAlias = "grpc.aio.UnaryStreamCall[blob_pb.ReadBlobRequest, bytes]"


async def _next_data(call: _ReadCall) -> bytes:
    """The next non-empty data of a Read stream; ``b""`` at its end."""
    while True:
        data = await call.read()
        if data is grpc.aio.EOF:
            return b""
        if data:
            return cast(bytes, data)


class GrpcBlobService(GrpcClient, BlobService):
    """A BlobService served by a nixcas, tvix or snix daemon."""

    chunk_reads: ClassVar[bool] = False  # one Read stream per blob costs far less than one per chunk

    def __init__(self, connection: GrpcConnection) -> None:
        super().__init__(connection)
        channel, method = connection.channel, connection.method
        self._stat = channel.unary_unary(
            method(_PACKAGE, "BlobService", "Stat"),
            request_serializer=blob_pb.StatBlobRequest.SerializeToString,
            response_deserializer=blob_pb.StatBlobResponse.FromString,
        )
        self._read = channel.unary_stream(
            method(_PACKAGE, "BlobService", "Read"),
            request_serializer=blob_pb.ReadBlobRequest.SerializeToString,
            response_deserializer=decode_blob_chunk,
        )
        self._put = channel.stream_unary(
            method(_PACKAGE, "BlobService", "Put"),
            request_serializer=encode_blob_chunk,
            response_deserializer=blob_pb.PutBlobResponse.FromString,
        )

    async def _stat_or_none(
        self, digest: B3Digest, send_chunks: bool, send_bao: bool = False
    ) -> blob_pb.StatBlobResponse | None:
        try:
            request = blob_pb.StatBlobRequest(digest=digest, send_chunks=send_chunks, send_bao=send_bao)
            response = await self._stat(request)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise error_from_status(e.code(), e.details(), f"{self.url}: Stat {digest.hex()}") from None
        return cast(blob_pb.StatBlobResponse, response)

    async def has(self, digest: B3Digest) -> bool:
        return await self._stat_or_none(digest, send_chunks=False) is not None

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        response = await self._stat_or_none(digest, send_chunks=True)
        if response is None:
            return None
        chunks: list[ChunkMeta] = []
        for chunk in response.chunks:
            try:
                chunks.append(ChunkMeta(B3Digest(chunk.digest), chunk.size))
            except InvalidDigestError as e:
                raise StorageError(f"{self.url}: Stat {digest.hex()}: bad chunk digest: {e}") from None
        check_chunk_list(digest, chunks, f"{self.url}: Stat")
        return chunks

    async def outboard(self, digest: B3Digest) -> bytes | None:
        """``Stat(send_bao)``: the server's outboard, unverified (check it with :mod:`nixcas.castore.bao`)."""
        response = await self._stat_or_none(digest, send_chunks=False, send_bao=True)
        if response is None:
            return None
        if not response.bao:
            raise StorageError(
                f"{self.url}: Stat {digest.hex()}: the server sent no bao outboard (tvix/snix send none)"
            )
        return response.bao

    async def _start_read(self, digest: B3Digest) -> tuple[_ReadCall, bytes] | None:
        """A Read call and its first data (``b""`` for an empty blob), or ``None`` if missing."""
        call: _ReadCall = self._read(blob_pb.ReadBlobRequest(digest=digest))
        try:
            first = await _next_data(call)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise error_from_status(e.code(), e.details(), f"{self.url}: Read {digest.hex()}") from None
        return call, first

    async def _open_read(self, digest: B3Digest) -> BlobReader | None:
        chunks = await self.chunks(digest)
        if chunks is None:
            return None
        if len(chunks) >= 2:
            return _StreamedChunkedReader(_ChunkStream(self, digest), chunks)
        started = await self._start_read(digest)
        if started is None:
            return None
        return _GrpcBlobReader(self, digest, *started)

    async def _fetch_chunk(self, chunk: ChunkMeta, offset: int = 0) -> bytes:
        data = await self.read_chunk(chunk)
        if data is None:
            raise StorageError(f"{self.url}: chunk {chunk.digest.hex()} not found")
        return data

    async def _read_capped(self, digest: B3Digest, cap: int) -> bytes | None:
        """One ``Read`` (no ``Stat`` first: the path of many small blobs), stopped past ``cap`` bytes."""
        started = await self._start_read(digest)
        if started is None:
            return None
        call, data = started
        parts: list[bytes] = []
        got = 0
        try:
            async with client_errors(f"{self.url}: Read {digest.hex()}"):
                while data:
                    parts.append(data)
                    got += len(data)
                    if got > cap:
                        return None
                    data = await _next_data(call)
        finally:
            call.cancel()
        return b"".join(parts)

    async def open_write(self, expected_size: int | None = None) -> BlobWriter:
        return _GrpcBlobWriter(self, expected_size)

    async def put_many(self, blobs: Sequence[bytes]) -> list[B3Digest]:
        """At most :data:`PUT_MANY_PARALLEL` Put streams at once; the first failure cancels the rest."""
        limit = asyncio.Semaphore(PUT_MANY_PARALLEL)

        async def one(data: bytes) -> B3Digest:
            async with limit:
                return await self.put(data)

        tasks = [asyncio.ensure_future(one(b)) for b in blobs]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


class _GrpcBlobReader(BlobReader):
    """Streams one Read call; seeking forward skips, seeking backward restarts the call."""

    def __init__(self, service: GrpcBlobService, digest: B3Digest, call: _ReadCall, first: bytes) -> None:
        self._service = service
        self._digest = digest
        self._call: _ReadCall | None = None
        self._start(call, first)
        self._size: int | None = None

    def _start(self, call: _ReadCall, first: bytes) -> None:
        if self._call is not None:
            self._call.cancel()
        self._call = call
        self._buffer = memoryview(first)
        self._stream_pos = 0  # blob offset of the start of _buffer
        self._pos = 0
        self._eof = not first

    def _where(self) -> str:
        return f"{self._service.url}: Read {self._digest.hex()}"

    async def _next_message(self) -> bool:
        """Move to the next message; ``False`` at the end of the stream."""
        self._stream_pos += len(self._buffer)
        self._buffer = memoryview(b"")
        if self._eof or self._call is None:
            return False
        async with client_errors(self._where()):
            data = await _next_data(self._call)
        if not data:
            self._eof = True
            self._size = self._stream_pos
            return False
        self._buffer = memoryview(data)
        return True

    async def read(self, n: int = -1) -> bytes:
        parts: list[bytes] = []
        remaining = n
        while remaining != 0:
            offset = self._pos - self._stream_pos
            if offset >= len(self._buffer):  # also skips what a forward seek jumped over
                if (parts and n >= 0) or not await self._next_message():
                    break
                continue
            take = len(self._buffer) - offset if n < 0 else min(len(self._buffer) - offset, remaining)
            if offset == 0 and take == len(self._buffer):
                parts.append(cast(bytes, self._buffer.obj))  # a whole message: its bytes, no copy
            else:
                parts.append(bytes(self._buffer[offset : offset + take]))
            self._pos += take
            remaining -= take if n >= 0 else 0
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _blob_size(self) -> int:
        if self._size is None:
            chunks = await self._service.chunks(self._digest)
            if chunks:
                self._size = sum(c.size for c in chunks)
            else:  # no chunk list: count a second stream through
                started = await self._service._start_read(self._digest)
                if started is None:
                    raise StorageError(f"{self._where()}: blob disappeared")
                call, data = started
                size = 0
                async with client_errors(self._where()):
                    while data:
                        size += len(data)
                        data = await _next_data(call)
                self._size = size
        return self._size

    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        size = await self._blob_size() if whence == io.SEEK_END else 0
        target = resolve_seek(self._pos, size, offset, whence)
        if target < self._stream_pos:
            started = await self._service._start_read(self._digest)
            if started is None:
                raise StorageError(f"{self._where()}: blob disappeared")
            self._start(*started)
        self._pos = target
        return target

    def tell(self) -> int:
        return self._pos

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None


class _ChunkStream:
    """Chunks of one blob in order from a single ``Read`` stream; any other chunk by its own ``Read``.

    :meth:`fetch` queues a chunk on the stream when it follows the last
    chunk queued (requests take their turn on a lock, in the order the
    reader made them); the first request, at offset 0, starts the stream.
    A chunk elsewhere, or any chunk once the stream is given up (a queued
    fetch cancelled, a chunk that failed), goes through
    :meth:`GrpcBlobService._fetch_chunk`.
    """

    def __init__(self, service: GrpcBlobService, digest: B3Digest) -> None:
        self._service = service
        self._digest = digest
        self._lock = asyncio.Lock()
        self._call: _ReadCall | None = None
        self._pending = memoryview(b"")
        self._position = 0  # blob offset of the next byte the stream gives
        self._claimed = 0  # blob offset after the last chunk queued on the stream
        self._usable = True

    def _where(self) -> str:
        return f"{self._service.url}: Read {self._digest.hex()}"

    async def fetch(self, chunk: ChunkMeta, offset: int) -> bytes:
        if self._usable and offset == self._claimed:  # the chunk after the last one queued on the stream
            self._claimed += chunk.size
            try:
                async with self._lock:
                    if self._usable and offset == self._position:
                        return check_chunk(chunk, await self._take(chunk.size), self._where())
            except BaseException:
                self.close()
                raise
            self.close()  # a chunk queued before this one was given up: the stream is out of step
        return await self._service._fetch_chunk(chunk)

    async def _take(self, n: int) -> bytes:
        parts: list[bytes] = []
        need = n
        while need:
            if not self._pending:
                if self._call is None:
                    started = await self._service._start_read(self._digest)
                    if started is None:
                        raise StorageError(f"{self._where()}: blob disappeared")
                    self._call, data = started
                else:
                    async with client_errors(self._where()):
                        data = await _next_data(self._call)
                if not data:
                    raise StorageError(f"{self._where()}: the stream ended before the chunks its list declares")
                self._pending = memoryview(data)
            part = self._pending[:need]
            parts.append(bytes(part))
            self._pending = self._pending[len(part) :]
            need -= len(part)
        self._position += n
        return b"".join(parts)

    def close(self) -> None:
        self._usable = False
        self._pending = memoryview(b"")
        if self._call is not None:
            self._call.cancel()
            self._call = None


class _StreamedChunkedReader(ChunkedReader):
    """A :class:`ChunkedReader` fed by a :class:`_ChunkStream` (which it closes)."""

    def __init__(self, stream: _ChunkStream, chunks: Sequence[ChunkMeta]) -> None:
        super().__init__(stream.fetch, chunks, window_bytes=READ_WINDOW)
        self._stream = stream

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            self._stream.close()


class _GrpcBlobWriter(BlobWriter):
    """Streams ``BlobChunk``s of a Put call; the blob exists once the server answered."""

    def __init__(self, service: GrpcBlobService, expected_size: int | None) -> None:
        self._service = service
        self._state = WriterState(expected_size)
        self._hasher = blake3.blake3()
        self._call: grpc.aio.StreamUnaryCall[bytes, blob_pb.PutBlobResponse] | None = None

    def _started(self) -> grpc.aio.StreamUnaryCall[bytes, blob_pb.PutBlobResponse]:
        if self._call is None:
            self._call = self._service._put()
        return self._call

    async def write(self, data: bytes) -> None:
        await self._admit(self._state, len(data))
        if not data:
            return
        self._hasher.update(data)
        call = self._started()
        try:
            async with client_errors(f"{self._service.url}: Put"):
                view = memoryview(data)
                for start in range(0, len(view), WRITE_MESSAGE_SIZE):
                    await call.write(bytes(view[start : start + WRITE_MESSAGE_SIZE]))
        except asyncio.InvalidStateError:  # the server already ended the call
            raise await self._ended(call) from None

    async def _ended(self, call: grpc.aio.StreamUnaryCall[bytes, blob_pb.PutBlobResponse]) -> StorageError:
        """The error for a Put the server ended before the data was complete."""
        code, details = await call.code(), await call.details()
        await self.abort()
        if code == grpc.StatusCode.OK:
            return StorageError(f"{self._service.url}: Put: the server ended the upload early")
        return error_from_status(code, details, f"{self._service.url}: Put")

    async def close(self) -> B3Digest:
        if self._state.digest is not None:
            return self._state.digest
        try:
            self._state.check_complete()
            call = self._started()
            async with client_errors(f"{self._service.url}: Put"):
                with contextlib.suppress(grpc.aio.BaseError):  # a failed call: awaiting it gives the status
                    await call.done_writing()
                response = await call
            local = B3Digest(self._hasher.digest())
            if response.digest != local:
                raise StorageError(
                    f"{self._service.url}: Put answered {response.digest.hex()}, the data sent is {local.hex()}"
                )
        except BaseException:
            await self.abort()
            raise
        self._state.digest = local
        return local

    async def abort(self) -> None:
        if self._state.digest is None and not self._state.aborted:
            self._state.aborted = True
            if self._call is not None:
                self._call.cancel()
                await asyncio.sleep(0)


# -- chunkstore=1: snix's ChunkStoreService / BlobStoreService --------------------------------


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
        return _ChunkingGrpcWriter(self, expected_size)


class _ChunkingGrpcWriter(BlobWriter):
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
        writer = _GrpcBlobWriter(self._service, len(data))
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

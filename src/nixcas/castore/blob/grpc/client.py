"""The gRPC blob client over tvix's ``BlobService`` (``Stat``, ``Read``, ``Put``)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import ClassVar, Final, cast

import grpc
import grpc.aio

from nixcas._proto.tvix.castore.protos import rpc_blobstore_pb2 as blob_pb
from nixcas.castore.blob.base import BlobReader, BlobService, BlobWriter, ChunkMeta
from nixcas.castore.blob.chunking import check_chunk_list
from nixcas.castore.blob.grpc.reading import ChunkStream, GrpcBlobReader, ReadCall, StreamedChunkedReader, next_data
from nixcas.castore.blob.grpc.writing import GrpcBlobWriter
from nixcas.castore.digest import B3Digest
from nixcas.castore.grpc.channel import GrpcClient, GrpcConnection
from nixcas.castore.grpc.codec import decode_blob_chunk, encode_blob_chunk
from nixcas.castore.grpc.status import client_errors, error_from_status
from nixcas.errors import InvalidDigestError, StorageError

PUT_MANY_PARALLEL: Final = 32
"""Concurrent Put streams of one ``put_many`` (a channel fails somewhere past a thousand)."""

_PACKAGE = "castore.v1"


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

    async def _start_read(self, digest: B3Digest) -> tuple[ReadCall, bytes] | None:
        """A Read call and its first data (``b""`` for an empty blob), or ``None`` if missing."""
        call: ReadCall = self._read(blob_pb.ReadBlobRequest(digest=digest))
        try:
            first = await next_data(call)
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
            return StreamedChunkedReader(ChunkStream(self, digest), chunks)
        started = await self._start_read(digest)
        if started is None:
            return None
        return GrpcBlobReader(self, digest, *started)

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
                    data = await next_data(call)
        finally:
            call.cancel()
        return b"".join(parts)

    async def open_write(self, expected_size: int | None = None) -> BlobWriter:
        return GrpcBlobWriter(self, expected_size)

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

"""Writing a blob over gRPC: ``BlobChunk`` messages of one ``Put`` call."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Final

import blake3
import grpc
import grpc.aio

from nixcas._proto.tvix.castore.protos import rpc_blobstore_pb2 as blob_pb
from nixcas.castore.blob.base import BlobWriter, WriterState
from nixcas.castore.digest import B3Digest
from nixcas.castore.grpc.status import client_errors, error_from_status
from nixcas.errors import StorageError

if TYPE_CHECKING:
    from nixcas.castore.blob.grpc.client import GrpcBlobService


WRITE_MESSAGE_SIZE: Final = 1 << 20
"""Largest ``BlobChunk`` a writer sends (larger writes are split); 1 MiB was fastest in bench/grpc_throughput.py."""


class GrpcBlobWriter(BlobWriter):
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

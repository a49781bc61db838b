"""Any BlobService / DirectoryService on the wire (``tvix.castore.v1`` and ``snix.castore.v1``).

Semantics follow tvix (reference §2.3) with three deliberate differences:
``Stat`` honours ``send_chunks`` (the chunk list is sent only when asked)
and ``send_bao`` (the bao outboard of 16 KiB chunk groups, which tvix and
snix never fill in),
``Read`` streams messages of :data:`READ_MESSAGE_SIZE` instead of 4 KiB, and
``Directory.Put`` answers an invalid closure with ``INVALID_ARGUMENT``
carrying the reason (tvix says ``INTERNAL``).  An aborted or failed ``Put``
leaves nothing behind: writers and putters are discarded on any error,
including the client going away.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final, TypeAlias

import grpc.aio

from nixcas._proto.tvix.castore.protos import castore_pb2 as pb
from nixcas._proto.tvix.castore.protos import rpc_blobstore_pb2 as blob_pb
from nixcas._proto.tvix.castore.protos import rpc_directory_pb2 as dir_pb
from nixcas.castore.blob.base import BlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.grpc.codec import encode_blob_chunk, identity
from nixcas.castore.grpc.register import add_servicer
from nixcas.castore.grpc.status import rpc_errors
from nixcas.errors import NotFoundError, ValidationError

__all__ = ["READ_MESSAGE_SIZE", "BlobServiceServicer", "DirectoryServiceServicer", "add_castore_servicers"]

READ_MESSAGE_SIZE: Final = 1 << 20
"""Bytes per ``BlobChunk`` sent by ``Read``: 1 MiB was fastest in bench/grpc_throughput.py (64 KiB to 2 MiB tried)."""

Context: TypeAlias = "grpc.aio.ServicerContext[object, object]"


async def _ensure_not_cancelled(context: Context) -> None:
    """Raise if the client cancelled (call before committing an upload).

    grpc.aio ends a client stream the same way for a half-close and for a
    client that went away (RST_STREAM); the cancellation is only noticed
    later.  Sending the initial metadata is an operation through the gRPC
    core, which already knows the stream was reset: it fails (or leaves the
    context cancelled) then, before anything becomes visible.
    """
    try:
        await context.send_initial_metadata(())
    except Exception as e:  # the call is gone
        raise asyncio.CancelledError from e
    if context.cancelled():
        raise asyncio.CancelledError


class BlobServiceServicer:
    """``BlobService``: ``Stat``, ``Read``, ``Put`` over a :class:`BlobService`."""

    SERIALIZERS: Final = {"Read": encode_blob_chunk}

    def __init__(self, blobs: BlobService) -> None:
        self._blobs = blobs

    async def Stat(self, request: blob_pb.StatBlobRequest, context: Context) -> blob_pb.StatBlobResponse:
        async with rpc_errors(context, "BlobService.Stat"):
            digest = B3Digest(request.digest)
            response = blob_pb.StatBlobResponse()
            if request.send_bao:
                outboard = await self._blobs.outboard(digest)
                if outboard is None:
                    raise NotFoundError(f"blob {digest.hex()} not found")
                response.bao = outboard
            if not request.send_chunks:
                if not request.send_bao and not await self._blobs.has(digest):
                    raise NotFoundError(f"blob {digest.hex()} not found")
                return response
            chunks = await self._blobs.chunks(digest)
            if chunks is None:
                raise NotFoundError(f"blob {digest.hex()} not found")
            for chunk in chunks:
                response.chunks.add(digest=chunk.digest, size=chunk.size)
            return response

    async def Read(self, request: blob_pb.ReadBlobRequest, context: Context) -> AsyncIterator[bytes]:
        async with rpc_errors(context, "BlobService.Read"):
            digest = B3Digest(request.digest)
            reader = await self._blobs.open_read(digest)
            if reader is None:
                raise NotFoundError(f"blob {digest.hex()} not found")
            async with reader:
                while data := await reader.read(READ_MESSAGE_SIZE):
                    yield data

    async def Put(self, requests: AsyncIterator[blob_pb.BlobChunk], context: Context) -> blob_pb.PutBlobResponse:
        async with rpc_errors(context, "BlobService.Put"):
            async with await self._blobs.open_write() as writer:
                async for chunk in requests:
                    if chunk.data:
                        await writer.write(chunk.data)
                await _ensure_not_cancelled(context)
                digest = await writer.close()
            return blob_pb.PutBlobResponse(digest=digest)


class DirectoryServiceServicer:
    """``DirectoryService``: ``Get`` (single or recursive) and ``Put`` (a closure) over a :class:`DirectoryService`.

    ``before_commit`` runs before a closure is committed: the daemon passes
    its blob service's ``sync``, so directories never become durable before
    the blobs they refer to (as an embedded import does it).
    """

    # Directories go out as the canonical bytes the store already holds.
    SERIALIZERS: Final = {"Get": identity}

    def __init__(
        self, directories: DirectoryService, before_commit: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        self._directories = directories
        self._before_commit = before_commit

    async def Get(self, request: dir_pb.GetDirectoryRequest, context: Context) -> AsyncIterator[bytes]:
        async with rpc_errors(context, "DirectoryService.Get"):
            if request.WhichOneof("by_what") is None:
                raise ValidationError("invalid by_what: a digest is required")
            digest = B3Digest(request.digest)
            if request.recursive:
                # A missing root is an empty stream with status OK (as tvix).
                async for _, raw in self._directories.get_recursive_raw(digest):
                    yield raw
                return
            found = await self._directories.get(digest)
            if found is None:
                raise NotFoundError(f"directory {digest.hex()} not found")
            yield found.encode()

    async def Put(self, requests: AsyncIterator[pb.Directory], context: Context) -> dir_pb.PutDirectoryResponse:
        async with rpc_errors(context, "DirectoryService.Put"):
            async with self._directories.put_multiple_start() as putter:
                async for message in requests:
                    await putter.put(Directory.from_proto(message))
                await _ensure_not_cancelled(context)
                if self._before_commit is not None:
                    await self._before_commit()
                root = await putter.close()
            return dir_pb.PutDirectoryResponse(root_digest=root)


def add_castore_servicers(server: grpc.aio.Server, blobs: BlobService, directories: DirectoryService) -> list[str]:
    """Serve ``blobs`` and ``directories`` on ``server`` under the tvix and snix names."""
    services = (
        blob_pb.DESCRIPTOR.services_by_name["BlobService"],
        dir_pb.DESCRIPTOR.services_by_name["DirectoryService"],
    )
    return [
        *add_servicer(server, BlobServiceServicer(blobs), services[0]),
        *add_servicer(server, DirectoryServiceServicer(directories, blobs.sync), services[1]),
    ]

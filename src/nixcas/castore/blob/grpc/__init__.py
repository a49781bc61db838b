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

from dataclasses import dataclass

from nixcas.castore.blob.base import BlobService
from nixcas.castore.blob.grpc.chunkstore import GrpcChunkStoreBlobService
from nixcas.castore.blob.grpc.client import GrpcBlobService
from nixcas.castore.blob.grpc.writing import WRITE_MESSAGE_SIZE
from nixcas.castore.grpc.channel import GrpcUrlConfig
from nixcas.config import Resolver, ServiceConfig

__all__ = ["WRITE_MESSAGE_SIZE", "GrpcBlobService", "GrpcBlobServiceConfig", "GrpcChunkStoreBlobService"]


@dataclass(frozen=True)
class GrpcBlobServiceConfig(GrpcUrlConfig, ServiceConfig[BlobService]):
    """``grpc+unix:///abs/socket`` or ``grpc+http(s)://host[:port]``; composition: ``url``."""

    async def build(self, resolver: Resolver) -> BlobService:
        connection = await self.connect()
        if connection.endpoint.chunkstore:
            return GrpcChunkStoreBlobService(connection)
        return GrpcBlobService(connection)

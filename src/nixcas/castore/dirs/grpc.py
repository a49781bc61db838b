"""``grpc+unix:///sock``, ``grpc+http(s)://host:port`` — a remote DirectoryService.

Every Directory received is decoded, validated and re-hashed: ``get`` checks
it against the digest asked for, ``get_recursive`` checks each message against
the set of digests announced so far (root first, then only children of
directories already received) and that the closure is complete.  A closure
is uploaded in one ``Put`` stream, leaves first, after the base class's
putter validated it.

Directory size rule: the URL option ``size-rule=snix|tvix`` declares the
rule the peer's store follows (default: the rule asked for, else ``snix``).
Uploads are checked against it before they are sent, and every closure
received must follow it (its sub-directories must have the sizes their
parents record under it); a tree of the other rule is refused with an error
naming the rule.  Directories are never translated between rules on the
wire: a digest names one tree under one rule (see ``nixcas castore
rewrite-directories`` to convert a store).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import cast

import blake3
import grpc
import grpc.aio

from nixcas._proto.tvix.castore.protos import rpc_directory_pb2 as dir_pb
from nixcas.castore.digest import B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.graph import RootToLeavesValidator
from nixcas.castore.grpc.channel import GrpcClient, GrpcConnection, GrpcEndpoint, GrpcUrlConfig
from nixcas.castore.grpc.codec import identity
from nixcas.castore.grpc.status import client_errors, error_from_status
from nixcas.castore.sizerule import DEFAULT_SIZE_RULE, SizeRule
from nixcas.config import Resolver, ServiceConfig
from nixcas.errors import ChecksumMismatch, StorageError, ValidationError

__all__ = ["GrpcDirectoryService", "GrpcDirectoryServiceConfig"]

_PACKAGE = "castore.v1"


@dataclass(frozen=True)
class GrpcDirectoryServiceConfig(GrpcUrlConfig, ServiceConfig[DirectoryService]):
    """``grpc+unix:///abs/socket`` or ``grpc+http(s)://host[:port]``; composition: ``url``."""

    async def build(self, resolver: Resolver) -> DirectoryService:
        declared = GrpcEndpoint.parse(self.url).size_rule
        service = GrpcDirectoryService(await self.connect())
        if declared is not None:
            service.size_rule = SizeRule(declared)
        else:
            service.size_rule = resolver.size_rule or DEFAULT_SIZE_RULE
        return service


class GrpcDirectoryService(GrpcClient, DirectoryService):
    """A DirectoryService served by a nixcas, tvix or snix daemon."""

    rule_recorded = True  # the peer's store has its rule; a cache in front must follow it
    rewritable = False  # converted where it is stored, not over the wire

    def __init__(self, connection: GrpcConnection) -> None:
        super().__init__(connection)
        channel, method = connection.channel, connection.method
        self._get = channel.unary_stream(
            method(_PACKAGE, "DirectoryService", "Get"),
            request_serializer=dir_pb.GetDirectoryRequest.SerializeToString,
            response_deserializer=identity,
        )
        self._put = channel.stream_unary(
            method(_PACKAGE, "DirectoryService", "Put"),
            request_serializer=identity,
            response_deserializer=dir_pb.PutDirectoryResponse.FromString,
        )

    def _checked(self, raw: bytes, expected: B3Digest, where: str) -> Directory:
        """``raw`` decoded, if it is the Directory ``expected`` names (canonical or not)."""
        got = B3Digest(blake3.blake3(raw).digest())
        try:
            directory = Directory.decode(raw)
        except ValidationError as e:
            if got != expected:
                raise ChecksumMismatch(f"{where}: received directory", expected.hex(), got.hex()) from None
            raise StorageError(f"{where}: received an invalid directory: {e}") from None
        if directory.digest != expected:
            raise ChecksumMismatch(f"{where}: received directory", expected.hex(), directory.digest.hex())
        return directory

    async def _get_raw(self, digest: B3Digest) -> bytes | None:
        directory = await self.get(digest)
        return None if directory is None else directory.encode()

    async def get(self, digest: B3Digest) -> Directory | None:
        where = f"{self.url}: Get {digest.hex()}"
        call = self._get(dir_pb.GetDirectoryRequest(digest=digest, recursive=False))
        try:
            raw = await call.read()
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise error_from_status(e.code(), e.details(), where) from None
        finally:
            call.cancel()
        if raw is grpc.aio.EOF:
            return None
        return self._checked(cast(bytes, raw), digest, where)

    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        where = f"{self.url}: Get {root.hex()} (recursive)"
        validator = RootToLeavesValidator(root, self.size_rule)
        received = 0
        call = self._get(dir_pb.GetDirectoryRequest(digest=root, recursive=True))
        try:
            async with client_errors(where):
                async for raw in call:
                    if received == 0:
                        directory = self._checked(raw, root, where)
                    else:
                        try:
                            directory = Directory.decode(raw)
                        except ValidationError as e:
                            raise StorageError(f"{where}: received an invalid directory: {e}") from None
                    validator.add(directory)
                    received += 1
                    yield directory
        finally:
            call.cancel()
        if received:  # nothing at all means the root is not there
            validator.finish()

    async def _put_raw(self, items: Sequence[tuple[B3Digest, bytes]]) -> None:
        if not items:
            return
        where = f"{self.url}: Put"
        async with client_errors(where):
            response = await self._put(iter([raw for _, raw in items]))
        if response.root_digest != items[-1][0]:
            raise StorageError(
                f"{where}: server answered root {response.root_digest.hex()}, expected {items[-1][0].hex()}"
            )

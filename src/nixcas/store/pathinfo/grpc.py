"""``grpc+unix:///sock``, ``grpc+http(s)://host:port`` — a remote PathInfoService.

Records received are decoded and validated like any backend's (and ``get``
checks the answer is the path asked for).  The daemon also computes NAR
hashes where the data lives: :meth:`GrpcPathInfoService.nar_calculation_service`
offers ``CalculateNAR`` so an import does not read every blob back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import grpc.aio

from nixcas._proto.tvix.castore.protos import castore_pb2 as castore_pb
from nixcas._proto.tvix.store.protos import rpc_pathinfo_pb2 as rpc_pb
from nixcas.castore.grpc.channel import GrpcClient, GrpcConnection, GrpcUrlConfig
from nixcas.castore.grpc.codec import identity
from nixcas.castore.grpc.status import client_errors, error_from_status
from nixcas.castore.nodes import Node
from nixcas.castore.proto import node_to_proto
from nixcas.config import Resolver, ServiceConfig
from nixcas.errors import PathInfoError, StorageError
from nixcas.store.nar.hashing import NarCalculationService
from nixcas.store.pathinfo.base import PathInfoService, check_digest
from nixcas.store.pathinfo.model import PathInfo

__all__ = ["GrpcPathInfoService", "GrpcPathInfoServiceConfig"]

_PACKAGE = "store.v1"


@dataclass(frozen=True)
class GrpcPathInfoServiceConfig(GrpcUrlConfig, ServiceConfig[PathInfoService]):
    """``grpc+unix:///abs/socket`` or ``grpc+http(s)://host[:port]``; composition: ``url``."""

    async def build(self, resolver: Resolver) -> PathInfoService:
        return GrpcPathInfoService(await self.connect())


class GrpcPathInfoService(GrpcClient, PathInfoService):
    """A PathInfoService served by a nixcas, tvix or snix daemon."""

    def __init__(self, connection: GrpcConnection) -> None:
        super().__init__(connection)
        channel, method = connection.channel, connection.method
        self._get = channel.unary_unary(
            method(_PACKAGE, "PathInfoService", "Get"),
            request_serializer=rpc_pb.GetPathInfoRequest.SerializeToString,
            response_deserializer=identity,
        )
        self._put = channel.unary_unary(
            method(_PACKAGE, "PathInfoService", "Put"),
            request_serializer=identity,
            response_deserializer=identity,
        )
        self._list = channel.unary_stream(
            method(_PACKAGE, "PathInfoService", "List"),
            request_serializer=rpc_pb.ListPathInfoRequest.SerializeToString,
            response_deserializer=identity,
        )
        self._calculate = channel.unary_unary(
            method(_PACKAGE, "PathInfoService", "CalculateNAR"),
            request_serializer=castore_pb.Node.SerializeToString,
            response_deserializer=rpc_pb.CalculateNARResponse.FromString,
        )

    def _decoded(self, raw: bytes, where: str) -> PathInfo:
        try:
            return PathInfo.decode(raw)
        except PathInfoError as e:
            raise StorageError(f"{where}: received an invalid path info: {e}") from None

    async def _get_raw(self, digest: bytes) -> bytes | None:
        try:
            raw: bytes = await self._get(rpc_pb.GetPathInfoRequest(by_output_hash=check_digest(digest)))
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise error_from_status(e.code(), e.details(), f"{self.url}: Get") from None
        return raw

    async def _put_raw(self, digest: bytes, raw: bytes) -> None:
        async with client_errors(f"{self.url}: Put"):
            await self._put(raw)

    async def put(self, info: PathInfo) -> PathInfo:
        where = f"{self.url}: Put {info.store_path}"
        async with client_errors(where):
            raw: bytes = await self._put(info.encode())
        stored = self._decoded(raw, where)
        if stored.store_path != info.store_path or stored.node != info.node:
            raise StorageError(f"{where}: the server answered with a different path info ({stored.store_path})")
        return stored

    async def _list_raw(self) -> AsyncIterator[tuple[bytes, bytes]]:
        where = f"{self.url}: List"
        call = self._list(rpc_pb.ListPathInfoRequest())
        try:
            async with client_errors(where):
                async for raw in call:
                    yield self._decoded(raw, where).digest, raw
        finally:
            call.cancel()

    def nar_calculation_service(self) -> NarCalculationService:
        return _GrpcNarCalculationService(self)

    async def calculate_nar(self, node: Node) -> tuple[int, bytes]:
        """NAR size and SHA-256 of ``node``, computed by the daemon."""
        async with client_errors(f"{self.url}: CalculateNAR"):
            response = await self._calculate(node_to_proto(b"", node))
        if len(response.nar_sha256) != 32:
            raise StorageError(f"{self.url}: CalculateNAR answered a {len(response.nar_sha256)}-byte sha256")
        return response.nar_size, response.nar_sha256


class _GrpcNarCalculationService(NarCalculationService):
    def __init__(self, service: GrpcPathInfoService) -> None:
        self._service = service

    async def calculate_nar(self, node: Node) -> tuple[int, bytes]:
        return await self._service.calculate_nar(node)

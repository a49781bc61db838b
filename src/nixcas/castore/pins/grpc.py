"""``grpc+unix:///sock``, ``grpc+http(s)://host:port`` — the pins of a ``nixcas daemon``.

Speaks ``nixcas.pin.v1.PinService`` (``proto/nixcas/pin/v1/pin.proto``),
which a nixcas daemon serves beside the castore and path info services; a
store reached through a daemon keeps its pins there by default.  tvix and
snix daemons do not have it: using one is an error naming the URL, never an
empty list of pins.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import ClassVar

import grpc

from nixcas._proto.nixcas.pin.v1 import pin_pb2 as pb
from nixcas.castore.digest import B3Digest
from nixcas.castore.grpc.channel import GrpcClient, GrpcConnection, GrpcUrlConfig
from nixcas.castore.grpc.status import RemoteError, client_errors
from nixcas.castore.pins.base import Pin, PinService, check_pin
from nixcas.config import Resolver, ServiceConfig
from nixcas.errors import InvalidDigestError, StorageError

__all__ = ["SERVICE", "GrpcPinService", "GrpcPinServiceConfig"]

SERVICE = "nixcas.pin.v1.PinService"


@contextlib.asynccontextmanager
async def _unimplemented(url: str) -> AsyncIterator[None]:
    """A daemon without the pin service is an error saying so."""
    try:
        yield
    except RemoteError as e:
        if e.code != grpc.StatusCode.UNIMPLEMENTED:
            raise
        raise StorageError(f"{url}: serves no pin service ({SERVICE}): not a nixcas daemon, or an older one") from None


@dataclass(frozen=True)
class GrpcPinServiceConfig(GrpcUrlConfig, ServiceConfig[PinService]):
    """``grpc+unix:///abs/socket`` or ``grpc+http(s)://host[:port]``; composition: ``url``."""

    async def build(self, resolver: Resolver) -> PinService:
        return GrpcPinService(await self.connect())


class GrpcPinService(GrpcClient, PinService):
    """The PinService of a nixcas daemon."""

    per_host: ClassVar[bool] = False

    def __init__(self, connection: GrpcConnection) -> None:
        super().__init__(connection)
        channel = connection.channel
        self._pin = channel.unary_unary(
            f"/{SERVICE}/Pin",
            request_serializer=pb.PinRequest.SerializeToString,
            response_deserializer=pb.PinResponse.FromString,
        )
        self._unpin = channel.unary_unary(
            f"/{SERVICE}/Unpin",
            request_serializer=pb.UnpinRequest.SerializeToString,
            response_deserializer=pb.UnpinResponse.FromString,
        )
        self._list = channel.unary_stream(
            f"/{SERVICE}/List",
            request_serializer=pb.ListPinsRequest.SerializeToString,
            response_deserializer=pb.PinEntry.FromString,
        )

    def _decoded(self, entry: pb.PinEntry, where: str) -> Pin:
        try:
            return Pin(entry.name, B3Digest(entry.digest), entry.created_ns)
        except InvalidDigestError as e:
            raise StorageError(f"{self.url}: {where}: received an invalid pin {entry.name!r}: {e}") from None

    async def pin(self, name: str, digest: B3Digest) -> Pin | None:
        digest = check_pin(name, digest)
        async with _unimplemented(self.url), client_errors(f"{self.url}: PinService.Pin"):
            response: pb.PinResponse = await self._pin(pb.PinRequest(name=name, digest=digest))
        return self._decoded(response.replaced, "Pin") if response.HasField("replaced") else None

    async def unpin(self, name: str) -> bool:
        async with _unimplemented(self.url), client_errors(f"{self.url}: PinService.Unpin"):
            response: pb.UnpinResponse = await self._unpin(pb.UnpinRequest(name=name))
        return response.existed

    async def list(self) -> list[Pin]:
        out: list[Pin] = []
        call = self._list(pb.ListPinsRequest())
        try:
            async with _unimplemented(self.url), client_errors(f"{self.url}: PinService.List"):
                async for entry in call:
                    out.append(self._decoded(entry, "List"))
        finally:
            call.cancel()
        return out

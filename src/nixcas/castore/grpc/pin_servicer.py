"""Any PinService on the wire as ``nixcas.pin.v1.PinService`` (``proto/nixcas/pin/v1/pin.proto``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeAlias

import grpc.aio

from nixcas._proto.nixcas.pin.v1 import pin_pb2 as pb
from nixcas.castore.grpc.register import add_servicer
from nixcas.castore.grpc.status import rpc_errors
from nixcas.castore.pins.base import PinService, check_pin

__all__ = ["PinServiceServicer", "add_pin_servicer"]

Context: TypeAlias = "grpc.aio.ServicerContext[object, object]"


class PinServiceServicer:
    """``Pin``, ``Unpin``, ``List`` over a :class:`PinService`."""

    def __init__(self, pins: PinService) -> None:
        self._pins = pins

    async def Pin(self, request: pb.PinRequest, context: Context) -> pb.PinResponse:
        async with rpc_errors(context, "PinService.Pin"):
            digest = check_pin(request.name, request.digest)
            old = await self._pins.pin(request.name, digest)
            if old is None:
                return pb.PinResponse()
            return pb.PinResponse(replaced=pb.PinEntry(name=old.name, digest=old.digest, created_ns=old.created_ns))

    async def Unpin(self, request: pb.UnpinRequest, context: Context) -> pb.UnpinResponse:
        async with rpc_errors(context, "PinService.Unpin"):
            return pb.UnpinResponse(existed=await self._pins.unpin(request.name))

    async def List(self, request: pb.ListPinsRequest, context: Context) -> AsyncIterator[pb.PinEntry]:
        async with rpc_errors(context, "PinService.List"):
            for pin in await self._pins.list():
                yield pb.PinEntry(name=pin.name, digest=pin.digest, created_ns=pin.created_ns)


def add_pin_servicer(server: grpc.aio.Server, pins: PinService) -> list[str]:
    """Serve ``pins`` on ``server`` as ``nixcas.pin.v1.PinService``."""
    return add_servicer(server, PinServiceServicer(pins), pb.DESCRIPTOR.services_by_name["PinService"], ("nixcas",))

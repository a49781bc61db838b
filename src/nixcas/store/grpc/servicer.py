"""Any PathInfoService on the wire, under ``tvix.store.v1`` and ``snix.store.v1``.

Semantics follow reference §2.3: ``Get`` without ``by_what`` is
``UNIMPLEMENTED``, a digest that is not 20 bytes ``INVALID_ARGUMENT``, an
unknown path ``NOT_FOUND``; ``Put`` validates the message (``INVALID_ARGUMENT
"Invalid path info: …"``) and answers with what the backend stored;
``CalculateNAR`` takes an anonymous root node (``FAILED_PRECONDITION`` when a
file node's size contradicts its stored blob) and is answered by a
:class:`~nixcas.store.nar.hashing.NarCalculationService` that caches per node
(tvix renders the NAR every time); ``List`` streams every record.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final, TypeAlias

import grpc
import grpc.aio

from nixcas._proto.tvix.castore.protos import castore_pb2 as castore_pb
from nixcas._proto.tvix.store.protos import pathinfo_pb2 as pb
from nixcas._proto.tvix.store.protos import rpc_pathinfo_pb2 as rpc_pb
from nixcas.castore.grpc.codec import identity
from nixcas.castore.grpc.register import add_servicer
from nixcas.castore.grpc.status import rpc_errors
from nixcas.castore.proto import node_from_proto
from nixcas.errors import NotFoundError, PathInfoError, ValidationError
from nixcas.store import nixbase32
from nixcas.store.nar.hashing import NarCalculationService
from nixcas.store.nar.plan import BlobSizeMismatch
from nixcas.store.pathinfo.base import PathInfoService, check_digest
from nixcas.store.pathinfo.model import PathInfo

__all__ = ["PathInfoServiceServicer", "add_store_servicers"]

Context: TypeAlias = "grpc.aio.ServicerContext[object, object]"


class PathInfoServiceServicer:
    """``PathInfoService``: ``Get``, ``Put``, ``CalculateNAR``, ``List``."""

    SERIALIZERS: Final = {"Get": identity, "List": identity}

    def __init__(
        self,
        pathinfos: PathInfoService,
        nar_calculation: NarCalculationService,
        before_commit: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._pathinfos = pathinfos
        self._nar = nar_calculation
        self._before_commit = before_commit

    async def Get(self, request: rpc_pb.GetPathInfoRequest, context: Context) -> bytes:
        if request.WhichOneof("by_what") is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "by_what needs to be specified")
        async with rpc_errors(context, "PathInfoService.Get"):
            digest = check_digest(request.by_output_hash)
            info = await self._pathinfos.get(digest)
            if info is None:
                raise NotFoundError(f"PathInfo not found: {nixbase32.encode(digest)}")
            return info.encode()
        raise AssertionError("unreachable")  # pragma: no cover

    async def Put(self, request: pb.PathInfo, context: Context) -> pb.PathInfo:
        async with rpc_errors(context, "PathInfoService.Put"):
            try:
                info = PathInfo.from_proto(request)
            except PathInfoError as e:
                raise ValidationError(f"Invalid path info: {str(e).removeprefix('invalid path info: ')}") from None
            if self._before_commit is not None:
                await self._before_commit()  # the blobs it refers to are durable first
            stored = await self._pathinfos.put(info)
            return stored.to_proto()
        raise AssertionError("unreachable")  # pragma: no cover

    async def CalculateNAR(self, request: castore_pb.Node, context: Context) -> rpc_pb.CalculateNARResponse:
        async with rpc_errors(context, "PathInfoService.CalculateNAR"):
            try:
                _, node = node_from_proto(request, anonymous=True)
            except ValidationError as e:
                raise ValidationError(f"invalid root node: {e}") from None
            try:
                size, sha256 = await self._nar.calculate_nar(node)
            except BlobSizeMismatch as e:  # the node contradicts the stored blob: the caller's node is wrong
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
            return rpc_pb.CalculateNARResponse(nar_size=size, nar_sha256=sha256)
        raise AssertionError("unreachable")  # pragma: no cover

    async def List(self, request: rpc_pb.ListPathInfoRequest, context: Context) -> AsyncIterator[bytes]:
        async with rpc_errors(context, "PathInfoService.List"):
            async for info in self._pathinfos.list():
                yield info.encode()


def add_store_servicers(
    server: grpc.aio.Server,
    pathinfos: PathInfoService,
    nar_calculation: NarCalculationService,
    before_commit: Callable[[], Awaitable[None]] | None = None,
) -> list[str]:
    """Serve ``pathinfos`` on ``server`` under the tvix and snix names (``before_commit``: see the servicer)."""
    service = rpc_pb.DESCRIPTOR.services_by_name["PathInfoService"]
    return add_servicer(server, PathInfoServiceServicer(pathinfos, nar_calculation, before_commit), service)

"""The gRPC daemon: services, health and reflection on one listening socket.

:func:`start_server` puts a store's services on a grpc.aio server under both
the ``tvix.*`` and ``snix.*`` names, adds ``grpc.health.v1.Health`` (the
overall service ``""`` and every served name report ``SERVING`` until shutdown
starts) and server reflection in both its ``v1`` and ``v1alpha`` versions, so
``grpcurl``/``evans`` need no ``.proto`` files.

Listen addresses: ``host:port`` (``[::1]:8000``; port ``0`` picks a free one)
or a unix socket path (anything containing ``/``).  A stale socket file left
by a dead daemon is replaced; a live one is an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

import grpc
import grpc.aio
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from nixcas._proto.nixcas.pin.v1 import pin_pb2
from nixcas._proto.snix.castore.protos import rpc_blobservice_pb2 as snix_blob_pb
from nixcas._proto.snix.castore.protos import rpc_blobstore_pb2 as snix_blobstore_pb
from nixcas._proto.snix.castore.protos import rpc_chunkstore_pb2 as snix_chunkstore_pb
from nixcas._proto.snix.castore.protos import rpc_directory_pb2 as snix_dir_pb
from nixcas._proto.snix.store.protos import rpc_pathinfo_pb2 as snix_pathinfo_pb
from nixcas._proto.tvix.castore.protos import rpc_blobstore_pb2 as blob_pb
from nixcas._proto.tvix.castore.protos import rpc_directory_pb2 as dir_pb
from nixcas._proto.tvix.store.protos import rpc_pathinfo_pb2 as pathinfo_pb
from nixcas.castore.blob.base import BlobService
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.grpc.channel import CHANNEL_OPTIONS
from nixcas.castore.grpc.chunkstore import add_chunkstore_servicers
from nixcas.castore.grpc.pin_servicer import add_pin_servicer
from nixcas.castore.grpc.servicers import add_castore_servicers
from nixcas.castore.pins.base import PinService
from nixcas.errors import ConfigurationError
from nixcas.store.grpc.servicer import add_store_servicers
from nixcas.store.nar.hashing import NarCalculationService, SimpleNarCalculationService
from nixcas.store.pathinfo.base import PathInfoService
from nixcas.urls import is_decimal

__all__ = ["DEFAULT_LISTEN", "RunningServer", "parse_listen_address", "start_server"]

DEFAULT_LISTEN: Final = "127.0.0.1:8000"

REFLECTION_V1: Final = "grpc.reflection.v1.ServerReflection"
REFLECTION_V1ALPHA: Final = "grpc.reflection.v1alpha.ServerReflection"
HEALTH: Final = "grpc.health.v1.Health"

_DESCRIBED_FILES: Final[tuple[FileDescriptor, ...]] = (
    blob_pb.DESCRIPTOR,
    dir_pb.DESCRIPTOR,
    pathinfo_pb.DESCRIPTOR,
    snix_blob_pb.DESCRIPTOR,
    snix_blobstore_pb.DESCRIPTOR,
    snix_chunkstore_pb.DESCRIPTOR,
    snix_dir_pb.DESCRIPTOR,
    snix_pathinfo_pb.DESCRIPTOR,
    pin_pb2.DESCRIPTOR,
    health_pb2.DESCRIPTOR,
    reflection_pb2.DESCRIPTOR,
)


@dataclass(frozen=True)
class ListenAddress:
    """Where to listen: ``bind`` for grpc, ``url`` for clients (``grpc+http://…`` / ``grpc+unix://…``)."""

    bind: str
    unix_path: str | None = None

    def url(self, port: int | None = None) -> str:
        if self.unix_path is not None:
            return f"grpc+unix://{self.unix_path}"
        host = self.bind.rpartition(":")[0]
        return f"grpc+http://{host}:{port}"


def parse_listen_address(text: str) -> ListenAddress:
    """``host:port``, ``[v6]:port`` or a socket path (``/abs`` or ``./rel``)."""
    if "/" in text:
        path = os.path.abspath(text)
        if path.endswith("/") or os.path.isdir(path):
            raise ConfigurationError(f"listen address {text!r}: a socket path, not a directory")
        return ListenAddress(f"unix:{path}", path)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not is_decimal(port) or int(port) > 65535:
        raise ConfigurationError(f"listen address {text!r}: expected host:port or a socket path")
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        raise ConfigurationError(f"listen address {text!r}: write IPv6 hosts in brackets, e.g. [::1]:8000")
    return ListenAddress(text)


def _clear_stale_socket(path: str) -> None:
    """Remove a socket file nobody listens on; refuse to touch anything else."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigurationError(f"listen address {path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # stale: nobody accepts connections on it
    else:
        raise ConfigurationError(f"listen address {path}: another server is listening there")
    finally:
        probe.close()


def _check_bindable(bind: str, listen: str) -> None:
    """Fail with the system's reason if ``host:port`` cannot be listened on.

    grpc's own error says only "Failed to bind" and logs the reason to stderr
    itself, which breaks the one-line error of the CLI.
    """
    host, _, port = bind.rpartition(":")
    try:
        infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigurationError(f"cannot listen on {listen}: {e.strerror}") from None
    errors: list[OSError] = []
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as e:
                errors.append(e)
    in_use = [e for e in errors if e.errno == errno.EADDRINUSE]
    if in_use or (errors and len(errors) == len(infos)):
        raise ConfigurationError(f"cannot listen on {listen}: {(in_use or errors)[0].strerror}")


def _descriptor_pool(files: Iterable[FileDescriptor]) -> descriptor_pool.DescriptorPool:
    """A private pool with ``files`` (and their imports) plus reflection ``v1``, for the reflection service.

    grpcio-reflection ships only the ``v1alpha`` protocol; ``v1`` has the same
    messages under another package, so its descriptor is derived from it.
    """
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)
        added.add(file.name)

    for file in files:
        add(file)
    v1 = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(v1)
    v1.name = "grpc/reflection/v1/reflection.proto"
    v1.package = "grpc.reflection.v1"
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    for message in v1.message_type:
        for f in message.field:
            if f.HasField("type_name"):
                f.type_name = f.type_name.replace(old, new)
    for method in v1.service[0].method:
        method.input_type = method.input_type.replace(old, new)
        method.output_type = method.output_type.replace(old, new)
    pool.Add(v1)
    return pool


def _add_reflection(server: grpc.aio.Server, names: list[str]) -> None:
    servicer = reflection.aio.ReflectionServicer(names, pool=_descriptor_pool(_DESCRIBED_FILES))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)  # v1alpha
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": v1}),)
    )


@dataclass
class RunningServer:
    """A started server: where it listens, and how to stop it."""

    server: grpc.aio.Server
    url: str
    services: list[str]
    health: health.aio.HealthServicer
    unix_path: str | None = None
    _stopped: bool = field(default=False, repr=False)

    async def stop(self, grace: float | None = 10.0) -> None:
        """Stop accepting calls; give running ones ``grace`` seconds, then cancel them."""
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_path)

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def start_server(
    listen: str,
    blobs: BlobService,
    directories: DirectoryService,
    *,
    pathinfos: PathInfoService | None = None,
    nar_calculation: NarCalculationService | None = None,
    pins: PinService | None = None,
) -> RunningServer:
    """Serve the services on ``listen``; return once the socket accepts connections.

    With ``pathinfos`` the PathInfoService is served too; its ``CalculateNAR``
    uses ``nar_calculation``, else what ``pathinfos`` offers, else a caching
    renderer over ``blobs`` and ``directories``.  With ``pins``, nixcas's own
    ``nixcas.pin.v1.PinService`` as well.
    """
    address = parse_listen_address(listen)
    # grpc sets SO_REUSEPORT by default: a second daemon on a taken port would
    # silently share it (the kernel spreading connections over both stores).
    from nixcas.ops.rpc import ServerObserver  # access log, metrics, traces of every call

    server = grpc.aio.server(interceptors=[ServerObserver()], options=(*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)))
    names = add_castore_servicers(server, blobs, directories)
    names += add_chunkstore_servicers(server, blobs)
    if pathinfos is not None:
        nar = nar_calculation or pathinfos.nar_calculation_service()
        if nar is None:
            nar = SimpleNarCalculationService(blobs, directories)
        names += add_store_servicers(server, pathinfos, nar, blobs.sync)
    if pins is not None:
        names += add_pin_servicer(server, pins)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    _add_reflection(server, [*names, HEALTH, REFLECTION_V1, REFLECTION_V1ALPHA])
    if address.unix_path is not None:
        _clear_stale_socket(address.unix_path)
    else:
        _check_bindable(address.bind, listen)
    try:
        port = server.add_insecure_port(address.bind)
    except RuntimeError as e:
        raise ConfigurationError(f"cannot listen on {listen}: {e}") from None
    await server.start()
    return RunningServer(server, address.url(port), names, health_servicer, address.unix_path)


async def serve_until_signalled(running: RunningServer, stop: asyncio.Event, grace: float) -> None:
    """Run until ``stop`` is set, then shut down gracefully."""
    await stop.wait()
    await running.stop(grace)

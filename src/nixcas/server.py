"""The gRPC daemon: services, health and reflection on one listening socket.

:func:`start_server` puts a store's services on a grpc.aio server under both
the ``tvix.*`` and ``snix.*`` names, adds ``grpc.health.v1.Health`` (the
overall service ``""`` and every served name report ``SERVING`` until shutdown
starts) and server reflection in both its ``v1`` and ``v1alpha`` versions, so
``grpcurl``/``evans`` need no ``.proto`` files.

Listen addresses are parsed by :mod:`nixcas.listen` (shared with the bridge).
A listening socket passed by systemd is served through a relay to a private
unix socket (:mod:`nixcas._relay`): grpc cannot adopt a socket it did not bind.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import grpc
import grpc.aio
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

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
from nixcas.castore.grpc.register import add_servicer
from nixcas.castore.grpc.servicers import add_castore_servicers
from nixcas.castore.pins.base import PinService
from nixcas.errors import ConfigurationError
from nixcas.listen import check_bindable, clear_stale_socket, parse_listen_address
from nixcas.store.grpc.servicer import add_store_servicers
from nixcas.store.nar.hashing import NarCalculationService, SimpleNarCalculationService
from nixcas.store.pathinfo.base import PathInfoService

if TYPE_CHECKING:
    from nixcas._relay import Relay
    from nixcas.tls import ServerTls

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
    """Reflection ``v1alpha`` and ``v1`` (the same messages); undecodable requests are ``INVALID_ARGUMENT``."""
    servicer = reflection.aio.ReflectionServicer(names, pool=_descriptor_pool(_DESCRIBED_FILES))
    service = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
    add_servicer(server, servicer, service, names=(REFLECTION_V1ALPHA, REFLECTION_V1))


@dataclass
class RunningServer:
    """A started server: where it listens, and how to stop it."""

    server: grpc.aio.Server
    url: str
    services: list[str]
    health: health.aio.HealthServicer
    unix_path: str | None = None
    relay: Relay | None = field(default=None, repr=False)
    private_dir: str | None = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False)

    async def stop(self, grace: float | None = 10.0) -> None:
        """Turn NOT_SERVING and refuse new calls at once; give running ones ``grace`` seconds, then cancel them."""
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        if self.relay is not None:
            self.relay.close()
        await self.server.stop(grace)
        if self.relay is not None:
            await self.relay.abort()
        if self.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_path)
        if self.private_dir is not None:
            with contextlib.suppress(OSError):
                os.rmdir(self.private_dir)

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
    tls: ServerTls | None = None,
    sock: socket.socket | None = None,
) -> RunningServer:
    """Serve the services on ``listen``; return once the socket accepts connections.

    With ``pathinfos`` the PathInfoService is served too; its ``CalculateNAR``
    uses ``nar_calculation``, else what ``pathinfos`` offers, else a caching
    renderer over ``blobs`` and ``directories``.  With ``pins``, nixcas's own
    ``nixcas.pin.v1.PinService`` as well.  With ``tls``, only TLS connections
    are accepted.  With ``sock`` (a listening socket, systemd's) it is served
    instead of ``listen``.
    """
    address = parse_listen_address(listen) if sock is None else None
    credentials = tls.grpc_credentials() if tls is not None else None
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
    add_servicer(server, health_servicer, health_pb2.DESCRIPTOR.services_by_name["Health"], names=(HEALTH,))
    for name in ("", *names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    _add_reflection(server, [*names, HEALTH, REFLECTION_V1, REFLECTION_V1ALPHA])
    if sock is not None:
        return await _serve_activated(server, sock, credentials, names, health_servicer)
    assert address is not None
    if address.unix_path is not None:
        clear_stale_socket(address.unix_path)
    else:
        check_bindable(address)
    try:
        if credentials is not None:
            port = server.add_secure_port(address.bind, credentials)
        else:
            port = server.add_insecure_port(address.bind)
    except RuntimeError as e:
        raise ConfigurationError(f"cannot listen on {listen}: {e}") from None
    await server.start()
    url = address.url(port)
    if credentials is not None:
        url = url.replace("grpc+http://", "grpc+https://", 1)
    return RunningServer(server, url, names, health_servicer, address.unix_path)


async def _serve_activated(
    server: grpc.aio.Server,
    sock: socket.socket,
    credentials: grpc.ServerCredentials | None,
    names: list[str],
    health_servicer: health.aio.HealthServicer,
) -> RunningServer:
    """Serve on a private unix socket; relay the connections ``sock`` accepts to it."""
    from nixcas._relay import start_relay

    private_dir = tempfile.mkdtemp(prefix="nixcas-grpc-")
    target = os.path.join(private_dir, "grpc.sock")
    if credentials is not None:
        server.add_secure_port(f"unix:{target}", credentials)
    else:
        server.add_insecure_port(f"unix:{target}")
    await server.start()
    relay = await start_relay(sock, target)
    where = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        url = f"grpc+unix://{os.fsdecode(where) if where else '(unnamed)'}"
    else:
        host = f"[{where[0]}]" if sock.family == socket.AF_INET6 else where[0]
        url = f"grpc+{'https' if credentials is not None else 'http'}://{host}:{where[1]}"
    running = RunningServer(server, url, names, health_servicer, relay=relay, private_dir=private_dir)
    running.unix_path = target
    return running

"""Register one servicer under every name a service is known by.

tvix and snix use the same messages and field numbers under different
package names (``tvix.castore.v1`` / ``snix.castore.v1``), so one set of
handlers serves both: the method table is read from the tvix descriptor and
installed once per package prefix.  A servicer may replace the codec of a
method (``SERIALIZERS`` / ``DESERIALIZERS`` class attributes), e.g. to send
canonical bytes it already has instead of building a message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass

__all__ = ["PACKAGE_PREFIXES", "add_servicer", "service_names"]

PACKAGE_PREFIXES: Final = ("tvix", "snix")

_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def service_names(service: ServiceDescriptor, prefixes: Sequence[str] = PACKAGE_PREFIXES) -> list[str]:
    """``tvix.castore.v1.BlobService`` → the same under every prefix."""
    base = service.full_name.partition(".")[2]
    return [f"{prefix}.{base}" for prefix in prefixes]


def add_servicer(
    server: grpc.aio.Server, servicer: object, service: ServiceDescriptor, prefixes: Sequence[str] = PACKAGE_PREFIXES
) -> list[str]:
    """Install ``servicer``'s methods for ``service`` under every prefix; return the service names."""
    serializers: Mapping[str, Callable[[Any], bytes]] = getattr(servicer, "SERIALIZERS", {})
    deserializers: Mapping[str, Callable[[bytes], Any]] = getattr(servicer, "DESERIALIZERS", {})
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        make = _KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=deserializers.get(method.name, GetMessageClass(method.input_type).FromString),
            response_serializer=serializers.get(method.name, GetMessageClass(method.output_type).SerializeToString),
        )
    names = service_names(service, prefixes)
    for name in names:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    return names

"""Register one servicer under every name a service is known by.

tvix and snix use the same messages and field numbers under different
package names (``tvix.castore.v1`` / ``snix.castore.v1``), so one set of
handlers serves both: the method table is read from the tvix descriptor and
installed once per package prefix.  A servicer may replace the codec of a
method (``SERIALIZERS`` / ``DESERIALIZERS`` class attributes), e.g. to send
canonical bytes it already has instead of building a message.

Request bytes that do not decode (not protobuf, or not the method's message)
are answered with ``INVALID_ARGUMENT`` naming the method, by the handler
wrapper: a deserializer that raised would make grpc log a traceback and answer
``INTERNAL``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Final

import grpc
import grpc.aio
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
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


class _Undecodable:
    """What a request deserializer returns for bytes it cannot decode (the handler aborts the call)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(deserialize: Callable[[bytes], Any], method: str) -> Callable[[bytes], Any]:
    def run(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception as e:  # DecodeError, or a message too deep to decode
            return _Undecodable(f"{method}: undecodable request message ({len(raw)} bytes): {str(e)[:200]}")

    return run


async def _refuse(context: grpc.aio.ServicerContext[Any, Any], bad: _Undecodable) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad.reason)


async def _checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Undecodable):
            await _refuse(context, request)
        yield request


async def _responses(result: Any) -> AsyncIterator[Any]:
    """The responses of a streaming handler: yielded, or (grpc's health ``Watch``) written with ``context.write``."""
    if hasattr(result, "__aiter__"):
        async for response in result:
            yield response
    else:
        await result


def _guarded(handler: Callable[..., Any], method: MethodDescriptor) -> Callable[..., Any]:
    """``handler``, aborting with ``INVALID_ARGUMENT`` where a request did not decode."""
    if method.client_streaming:
        if method.server_streaming:

            async def stream_stream(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
                async for response in _responses(handler(_checked(requests, context), context)):
                    yield response

            return stream_stream

        async def stream_unary(requests: AsyncIterator[Any], context: Any) -> Any:
            return await handler(_checked(requests, context), context)

        return stream_unary
    if method.server_streaming:

        async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            if isinstance(request, _Undecodable):
                await _refuse(context, request)
            async for response in _responses(handler(request, context)):
                yield response

        return unary_stream

    async def unary_unary(request: Any, context: Any) -> Any:
        if isinstance(request, _Undecodable):
            await _refuse(context, request)
        return await handler(request, context)

    return unary_unary


def add_servicer(
    server: grpc.aio.Server,
    servicer: object,
    service: ServiceDescriptor,
    prefixes: Sequence[str] = PACKAGE_PREFIXES,
    *,
    names: Sequence[str] | None = None,
) -> list[str]:
    """Install ``servicer``'s methods for ``service`` under every prefix (or under ``names``, when
    given: e.g. grpc's own health and reflection services); return the service names."""
    serializers: Mapping[str, Callable[[Any], bytes]] = getattr(servicer, "SERIALIZERS", {})
    deserializers: Mapping[str, Callable[[bytes], Any]] = getattr(servicer, "DESERIALIZERS", {})
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        make = _KINDS[(method.client_streaming, method.server_streaming)]
        deserialize = deserializers.get(method.name, GetMessageClass(method.input_type).FromString)
        handlers[method.name] = make(
            _guarded(getattr(servicer, method.name), method),
            request_deserializer=_tolerant(deserialize, f"{service.name}.{method.name}"),
            response_serializer=serializers.get(method.name, GetMessageClass(method.output_type).SerializeToString),
        )
    names = list(names) if names is not None else service_names(service, prefixes)
    for name in names:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    return names

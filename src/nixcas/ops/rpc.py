"""Every gRPC call a server answers: one access-log line, metrics, a trace span; ``traceparent`` on calls made.

:class:`ServerObserver` is a ``grpc.aio`` server interceptor (installed by
:func:`nixcas.server.start_server`): for each call it logs, on logger
``nixcas.access``, the method, status code, duration and message bytes each
way (health checks and reflection at DEBUG), records the ``nixcas_grpc_*``
metrics and, with tracing on, runs the handler in a SERVER span continuing
the caller's ``traceparent``.  :func:`client_interceptors` give the
``grpc+…`` backends' channels a CLIENT span per call whose ``traceparent``
goes out in the call's metadata (only when tracing is on).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import grpc
import grpc.aio

from nixcas.ops import tracing
from nixcas.ops.logs import bounded, json_lines, write_directly
from nixcas.ops.metrics import GRPC_IN_FLIGHT, GrpcMetrics

__all__ = ["ServerObserver", "client_interceptors"]

access_log = logging.getLogger("nixcas.access")
QUIET_PREFIXES: Final = ("/grpc.health.", "/grpc.reflection.")
"""Methods logged at DEBUG (probes would otherwise fill the log)."""


def _size(message: object) -> int:
    size = getattr(message, "ByteSize", None)
    return int(size()) if size is not None else 0


class _Call:
    """One call being answered: what it counted so far."""

    __slots__ = ("method", "peer", "received", "sent", "start")

    def __init__(self, method: str, peer: str) -> None:
        self.method = method
        self.peer = peer
        self.start = time.perf_counter()
        self.received = 0
        self.sent = 0


class ServerObserver(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Access log, metrics and traces for every call of a ``grpc.aio`` server."""

    def __init__(self) -> None:
        self.metrics = GrpcMetrics()

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED
            return None
        method: str = details.method
        metadata = details.invocation_metadata or ()
        if handler.request_streaming and handler.response_streaming:
            return handler._replace(stream_stream=self._streaming(method, metadata, handler.stream_stream, True))
        if handler.request_streaming:
            return handler._replace(stream_unary=self._unary(method, metadata, handler.stream_unary, True))
        if handler.response_streaming:
            return handler._replace(unary_stream=self._streaming(method, metadata, handler.unary_stream, False))
        return handler._replace(unary_unary=self._unary(method, metadata, handler.unary_unary, False))

    def _unary(self, method: str, metadata: Any, behavior: Any, streaming_request: bool) -> Any:
        async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            call = _Call(method, context.peer())
            if streaming_request:
                request = _counted(request, call)
            else:
                call.received = _size(request)
            with self._observing(call, metadata, context):
                response = await behavior(request, context)
                call.sent = _size(response)
                return response

        return observed

    def _streaming(self, method: str, metadata: Any, behavior: Any, streaming_request: bool) -> Any:
        async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            call = _Call(method, context.peer())
            if streaming_request:
                request = _counted(request, call)
            else:
                call.received = _size(request)
            with self._observing(call, metadata, context):
                result = behavior(request, context)
                if inspect.isasyncgen(result) or hasattr(result, "__aiter__"):
                    async for response in result:
                        call.sent += _size(response)
                        yield response
                else:  # a handler writing with context.write()
                    await result

        return observed

    @contextlib.contextmanager
    def _observing(self, call: _Call, metadata: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        GRPC_IN_FLIGHT.inc()
        code = "UNKNOWN"
        span = None
        span_cm: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if tracing.enabled():
            carrier = {k: v for k, v in metadata if k == "traceparent" and isinstance(v, str)}
            span_cm = tracing.server_span(call.method, carrier, {"rpc.system": "grpc", "rpc.method": call.method})
        try:
            with span_cm as span:
                try:
                    yield
                except asyncio.CancelledError:
                    code = "CANCELLED"
                    raise
                except grpc.aio.AbortError:
                    code = _code_name(context.code(), "UNKNOWN")
                    raise
                except Exception:
                    code = "UNKNOWN"
                    raise
                else:
                    code = _code_name(context.code(), "OK")
                finally:
                    if span is not None:
                        tracing.finish(span, code != "OK", {"rpc.grpc.status_code": code})
        finally:
            GRPC_IN_FLIGHT.dec()
            seconds = time.perf_counter() - call.start
            self.metrics.record(call.method, code, seconds, call.received, call.sent)
            level = logging.DEBUG if call.method.startswith(QUIET_PREFIXES) else logging.INFO
            if access_log.isEnabledFor(level):
                _log(level, call, code, seconds)


def _log(level: int, call: _Call, code: str, seconds: float) -> None:
    peer = bounded(call.peer, 100)
    line = f"{call.method} {code} {seconds * 1000:.1f}ms in={call.received}B out={call.sent}B peer={peer}"
    if write_directly(access_log, level, line):
        return
    fields = None
    if json_lines():  # built only for JSON lines
        fields = {
            "protocol": "grpc", "method": call.method, "code": code, "duration_ms": round(seconds * 1000, 3),
            "received_bytes": call.received, "sent_bytes": call.sent, "peer": peer,
        }  # fmt: skip
    access_log.log(level, "%s", line, extra={"fields": fields})


def _code_name(code: object, default: str) -> str:
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    return default


async def _counted(requests: AsyncIterator[Any], call: _Call) -> AsyncIterator[Any]:
    async for request in requests:
        call.received += _size(request)
        yield request


_finishing: set[asyncio.Task[None]] = set()
"""Tasks ending client spans when their call ends (referenced until then)."""


class _Traceparent:
    """A CLIENT span per call, its ``traceparent`` sent in the call's metadata; ended when the call is done."""

    async def _call(self, continuation: Any, details: Any, request: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else str(details.method)
        span, carrier = tracing.client_span(method, {"rpc.system": "grpc", "rpc.method": method})
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *carrier.items())
        try:
            call = await continuation(details._replace(metadata=metadata), request)
        except BaseException:
            span.end()
            raise

        async def finish() -> None:
            try:
                name = _code_name(await call.code(), "UNKNOWN")
            except asyncio.CancelledError:
                name = "CANCELLED"
            tracing.finish(span, name != "OK", {"rpc.grpc.status_code": name})
            span.end()

        task = asyncio.get_running_loop().create_task(finish())
        _finishing.add(task)
        task.add_done_callback(_finishing.discard)
        return call


# grpc.aio files each interceptor under the first of the four kinds it is: one class per kind.
class _UnaryUnary(_Traceparent, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self._call(continuation, details, request)


class _UnaryStream(_Traceparent, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self._call(continuation, details, request)


class _StreamUnary(_Traceparent, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await self._call(continuation, details, request_iterator)


class _StreamStream(_Traceparent, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await self._call(continuation, details, request_iterator)


def client_interceptors() -> list[Any] | None:
    """The interceptors a ``grpc+…`` backend's channel gets: none unless tracing is on."""
    return [_UnaryUnary(), _UnaryStream(), _StreamUnary(), _StreamStream()] if tracing.enabled() else None

"""OpenTelemetry traces (the optional extra ``nixcas[otel]``), exported over OTLP/HTTP.

:func:`setup` (``--otlp-endpoint URL``) makes this process record spans for
its HTTP handlers (nar-bridge), its gRPC calls served (daemon) and made (the
``grpc+…`` backends), and export them in batches to ``URL/v1/traces``.  The
W3C ``traceparent`` header carries the trace across processes: read from HTTP
requests and gRPC metadata, written into the metadata of outgoing gRPC calls,
so a NAR GET on a bridge reading through a daemon is one trace.  The calls a
backend makes to its object store or PostgreSQL database are CLIENT spans too
(:func:`backend_span`), children of the span current at the call.

The tracer provider is this module's own (the OpenTelemetry global is left
alone); without :func:`setup`, :func:`enabled` is false and nothing here
costs more than that check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from nixcas.errors import ConfigurationError
from nixcas.urls import shown

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

__all__ = ["EXTRA_HINT", "backend_span", "client_span", "enabled", "inject", "server_span", "setup", "shutdown"]

EXTRA_HINT: Final = "--otlp-endpoint needs OpenTelemetry: pip install 'nixcas[otel]'"
TRACES_PATH: Final = "/v1/traces"

_provider: TracerProvider | None = None
_tracer: Tracer | None = None
_NO_SPAN: Final[contextlib.nullcontext[None]] = contextlib.nullcontext()


def enabled() -> bool:
    return _tracer is not None


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of ``endpoint`` (a collector's base URL, or its full ``…/v1/traces`` URL)."""
    try:
        parts = urlsplit(endpoint)
    except ValueError as e:
        raise ConfigurationError(f"--otlp-endpoint {shown(endpoint)!r}: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigurationError(f"--otlp-endpoint {shown(endpoint)!r}: expected http(s)://HOST:PORT (OTLP/HTTP)")
    if parts.path.rstrip("/").endswith(TRACES_PATH):
        return endpoint
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}{TRACES_PATH}"


def setup(endpoint: str, service_name: str) -> None:
    """Export this process's spans to ``endpoint`` as service ``service_name``; a one-line error without the extra."""
    global _provider, _tracer
    url = traces_url(endpoint)
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise ConfigurationError(EXTRA_HINT) from None
    shutdown()
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
    _provider, _tracer = provider, provider.get_tracer("nixcas")


def shutdown() -> None:
    """Export what is left and stop (a server calls this as it exits)."""
    global _provider, _tracer
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def _propagator() -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator()


@contextlib.contextmanager
def server_span(name: str, carrier: Mapping[str, str], attributes: Mapping[str, str | int]) -> Iterator[Span]:
    """A SERVER span, current inside, continuing the trace of ``carrier``'s ``traceparent`` (if any)."""
    from opentelemetry.trace import SpanKind

    assert _tracer is not None
    parent = _propagator().extract(carrier) if "traceparent" in carrier else None
    with _tracer.start_as_current_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes) as span:
        yield span


def client_span(name: str, attributes: Mapping[str, str | int]) -> tuple[Span, dict[str, str]]:
    """A CLIENT span, child of the current one, and the headers that carry it to the callee (ended by the caller)."""
    from opentelemetry.trace import SpanKind, set_span_in_context

    assert _tracer is not None
    span = _tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes)
    carrier: dict[str, str] = {}
    _propagator().inject(carrier, context=set_span_in_context(span))
    return span, carrier


def inject(carrier: dict[str, str]) -> None:
    """Write the current span's ``traceparent`` into ``carrier``."""
    _propagator().inject(carrier)


def finish(span: Span, failed: bool, attributes: Mapping[str, str | int]) -> None:
    """Set the outcome of ``span`` (its status ERROR when ``failed``)."""
    from opentelemetry.trace import Status, StatusCode

    span.set_attributes(attributes)
    if failed:
        span.set_status(Status(StatusCode.ERROR))


def backend_span(name: str, attributes: Mapping[str, str | int]) -> contextlib.AbstractContextManager[None]:
    """A CLIENT span around one backend request (object store, database), child of the current span.

    Without :func:`setup` a shared no-op context (one check, nothing imported).
    The span is not made current: a backend request is a leaf, and a request
    made inside an async generator must not become the parent of what its
    consumer does between two items.  A failure sets the status ERROR and
    ``error.type`` to the exception's class name only (messages may quote
    keys, URLs or SQL; attributes never hold them).
    """
    if _tracer is None:
        return _NO_SPAN
    return _backend_span(_tracer, name, attributes)


@contextlib.contextmanager
def _backend_span(tracer: Tracer, name: str, attributes: Mapping[str, str | int]) -> Iterator[None]:
    from opentelemetry.trace import SpanKind, Status, StatusCode

    span = tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes)
    try:
        yield
    except GeneratorExit:  # a stream closed early by its reader: not a failure
        raise
    except BaseException as e:
        span.set_attribute("error.type", type(e).__name__)
        span.set_status(Status(StatusCode.ERROR))
        raise
    finally:
        span.end()

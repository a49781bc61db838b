"""Prometheus metrics of a serving process (``prometheus_client``; imported by servers only).

Exported on ``GET /metrics`` of nar-bridge and on ``--metrics-listen-address``
of ``daemon``, ``mount`` and ``nix-daemon``.  Names and labels are documented in
docs/operations.md ("Metrics"); besides the ones below, :mod:`nixcas.ops.stats` supplies the
store's own counters and ``prometheus_client`` the ``process_*`` and
``python_*`` ones.  Label children are kept in dicts, so recording a request
costs a dict lookup and a few additions.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from bisect import bisect_left
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, start_http_server
from prometheus_client.registry import Collector

from nixcas.errors import ConfigurationError
from nixcas.listen import parse_listen_address
from nixcas.ops import stats

__all__ = [
    "CONTENT_TYPE",
    "Counter",
    "Gauge",
    "GrpcMetrics",
    "Histogram",
    "HttpMetrics",
    "exposition",
    "start_metrics_server",
    "watch_store",
]

log = logging.getLogger("nixcas.metrics")
disable_created_metrics()  # type: ignore[no-untyped-call]  # no `_created` series: half the lines, nothing a dashboard uses

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
"""Latency histogram buckets (seconds): sub-millisecond narinfo hits up to multi-minute NAR transfers."""

HTTP_REQUESTS: Final = Counter(
    "nixcas_http_requests", "HTTP requests answered, by route, method and status.", ("route", "method", "status")
)
HTTP_DURATION: Final = Histogram(
    "nixcas_http_request_duration_seconds", "Time from request to the end of the answer, by route.", ("route",),
    buckets=BUCKETS,
)  # fmt: skip
HTTP_RECEIVED: Final = Counter("nixcas_http_received_bytes", "Request body bytes read, by route.", ("route",))
HTTP_SENT: Final = Counter("nixcas_http_sent_bytes", "Response body bytes sent, by route.", ("route",))
HTTP_IN_FLIGHT: Final = Gauge("nixcas_http_requests_in_flight", "HTTP requests being answered now.")
GRPC_CALLS: Final = Counter("nixcas_grpc_calls", "gRPC calls answered, by method and status code.", ("method", "code"))
GRPC_DURATION: Final = Histogram(
    "nixcas_grpc_call_duration_seconds", "Time from a gRPC call's start to its status, by method.", ("method",),
    buckets=BUCKETS,
)  # fmt: skip
GRPC_RECEIVED: Final = Counter("nixcas_grpc_received_bytes", "Request message bytes received, by method.", ("method",))
GRPC_SENT: Final = Counter("nixcas_grpc_sent_bytes", "Response message bytes sent, by method.", ("method",))
GRPC_IN_FLIGHT: Final = Gauge("nixcas_grpc_calls_in_flight", "gRPC calls running now.")


GC_METRICS: Final = {
    "nixcas_gc_runs": ("counter", "runs", "Collections (not dry runs) `nixcas gc` ran on this store."),
    "nixcas_gc_freed_bytes": ("counter", "freed_bytes", "Bytes those collections freed."),
    "nixcas_gc_last_run_timestamp_seconds": ("gauge", "last_run_timestamp", "When the last collection started."),
    "nixcas_gc_last_freed_bytes": ("gauge", "last_freed_bytes", "Bytes the last collection freed."),
}
"""Read from the store's record of ``nixcas gc`` runs (:func:`nixcas.ops.stats.record_gc`) at each scrape."""
_stores: list[Path] = []


def watch_store(store_root: Path) -> None:
    """Export the ``nixcas gc`` record of the store at ``store_root`` (``nixcas_gc_*``)."""
    if store_root not in _stores:
        _stores.append(store_root)


class _StoreCounters(Collector):
    """The counts of :mod:`nixcas.ops.stats`, as counters (every documented one, zero until counted), and
    the GC record of the watched stores."""

    def collect(self) -> Iterator[Metric]:
        records = [stats.read_gc(root) for root in _stores]
        for name, (kind, key, text) in GC_METRICS.items():
            if kind == "counter":
                yield CounterMetricFamily(name, text, value=sum(r.get(key, 0) for r in records))
            else:
                yield GaugeMetricFamily(name, text, value=max((r.get(key, 0) for r in records), default=0))
        counts = stats.snapshot()
        for name, (text, labels) in stats.COUNTERS.items():
            family = CounterMetricFamily(name, text, labels=labels)
            if not labels:
                family.add_metric([], counts.get((name, ()), 0))
            for (counted, values), value in counts.items():
                if counted == name and labels:
                    family.add_metric(list(values), value)
            yield family


_registered = False
_lock = threading.Lock()


def _register() -> None:
    global _registered
    with _lock:
        if not _registered:
            REGISTRY.register(_StoreCounters())
            _registered = True


def exposition(registry: CollectorRegistry = REGISTRY) -> bytes:
    """Every metric in Prometheus's text format."""
    _register()
    return generate_latest(registry)


class HttpMetrics:
    """Records one HTTP request: the counters and histogram children per route, method and status kept at hand.

    Per (route, method, status) the values those children add to are kept too (:class:`_Values`), so
    a request is recorded with four or five additions and a bisection, nothing more.
    """

    def __init__(self) -> None:
        _register()
        self._values: dict[tuple[str, str, int], _Values] = {}

    def record(self, route: str, method: str, status: int, seconds: float, received: int, sent: int) -> None:
        values = self._values.get((route, method, status))
        if values is None:
            values = self._values[route, method, status] = _Values(
                HTTP_REQUESTS.labels(route, method, str(status)),
                HTTP_DURATION.labels(route), HTTP_RECEIVED.labels(route), HTTP_SENT.labels(route),
            )  # fmt: skip
        values.add(seconds, received, sent)


class _Values:
    """The values of a request counter, a duration histogram and a received and a sent bytes counter.

    :meth:`add` changes them as ``requests.inc()``, ``duration.observe(seconds)``, ``received.inc(received)``
    and ``sent.inc(sent)`` would, without those methods' checks of what cannot happen here (a metric
    with labels but no child, an exemplar, a negative count); each value keeps its own lock (or, with
    ``PROMETHEUS_MULTIPROC_DIR``, its file).  A ``prometheus_client`` whose children keep their values
    otherwise is called through its methods.
    """

    __slots__ = ("_bounds", "_buckets", "_children", "_received", "_requests", "_sent", "_sum")

    def __init__(self, requests: Counter, duration: Histogram, received: Counter, sent: Counter) -> None:
        self._children = (requests, duration, received, sent)
        try:
            self._requests, self._sum = requests._value, duration._sum
            self._bounds: list[float] | None = list(duration._upper_bounds)
            self._buckets = list(duration._buckets)
            self._received, self._sent = received._value, sent._value
        except AttributeError:  # another layout: the public methods
            self._bounds = None

    def add(self, seconds: float, received: int, sent: int) -> None:
        bounds = self._bounds
        if bounds is None:
            self._children[0].inc()
            _observe(self._children[1:], seconds, received, sent)
            return
        self._requests.inc(1)
        self._sum.inc(seconds)
        self._buckets[bisect_left(bounds, seconds)].inc(1)  # the first bucket whose bound is >= seconds
        if received:
            self._received.inc(received)
        if sent:
            self._sent.inc(sent)


def _observe(children: tuple[Histogram, Counter, Counter], seconds: float, received: int, sent: int) -> None:
    """One call's duration, and its bytes received and sent (when any), into a route's or a method's children."""
    children[0].observe(seconds)
    if received:
        children[1].inc(received)
    if sent:
        children[2].inc(sent)


class GrpcMetrics:
    """Records one gRPC call (children per method and code kept at hand)."""

    def __init__(self) -> None:
        _register()
        self._calls: dict[tuple[str, str], Counter] = {}
        self._methods: dict[str, tuple[Histogram, Counter, Counter]] = {}

    def record(self, method: str, code: str, seconds: float, received: int, sent: int) -> None:
        calls = self._calls.get((method, code))
        if calls is None:
            calls = self._calls[method, code] = GRPC_CALLS.labels(method, code)
        children = self._methods.get(method)
        if children is None:
            children = self._methods[method] = (
                GRPC_DURATION.labels(method), GRPC_RECEIVED.labels(method), GRPC_SENT.labels(method)
            )  # fmt: skip
        calls.inc()
        _observe(children, seconds, received, sent)


class MetricsServer(contextlib.AbstractContextManager["MetricsServer"]):
    """``GET /metrics`` on its own port, served by a thread (works beside any event loop, trio's too)."""

    def __init__(self, listen: str) -> None:
        try:
            address = parse_listen_address(listen)
        except ConfigurationError:
            address = None
        if address is None or address.unix_path is not None:  # the HTTP server listens on TCP only
            raise ConfigurationError(f"--metrics-listen-address {listen!r}: expected host:port ([::1]:9100)")
        _register()
        try:
            self._server, self._thread = start_http_server(address.port, address.host)
        except OSError as e:
            raise ConfigurationError(f"cannot listen on {listen} for metrics: {e.strerror or e}") from None
        self.url = f"http://{address.url_host}:{self._server.server_address[1]}/metrics"
        log.info("metrics on %s", self.url)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_metrics_server(listen: str) -> MetricsServer:
    """Serve the metrics on ``listen`` (``host:port``; port 0 picks a free one) until closed."""
    return MetricsServer(listen)

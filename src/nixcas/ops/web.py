"""Every HTTP request nar-bridge answers: one access-log line, metrics, a trace span; and ``GET /metrics``.

:func:`instrument` puts :func:`observe` in front of an aiohttp application's
own middlewares and adds the ``/metrics`` route.  Each request is logged on
logger ``nixcas.access`` (``/metrics`` scrapes at DEBUG) as::

    127.0.0.1 "GET /nar/….nar?narsize=123" 200 123B 4.1ms user=-

with the target cut at :data:`MAX_TARGET` characters, control characters
escaped and query values with credential-like names shown as ``***``; the
user is what the request's authentication put under :data:`USER` (``-``
when none).  An error body that would carry a configured credential has it
replaced by ``***`` (:func:`nixcas.urls.redacted`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final
from urllib.parse import parse_qsl, quote

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest

from nixcas.ops import logs, stats, tracing
from nixcas.ops.logs import bounded
from nixcas.ops.metrics import CONTENT_TYPE, HTTP_IN_FLIGHT, HttpMetrics, exposition
from nixcas.urls import is_secret_name, redacted

__all__ = [
    "MAX_TARGET", "ROUTE", "USER", "AccessLogger", "access_line", "access_log", "instrument", "observe", "record",
    "shown_target",
]  # fmt: skip

access_log = logging.getLogger("nixcas.access")
MAX_TARGET: Final = 200
"""Characters of a request's path and query an access line shows."""
USER: Final = web.RequestKey("nixcas.user", str)
"""Request key where authentication puts the name of who sent the request (never a secret)."""
UPLOAD_ROUTES: Final = {"put_nar": "nar", "put_narinfo": "narinfo"}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def shown_target(path_qs: str) -> str:
    """A request target for a log line: credential-like query values as ``***``, bounded, on one line."""
    path, sep, query = path_qs.partition("?")
    if sep and query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(is_secret_name(key) for key, _ in pairs):
            query = "&".join(f"{quote(k)}={'***' if is_secret_name(k) else quote(v)}" for k, v in pairs)
    return bounded(path + sep + query, MAX_TARGET)


ROUTE: Final = web.RequestKey("nixcas.route", str)
"""Request key: the name of the handler that answered (set by :func:`observe`; the metrics' ``route`` label)."""


def _route(request: web.Request) -> str:
    info = request.match_info
    if info.http_exception is not None:
        return "unmatched"
    return str(getattr(info.route.handler, "__name__", "other"))


_metrics: HttpMetrics | None = None


def _recorder() -> HttpMetrics:
    global _metrics
    if _metrics is None:
        _metrics = HttpMetrics()
    return _metrics


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Name the route, count the request in flight, run it in a trace span, keep credentials out of error bodies.

    The access line and the metrics are written by :class:`AccessLogger` once the answer is sent, or here
    (status 499) if the client went away before.
    """
    start = time.perf_counter()
    route = request[ROUTE] = _route(request)
    HTTP_IN_FLIGHT.inc()
    status = 500
    span_cm: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if tracing.enabled():
        carrier = {"traceparent": request.headers["traceparent"]} if "traceparent" in request.headers else {}
        attributes = {"http.request.method": request.method, "http.route": route}
        span_cm = tracing.server_span(f"{request.method} {route}", carrier, attributes)
    try:
        with span_cm as span:
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as e:
                status = e.status
                if e.status >= 400 and e.text:
                    e.text = redacted(e.text)
                raise
            except asyncio.CancelledError:
                status = 499  # the client went away: aiohttp writes no access entry for it
                _record(request, status, 0, time.perf_counter() - start)
                raise
            finally:
                if span is not None:
                    tracing.finish(span, status >= 500, {"http.response.status_code": status})
    finally:
        HTTP_IN_FLIGHT.dec()


class AccessLogger(AbstractAccessLogger):
    """aiohttp's hook after each answer is written: the access line and the request's metrics.

    Requests that never reached a handler (aiohttp could not parse them) are left to the bridge's
    one-line bad-request log.  ``sent`` counts what went on the wire (status line, headers, body).
    """

    @property
    def enabled(self) -> bool:
        return True

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        if ROUTE in request:
            _record(request, response.status, response.body_length, time)


def _record(request: BaseRequest, status: int, sent: int, seconds: float) -> None:
    route = request[ROUTE]
    method = request.method
    received = request.content.total_bytes
    level = record(route, method, status, seconds, received, sent)
    if level:
        client = request.remote or "-"  # an IP address (aiohttp's peername), or "" on a unix socket
        user = request.get(USER) or "-"
        access_line(level, client, method, request.raw_path, route, status, seconds, received, sent, user)


def record(route: str, method: str, status: int, seconds: float, received: int, sent: int) -> int:
    """Count one answered request in the metrics; the level to write its access line at (0: none is written).

    Every answer goes through here: the aiohttp server's (:class:`AccessLogger`, :func:`observe`) and the
    bridge's front protocol's (:mod:`nixcas.bridge.front`), followed by :func:`access_line` when not 0.
    """
    _recorder().record(route, method, status, seconds, received, sent)
    upload = UPLOAD_ROUTES.get(route)
    if upload is not None:
        stats.count("nixcas_bridge_uploads", upload, "accepted" if status < 300 else "refused")
    level = logging.DEBUG if route == "metrics" else logging.INFO
    return level if access_log.isEnabledFor(level) else 0


def access_line(
    level: int, client: str, method: str, raw_target: str, route: str, status: int, seconds: float, received: int,
    sent: int, user: str, soon: asyncio.AbstractEventLoop | None = None, *, plain: bool = False,
) -> None:  # fmt: skip
    """Write one request's access line (``raw_target``: its path and query as sent).

    ``plain``: the target is known fit to show as it is (printable ASCII without ``?``, at most
    :data:`MAX_TARGET` characters); ``soon``: the running loop, to write the line with the others of this
    iteration of the loop (:func:`nixcas.ops.logs.write_directly`).
    """
    target = raw_target if plain else shown_target(raw_target)
    if len(method) > 20:
        method = bounded(method, 20)
    duration = seconds * 1000
    extra = f" in={received}B" if received else ""
    line = f'{client} "{method} {target}" {status} {sent}B {duration:.1f}ms user={user}{extra}'
    if logs.write_directly(access_log, level, line, soon):
        return
    fields = None
    if logs.json_lines():  # built only for JSON lines (a text line needs just the message)
        fields = {
            "protocol": "http", "client": client, "method": method, "target": target, "route": route,
            "status": status, "sent_bytes": sent, "received_bytes": received,
            "duration_ms": round(duration, 3), "user": user,
        }  # fmt: skip
    access_log.log(level, "%s", line, extra={"fields": fields})


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: every metric of this process in Prometheus's text format."""
    body = await asyncio.to_thread(exposition)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def instrument(app: web.Application) -> None:
    """Observe every request of ``app`` (before its own middlewares) and serve ``GET /metrics``; the app's
    runner takes ``access_log_class=AccessLogger, access_log=access_log``."""
    app.middlewares.insert(0, observe)
    app.router.add_get("/metrics", metrics)

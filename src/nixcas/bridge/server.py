"""Running the bridge on a TCP port or a unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from nixcas.bridge.app import NarBridge
from nixcas.errors import ConfigurationError
from nixcas.listen import clear_stale_socket, parse_listen_address

__all__ = ["BAD_REQUEST_LOG", "MAX_REASON", "Draining", "RunningBridge", "serve_on_socket", "start_bridge"]

MAX_REASON: Final = 200
"""Characters of a malformed request's reason that its log line shows."""


class _OneLineForBadRequests(logging.Filter):
    """A request aiohttp could not parse (over-long request line or header, bad header) is the
    client's fault: one bounded WARNING line naming the peer and the reason, not an ERROR traceback
    carrying up to 8 KiB of what it sent."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            reason = " ".join(str(error.message).split())
            if len(reason) > MAX_REASON:
                reason = reason[:MAX_REASON] + "…"
            what = record.getMessage()[:MAX_REASON].replace("Error handling request", "bad request")
            record.msg, record.args = "%s: %s %s", (what, error.code, reason)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


BAD_REQUEST_LOG: Final = logging.getLogger("nixcas.bridge.http")
"""The bridge's HTTP server logger (aiohttp's ``aiohttp.server`` messages, bad requests on one line)."""
BAD_REQUEST_LOG.addFilter(_OneLineForBadRequests())


CANCEL_WAIT: Final = 0.1
"""After the grace period: how long cancelled requests get to unwind before their connections are closed."""


class Draining:
    """Whether the bridge still serves: ``GET /healthz`` (200, then 503), and no new request once draining.

    Counts the requests in progress so that a stop waits for exactly them.
    """

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def install(self, app: web.Application) -> None:
        app.middlewares.insert(0, self.middleware)
        app.router.add_get("/healthz", self.healthz)

    async def healthz(self, request: web.Request) -> web.Response:
        if self.draining:
            return web.Response(status=503, text="draining\n", headers={"Connection": "close"})
        return web.Response(text="ok\n")

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path == "/healthz":
            return await handler(request)
        if self.draining:  # a request after the stop began (on a new or a kept-alive connection)
            return web.Response(status=503, text="shutting down\n", headers={"Connection": "close"})
        self.in_flight += 1
        self._idle.clear()
        try:
            return await handler(request)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Whether every request in progress finished within ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


@dataclass
class RunningBridge:
    """A started bridge: its URL (``http://host:port`` or ``unix:///path``), and how to stop it."""

    runner: web.AppRunner
    url: str
    unix_path: str | None = None
    draining: Draining = field(default_factory=Draining, repr=False)
    shutdown_grace: float = 10.0
    _stopped: bool = field(default=False, repr=False)

    async def stop(self) -> None:
        """Refuse new requests at once (``/healthz`` 503), let running ones finish within the grace period,
        then cancel them and close every connection."""
        if self._stopped:
            return
        self._stopped = True
        # The listeners stay open through the grace period: what connects meanwhile (a load
        # balancer's health check, a client) is answered 503, not refused without a reason.
        self.draining.draining = True
        if not await self.draining.wait_idle(self.shutdown_grace):
            log = logging.getLogger("nixcas.bridge")
            log.warning("%d requests still running after %g s: cancelling them", self.draining.in_flight,
                        self.shutdown_grace)  # fmt: skip
        await self.runner.cleanup()  # stops listening, cancels what is left (CANCEL_WAIT each), closes
        if self.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_path)


class _BridgeRunner(web.AppRunner):
    """The aiohttp runner every listener uses: our access log, metrics and traces (:mod:`nixcas.ops.web`)
    instead of aiohttp's access log (outermost, so a draining 503 is logged too), bad requests logged on
    one line each; its server puts the bridge's lean narinfo route before the router, and its connections
    start with the front protocol (:mod:`nixcas.bridge.front`)."""

    def __init__(self, bridge: NarBridge, draining: Draining) -> None:
        from nixcas.bridge.front import KEEPALIVE_TIMEOUT
        from nixcas.ops.web import AccessLogger, access_log, instrument, observe

        app = bridge.application()
        draining.install(app)
        instrument(app)
        super().__init__(
            app,
            access_log_class=AccessLogger,
            access_log=access_log,
            handle_signals=False,
            shutdown_timeout=CANCEL_WAIT,  # the grace period itself is RunningBridge.stop's
            logger=BAD_REQUEST_LOG,
            keepalive_timeout=KEEPALIVE_TIMEOUT,  # the front's too
        )
        self._bridge = bridge
        self._draining = draining
        self._known = (observe, draining.middleware)

    async def _make_server(self) -> web.Server:
        from nixcas.bridge.front import FrontServer, front_enabled

        server = await super()._make_server()
        draining = self._draining

        def serving() -> bool:
            return not draining.draining

        server.request_handler = self._bridge.front(self.app, server.request_handler, serving, known=self._known)
        if front_enabled() and self._bridge.lean(self.app, self._known):
            return FrontServer.adopt(server, self._bridge, serving)
        return server


def _runner(bridge: NarBridge, draining: Draining) -> web.AppRunner:
    return _BridgeRunner(bridge, draining)


async def start_bridge(
    listen: str,
    bridge: NarBridge,
    *,
    shutdown_grace: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
    sock: socket.socket | None = None,
) -> RunningBridge:
    """Serve ``bridge`` on ``listen`` (``host:port``, ``[v6]:port``, port 0 = any free one, or a socket path).

    With ``ssl_context``, over TLS (``https://``); with ``sock`` (a listening socket, systemd's), on it instead.
    """
    if sock is not None:
        return await serve_on_socket(sock, _socket_url(sock, ssl_context), bridge, shutdown_grace=shutdown_grace,
                                     ssl_context=ssl_context)  # fmt: skip
    address = parse_listen_address(listen)
    draining = Draining()
    runner = _runner(bridge, draining)
    await runner.setup()
    try:
        site: web.BaseSite
        if address.unix_path is not None:
            clear_stale_socket(address.unix_path)
            site = web.UnixSite(runner, address.unix_path, ssl_context=ssl_context)
        else:
            site = web.TCPSite(runner, address.host, address.port, reuse_port=False, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as e:
            raise ConfigurationError(f"cannot listen on {listen}: {e.strerror or e}") from None
    except BaseException:
        await runner.cleanup()
        raise
    if address.unix_path is not None:
        return RunningBridge(runner, f"unix://{address.unix_path}", address.unix_path, draining, shutdown_grace)
    port = runner.addresses[0][1]
    scheme = "https" if ssl_context is not None else "http"
    return RunningBridge(runner, f"{scheme}://{address.url_host}:{port}", None, draining, shutdown_grace)


def _socket_url(sock: socket.socket, ssl_context: ssl.SSLContext | None) -> str:
    where = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix://{os.fsdecode(where)}"
    host = f"[{where[0]}]" if sock.family == socket.AF_INET6 else where[0]
    return f"{'https' if ssl_context is not None else 'http'}://{host}:{where[1]}"


async def serve_on_socket(
    sock: socket.socket,
    url: str,
    bridge: NarBridge,
    *,
    shutdown_grace: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
) -> RunningBridge:
    """Serve ``bridge`` on an already listening socket (a worker's, or systemd's; its owner reported ``url``)."""
    draining = Draining()
    runner = _runner(bridge, draining)
    await runner.setup()
    try:
        await web.SockSite(runner, sock, ssl_context=ssl_context).start()
    except BaseException:
        await runner.cleanup()
        raise
    return RunningBridge(runner, url, None, draining, shutdown_grace)

"""Running the bridge on a TCP port or a unix socket."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from nixcas.bridge.app import NarBridge
from nixcas.errors import ConfigurationError
from nixcas.server import _clear_stale_socket, parse_listen_address

__all__ = ["BAD_REQUEST_LOG", "MAX_REASON", "RunningBridge", "serve_on_socket", "start_bridge"]

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


@dataclass
class RunningBridge:
    """A started bridge: its URL (``http://host:port`` or ``unix:///path``), and how to stop it."""

    runner: web.AppRunner
    url: str
    unix_path: str | None = None
    _stopped: bool = field(default=False, repr=False)

    async def stop(self) -> None:
        """Stop accepting connections, let running requests finish (up to the grace period), close."""
        if self._stopped:
            return
        self._stopped = True
        await self.runner.cleanup()
        if self.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_path)


class _BridgeRunner(web.AppRunner):
    """An :class:`aiohttp.web.AppRunner` whose server puts the bridge's lean narinfo route before the router."""

    def __init__(self, bridge: NarBridge, shutdown_grace: float) -> None:
        super().__init__(
            bridge.application(),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=shutdown_grace,
            logger=BAD_REQUEST_LOG,
        )
        self._bridge = bridge

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.request_handler = self._bridge.front(self.app, server.request_handler)
        return server


def _runner(bridge: NarBridge, shutdown_grace: float) -> web.AppRunner:
    """The aiohttp runner every listener uses: no access log, bad requests logged on one line each."""
    return _BridgeRunner(bridge, shutdown_grace)


async def start_bridge(listen: str, bridge: NarBridge, *, shutdown_grace: float = 10.0) -> RunningBridge:
    """Serve ``bridge`` on ``listen`` (``host:port``, ``[v6]:port``, port 0 = any free one, or a socket path)."""
    address = parse_listen_address(listen)
    runner = _runner(bridge, shutdown_grace)
    await runner.setup()
    try:
        site: web.BaseSite
        if address.unix_path is not None:
            _clear_stale_socket(address.unix_path)
            site = web.UnixSite(runner, address.unix_path)
        else:
            host, _, port = listen.rpartition(":")
            site = web.TCPSite(runner, host.strip("[]"), int(port), reuse_port=False)
        try:
            await site.start()
        except OSError as e:
            raise ConfigurationError(f"cannot listen on {listen}: {e.strerror or e}") from None
    except BaseException:
        await runner.cleanup()
        raise
    if address.unix_path is not None:
        return RunningBridge(runner, f"unix://{address.unix_path}", address.unix_path)
    host = listen.rpartition(":")[0]
    port = runner.addresses[0][1]
    return RunningBridge(runner, f"http://{host}:{port}")


async def serve_on_socket(
    sock: socket.socket, url: str, bridge: NarBridge, *, shutdown_grace: float = 10.0
) -> RunningBridge:
    """Serve ``bridge`` on an already listening socket (a worker's; the parent reported ``url`` and owns its path)."""
    runner = _runner(bridge, shutdown_grace)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
    except BaseException:
        await runner.cleanup()
        raise
    return RunningBridge(runner, url)

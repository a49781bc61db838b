"""Running the bridge on a TCP port or a unix socket."""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass, field

from aiohttp import web

from nixcas.bridge.app import NarBridge
from nixcas.errors import ConfigurationError
from nixcas.server import _clear_stale_socket, parse_listen_address

__all__ = ["RunningBridge", "serve_on_socket", "start_bridge"]


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


async def start_bridge(listen: str, bridge: NarBridge, *, shutdown_grace: float = 10.0) -> RunningBridge:
    """Serve ``bridge`` on ``listen`` (``host:port``, ``[v6]:port``, port 0 = any free one, or a socket path)."""
    address = parse_listen_address(listen)
    runner = web.AppRunner(bridge.application(), access_log=None, handle_signals=False, shutdown_timeout=shutdown_grace)
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
    runner = web.AppRunner(bridge.application(), access_log=None, handle_signals=False, shutdown_timeout=shutdown_grace)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
    except BaseException:
        await runner.cleanup()
        raise
    return RunningBridge(runner, url)

"""Serve a castore filesystem to virtual machines over a vhost-user socket until SIGINT/SIGTERM.

The front-end (QEMU, cloud-hypervisor) connects to the socket; when it
hangs up (the VM stopped), the next one may connect.  One front-end is
served at a time; the filesystem's inodes live on across connections (a
guest that reconnects keeps its FUSE session; one that boots anew sends
``FUSE_INIT`` and starts afresh).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import Callable

from nixcas.castore.fs.fuseproto import FuseSession
from nixcas.castore.fs.ops import FsCore, signals_while_serving
from nixcas.castore.fs.virtiofs.vhostuser import Backend

__all__ = ["VirtioFsServer", "serve"]

log = logging.getLogger("nixcas.fs.virtiofs")


class VirtioFsServer:
    """A vhost-user-fs back-end for ``core`` on a listening unix socket."""

    def __init__(self, core: FsCore) -> None:
        self.core = core
        self.session = FuseSession(core)
        self.connections = 0

    async def serve_connection(self, sock: socket.socket) -> None:
        """Serve one connected front-end until it hangs up (or breaks the protocol)."""
        self.connections += 1
        backend = Backend(self.session, sock)
        try:
            await backend.run()
        finally:
            sock.close()
            log.info("front-end gone after %d requests; holding %s", backend.requests, self.core.stats())

    async def serve_forever(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        listener.setblocking(False)
        while True:
            sock, _ = await loop.sock_accept(listener)
            log.info("front-end connected")
            await self.serve_connection(sock)


def listen(path: str | os.PathLike[str]) -> socket.socket:
    """A unix socket listening at ``path`` (a stale socket there is replaced; any other file is an error)."""
    where = os.fspath(path)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(where).st_mode):
            raise FileExistsError(f"{where} exists and is not a socket")
        os.unlink(where)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(where)
        sock.listen(1)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve(core: FsCore, path: str | os.PathLike[str], *, on_listening: Callable[[], None] | None = None) -> None:
    """Listen at ``path`` and serve front-ends one after another until SIGINT/SIGTERM; the socket is removed."""
    listener = listen(path)
    server = VirtioFsServer(core)
    task = asyncio.current_task()
    assert task is not None
    try:
        with signals_while_serving(core, task.cancel, log):
            if on_listening is not None:
                on_listening()
            with contextlib.suppress(asyncio.CancelledError):
                await server.serve_forever(listener)
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        log.info("stopped after %d connections, holding %s", server.connections, core.stats())
        await core.close()

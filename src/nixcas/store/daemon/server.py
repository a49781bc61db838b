"""The unix socket server (one session per connection) and the single ``--stdio`` session."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path

from nixcas.errors import ConfigurationError
from nixcas.store.daemon.ops import DaemonState
from nixcas.store.daemon.session import Session
from nixcas.store.daemon.trust import TrustPolicy, peer_of

__all__ = ["prepare_socket_path", "serve_stdio", "serving_unix"]

log = logging.getLogger("nixcas.nix-daemon")

STREAM_LIMIT = 1 << 20


def prepare_socket_path(path: Path) -> None:
    """Make room for a socket at ``path``: a stale socket is removed; a live one, or any other file, is refused."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigurationError(f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2)
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: a stale socket of a daemon that did not clean up
        return
    finally:
        probe.close()
    raise ConfigurationError(f"{path}: another daemon is listening on this socket")


@contextlib.asynccontextmanager
async def serving_unix(
    path: Path,
    state: DaemonState,
    policy: TrustPolicy,
    *,
    socket_mode: int = 0o666,
    sock: socket.socket | None = None,
) -> AsyncIterator[asyncio.Server]:
    """Serve sessions on the unix socket ``path`` until the block is left (then close them and remove it).

    With ``sock`` (a listening socket systemd passed), serve that instead: ``path`` and
    ``socket_mode`` are then systemd's business, and the socket file is left in place.
    """
    path = path.absolute()
    if sock is None:
        prepare_socket_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
    sessions: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        sessions[task] = writer
        try:
            sock = writer.get_extra_info("socket")
            peer = peer_of(sock)
            if not policy.is_allowed(peer):
                log.warning("%s is not allowed to connect (--allowed-users)", peer)
                refusal = f"user '{peer.user}' is not allowed to connect to the nixcas Nix daemon"
                await Session(state, reader, writer, trusted=False, peer=str(peer), refusal=refusal).run()
                return
            await Session(state, reader, writer, trusted=policy.is_trusted(peer), peer=str(peer)).run()
        finally:
            sessions.pop(task, None)

    if sock is not None:
        server = await asyncio.start_unix_server(handle, sock=sock, limit=STREAM_LIMIT)
    else:
        old_umask = os.umask(0o077)  # the socket is created private, then opened up to socket_mode
        try:
            server = await asyncio.start_unix_server(handle, path=str(path), limit=STREAM_LIMIT)
        finally:
            os.umask(old_umask)
    try:
        if sock is None:
            os.chmod(path, socket_mode)
        yield server
    finally:
        server.close()
        for writer in list(sessions.values()):  # the sessions see the end of their input and finish
            writer.transport.abort()
        if sessions:
            await asyncio.wait(list(sessions), timeout=10)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5)
        if sock is None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


async def serve_stdio(state: DaemonState, *, trusted: bool, peer: str) -> None:
    """One session on standard input and output (``ssh-ng://``'s remote program), until the client leaves."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=STREAM_LIMIT)
    stdin = os.fdopen(os.dup(0), "rb", buffering=0)
    stdout = os.fdopen(os.dup(1), "wb", buffering=0)
    read_transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stdin)
    write_transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, stdout)
    writer = asyncio.StreamWriter(write_transport, protocol, reader, loop)
    try:
        await Session(state, reader, writer, trusted=trusted, peer=peer).run()
    finally:
        read_transport.close()

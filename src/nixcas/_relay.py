"""Connections accepted on one listening socket, relayed byte for byte to a unix socket.

grpc cannot serve on a listening socket it did not create, so the gRPC daemon
started by systemd socket activation serves on a private unix socket and
relays every connection systemd's socket accepts to it (TLS, if configured,
passes through unchanged and ends at grpc).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

__all__ = ["Relay", "start_relay"]

BUFFER = 256 << 10


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(BUFFER):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()


class Relay:
    """A running relay: :meth:`close` stops accepting (the relayed connections end with their peers)."""

    def __init__(
        self, server: asyncio.Server, connections: dict[asyncio.Task[None], list[asyncio.StreamWriter]]
    ) -> None:
        self.server = server
        self.connections = connections

    def close(self) -> None:
        self.server.close()

    async def abort(self) -> None:
        """Drop every relayed connection (after the grace period)."""
        self.server.close()
        for writers in list(self.connections.values()):
            for writer in writers:
                writer.transport.abort()
        await asyncio.gather(*self.connections, return_exceptions=True)


async def start_relay(sock: socket.socket, target: str) -> Relay:
    """Accept on the listening ``sock``; relay each connection to the unix socket ``target``."""
    connections: dict[asyncio.Task[None], list[asyncio.StreamWriter]] = {}

    async def relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connections[task] = [client_writer]
        try:
            server_reader, server_writer = await asyncio.open_unix_connection(target, limit=BUFFER)
        except OSError:
            client_writer.transport.abort()
            connections.pop(task, None)
            return
        connections[task].append(server_writer)
        try:
            await asyncio.gather(_pump(client_reader, server_writer), _pump(server_reader, client_writer))
        finally:
            for writer in (client_writer, server_writer):
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
            connections.pop(task, None)

    sock.setblocking(False)
    server = await asyncio.start_server(relay, sock=sock, limit=BUFFER)
    return Relay(server, connections)

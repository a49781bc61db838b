#!/usr/bin/env python3
"""The durable floor of a binary-cache upload server: the least any server that keeps each PUT must do.

Run by ``bench/bridge_push.py`` (a child process)::

    python bench/put_floor.py DIR PORT [--no-sync]

A plain asyncio HTTP/1.1 server (streams, keep-alive, ``Expect: 100-continue``)
answering what ``nix copy --to http://…`` sends: ``GET /nix-cache-info``, ``GET``
and ``HEAD`` of what was stored before (else 404), and ``PUT`` of any file with a
``Content-Length``.  Each PUT's body is appended to one log file (``DIR/puts.log``,
a small header naming it, then its bytes as they arrive) and the log is ``fdatasync``-ed
before the 2xx: one durable write a request, nothing checked, nothing parsed,
no per-file inode, directory entry or rename.  Which file is where is kept in
memory only (a real server would need that index durable too: this is below
what any durable server can do).  ``--no-sync`` skips the ``fdatasync``: the
cost of the Python HTTP handling alone.

It prints ``ready`` once it listens, and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

CACHE_INFO = b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"


class Floor:
    def __init__(self, directory: str, sync: bool) -> None:
        log = os.path.join(directory, "puts.log")
        self.fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.rfd = os.open(log, os.O_RDONLY)
        self.size = 0
        self.sync = sync
        self.files: dict[str, tuple[int, int]] = {}
        """Path -> (offset, length) of its bytes in the log."""
        self.bodies: dict[str, bytes] = {"/nix-cache-info": CACHE_INFO}

    async def store(self, path: str, length: int, reader: asyncio.StreamReader) -> None:
        """Append the body (``length`` bytes, written as it arrives, 1 MiB at a time) to the log; sync it."""
        header = f"{path} {length}\n".encode()
        os.write(self.fd, header)
        left = length
        parts = []
        while left:
            data = await reader.read(min(left, 1 << 20))
            if not data:
                raise asyncio.IncompleteReadError(b"", left)
            os.write(self.fd, data)
            left -= len(data)
            if path.endswith(".narinfo"):  # answered from memory too (small)
                parts.append(data)
        if self.sync:
            os.fdatasync(self.fd)
        if parts:
            self.bodies[path] = b"".join(parts)
        self.files[path] = (self.size + len(header), length)
        self.size += len(header) + length

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if line:
                        k, _, v = line.partition(":")
                        headers[k.strip().lower()] = v.strip()
                path = path.partition("?")[0]
                if method == "PUT":
                    if "content-length" not in headers:
                        writer.write(b"HTTP/1.1 411 Length Required\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        return
                    if headers.get("expect", "").lower() == "100-continue":
                        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    await self.store(path, int(headers["content-length"]), reader)
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                elif method in ("GET", "HEAD"):
                    data = self.bodies.get(path)
                    if data is None and path in self.files:
                        offset, length = self.files[path]
                        data = os.pread(self.rfd, length, offset)
                    if data is None:
                        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                    else:
                        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data))
                        if method == "GET":
                            writer.write(data)
                else:
                    writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory")
    parser.add_argument("port", type=int)
    parser.add_argument("--no-sync", action="store_true")
    args = parser.parse_args()
    floor = Floor(args.directory, not args.no_sync)
    server = await asyncio.start_server(floor.serve, "127.0.0.1", args.port, limit=1 << 20)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())

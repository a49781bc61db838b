"""One client connection: the handshake, the operation loop and error frames.

A handler (:mod:`~nixcas.store.daemon.ops`) reads all of its operation's
arguments, then works, then ends with :meth:`Session.last` (``STDERR_LAST``)
and its result.  An error it raises after reading its arguments becomes an
error frame and the session goes on with the next operation (the stream is in
sync: handlers that take a NAR drain what is left of it first).  A
:class:`~nixcas.store.daemon.wire.ProtocolError` (malformed or truncated
input, an unknown operation) gets an error frame too when the protocol allows
one, and then the connection is closed: what follows cannot be parsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from nixcas import __version__
from nixcas.errors import NixcasError
from nixcas.store.daemon.protocol import (
    CLIENT_MAGIC,
    MAX_MINOR,
    MIN_MINOR,
    PROTOCOL_MAJOR,
    SERVER_MAGIC,
    Op,
    Stderr,
    version_text,
)
from nixcas.store.daemon.wire import ProtocolError, WireReader, WireWriter
from nixcas.urls import redacted

if TYPE_CHECKING:
    from nixcas.store.daemon.ops import DaemonState

__all__ = ["DaemonError", "Session", "SessionEnd"]

log = logging.getLogger("nixcas.nix-daemon")

_session_ids = itertools.count(1)

DAEMON_VERSION = f"{__version__} (nixcas)"
MAX_ERROR_TEXT = 4000
"""Characters of an error message a client is sent, at most (after credentials are redacted)."""
"""What the daemon calls itself in the handshake (protocol ≥ 1.33)."""


class DaemonError(NixcasError):
    """An operation failed; the client gets this message and the session goes on."""


class SessionEnd(Exception):
    """The session must close (after an error frame, if one could be sent)."""


class Session:
    """One client: its protocol minor, whether it is trusted, the roots it holds while connected."""

    def __init__(
        self,
        state: DaemonState,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        trusted: bool,
        peer: str,
        refusal: str | None = None,
    ) -> None:
        self.state = state
        self.wire = WireReader(reader)
        self.writer = writer
        self.out = WireWriter()
        self.trusted = trusted
        self.peer = peer
        self.id = next(_session_ids)
        self.minor = 0
        self.replied = False
        """Whether ``STDERR_LAST`` went out for the current operation (no error frame can follow)."""
        self.temp_roots: dict[bytes, str] = {}
        """Store path digests this client holds as temporary roots -> pin name ("" until the path is valid)."""
        self.ops = 0
        self.refusal = refusal
        """If set, the client is told this after the handshake and disconnected (not an allowed user)."""

    # -- output -----------------------------------------------------------------------

    async def flush(self) -> None:
        if len(self.out):
            self.writer.write(self.out.take())
        await self.writer.drain()

    def last(self) -> WireWriter:
        """End the log phase (``STDERR_LAST``); the operation's result follows in :attr:`out`."""
        self.replied = True
        return self.out.u64(Stderr.LAST)

    async def message(self, text: str) -> None:
        """A log line for the client (``STDERR_NEXT``), while an operation runs."""
        self.out.u64(Stderr.NEXT).text(text if text.endswith("\n") else text + "\n")
        await self.flush()

    def error_frame(self, text: str) -> bytes:
        text = redacted(text)[:MAX_ERROR_TEXT]  # a backend's error may name a configured credential
        frame = WireWriter().u64(Stderr.ERROR)
        if self.minor >= 26:
            frame.text("Error").u64(0).text("Error").text(text).u64(0).u64(0)
        else:
            frame.text(text).u64(1)
        return frame.take()

    # -- the connection -----------------------------------------------------------------

    async def handshake(self) -> bool:
        """Exchange magic and versions; whether the session may go on to operations."""
        magic = await self.wire.u64()
        if magic != CLIENT_MAGIC:
            log.warning("%s: protocol mismatch: first word %#x is not the Nix worker magic", self.peer, magic)
            return False
        self.writer.write(WireWriter().u64(SERVER_MAGIC).u64(PROTOCOL_MAJOR << 8 | MAX_MINOR).take())
        await self.writer.drain()
        client = await self.wire.u64()
        if client >> 8 != PROTOCOL_MAJOR or client > 0xFFFF:
            log.warning("%s: unsupported protocol version %#x (major %d; this daemon speaks 1.x)", self.peer, client,
                        client >> 8)  # fmt: skip
            return False
        self.minor = min(client & 0xFF, MAX_MINOR)
        if self.minor >= 14 and await self.wire.u64():
            await self.wire.u64()  # obsolete CPU affinity
        if self.minor >= 11:
            await self.wire.u64()  # obsolete reserveSpace
        if self.minor < MIN_MINOR:
            text = (
                f"nixcas nix-daemon: the Nix client's protocol {version_text(client)} is too old "
                f"(1.{MIN_MINOR} or newer is needed)"
            )
            log.warning("%s: %s", self.peer, text)
            self.writer.write(self.error_frame(text))
            await self.writer.drain()
            return False
        if self.minor >= 33:
            self.out.text(DAEMON_VERSION)
        if self.minor >= 35:
            self.out.u64(1 if self.trusted else 2)
        if self.refusal is not None:
            self.writer.write(self.out.take() + self.error_frame(self.refusal))
            await self.writer.drain()
            return False
        self.out.u64(Stderr.LAST)
        await self.flush()
        log.info("%s: session %d, protocol 1.%d, %s", self.peer, self.id, self.minor,
                 "trusted" if self.trusted else "not trusted")  # fmt: skip
        return True

    async def run(self) -> None:
        """Serve the client until it disconnects (or sends something that ends the session)."""
        try:
            try:
                if not await self.handshake():
                    return
            except ProtocolError as e:
                log.warning("%s: handshake failed: %s", self.peer, e)
                return
            while True:
                op = await self.wire.next_op()
                if op is None:
                    return
                self.ops += 1
                if not await self.perform(op):
                    return
        except (ConnectionError, BrokenPipeError) as e:
            log.info("%s: connection lost: %s", self.peer, e)
        except ProtocolError as e:
            log.warning("%s: %s; closing the connection", self.peer, e)
        finally:
            await self.release_roots()
            with contextlib.suppress(Exception):
                self.writer.close()
            log.info("%s: session %d ended after %d operations", self.peer, self.id, self.ops)

    async def perform(self, op: int) -> bool:
        """Run one operation; whether the session goes on."""
        from nixcas.store.daemon.ops import HANDLERS

        self.replied = False
        self.out.take()
        handler: Callable[[Session], Awaitable[None]] | None = HANDLERS.get(op)
        name = Op(op).name if op in Op._value2member_map_ else str(op)
        if handler is None:
            await self._fail(op, f"nixcas nix-daemon: operation {name} is not supported", keep=False)
            return False
        try:
            await handler(self)
            await self.flush()
            return True
        except ProtocolError as e:
            await self._fail(op, f"nixcas nix-daemon: {e}", keep=False)
            return False
        except SessionEnd as e:
            await self._fail(op, str(e), keep=False)
            return False
        except (DaemonError, NixcasError) as e:
            return await self._fail(op, str(e), keep=True)
        except (ConnectionError, BrokenPipeError):
            raise
        except Exception:  # a bug or a backend failure: the client gets an error, the daemon goes on
            log.exception("%s: operation %s failed", self.peer, name)
            return await self._fail(
                op, f"nixcas nix-daemon: internal error in {name} (see the daemon's log)", keep=True
            )

    async def _fail(self, op: int, text: str, *, keep: bool) -> bool:
        name = Op(op).name if op in Op._value2member_map_ else str(op)
        log.warning("%s: %s: %s", self.peer, name, text)
        if self.replied:  # the result was on its way: the client cannot be told any more
            return False
        self.out.take()
        with contextlib.suppress(ConnectionError, BrokenPipeError):
            self.writer.write(self.error_frame(text))
            await self.writer.drain()
        return keep

    async def release_roots(self) -> None:
        names = [name for name in self.temp_roots.values() if name]
        self.temp_roots.clear()
        if names:
            await self.state.unpin(names)

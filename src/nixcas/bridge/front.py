"""nar-bridge's front protocol: every accepted connection is read here first, aiohttp takes over when needed.

The front parses HTTP/1.1 requests itself and answers the two hot, simple
ones on the transport at once: ``GET /<32 nixbase32 chars>.narinfo`` of a
stored path (:meth:`~nixcas.bridge.narinfo.NarinfoRoutes._narinfo_now`: the
record is read on every request, its rendering reused) and ``GET
/nix-cache-info``.  Requests may be pipelined or split over many reads; the
answers leave in order, each counted in the metrics and written as an access
line exactly as the aiohttp server does (:func:`nixcas.ops.web.record`,
:func:`~nixcas.ops.web.access_line`; route ``get_narinfo`` or ``cache_info``; the
in-flight gauge and the draining count are left alone: each answer is complete
before the front returns to the event loop).  The access lines of one iteration of
the loop go out together as the next begins (``soon`` of
:func:`nixcas.ops.logs.write_directly`), and the narinfo records read in one
iteration share one SQLite read transaction
(:meth:`nixcas._sqlite.SqliteDatabase.value_now`).

Everything else is handed to aiohttp unchanged, and aiohttp owns the
connection from then on: the transport is switched to the server's own
:class:`~aiohttp.web_protocol.RequestHandler`, which is fed every byte not yet
answered.  That is any other method or path (HEAD too), a request with
``Authorization``, ``Connection``, ``Expect``, ``Upgrade``, a body, a repeated
header aiohttp allows once, any character or line aiohttp might refuse,
HTTP/1.0, a head over :data:`MAX_HEAD` bytes or :data:`MAX_HEADERS` lines, a
narinfo not answerable at once (absent, damaged, malformed name, busy
database), and every request of a private bridge, of one that is draining or
while tracing is on.  A connection that sends what cannot begin such a
request is handed over at once, so aiohttp's 400 and its one-line log answer it.

``NIXCAS_BRIDGE_FRONT=0`` (a benchmark and diagnostic knob) leaves every
connection to aiohttp from the start.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable
from typing import Final, cast

from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.tcp_helpers import tcp_keepalive
from aiohttp.web_protocol import RequestHandler

from nixcas.bridge.narinfo import NARINFO_TYPE, NarinfoRoutes
from nixcas.ops.web import access_line, record

__all__ = ["KEEPALIVE_TIMEOUT", "MAX_HEAD", "MAX_HEADERS", "FrontProtocol", "FrontServer", "front_enabled"]

MAX_HEAD: Final = 8190
"""Bytes of one request head the front holds unanswered; a longer head goes to aiohttp (and its limits)."""
MAX_HEADERS: Final = 100
"""Header lines of a request the front answers (aiohttp refuses more than 128)."""
KEEPALIVE_TIMEOUT: Final = 3630.0
"""Seconds an idle kept-alive connection stays open, the front's and aiohttp's alike (aiohttp's default)."""

_TOKEN: Final = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_VALUE: Final = rb"[\t\x20-\x7e\x80-\xff]"
_SIMPLE: Final = re.compile(
    rb"GET (/[0-9a-z]{32}\.narinfo|/nix-cache-info) HTTP/1\.1\r\n((?:" + _TOKEN + rb"+:" + _VALUE + rb"*\r\n)*)\r\n"
)
"""A request the front may answer: the request line, then the header lines (group 2), all in plain syntax."""
_VIABLE: Final = re.compile(
    rb"(?:G|GE|GET|GET |GET /[!-~]*(?: [HTP/1.]{0,8}(?:\r\n(?:"
    + _TOKEN + rb"+:" + _VALUE + rb"*\r\n)*" + _TOKEN + rb"*(?::" + _VALUE + rb"*)?)?)?\r?)?"
)  # fmt: skip
"""What the start of such a request may look like (loosely) before its head is complete."""
_AWAY: Final = re.compile(
    rb"^(?:authorization|connection|content-length|expect|transfer-encoding|upgrade):", re.I | re.M
)
"""Headers whose requests aiohttp answers (credentials, a body, connection management)."""
_TWICE: Final = re.compile(
    rb"^(content-location|content-range|content-type|etag|host|max-forwards|server|user-agent):.*^\1:",
    re.I | re.M | re.S,
)
"""A header aiohttp allows once, repeated (aiohttp answers 400)."""
_HEAD: Final = b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\nDate: %s\r\nServer: %s\r\n\r\n"
_NARINFO_TYPE: Final = NARINFO_TYPE.encode()
_CACHE_INFO_TYPE: Final = b"text/x-nix-cache-info"
_SERVER: Final = SERVER_SOFTWARE.encode()


def front_enabled() -> bool:
    """Whether connections start with the front (not when ``NIXCAS_BRIDGE_FRONT`` is ``0``)."""
    return os.environ.get("NIXCAS_BRIDGE_FRONT", "1") != "0"


class FrontServer(web.Server):
    """aiohttp's server of the bridge whose connections start with a :class:`FrontProtocol`.

    Made by :meth:`adopt` from the server the runner built (so the app's
    request handling, the access logger and the connection bookkeeping stay
    aiohttp's own); :meth:`handler` makes the aiohttp protocol a connection is
    handed to.  On shutdown the connections the front still owns are closed
    after what was written to them is sent, as aiohttp closes idle ones.
    """

    _bridge: NarinfoRoutes
    _serving: Callable[[], bool]
    _owned: set[FrontProtocol]

    @classmethod
    def adopt(cls, server: web.Server, bridge: NarinfoRoutes, serving: Callable[[], bool]) -> FrontServer:
        """``server`` itself, now a :class:`FrontServer` for ``bridge`` (``serving``: not draining)."""
        server.__class__ = cls  # the same object: the runner's and every RequestHandler's manager
        front = cast("FrontServer", server)
        front._bridge, front._serving, front._owned = bridge, serving, set()
        return front

    def __call__(self) -> asyncio.Protocol:  # type: ignore[override]  # the listener's protocol factory
        return FrontProtocol(self)

    def handler(self) -> RequestHandler:
        """A new aiohttp protocol for a connection the front hands over."""
        return super().__call__()

    def declines(self) -> bool:
        """Whether every request now goes to aiohttp (private bridge, draining, tracing on)."""
        return not self._bridge.answers_early(self._serving)

    def pre_shutdown(self) -> None:
        for connection in list(self._owned):
            connection.close()
        super().pre_shutdown()


class FrontProtocol(asyncio.Protocol):
    """One connection while the front owns it (see the module's documentation)."""

    def __init__(self, server: FrontServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._pending = b""
        self._writing_paused = False
        self._active = False
        self._idle: asyncio.TimerHandle | None = None
        self._client = "-"
        self._loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast("asyncio.Transport", transport)
        tcp_keepalive(self._transport)
        peer = transport.get_extra_info("peername")
        self._client = str(peer[0]) if isinstance(peer, (list, tuple)) else (peer or "-")
        self._server._owned.add(self)
        self._idle = self._loop.call_later(KEEPALIVE_TIMEOUT, self._check_idle)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._release()
        self._pending = b""

    def pause_writing(self) -> None:
        self._writing_paused = True  # answer no more until the client has read what was written
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()
            pending, self._pending = self._pending, b""
            if pending:
                self._serve(pending)

    def data_received(self, data: bytes) -> None:
        self._active = True
        if self._pending:
            data = self._pending + data
            self._pending = b""
        if self._writing_paused:
            self._pending = data  # reading is paused: at most what one read brought
        else:
            self._serve(data)

    def close(self) -> None:
        """Close the connection once what was written is sent (shutdown)."""
        if self._transport is not None:
            self._transport.close()

    def _serve(self, data: bytes) -> None:
        """Answer the requests in ``data`` one after another; keep an incomplete one, hand over at the first other."""
        server = self._server
        transport = self._transport
        assert transport is not None
        answer = server._bridge._narinfo_now
        pos, end = 0, len(data)
        while pos < end:
            start = time.perf_counter()
            match = _SIMPLE.match(data, pos)
            if match is None:
                rest = data[pos:] if pos else data
                if len(rest) <= MAX_HEAD and b"\r\n\r\n" not in rest and _VIABLE.fullmatch(rest):
                    self._pending = rest  # the head is not complete yet
                    return
                return self._hand_over(rest)
            first, last = match.span(2)
            if (
                match.end() - pos > MAX_HEAD
                or data.count(b"\n", first, last) > MAX_HEADERS
                or server.declines()
                or _AWAY.search(data, first, last)
                or _TWICE.search(data, first, last)
            ):
                return self._hand_over(data[pos:])
            target = match.group(1)
            if len(target) == 41:  # /<32 characters>.narinfo
                try:
                    body = answer(target[1:33].decode())
                except Exception:  # unexpected: aiohttp's route meets it again and answers 500
                    body = None
                if body is None:
                    return self._hand_over(data[pos:])
                route, content_type = "get_narinfo", _NARINFO_TYPE
            else:
                body, route, content_type = server._bridge._cache_info, "cache_info", _CACHE_INFO_TYPE
            head = _HEAD % (content_type, len(body), rfc822_formatted_time().encode(), _SERVER)
            transport.write(head + body)
            pos = match.end()
            sent = len(head) + len(body)
            seconds = time.perf_counter() - start
            level = record(route, "GET", 200, seconds, 0, sent)
            if level:
                # the target is plain (the pattern's); the line goes out with the others of this loop iteration
                client, loop = self._client, self._loop
                access_line(level, client, "GET", target.decode(), route, 200, seconds, 0, sent, "-", loop, plain=True)
            if self._writing_paused or transport.is_closing():
                if pos < end:
                    self._pending = data[pos:]
                return

    def _hand_over(self, unanswered: bytes) -> None:
        """Switch the connection to aiohttp's protocol and give it ``unanswered``: aiohttp owns it from now on."""
        transport = self._transport
        assert transport is not None
        self._release()
        self._transport = None
        handler = self._server.handler()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if unanswered:
            handler.data_received(unanswered)

    def _release(self) -> None:
        self._server._owned.discard(self)
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _check_idle(self) -> None:
        """Close a connection that sent nothing for :data:`KEEPALIVE_TIMEOUT` seconds (checked that often)."""
        self._idle = None
        if not self._active:
            self.close()
            return
        self._active = False
        self._idle = asyncio.get_running_loop().call_later(KEEPALIVE_TIMEOUT, self._check_idle)

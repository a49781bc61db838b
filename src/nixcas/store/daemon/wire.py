"""Reading and writing the worker protocol's values.

Every integer is an unsigned 64-bit little-endian word; a byte string is its
length, its bytes and zero padding to a multiple of 8; a list is its count and
then its items.  Reads are bounded (string length, list count), so a hostile
peer cannot make the daemon allocate more than it chose to accept.

NAR uploads arrive in one of three framings, depending on the session's
protocol minor: framed chunks (≥ 1.23, :class:`FramedSource`), data pulled
with ``STDERR_READ`` requests (1.21 and 1.22, :class:`TunnelSource`), or the
raw NAR in the stream (older, :class:`LimitedSource` over the stream).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterable

from nixcas.errors import ValidationError
from nixcas.store.daemon.protocol import Stderr
from nixcas.store.nar.parser import AsyncByteSource

__all__ = [
    "MAX_LIST",
    "MAX_STRING",
    "FramedSource",
    "LimitedSource",
    "ProtocolError",
    "TunnelSource",
    "WireReader",
    "WireWriter",
]

MAX_STRING = 1 << 20
"""Longest string accepted where nothing smaller is given (an option value, a message)."""
MAX_LIST = 1 << 20
"""Most items accepted in one list (paths, signatures, options)."""
MAX_LIST_BYTES = 32 << 20
"""Most bytes one list may cost: its strings plus :data:`ITEM_OVERHEAD` each (about 270,000 store paths)."""
ITEM_OVERHEAD = 64
"""What a list item costs in memory beyond its characters (the str object, the list slot)."""

_U64 = struct.Struct("<Q")
_ZEROS = bytes(8)


class ProtocolError(ValidationError):
    """The peer sent something the protocol does not allow; the session cannot go on."""


class WireReader:
    """Protocol values from a stream (or any byte source); a short read is a :class:`ProtocolError`."""

    def __init__(self, source: AsyncByteSource) -> None:
        self._source = source

    async def _exactly(self, n: int) -> bytes:
        """``n`` bytes, or fewer if the source ends first."""
        if isinstance(self._source, asyncio.StreamReader):
            try:
                return await self._source.readexactly(n)
            except asyncio.IncompleteReadError as e:
                return e.partial
        parts = []
        have = 0
        while have < n:
            data = await self._source.read(n - have)
            if not data:
                break
            parts.append(data)
            have += len(data)
        return b"".join(parts)

    async def exactly(self, n: int) -> bytes:
        data = await self._exactly(n)
        if len(data) != n:
            raise ProtocolError(f"truncated message: the data ended {n - len(data)} bytes early")
        return data

    async def some(self, n: int) -> bytes:
        """Between 1 and ``n`` bytes (a truncation error at the end of the stream)."""
        data = await self._source.read(n)
        if not data:
            raise ProtocolError("truncated message: the data ended inside a NAR")
        return data

    async def next_op(self) -> int | None:
        """The next operation number, or ``None`` if the peer closed the connection between operations."""
        data = await self._exactly(8)
        if not data:
            return None
        if len(data) != 8:
            raise ProtocolError(f"truncated message: the connection ended {8 - len(data)} bytes early")
        value: int = _U64.unpack(data)[0]
        return value

    async def u64(self) -> int:
        value: int = _U64.unpack(await self.exactly(8))[0]
        return value

    async def flag(self) -> bool:
        return await self.u64() != 0

    async def small(self, limit: int, what: str) -> int:
        """A number that must be at most ``limit`` (a count, a mode)."""
        value = await self.u64()
        if value > limit:
            raise ProtocolError(f"{what} {value} is out of range (at most {limit})")
        return value

    async def raw(self, max_len: int = MAX_STRING, what: str = "string") -> bytes:
        size = await self.u64()
        if size > max_len:
            raise ProtocolError(f"{what} of {size} bytes is longer than the {max_len} accepted")
        data = await self.exactly(size) if size else b""
        pad = -size & 7
        if pad and await self.exactly(pad) != _ZEROS[:pad]:
            raise ProtocolError(f"{what}: non-zero padding")
        return data

    async def text(self, max_len: int = MAX_STRING, what: str = "string") -> str:
        data = await self.raw(max_len, what)
        try:
            return data.decode()
        except UnicodeDecodeError:
            raise ProtocolError(f"{what} is not UTF-8: {data[:80]!r}") from None

    async def texts(self, max_len: int = MAX_STRING, what: str = "string", max_count: int = MAX_LIST) -> list[str]:
        count = await self.small(max_count, f"number of {what}s")
        items = []
        total = 0
        for _ in range(count):
            item = await self.text(max_len, what)
            total += len(item) + ITEM_OVERHEAD  # what the item costs in memory, not only on the wire
            if total > MAX_LIST_BYTES:
                raise ProtocolError(f"a list of {what}s longer than the {MAX_LIST_BYTES} bytes accepted")
            items.append(item)
        return items


class WireWriter:
    """Protocol values collected in a buffer; :meth:`take` hands them over for one write."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def __len__(self) -> int:
        return len(self._buf)

    def u64(self, value: int) -> WireWriter:
        self._buf += _U64.pack(value)
        return self

    def flag(self, value: bool) -> WireWriter:
        return self.u64(1 if value else 0)

    def raw(self, data: bytes) -> WireWriter:
        self._buf += _U64.pack(len(data))
        self._buf += data
        self._buf += _ZEROS[: -len(data) & 7]
        return self

    def text(self, value: str) -> WireWriter:
        return self.raw(value.encode())

    def texts(self, values: Iterable[str]) -> WireWriter:
        items = list(values)
        self.u64(len(items))
        for item in items:
            self.text(item)
        return self

    def take(self) -> bytes:
        out = bytes(self._buf)
        self._buf.clear()
        return out


class FramedSource:
    """The data of a framed stream (protocol ≥ 1.23): chunks of ``u64 length`` + bytes, ended by length 0.

    An :class:`~nixcas.store.nar.parser.AsyncByteSource`.  :meth:`drain`
    reads (and drops) the rest, so the stream stays in sync after an error.
    """

    def __init__(self, wire: WireReader) -> None:
        self._wire = wire
        self._left = 0
        self.done = False

    async def read(self, n: int, /) -> bytes:
        while self._left == 0:
            if self.done:
                return b""
            self._left = await self._wire.u64()
            if self._left == 0:
                self.done = True
                return b""
        data = await self._wire.some(min(max(n, 1), self._left))
        self._left -= len(data)
        return data

    async def drain(self) -> None:
        while await self.read(1 << 16):
            pass


class TunnelSource:
    """Data pulled from the client (protocol 1.21 and 1.22): ``STDERR_READ n``, answered by a string of ≤ n bytes."""

    def __init__(self, wire: WireReader, writer: asyncio.StreamWriter) -> None:
        self._wire = wire
        self._writer = writer

    async def read(self, n: int, /) -> bytes:
        n = max(1, min(n, 1 << 16))
        self._writer.write(WireWriter().u64(Stderr.READ).u64(n).take())
        await self._writer.drain()
        data = await self._wire.raw(n, "NAR data")
        if not data:
            raise ProtocolError("the client sent no data for a read request")
        return data


class LimitedSource:
    """At most ``limit`` bytes of ``inner`` (a NAR whose size the path info declares), then ``b""``."""

    def __init__(self, inner: FramedSource | TunnelSource | WireReader, limit: int) -> None:
        self._inner = inner
        self.left = limit

    async def read(self, n: int, /) -> bytes:
        if self.left <= 0:
            return b""
        want = min(max(n, 1), self.left)
        data = await (self._inner.some(want) if isinstance(self._inner, WireReader) else self._inner.read(want))
        self.left -= len(data)
        return data

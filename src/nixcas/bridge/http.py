"""HTTP details of the bridge: byte ranges, content encodings, credentials."""

from __future__ import annotations

import asyncio
import bz2
import lzma
import zlib
from collections.abc import AsyncGenerator, AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Final, Protocol

import zstandard

from nixcas.urls import is_decimal

__all__ = ["ENCODINGS", "ByteRange", "choose_encoding", "encode_stream", "parse_range"]

ENCODINGS: Final = ("zstd", "gzip")
"""Content encodings offered for NARs, in order of preference."""
ZSTD_LEVEL: Final = 1
GZIP_LEVEL: Final = 1
THREAD_MIN: Final = 64 << 10
"""Chunks at least this big are compressed on a worker thread."""


@dataclass(frozen=True)
class ByteRange:
    """``start`` up to and excluding ``end``."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


class Unsatisfiable(Exception):
    """A syntactically valid range that lies outside the representation (HTTP 416)."""


_HUGE = 10**20
"""Stands for any position of more than 20 digits: past the end of every NAR (``int()`` of
thousands of digits is refused by Python, and slow before that)."""


def _position(digits: str) -> int:
    """A byte position from decimal digits, however many (leading zeros ignored)."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 20 else _HUGE


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The one byte range of a ``Range`` header, or ``None`` to send everything.

    Headers that are malformed, use another unit or ask for several ranges
    are ignored (RFC 9110 allows serving the whole representation instead).
    A range starting at or beyond ``size`` raises :class:`Unsatisfiable`.
    """
    if header is None:
        return None
    unit, eq, spec = header.strip().partition("=")
    if not eq or unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (is_decimal(first) or is_decimal(last)) or (first and not is_decimal(first)):
        return None
    if last and not is_decimal(last):
        return None
    if not first:  # suffix: the last N bytes
        n = _position(last)
        if n == 0:
            raise Unsatisfiable
        return ByteRange(max(0, size - n), size)
    start = _position(first)
    end = size if not last else min(_position(last) + 1, size)
    if last and _position(last) < start:
        return None  # invalid: ignore
    if start >= size:
        raise Unsatisfiable
    return ByteRange(start, end)


def choose_encoding(accept_encoding: str | None) -> str | None:
    """The first of :data:`ENCODINGS` the client accepts (``q`` > 0), or ``None`` for identity."""
    if not accept_encoding:
        return None
    accepted: dict[str, float] = {}
    for item in accept_encoding.split(","):
        name, _, params = item.strip().partition(";")
        q = 1.0
        params = params.strip()
        if params.startswith("q="):
            try:
                q = float(params[2:])
            except ValueError:
                q = 0.0
        accepted[name.strip().lower()] = q
    for encoding in ENCODINGS:
        q = accepted[encoding] if encoding in accepted else accepted.get("*", 0.0)
        if q > 0:
            return encoding
    return None


class _Compressor(Protocol):
    def compress(self, data: bytes | memoryview, /) -> bytes: ...

    def flush(self) -> bytes: ...


def _compressor(encoding: str) -> _Compressor:
    """A fast compressor for ``encoding`` (an HTTP content encoding, or a NAR file's xz/bzip2)."""
    if encoding == "zstd":
        return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()
    if encoding == "xz":
        return lzma.LZMACompressor(preset=0)
    if encoding == "bzip2":
        return bz2.BZ2Compressor(1)
    return zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # 31: gzip framing


async def encode_stream(
    chunks: AsyncIterator[bytes | memoryview], encoding: str, executor: Executor | None = None
) -> AsyncGenerator[bytes, None]:
    """``chunks`` compressed with ``encoding`` (zstd, gzip, xz, bzip2); big chunks are compressed on worker threads."""
    compressor = _compressor(encoding)
    loop = asyncio.get_running_loop()
    async for chunk in chunks:
        if len(chunk) >= THREAD_MIN:
            out = await loop.run_in_executor(executor, compressor.compress, chunk)
        else:
            out = compressor.compress(chunk)
        if out:
            yield out
    yield compressor.flush()

"""A streaming, strict NAR parser over an async byte source.

:func:`parse_nar` reads a NAR and yields events in depth-first pre-order:
:class:`NarDirectory` when a directory starts and :class:`NarDirectoryEnd`
when it is complete, :class:`NarSymlink`, and :class:`NarFile` followed by
:class:`NarFileChunk` events carrying exactly ``size`` bytes of contents in
pieces of at most ``chunk_size`` bytes (a file is never held whole).  Paths
are :class:`~nixcas.castore.treepath.TreePath` links below an anonymous root
(``path.below_root()`` gives the names; siblings share their parent's path, so
memory stays linear in the depth).

Everything the format forbids is a :class:`~nixcas.errors.NarError` whose
message gives the byte offset and the path: a wrong magic, unknown or
misplaced tokens, non-zero padding, names that are empty, longer than 255
bytes, ``.``, ``..`` or contain ``/`` or NUL, names not strictly increasing
(duplicates included), symlink targets that are empty, longer than 4095 bytes
or contain NUL, token lengths above 4096, file sizes of 2^63 or more,
truncation anywhere, any byte after the root node, and nesting deeper than
:data:`~nixcas.castore.nodes.MAX_DEPTH` path components.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncGenerator, AsyncIterable
from dataclasses import dataclass
from typing import Protocol, TypeAlias, runtime_checkable

from nixcas.castore.nodes import MAX_DEPTH, MAX_NAME_LEN, MAX_TARGET_LEN, validate_name, validate_symlink_target
from nixcas.castore.treepath import TreePath
from nixcas.errors import InvalidNameError, InvalidSymlinkTargetError, NarError
from nixcas.store.nar.plan import show_path
from nixcas.store.nar.wire import (
    MAX_FILE_SIZE,
    MAX_TOKEN_LEN,
    NAR_MAGIC,
    OPEN_TYPE,
    TOK_CLOSE,
    TOK_EMPTY,
    TOK_NAME,
    TOK_NODE,
    TOK_OPEN,
    TOK_TARGET,
    pad_len,
)

__all__ = [
    "AsyncByteSource",
    "BytesSource",
    "IterableSource",
    "NarDirectory",
    "NarDirectoryEnd",
    "NarEvent",
    "NarFile",
    "NarFileChunk",
    "NarSymlink",
    "ROOT_PATH",
    "as_source",
    "parse_nar",
]

CHUNK = 1 << 20
"""Default maximum size of a :class:`NarFileChunk`."""
READ_AHEAD = 64 << 10
"""How much the parser asks the source for when it needs framing bytes."""

_U64 = struct.Struct("<Q")
Path = TreePath
ROOT_PATH = TreePath(None, b"")
"""The path of a NAR's (anonymous) root node; every event's path descends from it."""


@runtime_checkable
class AsyncByteSource(Protocol):
    """Anything with ``async read(n) -> bytes`` returning ``b""`` at EOF (e.g. ``asyncio.StreamReader``)."""

    async def read(self, n: int, /) -> bytes:
        """Up to ``n`` bytes; ``b""`` only at the end."""
        ...


class BytesSource:
    """An :class:`AsyncByteSource` over bytes in memory (reads are zero-copy slices of a memoryview)."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._data = memoryview(data).cast("B")
        self._pos = 0

    async def read(self, n: int, /) -> bytes:
        """Up to ``n`` bytes."""
        end = min(self._pos + max(n, 0), len(self._data))
        out = self._data[self._pos : end].tobytes()
        self._pos = end
        return out


class IterableSource:
    """An :class:`AsyncByteSource` over an async iterable of byte chunks."""

    def __init__(self, chunks: AsyncIterable[bytes]) -> None:
        self._it = aiter(chunks)
        self._rest = b""
        self._done = False

    async def read(self, n: int, /) -> bytes:
        """Up to ``n`` bytes (at most one underlying chunk)."""
        while not self._rest and not self._done:
            try:
                self._rest = bytes(await anext(self._it))
            except StopAsyncIteration:
                self._done = True
        out, self._rest = (self._rest, b"") if len(self._rest) <= n else (self._rest[:n], self._rest[n:])
        return out


def as_source(source: AsyncByteSource | AsyncIterable[bytes] | bytes | bytearray | memoryview) -> AsyncByteSource:
    """Adapt bytes or an async iterable of chunks to an :class:`AsyncByteSource`."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return BytesSource(source)
    if isinstance(source, AsyncByteSource):
        return source
    return IterableSource(source)


@dataclass(frozen=True, slots=True)
class NarDirectory:
    """A directory starts; its entries follow, then :class:`NarDirectoryEnd`."""

    path: Path


@dataclass(frozen=True, slots=True)
class NarDirectoryEnd:
    """The directory at ``path`` is complete."""

    path: Path


@dataclass(frozen=True, slots=True)
class NarSymlink:
    """A symlink and its (validated) target."""

    path: Path
    target: bytes


@dataclass(frozen=True, slots=True)
class NarFile:
    """A regular file; exactly ``size`` bytes follow as :class:`NarFileChunk` events (none if empty)."""

    path: Path
    size: int
    executable: bool


@dataclass(frozen=True, slots=True)
class NarFileChunk:
    """A piece of the current file's contents."""

    data: bytes


NarEvent: TypeAlias = NarDirectory | NarDirectoryEnd | NarSymlink | NarFile | NarFileChunk


class _Input:
    """Buffered reading with position tracking and precise errors."""

    def __init__(self, source: AsyncByteSource) -> None:
        self._source = source
        self._buf = b""
        self._bufpos = 0
        self.offset = 0  # bytes of the NAR consumed
        self.path: Path = ROOT_PATH

    def error(self, what: str, offset: int | None = None) -> NarError:
        at = self.offset if offset is None else offset
        return NarError(f"invalid NAR at byte {at} ({show_path(self.path)}): {what}")

    async def _more(self, n: int) -> bytes:
        """Read from the source; ``b""`` at EOF."""
        return await self._source.read(n)

    async def exact(self, n: int, what: str) -> bytes:
        """Exactly ``n`` bytes, or a truncation error mentioning ``what``."""
        avail = len(self._buf) - self._bufpos
        if avail >= n:
            out = self._buf[self._bufpos : self._bufpos + n]
            self._bufpos += n
            self.offset += n
            return out
        parts = [self._buf[self._bufpos :]] if avail else []
        have = avail
        while have < n:
            data = await self._more(max(n - have, READ_AHEAD))
            if not data:
                raise self.error(f"truncated: NAR ended inside {what} ({have} of {n} bytes)", self.offset + have)
            parts.append(data)
            have += len(data)
        joined = b"".join(parts)
        self._buf, self._bufpos = joined, n
        self.offset += n
        return joined[:n]

    async def chunk(self, n: int) -> bytes:
        """Up to ``n`` (> 0) bytes of file contents; ``b""`` at EOF.  Big reads bypass the buffer."""
        avail = len(self._buf) - self._bufpos
        if avail:
            take = min(avail, n)
            if take == len(self._buf) and self._bufpos == 0:
                out = self._buf
            else:
                out = self._buf[self._bufpos : self._bufpos + take]
            self._bufpos += take
            self.offset += take
            return out
        data = await self._more(n)
        if len(data) > n:  # a source that over-delivers: keep the rest
            self._buf, self._bufpos = data, n
            data = data[:n]
        self.offset += len(data)
        return data

    async def at_eof(self) -> bool:
        if len(self._buf) > self._bufpos:
            return False
        data = await self._more(1)
        if data:
            self._buf, self._bufpos = data, 0
            return False
        return True

    async def expect(self, token: bytes, what: str) -> None:
        """The exact encoded ``token`` sequence."""
        start = self.offset
        got = await self.exact(len(token), what)
        if got != token:
            raise self.error(f"expected {what}, found {_describe(got)}", start)

    async def u64(self, what: str) -> int:
        value: int = _U64.unpack(await self.exact(8, what))[0]
        return value

    async def padding(self, n: int, what: str) -> None:
        pad = pad_len(n)
        if pad:
            start = self.offset
            data = await self.exact(pad, f"padding of {what}")
            if data.count(0) != pad:
                raise self.error(f"non-zero padding after {what}", start)

    async def string(self, limit: int, what: str) -> bytes:
        """A ``str`` of at most ``limit`` bytes, with zero padding checked."""
        start = self.offset
        n = await self.u64(f"length of {what}")
        if n > limit:
            raise self.error(f"{what} too long: {n} bytes (at most {limit})", start)
        data = await self.exact(n, what)
        await self.padding(n, what)
        return data

    async def token(self, what: str) -> bytes:
        return await self.string(MAX_TOKEN_LEN, what)


def _describe(raw: bytes) -> str:
    """What some bytes look like when a particular token was expected."""
    if len(raw) >= 8:
        n = _U64.unpack_from(raw)[0]
        if n <= len(raw) - 8:
            body = raw[8 : 8 + n]
            pad = raw[8 + n : 8 + n + pad_len(n)]
            if pad.count(0) != len(pad):
                return f"{body!r} with non-zero padding"
            return repr(body)
        return f"a string of length {n}"
    return repr(raw)


async def parse_nar(
    source: AsyncByteSource | AsyncIterable[bytes] | bytes, *, chunk_size: int = CHUNK
) -> AsyncGenerator[NarEvent, None]:
    """Parse a NAR strictly, yielding events in depth-first pre-order (see the module docstring).

    The consumer must take every event in order; the source is read only as
    far as needed for the next event (plus a small read-ahead for framing).
    After the root node the source must be at EOF.
    """
    inp = _Input(as_source(source))
    chunk_size = max(1, chunk_size)
    await inp.expect(NAR_MAGIC, "the NAR magic 'nix-archive-1'")
    stack: list[tuple[Path, bytes | None]] = []  # per open directory: its path and the previous entry name
    path: Path | None = ROOT_PATH
    while path is not None:
        inp.path = path
        await inp.expect(OPEN_TYPE, "'(' 'type' (a node)")
        start = inp.offset
        kind = await inp.token("node type")
        if kind == b"regular":
            size, executable = await _file_header(inp)
            yield NarFile(path, size, executable)
            remaining = size
            while remaining:
                data = await inp.chunk(min(remaining, chunk_size))
                if not data:
                    raise inp.error(f"truncated: NAR ended inside file contents ({size - remaining} of {size} bytes)")
                remaining -= len(data)
                yield NarFileChunk(data)
            await inp.padding(size, "file contents")
            await inp.expect(TOK_CLOSE, "')' after file contents")
        elif kind == b"symlink":
            yield NarSymlink(path, await _symlink_target(inp))
        elif kind == b"directory":
            yield NarDirectory(path)
            stack.append((path, None))
        else:
            raise inp.error(f"unknown node type {kind[:64]!r}", start)
        if kind != b"directory" and path.parent is not None:
            await inp.expect(TOK_CLOSE, "')' closing the entry")
        # The next node: the next entry of the innermost open directory, closing those that have no more.
        path = None
        while stack and (path := await _next_entry(inp, stack)) is None:
            done = stack.pop()[0]
            yield NarDirectoryEnd(done)
            if done.parent is not None:
                inp.path = done.parent
                await inp.expect(TOK_CLOSE, "')' closing the entry")
    inp.path = ROOT_PATH
    if not await inp.at_eof():
        raise inp.error("trailing data after the root node")


async def _file_header(inp: _Input) -> tuple[int, bool]:
    """A regular file's ``executable`` flag and size, after its type: ``(size, executable)``."""
    start = inp.offset
    tok = await inp.token("'executable' or 'contents'")
    executable = tok == b"executable"
    if executable:
        await inp.expect(TOK_EMPTY, "'' after 'executable'")
        start = inp.offset
        tok = await inp.token("'contents'")
    if tok != b"contents":
        raise inp.error(f"expected 'contents', found {tok[:64]!r}", start)
    start = inp.offset
    size = await inp.u64("file size")
    if size > MAX_FILE_SIZE:
        raise inp.error(f"absurd file size {size}", start)
    return size, executable


async def _symlink_target(inp: _Input) -> bytes:
    """A symlink's validated target and the ``)`` after it, after its type."""
    await inp.expect(TOK_TARGET, "'target'")
    start = inp.offset
    target = await inp.string(MAX_TARGET_LEN, "symlink target")
    try:
        validate_symlink_target(target)
    except InvalidSymlinkTargetError as e:
        raise inp.error(str(e), start) from None
    await inp.expect(TOK_CLOSE, "')' after symlink target")
    return target


async def _next_entry(inp: _Input, stack: list[tuple[Path, bytes | None]]) -> Path | None:
    """The path of the innermost open directory's next entry (up to its ``node``), or ``None`` at its ``)``."""
    dir_path, prev = stack[-1]
    inp.path = dir_path
    start = inp.offset
    tok = await inp.token("'entry' or ')'")
    if tok != b"entry":
        if tok != b")":
            raise inp.error(f"expected 'entry' or ')', found {tok[:64]!r}", start)
        return None
    await inp.expect(TOK_OPEN, "'(' opening the entry")
    await inp.expect(TOK_NAME, "'name'")
    start = inp.offset
    name = await inp.string(MAX_NAME_LEN, "entry name")
    try:
        validate_name(name)
    except InvalidNameError as e:
        raise inp.error(str(e), start) from None
    if prev is not None and name <= prev:
        problem = "duplicate entry" if name == prev else "entries not sorted"
        raise inp.error(f"{problem}: {name[:300]!r} after {prev[:300]!r}", start)
    if dir_path.depth >= MAX_DEPTH:
        raise inp.error(f"nested deeper than {MAX_DEPTH} levels (the most a tree may have)", start)
    stack[-1] = (dir_path, name)
    path = TreePath(dir_path, name)
    inp.path = path
    await inp.expect(TOK_NODE, "'node'")
    return path

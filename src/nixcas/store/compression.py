"""Reading compressed NAR files (xz, bzip2, zstd, gzip) as a stream, with bounded memory.

Binary caches store NARs compressed; :func:`decompressing` turns a byte
source of such a file into a source of the NAR.  The decompressor runs on a
private worker thread, pulling the compressed bytes from the event loop as it
needs them, and hands out at most the amount asked for per read, so neither
a large file nor a decompression bomb is ever held in memory, and the event
loop never spends its time in xz.

The compressed bytes are counted and hashed on the way (:class:`FileHashing`):
when the file ends its SHA-256 must be the expected one (the hash a NAR file is
named by), else :class:`FileHashMismatch` is raised *as the last read*, so an
importer reading the NAR to its end fails before it commits anything.
"""

from __future__ import annotations

import asyncio
import bz2
import gzip
import hashlib
import io
import lzma
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Final, Protocol

import zstandard

from nixcas.errors import ValidationError
from nixcas.store.nar.parser import AsyncByteSource

__all__ = ["COMPRESSIONS", "FileHashMismatch", "FileHashing", "UnsupportedCompression", "decompressing"]

COMPRESSIONS: Final = {"none": "", "xz": ".xz", "bzip2": ".bz2", "zstd": ".zst", "gzip": ".gz"}
"""The compressions nixcas reads, each with its NAR file suffix (Nix's names; ``.gz`` as other tools write it)."""

PIPE_BUFFER: Final = 1 << 20
"""Compressed bytes fetched from the event loop per round trip of the worker thread."""


class UnsupportedCompression(ValidationError):
    """A compression (or NAR file suffix) nixcas cannot read."""


class FileHashMismatch(ValidationError):
    """A (compressed) file does not have the SHA-256 or size it is named or announced by."""


class FileHashing:
    """A byte source that counts and hashes everything read, and checks both at the end.

    At end of file the digest (``algo``, default SHA-256) must be
    ``expected_digest`` and the size ``expected_size`` (each when given); a
    mismatch raises :class:`FileHashMismatch` instead of returning ``b""``.
    """

    def __init__(
        self,
        inner: AsyncByteSource,
        *,
        expected_digest: bytes | None = None,
        expected_size: int | None = None,
        algo: str = "sha256",
        what: str = "file",
    ) -> None:
        self._inner = inner
        self._expected_digest = expected_digest
        self._expected_size = expected_size
        self._what = what
        self._algo = algo
        self._hash = hashlib.new(algo)
        self.size = 0
        self.eof = False

    async def read(self, n: int, /) -> bytes:
        data = await self._inner.read(n)
        if data:
            self.size += len(data)
            if self._expected_size is not None and self.size > self._expected_size:
                raise FileHashMismatch(f"{self._what} is longer than its announced size {self._expected_size}")
            self._hash.update(data)
            return data
        if not self.eof:
            self.eof = True
            self._check()
        return data

    def _check(self) -> None:
        if self._expected_size is not None and self.size != self._expected_size:
            raise FileHashMismatch(
                f"{self._what} size mismatch: announced {self._expected_size} bytes, got {self.size}"
            )
        if self._expected_digest is not None and self._hash.digest() != self._expected_digest:
            raise FileHashMismatch(
                f"{self._what} hash mismatch: expected {self._algo} {self._expected_digest.hex()}, "
                f"got {self._hash.hexdigest()}"
            )

    async def drain(self) -> None:
        """Read (and hash) whatever is left, to end of file."""
        while await self.read(PIPE_BUFFER):
            pass


class _Pipe(io.RawIOBase):
    """A blocking file over an async source, for use on a worker thread (reads hop to the loop)."""

    def __init__(self, source: AsyncByteSource, loop: asyncio.AbstractEventLoop) -> None:
        self._source = source
        self._loop = loop

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = asyncio.run_coroutine_threadsafe(self._source.read(len(buffer)), self._loop).result()
        buffer[: len(data)] = data
        return len(data)


class _Reader(Protocol):
    def read(self, n: int, /) -> bytes: ...

    def close(self) -> None: ...


def _opener(compression: str) -> Callable[[IO[bytes]], _Reader]:
    if compression == "xz":
        return lambda f: lzma.LZMAFile(f)
    if compression == "bzip2":
        return lambda f: bz2.BZ2File(f)
    if compression == "gzip":
        return lambda f: gzip.GzipFile(fileobj=f)
    if compression == "zstd":
        return lambda f: zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True, closefd=False)
    known = ", ".join(COMPRESSIONS)
    raise UnsupportedCompression(f"unsupported compression {compression[:40]!r} (known: {known})")


class _Decompressing:
    """The decompressed bytes of ``raw`` (see :func:`decompressing`)."""

    def __init__(self, raw: FileHashing, compression: str) -> None:
        self._raw = raw
        self._open = _opener(compression)
        self._compression = compression
        self._file: _Reader | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._done = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def _read(self, n: int) -> bytes:
        if self._file is None:
            assert self._loop is not None
            self._file = self._open(io.BufferedReader(_Pipe(self._raw, self._loop), PIPE_BUFFER))
        try:
            return self._file.read(n)
        except (OSError, EOFError, lzma.LZMAError, zstandard.ZstdError) as e:
            if isinstance(e, ValidationError):
                raise
            raise ValidationError(f"invalid {self._compression} data: {e}") from None

    async def read(self, n: int, /) -> bytes:
        if self._done:
            return b""
        if self._executor is None:
            self._loop = asyncio.get_running_loop()
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="decompress")
        data = await asyncio.get_running_loop().run_in_executor(self._executor, self._read, max(1, n))
        if not data:
            self._done = True
            self.close()
            await self._raw.drain()  # trailing bytes belong to the file (and its hash) too
        return data

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Stop the worker thread; the decompressor is closed on it, after any read in progress."""
        if self._executor is not None:
            self._executor.submit(self._close_file)
            self._executor.shutdown(wait=False)
            self._executor = None


class _Passthrough:
    def __init__(self, raw: FileHashing) -> None:
        self._raw = raw

    async def read(self, n: int, /) -> bytes:
        return await self._raw.read(n)

    def close(self) -> None:
        pass


def decompressing(raw: FileHashing, compression: str) -> _Decompressing | _Passthrough:
    """A source of the decompressed bytes of ``raw`` (``compression`` as in a narinfo: none, xz, …).

    Call ``close()`` when done (stops the worker thread).  Corrupt input raises
    :class:`~nixcas.errors.ValidationError`; an unknown ``compression``
    :class:`UnsupportedCompression` at once.
    """
    if compression == "none":
        return _Passthrough(raw)
    return _Decompressing(raw, compression)

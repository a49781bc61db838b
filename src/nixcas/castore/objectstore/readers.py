"""Readers of the local-disk store that are not plain chunk lists: big objects written before chunking.

(Chunked blobs are read by :class:`~nixcas.castore.blob.chunked.ChunkedReader`,
single-chunk blobs whole and verified when opened.)
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from typing import BinaryIO, TypeVar

import blake3
import zstandard

from nixcas.castore.blob.base import (
    BlobReader,
    resolve_seek,
)
from nixcas.castore.digest import B3Digest
from nixcas.errors import ChecksumMismatch, StorageError

__all__ = ["LEGACY_MAX_SIZE", "LegacyObjectReader"]

T = TypeVar("T")

LEGACY_MAX_SIZE = 64 << 30
"""The largest single-object blob (written before chunking) that is served; it is verified in a first pass."""


class LegacyObjectReader(BlobReader):
    """Streams a big single-object blob (written before chunking), verified in full before its first byte.

    Such an object has no index, so nothing declares its size.  The first
    read (or ``SEEK_END``) therefore decompresses the whole object once,
    discarding the output while hashing and counting it (at most
    :data:`LEGACY_MAX_SIZE` bytes: a zstd bomb stops there), and compares
    the hash with the blob's digest; only then is the same open file
    decompressed again and served, never past the size the first pass
    counted.  Two passes, for rare old objects; backward seeks restart the
    second stream.
    """

    def __init__(self, path: str, digest: B3Digest) -> None:
        self._path = path
        self._digest = digest
        self._file: BinaryIO | None = None
        self._stream: zstandard.ZstdDecompressionReader | None = None
        self._pos = 0  # position of the decompressed stream
        self._want = 0  # position the caller asked for
        self._size: int | None = None  # known once verified

    def _verify_sync(self) -> int:
        if self._size is None:
            self._close_sync()
            self._file = open(self._path, "rb")  # noqa: SIM115 - closed in _close_sync
            hasher = blake3.blake3()
            size = 0
            with zstandard.ZstdDecompressor().stream_reader(self._file, read_across_frames=True, closefd=False) as s:
                while block := s.read(1 << 20):
                    size += len(block)
                    if size > LEGACY_MAX_SIZE:
                        raise StorageError(
                            f"blob {self._digest.hex()}: object {self._path} expands past {LEGACY_MAX_SIZE} bytes"
                        )
                    hasher.update(block)
            got = hasher.digest()
            if got != self._digest:
                raise ChecksumMismatch(f"blob {self._digest.hex()}", self._digest.hex(), got.hex())
            self._size = size
        return self._size

    def _open_sync(self) -> None:
        assert self._file is not None
        if self._stream is not None:
            self._stream.close()  # type: ignore[no-untyped-call]
        self._file.seek(0)
        self._stream = zstandard.ZstdDecompressor().stream_reader(self._file, read_across_frames=True, closefd=False)
        self._pos = 0

    def _close_sync(self) -> None:
        if self._stream is not None:
            self._stream.close()  # type: ignore[no-untyped-call]
            self._stream = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def _read_sync(self, n: int) -> bytes:
        size = self._verify_sync()
        if self._stream is None or self._want < self._pos:
            self._open_sync()
        assert self._stream is not None
        while self._pos < min(self._want, size):  # forward seek: decompress and drop
            skipped = self._stream.read(min(self._want - self._pos, 1 << 20))
            if not skipped:
                break
            self._pos += len(skipped)
        left = size - self._pos
        if self._pos < self._want or left <= 0:
            return b""
        data = self._stream.read(left if n < 0 else min(n, left))
        if not data:
            raise StorageError(f"blob {self._digest.hex()}: object {self._path} changed while being read")
        self._pos += len(data)
        self._want = self._pos
        return data

    async def _run(self, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(fn)
        except zstandard.ZstdError as e:
            raise StorageError(f"blob {self._digest.hex()}: object {self._path}: cannot decompress: {e}") from None
        except FileNotFoundError:
            raise StorageError(f"blob {self._digest.hex()}: object {self._path} vanished") from None

    async def read(self, n: int = -1) -> bytes:
        if n == 0:
            return b""
        return await self._run(lambda: self._read_sync(n))

    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        size = await self._run(self._verify_sync) if whence == io.SEEK_END else 0
        self._want = resolve_seek(self._want, size, offset, whence)
        return self._want

    def tell(self) -> int:
        return self._want

    async def close(self) -> None:
        await asyncio.to_thread(self._close_sync)

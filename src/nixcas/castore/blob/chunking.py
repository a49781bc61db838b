"""Content-defined chunking and the chunk checks shared by object-store backends.

Blobs are cut with FastCDC 2020 (``pyfastcdc``) using the snix parameters:
average 256 KiB, minimum avg/2, maximum 2·avg, normalisation level 1, gear
seed 0.  :class:`Chunker` is push-based (bytes arrive from ``write`` calls)
and keeps at most :data:`CUT_THRESHOLD` bytes: it cuts whenever that much is
buffered and keeps back the last, possibly unfinished, chunk.  A FastCDC cut
point depends only on the bytes from the chunk's start up to the cut, so
every chunk that ends before the buffer's end is exactly the chunk a
one-pass stream chunker (snix's ``AsyncStreamCDC``) produces.

Chunks are read back with :func:`decompress_chunk` (bounded: a chunk never
expands beyond the size its index declares) and :func:`check_chunk`.  Nothing
here knows where objects live; ``local.py`` (and a later S3 backend) supply
the I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import zstandard

from nixcas.castore.blob.base import ChunkMeta, check_chunk
from nixcas.castore.digest import B3Digest
from nixcas.errors import ConfigurationError, StorageError

if TYPE_CHECKING:
    from pyfastcdc import FastCDC

__all__ = [
    "AVG_CHUNK_SIZE",
    "CHUNK_TRANSFER_LIMIT",
    "EMPTY_BLOB",
    "CUT_THRESHOLD",
    "MAX_AVG_CHUNK_SIZE",
    "MAX_CHUNK_SIZE",
    "MAX_INDEX_CHUNK_SIZE",
    "MIN_AVG_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "Chunker",
    "check_chunk",
    "check_avg_chunk_size",
    "check_chunk_list",
    "compressed_bound",
    "cut",
    "decompress_at_most",
    "decompress_chunk",
]

AVG_CHUNK_SIZE = 256 << 10
"""snix's default ``avg_chunk_size`` (262 144 bytes)."""
MIN_CHUNK_SIZE = AVG_CHUNK_SIZE // 2
"""A blob of at most this many bytes is always a single chunk."""
MAX_CHUNK_SIZE = AVG_CHUNK_SIZE * 2
"""The largest chunk the writer produces."""
CUT_THRESHOLD = 2 * MAX_CHUNK_SIZE
""":class:`Chunker` cuts once this many bytes are buffered (the held-back tail, ~1/4 of it, is scanned again)."""
MIN_AVG_CHUNK_SIZE = 1 << 10
MAX_AVG_CHUNK_SIZE = 2 << 20
"""The ``avg_chunk_size`` range accepted (pyfastcdc's; the maximum chunk is twice the average)."""
MAX_INDEX_CHUNK_SIZE = 64 << 20
"""The largest chunk an index may declare (read whole into memory, so it is bounded; snix's max is 2·avg)."""
CHUNK_TRANSFER_LIMIT = 4 * MAX_AVG_CHUNK_SIZE
"""The largest chunk snix's ``ChunkStoreService`` moves here (8 MiB: twice the largest chunk FastCDC cuts at
the largest average allowed): ``PutChunk`` takes, ``GetChunk`` sends and a ``BlobMeta`` declares no larger
chunk, so each call holds at most one such chunk in memory."""
EMPTY_BLOB = B3Digest(bytes.fromhex("af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"))
"""The BLAKE3 of no bytes: the one blob whose ``BlobMeta`` lists no chunk."""


def check_avg_chunk_size(avg: int, where: str) -> None:
    """Refuse an ``avg_chunk_size`` that is not a power of two within the supported range."""
    if not (MIN_AVG_CHUNK_SIZE <= avg <= MAX_AVG_CHUNK_SIZE and avg & (avg - 1) == 0):
        raise ConfigurationError(
            f"{where}: avg_chunk_size must be a power of two from {MIN_AVG_CHUNK_SIZE} to {MAX_AVG_CHUNK_SIZE}"
        )


def _fastcdc(avg: int) -> FastCDC:
    from pyfastcdc import FastCDC  # loaded by the first write: readers never cut

    return FastCDC(avg, min_size=avg // 2, max_size=avg * 2, normalized_chunking=1, seed=0)


def cut(data: bytes | memoryview, avg: int = AVG_CHUNK_SIZE) -> list[memoryview]:
    """``data`` cut into chunks (views into it)."""
    if len(data) <= avg // 2:
        return [memoryview(data)] if len(data) else []
    return [c.data for c in _fastcdc(avg).cut_buf(data)]


class Chunker:
    """Push-based FastCDC 2020: :meth:`feed` bytes, get back the chunks that are final."""

    def __init__(self, avg: int = AVG_CHUNK_SIZE) -> None:
        self._cdc = _fastcdc(avg)
        self._threshold = max(CUT_THRESHOLD, 2 * self._cdc.max_size)
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes held back (at most the cut threshold plus one write)."""
        return len(self._buffer)

    def feed(self, data: bytes | memoryview) -> list[memoryview]:
        """Add ``data``; the chunks now known to be final (the held-back tail excluded).

        The chunks are views into a buffer the chunker no longer writes to:
        valid until the caller drops them, without a copy.
        """
        self._buffer += data
        if len(self._buffer) < self._threshold:
            return []
        return self._cut(final=False)

    def finish(self) -> list[memoryview]:
        """The remaining chunks at the end of the blob."""
        return self._cut(final=True)

    def _cut(self, *, final: bool) -> list[memoryview]:
        buffer = self._buffer
        if not buffer:
            return []
        chunks = [c.data for c in self._cdc.cut_buf(buffer)]
        keep = 0 if final else len(chunks[-1])
        # A new buffer for what follows; the old one lives on under the views handed out.
        self._buffer = buffer[len(buffer) - keep :] if keep else bytearray()
        return chunks if final else chunks[:-1]


def check_chunk_list(digest: B3Digest, chunks: Sequence[ChunkMeta], where: str) -> None:
    """Reject chunk lists with empty chunks or chunks too large to hold in memory."""
    for i, c in enumerate(chunks):
        if not 0 < c.size <= MAX_INDEX_CHUNK_SIZE:
            raise StorageError(
                f"{where}: blob {digest.hex()}: chunk {i} declares {c.size} bytes (allowed: 1..{MAX_INDEX_CHUNK_SIZE})"
            )


def compressed_bound(size: int) -> int:
    """The largest single zstd frame holding ``size`` bytes (``ZSTD_COMPRESSBOUND`` plus header/checksum slack)."""
    return size + (size >> 8) + ((((128 << 10) - size) >> 11) if size < (128 << 10) else 0) + 64


def decompress_at_most(dctx: zstandard.ZstdDecompressor, compressed: bytes, cap: int) -> bytes | None:
    """All bytes of the zstd frames in ``compressed`` if there are at most ``cap``; else ``None``.

    Never produces more than ``cap + 1`` bytes: a frame header recording a
    larger size is refused before decompressing, one recording its size is
    held to it by libzstd, and one that does not is read until ``cap + 1``
    bytes.  :class:`zstandard.ZstdError` propagates.
    """
    content_size = zstandard.frame_content_size(compressed)
    if content_size > cap:
        return None
    if content_size >= 0:  # libzstd holds the frame to exactly this size
        return dctx.decompress(compressed, max_output_size=cap, allow_extra_data=False)
    parts: list[bytes] = []
    got = 0
    with dctx.stream_reader(compressed, read_across_frames=True) as stream:
        while got <= cap:
            block = stream.read(cap + 1 - got)
            if not block:
                return b"".join(parts)
            parts.append(block)
            got += len(block)
    return None


def decompress_chunk(dctx: zstandard.ZstdDecompressor, compressed: bytes, size: int, where: str) -> bytes:
    """The bytes of one compressed chunk, which must be exactly ``size`` long (bounded, see above)."""
    try:
        declared = zstandard.frame_content_size(compressed)
        if declared >= 0 and declared != size:
            raise StorageError(f"{where}: chunk expands to {declared} bytes, its index declares {size}")
        data = decompress_at_most(dctx, compressed, size)
    except zstandard.ZstdError as e:
        raise StorageError(f"{where}: cannot decompress chunk: {e}") from None
    if data is None:
        raise StorageError(f"{where}: chunk expands beyond the {size} bytes its index declares")
    return data

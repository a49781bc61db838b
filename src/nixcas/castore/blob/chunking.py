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

import zstandard
from pyfastcdc import FastCDC

from nixcas.castore.blob.base import ChunkMeta, check_chunk
from nixcas.castore.digest import B3Digest
from nixcas.errors import StorageError

__all__ = [
    "AVG_CHUNK_SIZE",
    "CUT_THRESHOLD",
    "MAX_CHUNK_SIZE",
    "MAX_INDEX_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "Chunker",
    "check_chunk",
    "check_chunk_list",
    "cut",
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
MAX_INDEX_CHUNK_SIZE = 64 << 20
"""The largest chunk an index may declare (read whole into memory, so it is bounded; snix's max is 2·avg)."""


def _fastcdc(avg: int) -> FastCDC:
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

    def feed(self, data: bytes | memoryview) -> list[bytes]:
        """Add ``data``; the chunks now known to be final (the held-back tail excluded)."""
        self._buffer += data
        if len(self._buffer) < self._threshold:
            return []
        return self._cut(final=False)

    def finish(self) -> list[bytes]:
        """The remaining chunks at the end of the blob."""
        return self._cut(final=True)

    def _cut(self, *, final: bool) -> list[bytes]:
        buffer = self._buffer
        if not buffer:
            return []
        chunks = [c.data for c in self._cdc.cut_buf(buffer)]
        keep = 0 if final else len(chunks[-1])
        out = [bytes(c) for c in (chunks if final else chunks[:-1])]
        del chunks
        self._buffer = buffer[len(buffer) - keep :] if keep else bytearray()
        return out


def check_chunk_list(digest: B3Digest, chunks: Sequence[ChunkMeta], where: str) -> None:
    """Reject chunk lists with empty chunks or chunks too large to hold in memory."""
    for i, c in enumerate(chunks):
        if not 0 < c.size <= MAX_INDEX_CHUNK_SIZE:
            raise StorageError(
                f"{where}: blob {digest.hex()}: chunk {i} declares {c.size} bytes (allowed: 1..{MAX_INDEX_CHUNK_SIZE})"
            )


def decompress_chunk(dctx: zstandard.ZstdDecompressor, compressed: bytes, size: int, where: str) -> bytes:
    """The bytes of one compressed chunk, which must be exactly ``size`` long.

    Bounded: at most ``size + 1`` bytes are ever produced, whatever the
    frame claims, so a zstd bomb costs nothing.  A frame header that records
    another size is refused before decompressing.
    """
    try:
        declared = zstandard.frame_content_size(compressed)
        if declared >= 0:
            if declared != size:
                raise StorageError(f"{where}: chunk expands to {declared} bytes, its index declares {size}")
            # libzstd holds a frame to the content size its header records.
            return dctx.decompress(compressed, max_output_size=size, allow_extra_data=False)
        parts: list[bytes] = []
        got = 0
        with dctx.stream_reader(compressed, read_across_frames=True) as stream:
            while got <= size:
                block = stream.read(size + 1 - got)
                if not block:
                    break
                parts.append(block)
                got += len(block)
    except zstandard.ZstdError as e:
        raise StorageError(f"{where}: cannot decompress chunk: {e}") from None
    if got > size:
        raise StorageError(f"{where}: chunk expands beyond the {size} bytes its index declares")
    return b"".join(parts)

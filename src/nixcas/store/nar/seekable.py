"""A seekable reader over the NAR of a castore node (for HTTP range requests and the like).

:meth:`SeekableNar.open` fetches and validates the directory closure and lays
the NAR out as segments: literal framing bytes held in memory, and holes for
file contents (blob digest, size, offset).  The total size is known at once,
without reading any blob.  Reads serve literals from memory and open blob
readers lazily: reading on inside the same blob continues with its reader,
seeking inside it re-seeks that reader, and moving to another blob opens that
blob's reader at the right offset.  Every blob must yield exactly its
declared size.
"""

from __future__ import annotations

import bisect
import io

from nixcas.castore.blob.base import BlobReader, BlobService, resolve_seek
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.nodes import Node
from nixcas.store.nar.plan import Hole, fetch_closure, iter_plan

__all__ = ["SeekableNar"]


class SeekableNar(BlobReader):
    """A :class:`~nixcas.castore.blob.base.BlobReader` over a rendered NAR; ``size`` is the NAR size.

    ``read(n)`` returns ``n`` bytes unless the end is reached (``b""`` at or
    past the end).  Seeking past the end is allowed and clamps to ``size``.
    At most one blob reader is open at a time; :meth:`close` closes it.
    """

    size: int
    """Total NAR size in bytes."""

    def __init__(self, blobs: BlobService, segments: list[bytes | Hole]) -> None:
        """Use :meth:`open`; ``segments`` is a NAR plan (see :func:`~nixcas.store.nar.plan.iter_plan`)."""
        self._blobs = blobs
        self._segments = segments
        self._starts: list[int] = []
        total = 0
        for seg in segments:
            self._starts.append(total)
            total += len(seg) if isinstance(seg, bytes) else seg.size
        self.size = total
        self._pos = 0
        self._index = -1  # segment whose blob reader is open
        self._reader: BlobReader | None = None
        self._reader_pos = 0  # where that reader stands inside its blob

    @classmethod
    async def open(cls, node: Node, blobs: BlobService, directories: DirectoryService) -> SeekableNar:
        """Fetch and validate the closure of ``node`` and lay out its NAR (no blob is read)."""
        closure = await fetch_closure(node, directories)
        return cls(blobs, list(iter_plan(node, closure)))

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes from the current position (everything remaining for ``n < 0``)."""
        remaining = self.size - self._pos
        if n < 0 or n > remaining:
            n = remaining
        if n <= 0:
            return b""
        parts: list[bytes] = []
        index = bisect.bisect_right(self._starts, self._pos) - 1
        while n > 0:
            seg = self._segments[index]
            offset = self._pos - self._starts[index]
            if isinstance(seg, bytes):
                piece = seg[offset : offset + n]
            else:
                piece = await self._read_blob(index, seg, offset, n)
            parts.append(piece)
            self._pos += len(piece)
            n -= len(piece)
            if self._pos - self._starts[index] >= (len(seg) if isinstance(seg, bytes) else seg.size):
                index += 1
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _read_blob(self, index: int, hole: Hole, offset: int, n: int) -> bytes:
        reader = self._reader
        if reader is None or self._index != index:
            await self._drop_reader()
            reader = await self._blobs.open_read(hole.digest)
            if reader is None:
                raise hole.missing()
            self._reader, self._index, self._reader_pos = reader, index, 0
        if self._reader_pos != offset:
            await reader.seek(offset)
            self._reader_pos = offset
        want = min(n, hole.size - offset)
        data = await reader.read(want)
        if not data:
            raise hole.short(offset)
        if len(data) > want:
            raise hole.long()
        self._reader_pos += len(data)
        if self._reader_pos == hole.size and await reader.read(1):
            raise hole.long()
        return data

    async def _drop_reader(self) -> None:
        reader, self._reader, self._index = self._reader, None, -1
        if reader is not None:
            await reader.close()

    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move to ``offset`` relative to ``whence``, clamped to ``size``; no I/O happens here."""
        self._pos = min(resolve_seek(self._pos, self.size, offset, whence), self.size)
        return self._pos

    def tell(self) -> int:
        """The current position."""
        return self._pos

    async def close(self) -> None:
        """Close the open blob reader, if any."""
        await self._drop_reader()

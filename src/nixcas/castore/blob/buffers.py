"""Read buffers reused once no view of them is alive: for readers that hand out views of what they read.

Fresh memory is costly (the allocator zeroes it, the kernel faults it in page
by page), about as much as reading the bytes into it.  A reader that reads
into a buffer taken from :class:`ReusedBuffers` and hands out views of it may
give the buffer back at once: it is taken again only when nothing refers to
its bytes any more (a consumer, a transport that queues a view, may keep
them as long as it likes).
"""

from __future__ import annotations

import threading

TYPE_CHECKING = False  # not typing's
if TYPE_CHECKING:
    from collections.abc import Sequence

    from nixcas.castore.blob.base import BulkReads, ChunkMeta

__all__ = ["ReusedBuffers", "chunk_room", "read_in_rooms"]


def _unshared(buffer: bytearray) -> bool:
    """Whether no view of ``buffer`` is alive (a bytearray with views cannot shrink: probe by shrinking)."""
    try:
        last = buffer.pop()
    except BufferError:
        return False
    buffer.append(last)
    return True


class ReusedBuffers:
    """Buffers given back, taken again (the smallest that fits) once no view of them is alive; at most ``keep``
    bytes of them are kept.  Thread-safe: readers of several threads and event loops share one."""

    def __init__(self, keep: int) -> None:
        self._free: list[bytearray] = []
        self._keep = keep
        self._lock = threading.Lock()

    def take(self, need: int) -> bytearray:
        """A buffer of at least ``need`` bytes (a kept one without views, else a new one)."""
        with self._lock:
            for k, buffer in enumerate(self._free):
                if len(buffer) >= need and _unshared(buffer):
                    return self._free.pop(k)
        return bytearray(need)

    def give(self, buffer: bytearray) -> None:
        """Keep ``buffer`` for a later :meth:`take` (views of it may still be alive)."""
        with self._lock:
            self._free.append(buffer)
            self._free.sort(key=len)
            while sum(map(len, self._free)) > self._keep:
                self._free.pop(0)


def chunk_room(size: int) -> int:
    """Room to read a chunk of ``size`` bytes in place: its stored frame (block headers) is a little bigger."""
    return size + (size >> 7) + (4 << 10)


def read_in_rooms(reads: BulkReads, chunks: Sequence[ChunkMeta], buffer: bytearray) -> list[bytes | memoryview]:
    """Chunks read and checked (:meth:`BulkReads.read_chunk_into`) into consecutive rooms of ``buffer``, in order,
    up to the first one the batched reads cannot serve (the caller reads the rest another way).

    ``buffer`` holds at least the sum of the chunks' :func:`chunk_room`; the pieces are views of it or bytes.
    """
    view = memoryview(buffer)
    pieces: list[bytes | memoryview] = []
    at = 0
    for chunk in chunks:
        room = chunk_room(chunk.size)
        data = reads.read_chunk_into(bytes(chunk.digest), chunk.size, view[at : at + room])
        if data is None:
            break
        pieces.append(data)
        at += room
    return pieces

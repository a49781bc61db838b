"""The NAR of a tree hashed while it is walked (:class:`NarHasher`), with nothing but the walk loaded.

A walk in a process of its own (:mod:`nixcas.castore.walkproc`) runs this
observer there: it loads the NAR's wire format and :mod:`hashlib`, not the
services.
"""

from __future__ import annotations

import hashlib
import os
import queue
import struct
import threading

from nixcas.castore.walk import Stamp, stamp_of
from nixcas.errors import IngestError
from nixcas.store.nar.wire import (
    ENTRY_PREFIX,
    NAR_MAGIC,
    NODE_DIRECTORY,
    NODE_EXECUTABLE,
    NODE_REGULAR,
    NODE_SYMLINK,
    TOK_CLOSE,
    TOK_NODE,
    encode_str,
    padding,
    u64_le,
)

__all__ = ["NarHasher"]

_CLOSE2 = TOK_CLOSE + TOK_CLOSE
"""A node's ``)`` and that of the entry holding it."""
_FILE_NODE = (TOK_NODE + NODE_REGULAR, TOK_NODE + NODE_EXECUTABLE)
"""What follows a file entry's name, by its executable bit."""
_PADS = tuple(bytes(n) for n in range(8))
"""The zero padding after ``n`` bytes, by ``-n & 7``."""
_u64 = struct.Struct("<Q").pack

_READ_BLOCK = 1 << 20

_FLUSH_BYTES = 1 << 20
_FLUSH_PIECES = 4096
"""The walk hands pieces to the hashing thread in batches of about this many bytes or pieces."""


class _Large:
    """A large file to read into the hash: its framing before and after, and the stamp it must keep."""

    __slots__ = ("fs_path", "head", "size", "stamp", "tail")

    def __init__(self, head: bytes, fs_path: bytes, size: int, stamp: Stamp, tail: bytes) -> None:
        self.head = head
        self.fs_path = fs_path
        self.size = size
        self.stamp = stamp
        self.tail = tail


class NarHasher:
    """A :class:`~nixcas.castore.ingest.WalkObserver` that hashes the NAR of the tree being imported.

    The walk presents the tree in NAR order, so the archive is hashed as it is
    read, from the very bytes that are imported: no second pass over the
    small files and nothing read back from the store.  The hashing runs on a
    thread of its own, fed in order through a queue (at most ``budget`` bytes
    of small files waiting), so the walk goes on reading while large files
    are hashed; a large file is read there in blocks, and must keep the stamp
    the walk saw (the importer checks the same stamp around its own read).
    Call :meth:`result` once the walk is done, and :meth:`close` in any case.
    """

    def __init__(self, budget: int = 32 << 20) -> None:
        self._sha = hashlib.sha256(NAR_MAGIC)
        self._size = len(NAR_MAGIC)
        self._depth = 0
        self._budget = budget
        self._waiting = 0  # bytes queued, not hashed yet
        self._cond = threading.Condition()
        self._queue: queue.SimpleQueue[tuple[list[bytes | _Large], int] | None] = queue.SimpleQueue()
        self._pending: list[bytes | _Large] = []  # pieces not handed over yet (one hand-off per batch)
        self._pending_cost = 0
        self._error: IngestError | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="nar-hasher", daemon=True)
        self._thread.start()

    # -- the walker's side -------------------------------------------------------------

    def _flush(self) -> None:
        """Hand the pending pieces to the hashing thread (waiting while it is ``budget`` bytes behind)."""
        if not self._pending:
            return
        batch, cost = self._pending, self._pending_cost
        self._pending, self._pending_cost = [], 0
        with self._cond:
            while self._waiting and self._waiting + cost > self._budget and not self._closed:
                self._cond.wait()
            if self._closed:
                raise IngestError("import ended")
            self._waiting += cost
        self._queue.put((batch, cost))

    def _put(self, *pieces: bytes, cost: int = 0) -> None:
        self._pending.extend(pieces)
        self._pending_cost += cost
        if self._pending_cost >= _FLUSH_BYTES or len(self._pending) >= _FLUSH_PIECES:
            self._flush()

    def _entry(self, name: bytes | None) -> bytes:
        return b"" if name is None else ENTRY_PREFIX + encode_str(name) + TOK_NODE

    def directory(self, name: bytes | None) -> None:
        self._depth += 1
        self._put(self._entry(name) + NODE_DIRECTORY)

    def leave(self) -> None:
        # the directory's ")", and the ")" of the entry that holds it (the root has none)
        self._depth -= 1
        self._put(TOK_CLOSE if self._depth == 0 else _CLOSE2)

    def symlink(self, name: bytes | None, target: bytes) -> None:
        close = TOK_CLOSE if name is None else _CLOSE2
        self._put(self._entry(name) + NODE_SYMLINK + encode_str(target) + close)

    def file(
        self, name: bytes | None, executable: bool, size: int, data: bytes | None, fs_path: bytes, stamp: Stamp
    ) -> None:
        if data is not None and name is not None:  # a small file in a directory, most entries: framed in one step
            pending = self._pending
            n = len(name)
            pending += (ENTRY_PREFIX, _u64(n), name, _PADS[-n & 7], _FILE_NODE[executable], _u64(size))
            pending += (data, _PADS[-size & 7], _CLOSE2)
            self._pending_cost += size
            if self._pending_cost >= _FLUSH_BYTES or len(pending) >= _FLUSH_PIECES:
                self._flush()
            return
        head = self._entry(name) + (NODE_EXECUTABLE if executable else NODE_REGULAR) + u64_le(size)
        tail = padding(size) + (TOK_CLOSE if name is None else _CLOSE2)
        if data is not None:
            self._put(head, data, tail, cost=len(data))
        else:
            self._pending.append(_Large(head, fs_path, size, stamp, tail))
            self._flush()  # its hashing starts now, while the walk goes on; and it ends its batch (see _run)

    # -- the hashing thread ---------------------------------------------------------------

    def _run(self) -> None:
        while (handed := self._queue.get()) is not None:
            batch, cost = handed
            try:
                if self._error is None:  # failed already: drain, hashing nothing
                    # A large file ends its batch (:meth:`file` hands it over at once), so the pieces before it
                    # are bytes, hashed joined: one GIL release per batch, and no Python step per piece.
                    last = batch[-1] if batch else None
                    if isinstance(last, _Large):
                        batch[-1] = last.head
                    self._add(b"".join(batch))  # type: ignore[arg-type]  # bytes only now (see above)
                    if isinstance(last, _Large):
                        self._read(last)
                        self._add(last.tail)
            except IngestError as e:
                self._error = e
            except Exception as e:  # reported by result(), as an import error
                self._error = IngestError(f"hashing the NAR: {e}")
            finally:
                if cost:
                    with self._cond:
                        self._waiting -= cost
                        self._cond.notify_all()

    def _add(self, data: bytes) -> None:
        self._sha.update(data)
        self._size += len(data)

    def _read(self, item: _Large) -> None:
        where = os.fsdecode(item.fs_path)
        changed = IngestError(f"{where}: changed while being imported; retry")
        try:
            fd = os.open(item.fs_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as e:
            raise IngestError(f"{where}: cannot read: {e.strerror}") from None
        try:
            if stamp_of(os.fstat(fd)) != item.stamp:
                raise changed
            remaining = item.size
            while remaining > 0:
                block = os.read(fd, min(_READ_BLOCK, remaining))
                if not block:
                    raise changed
                self._sha.update(block)
                remaining -= len(block)
            if stamp_of(os.fstat(fd)) != item.stamp:
                raise changed
        except OSError as e:
            raise IngestError(f"{where}: cannot read: {e.strerror}") from None
        finally:
            os.close(fd)
        self._size += item.size

    # -- the importer's side ------------------------------------------------------------------

    def result(self) -> tuple[int, bytes]:
        """``(nar_size, nar_sha256)`` of what was walked (blocks until it is hashed)."""
        self._flush()
        self._queue.put(None)
        self._thread.join()
        with self._cond:
            self._closed = True
        if self._error is not None:
            raise self._error
        return self._size, self._sha.digest()

    def close(self) -> None:
        """Stop the hashing thread (after :meth:`result`, or instead of it when the import failed)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._error = self._error or IngestError("import ended")  # hash nothing more
            self._queue.put(None)
            self._thread.join()

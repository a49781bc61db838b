"""Blobs read back from the files they were just imported from.

An importer that needs the bytes again right after storing them (the Nix
layer hashes the NAR of what it imported) should not fetch them from the
store: against object storage that is one ``GET`` per file and every byte
over the network again.  :class:`SourceBlobService` serves those digests from
the source files instead, and everything else from the store.  The base
class verifies every full read against the digest, so a file that changed
since it was imported fails the read with
:class:`~nixcas.errors.ChecksumMismatch` instead of yielding other bytes.
"""

from __future__ import annotations

import asyncio
import io
import os
import stat
from collections.abc import Mapping

from nixcas.castore.blob.base import BlobChecker, BlobReader, BlobService, BlobWriter, ChunkMeta, resolve_seek
from nixcas.castore.digest import B3Digest

__all__ = ["SourceBlobService"]

READ_BLOCK = 1 << 20


class SourceBlobService(BlobService):
    """Reads ``sources`` (digest → file path) from the filesystem, all else from ``store`` (writes too)."""

    def __init__(self, sources: Mapping[B3Digest, bytes], store: BlobService) -> None:
        self.sources = sources
        self.store = store

    def __repr__(self) -> str:
        return f"SourceBlobService({len(self.sources)} files, {self.store!r})"

    async def has(self, digest: B3Digest) -> bool:
        return digest in self.sources or await self.store.has(digest)

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        return await self.store.chunks(digest)

    async def _open_read(self, digest: B3Digest) -> BlobReader | None:
        path = self.sources.get(digest)
        if path is not None:
            opening = asyncio.ensure_future(asyncio.to_thread(_open_regular, path))
            try:
                fd = await asyncio.shield(opening)
            except asyncio.CancelledError:
                opening.add_done_callback(_close_opened)  # the thread still runs: close what it opens
                raise
            if fd >= 0:
                return _FileReader(fd)
        return await self.store._open_read(digest)  # verified once, by this service's base class

    async def _read_many(
        self, max_sizes: Mapping[B3Digest, int], checker: BlobChecker, parallel: int
    ) -> dict[B3Digest, bytes]:
        # Many small files (a NAR's): read and verified in one worker-thread round trip;
        # the rest (too big, gone, not from this import) through the store.
        def read_sources() -> tuple[dict[B3Digest, bytes], dict[B3Digest, int]]:
            found: dict[B3Digest, bytes] = {}
            rest: dict[B3Digest, int] = {}
            for digest, cap in max_sizes.items():
                path = self.sources.get(digest)
                data = _read_at_most(path, cap) if path is not None else None
                if data is None:
                    rest[digest] = cap
                elif len(data) <= cap:  # (larger: left out, as read_many does)
                    found[digest] = checker.check(digest, data)
            return found, rest

        found, rest = await asyncio.to_thread(read_sources)
        if rest:
            found.update(await self.store.read_many(rest, parallel=parallel))
        return found

    async def open_write(self, expected_size: int | None = None) -> BlobWriter:
        return await self.store.open_write(expected_size)


_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK


def _open_regular(path: bytes) -> int:
    """A descriptor of the regular file at ``path``; ``-1`` if it is gone, unreadable or no longer a
    regular file (replaced by a symlink or a FIFO since: the store has the bytes)."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError:
        return -1
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return -1
    return fd


def _close_opened(opening: asyncio.Future[int]) -> None:
    if not opening.cancelled() and opening.exception() is None and opening.result() >= 0:
        os.close(opening.result())


def _read_at_most(path: bytes, cap: int) -> bytes | None:
    """At most ``cap + 1`` bytes of the regular file (``None``: it cannot be read)."""
    fd = _open_regular(path)
    if fd < 0:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read(cap + 1)


class _FileReader(BlobReader):
    """A positioned reader over an open file descriptor (reads in a worker thread)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pos = 0

    async def read(self, n: int = -1) -> bytes:
        want = READ_BLOCK if n < 0 else n
        if want == 0:
            return b""
        if n < 0:
            parts = []
            while block := await asyncio.to_thread(os.pread, self._fd, READ_BLOCK, self._pos):
                parts.append(block)
                self._pos += len(block)
            return b"".join(parts)
        data = await asyncio.to_thread(os.pread, self._fd, want, self._pos)
        self._pos += len(data)
        return data

    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        size = os.fstat(self._fd).st_size if whence == io.SEEK_END else 0
        self._pos = resolve_seek(self._pos, size, offset, whence)
        return self._pos

    def tell(self) -> int:
        return self._pos

    async def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

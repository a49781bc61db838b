"""Synchronous reads of the local-disk blob store, batched ones included (:class:`~nixcas.castore.blob.base.BulkReads`).

What ``nixcas dump-path`` reads blobs through: runs of small blobs, whole
blobs into a caller's buffer (a frame of raw blocks is turned into its
content in place), chunk by chunk; each checked against its digest before a
byte is returned.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence

import blake3
import zstandard

from nixcas.castore.blob.base import (
    BlobChecker,
    BulkReads,
    ChunkMeta,
)
from nixcas.castore.blob.chunking import (
    check_chunk_list,
    compressed_bound,
    decompress_at_most,
)
from nixcas.castore.blob.wholeread import object_path, read_chunks_into
from nixcas.castore.digest import EMPTY_DIGEST, B3Digest
from nixcas.castore.objectstore.codec import decode_chunk
from nixcas.castore.objectstore.disk import READ_ONLY
from nixcas.castore.objectstore.layout import (
    decode_index,
)
from nixcas.castore.objectstore.scan import DiskSweep
from nixcas.errors import ChecksumMismatch, StorageError

__all__ = ["WHOLE_MAX", "DiskReads"]

WHOLE_MAX = 64 << 20
"""The largest blob :meth:`LocalBlobService.read_whole` reads whole (and hashes once) before returning it."""


class _Slow:
    """Marker: this blob needs the general (streaming, per-blob) read path."""


_SLOW = _Slow()


class DiskReads(DiskSweep, BulkReads):
    """The synchronous reads of the local-disk blob store (worker threads), and its :class:`BulkReads`."""

    whole_max = WHOLE_MAX
    avg_chunk_size: int

    # -- reading (worker threads) ----------------------------------------------

    def _read_small_sync(self, dctx: zstandard.ZstdDecompressor, digest: B3Digest, cap: int) -> bytes | _Slow | None:
        """A single-chunk blob's bytes if it has at most ``cap`` of them; ``None`` if missing or larger.

        The fast path of :meth:`read_many`: one ``open``, one ``read``, one
        ``decompress`` (with a reused context) per blob.  The frame header's
        content size is checked against ``cap`` before anything is
        decompressed, and the output is bounded by it (a frame that does not
        record its size is decompressed to at most ``cap + 1`` bytes).
        Anything unusual (a multi-chunk blob, an index without its chunk, a
        header frame followed by more frames, a compressed file too big for
        ``cap``, a decompression error) gives :data:`_SLOW`: the per-blob
        path reads it (bounded) and reports errors exactly as
        :meth:`open_read` does.
        """
        try:
            fd = os.open(self._chunk_path(digest), READ_ONLY)
        except FileNotFoundError:
            try:
                index_size = os.stat(self._index_path(digest)).st_size
            except FileNotFoundError:
                return None
            if index_size == 0 and digest == EMPTY_DIGEST:
                return b""
            return _SLOW  # chunk list, or an index without its chunk object
        try:
            size = os.fstat(fd).st_size
            if size > compressed_bound(cap):
                return _SLOW
            parts = []
            got = 0
            while got < size:
                part = os.read(fd, size - got)
                if not part:
                    break
                parts.append(part)
                got += len(part)
        finally:
            os.close(fd)
        compressed = parts[0] if len(parts) == 1 else b"".join(parts)
        try:
            return decompress_at_most(dctx, compressed, cap)
        except zstandard.ZstdError:
            return _SLOW

    def _read_many_sync(
        self, max_sizes: Mapping[B3Digest, int], checker: BlobChecker
    ) -> tuple[dict[B3Digest, bytes], list[B3Digest]]:
        """The blobs read (and verified) on the fast path, and those that need the per-blob path."""
        dctx = self._decompressor()
        found: dict[B3Digest, bytes] = {}
        slow: list[B3Digest] = []
        for digest, cap in max_sizes.items():
            data = self._read_small_sync(dctx, digest, cap)
            if isinstance(data, bytes):
                found[digest] = checker.check(digest, data)
            elif data is _SLOW:
                slow.append(digest)
        return found, slow

    def _chunks_sync(self, digest: B3Digest) -> list[ChunkMeta] | None:
        try:
            with open(self._index_path(digest), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return [] if os.path.exists(self._chunk_path(digest)) else None
        chunks = decode_index(digest, data)
        check_chunk_list(digest, chunks, str(self))
        return chunks

    def _read_chunk_sync(self, chunk: ChunkMeta) -> bytes | None:
        try:
            with open(self._chunk_path(chunk.digest), "rb") as f:
                compressed = f.read(compressed_bound(chunk.size) + 1)
        except FileNotFoundError:
            return None
        return decode_chunk(self._decompressor(), chunk, compressed, str(self))

    # -- BulkReads (``nixcas dump-path``) -----------------------------------------

    def bulk_reads(self) -> BulkReads:
        return self

    def read_run(self, wanted: Sequence[tuple[bytes, int]], buffer: memoryview) -> list[bytes | memoryview] | None:
        dctx = self._decompressor()
        out: list[bytes | memoryview] = []
        try:
            for raw, size in wanted:
                data = self._read_small_sync(dctx, B3Digest(raw), size)
                if not isinstance(data, bytes) or len(data) != size or blake3.blake3(data).digest() != raw:
                    return None
                out.append(data)
        except (OSError, StorageError, zstandard.ZstdError):
            return None
        return out

    def read_whole(self, digest: bytes, size: int, buffer: memoryview) -> bytes | memoryview | None:
        if not 0 < size <= self.whole_max:
            return None
        try:
            chunks = self._chunks_sync(B3Digest(digest))
            if chunks is None:
                return None
            return self._read_whole_sync(digest, size, chunks or [ChunkMeta(B3Digest(digest), size)], buffer)
        except (OSError, StorageError, zstandard.ZstdError):
            return None

    def will_read_chunks(self, digests: Sequence[bytes]) -> None:
        for digest in digests:
            try:
                fd = os.open(object_path(self._root, "chunks", digest), READ_ONLY)
            except OSError:
                continue  # not a chunk object (a pack row), or missing: its read says so
            try:
                with contextlib.suppress(OSError):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def read_chunk_into(self, digest: bytes, size: int, buffer: memoryview) -> bytes | memoryview | None:
        """The chunk object itself (no blob index looked for first); else as :meth:`read_whole` (a chunk
        kept in another form, e.g. as a packed blob)."""
        if 0 < size <= self.whole_max:
            try:
                data = read_chunks_into(self._root, digest, size, [(digest, size)], buffer, self._decompressor)
            except (OSError, StorageError, zstandard.ZstdError):
                data = None
            if data is not None:
                return data
        return self.read_whole(digest, size, buffer)

    def read_chunks(self, digest: bytes, size: int) -> Iterator[bytes] | None:
        try:
            chunks = self._chunks_sync(B3Digest(digest))
        except (OSError, StorageError):
            return None
        if not chunks or sum(c.size for c in chunks) != size:
            return None
        return self._iter_chunks(B3Digest(digest), chunks)

    def _iter_chunks(self, digest: B3Digest, chunks: Sequence[ChunkMeta]) -> Iterator[bytes]:
        """Each chunk read and checked (:meth:`_read_chunk_sync`), the whole blob's BLAKE3 checked at the end."""
        hasher = blake3.blake3()
        for chunk in chunks:
            try:
                data = self._read_chunk_sync(chunk)
            except ChecksumMismatch as e:  # named with its blob: the file it belongs to is found by that
                where = f"{self}: blob {digest.hex()}: chunk {chunk.digest.hex()}"
                raise ChecksumMismatch(where, e.expected, e.got) from None
            if data is None:
                raise StorageError(f"{self}: blob {digest.hex()}: chunk {chunk.digest.hex()} not found")
            hasher.update(data)
            yield data
        got = hasher.digest()
        if got != digest:
            raise ChecksumMismatch(f"{self}: blob {digest.hex()}", digest.hex(), got.hex())

    def _read_whole_sync(
        self, digest: bytes, size: int, chunks: Sequence[ChunkMeta], buffer: memoryview
    ) -> memoryview | None:
        """The chunk objects of a blob read one after another into ``buffer``, then hashed whole.

        Each object is read where its content belongs; a frame of raw blocks (the default store's)
        is turned into its content by moving the payloads down over the block headers, anything
        else is decompressed (bounded) into place; each is hashed right after (while in the CPU's
        cache) into one BLAKE3 of the whole blob, which checks every chunk and the chunk list at
        once, before a byte is returned.
        """
        listed = [(bytes(c.digest), c.size) for c in chunks]
        return read_chunks_into(self._root, digest, size, listed, buffer, self._decompressor)

"""Reading whole blobs of the object layout synchronously, with light imports (``nixcas dump-path``).

A blob of the snix object layout (:mod:`nixcas.castore.blob.local`) is a
chunk object (``chunks/b3/<hex[:4]>/<hex>``, one zstd frame) or an index
(``blobs/b3/…``, a ``StatBlobResponse`` listing the chunks).  What is here
reads one whole into a caller's buffer and checks its BLAKE3 before handing
it back, loading nothing but :mod:`blake3` for the default store's objects:

* :func:`raw_blocks` turns a frame of raw blocks (what the default store
  writes) into its content without a decompressor;
* :func:`parse_index` reads an index in its deterministic encoding without
  protobuf;
* anything else (a compressed chunk, an index in another encoding) loads
  the general code (zstandard, protobuf) and gives the same answer.

:class:`~nixcas.castore.blob.local.LocalBlobService` reads through the same
functions, so the blob service and the command line's fast path
(:mod:`nixcas.cli.fast`) apply the same checks.
"""

from __future__ import annotations

import os
from _thread import get_ident
from collections.abc import Callable, Collection, Sequence

import blake3

TYPE_CHECKING = False  # not typing's: the fast path loads nothing it does not use
if TYPE_CHECKING:
    import sqlite3

    import zstandard

__all__ = [
    "WHOLE_MAX",
    "PackedReads",
    "compressed_bound",
    "object_path",
    "parse_index",
    "pread_into",
    "raw_blocks",
    "read_chunks_into",
    "read_index",
]

READ_ONLY = os.O_RDONLY | os.O_CLOEXEC
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_FCS_BYTES = (0, 2, 4, 8)
_CHUNKS_TAG = 0x12
"""StatBlobResponse.chunks = 2 (length-delimited); in a ChunkMeta digest = 1 (0x0A) and size = 2 (0x10)."""


def object_path(root: str, kind: str, digest: bytes) -> str:
    """``ROOT/<kind>/b3/<hex[0:4]>/<hex>`` (:func:`~nixcas.castore.objectstore.layout.object_key` under ``root``)."""
    h = digest.hex()
    return f"{root}/{kind}/b3/{h[:4]}/{h}"


def pread_into(fd: int, into: memoryview, offset: int) -> int:
    """Fill ``into`` from ``offset`` of ``fd``; the bytes read (fewer only at the end of the file)."""
    got = 0
    while got < len(into):
        n = os.preadv(fd, [into[got:]], offset + got)
        if not n:
            break
        got += n
    return got


def compressed_bound(size: int) -> int:
    """The largest single zstd frame holding ``size`` bytes (``ZSTD_COMPRESSBOUND`` plus header/checksum slack)."""
    return size + (size >> 8) + ((((128 << 10) - size) >> 11) if size < (128 << 10) else 0) + 64


def raw_blocks(data: memoryview, start: int, end: int) -> list[tuple[int, int]] | None:
    """Where the content of ``data[start:end]`` lies if it is one zstd frame of raw blocks: (offset, length) each.

    The default store writes chunk objects as such frames (``STORE_LEVEL``): their content is
    the blocks' payloads as they are, so reading one needs no decompressor and no copy.
    Anything else (compressed or RLE blocks, a dictionary, several frames, trailing bytes,
    a content size that disagrees with the blocks) gives ``None``: zstd decodes it.
    """
    if end - start < 6 or data[start : start + 4] != _ZSTD_MAGIC:
        return None
    descriptor = data[start + 4]
    if descriptor & 0x08 or descriptor & 0x03:  # reserved bit; a dictionary
        return None
    single_segment = descriptor & 0x20
    fcs_len = _FCS_BYTES[descriptor >> 6] or (1 if single_segment else 0)
    pos = start + 5 + (0 if single_segment else 1)
    declared = int.from_bytes(data[pos : pos + fcs_len], "little") + (256 if fcs_len == 2 else 0)
    pos += fcs_len
    blocks: list[tuple[int, int]] = []
    total = 0
    while True:
        if pos + 3 > end:
            return None
        header = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
        size = header >> 3
        pos += 3
        if header & 0x06 or pos + size > end:  # not a raw block, or cut short
            return None
        if size:
            blocks.append((pos, size))
        pos += size
        total += size
        if header & 1:
            break
    if descriptor & 0x04:  # content checksum (BLAKE3 is checked instead)
        pos += 4
    if pos != end or (fcs_len and declared != total):
        return None
    return blocks


def parse_index(data: bytes) -> list[tuple[bytes, int]] | None:
    """The (digest, size) of each chunk of an index in its deterministic encoding; ``None`` for any other bytes.

    Accepted: only ``chunks`` entries, each exactly a 32-byte digest then a
    non-zero size as a shortest varint (what ``encode_index`` writes).  The
    caller decodes anything else with protobuf (:func:`read_index`).
    """
    chunks: list[tuple[bytes, int]] = []
    end = len(data)
    pos = 0
    while pos < end:
        if data[pos] != _CHUNKS_TAG or pos + 2 > end:
            return None
        length = data[pos + 1]
        pos += 2
        stop = pos + length
        # digest: tag, length 32, 32 bytes; size: tag, varint of 1..10 bytes (an entry under 128 bytes)
        if not 36 <= length < 0x80 or stop > end or data[pos : pos + 2] != b"\x0a\x20" or data[pos + 34] != 0x10:
            return None
        digest = data[pos + 2 : pos + 34]
        size = shift = 0
        at = pos + 35
        while at < stop:
            byte = data[at]
            at += 1
            size |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        if at != stop or data[stop - 1] >= 0x80 or not data[stop - 1]:  # cut short, or not the shortest form
            return None
        chunks.append((digest, size))
        pos = stop
    return chunks


def read_index(root: str, digest: bytes) -> list[tuple[bytes, int]] | None:
    """The chunks of blob ``digest`` (``[]``: one chunk object, itself); ``None`` if the layout has no such blob.

    A malformed index is a :class:`~nixcas.errors.StorageError`, as the blob service reports it.
    """
    try:
        with open(object_path(root, "blobs", digest), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return [] if os.path.exists(object_path(root, "chunks", digest)) else None
    chunks = parse_index(data)
    if chunks is None:
        from nixcas.castore.blob.chunking import check_chunk_list
        from nixcas.castore.digest import B3Digest
        from nixcas.castore.objectstore.layout import decode_index

        metas = decode_index(B3Digest(digest), data)
        check_chunk_list(B3Digest(digest), metas, root)
        chunks = [(bytes(c.digest), c.size) for c in metas]
    return chunks


def read_chunks_into(
    root: str,
    digest: bytes,
    size: int,
    chunks: Sequence[tuple[bytes, int]],
    buffer: memoryview,
    decompressor: Callable[[], zstandard.ZstdDecompressor],
) -> memoryview | None:
    """The chunk objects of a blob read one after another into ``buffer``, then hashed whole; ``None``: not so.

    Each object is read where its content belongs; a frame of raw blocks (the default store's)
    is turned into its content by moving the payloads down over the block headers, anything
    else is decompressed (bounded) into place; each is hashed right after (while in the CPU's
    cache) into one BLAKE3 of the whole blob, which checks every chunk and the chunk list at
    once, before a byte is returned.  A damaged object may also raise
    :class:`~nixcas.errors.StorageError` or :class:`OSError`.
    """
    if sum(c[1] for c in chunks) != size or any(c[1] <= 0 for c in chunks):
        return None
    need = size + max(compressed_bound(c[1]) - c[1] for c in chunks)
    view = buffer if len(buffer) >= need else memoryview(bytearray(need))
    hasher = blake3.blake3()
    pos = 0
    for chunk_digest, chunk_size in chunks:
        fd = os.open(object_path(root, "chunks", chunk_digest), READ_ONLY)
        try:
            stored = os.fstat(fd).st_size
            if stored > compressed_bound(chunk_size):
                return None
            if pread_into(fd, view[pos : pos + stored], 0) != stored:
                return None
        finally:
            os.close(fd)
        blocks = raw_blocks(view, pos, pos + stored)
        if blocks is None:
            from nixcas.castore.blob.chunking import decompress_chunk

            where = f"{root}: chunk {chunk_digest.hex()}"
            data = decompress_chunk(decompressor(), bytes(view[pos : pos + stored]), chunk_size, where)
            view[pos : pos + chunk_size] = data
        else:
            if sum(length for _, length in blocks) != chunk_size:
                return None
            at = pos
            for offset, length in blocks:
                view[at : at + length] = view[offset : offset + length]  # overlapping: memmove
                at += length
        hasher.update(view[pos : pos + chunk_size])  # while it is in the cache
        pos += chunk_size
    if hasher.digest() != digest:
        return None
    return view[:size]


WHOLE_MAX = 64 << 20
"""The largest blob read whole (and hashed once) before it is returned (``BulkReads.read_whole``)."""

PACKED_RUN_MAX = 128 << 10
"""The largest blob of the embedded store's pack files: half its average chunk size (``packed://``'s default)."""


class PackedReads:
    """The :class:`~nixcas.castore.blob.base.BulkReads` of a ``packed://`` directory with its default options,
    read-only and without the blob service (no asyncio, no zstandard unless a blob was stored compressed).

    The same reads as :class:`~nixcas.castore.blob.packed.PackedBlobService`'s: runs of pack rows
    through :func:`~nixcas.castore.blob.packfile.read_run`, a bigger blob (or one that is not a row)
    from the object layout through :func:`read_chunks_into`.  Nothing is ever created or changed.
    Anything it cannot serve, or any error, is ``None``: the caller reads those blobs through the
    service, which reports what is wrong.  :meth:`read_run` is used from one thread at a time (its
    SQLite connection is opened by the first read), :meth:`read_whole` of a blob bigger than
    :attr:`run_max` may run beside it on another (each thread has its own decompressor).
    """

    run_max = PACKED_RUN_MAX
    whole_max = WHOLE_MAX

    def __init__(self, root: str) -> None:
        self.root = root
        self._db: sqlite3.Connection | None = None
        self._packs: dict[int, int] = {}
        self._dctx: dict[int, zstandard.ZstdDecompressor] = {}
        self._rows: dict[bytes, tuple[bytes, int, int, int, int, int]] | None = None

    def close(self) -> None:
        """Close the database and the pack files."""
        if self._db is not None:
            self._db.close()
            self._db = None
        for fd in self._packs.values():
            os.close(fd)
        self._packs.clear()

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            import sqlite3

            path = f"{self.root}/packs.sqlite".replace("%", "%25").replace("?", "%3f").replace("#", "%23")
            from nixcas._sqlite import READER_MMAP

            # read on the reader thread, closed by its owner: never used by two threads at once
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
            self._db.execute(f"PRAGMA mmap_size={READER_MMAP}")  # pages read without a syscall each
        return self._db

    def _preadv(self, pack: int, into: memoryview, offset: int) -> int:
        fd = self._packs.get(pack)
        if fd is None:
            from nixcas.castore.blob.packfile import pack_name

            name = pack_name(self._connection(), pack)
            if name is None:
                return -1
            fd = self._packs[pack] = os.open(f"{self.root}/packs/{name}.pack", READ_ONLY)
        return pread_into(fd, into, offset)

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        """This thread's decompressor (one may not be used by two threads at once)."""
        thread = get_ident()
        dctx = self._dctx.get(thread)
        if dctx is None:
            import zstandard

            dctx = self._dctx[thread] = zstandard.ZstdDecompressor()
        return dctx

    def will_read(self, digests: Collection[bytes]) -> None:
        """The blobs the caller is about to read in runs (a hint): if they are many for the size of the index, the
        whole index is read at once and runs take their rows from it
        (:func:`~nixcas.castore.blob.packfile.read_index_rows`).

        On the thread that reads the runs, before the first; an error only leaves the lookups as they were.
        """
        from nixcas.castore.blob.packfile import read_index_rows

        try:
            self._rows = read_index_rows(self._connection(), len(digests))
        except Exception:
            self._rows = None

    def read_run(self, wanted: Sequence[tuple[bytes, int]], buffer: memoryview) -> list[bytes | memoryview] | None:
        from nixcas.castore.blob.packfile import read_run

        try:
            return read_run(self._connection(), wanted, buffer, self._preadv, self._decompressor, self._rows)
        except Exception:
            return None

    def read_whole(self, digest: bytes, size: int, buffer: memoryview) -> bytes | memoryview | None:
        if not 0 < size <= self.whole_max:
            return None
        try:
            if size <= self.run_max:
                run = self.read_run([(digest, size)], buffer)
                if run is not None:
                    return run[0]
            chunks = read_index(self.root, digest)
            if chunks is None:
                return None
            return read_chunks_into(self.root, digest, size, chunks or [(digest, size)], buffer, self._decompressor)
        except Exception:
            return None

"""Pack files and their SQLite index: how ``packed://`` keeps small blobs, and reading one back.

The format is described in :mod:`nixcas.castore.blob.packed`.  What is here
is what a reader needs and nothing more — no asyncio, no zstandard unless a
blob was stored compressed — so that both the blob service and the command
line's read-only fast path (:mod:`nixcas.cli.fast`) read blobs through the
same checks: the stored length is bounded by the recorded size, the bytes are
decoded to exactly that size, and their BLAKE3 must be the digest they were
read by.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import blake3

from nixcas.errors import ChecksumMismatch, StorageError

TYPE_CHECKING = False  # not typing's: `castore cat` needs nothing else of it
if TYPE_CHECKING:
    import zstandard

__all__ = ["CODEC_RAW", "CODEC_ZSTD", "DB_NAME", "PACKS_DIR", "Row", "load", "pack_name", "select_row", "verified"]

DB_NAME = "packs.sqlite"
"""The index of small blobs (and of the pack files), in the store's directory."""

PACKS_DIR = "packs"
"""Where pack files live, in the store's directory."""

CODEC_RAW, CODEC_ZSTD = 0, 1
"""How a blob's bytes are stored."""

Row = tuple[int, int, int, int, int]
"""``(size, codec, pack, offset, length)`` of a stored blob."""


def select_row(db: sqlite3.Connection, digest: bytes) -> Row | None:
    """Where the blob ``digest`` is stored, or ``None`` if the index has no row for it."""
    row = db.execute("SELECT size, codec, pack, offset, length FROM blobs WHERE digest = ?", (digest,)).fetchone()
    return None if row is None else (row[0], row[1], row[2], row[3], row[4])


def pack_name(db: sqlite3.Connection, pack_id: int) -> str | None:
    """The file name (without ``.pack``) of pack ``pack_id``, or ``None`` if there is no such pack."""
    row = db.execute("SELECT name FROM packs WHERE id = ?", (pack_id,)).fetchone()
    return None if row is None else str(row[0])


def load(
    where: str,
    row: Row,
    pread: Callable[[int, int, int], bytes],
    decompressor: Callable[[], zstandard.ZstdDecompressor],
) -> bytes:
    """A row's bytes, read with ``pread(pack, length, offset)`` and checked against its recorded size.

    Not yet checked against the digest (:func:`verified` does that).  ``where``
    names the blob in errors; ``decompressor`` is called only for a compressed row.
    """
    size, codec, pack, offset, length = row
    if length > max(size, 0) + (size >> 8) + 1024:  # more than size bytes can compress to
        raise StorageError(f"{where}: {length} bytes stored for {size}")
    data = pread(pack, length, offset)
    if len(data) != length:
        raise StorageError(f"{where}: the pack file ends {length - len(data)} bytes early")
    if codec == CODEC_ZSTD:
        import zstandard

        try:
            data = decompressor().decompress(data, max_output_size=size)
        except zstandard.ZstdError as e:
            raise StorageError(f"{where}: cannot decompress: {e}") from None
    elif codec != CODEC_RAW:
        raise StorageError(f"{where}: unknown codec {codec}")
    if len(data) != size:
        raise StorageError(f"{where}: {len(data)} bytes stored, {size} recorded")
    return data


def verified(digest: bytes, data: bytes) -> bytes:
    """``data`` if its BLAKE3 is ``digest``; :class:`ChecksumMismatch` otherwise."""
    got = blake3.blake3(data).digest()
    if got != digest:
        raise ChecksumMismatch(f"blob {digest.hex()}", digest.hex(), got.hex())
    return data

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
from collections.abc import Callable, Sequence

import blake3

from nixcas.errors import ChecksumMismatch, StorageError

TYPE_CHECKING = False  # not typing's: `castore cat` needs nothing else of it
if TYPE_CHECKING:
    import zstandard

__all__ = [
    "CODEC_RAW",
    "CODEC_ZSTD",
    "DB_NAME",
    "PACKS_DIR",
    "RUN_GAP",
    "Row",
    "load",
    "pack_name",
    "read_run",
    "select_row",
    "verified",
]

DB_NAME = "packs.sqlite"
"""The index of small blobs (and of the pack files), in the store's directory."""

PACKS_DIR = "packs"
"""Where pack files live, in the store's directory."""

CODEC_RAW, CODEC_ZSTD = 0, 1
"""How a blob's bytes are stored."""

Row = tuple[int, int, int, int, int]
"""``(size, codec, pack, offset, length)`` of a stored blob."""

RUN_GAP = 64 << 10
"""Blobs of one :func:`read_run` this close in a pack are read with one ``preadv`` (the gap too)."""

_RUN_SELECT = "SELECT digest, size, codec, pack, offset, length FROM blobs WHERE digest IN ({})"
_RUN_QUERY = 900
"""Digests per query of a run (below SQLite's oldest limit of 999 parameters)."""


def _pack_offset(row: tuple[bytes, int, int, int, int, int]) -> tuple[int, int]:
    return row[3], row[4]


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


def read_run(
    db: sqlite3.Connection,
    wanted: Sequence[tuple[bytes, int]],
    buffer: memoryview,
    preadv: Callable[[int, memoryview, int], int],
    decompressor: Callable[[], zstandard.ZstdDecompressor],
) -> list[bytes | memoryview] | None:
    """The contents of ``wanted`` (digest, size), each checked against its BLAKE3; ``None``: not all are pack rows
    of these sizes, or one is damaged (the caller reads them blob by blob, which reports it).

    One indexed lookup for the run, then the pack bytes in offset order, blobs at most
    :data:`RUN_GAP` apart with one ``preadv(pack, into, offset)`` (the bytes read) into
    ``buffer``; the contents returned are views of it (a compressed blob is decompressed).
    """
    if not wanted:
        return []
    keys = list(dict.fromkeys(raw for raw, _ in wanted))
    rows: list[tuple[bytes, int, int, int, int, int]] = []
    for i in range(0, len(keys), _RUN_QUERY):
        batch = keys[i : i + _RUN_QUERY]
        rows += db.execute(_RUN_SELECT.format(",".join("?" * len(batch))), batch).fetchall()
    if len(rows) != len(keys):
        return None  # not all in packs (or missing)
    rows.sort(key=_pack_offset)
    # Read ranges (pack, start, end, place in buffer): blobs at most RUN_GAP apart share one.
    ranges: list[tuple[int, int, int, int]] = []
    placed: list[int] = []  # each row's place in the buffer
    room = len(buffer)
    at = 0  # the buffer's end so far
    pack_id = start = end = -1
    for _, size, _, pack, offset, length in rows:
        if length > size + (size >> 8) + 1024:  # more than size bytes can compress to
            return None
        if pack == pack_id and end <= offset <= end + RUN_GAP and at + offset + length - end <= room:
            at += offset - end
            placed.append(at)
            at += length
            end = offset + length
            continue
        if pack_id >= 0:
            ranges.append((pack_id, start, end, at - (end - start)))
        pack_id, start, end = pack, offset, offset + length
        placed.append(at)
        at += length
    ranges.append((pack_id, start, end, at - (end - start)))
    view = buffer if at <= room else memoryview(bytearray(at))
    for pack, start, end, place in ranges:
        if preadv(pack, view[place : place + end - start], start) != end - start:
            return None  # the pack file ends early
    found: dict[bytes, bytes | memoryview] = {}
    hasher = blake3.blake3
    for (raw, size, codec, _, _, length), place in zip(rows, placed, strict=True):
        data: bytes | memoryview = view[place : place + length]
        if codec:
            if codec != CODEC_ZSTD:
                return None
            data = decompressor().decompress(data, max_output_size=size)
        if len(data) != size or hasher(data).digest() != raw:
            return None
        found[raw] = data
    out: list[bytes | memoryview] = []
    for raw, size in wanted:
        data = found[raw]
        if len(data) != size:
            return None
        out.append(data)
    return out

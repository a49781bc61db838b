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

import operator
import sqlite3
from collections.abc import Callable, Mapping, Sequence

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
    "RunRow",
    "load",
    "pack_name",
    "read_index_rows",
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

RunRow = tuple[bytes, int, int, int, int, int]
"""``(digest, size, codec, pack, offset, length)``: a row as :func:`read_run` looks it up."""

_RUN_COLUMNS = "SELECT digest, size, codec, pack, offset, length FROM blobs"
_RUN_SELECT = _RUN_COLUMNS + " WHERE digest IN ({})"
_RUN_QUERY = 900
"""Digests per query of a run (below SQLite's oldest limit of 999 parameters)."""
INDEX_SCAN_PAGES = 1024
"""The largest index (in database pages, 4 KiB here: about 60,000 rows) :func:`read_index_rows` reads whole."""
_LOOKUPS_PER_PAGE = 24
"""Digests looked up (``IN (…)``) for the cost of scanning one page of the index: a page holds about 60 rows, a
lookup costs about 2.5 times a row of a scan (both measured on this machine)."""


_PACK_OFFSET = operator.itemgetter(3, 4)
"""A row's (pack, offset)."""


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


def read_index_rows(db: sqlite3.Connection, wanted: int) -> dict[bytes, RunRow] | None:
    """Every row of the index by digest, read with one scan, if that is cheaper than looking up ``wanted`` digests
    (and the index is at most :data:`INDEX_SCAN_PAGES`); ``None``: it is not (:func:`read_run` looks them up).

    A scan costs per row of the index, a lookup per digest wanted: a dump of most of a store's
    blobs reads fewer rows this way.  The rows are those of one read (a consistent snapshot).
    """
    pages = int(db.execute("PRAGMA page_count").fetchone()[0])
    if pages > INDEX_SCAN_PAGES or wanted < pages * _LOOKUPS_PER_PAGE:
        return None
    return {row[0]: row for row in db.execute(_RUN_COLUMNS)}


def read_run(
    db: sqlite3.Connection,
    wanted: Sequence[tuple[bytes, int]],
    buffer: memoryview,
    preadv: Callable[[int, memoryview, int], int],
    decompressor: Callable[[], zstandard.ZstdDecompressor],
    index: Mapping[bytes, RunRow] | None = None,
) -> list[bytes | memoryview] | None:
    """The contents of ``wanted`` (digest, size), each checked against its BLAKE3; ``None``: not all are pack rows
    of these sizes, or one is damaged (the caller reads them blob by blob, which reports it).

    One indexed lookup for the run (or the rows taken from ``index``, all of the index as
    :func:`read_index_rows` read it), then the pack bytes in offset order, blobs at most
    :data:`RUN_GAP` apart with one ``preadv(pack, into, offset)`` (the bytes read) into
    ``buffer``; the contents returned are views of it (a compressed blob is decompressed).
    """
    if not wanted:
        return []
    digests = [w[0] for w in wanted]
    keys = list(dict.fromkeys(digests))
    rows: list[RunRow] = []
    if index is not None:
        rows = [row for row in map(index.get, keys) if row is not None]
    else:
        for i in range(0, len(keys), _RUN_QUERY):
            batch = keys[i : i + _RUN_QUERY]
            rows += db.execute(_RUN_SELECT.format(",".join("?" * len(batch))), batch).fetchall()
    if len(rows) != len(keys):
        return None  # not all in packs (or missing)
    rows.sort(key=_PACK_OFFSET)
    placed = _place(rows, len(buffer))
    if placed is None:
        return None
    ranges, places, at = placed
    view = buffer if at <= len(buffer) else memoryview(bytearray(at))
    for pack, start, end, place in ranges:
        if preadv(pack, view[place : place + end - start], start) != end - start:
            return None  # the pack file ends early
    found: dict[bytes, bytes | memoryview] = {}
    hasher = blake3.blake3
    for (raw, size, codec, _, _, length), place in zip(rows, places, strict=True):
        data: bytes | memoryview = view[place : place + length]
        if codec:
            if codec != CODEC_ZSTD:
                return None
            data = decompressor().decompress(data, max_output_size=size)
            if len(data) != size:
                return None
        elif length != size:
            return None
        if hasher(data).digest() != raw:
            return None
        found[raw] = data
    out = [found[raw] for raw in digests]
    if list(map(len, out)) != [w[1] for w in wanted]:
        return None
    return out


def _place(rows: list[RunRow], room: int) -> tuple[list[tuple[int, int, int, int]], list[int], int] | None:
    """Where the rows (sorted by pack and offset) go in a buffer of ``room`` bytes: the read ranges (pack, start,
    end, place in the buffer; blobs at most :data:`RUN_GAP` apart share one), each row's place, and the bytes
    needed; ``None`` if a row is longer than its size can be stored in."""
    ranges: list[tuple[int, int, int, int]] = []
    places: list[int] = []
    append = places.append
    at = 0  # the buffer's end so far
    pack_id = start = end = -1
    for _, size, _, pack, offset, length in rows:
        if length > size + (size >> 8) + 1024:  # more than size bytes can compress to
            return None
        if pack == pack_id and end <= offset <= end + RUN_GAP and at + offset + length - end <= room:
            at += offset - end
            append(at)
            at += length
            end = offset + length
            continue
        if pack_id >= 0:
            ranges.append((pack_id, start, end, at - (end - start)))
        pack_id, start, end = pack, offset, offset + length
        append(at)
        at += length
    ranges.append((pack_id, start, end, at - (end - start)))
    return ranges, places, at

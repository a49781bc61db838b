"""Reaching behind the embedded store's blob service (``packed://``) in tests: corrupt or drop a blob.

A small blob is a row of ``DIR/small.sqlite``; anything else is a file of the
object layout.  These helpers write what a damaged disk would hold, computed
independently of the code under test (plain SQLite and zstandard calls).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import zstandard

__all__ = ["corrupt_blob", "delete_blob", "has_row", "row_digests", "rows"]


def _db(root: Path) -> sqlite3.Connection:
    return sqlite3.connect(root / "small.sqlite", isolation_level=None)


def has_row(root: Path, digest: bytes) -> bool:
    """Whether ``digest`` is a row of the small-blob table under ``root`` (the ``blobs`` directory)."""
    with _db(root) as db:
        return db.execute("SELECT 1 FROM blobs WHERE digest = ?", (bytes(digest),)).fetchone() is not None


def row_digests(root: Path) -> list[bytes]:
    """Every digest in the small-blob table."""
    with _db(root) as db:
        return [bytes(r[0]) for r in db.execute("SELECT digest FROM blobs ORDER BY digest")]


def rows(root: Path, digests: list[bytes]) -> list[bytes]:
    """The stored bytes (decompressed, not checked) of those of ``digests`` that are rows, in order."""
    out: list[bytes] = []
    if not (root / "small.sqlite").exists():
        return out
    with _db(root) as db:
        for digest in digests:
            row = db.execute("SELECT codec, data FROM blobs WHERE digest = ?", (bytes(digest),)).fetchone()
            if row is not None:
                out.append(zstandard.ZstdDecompressor().decompress(row[1]) if row[0] == 1 else bytes(row[1]))
    return out


def corrupt_blob(root: Path, digest: bytes, data: bytes, *, compress: bool = True) -> bool:
    """Store ``data`` under ``digest``'s row (keeping its recorded size); ``False`` if there is no row."""
    with _db(root) as db:
        stored = zstandard.ZstdCompressor().compress(data) if compress else data
        cursor = db.execute(
            "UPDATE blobs SET size = ?, codec = ?, data = ? WHERE digest = ?",
            (len(data), 1 if compress else 0, stored, bytes(digest)),
        )
        return cursor.rowcount == 1


def delete_blob(root: Path, digest: bytes) -> bool:
    """Drop ``digest``'s row; ``False`` if there was none."""
    with _db(root) as db:
        return db.execute("DELETE FROM blobs WHERE digest = ?", (bytes(digest),)).rowcount == 1

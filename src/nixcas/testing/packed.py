"""Reaching behind the embedded store's blob service (``packed://``) in tests: read, corrupt or drop a blob.

A small blob is a row of ``DIR/packs.sqlite`` naming bytes in a pack file
under ``DIR/packs/``; anything else is a file of the object layout.  These
helpers do what a damaged disk would, with plain SQLite, file and zstandard
calls, independently of the code under test.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import zstandard

__all__ = ["corrupt_blob", "delete_blob", "has_row", "row_digests", "rows"]


def _db(root: Path) -> sqlite3.Connection:
    return sqlite3.connect(root / "packs.sqlite", isolation_level=None)


def _exists(root: Path) -> bool:
    return (root / "packs.sqlite").exists()


def has_row(root: Path, digest: bytes) -> bool:
    """Whether ``digest`` is a row of the small-blob index under ``root`` (the ``blobs`` directory)."""
    if not _exists(root):
        return False
    with _db(root) as db:
        return db.execute("SELECT 1 FROM blobs WHERE digest = ?", (bytes(digest),)).fetchone() is not None


def row_digests(root: Path) -> list[bytes]:
    """Every digest in the small-blob index."""
    if not _exists(root):
        return []
    with _db(root) as db:
        return [bytes(r[0]) for r in db.execute("SELECT digest FROM blobs ORDER BY digest")]


def rows(root: Path, digests: list[bytes]) -> list[bytes]:
    """The stored bytes (decompressed, not checked) of those of ``digests`` that are rows, in order."""
    out: list[bytes] = []
    if not _exists(root):
        return out
    with _db(root) as db:
        for digest in digests:
            row = db.execute(
                "SELECT codec, offset, length, name FROM blobs JOIN packs ON packs.id = blobs.pack WHERE digest = ?",
                (bytes(digest),),
            ).fetchone()
            if row is None:
                continue
            with open(root / "packs" / f"{row[3]}.pack", "rb") as f:
                f.seek(row[1])
                data = f.read(row[2])
            out.append(zstandard.ZstdDecompressor().decompress(data) if row[0] == 1 else data)
    return out


def corrupt_blob(root: Path, digest: bytes, data: bytes, *, compress: bool = True) -> bool:
    """Make ``digest``'s row name ``data`` instead (appended to its pack file); ``False`` if there is no row."""
    if not _exists(root):
        return False
    with _db(root) as db:
        row = db.execute(
            "SELECT name FROM blobs JOIN packs ON packs.id = blobs.pack WHERE digest = ?", (bytes(digest),)
        ).fetchone()
        if row is None:
            return False
        stored = zstandard.ZstdCompressor().compress(data) if compress else data
        path = root / "packs" / f"{row[0]}.pack"
        offset = os.path.getsize(path)
        with open(path, "ab") as f:
            f.write(stored)
        db.execute(
            "UPDATE blobs SET size = ?, codec = ?, offset = ?, length = ? WHERE digest = ?",
            (len(data), 1 if compress else 0, offset, len(stored), bytes(digest)),
        )
        return True


def delete_blob(root: Path, digest: bytes) -> bool:
    """Drop ``digest``'s row; ``False`` if there was none."""
    if not _exists(root):
        return False
    with _db(root) as db:
        return db.execute("DELETE FROM blobs WHERE digest = ?", (bytes(digest),)).rowcount == 1

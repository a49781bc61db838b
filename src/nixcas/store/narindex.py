"""Which castore node holds the NAR with a given hash: the state between a NAR upload and its narinfo.

``nix copy --to http://…`` uploads a NAR file (``PUT /nar/<file hash>.nar[.xz]``)
and only then its narinfo (``PUT /<hash>.narinfo``), which names the NAR by its
NarHash.  Between the two, the bridge must remember which root node the NAR
was ingested as.  tvix keeps that in an in-memory LRU (lost on restart, and
after 1000 other uploads); :class:`NarIndex` keeps it in SQLite, so a narinfo
may follow its NAR across restarts.  It also records the file names uploads
came under, so ``HEAD /nar/<file hash>.nar.xz`` can tell Nix not to upload
again.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass

from nixcas._sqlite import SqliteDatabase
from nixcas.castore.nodes import Node
from nixcas.castore.proto import decode_node, encode_node
from nixcas.errors import StorageError, ValidationError

__all__ = ["NarIndex", "UploadedNar"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nars (
    nar_sha256 BLOB PRIMARY KEY NOT NULL CHECK (length(nar_sha256) = 32),
    nar_size   INTEGER NOT NULL,
    node       BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS files (
    file_sha256 BLOB NOT NULL CHECK (length(file_sha256) = 32),
    compression TEXT NOT NULL,
    nar_sha256  BLOB NOT NULL,
    PRIMARY KEY (file_sha256, compression)
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class UploadedNar:
    """A NAR that was uploaded, verified and ingested."""

    nar_sha256: bytes
    nar_size: int
    node: Node


class NarIndex:
    """NarHash → (NAR size, root node), and uploaded file names → NarHash; ``path=None`` keeps it in memory."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._db = SqliteDatabase(path, _SCHEMA, "NAR index")

    def __repr__(self) -> str:
        return f"NarIndex({self.path!r})"

    async def add(self, nar: UploadedNar, file_sha256: bytes, compression: str) -> None:
        """Remember ``nar``, uploaded as the file with ``file_sha256`` and ``compression`` (one transaction)."""
        node = encode_node(b"", nar.node)

        def add(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO nars (nar_sha256, nar_size, node) VALUES (?, ?, ?)",
                (nar.nar_sha256, nar.nar_size, node),
            )
            conn.execute(
                "INSERT OR REPLACE INTO files (file_sha256, compression, nar_sha256) VALUES (?, ?, ?)",
                (file_sha256, compression, nar.nar_sha256),
            )

        await self._db.run(self._db.transaction(add))

    async def get(self, nar_sha256: bytes) -> UploadedNar | None:
        """The NAR with this SHA-256, if one was uploaded."""

        def get() -> tuple[bytes, int, bytes] | None:
            row = self._db.conn.execute(
                "SELECT nar_sha256, nar_size, node FROM nars WHERE nar_sha256 = ?", (nar_sha256,)
            ).fetchone()
            return None if row is None else (bytes(row[0]), int(row[1]), bytes(row[2]))

        return self._decoded(await self._db.run(get))

    async def find_file(self, file_sha256: bytes, compression: str) -> UploadedNar | None:
        """The NAR uploaded as this file (for ``.nar`` files, the file hash is the NAR hash); one query."""

        def find() -> tuple[bytes, int, bytes] | None:
            row = self._db.conn.execute(
                "SELECT nar_sha256, nar_size, node FROM nars WHERE nar_sha256 = coalesce("
                " (SELECT nar_sha256 FROM files WHERE file_sha256 = ? AND compression = ?),"
                " CASE WHEN ? = 'none' THEN ? END)",
                (file_sha256, compression, compression, file_sha256),
            ).fetchone()
            return None if row is None else (bytes(row[0]), int(row[1]), bytes(row[2]))

        return self._decoded(await self._db.run(find))

    async def nodes(self) -> AsyncIterator[tuple[bytes, Node]]:
        """Every NAR's (SHA-256, root node), a page at a time (for ``rewrite-directories``)."""
        after = b""
        while True:

            def page(after: bytes = after) -> list[tuple[bytes, int, bytes]]:
                rows = self._db.conn.execute(
                    "SELECT nar_sha256, nar_size, node FROM nars WHERE nar_sha256 > ? ORDER BY nar_sha256 LIMIT 1000",
                    (after,),
                )
                return [(bytes(d), int(n), bytes(v)) for d, n, v in rows]

            rows = await self._db.run(page)
            for row in rows:
                nar = self._decoded(row)
                assert nar is not None
                yield nar.nar_sha256, nar.node
            if len(rows) < 1000:
                return
            after = rows[-1][0]

    async def replace_node(self, nar_sha256: bytes, node: Node) -> None:
        """Point the NAR with this SHA-256 at ``node`` (the same contents, converted to another size rule)."""
        raw = encode_node(b"", node)

        def replace(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE nars SET node = ? WHERE nar_sha256 = ?", (raw, nar_sha256))

        await self._db.run(self._db.transaction(replace))

    def _decoded(self, row: tuple[bytes, int, bytes] | None) -> UploadedNar | None:
        if row is None:
            return None
        nar_sha256, nar_size, raw = row
        try:
            _, node = decode_node(raw, anonymous=True)
        except ValidationError as e:
            raise StorageError(f"{self!r}: stored node for NAR {nar_sha256.hex()} is invalid: {e}") from None
        return UploadedNar(nar_sha256, nar_size, node)

    async def close(self) -> None:
        await self._db.close()

"""``sqlite:///abs/path.sqlite`` — directories in one SQLite table.

One connection, used from one dedicated worker thread (so the event loop
never blocks on SQLite).  A closure is committed in one transaction; reads
of a breadth-first level are one query.  ``sqlite://`` (no path) is a
private in-memory database.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from nixcas._sqlite import BATCH, SqliteDatabase, SqlitePathConfig
from nixcas.castore.digest import B3Digest
from nixcas.castore.dirs.base import DirectoryService
from nixcas.config import Resolver, ServiceConfig

__all__ = ["SqliteDirectoryService", "SqliteDirectoryServiceConfig"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS directories (
    digest BLOB PRIMARY KEY NOT NULL CHECK (length(digest) = 32),
    data   BLOB NOT NULL
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class SqliteDirectoryServiceConfig(SqlitePathConfig, ServiceConfig[DirectoryService]):
    """``sqlite:///abs/path`` (a file) or ``sqlite://`` (in memory); composition: ``path`` (optional)."""

    async def build(self, resolver: Resolver) -> DirectoryService:
        return SqliteDirectoryService(self.path)


class SqliteDirectoryService(DirectoryService):
    """Canonical Directory bytes keyed by digest in an SQLite database."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._db = SqliteDatabase(path, _SCHEMA, "directory database")

    def __repr__(self) -> str:
        return f"SqliteDirectoryService({self.path!r})"

    async def _get_raw(self, digest: B3Digest) -> bytes | None:
        def get() -> bytes | None:
            row = self._db.conn.execute("SELECT data FROM directories WHERE digest = ?", (digest,)).fetchone()
            return None if row is None else bytes(row[0])

        return await self._db.run(get)

    async def _get_many_raw(self, digests: Sequence[B3Digest]) -> dict[B3Digest, bytes]:
        def get_many() -> dict[B3Digest, bytes]:
            found: dict[B3Digest, bytes] = {}
            for i in range(0, len(digests), BATCH):
                batch = digests[i : i + BATCH]
                marks = ",".join("?" * len(batch))
                query = f"SELECT digest, data FROM directories WHERE digest IN ({marks})"  # noqa: S608
                for d, data in self._db.conn.execute(query, batch):
                    found[B3Digest(d)] = bytes(data)
            return found

        return await self._db.run(get_many)

    async def _put_raw(self, items: Sequence[tuple[B3Digest, bytes]]) -> None:
        await self._db.run(
            self._db.transaction(
                lambda conn: conn.executemany("INSERT OR IGNORE INTO directories (digest, data) VALUES (?, ?)", items)
            )
        )

    async def close(self) -> None:
        await self._db.close()

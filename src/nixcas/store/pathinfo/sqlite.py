"""``sqlite:///abs/path.sqlite`` — PathInfo records in one SQLite table (``sqlite://``: in memory)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from nixcas._sqlite import Busy, SqliteDatabase, get_data
from nixcas.config import Resolver, ServiceConfig, SqlitePathConfig
from nixcas.store.pathinfo.base import PathInfoService, check_digest

__all__ = ["SqlitePathInfoService", "SqlitePathInfoServiceConfig"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pathinfo (
    digest BLOB PRIMARY KEY NOT NULL CHECK (length(digest) = 20),
    data   BLOB NOT NULL
) WITHOUT ROWID;
"""
_PAGE = 1000
_GET = "SELECT data FROM pathinfo WHERE digest = ?"


@dataclass(frozen=True)
class SqlitePathInfoServiceConfig(SqlitePathConfig, ServiceConfig[PathInfoService]):
    """``sqlite:///abs/path`` or ``sqlite://``; composition: ``path`` (optional)."""

    async def build(self, resolver: Resolver) -> PathInfoService:
        return SqlitePathInfoService(self.path)


class SqlitePathInfoService(PathInfoService):
    """Serialized PathInfo messages keyed by store path digest; ``list`` pages through by key."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._db = SqliteDatabase(path, _SCHEMA, "path info database")

    def __repr__(self) -> str:
        return f"SqlitePathInfoService({self.path!r})"

    async def _get_raw(self, digest: bytes) -> bytes | None:
        return await self._db.run(lambda: get_data(self._db.conn, "pathinfo", digest))

    def get_encoded_now(self, digest: bytes) -> bytes | Literal[False] | None:
        try:
            return self._db.value_now(_GET, check_digest(digest))
        except Busy:
            return False

    async def _put_raw(self, digest: bytes, raw: bytes) -> None:
        await self._db.run(
            self._db.transaction(
                lambda conn: conn.execute("INSERT OR REPLACE INTO pathinfo (digest, data) VALUES (?, ?)", (digest, raw))
            )
        )

    async def _list_raw(self) -> AsyncIterator[tuple[bytes, bytes]]:
        after = b""
        while True:

            def page(after: bytes = after) -> list[tuple[bytes, bytes]]:
                rows = self._db.conn.execute(
                    "SELECT digest, data FROM pathinfo WHERE digest > ? ORDER BY digest LIMIT ?", (after, _PAGE)
                )
                return [(bytes(d), bytes(v)) for d, v in rows]

            rows = await self._db.run(page)
            for row in rows:
                yield row
            if len(rows) < _PAGE:
                return
            after = rows[-1][0]

    async def delete(self, digest: bytes) -> bool:
        """Remove the record of this store path digest; whether there was one."""
        return bool(
            await self._db.run(
                self._db.transaction(
                    lambda conn: conn.execute("DELETE FROM pathinfo WHERE digest = ?", (digest,)).rowcount
                )
            )
        )

    async def close(self) -> None:
        await self._db.close()

"""``sqlite:///abs/pins.sqlite`` — pins in one SQLite table on this host (``sqlite://``: in memory).

The embedded store keeps its pins in ``DIR/pins.sqlite`` (see :func:`nixcas.api.pin_service_url`).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

from nixcas._sqlite import SqliteDatabase
from nixcas.castore.digest import DIGEST_LEN, B3Digest
from nixcas.castore.pins.base import Pin, PinService, check_pin
from nixcas.config import Resolver, ServiceConfig, SqlitePathConfig

__all__ = ["SqlitePinService", "SqlitePinServiceConfig"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pins (
    name    TEXT PRIMARY KEY NOT NULL,
    digest  BLOB NOT NULL CHECK (length(digest) = 32),
    created INTEGER NOT NULL
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class SqlitePinServiceConfig(SqlitePathConfig, ServiceConfig[PinService]):
    """``sqlite:///abs/path`` or ``sqlite://``; composition: ``path`` (optional)."""

    async def build(self, resolver: Resolver) -> PinService:
        return SqlitePinService(self.path)


class SqlitePinService(PinService):
    """Pins in ``path`` (``None``: in memory): seen only by processes on this host."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._db = SqliteDatabase(path, _SCHEMA, "pin database")

    def __repr__(self) -> str:
        return f"SqlitePinService({self.path!r})"

    async def pin(self, name: str, digest: B3Digest) -> Pin | None:
        digest = check_pin(name, digest)

        def put(conn: sqlite3.Connection) -> Pin | None:
            row = conn.execute("SELECT digest, created FROM pins WHERE name = ?", (name,)).fetchone()
            conn.execute(
                "INSERT OR REPLACE INTO pins (name, digest, created) VALUES (?, ?, ?)", (name, digest, time.time_ns())
            )
            return None if row is None else Pin(name, B3Digest(bytes(row[0])), row[1])

        return await self._db.run(self._db.transaction(put))

    async def unpin(self, name: str) -> bool:
        return bool(
            await self._db.run(
                self._db.transaction(lambda conn: conn.execute("DELETE FROM pins WHERE name = ?", (name,)).rowcount)
            )
        )

    async def list(self) -> list[Pin]:
        def rows() -> list[Pin]:
            out = []
            for name, digest, created in self._db.conn.execute("SELECT name, digest, created FROM pins ORDER BY name"):
                if len(digest) == DIGEST_LEN:
                    out.append(Pin(name, B3Digest(bytes(digest)), created))
            return out

        return await self._db.run(rows)

    async def close(self) -> None:
        await self._db.close()

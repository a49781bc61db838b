"""Named GC roots for castore-only users: ``NAME -> digest`` in an SQLite database.

A pin keeps a directory (with its whole closure) or a blob alive through
garbage collection.  Pinning a name again moves it.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

from nixcas._aio import Closing
from nixcas._sqlite import SqliteDatabase
from nixcas.castore.digest import DIGEST_LEN, B3Digest
from nixcas.errors import ValidationError

__all__ = ["Pin", "PinStore", "validate_pin_name"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pins (
    name    TEXT PRIMARY KEY NOT NULL,
    digest  BLOB NOT NULL CHECK (length(digest) = 32),
    created INTEGER NOT NULL
) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class Pin:
    name: str
    digest: B3Digest
    created_ns: int


def validate_pin_name(name: str) -> str:
    """``name`` if it is 1 to 255 printable characters without whitespace or ``/``."""
    if not 1 <= len(name) <= 255:
        raise ValidationError(f"pin name must be 1 to 255 characters (got {len(name)})")
    bad = [c for c in name if not c.isprintable() or c.isspace() or c == "/"]
    if bad:
        raise ValidationError(f"pin name {name!r} contains {bad[0]!r} (no whitespace, control characters or '/')")
    return name


class PinStore(Closing):
    """Pins in ``path`` (``None``: in memory)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._db = SqliteDatabase(path, _SCHEMA, "pin database")

    async def pin(self, name: str, digest: B3Digest) -> Pin | None:
        """Pin ``digest`` as ``name``; returns the pin it replaced, if any."""
        validate_pin_name(name)

        def put(conn: sqlite3.Connection) -> Pin | None:
            row = conn.execute("SELECT digest, created FROM pins WHERE name = ?", (name,)).fetchone()
            conn.execute(
                "INSERT OR REPLACE INTO pins (name, digest, created) VALUES (?, ?, ?)", (name, digest, time.time_ns())
            )
            return None if row is None else Pin(name, B3Digest(bytes(row[0])), row[1])

        return await self._db.run(self._db.transaction(put))

    async def unpin(self, name: str) -> bool:
        """Remove pin ``name``; whether it existed."""
        return bool(
            await self._db.run(
                self._db.transaction(lambda conn: conn.execute("DELETE FROM pins WHERE name = ?", (name,)).rowcount)
            )
        )

    async def list(self) -> list[Pin]:
        """Every pin, by name."""

        def rows() -> list[Pin]:
            out = []
            for name, digest, created in self._db.conn.execute("SELECT name, digest, created FROM pins ORDER BY name"):
                if len(digest) == DIGEST_LEN:
                    out.append(Pin(name, B3Digest(bytes(digest)), created))
            return out

        return await self._db.run(rows)

    async def close(self) -> None:
        await self._db.close()

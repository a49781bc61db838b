"""``postgresql://user:pass@host:port/db`` — pins in one table of a PostgreSQL database.

Shared by every host using the database: a store whose path infos or
directories are in PostgreSQL keeps its pins there by default.  Options and
connection handling: :mod:`nixcas._postgres`; the table is created or
migrated at start (component ``pins``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from nixcas._postgres import Connection, PostgresConfig, PostgresDatabase
from nixcas.castore.digest import DIGEST_LEN, B3Digest
from nixcas.castore.pins.base import Pin, PinService, check_pin
from nixcas.config import Resolver, ServiceConfig

__all__ = ["PostgresPinService", "PostgresPinServiceConfig"]

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE IF NOT EXISTS nixcas_pins (
            name       text PRIMARY KEY,
            digest     bytea NOT NULL CHECK (octet_length(digest) = 32),
            created_ns bigint NOT NULL
        )""",
    ),
)
"""Schema versions of the ``pins`` component: append, never edit."""


@dataclass(frozen=True)
class PostgresPinServiceConfig(PostgresConfig, ServiceConfig[PinService]):
    """``postgresql://user:pass@host:port/db?pool_max=N``; composition: ``url``, ``pool_min``, ``pool_max``,
    ``connect_timeout``."""

    async def build(self, resolver: Resolver) -> PinService:
        return await PostgresPinService.open(self)


@dataclass(frozen=True)
class PostgresAliasPinServiceConfig(PostgresPinServiceConfig):
    """The same, for ``postgres://`` URLs and ``type = "postgres"``."""

    type_tag: ClassVar[str] = "postgres"


class PostgresPinService(PinService):
    """Pins in the table ``nixcas_pins``; every host using the database sees them."""

    per_host: ClassVar[bool] = False

    def __init__(self, config: PostgresConfig) -> None:
        self._db = PostgresDatabase(config, "pin database", "pins", MIGRATIONS)

    @classmethod
    async def open(cls, config: PostgresConfig) -> PostgresPinService:
        """Connect, create or migrate the table, and return the running service."""
        service = cls(config)
        await service._db.open()
        return service

    def __repr__(self) -> str:
        return f"PostgresPinService('postgresql://{self._db.target}')"

    async def pin(self, name: str, digest: B3Digest) -> Pin | None:
        digest = check_pin(name, digest)

        async def put(conn: Connection) -> Pin | None:
            cur = await conn.execute(
                "SELECT digest, created_ns FROM nixcas_pins WHERE name = %s FOR UPDATE", (name,), binary=True
            )
            row = await cur.fetchone()
            await conn.execute(
                # created_ns from the database server's clock (microseconds): one clock for every host
                "INSERT INTO nixcas_pins (name, digest, created_ns)"
                " VALUES (%s, %s, (extract(epoch from clock_timestamp()) * 1000000)::bigint * 1000)"
                " ON CONFLICT (name) DO UPDATE SET digest = excluded.digest, created_ns = excluded.created_ns",
                (name, digest),
                binary=True,
            )
            return None if row is None else Pin(name, B3Digest(bytes(row[0])), int(row[1]))

        return await self._db.run(put, transaction=True, retry=True)

    async def unpin(self, name: str) -> bool:
        async def delete(conn: Connection) -> bool:
            cur = await conn.execute("DELETE FROM nixcas_pins WHERE name = %s", (name,))
            return cur.rowcount > 0

        return await self._db.run(delete, retry=False)

    async def list(self) -> list[Pin]:
        async def rows(conn: Connection) -> list[Pin]:
            cur = await conn.execute(
                'SELECT name, digest, created_ns FROM nixcas_pins ORDER BY name COLLATE "C"', binary=True
            )
            return [
                Pin(name, B3Digest(bytes(digest)), int(created))
                for name, digest, created in await cur.fetchall()
                if len(digest) == DIGEST_LEN
            ]

        return await self._db.run(rows, retry=True)

    async def close(self) -> None:
        await self._db.close()

"""``postgresql://user:pass@host:port/db`` — PathInfo records in one PostgreSQL table.

Options and connection handling: :mod:`nixcas._postgres`.  ``list`` streams
through a server-side cursor (``DECLARE … CURSOR`` inside a transaction,
fetched :data:`_FETCH` rows at a time), so listing millions of records holds
only one batch in memory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import ClassVar

from nixcas._postgres import Connection, PostgresConfig, PostgresDatabase
from nixcas.config import Resolver, ServiceConfig
from nixcas.store.pathinfo.base import PathInfoService

__all__ = ["PostgresPathInfoService", "PostgresPathInfoServiceConfig"]

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE IF NOT EXISTS nixcas_pathinfo (
            digest bytea PRIMARY KEY CHECK (octet_length(digest) = 20),
            data   bytea NOT NULL
        )""",
    ),
)
"""Schema versions of the ``pathinfo`` component: append, never edit."""

_FETCH = 500
"""Rows per round trip of the ``list`` cursor."""


@dataclass(frozen=True)
class PostgresPathInfoServiceConfig(PostgresConfig, ServiceConfig[PathInfoService]):
    """``postgresql://user:pass@host:port/db?pool_max=N``; composition: ``url``, ``pool_min``, ``pool_max``,
    ``connect_timeout``."""

    async def build(self, resolver: Resolver) -> PathInfoService:
        return await PostgresPathInfoService.open(self)


@dataclass(frozen=True)
class PostgresAliasPathInfoServiceConfig(PostgresPathInfoServiceConfig):
    """The same, for ``postgres://`` URLs and ``type = "postgres"``."""

    type_tag: ClassVar[str] = "postgres"


class PostgresPathInfoService(PathInfoService):
    """Serialized PathInfo messages keyed by store path digest in a PostgreSQL table (``nixcas_pathinfo``)."""

    fetch_size: int = _FETCH
    """Rows per round trip of :meth:`list` (an attribute so tests can watch it)."""

    def __init__(self, config: PostgresConfig) -> None:
        self._db = PostgresDatabase(config, "path info database", "pathinfo", MIGRATIONS)

    @classmethod
    async def open(cls, config: PostgresConfig) -> PostgresPathInfoService:
        """Connect, create or migrate the table, and return the running service."""
        service = cls(config)
        await service._db.open()
        return service

    def __repr__(self) -> str:
        return f"PostgresPathInfoService('postgresql://{self._db.target}')"

    async def _get_raw(self, digest: bytes) -> bytes | None:
        async def get(conn: Connection) -> bytes | None:
            cur = await conn.execute("SELECT data FROM nixcas_pathinfo WHERE digest = %s", (digest,), binary=True)
            row = await cur.fetchone()
            return None if row is None else bytes(row[0])

        return await self._db.run(get, retry=True)

    async def _put_raw(self, digest: bytes, raw: bytes) -> None:
        async def put(conn: Connection) -> None:
            await conn.execute(
                "INSERT INTO nixcas_pathinfo (digest, data) VALUES (%s, %s)"
                " ON CONFLICT (digest) DO UPDATE SET data = excluded.data",
                (digest, raw),
                binary=True,
            )

        await self._db.run(put, retry=True)  # an upsert: idempotent

    async def _list_raw(self) -> AsyncIterator[tuple[bytes, bytes]]:
        async with self._db.transaction() as conn, conn.cursor(name="nixcas_pathinfo_list", binary=True) as cur:
            cur.itersize = self.fetch_size
            await cur.execute("SELECT digest, data FROM nixcas_pathinfo")
            async for digest, data in cur:
                yield bytes(digest), bytes(data)

    async def delete(self, digest: bytes) -> bool:
        """Remove the record of this store path digest; whether there was one."""

        async def delete(conn: Connection) -> bool:
            cur = await conn.execute("DELETE FROM nixcas_pathinfo WHERE digest = %s", (digest,), binary=True)
            return cur.rowcount > 0

        return await self._db.run(delete, retry=False)

    async def close(self) -> None:
        await self._db.close()

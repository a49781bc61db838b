"""``postgresql://user:pass@host:port/db`` — directories in one PostgreSQL table, shared by many daemons.

Options and connection handling: :mod:`nixcas._postgres`.  A closure is one
``INSERT … SELECT FROM unnest(…)`` statement: one round trip and one
transaction, so a failing closure leaves nothing behind.  A breadth-first
level of :meth:`get_recursive` is one ``= ANY(…)`` query.  Re-putting a
stored directory refreshes its ``mtime`` (young again for GC), and GC deletes
with the age re-checked in the ``DELETE`` itself.  The store's directory size
rule is recorded in ``nixcas_directories_meta`` (key ``directory_size_rule``)
by the first daemon that opens the database.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

from nixcas._postgres import Connection, PostgresConfig, PostgresDatabase
from nixcas.castore.digest import B3Digest
from nixcas.castore.dirs.base import DirectoryService, settle_size_rule
from nixcas.castore.sizerule import RULE_KEY, SizeRule
from nixcas.castore.sweep import Deletion, StoredObject
from nixcas.config import Resolver, ServiceConfig

__all__ = ["PostgresDirectoryService", "PostgresDirectoryServiceConfig"]

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE IF NOT EXISTS nixcas_directories (
            digest bytea PRIMARY KEY CHECK (octet_length(digest) = 32),
            data   bytea NOT NULL,
            mtime  bigint NOT NULL
        )""",
    ),
    ("CREATE TABLE IF NOT EXISTS nixcas_directories_meta (key text PRIMARY KEY, value text NOT NULL)",),
)
"""Schema versions of the ``directories`` component: append, never edit."""

_BATCH = 1000
"""Digests per ``= ANY(…)`` query (bounds each answer)."""
_PAGE = 1000
"""Rows per GC scan page."""


@dataclass(frozen=True)
class PostgresDirectoryServiceConfig(PostgresConfig, ServiceConfig[DirectoryService]):
    """``postgresql://user:pass@host:port/db?pool_max=N``; composition: ``url``, ``pool_min``, ``pool_max``,
    ``connect_timeout``."""

    async def build(self, resolver: Resolver) -> DirectoryService:
        return await PostgresDirectoryService.open(self, size_rule=resolver.size_rule)


@dataclass(frozen=True)
class PostgresAliasDirectoryServiceConfig(PostgresDirectoryServiceConfig):
    """The same, for ``postgres://`` URLs and ``type = "postgres"``."""

    type_tag: ClassVar[str] = "postgres"


class PostgresDirectoryService(DirectoryService):
    """Canonical Directory bytes keyed by digest in a PostgreSQL table (``nixcas_directories``)."""

    def __init__(self, config: PostgresConfig) -> None:
        self._db = PostgresDatabase(config, "directory database", "directories", MIGRATIONS)

    @classmethod
    async def open(cls, config: PostgresConfig, *, size_rule: SizeRule | None = None) -> PostgresDirectoryService:
        """Connect, create or migrate the tables, settle the size rule (``size_rule``: the one asked for)."""
        service = cls(config)
        await service._db.open()
        try:
            await service.open_size_rule(size_rule)
        except BaseException:
            await service.close()
            raise
        return service

    async def open_size_rule(self, requested: SizeRule | None) -> None:
        """Read the recorded rule (recording it if absent; the first writer wins) and check ``requested``."""
        where = f"directory database postgresql://{self._db.target}"

        async def recorded(conn: Connection) -> SizeRule | None:
            cur = await conn.execute("SELECT value FROM nixcas_directories_meta WHERE key = %s", (RULE_KEY,))
            row = await cur.fetchone()
            return None if row is None else SizeRule.parse(str(row[0]), where)

        async def settle(conn: Connection) -> SizeRule:
            found = await recorded(conn)
            if found is None:
                cur = await conn.execute("SELECT EXISTS (SELECT 1 FROM nixcas_directories)")
                row = await cur.fetchone()
                rule, _ = settle_size_rule(None, bool(row and row[0]), requested, where)
                await conn.execute(
                    "INSERT INTO nixcas_directories_meta (key, value) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING",
                    (RULE_KEY, rule.value),
                )
                found = await recorded(conn)
            return settle_size_rule(found, True, requested, where)[0]

        self.size_rule = await self._db.run(settle, transaction=True, retry=True)

    async def record_size_rule(self, rule: SizeRule) -> None:
        async def record(conn: Connection) -> None:
            await conn.execute(
                "INSERT INTO nixcas_directories_meta (key, value) VALUES (%s, %s)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (RULE_KEY, rule.value),
            )

        await self._db.run(record, retry=True)
        self.size_rule = rule

    rule_recorded = True

    def __repr__(self) -> str:
        return f"PostgresDirectoryService('postgresql://{self._db.target}')"

    async def _get_raw(self, digest: B3Digest) -> bytes | None:
        async def get(conn: Connection) -> bytes | None:
            cur = await conn.execute(
                "SELECT data FROM nixcas_directories WHERE digest = %s", (bytes(digest),), binary=True
            )
            row = await cur.fetchone()
            return None if row is None else bytes(row[0])

        return await self._db.run(get, retry=True)

    async def _get_many_raw(self, digests: Sequence[B3Digest]) -> dict[B3Digest, bytes]:
        found: dict[B3Digest, bytes] = {}
        for i in range(0, len(digests), _BATCH):
            batch = [bytes(d) for d in digests[i : i + _BATCH]]

            async def get_many(conn: Connection, batch: list[bytes] = batch) -> list[tuple[bytes, bytes]]:
                cur = await conn.execute(
                    "SELECT digest, data FROM nixcas_directories WHERE digest = ANY(%s::bytea[])", (batch,), binary=True
                )
                return [(bytes(d), bytes(v)) for d, v in await cur.fetchall()]

            for d, data in await self._db.run(get_many, retry=True):
                found[B3Digest(d)] = data
        return found

    async def _put_raw(self, items: Sequence[tuple[B3Digest, bytes]]) -> None:
        # One statement = one transaction: all rows or none.  A directory already stored keeps its
        # bytes but gets the new time (re-referenced, it is young again for GC).  Idempotent, so retried.
        # Sorted: concurrent closures that share directories lock their rows in one order (no deadlock).
        unique = dict(sorted({bytes(digest): raw for digest, raw in items}.items()))
        now = time.time_ns()

        async def put(conn: Connection) -> None:
            await conn.execute(
                "INSERT INTO nixcas_directories (digest, data, mtime)"
                " SELECT d, v, %s FROM unnest(%s::bytea[], %s::bytea[]) AS t(d, v)"
                " ON CONFLICT (digest) DO UPDATE SET mtime = excluded.mtime",
                (now, list(unique), list(unique.values())),
                binary=True,
            )

        await self._db.run(put, retry=True)

    async def close(self) -> None:
        await self._db.close()

    # -- garbage collection (nixcas.castore.sweep) ----------------------------------

    async def scan_directories(self) -> AsyncIterator[list[StoredObject]]:
        """Every row in pages of :data:`_PAGE`, by key (each page one short read; nothing is held open)."""
        after = b""
        while True:

            async def page(conn: Connection, after: bytes = after) -> list[StoredObject]:
                cur = await conn.execute(
                    "SELECT digest, octet_length(data), mtime FROM nixcas_directories"
                    " WHERE digest > %s ORDER BY digest LIMIT %s",
                    (after, _PAGE),
                    binary=True,
                )
                return [
                    StoredObject(B3Digest(bytes(d)), int(size), int(mtime)) for d, size, mtime in await cur.fetchall()
                ]

            batch = await self._db.run(page, retry=True)
            if batch:
                yield batch
            if len(batch) < _PAGE:
                return
            after = bytes(batch[-1].digest)

    async def delete_directories(self, objects: Sequence[StoredObject], cutoff_ns: int) -> Deletion:
        # The age is checked by the DELETE itself: a concurrent re-put either commits first (the row is
        # young: kept) or after (it inserts the row anew).  Rows still there but not deleted were young.
        by_digest = {bytes(obj.digest): obj for obj in objects}

        async def delete(conn: Connection) -> list[tuple[bytes, bool]]:
            cur = await conn.execute(
                "WITH gone AS (DELETE FROM nixcas_directories WHERE digest = ANY(%s::bytea[]) AND mtime < %s"
                " RETURNING digest)"
                " SELECT digest, true FROM gone"
                " UNION ALL SELECT digest, false FROM nixcas_directories"
                " WHERE digest = ANY(%s::bytea[]) AND digest NOT IN (SELECT digest FROM gone)",
                (list(by_digest), cutoff_ns, list(by_digest)),
                binary=True,
            )
            return [(bytes(d), bool(deleted)) for d, deleted in await cur.fetchall()]

        outcome = dict(await self._db.run(delete, retry=False))
        done = Deletion()
        for digest, obj in by_digest.items():  # in the caller's order
            if digest in outcome:
                (done.deleted if outcome[digest] else done.kept).append(obj)
        return done

"""``sqlite:///abs/path.sqlite`` — directories in one SQLite table.

The database also records the store's directory size rule (table ``meta``,
key ``directory_size_rule``; see :mod:`nixcas.castore.sizerule`), written
when the database is first opened.

One connection, used from one dedicated worker thread (so the event loop
never blocks on SQLite).  A closure is committed in one transaction; reads
of a breadth-first level are one query.  ``sqlite://`` (no path) is a
private in-memory database.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from nixcas._sqlite import SqliteDatabase, delete_if_older, get_data, select_in
from nixcas.castore.digest import B3Digest
from nixcas.castore.dirs.base import DirectoryService, settle_size_rule
from nixcas.castore.sizerule import RULE_KEY, SizeRule
from nixcas.castore.sweep import Deletion, StoredObject
from nixcas.config import Resolver, ServiceConfig, SqlitePathConfig

__all__ = ["SqliteDirectoryService", "SqliteDirectoryServiceConfig"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS directories (
    digest BLOB PRIMARY KEY NOT NULL CHECK (length(digest) = 32),
    data   BLOB NOT NULL,
    mtime  INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
) WITHOUT ROWID;
"""
_PAGE = 1000


def _migrate(conn: sqlite3.Connection) -> None:
    """Databases made before GC have no ``mtime``: add it, stamping existing rows with the migration time.

    (Not 0: a collection right after an upgrade still gives them the grace period.)
    """
    columns = {row[1] for row in conn.execute("PRAGMA table_info(directories)")}
    if "mtime" not in columns:
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ALTER TABLE directories ADD COLUMN mtime INTEGER NOT NULL DEFAULT 0")
            conn.execute("UPDATE directories SET mtime = ?", (time.time_ns(),))


@dataclass(frozen=True)
class SqliteDirectoryServiceConfig(SqlitePathConfig, ServiceConfig[DirectoryService]):
    """``sqlite:///abs/path`` (a file) or ``sqlite://`` (in memory); composition: ``path`` (optional)."""

    async def build(self, resolver: Resolver) -> DirectoryService:
        return SqliteDirectoryService(self.path, size_rule=resolver.size_rule)


class SqliteDirectoryService(DirectoryService):
    """Canonical Directory bytes keyed by digest in an SQLite database."""

    def __init__(self, path: str | None, *, size_rule: SizeRule | None = None) -> None:
        """Open (or create) the database; ``size_rule``: the rule asked for (see :func:`settle_size_rule`)."""
        self.path = path
        self._db = SqliteDatabase(path, _SCHEMA, "directory database", _migrate)
        # settled here, so every instance knows its store's rule
        self.size_rule = self._db.run_while_opening(self._db.transaction(self._settle(size_rule)))

    rule_recorded = True

    def __repr__(self) -> str:
        return f"SqliteDirectoryService({self.path!r})"

    def _settle(self, requested: SizeRule | None) -> Callable[[sqlite3.Connection], SizeRule]:
        """Read the recorded rule (recording it if absent) and check ``requested`` against it."""

        def settle(conn: sqlite3.Connection) -> SizeRule:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (RULE_KEY,)).fetchone()
            where = f"directory database {self.path or ':memory:'}"
            recorded = None if row is None else SizeRule.parse(str(row[0]), where)
            has_directories = conn.execute("SELECT 1 FROM directories LIMIT 1").fetchone() is not None
            rule, record = settle_size_rule(recorded, has_directories, requested, where)
            if record:
                conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (RULE_KEY, rule.value))
            return rule

        return settle

    async def record_size_rule(self, rule: SizeRule) -> None:
        def record(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (RULE_KEY, rule.value),
            )

        await self._db.run(self._db.transaction(record))
        self.size_rule = rule

    async def _get_raw(self, digest: B3Digest) -> bytes | None:
        return await self._db.run(lambda: get_data(self._db.conn, "directories", digest))

    async def _get_many_raw(self, digests: Sequence[B3Digest]) -> dict[B3Digest, bytes]:
        def get_many() -> dict[B3Digest, bytes]:
            query = "SELECT digest, data FROM directories WHERE digest IN ({})"
            return {B3Digest(d): bytes(data) for d, data in select_in(self._db.conn, query, digests)}

        return await self._db.run(get_many)

    async def _put_raw(self, items: Sequence[tuple[B3Digest, bytes]]) -> None:
        # A directory already stored keeps its bytes but gets the new time: re-referenced, it is young again.
        def put(conn: sqlite3.Connection) -> None:
            now = time.time_ns()
            conn.executemany(
                "INSERT INTO directories (digest, data, mtime) VALUES (?, ?, ?)"
                " ON CONFLICT (digest) DO UPDATE SET mtime = excluded.mtime",
                [(digest, raw, now) for digest, raw in items],
            )

        await self._db.run(self._db.transaction(put))

    async def close(self) -> None:
        await self._db.close()

    # -- garbage collection (nixcas.castore.sweep) ----------------------------------

    async def scan_directories(self) -> AsyncIterator[list[StoredObject]]:
        after = b""
        while True:

            def page(after: bytes = after) -> list[StoredObject]:
                rows = self._db.conn.execute(
                    "SELECT digest, length(data), mtime FROM directories WHERE digest > ? ORDER BY digest LIMIT ?",
                    (after, _PAGE),
                )
                return [StoredObject(B3Digest(d), size, mtime) for d, size, mtime in rows]

            batch = await self._db.run(page)
            if batch:
                yield batch
            if len(batch) < _PAGE:
                return
            after = batch[-1].digest

    async def delete_directories(self, objects: Sequence[StoredObject], cutoff_ns: int) -> Deletion:
        # Check and delete are one statement inside one write transaction: a concurrent
        # re-put either lands first (the row is young and stays) or after (it is inserted anew).
        def delete(conn: sqlite3.Connection) -> Deletion:
            done = Deletion()
            for obj in objects:
                deleted = delete_if_older(conn, "directories", "mtime", obj.digest, cutoff_ns)
                if deleted is not None:
                    (done.deleted if deleted else done.kept).append(obj)
            return done

        return await self._db.run(self._db.transaction(delete))

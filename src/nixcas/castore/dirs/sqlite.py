"""``sqlite:///abs/path.sqlite`` — directories in one SQLite table.

One connection, used from one dedicated worker thread (so the event loop
never blocks on SQLite).  A closure is committed in one transaction; reads
of a breadth-first level are one query.  ``sqlite://`` (no path) is a
private in-memory database.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Self, TypeVar
from urllib.parse import SplitResult, unquote

from nixcas.castore.digest import B3Digest
from nixcas.castore.dirs.base import DirectoryService
from nixcas.config import Resolver, ServiceConfig
from nixcas.errors import ConfigurationError, StorageError
from nixcas.urls import query_options

__all__ = ["SqliteDirectoryService", "SqliteDirectoryServiceConfig"]

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS directories (
    digest BLOB PRIMARY KEY NOT NULL CHECK (length(digest) = 32),
    data   BLOB NOT NULL
) WITHOUT ROWID;
"""
_BATCH = 500  # stays below SQLite's host-parameter limit


@dataclass(frozen=True)
class SqliteDirectoryServiceConfig(ServiceConfig[DirectoryService]):
    """``sqlite:///abs/path`` (a file) or ``sqlite://`` (in memory); composition: ``path`` (optional)."""

    type_tag: ClassVar[str] = "sqlite"
    path: str | None = None

    @classmethod
    def from_url(cls, url: SplitResult) -> Self:
        if url.netloc:
            raise ConfigurationError(f"{url.geturl()!r}: sqlite URLs take no host (write sqlite:///abs/path)")
        query_options(url, set())
        config = cls(unquote(url.path) or None)
        config.validate(repr(url.geturl()))
        return config

    def validate(self, where: str) -> None:
        if self.path is None:
            return
        if not self.path.startswith("/"):
            raise ConfigurationError(f"{where}: needs an absolute path")
        if self.path.rstrip("/") == "" or self.path.endswith("/"):
            raise ConfigurationError(f"{where}: needs a file path, not a directory")

    async def build(self, resolver: Resolver) -> DirectoryService:
        return SqliteDirectoryService(self.path)


class SqliteDirectoryService(DirectoryService):
    """Canonical Directory bytes keyed by digest in an SQLite database."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nixcas-sqlite")
        try:
            self._conn: sqlite3.Connection = self._executor.submit(self._connect).result()
        except BaseException:
            self._executor.shutdown(wait=False)
            raise

    def _connect(self) -> sqlite3.Connection:
        try:
            if self.path is not None:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path or ":memory:", isolation_level=None, check_same_thread=False)
            if self.path is not None:
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as e:
            raise StorageError(f"cannot open directory database {self.path or ':memory:'}: {e}") from e
        return conn

    def __repr__(self) -> str:
        return f"SqliteDirectoryService({self.path!r})"

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._closed:
            raise StorageError(f"directory database {self.path or ':memory:'} is closed")

        def guarded() -> T:
            try:
                return fn()
            except sqlite3.Error as e:
                raise StorageError(f"directory database {self.path or ':memory:'}: {e}") from e

        return await asyncio.get_running_loop().run_in_executor(self._executor, guarded)

    async def _get_raw(self, digest: B3Digest) -> bytes | None:
        def get() -> bytes | None:
            row = self._conn.execute("SELECT data FROM directories WHERE digest = ?", (digest,)).fetchone()
            return None if row is None else bytes(row[0])

        return await self._run(get)

    async def _get_many_raw(self, digests: Sequence[B3Digest]) -> dict[B3Digest, bytes]:
        def get_many() -> dict[B3Digest, bytes]:
            found: dict[B3Digest, bytes] = {}
            for i in range(0, len(digests), _BATCH):
                batch = digests[i : i + _BATCH]
                marks = ",".join("?" * len(batch))
                query = f"SELECT digest, data FROM directories WHERE digest IN ({marks})"  # noqa: S608
                for d, data in self._conn.execute(query, batch):
                    found[B3Digest(d)] = bytes(data)
            return found

        return await self._run(get_many)

    async def _put_raw(self, items: Sequence[tuple[B3Digest, bytes]]) -> None:
        def put() -> None:
            with self._conn:
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.executemany("INSERT OR IGNORE INTO directories (digest, data) VALUES (?, ?)", items)

        await self._run(put)

    async def close(self) -> None:
        if self._closed:
            return
        await self._run(self._conn.close)
        self._closed = True
        self._executor.shutdown(wait=True)

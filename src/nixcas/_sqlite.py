"""One SQLite database used from one dedicated worker thread (shared by the SQLite backends).

Every statement runs in the database's own single thread, so one
connection serves all calls in order.  The one exception is
:meth:`SqliteDatabase.read_now`: a point read on a second, read-only
connection in the caller's thread that never waits for a lock (a server's
hot path, where the hand-off to the database thread costs more than the read;
:meth:`SqliteDatabase.value_now`'s point reads of one event-loop iteration share
one read transaction).
Files use WAL with ``synchronous=FULL`` (a committed transaction survives a
crash); no path means a private in-memory database.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence

from nixcas.errors import StorageError

TYPE_CHECKING = False  # not typing's: a plain read (`path-info`, `castore ls`) loads nothing else of it
if TYPE_CHECKING:  # asyncio, its executor and URL parsing are loaded by the services, not by a plain read
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from typing import Any, Concatenate, ParamSpec, TypeVar

    T = TypeVar("T")
    P = ParamSpec("P")
    R = TypeVar("R")

__all__ = [
    "Busy",
    "ConnectionUses",
    "SqliteDatabase",
    "delete_if_older",
    "first_value",
    "get_data",
    "select_in",
    "using_connection",
]

READER_MMAP = 256 << 20
"""Bytes of the database :meth:`SqliteDatabase.read_now`'s connection maps (address space, not memory)."""
BATCH = 500
"""Rows per ``IN (…)`` query: below SQLite's host-parameter limit."""


def get_data(conn: sqlite3.Connection, table: str, key: bytes) -> bytes | None:
    """The ``data`` of row ``key`` of ``table`` (a value table keyed by ``digest``), or ``None``.

    ``table`` is the caller's own name, never input.
    """
    return first_value(conn, f"SELECT data FROM {table} WHERE digest = ?", key)  # noqa: S608


def _running_loop() -> Any:
    """The running event loop of this thread, or ``None`` (asyncio loaded by the first call)."""
    global _loop_getter
    if _loop_getter is None:
        from asyncio import _get_running_loop

        _loop_getter = _get_running_loop
    return _loop_getter()


_loop_getter: Callable[[], Any] | None = None


def first_value(conn: sqlite3.Connection, query: str, key: bytes) -> bytes | None:
    """The first column of the row ``query`` selects with ``key`` as its one parameter, as bytes; or ``None``."""
    row = conn.execute(query, (key,)).fetchone()
    return None if row is None else bytes(row[0])


def select_in(conn: sqlite3.Connection, query: str, keys: Sequence[Any]) -> Iterator[Any]:
    """The rows of ``query`` for all ``keys``, asked :data:`BATCH` at a time; its ``{}`` stands for the ``IN`` list."""
    for i in range(0, len(keys), BATCH):
        batch = keys[i : i + BATCH]
        yield from conn.execute(query.format(",".join("?" * len(batch))), batch)


def delete_if_older(conn: sqlite3.Connection, table: str, time_column: str, key: bytes, cutoff_ns: int) -> bool | None:
    """Delete row ``key`` of ``table`` if its ``time_column`` is still older than ``cutoff_ns`` (one statement,
    so a concurrent re-put either lands first and keeps it, or after and inserts it anew).

    ``True``: deleted; ``False``: kept (younger); ``None``: no such row.  ``table`` and
    ``time_column`` are the caller's own names, never input.
    """
    if conn.execute(f"DELETE FROM {table} WHERE digest = ? AND {time_column} < ?", (key, cutoff_ns)).rowcount:  # noqa: S608
        return True
    return False if conn.execute(f"SELECT 1 FROM {table} WHERE digest = ?", (key,)).fetchone() else None  # noqa: S608


class Busy(Exception):
    """:meth:`SqliteDatabase.read_now` could not answer without waiting: use :meth:`SqliteDatabase.run`."""


class SqliteDatabase:
    """A connection with its own thread; ``what`` names it in errors ("directory database")."""

    def __init__(
        self, path: str | None, schema: str, what: str, migrate: Callable[[sqlite3.Connection], None] | None = None
    ) -> None:
        self.path = path
        self._schema = schema
        self._migrate = migrate
        self._what = f"{what} {path or ':memory:'}"
        self._closed = False
        self._reader: sqlite3.Connection | None = None
        self._snapshot: Any = None
        """The event loop whose current iteration the reader's open read transaction belongs to (:meth:`value_now`)."""
        from concurrent.futures import ThreadPoolExecutor

        self._executor: ThreadPoolExecutor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nixcas-sqlite")
        try:
            self.conn: sqlite3.Connection = self._executor.submit(self._connect).result()
        except BaseException:
            self._executor.shutdown(wait=False)
            raise

    def _connect(self) -> sqlite3.Connection:
        try:
            if self.path is not None:
                os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            conn = sqlite3.connect(self.path or ":memory:", isolation_level=None, check_same_thread=False)
            if self.path is not None:
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(self._schema)
            if self._migrate is not None:  # bring a database made by an older schema up to date
                self._migrate(conn)
        except (sqlite3.Error, OSError) as e:
            raise StorageError(f"cannot open {self._what}: {e}") from e
        return conn

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in the database thread; SQLite errors become :class:`StorageError`."""
        if self._closed:
            raise StorageError(f"{self._what} is closed")

        def guarded() -> T:
            try:
                return fn()
            except sqlite3.Error as e:
                raise StorageError(f"{self._what}: {e}") from e

        import asyncio

        return await asyncio.get_running_loop().run_in_executor(self._executor, guarded)

    def run_while_opening(self, fn: Callable[[], T]) -> T:
        """:meth:`run` from a constructor (no event loop needed); on any error the database is closed."""
        try:
            return self._executor.submit(fn).result()
        except sqlite3.Error as e:
            self._executor.submit(self.conn.close).result()
            self._executor.shutdown(wait=False)
            raise StorageError(f"{self._what}: {e}") from e
        except BaseException:
            self._executor.submit(self.conn.close).result()
            self._executor.shutdown(wait=False)
            raise

    def read_now(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn`` on a read-only connection of the calling thread, at once; :class:`Busy` if that would wait.

        For point reads on a hot path (a few microseconds on a local file,
        less than handing the call to the database thread and back).  The
        connection never waits for a lock (a busy database raises
        :class:`Busy`), and sees every transaction committed before the call,
        by this process or another.  A database in memory has no second
        connection: always :class:`Busy`.  Call it from one thread only.
        """
        if self._closed:
            raise StorageError(f"{self._what} is closed")
        try:
            if self._reader is None:
                if self.path is None:
                    raise Busy
                reader = sqlite3.connect(self.path, isolation_level=None, timeout=0, check_same_thread=False)
                reader.execute("PRAGMA query_only=1")
                reader.execute(f"PRAGMA mmap_size={READER_MMAP}")  # pages read without a syscall each
                self._reader = reader
            return fn(self._reader)
        except sqlite3.Error as e:
            raise self._read_error(e) from e

    def value_now(self, query: str, key: bytes) -> bytes | None:
        """:meth:`read_now` of a point read: the first column of the row ``query`` selects with ``key`` as its
        one parameter, or ``None`` (for a server's hot path: no closure, the open reader used directly).

        Called from a running event loop, the point reads of one iteration of that loop share one read
        transaction, begun by the first of them and ended when the loop's next iteration starts: it sees
        every transaction committed before any request answered in that iteration was received (each
        was readable before the iteration began), and a read never waits for a lock.  Beginning and
        ending a read transaction (its locks, the file's size) costs more than the read itself.
        """
        reader = self._reader
        if reader is None or self._closed:
            return self.read_now(lambda conn: first_value(conn, query, key))
        snapshot = self._snapshot
        try:
            if snapshot is None or not snapshot.is_running():  # running: this is the iteration that began it
                if snapshot is not None:  # its loop no longer runs (the end it scheduled may never come)
                    self._end_snapshot()
                loop = _running_loop()  # asked once an iteration (Python 3.11 asks the kernel for the pid)
                if loop is not None:
                    reader.execute("BEGIN")
                    self._snapshot = loop
                    loop.call_soon(self._end_snapshot)
            return first_value(reader, query, key)
        except sqlite3.Error as e:
            self._end_snapshot()
            raise self._read_error(e) from e

    def _end_snapshot(self) -> None:
        """End the read transaction :meth:`value_now` began, if it is still open."""
        if self._snapshot is None:
            return
        self._snapshot = None
        if self._reader is not None and self._reader.in_transaction:
            try:
                self._reader.execute("COMMIT")  # a read transaction: nothing to write
            except sqlite3.Error:
                self._reader.rollback()

    def _read_error(self, e: sqlite3.Error) -> Exception:
        """What a read at once raises for ``e``: :class:`Busy` if the database is locked, else a StorageError."""
        if isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e)):
            return Busy()
        return StorageError(f"{self._what}: {e}")

    def transaction(self, fn: Callable[[sqlite3.Connection], T]) -> Callable[[], T]:
        """``fn`` wrapped in one immediate write transaction (for :meth:`run`)."""

        def run_in_transaction() -> T:
            with self.conn:
                self.conn.execute("BEGIN IMMEDIATE")
                return fn(self.conn)

        return run_in_transaction

    async def close(self) -> None:
        if self._closed:
            return
        await self.run(self.conn.close)
        if self._reader is not None:
            self._snapshot = None
            self._reader.close()
            self._reader = None
        self._closed = True
        self._executor.shutdown(wait=True)


class ConnectionUses:
    """The uses of a service's per-thread SQLite connections, counted so that closing them waits for all.

    Closing a connection while another thread runs a query on it crashes the process, and reads keep running on
    worker threads after their caller went away (an abandoned NAR stream).  :meth:`begin` refuses once
    :meth:`close` has begun (but not a use nested in one this thread holds); :meth:`close` returns once every
    use begun before has ended.
    """

    def __init__(self, lock: threading.Lock) -> None:
        import threading  # (a plain read loads no threading)

        self._idle = threading.Condition(lock)
        self._running = 0  # threads in a use
        self._closing = False
        self._depth = threading.local()  # this thread's nested uses

    def begin(self) -> bool:
        """Count one use (``False``: the connections are closing; use none)."""
        depth: int = getattr(self._depth, "n", 0)
        if not depth:
            with self._idle:
                if self._closing:
                    return False
                self._running += 1
        self._depth.n = depth + 1
        return True

    def end(self) -> None:
        self._depth.n -= 1
        if self._depth.n:
            return
        with self._idle:
            self._running -= 1
            if not self._running:
                self._idle.notify_all()

    def close(self) -> None:
        """Refuse new uses and wait for the running ones; called holding the lock given to the constructor."""
        self._closing = True
        while self._running:
            self._idle.wait()


def using_connection(method: Callable[Concatenate[Any, P], R]) -> Callable[Concatenate[Any, P], R]:
    """``method`` of a service with ``_uses`` (:class:`ConnectionUses`) counted as a use of its thread's
    connection; refused with :class:`StorageError` once the service is closing."""

    import functools

    @functools.wraps(method)
    def use(self: Any, /, *args: P.args, **kwargs: P.kwargs) -> R:
        uses: ConnectionUses = self._uses
        if not uses.begin():
            raise StorageError(f"{self}: closed")
        try:
            return method(self, *args, **kwargs)
        finally:
            uses.end()

    return use

"""A PostgreSQL database behind a connection pool (shared by the PostgreSQL backends).

URL form::

    postgresql://user:password@host:port/dbname?pool_max=20&sslmode=require

(``postgres://`` is the same).  Composition form: ``type = "postgresql"``,
``url = "postgresql://…"`` and the nixcas options as fields
(``pool_max = 20``).

Options are of two kinds:

* nixcas's own, checked here: ``pool_min`` (connections kept open, default
  1), ``pool_max`` (at most, default 10), ``connect_timeout`` (whole seconds,
  default 10: how long opening a connection, or waiting for a free one from
  the pool, may take before the call fails with
  :class:`~nixcas.errors.UnavailableError`).  In a URL they are query
  options; in a composition table they are fields, not part of ``url``.
* a fixed set of libpq connection parameters, passed through unchanged
  (``sslmode``, ``application_name``, ``host`` for a unix socket directory,
  … — see :data:`LIBPQ_OPTIONS`).  Anything else is a
  :class:`~nixcas.errors.ConfigurationError` naming the known options, so a
  typo never silently means a default.

Everything the URL leaves out comes from libpq's defaults and environment
(``PGHOST``, ``PGUSER``, ``PGPASSWORD``, ``PGDATABASE``, ``~/.pgpass``, …), so
credentials need not be written into a URL at all.  Error messages and
``repr`` name ``host:port/dbname`` and never the password.

Opening (:meth:`PostgresDatabase.open`) first makes one plain connection, so
an unreachable server (:class:`~nixcas.errors.UnavailableError`), a wrong
password or a missing database (:class:`~nixcas.errors.ConfigurationError`)
is reported as such instead of as a pool timeout.  On that connection the
schema is created or migrated in one transaction holding
``pg_advisory_xact_lock``: several daemons starting at once on one database
queue up, the first one migrates and the others find it done.  Versions are
kept per component in ``nixcas_schema``, so later releases append
migrations.

The pool checks each connection as it is handed out and replaces dead ones
(after a server restart), and a read that fails because its connection died
is tried once more on a fresh one: a restart between calls is invisible.  A
call while the server is down fails with
:class:`~nixcas.errors.UnavailableError` within ``connect_timeout``.  The
pool reconnects in the background with backoff, starting over every
``connect_timeout``, so it recovers soon after the server is back.
"""

from __future__ import annotations

import asyncio
import getpass
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self, TypeVar
from urllib.parse import SplitResult, parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from nixcas.errors import ConfigurationError, StorageError, UnavailableError
from nixcas.ops import tracing
from nixcas.urls import is_decimal, require_plain_scheme, shown

__all__ = ["LIBPQ_OPTIONS", "NIXCAS_OPTIONS", "Connection", "PostgresConfig", "PostgresDatabase"]

T = TypeVar("T")
Connection = psycopg.AsyncConnection[tuple[Any, ...]]

NIXCAS_OPTIONS = ("connect_timeout", "pool_max", "pool_min")
LIBPQ_OPTIONS = frozenset(
    {
        "application_name",
        "channel_binding",
        "gssencmode",
        "host",
        "hostaddr",
        "keepalives",
        "keepalives_count",
        "keepalives_idle",
        "keepalives_interval",
        "options",
        "passfile",
        "port",
        "service",
        "sslcert",
        "sslcrl",
        "sslkey",
        "sslmode",
        "sslrootcert",
        "target_session_attrs",
        "tcp_user_timeout",
        "user",
    }
)
"""libpq connection parameters a URL may carry (everything but secrets and what nixcas sets itself)."""

SCHEMES = ("postgresql", "postgres")
_LOCK_KEY = int.from_bytes(b"nixcas", "big")
"""The advisory lock serializing schema migrations of every nixcas on one database."""
_SCHEMA_TABLE = "CREATE TABLE IF NOT EXISTS nixcas_schema (component text PRIMARY KEY, version integer NOT NULL)"


def _known_options() -> str:
    return ", ".join(NIXCAS_OPTIONS) + "; libpq: " + ", ".join(sorted(LIBPQ_OPTIONS))


def _positive(where: str, key: str, text: str, minimum: int) -> int:
    if not is_decimal(text) or int(text) < minimum:
        raise ConfigurationError(f"{where}: option {key} must be a whole number ≥ {minimum}, got {text!r}")
    return int(text)


def _check_ports(where: str, hosts: str) -> None:
    """Each ``host:port`` of a (libpq multi-host) ``h1:p1,h2`` list has a numeric port (libpq does not check)."""
    for host in hosts.split(","):
        port = host.rpartition("]")[2].rpartition(":")[2] if ":" in host.rpartition("]")[2] else ""
        if port and not (is_decimal(port) and 0 < int(port) < 65536):
            raise ConfigurationError(f"{where}: invalid PostgreSQL URL: port {port!r} is not a number from 1 to 65535")


_CONNECTION_STATES = ("57P01", "57P02", "57P03", "57P04", "57P05", "25P03")
"""The server ended the session (beside SQLSTATE class 08): admin/crash shutdown, cannot connect now,
database dropped, idle session timeout, idle-in-transaction timeout."""


def _connection_lost(e: psycopg.Error) -> bool:
    """``e`` says the connection or the server is gone (not: the statement failed, a deadlock, a timeout)."""
    state = e.sqlstate
    if state is None:  # raised by the client (connection closed, cannot connect): no server answer at all
        return isinstance(e, psycopg.OperationalError)
    return state.startswith("08") or state in _CONNECTION_STATES


@dataclass(frozen=True)
class PostgresConfig:
    """``postgresql://user:pass@host:port/db?pool_max=N``; composition: ``url`` plus ``pool_min``, ``pool_max``,
    ``connect_timeout``."""

    type_tag: ClassVar[str] = "postgresql"
    url: str = field(repr=False)
    """The libpq connection URL (without nixcas options): may hold the password, so it is kept out of ``repr``."""
    pool_min: int = 1
    pool_max: int = 10
    connect_timeout: int = 10

    @classmethod
    def from_url(cls, url: SplitResult) -> Self:
        require_plain_scheme(url)
        where = repr(shown(url))
        ours: dict[str, int] = {}
        passed: list[tuple[str, str]] = []
        try:
            pairs = parse_qsl(url.query, keep_blank_values=True, strict_parsing=bool(url.query))
        except ValueError as e:
            raise ConfigurationError(f"{where}: invalid options: {e}") from None
        for key, value in pairs:
            if key in ours or any(k == key for k, _ in passed):
                raise ConfigurationError(f"{where}: option {key!r} given twice")
            if key in NIXCAS_OPTIONS:
                ours[key] = _positive(where, key, value, 0 if key == "pool_min" else 1)
            elif key in LIBPQ_OPTIONS:
                passed.append((key, value))
            else:
                raise ConfigurationError(f"{where}: unknown option {key!r} (known: {_known_options()})")
        conninfo = urlunsplit((url.scheme, url.netloc, url.path, urlencode(passed, quote_via=quote), url.fragment))
        config = cls(conninfo, **ours)
        config.validate(where)
        return config

    def validate(self, where: str) -> None:
        try:
            parts = urlsplit(self.url)
        except ValueError as e:
            raise ConfigurationError(f"{where}: invalid url: {e}") from None
        if parts.scheme not in SCHEMES:
            raise ConfigurationError(f"{where}: url must start with postgresql:// (got {parts.scheme or 'none'}://)")
        if parts.fragment:
            raise ConfigurationError(f"{where}: url takes no #fragment")
        _check_ports(where, parts.netloc.rpartition("@")[2])
        for key, _ in parse_qsl(parts.query, keep_blank_values=True):
            if key not in LIBPQ_OPTIONS:
                hint = " (nixcas options are fields of the table, not part of url)" if key in NIXCAS_OPTIONS else ""
                known = ", ".join(sorted(LIBPQ_OPTIONS))
                raise ConfigurationError(f"{where}: unknown libpq option {key!r} in url{hint} (known: {known})")
        if self.pool_min < 0 or self.pool_max < 1 or self.pool_min > self.pool_max:
            raise ConfigurationError(
                f"{where}: need 0 ≤ pool_min ≤ pool_max and pool_max ≥ 1 (got {self.pool_min}, {self.pool_max})"
            )
        if self.connect_timeout < 1:
            raise ConfigurationError(f"{where}: connect_timeout must be at least 1 second")
        try:
            conninfo_to_dict(self.url)
        except psycopg.Error as e:
            raise ConfigurationError(f"{where}: invalid PostgreSQL URL: {_scrub(str(e), self.url)}") from None

    def target(self) -> str:
        """``host:port/dbname`` as libpq will resolve it (URL, then environment, then defaults); no secrets."""
        params = conninfo_to_dict(self.url)
        host = str(params.get("host") or os.environ.get("PGHOST") or "localhost")
        port = str(params.get("port") or os.environ.get("PGPORT") or "5432")
        user = str(params.get("user") or os.environ.get("PGUSER") or "")
        dbname = str(params.get("dbname") or os.environ.get("PGDATABASE") or user or "?")
        return f"{host}:{port}/{dbname}"

    def user(self) -> str:
        return str(conninfo_to_dict(self.url).get("user") or os.environ.get("PGUSER") or getpass.getuser())


def _scrub(message: str, url: str) -> str:
    """``message`` on one line, without the URL's password should libpq ever repeat it."""
    text = " ".join(line.strip() for line in message.splitlines() if line.strip())
    try:
        password = conninfo_to_dict(url).get("password")
    except psycopg.Error:
        password = urlsplit(url).password
    if password:
        text = text.replace(str(password), "***")
    return text.removeprefix("connection failed: ")


class PostgresDatabase:
    """A pool of connections to one database whose schema ``component`` is brought to ``migrations``.

    ``migrations[i]`` holds the statements taking the component from version
    ``i`` to ``i + 1``; they must stay unchanged once released (append new ones).
    """

    def __init__(self, config: PostgresConfig, what: str, component: str, migrations: Sequence[Sequence[str]]) -> None:
        self.config = config
        self.target = config.target()
        self._what = f"{what} postgresql://{self.target}"
        self._component = component
        self._migrations = migrations
        self._pool: AsyncConnectionPool[Connection] | None = None
        self._closed = False
        address, _, dbname = self.target.rpartition("/")
        host, _, port = address.rpartition(":")
        self._span_attributes: dict[str, str | int] = {
            "db.system": "postgresql",
            "db.system.name": "postgresql",
            "db.namespace": dbname,
            "server.address": host,
            "server.port": int(port) if port.isdecimal() else port,
        }
        """What every span of this database says (never the user's password: the target has none)."""

    def __str__(self) -> str:
        return self._what

    # -- opening -------------------------------------------------------------------

    def _connect_kwargs(self) -> dict[str, Any]:
        # libpq's own timeout is per address and at least 2 s; the asyncio one bounds the whole attempt.
        return {"autocommit": True, "connect_timeout": max(2, self.config.connect_timeout)}

    def _open_error(self, e: psycopg.Error | TimeoutError) -> Exception:
        """What a failed first connection means: bad credentials / database, or an unreachable server."""
        if isinstance(e, TimeoutError):
            return UnavailableError(
                f"{self._what}: no connection within {self.config.connect_timeout} s (is the server reachable?)"
            )
        message = _scrub(str(e), self.config.url)
        lowered = message.lower()
        sqlstate = getattr(e, "sqlstate", None)
        if (
            sqlstate in ("28P01", "28000")
            or "authentication failed" in lowered
            or "no password supplied" in lowered
            or ("role" in lowered and "does not exist" in lowered)
        ):
            return ConfigurationError(
                f"{self._what}: authentication failed for user {self.config.user()!r} "
                "(check the user and password in the URL, PGPASSWORD or ~/.pgpass)"
            )
        if sqlstate == "3D000" or ("database" in lowered and "does not exist" in lowered):
            return ConfigurationError(f"{self._what}: the database does not exist (create it first): {message}")
        if isinstance(e, psycopg.OperationalError):
            return UnavailableError(f"{self._what}: cannot connect: {message}")
        return StorageError(f"{self._what}: {message}")

    async def open(self) -> None:
        """Connect once (diagnosing failures), migrate the schema, then open the pool."""
        try:
            async with asyncio.timeout(self.config.connect_timeout + 1):
                conn = await psycopg.AsyncConnection.connect(self.config.url, **self._connect_kwargs())
        except (psycopg.Error, TimeoutError) as e:
            raise self._open_error(e) from None
        try:
            await self._migrate(conn)
        except psycopg.Error as e:
            raise self._error(e) from e
        finally:
            await conn.close()
        pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
            self.config.url,
            kwargs=self._connect_kwargs(),
            min_size=self.config.pool_min,
            max_size=self.config.pool_max,
            timeout=self.config.connect_timeout,
            # Reconnection backs off (1 s, 2 s, 4 s …); giving up after connect_timeout lets the next
            # call start a fresh attempt, so the pool is usable again soon after the server is back.
            reconnect_timeout=self.config.connect_timeout,
            check=AsyncConnectionPool.check_connection,
            name=self._what,
            open=False,
        )
        try:
            await pool.open(wait=self.config.pool_min > 0, timeout=self.config.connect_timeout)
        except psycopg.Error as e:
            await pool.close()
            raise self._open_error(e) from None
        self._pool = pool

    async def _migrate(self, conn: Connection) -> None:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            await conn.execute(_SCHEMA_TABLE)
            cur = await conn.execute("SELECT version FROM nixcas_schema WHERE component = %s", (self._component,))
            row = await cur.fetchone()
            current = 0 if row is None else int(row[0])
            if current > len(self._migrations):
                raise StorageError(
                    f"{self._what}: schema of {self._component} is at version {current}, newer than this nixcas "
                    f"knows ({len(self._migrations)}); upgrade nixcas"
                )
            for version in range(current, len(self._migrations)):
                for statement in self._migrations[version]:
                    await conn.execute(statement)  # constant SQL of this module
            if current < len(self._migrations):
                await conn.execute(
                    "INSERT INTO nixcas_schema (component, version) VALUES (%s, %s)"
                    " ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                    (self._component, len(self._migrations)),
                )

    # -- calls ---------------------------------------------------------------------

    def _error(self, e: psycopg.Error) -> StorageError:
        message = _scrub(str(e), self.config.url)
        if isinstance(e, PoolTimeout):
            return UnavailableError(f"{self._what}: no connection within {self.config.connect_timeout} s: {message}")
        if _connection_lost(e) or (e.sqlstate or "").startswith("53"):  # 53: out of connections, disk, memory
            return UnavailableError(f"{self._what}: {message}")
        return StorageError(f"{self._what}: {message}")

    def _live_pool(self) -> AsyncConnectionPool[Connection]:
        if self._pool is None or self._closed:
            raise StorageError(f"{self._what} is closed")
        return self._pool

    def _span(self, operation: str) -> AbstractContextManager[None]:
        """A CLIENT span ``postgresql <component>.<operation>`` (no SQL, no parameters) when tracing is on."""
        if not tracing.enabled():
            return nullcontext()
        name = f"{self._component}.{operation}"
        return tracing.backend_span(f"postgresql {name}", {**self._span_attributes, "db.operation.name": name})

    async def _attempt(self, fn: Callable[[Connection], Awaitable[T]], transaction: bool) -> T:
        with self._span(fn.__name__):
            return await self._attempt_untraced(fn, transaction)

    async def _attempt_untraced(self, fn: Callable[[Connection], Awaitable[T]], transaction: bool) -> T:
        async with self._live_pool().connection() as conn:
            if not transaction:
                return await fn(conn)
            async with conn.transaction():
                return await fn(conn)

    async def run(self, fn: Callable[[Connection], Awaitable[T]], *, transaction: bool = False, retry: bool) -> T:
        """``fn`` on a pooled connection (in one transaction if asked); psycopg errors become storage errors.

        With ``retry`` (only for idempotent work: reads, upserts) a call whose
        connection broke is run once more on a fresh connection, so a server
        restart between calls is invisible.  A pool timeout is not retried: the
        server is down, and the caller should hear so within the timeout.
        """
        try:
            return await self._attempt(fn, transaction)
        except PoolTimeout as e:
            raise self._error(e) from e
        except psycopg.Error as e:
            # Retried: work on a connection that broke, and a deadlock (the other transaction went through).
            if not retry or not (_connection_lost(e) or isinstance(e, psycopg.errors.DeadlockDetected)):
                raise self._error(e) from e
        try:
            return await self._attempt(fn, transaction)
        except psycopg.Error as e:
            raise self._error(e) from e

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        """A pooled connection inside a transaction, for streaming (server-side cursors); not retried."""
        try:
            with self._span("transaction"):
                async with self._live_pool().connection() as conn, conn.transaction():
                    yield conn
        except psycopg.Error as e:
            raise self._error(e) from e

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            await self._pool.close()

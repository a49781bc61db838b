"""A real, throw-away PostgreSQL server for tests of the PostgreSQL backends.

:class:`PostgresServer` runs ``initdb`` and ``postgres`` from the Debian
(or any) PostgreSQL installation into a private temporary directory:

* as an unprivileged user when the tests run as root (PostgreSQL refuses to
  run as root) — ``nobody`` — with the directory chowned to it;
* listening on 127.0.0.1 only, on a free port, plus a unix socket inside the
  directory (used with ``trust`` for administration);
* TCP connections need a password (SCRAM), so a wrong password is testable;
* stopped by PID: SIGINT (fast shutdown), SIGKILL a few seconds later.

:meth:`PostgresServer.restart` comes back on the same port (the fault test
for a server restart during a session).  :func:`postgres_or_skip` starts one
or skips the test when the PostgreSQL binaries are not installed.

Usage from a test module::

    @pytest.fixture(scope="session")
    def pg_server() -> Iterator[PostgresServer]:
        yield from postgres_or_skip()

    @pytest.fixture
    def pg_url(pg_server: PostgresServer) -> Iterator[str]:
        with pg_server.fresh_database() as url:
            yield url
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from nixcas.testing.daemon import free_port

__all__ = ["PASSWORD", "USER", "PostgresServer", "find_postgres_bin", "postgres_or_skip"]

USER = "nixcas"
"""The superuser role made by ``initdb`` (password-authenticated over TCP)."""
PASSWORD = "s3cret-test-password"  # noqa: S105 (a throw-away test cluster)
_UNPRIVILEGED = "nobody"


def find_postgres_bin() -> Path | None:
    """The directory holding ``initdb`` and ``postgres`` (PATH first, then Debian's versioned dirs)."""
    found = shutil.which("initdb")
    if found and (Path(found).parent / "postgres").exists():
        return Path(found).parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True)
    for candidate in candidates:
        if (candidate / "initdb").exists() and (candidate / "postgres").exists():
            return candidate
    return None


class PostgresServer:
    """One PostgreSQL cluster in a temporary directory; :meth:`start` / :meth:`stop` / :meth:`close`."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="nixcas-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._user: str | None = _UNPRIVILEGED if os.geteuid() == 0 else None
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._initdb()

    def _run_as(self) -> dict[str, str]:
        return {"user": self._user} if self._user is not None else {}

    def _initdb(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if self._user is not None:
            shutil.chown(pwfile, self._user)
        result = subprocess.run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                USER,
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            check=False,
            cwd=self.root,
            **self._run_as(),  # type: ignore[call-overload]
        )
        pwfile.unlink()
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed: {result.stderr.strip()}")

    def start(self, timeout: float = 30.0) -> None:
        """Start the server (on :attr:`port`) and wait until it accepts connections."""
        assert self.process is None, "already running"
        log = self.log.open("ab")
        self.process = subprocess.Popen(
            [
                str(self.bindir / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-k",
                str(self.root),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            **self._run_as(),  # type: ignore[call-overload]
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                self.process = None
                raise RuntimeError(f"postgres exited at start: {self.log.read_text(errors='replace')[-2000:]}")
            try:
                with self.admin():
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        """Fast shutdown (SIGINT); SIGKILL if it is still there after a few seconds."""
        process, self.process = self.process, None
        if process is None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self) -> None:
        """Stop and start again on the same port (clients see their connections die)."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def admin(self, dbname: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        """A superuser connection over the unix socket (trust), in autocommit mode."""
        return psycopg.connect(host=str(self.root), port=self.port, user=USER, dbname=dbname, autocommit=True)

    def url(self, dbname: str, *, password: str = PASSWORD, port: int | None = None, query: str = "") -> str:
        """A ``postgresql://`` service URL for ``dbname`` over TCP."""
        text = f"postgresql://{USER}:{password}@127.0.0.1:{port or self.port}/{dbname}"
        return f"{text}?{query}" if query else text

    def create_database(self) -> str:
        name = f"t_{secrets.token_hex(6)}"
        with self.admin() as conn:
            conn.execute(f"CREATE DATABASE {name}")  # a generated identifier, not input
        return name

    def drop_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    @contextlib.contextmanager
    def fresh_database(self) -> Iterator[str]:
        """A new empty database for one test; its URL.  Dropped afterwards."""
        name = self.create_database()
        try:
            yield self.url(name)
        finally:
            if self.process is not None:
                self.drop_database(name)


def postgres_or_skip() -> Iterator[PostgresServer]:
    """A started server (closed when the generator ends), or a skip when PostgreSQL is not installed."""
    bindir = find_postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, postgres) are not installed (apt-get install postgresql)")
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server
    finally:
        server.close()

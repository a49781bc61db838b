"""Running ``nixcas daemon`` as a real subprocess from tests (started and killed by PID)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest

__all__ = [
    "STARTUP_TIMEOUT",
    "Daemon",
    "ServerProcess",
    "clean_env",
    "files_under",
    "free_port",
    "nixcas_command",
    "read_line",
    "running_daemon",
    "short_tmpdir",
    "start_daemon",
]

STARTUP_TIMEOUT = 20.0
"""Seconds a daemon may take to print its 'listening on' line."""

_ENV_OVERRIDES = (
    "BLOB_SERVICE_ADDR",
    "DIRECTORY_SERVICE_ADDR",
    "PATH_INFO_SERVICE_ADDR",
    "PIN_SERVICE_ADDR",
    "NIXCAS_STORE_DIR",
    "NIXCAS_COMPOSITION",
)


def nixcas_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "nixcas.cli.main", *args]


def as_systemd_starts(command: Sequence[str], sockets: Sequence[socket.socket]) -> tuple[list[str], list[int]]:
    """``command`` as systemd starts a socket-activated service: ``sockets`` at fds 3, 4, …, ``LISTEN_PID`` its pid.

    Returns the argv and the ``pass_fds`` for :class:`subprocess.Popen` (with ``LISTEN_FDS`` in its
    environment).  A small exec'd trampoline moves the sockets into place, sets ``LISTEN_PID`` and
    execs the command in the same process: no Python code runs between fork and exec (a
    ``preexec_fn`` can hang the child of a process whose other threads hold locks, e.g. grpc's).
    Close the returned fds once the child started.
    """
    import fcntl

    high = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, 100) for s in sockets]  # clear of 3, 4, …
    trampoline = (
        "import os, sys\n"
        "fds = [int(fd) for fd in sys.argv[1].split(',')]\n"
        "for i, fd in enumerate(fds):\n"
        "    os.dup2(fd, 3 + i)\n"
        "for fd in fds:\n"
        "    os.close(fd)\n"
        "os.environ['LISTEN_PID'] = str(os.getpid())\n"
        "os.execv(sys.argv[2], sys.argv[2:])\n"
    )
    return [sys.executable, "-c", trampoline, ",".join(map(str, high)), *command], high


def clean_env() -> dict[str, str]:
    """This environment without the variables that would pick another store."""
    return {k: v for k, v in os.environ.items() if k not in _ENV_OVERRIDES}


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def files_under(root: Path) -> list[str]:
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


@contextlib.contextmanager
def short_tmpdir() -> Iterator[Path]:
    """A directory with a short path (unix socket paths are limited to 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="nixcas-t-") as d:
        yield Path(d)


@dataclass
class ServerProcess:
    """A long-running ``nixcas`` subprocess (a daemon, a mount) with its stderr in a log file."""

    proc: subprocess.Popen[bytes]
    log: Path

    kind: ClassVar[str] = "process"
    exit_timeout: ClassVar[float] = 10.0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float | None = None) -> int:
        timeout = self.exit_timeout if timeout is None else timeout
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.kind} {self.pid} did not exit within {timeout} s; stderr:\n{self.stderr()}")

    def stop(self, timeout: float | None = None) -> int:
        """SIGTERM, then wait for the exit code."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass
class Daemon(ServerProcess):
    """A running ``nixcas daemon`` subprocess."""

    url: str = ""
    store: Path | None = None

    kind: ClassVar[str] = "daemon"

    @property
    def unix_path(self) -> Path | None:
        prefix = "grpc+unix://"
        return Path(self.url.removeprefix(prefix)) if self.url.startswith(prefix) else None

    @property
    def target(self) -> str:
        """The grpc channel target."""
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        return self.url.removeprefix("grpc+http://")

    def client_url(self, **options: str) -> str:
        options = {"wait-connect": "1", "connect-timeout": "10", **options}
        return self.url + "?" + "&".join(f"{k}={v}" for k, v in options.items())

    # -- the embedded store on disk ------------------------------------------------

    def temp_files(self) -> list[str]:
        assert self.store is not None
        return files_under(self.store / "blobs" / "tmp")

    def settled_temp_files(self, timeout: float = 5.0) -> list[str]:
        """Temp files left once the daemon had ``timeout`` seconds to clean up after a cancelled call."""
        deadline = time.monotonic() + timeout
        while (left := self.temp_files()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return left

    def reset(self) -> None:
        """Empty the store behind the daemon's back (it keeps no caches of either)."""
        assert self.store is not None
        for kind in ("blobs", "chunks"):
            for path in (self.store / "blobs" / kind).rglob("*"):
                if not path.is_dir():
                    path.unlink()
        for name, table in (("blobs/packs.sqlite", "blobs"), ("directories.sqlite", "directories")):
            if not (self.store / name).exists():
                continue
            db = sqlite3.connect(self.store / name, timeout=10)
            try:
                with db:
                    db.execute(f"DELETE FROM {table}")  # noqa: S608 - our own table names
            finally:
                db.close()


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    """The first stdout line, or ``b""`` if the process ended (or timed out) before one."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    out = b""
    while b"\n" not in out:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return b""
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            data = os.read(fd, 4096)
            if not data:
                return b""
            out += data
    return out


def start_daemon(
    *daemon_args: str,
    store: Path | None,
    log: Path,
    global_args: Sequence[str] = (),
    store_global: bool = True,
    command: str = "daemon",
) -> Daemon:
    """Start ``nixcas daemon`` (or another serving ``command``) and wait for its 'listening on' line."""
    store_args = ["--store-dir", str(store)] if store is not None else []
    args = [*global_args, *(store_args if store_global else []), command, *daemon_args]
    if not store_global:
        args += store_args
    with open(log, "wb") as err:
        proc = subprocess.Popen(nixcas_command(*args), stdout=subprocess.PIPE, stderr=err, env=clean_env())
    daemon = Daemon(proc, log, store=store)
    try:
        line = read_line(proc, STARTUP_TIMEOUT).decode()
        if not line.startswith("listening on ") or not line.endswith("\n") or line.count("\n") != 1:
            pytest.fail(f"daemon did not start: stdout {line!r}, exit {proc.poll()}, stderr:\n{daemon.stderr()}")
        daemon.url = line.removeprefix("listening on ").strip()
    except BaseException:
        daemon.kill()
        raise
    return daemon


@contextlib.contextmanager
def running_daemon(*daemon_args: str, store: Path | None, log: Path, **kwargs: Any) -> Iterator[Daemon]:
    """A daemon that is killed (by PID) when the block is left, however it is left."""
    daemon = start_daemon(*daemon_args, store=store, log=log, **kwargs)
    try:
        yield daemon
    finally:
        daemon.kill()


def raw_calculate_nar(channel: Any) -> Any:
    """``tvix.store.v1.PathInfoService/CalculateNAR`` on ``channel`` (a ``grpc.aio`` channel) as a bare
    unary call taking a ``Node`` message: for tests that send what the typed client would refuse."""
    from nixcas._proto.tvix.castore.protos import castore_pb2
    from nixcas._proto.tvix.store.protos import rpc_pathinfo_pb2

    return channel.unary_unary(
        "/tvix.store.v1.PathInfoService/CalculateNAR",
        request_serializer=castore_pb2.Node.SerializeToString,
        response_deserializer=rpc_pathinfo_pb2.CalculateNARResponse.FromString,
    )

"""Several bridge processes on one address: the listening sockets, the forked workers and their supervisor.

The parent binds every socket before it forks, so the address (and a port
picked for ``:0``) is known and reported once.  On TCP each worker gets its
own socket of one ``SO_REUSEPORT`` group, and the kernel spreads new
connections evenly over them; a unix socket is one listening socket shared
by all workers.  Each worker opens the store itself (SQLite in WAL mode and
the blob files are safe to share between processes), serves, and tells the
parent through a pipe once it accepts connections.  The parent forwards
SIGINT/SIGTERM as SIGTERM to the workers, waits for them, and stops all of
them if one exits on its own; it forwards SIGHUP (reload the token file) as is.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

from nixcas.errors import ConfigurationError
from nixcas.listen import clear_stale_socket, parse_listen_address
from nixcas.ops import logs
from nixcas.systemd import notify

__all__ = ["Listeners", "open_listeners", "run_workers"]

log = logging.getLogger("nixcas.bridge")

BACKLOG = 1024
PR_SET_PDEATHSIG = 1


@dataclass
class Listeners:
    """Bound, listening sockets for ``count`` workers, and the URL they serve."""

    sockets: list[socket.socket]
    url: str
    unix_path: str | None = None

    def for_worker(self, index: int) -> socket.socket:
        return self.sockets[index % len(self.sockets)]

    def close(self) -> None:
        for s in self.sockets:
            s.close()


def open_listeners(listen: str, count: int, scheme: str = "http", activated: socket.socket | None = None) -> Listeners:
    """Sockets on ``listen`` (``host:port``, port 0 = any free one, or a socket path) for ``count`` workers.

    ``scheme`` is the URL's (``https`` when the workers serve TLS).  With ``activated``
    (systemd's listening socket), that one socket is shared by all workers instead.
    """
    if activated is not None:
        where = activated.getsockname()
        if activated.family == socket.AF_UNIX:
            return Listeners([activated], f"unix://{os.fsdecode(where)}")
        host = f"[{where[0]}]" if activated.family == socket.AF_INET6 else where[0]
        return Listeners([activated], f"{scheme}://{host}:{where[1]}")
    address = parse_listen_address(listen)
    sockets: list[socket.socket] = []
    try:
        if address.unix_path is not None:
            clear_stale_socket(address.unix_path)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sockets.append(s)
            s.bind(address.unix_path)
            s.listen(BACKLOG)
            return Listeners(sockets, f"unix://{address.unix_path}", address.unix_path)
        host, port = address.host, address.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for _ in range(count):
            s = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind((host, port))
            port = s.getsockname()[1]  # the next sockets join the port the first one got
            s.listen(BACKLOG)
        return Listeners(sockets, f"{scheme}://{address.url_host}:{port}")
    except OSError as e:
        for s in sockets:
            s.close()
        raise ConfigurationError(f"cannot listen on {listen}: {e.strerror or e}") from None


Serve = Callable[[int, socket.socket, Callable[[], None]], int]
"""A worker's body: ``serve(index, socket, ready)`` returns its exit code."""


def run_workers(count: int, listeners: Listeners, serve: Serve) -> int:
    """Fork ``count`` workers running ``serve(index, socket, ready)``; supervise them; the exit code.

    ``serve`` calls ``ready()`` once it accepts connections and returns the
    worker's exit code.  Worker 0 starts first: if it cannot (the store does
    not open, say), its one error line is all that is printed and its exit
    code is returned.  The parent prints "listening on URL" once every worker
    is ready, and returns once every worker has exited: 0 after a stop by
    signal, 1 if a worker failed (or did not start).
    """
    parent = os.getpid()
    pids: dict[int, int] = {}
    stopping = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if not stopping:
            _notify("STOPPING=1")
        stopping = True
        _signal_all(pids, signal.SIGTERM)

    def hangup(signum: int, frame: FrameType | None) -> None:
        _signal_all(pids, signal.SIGHUP)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, hangup)
    try:
        first = _fork(range(1), listeners, serve, parent, pids)
        if not _await_ready(first, 1):
            pid = next(iter(pids))
            _, status = os.waitpid(pid, 0)
            del pids[pid]
            return os.waitstatus_to_exitcode(status) or 1
        rest = _fork(range(1, count), listeners, serve, parent, pids)
        listeners.close()  # the workers hold them now
        failed = not _await_ready(rest, count - 1)
        if failed:
            log.error("a worker did not start: stopping the others")
            _signal_all(pids, signal.SIGTERM)
        elif not stopping:
            print(f"listening on {listeners.url}", flush=True)
            _notify("READY=1")
        while pids:
            pid, status = os.waitpid(-1, 0)
            index = pids.pop(pid, -1)
            if index < 0:
                continue
            code = os.waitstatus_to_exitcode(status)
            if not stopping and not failed:
                log.error("worker %d (pid %d) exited with %d: stopping the others", index, pid, code)
                failed = True
                _signal_all(pids, signal.SIGTERM)
            elif code != 0:
                failed = True
        return 1 if failed else 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _signal_all(pids, signal.SIGTERM)  # only if the parent itself failed: never leave workers behind
        listeners.close()
        if listeners.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(listeners.unix_path)


def _fork(indices: range, listeners: Listeners, serve: Serve, parent: int, pids: dict[int, int]) -> int:
    """Fork the workers ``indices`` (recorded in ``pids``); the read end of the pipe their ``ready()`` writes to."""
    read_end, write_end = os.pipe()
    for index in indices:
        pid = os.fork()
        if pid == 0:  # the worker: serve, then leave without running the parent's cleanup
            code = 1
            try:
                for sig in (signal.SIGINT, signal.SIGTERM):  # not the parent's forwarding handler
                    signal.signal(sig, signal.SIG_DFL)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the worker's bridge handles it
                os.close(read_end)
                _die_with(parent)

                def ready(fd: int = write_end) -> None:
                    os.write(fd, b"1")
                    os.close(fd)

                code = serve(index, listeners.for_worker(index), ready)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                logging.exception("worker %d failed", index)
            finally:
                with contextlib.suppress(Exception):
                    logs.flush_pending()  # access lines held for the loop's next iteration: os._exit runs no atexit
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        pids[pid] = index
    os.close(write_end)
    return read_end


def _await_ready(read_end: int, count: int) -> bool:
    """Whether all ``count`` workers writing to ``read_end`` became ready (else one ended before)."""
    started = 0
    try:
        while started < count and (data := os.read(read_end, count)):
            started += len(data)
    finally:
        os.close(read_end)
    return started == count


def _die_with(parent: int) -> None:
    """Have the kernel send this worker SIGTERM when the parent dies, even by SIGKILL (Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG): %s", os.strerror(ctypes.get_errno()))
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(1)


def _notify(state: str) -> None:
    """Tell systemd (see :mod:`nixcas.systemd`); a failure is a warning."""
    try:
        notify(state)
    except (OSError, ConfigurationError) as e:
        log.warning("cannot notify systemd (%s): %s", state, e)


def _signal_all(pids: dict[int, int], sig: signal.Signals) -> None:
    for pid in list(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

"""What every subcommand shares: global options, running async code, reporting errors."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from contextlib import AbstractContextManager, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from nixcas.castore.sizerule import SIZE_RULE_NAMES
from nixcas.cli.fast import EXIT_BROKEN_PIPE, discard_stdout
from nixcas.errors import ConfigurationError, NixcasError

if TYPE_CHECKING:  # every command imports this module: what it needs is loaded when it is used
    import asyncio
    from asyncio import AbstractEventLoop

    from nixcas.api import Store
    from nixcas.castore.digest import B3Digest
    from nixcas.store.pathinfo.base import PathInfoService

T = TypeVar("T")

EXIT_FAILURE = 1
EXIT_USAGE = 2
LEASES_DIR = "leases"
"""Under the store directory: the write leases GC respects (see nixcas.castore.gc.WriteLeases)."""
STANDALONE_PATHINFO_TAGS = frozenset({"sqlite", "postgresql", "postgres", "grpc", "memory"})
"""Path info backends that use no other service: :meth:`Settings.open_pathinfos` opens them alone."""


@dataclass(frozen=True)
class Settings:
    """The global options given before the subcommand."""

    store_dir: str | None
    blob_service_addr: str | None
    directory_service_addr: str | None
    composition: str | None = None
    pathinfo_service_addr: str | None = None
    pin_service_addr: str | None = None
    directory_size_rule: str | None = None
    """``snix`` or ``tvix`` (``--directory-size-rule``): the rule a new store records, an existing one must follow."""

    async def open_store(self, *, with_pathinfo: bool = False, with_pins: bool = False) -> Store:
        from nixcas.api import Store
        from nixcas.castore.sizerule import requested_size_rule

        return await Store.open(
            self.store_dir,
            blob_service_url=self.blob_service_addr,
            directory_service_url=self.directory_service_addr,
            pathinfo_service_url=self.pathinfo_service_addr,
            pin_service_url=self.pin_service_addr,
            composition=self.composition,
            with_pathinfo=with_pathinfo,
            with_pins=with_pins,
            size_rule=requested_size_rule(self.directory_size_rule),
        )

    @asynccontextmanager
    async def open_pathinfos(self) -> AsyncIterator[PathInfoService]:
        """The path info service, for commands that only read PathInfos (``path-info``).

        Without a composition file, a backend that uses no other service
        (:data:`STANDALONE_PATHINFO_TAGS`; the embedded store's SQLite among them)
        is opened alone, so the blob and directory backends are not even
        loaded; otherwise the whole store is opened, as :meth:`open_store` does.
        """
        from nixcas.api import service_urls

        url = self.pathinfo_service_addr or service_urls(self.store_dir)[2]
        if self.composition is None and url.partition(":")[0].partition("+")[0] in STANDALONE_PATHINFO_TAGS:
            from nixcas.composition import pathinfo_service_from_url

            async with await pathinfo_service_from_url(url) as service:
                yield service
            return
        async with await self.open_store(with_pathinfo=True) as store:
            assert store.pathinfos is not None
            yield store.pathinfos

    def store_root(self) -> Path:
        """The embedded store directory (pins, write leases; blobs and databases unless overridden)."""
        from nixcas.api import default_store_dir

        return (Path(self.store_dir) if self.store_dir else default_store_dir()).expanduser().absolute()

    def write_lease(self) -> AbstractContextManager[None]:
        """Held by commands that write: GC keeps everything written since it was taken."""
        from nixcas.castore.gc import WriteLeases

        return WriteLeases(self.store_root() / LEASES_DIR).hold()

    @asynccontextmanager
    async def open_store_to_write(
        self, *, with_pathinfo: bool = False, with_pins: bool = False
    ) -> AsyncIterator[Store]:
        """:meth:`open_store`, under a write lease (until closed) when GC can act on its services."""
        from nixcas.castore.sweep import SweepableBlobs, SweepableDirectories

        async with await self.open_store(with_pathinfo=with_pathinfo, with_pins=with_pins) as store:
            if isinstance(store.blobs, SweepableBlobs) or isinstance(store.directories, SweepableDirectories):
                with self.write_lease():
                    yield store
            else:
                yield store

    def override(self, **values: str | None) -> Settings:
        """These settings with the given options replaced where they were given."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    def with_service_options(self, options: Mapping[str, str | None]) -> Settings:
        """These settings with the options of :func:`service_options` given after a command's name."""
        return self.override(
            store_dir=options.get("store_dir"),
            blob_service_addr=options.get("blob_service_addr"),
            directory_service_addr=options.get("directory_service_addr"),
            pathinfo_service_addr=options.get("path_info_service_addr"),
            pin_service_addr=options.get("pin_service_addr"),
            composition=options.get("composition"),
            directory_size_rule=options.get("directory_size_rule"),
        )


def service_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The store-selection options, for commands that also take them after their name."""
    for option in reversed(
        [
            click.option("--store-dir", type=click.Path(file_okay=False), help="Embedded store directory."),
            click.option("--blob-service-addr", metavar="URL", help="Blob service URL (or composition name)."),
            click.option(
                "--directory-service-addr", metavar="URL", help="Directory service URL (or composition name)."
            ),
            click.option(
                "--path-info-service-addr", metavar="URL", help="Path info service URL (or composition name)."
            ),
            click.option("--pin-service-addr", metavar="URL", help="Pin service URL (or composition name)."),
            click.option(
                "--composition", type=click.Path(dir_okay=False), help="TOML composition file (entrypoints: root)."
            ),
            click.option(
                "--directory-size-rule",
                type=click.Choice(SIZE_RULE_NAMES),
                help="Directory size rule of a new store [default: snix].",
            ),
        ]
    ):
        f = option(f)
    return f


SERVICE_OPTION_NAMES = (
    "store_dir",
    "blob_service_addr",
    "directory_service_addr",
    "path_info_service_addr",
    "pin_service_addr",
    "composition",
    "directory_size_rule",
)
"""The parameters :func:`service_options` adds."""


def pass_settings(f: Callable[..., T]) -> Callable[..., T]:
    """``click.pass_obj`` for a command that opens stores: the :class:`Settings`, with the service options
    given after the command's name (added here) replacing the global ones given before it."""
    import functools

    @functools.wraps(f)
    def command(*args: Any, **kwargs: Any) -> T:
        given = {name: kwargs.pop(name) for name in SERVICE_OPTION_NAMES}
        settings: Settings = click.get_current_context().obj
        return f(settings.with_service_options(given), *args, **kwargs)

    command.__dict__["__click_params__"] = list(getattr(f, "__click_params__", []))
    return service_options(command)


def server_options(default_listen: str, grace_help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``-l/--listen-address`` (default ``default_listen``) and ``--shutdown-grace`` of a serving command."""
    port = default_listen.rpartition(":")[2]

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        f = click.option(
            "--shutdown-grace",
            type=click.FloatRange(min=0),
            default=10.0,
            show_default=True,
            metavar="SECONDS",
            help=grace_help,
        )(f)
        return click.option(
            "-l",
            "--listen-address",
            "listen",
            default=default_listen,
            show_default=True,
            metavar="ADDR",
            help=f"host:port ([::1]:{port}; port 0 picks a free one) or a unix socket path (/abs or ./rel).",
        )(f)

    return decorate


MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20


def tune_malloc() -> bool:
    """Keep large buffers on the heap (glibc): fewer page faults, ~2x gRPC blob throughput.

    glibc serves blocks above its (dynamic) mmap threshold with fresh mappings
    and trims freed memory eagerly, so a process moving blobs in 1 MiB messages
    faults in and clears new pages for every message (bench/grpc_throughput.py:
    up to 200k faults per 256 MiB Put).  A fixed 32 MiB mmap threshold and a
    256 MiB trim threshold keep those buffers reused, at the cost of holding up
    to 256 MiB of freed heap.  ``GLIBC_TUNABLES``, if set, still wins.
    """
    import ctypes

    libc = ctypes.CDLL(None)  # the process's own symbols, libc's among them (no ldconfig run)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False  # not glibc
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(libc.mallopt(m_trim_threshold, TRIM_THRESHOLD))


def stop_on_signals() -> asyncio.Event:
    """An event that SIGINT and SIGTERM set (handlers installed now, in the running loop): a server's end."""
    import asyncio
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


NATIVE_RUNTIMES = ("obstore", "grpc", "psycopg", "psycopg_pool")
"""Modules that run native threads of their own, which interpreter finalization can crash."""


def exit_process(code: object) -> NoReturn:
    """End the process with ``code`` (a ``SystemExit`` code); a failure ends it at once.

    Native client threads (obstore's tokio runtime, grpc) may still be running when a
    command fails half-way, e.g. while its store could not be opened; letting the
    interpreter finalize around them sometimes ends in SIGABRT or SIGBUS after the error
    line was printed.  A failure has nothing left to save, so after flushing stdio (and
    logging) the process leaves with ``os._exit``, skipping interpreter finalization.
    A success does the same once such a native runtime was loaded (a ``gc`` against S3
    and PostgreSQL died by SIGABRT after printing its report about once in 40 runs):
    the command has closed its stores by then, so finalization has nothing left to do.
    """
    success = code is None or code == 0
    if success and not any(name in sys.modules for name in NATIVE_RUNTIMES):
        sys.exit(0)
    status = 0 if success else code if isinstance(code, int) else EXIT_FAILURE
    if not success and not isinstance(code, int):
        click.echo(str(code), err=True)
    logging = sys.modules.get("logging")  # flushed only if some command loaded it
    if logging is not None:
        logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(status)


GIL_SWITCH_INTERVAL = 0.001
"""Seconds a thread may keep the GIL while another waits for it, in the commands that ingest (CPython: 5 ms)."""


def share_the_gil_finely() -> None:
    """Let the threads of an ingest take turns with the GIL every :data:`GIL_SWITCH_INTERVAL`.

    An import walks the tree, hashes its NAR and appends batches of blobs on
    threads of their own; each releases the GIL for every system call and every
    hash, and waited for it to come back up to CPython's default 5 ms, while the
    others ran Python.  At 1 ms, ``nixcas import`` of ``/usr/include`` took 40 ms
    less (paired medians of 16 rounds; 0.2 and 0.5 ms gave 28 to 32 ms).  A read through a
    mount did not gain from it, so this is for the commands that ingest only.
    """
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    """Print one error line to stderr and exit."""
    click.echo(f"nixcas: error: {message}", err=True)
    sys.exit(code)


def run(
    coro_fn: Callable[[], Coroutine[Any, Any, T]], loop_factory: Callable[[], AbstractEventLoop] | None = None
) -> T:
    """Run a coroutine (on a loop from ``loop_factory``, if given); every expected failure: one line, an exit code."""
    import asyncio

    try:
        if loop_factory is not None:
            with asyncio.Runner(loop_factory=loop_factory) as runner:
                return runner.run(coro_fn())
        return asyncio.run(coro_fn())
    except BrokenPipeError:  # the reader went away (`nixcas dump-path … | head`): stop quietly
        discard_stdout()
        sys.exit(EXIT_BROKEN_PIPE)
    except ConfigurationError as e:
        fail(str(e), EXIT_USAGE)
    except NixcasError as e:
        fail(str(e))
    except OSError as e:
        fail(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e))
    except KeyboardInterrupt:
        fail("interrupted", 130)


def parse_digest(text: str) -> B3Digest:
    """A digest argument (hex, ``b3:…`` or ``blake3-…``), or a usage error."""
    from nixcas.castore.digest import B3Digest

    try:
        return B3Digest.parse(text)
    except NixcasError as e:
        raise click.BadParameter(str(e)) from None

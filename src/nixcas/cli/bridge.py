"""``nixcas nar-bridge`` (a Nix HTTP binary cache over the store) and ``nixcas generate-key``."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from nixcas.api import Store, default_store_dir
from nixcas.bridge import DEFAULT_BRIDGE_LISTEN, DEFAULT_PRIORITY
from nixcas.bridge.loop import EVENT_LOOPS, LoopFactory, loop_factory
from nixcas.cli.common import EXIT_USAGE, Settings, fail, run, server_options, service_options, stop_on_signals
from nixcas.cli.observe import telemetry, telemetry_options
from nixcas.cli.serving import (
    DeploymentOptions,
    activated_sockets,
    deployment_options,
    ready,
    shutdown_deadline,
    stopping,
)
from nixcas.errors import ConfigurationError

if TYPE_CHECKING:  # aiohttp and cryptography load only when a bridge runs (every other command starts faster)
    import socket
    import ssl

    from nixcas.bridge.auth import Tokens
    from nixcas.bridge.server import RunningBridge
    from nixcas.store.signing import SigningKey


@dataclass(frozen=True)
class BridgeOptions:
    """The bridge's own options (shared by ``nar-bridge`` and ``daemon --nar-bridge``)."""

    priority: int
    allow_writes: bool
    token_file: str | None
    private: bool
    sign_key: str | None
    nar_index: str | None

    @classmethod
    def take(cls, options: dict[str, Any]) -> BridgeOptions:
        """Remove this class's fields from a command's keyword arguments (the rest are service options)."""
        return cls(*(options.pop(f.name) for f in fields(cls)))

    def load(self, settings: Settings) -> tuple[Tokens | None, SigningKey | None, str]:
        """The tokens, the signing key and the NAR index path; unusable files are configuration errors."""
        from nixcas.bridge.auth import Tokens

        tokens = None
        if self.private and self.token_file is None:
            raise ConfigurationError("--private needs --token-file (the tokens that may read)")
        if self.token_file is not None:
            tokens = Tokens.load(self.token_file)
        from nixcas.store.signing import SigningKey, SigningKeyError

        key = None
        if self.sign_key is not None:
            try:
                key = SigningKey.load(self.sign_key)
            except SigningKeyError as e:
                raise ConfigurationError(f"--sign-key: {e}") from None
        index = self.nar_index or str(Path(settings.store_dir or default_store_dir()).absolute() / "nar-bridge.sqlite")
        return tokens, key, index

    def open_writes(self) -> str | None:
        """Why anyone could write (``--allow-writes`` without a token), or ``None``."""
        return "--allow-writes accepts uploads from anyone" if self.allow_writes and self.token_file is None else None

    def check(self, settings: Settings) -> None:
        """Fail now (one line, exit 2) if a file the bridge needs is unusable."""
        try:
            self.load(settings)
        except ConfigurationError as e:
            fail(str(e), EXIT_USAGE)


def bridge_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            click.option(
                "--priority",
                type=click.IntRange(min=0),
                default=DEFAULT_PRIORITY,
                show_default=True,
                help="Priority announced in /nix-cache-info (lower is preferred by Nix).",
            ),
            click.option("--allow-writes", is_flag=True, help="Accept NAR and narinfo uploads from anyone."),
            click.option(
                "--token-file",
                type=click.Path(dir_okay=False),
                help="Tokens, one per line: SCOPE (read|write) TOKEN [NAME]; a write token may upload "
                "(Bearer TOKEN, or TOKEN as Basic password, e.g. from a netrc-file). Reloaded on SIGHUP.",
            ),
            click.option("--private", is_flag=True, help="Reads need a token of --token-file too."),
            click.option(
                "--sign-key",
                type=click.Path(dir_okay=False),
                help="Nix secret key file: narinfos are signed with it as they are served.",
            ),
            click.option(
                "--nar-index",
                type=click.Path(dir_okay=False),
                help="SQLite file of uploaded NARs awaiting their narinfo [default: STORE_DIR/nar-bridge.sqlite].",
            ),
        ]
    ):
        f = option(f)
    return f


@contextlib.asynccontextmanager
async def serving_bridge(
    listen: str,
    store: Store,
    settings: Settings,
    options: BridgeOptions,
    shutdown_grace: float,
    sock: socket.socket | None = None,
    *,
    ssl_context: ssl.SSLContext | None = None,
    activated: socket.socket | None = None,
) -> AsyncIterator[RunningBridge]:
    """The bridge over ``store``, listening on ``listen`` (or on ``sock``, a worker's, serving URL ``listen``;
    or on ``activated``, systemd's socket)."""
    import asyncio
    import signal

    from nixcas.bridge.app import NarBridge
    from nixcas.bridge.auth import reload_tokens
    from nixcas.bridge.server import serve_on_socket, start_bridge
    from nixcas.store.narindex import NarIndex

    loop = asyncio.get_running_loop()
    bridge: NarBridge | None = None

    def reload() -> None:  # SIGHUP; runs in the loop, so never before the bridge below exists
        if bridge is not None and bridge.tokens is not None and options.token_file is not None:
            bridge.tokens = reload_tokens(bridge.tokens, options.token_file)

    if options.token_file is not None:  # installed before the file is read: no SIGHUP is missed
        loop.add_signal_handler(signal.SIGHUP, reload)
    tokens, key, index_path = options.load(settings)
    assert store.pathinfos is not None
    index = NarIndex(index_path)
    try:
        bridge = NarBridge(
            store.blobs,
            store.directories,
            store.pathinfos,
            index,
            priority=options.priority,
            allow_writes=options.allow_writes,
            tokens=tokens,
            private=options.private,
            sign_key=key,
        )
        if sock is not None:
            running = await serve_on_socket(
                sock, listen, bridge, shutdown_grace=shutdown_grace, ssl_context=ssl_context
            )
        else:
            running = await start_bridge(
                listen, bridge, shutdown_grace=shutdown_grace, ssl_context=ssl_context, sock=activated
            )
        try:
            yield running
        finally:
            await running.stop()
    finally:
        if options.token_file is not None:
            loop.remove_signal_handler(signal.SIGHUP)
        await index.close()


@click.command("nar-bridge")
@server_options(
    DEFAULT_BRIDGE_LISTEN, "On SIGINT/SIGTERM, how long running requests may finish before connections close."
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Processes serving the address together [default: the number of CPUs for the embedded store, else 1].",
)
@click.option(
    "--event-loop",
    type=click.Choice(EVENT_LOOPS),
    default="auto",
    show_default=True,
    help="auto: uvloop if it is installed (the 'fast' extra), else asyncio's own loop.",
)
@bridge_options
@deployment_options
@service_options
@telemetry_options(metrics=False)
@click.pass_obj
def nar_bridge(
    settings: Settings,
    /,
    listen: str,
    shutdown_grace: float,
    workers: int | None,
    otlp_endpoint: str | None,
    event_loop: str,
    **options: Any,
) -> None:
    """Serve the store as a Nix HTTP binary cache (nix copy --from/--to http://ADDR).

    Prints one line 'listening on http://HOST:PORT' to stdout once it accepts connections (all workers).
    With several workers, each opens the store (which must be shareable between processes: files,
    SQLite files, a database server; not memory:// or lru://); SIGINT/SIGTERM stop them all.
    On SIGINT/SIGTERM, GET /healthz and every new request are answered 503; running requests get
    --shutdown-grace seconds, then are cancelled.
    """
    bridge_opts = BridgeOptions.take(options)
    deploy = DeploymentOptions.take(options)
    settings = settings.with_service_options(options)
    bridge_opts.check(settings)  # bad files fail before anything is opened
    ssl_context, sock = _deployment(deploy, listen, bridge_opts)
    workers = _worker_count(workers, settings)
    try:
        loop_name, new_loop = loop_factory(event_loop)
    except ConfigurationError as e:
        fail(str(e), EXIT_USAGE)
    if workers > 1:
        _serve_with_workers(
            settings,
            bridge_opts,
            listen,
            shutdown_grace,
            workers,
            (loop_name, new_loop),
            ssl_context,
            sock,
            otlp_endpoint,
        )
        return

    async def go() -> None:
        stop = stop_on_signals()
        async with (
            await settings.open_store(with_pathinfo=True) as store,
            serving_bridge(
                listen, store, settings, bridge_opts, shutdown_grace, ssl_context=ssl_context, activated=sock
            ) as running,
        ):
            click.echo(f"listening on {running.url}")
            ready()
            logging.info(
                "event loop: %s; blobs: %r; directories: %r; path infos: %r",
                loop_name, store.blobs, store.directories, store.pathinfos,
            )  # fmt: skip
            await stop.wait()
            stopping()
            shutdown_deadline(shutdown_grace)
            logging.info("shutting down (grace %g s)", shutdown_grace)
            await running.stop()

    with telemetry("nixcas-nar-bridge", None, otlp_endpoint, settings.store_root()):
        run(go, new_loop)


def _deployment(
    deploy: DeploymentOptions, listen: str, bridge_opts: BridgeOptions
) -> tuple[ssl.SSLContext | None, socket.socket | None]:
    """The bridge's TLS context and systemd's socket for it; a usage error if it must not listen there."""
    try:
        tls = deploy.tls()
        ssl_context = tls.ssl_context() if tls is not None else None
        sock = activated_sockets().take("nar-bridge", 0)
        deploy.check_exposure(listen, sock, bridge_opts.open_writes())
    except ConfigurationError as e:
        fail(str(e), EXIT_USAGE)
    return ssl_context, sock


_PRIVATE_SERVICES = re.compile(r"(memory|lru):|sqlite://(\?|$)")
"""Service URLs whose contents live in one process (several workers would each have their own)."""


def _worker_count(workers: int | None, settings: Settings) -> int:
    """``--workers``, or its default; a usage error for services that workers cannot share."""
    addrs = (settings.blob_service_addr, settings.directory_service_addr, settings.pathinfo_service_addr)
    if workers is None:
        custom = any(a is not None for a in addrs) or settings.composition is not None
        return 1 if custom else max(1, len(os.sched_getaffinity(0)))
    private = [a for a in addrs if a is not None and _PRIVATE_SERVICES.match(a)]
    if workers > 1 and private:
        fail(f"--workers {workers}: {private[0]} lives in one process; workers cannot share it", EXIT_USAGE)
    return workers


def _serve_with_workers(
    settings: Settings,
    bridge_opts: BridgeOptions,
    listen: str,
    shutdown_grace: float,
    workers: int,
    event_loop: tuple[str, LoopFactory | None],
    ssl_context: ssl.SSLContext | None = None,
    activated: socket.socket | None = None,
    otlp_endpoint: str | None = None,
) -> None:
    """``workers`` forked bridges on one address (see :mod:`nixcas.bridge.workers`); exits with their outcome."""
    from nixcas.bridge.workers import open_listeners, run_workers
    from nixcas.ops.logs import serving

    serving()
    try:
        listeners = open_listeners(listen, workers, "https" if ssl_context is not None else "http", activated)
    except ConfigurationError as e:
        fail(str(e), EXIT_USAGE)

    def serve(index: int, sock: socket.socket, ready: Callable[[], None]) -> int:
        async def go() -> None:
            stop = stop_on_signals()
            async with (
                await settings.open_store(with_pathinfo=True) as store,
                serving_bridge(
                    listeners.url, store, settings, bridge_opts, shutdown_grace, sock, ssl_context=ssl_context
                ) as running,
            ):
                ready()
                if index == 0:
                    logging.info("%d workers; event loop: %s; blobs: %r; directories: %r; path infos: %r", workers,
                                 event_loop[0], store.blobs, store.directories, store.pathinfos)  # fmt: skip
                await stop.wait()
                shutdown_deadline(shutdown_grace)
                logging.info("shutting down (grace %g s)", shutdown_grace)
                await running.stop()

        # in the worker: exporting threads do not survive a fork
        with telemetry("nixcas-nar-bridge", None, otlp_endpoint, settings.store_root()):
            run(go, event_loop[1])
        return 0

    sys.exit(run_workers(workers, listeners, serve))


@click.command("generate-key")
@click.argument("name")
@click.argument("secret_key_file", required=False, type=click.Path(dir_okay=False))
@click.argument("public_key_file", required=False, type=click.Path(dir_okay=False))
def generate_key(name: str, secret_key_file: str | None, public_key_file: str | None) -> None:
    """Make a Nix signing key pair NAME (e.g. cache.example.org-1).

    With SECRET_KEY_FILE and PUBLIC_KEY_FILE, writes them (the secret one readable by its owner
    only; existing files are not overwritten), as `nix-store --generate-binary-cache-key` does.
    Without, prints the secret key, then the public key, one per line.
    """
    if (secret_key_file is None) != (public_key_file is None):
        raise click.UsageError("give both SECRET_KEY_FILE and PUBLIC_KEY_FILE, or neither")
    from nixcas.store.signing import SigningKey, SigningKeyError

    try:
        key = SigningKey.generate(name)
    except SigningKeyError as e:
        raise click.BadParameter(str(e), param_hint="NAME") from None
    if secret_key_file is None or public_key_file is None:
        click.echo(str(key))
        click.echo(str(key.public))
        return
    written: list[str] = []
    try:
        for path, text, mode in ((secret_key_file, str(key), 0o600), (public_key_file, str(key.public), 0o644)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            written.append(path)
            with os.fdopen(fd, "w") as f:
                f.write(text)
    except OSError as e:
        for path in written:
            os.unlink(path)
        raise click.ClickException(f"{e.filename}: {e.strerror}") from None

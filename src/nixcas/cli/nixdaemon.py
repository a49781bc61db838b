"""``nixcas nix-daemon``: the store as a Nix store over Nix's worker protocol (``unix://``, ``ssh-ng://``)."""

from __future__ import annotations

import getpass
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from nixcas.cli.common import EXIT_USAGE, Settings, fail, run, service_options, stop_on_signals
from nixcas.cli.observe import telemetry, telemetry_options
from nixcas.cli.serving import activated_sockets, ready, stopping
from nixcas.errors import ConfigurationError

if TYPE_CHECKING:
    import socket

    from nixcas.api import Store
    from nixcas.store.daemon.ops import DaemonState
    from nixcas.store.daemon.trust import TrustPolicy
    from nixcas.store.signing import VerifyingKey

DEFAULT_SOCKET = "nix-daemon.socket"
"""Under the store directory, unless ``--listen-address`` says otherwise."""


def _words(values: tuple[str, ...]) -> tuple[str, ...]:
    """Options given several times and/or as space-separated lists (as in nix.conf)."""
    return tuple(word for value in values for word in value.split())


@click.command("nix-daemon")
@click.option(
    "-l",
    "--listen-address",
    "listen",
    metavar="PATH",
    help=f"Unix socket to listen on (a stale one is replaced) [default: STORE_DIR/{DEFAULT_SOCKET}].",
)
@click.option("--stdio", is_flag=True, help="Serve one session on stdin/stdout (ssh-ng's remote-program).")
@click.option(
    "--socket-mode",
    default="0666",
    show_default=True,
    metavar="OCTAL",
    help="Permissions of the socket (who may connect is then decided by --allowed-users).",
)
@click.option(
    "--trusted-users",
    multiple=True,
    metavar="LIST",
    help="Users (NAME, @GROUP, *) who are trusted: they may skip signature checks [default: root and the "
    "user running the daemon].",
)
@click.option(
    "--allowed-users",
    multiple=True,
    metavar="LIST",
    help="Users (NAME, @GROUP, *) who may connect at all [default: *].",
)
@click.option(
    "--trusted-public-keys",
    multiple=True,
    metavar="KEYS",
    help="Nix public keys (name:base64): untrusted clients may add only paths signed by one of them.",
)
@click.option(
    "--require-sigs/--no-require-sigs",
    default=True,
    show_default=True,
    help="Whether a trusted client's request to check signatures is honoured (untrusted clients are always checked).",
)
@click.option(
    "--force-trusted/--force-untrusted",
    "force_trusted",
    default=None,
    help="Trust (or not) every client, whoever it is (e.g. the --stdio session).",
)
@service_options
@telemetry_options(metrics=True)
@click.pass_obj
def nix_daemon(
    settings: Settings,
    /,
    listen: str | None,
    stdio: bool,
    socket_mode: str,
    trusted_users: tuple[str, ...],
    allowed_users: tuple[str, ...],
    trusted_public_keys: tuple[str, ...],
    require_sigs: bool,
    force_trusted: bool | None,
    metrics_listen_address: str | None,
    otlp_endpoint: str | None,
    **options: Any,
) -> None:
    """Serve the store to Nix over its worker protocol (nix copy --to unix://PATH, ssh-ng://).

    Prints one line 'listening on unix:///PATH' once it accepts connections (not with --stdio);
    under systemd socket activation it serves the socket passed (FileDescriptorName=nix-daemon, or
    the first) and sends READY=1/STOPPING=1 to NOTIFY_SOCKET.
    Nix sees a store it can query, copy to and from, and verify; nothing is built (build
    requests for paths that are not valid fail with "nixcas does not build").
    """
    settings = settings.with_service_options(options)
    if stdio and listen is not None:
        fail("--stdio and --listen-address exclude each other", EXIT_USAGE)
    mode = _socket_mode(socket_mode)
    from nixcas.store.signing import SigningKeyError, parse_public_keys

    try:
        keys = parse_public_keys(_words(trusted_public_keys))
    except SigningKeyError as e:
        fail(f"--trusted-public-keys: {e}", EXIT_USAGE)
    policy = _trust_policy(trusted_users, allowed_users, force_trusted)
    socket_path = Path(listen) if listen is not None else settings.store_root() / DEFAULT_SOCKET
    activated = None
    if not stdio:
        try:
            activated = activated_sockets().take("nix-daemon", 0)
        except ConfigurationError as e:
            fail(str(e), EXIT_USAGE)

    async def go() -> None:
        async with settings.open_store_to_write(with_pathinfo=True, with_pins=True) as store:
            state = await _daemon_state(store, keys, require_sigs)
            if stdio:
                from nixcas.store.daemon.server import serve_stdio
                from nixcas.store.daemon.trust import this_process

                me = this_process()
                await serve_stdio(state, trusted=policy.is_trusted(me), peer=f"stdio {me}")
                return
            await _serve_unix(store, state, policy, socket_path, mode, activated)

    if stdio:  # standard output is the session: only errors, on standard error
        run(go)
        return
    with telemetry("nixcas-nix-daemon", metrics_listen_address, otlp_endpoint, settings.store_root()):
        run(go)


def _socket_mode(text: str) -> int:
    """``--socket-mode``: octal permissions (exit 2 otherwise)."""
    try:
        mode = int(text, 8)
        if not 0 <= mode <= 0o777:
            raise ValueError
    except ValueError:
        fail(f"--socket-mode {text}: expected octal permissions such as 0660", EXIT_USAGE)
    return mode


def _trust_policy(
    trusted_users: tuple[str, ...], allowed_users: tuple[str, ...], force_trusted: bool | None
) -> TrustPolicy:
    """Who is trusted (default: root and this user) and who may connect (default: everyone)."""
    from nixcas.store.daemon.trust import TrustPolicy

    own_user = getpass.getuser()
    policy = TrustPolicy(
        _words(trusted_users) or tuple(dict.fromkeys(("root", own_user))),
        _words(allowed_users) or ("*",),
    )
    if force_trusted is not None:
        policy = TrustPolicy(("*",) if force_trusted else (), ("*",) if force_trusted else policy.allowed_users)
    return policy


async def _daemon_state(store: Store, keys: tuple[VerifyingKey, ...], require_sigs: bool) -> DaemonState:
    """What every session shares; temporary roots of daemons that are gone are released first."""
    from nixcas.store.daemon.ops import DaemonState

    assert store.pathinfos is not None
    state = DaemonState(
        store.blobs,
        store.directories,
        store.pathinfos,
        store.pins,
        trusted_keys=keys,
        require_sigs=require_sigs,
    )
    released = await state.release_stale_temp_roots()
    if released:
        logging.info("released %d temporary roots of daemons that are gone", released)
    return state


async def _serve_unix(
    store: Store,
    state: DaemonState,
    policy: TrustPolicy,
    socket_path: Path,
    mode: int,
    activated: socket.socket | None,
) -> None:
    """Serve sessions on the unix socket until SIGINT/SIGTERM."""
    from nixcas.store.daemon.server import serving_unix

    stop = stop_on_signals()
    try:
        async with serving_unix(socket_path, state, policy, socket_mode=mode, sock=activated) as server:
            for name in server.sockets:
                click.echo(f"listening on unix://{name.getsockname()}")
            ready()
            logging.info("blobs: %r; directories: %r; path infos: %r", store.blobs, store.directories,
                         store.pathinfos)  # fmt: skip
            await stop.wait()
            stopping()
            logging.info("shutting down")
    except ConfigurationError as e:
        fail(str(e), EXIT_USAGE)

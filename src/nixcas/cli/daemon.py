"""``nixcas daemon``: serve the store over gRPC until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from nixcas.cli.bridge import BridgeOptions, bridge_options, serving_bridge
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
from nixcas.server import DEFAULT_LISTEN, start_server

if TYPE_CHECKING:
    import socket
    import ssl

    from nixcas.tls import ServerTls


@click.command()
@server_options(
    DEFAULT_LISTEN, "On SIGINT/SIGTERM, how long running calls may finish before they are cancelled (and roll back)."
)
@service_options
@click.option(
    "--nar-bridge",
    "nar_bridge",
    metavar="ADDR",
    help="Also serve the store as a Nix HTTP binary cache on ADDR (host:port or socket path); see nar-bridge.",
)
@bridge_options
@deployment_options
@telemetry_options(metrics=True)
@click.pass_obj
def daemon(
    settings: Settings,
    /,
    listen: str,
    shutdown_grace: float,
    nar_bridge: str | None,
    metrics_listen_address: str | None,
    otlp_endpoint: str | None,
    **options: Any,
) -> None:
    """Serve the blob, directory, path info and pin services over gRPC (tvix.* and snix.* names, health, reflection).

    Prints one line 'listening on URL' to stdout per listener once all of them accept connections.
    On SIGINT/SIGTERM every listener refuses new calls and requests at once (gRPC health turns
    NOT_SERVING, the bridge's /healthz 503); running ones get --shutdown-grace seconds, then are cancelled.
    """
    bridge_opts = BridgeOptions.take(options)
    deploy = DeploymentOptions.take(options)
    settings = settings.with_service_options(options)
    if nar_bridge is not None:
        bridge_opts.check(settings)  # bad files fail before anything is opened
    listeners = _listeners(listen, nar_bridge, deploy, bridge_opts)

    async def go() -> None:
        await _serve(settings, listen, nar_bridge, bridge_opts, listeners, shutdown_grace)

    with telemetry("nixcas-daemon", metrics_listen_address, otlp_endpoint, settings.store_root()):
        run(go)


@dataclass(frozen=True)
class _Listeners:
    """How the gRPC server (and the bridge, with ``--nar-bridge``) listen: TLS, sockets systemd handed over."""

    tls: ServerTls | None
    ssl_context: ssl.SSLContext | None
    """The bridge's (with TLS and a bridge only)."""
    grpc_sock: socket.socket | None
    bridge_sock: socket.socket | None


def _listeners(
    listen: str, nar_bridge: str | None, deploy: DeploymentOptions, bridge_opts: BridgeOptions
) -> _Listeners:
    """Load TLS, take activated sockets and refuse unsafe exposure, before anything is opened (exit 2 if wrong)."""
    try:
        tls = deploy.tls()
        ssl_context = tls.ssl_context() if tls is not None and nar_bridge is not None else None
        activated = activated_sockets()
        grpc_sock = activated.take("grpc", 0)
        bridge_sock = activated.take("nar-bridge", 1) if nar_bridge is not None else None
        deploy.check_exposure(listen, grpc_sock, "the gRPC daemon accepts writes without authentication")
        if nar_bridge is not None:
            deploy.check_exposure(nar_bridge, bridge_sock, bridge_opts.open_writes())
    except ConfigurationError as e:
        fail(str(e), EXIT_USAGE)
    return _Listeners(tls, ssl_context, grpc_sock, bridge_sock)


async def _serve(
    settings: Settings,
    listen: str,
    nar_bridge: str | None,
    bridge_opts: BridgeOptions,
    listeners: _Listeners,
    shutdown_grace: float,
) -> None:
    """Open the store, serve it until SIGINT/SIGTERM, then let every listener drain within the one grace period."""
    stop = stop_on_signals()
    async with await settings.open_store(with_pathinfo=True, with_pins=True) as store:
        running = await start_server(
            listen,
            store.blobs,
            store.directories,
            pathinfos=store.pathinfos,
            nar_calculation=store.nar_calculation(),
            pins=store.pins,
            tls=listeners.tls,
            sock=listeners.grpc_sock,
        )
        try:
            async with contextlib.AsyncExitStack() as stack:
                bridge = None
                if nar_bridge is not None:
                    bridge = await stack.enter_async_context(
                        serving_bridge(
                            nar_bridge,
                            store,
                            settings,
                            bridge_opts,
                            shutdown_grace,
                            ssl_context=listeners.ssl_context,
                            activated=listeners.bridge_sock,
                        )
                    )
                click.echo(f"listening on {running.url}")  # once every listener is up
                if bridge is not None:
                    click.echo(f"listening on {bridge.url}")
                ready()
                logging.info(
                    "blobs: %r; directories: %r; path infos: %r; pins: %r",
                    store.blobs,
                    store.directories,
                    store.pathinfos,
                    store.pins,
                )
                await stop.wait()
                stopping()
                shutdown_deadline(shutdown_grace)
                logging.info("shutting down (grace %g s)", shutdown_grace)
                # every listener drains at once, within the one grace period
                await asyncio.gather(running.stop(shutdown_grace), *([bridge.stop()] if bridge else []))
        finally:
            await running.stop(shutdown_grace)

"""``nixcas daemon``: serve the store over gRPC until SIGINT/SIGTERM."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import click

from nixcas.cli.bridge import BridgeOptions, bridge_options, serving_bridge
from nixcas.cli.common import Settings, run, server_options, service_options, stop_on_signals
from nixcas.cli.observe import telemetry, telemetry_options
from nixcas.server import DEFAULT_LISTEN, start_server


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

    Prints one line 'listening on URL' to stdout once it accepts connections.
    """
    bridge_opts = BridgeOptions.take(options)
    settings = settings.with_service_options(options)
    if nar_bridge is not None:
        bridge_opts.check(settings)  # bad files fail before anything is opened

    async def go() -> None:
        stop = stop_on_signals()
        async with await settings.open_store(with_pathinfo=True, with_pins=True) as store:
            running = await start_server(
                listen,
                store.blobs,
                store.directories,
                pathinfos=store.pathinfos,
                nar_calculation=store.nar_calculation(),
                pins=store.pins,
            )
            try:
                async with contextlib.AsyncExitStack() as stack:
                    click.echo(f"listening on {running.url}")
                    if nar_bridge is not None:
                        bridge = await stack.enter_async_context(
                            serving_bridge(nar_bridge, store, settings, bridge_opts, shutdown_grace)
                        )
                        click.echo(f"listening on {bridge.url}")
                    logging.info(
                        "blobs: %r; directories: %r; path infos: %r; pins: %r",
                        store.blobs,
                        store.directories,
                        store.pathinfos,
                        store.pins,
                    )
                    await stop.wait()
                    logging.info("shutting down (grace %g s)", shutdown_grace)
            finally:
                await running.stop(shutdown_grace)

    with telemetry("nixcas-daemon", metrics_listen_address, otlp_endpoint, settings.store_root()):
        run(go)

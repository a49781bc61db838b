"""``nixcas daemon``: serve the store over gRPC until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal

import click

from nixcas.cli.common import Settings, run, service_options
from nixcas.server import DEFAULT_LISTEN, start_server


@click.command()
@click.option(
    "-l",
    "--listen-address",
    "listen",
    default=DEFAULT_LISTEN,
    show_default=True,
    metavar="ADDR",
    help="host:port ([::1]:8000; port 0 picks a free one) or a unix socket path (/abs or ./rel).",
)
@service_options
@click.option(
    "--shutdown-grace",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    metavar="SECONDS",
    help="On SIGINT/SIGTERM, how long running calls may finish before they are cancelled (and roll back).",
)
@click.pass_obj
def daemon(settings: Settings, /, listen: str, shutdown_grace: float, **services: str | None) -> None:
    """Serve the blob, directory and path info services over gRPC (tvix.* and snix.* names, health, reflection).

    Prints one line 'listening on URL' to stdout once it accepts connections.
    """
    settings = settings.with_service_options(services)
    logging.basicConfig(level=logging.INFO, format="nixcas daemon: %(levelname)s: %(message)s")

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with await settings.open_store(with_pathinfo=True) as store:
            running = await start_server(
                listen,
                store.blobs,
                store.directories,
                pathinfos=store.pathinfos,
                nar_calculation=store.nar_calculation(),
            )
            try:
                click.echo(f"listening on {running.url}")
                logging.info(
                    "blobs: %r; directories: %r; path infos: %r", store.blobs, store.directories, store.pathinfos
                )
                await stop.wait()
                logging.info("shutting down (grace %g s)", shutdown_grace)
            finally:
                await running.stop(shutdown_grace)

    run(go)

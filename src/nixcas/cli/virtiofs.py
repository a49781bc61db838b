"""``nixcas virtiofs`` (store paths) and what ``nixcas castore virtiofs`` shares with it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from nixcas.cli.common import Settings, fail, run, service_options
from nixcas.cli.mount import pathinfo_roots, virtiofs_options
from nixcas.cli.observe import telemetry_options

if TYPE_CHECKING:  # `nixcas castore` imports this module: keep it light
    from nixcas.api import Store
    from nixcas.castore.fs.roots import RootNodes


def serve_virtiofs(
    settings: Settings,
    socket_path: Path,
    roots: Callable[[Store], Awaitable[RootNodes]],
    *,
    list_root: bool,
    show_xattr: bool,
    with_pathinfo: bool = False,
    metrics_listen_address: str | None = None,
    otlp_endpoint: str | None = None,
) -> None:
    """Open the store and serve what ``roots`` gives as a vhost-user-fs device at ``socket_path`` until signalled.

    Prints ``listening on /abs/socket`` on stdout once the socket exists.
    """
    import logging

    from nixcas.castore.fs.ops import FsCore
    from nixcas.castore.fs.virtiofs.server import serve
    from nixcas.cli.observe import telemetry

    where = socket_path.absolute()
    if not where.parent.is_dir():
        raise click.BadParameter(f"{where.parent}: not a directory", param_hint="SOCKET")
    if where.exists() and not where.is_socket():
        raise click.BadParameter(f"{where}: exists and is not a socket", param_hint="SOCKET")

    async def go() -> None:
        async with await settings.open_store(with_pathinfo=with_pathinfo) as store:
            core = FsCore(
                await roots(store), store.blobs, store.directories, list_root=list_root, show_xattr=show_xattr
            )

            def on_listening() -> None:
                click.echo(f"listening on {where}")
                logging.info("serving %r, %r over vhost-user-fs at %s", store.blobs, store.directories, where)

            try:
                await serve(core, where, on_listening=on_listening)
            except OSError as e:
                fail(f"cannot listen at {where}: {e.strerror or e}")

    with telemetry("nixcas-virtiofs", metrics_listen_address, otlp_endpoint, settings.store_root()):
        run(go)


@click.command()
@click.argument("socket_path", metavar="SOCKET", type=click.Path(dir_okay=False, path_type=Path))
@virtiofs_options
@service_options
@telemetry_options(metrics=True)
@click.pass_obj
def virtiofs(
    settings: Settings,
    /,
    socket_path: Path,
    list_root: bool,
    show_xattr: bool,
    metrics_listen_address: str | None,
    otlp_endpoint: str | None,
    **services: str | None,
) -> None:
    """Serve the store paths to VMs as a virtio-fs device (vhost-user socket SOCKET), until signalled.

    QEMU (vhost-user-fs-pci) or cloud-hypervisor (--fs) connect to SOCKET; one VM at a time, one after another.
    Contents are fetched lazily: directories on first access, file data as it is read.
    """
    settings = settings.with_service_options(services)
    serve_virtiofs(
        settings,
        socket_path,
        pathinfo_roots,
        list_root=list_root,
        show_xattr=show_xattr,
        with_pathinfo=True,
        metrics_listen_address=metrics_listen_address,
        otlp_endpoint=otlp_endpoint,
    )

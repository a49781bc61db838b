"""``nixcas mount`` (store paths) and what ``nixcas castore mount`` shares with it."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from nixcas.cli.common import Settings, fail, run, service_options
from nixcas.cli.observe import telemetry_options

if TYPE_CHECKING:  # `nixcas castore` shares mount_options: keep this module light
    from nixcas.api import Store
    from nixcas.castore.fs.roots import RootNodes


_LIST_ROOT = click.option(
    "-l", "--list-root", is_flag=True, help="Allow listing the root (otherwise readdir of it is EPERM)."
)
_ALLOW_OTHER = click.option("--allow-other", is_flag=True, help="Let other users access the mount (FUSE allow_other).")
_SHOW_XATTR = click.option(
    "--show-xattr", is_flag=True, help="Offer user.{tvix,snix}.castore.{blob,directory}.digest extended attributes."
)


def mount_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options every mount command takes."""
    return _LIST_ROOT(_ALLOW_OTHER(_SHOW_XATTR(f)))


def virtiofs_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options every virtiofs command takes (here: `nixcas castore --help` loads this module, not cli.virtiofs)."""
    return _LIST_ROOT(_SHOW_XATTR(f))


async def pathinfo_roots(store: Store) -> RootNodes:
    """The store's paths as a filesystem root (one entry per <hash>-<name>): `nixcas mount` and `nixcas virtiofs`."""
    from nixcas.store.fs import PathInfoRootNodes

    assert store.pathinfos is not None
    return PathInfoRootNodes(store.pathinfos)


def check_mountpoint(mountpoint: Path) -> None:
    if not mountpoint.is_dir():
        raise click.BadParameter(f"{mountpoint}: not a directory", param_hint="MOUNTPOINT")
    if os.path.ismount(mountpoint):
        raise click.BadParameter(f"{mountpoint}: something is already mounted there", param_hint="MOUNTPOINT")


def serve_mount(
    settings: Settings,
    mountpoint: Path,
    roots: Callable[[Store], Awaitable[RootNodes]],
    *,
    list_root: bool,
    allow_other: bool,
    show_xattr: bool,
    with_pathinfo: bool = False,
    metrics_listen_address: str | None = None,
    otlp_endpoint: str | None = None,
) -> None:
    """Open the store, mount what ``roots`` gives at ``mountpoint``, serve until unmounted or signalled.

    Prints ``mounted at /abs/mountpoint`` on stdout once mounted.
    """
    from nixcas.castore.fs.fuse import MountError, serve
    from nixcas.castore.fs.ops import FsCore

    check_mountpoint(mountpoint)
    import logging

    from nixcas.cli.observe import telemetry

    where = mountpoint.absolute()

    async def go() -> None:
        async with await settings.open_store(with_pathinfo=with_pathinfo) as store:
            core = FsCore(
                await roots(store), store.blobs, store.directories, list_root=list_root, show_xattr=show_xattr
            )

            def on_mounted() -> None:
                click.echo(f"mounted at {where}")
                logging.info("serving %r, %r at %s", store.blobs, store.directories, where)

            try:
                await serve(core, where, allow_other=allow_other, on_mounted=on_mounted)
            except MountError as e:
                fail(f"cannot mount at {where}: {e.strerror}")  # fusermount3's words
            logging.info("unmounted %s", where)

    with telemetry("nixcas-mount", metrics_listen_address, otlp_endpoint, settings.store_root()):
        run(go)


@click.command()
@click.argument("mountpoint", type=click.Path(file_okay=False, path_type=Path))
@mount_options
@service_options
@telemetry_options(metrics=True)
@click.pass_obj
def mount(
    settings: Settings,
    /,
    mountpoint: Path,
    list_root: bool,
    allow_other: bool,
    show_xattr: bool,
    metrics_listen_address: str | None,
    otlp_endpoint: str | None,
    **services: str | None,
) -> None:
    """Mount the store paths read-only at MOUNTPOINT (one entry per <hash>-<name>), until unmounted or signalled.

    Contents are fetched lazily: directories on first access, file data as it is read.
    """
    settings = settings.with_service_options(services)
    serve_mount(
        settings,
        mountpoint,
        pathinfo_roots,
        list_root=list_root,
        allow_other=allow_other,
        show_xattr=show_xattr,
        with_pathinfo=True,
        metrics_listen_address=metrics_listen_address,
        otlp_endpoint=otlp_endpoint,
    )

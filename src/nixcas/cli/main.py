"""``nixcas``: global options, then a subcommand."""

from __future__ import annotations

import os
import sys

import click

from nixcas import __version__
from nixcas.cli.bridge import generate_key, nar_bridge
from nixcas.cli.castore import castore
from nixcas.cli.common import EXIT_USAGE, Settings, exit_process, fail, tune_malloc
from nixcas.cli.daemon import daemon
from nixcas.cli.gc import delete, fsck_command, gc, pin, pins, unpin
from nixcas.cli.mount import mount
from nixcas.cli.store import copy, dump_path, import_, path_info


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nixcas")
@click.option(
    "--store-dir",
    envvar="NIXCAS_STORE_DIR",
    type=click.Path(file_okay=False),
    help="Embedded store: DIR/blobs, DIR/directories.sqlite, DIR/pathinfo.sqlite [default: $XDG_DATA_HOME/nixcas].",
)
@click.option("--blob-service-addr", envvar="BLOB_SERVICE_ADDR", metavar="URL", help="Blob service URL.")
@click.option("--directory-service-addr", envvar="DIRECTORY_SERVICE_ADDR", metavar="URL", help="Directory service URL.")
@click.option("--path-info-service-addr", envvar="PATH_INFO_SERVICE_ADDR", metavar="URL", help="Path info service URL.")
@click.option(
    "--pin-service-addr",
    envvar="PIN_SERVICE_ADDR",
    metavar="URL",
    help="Pin service URL [default: the store's PostgreSQL database or daemon, else DIR/pins.sqlite].",
)
@click.option(
    "--composition",
    envvar="NIXCAS_COMPOSITION",
    type=click.Path(dir_okay=False),
    help="TOML composition file; its 'root' entries are the services used (service addrs may name entries).",
)
@click.pass_context
def cli(
    ctx: click.Context,
    store_dir: str | None,
    blob_service_addr: str | None,
    directory_service_addr: str | None,
    path_info_service_addr: str | None,
    pin_service_addr: str | None,
    composition: str | None,
) -> None:
    """A content-addressed store for Nix-style artifacts (tvix/snix compatible)."""
    ctx.obj = Settings(
        store_dir, blob_service_addr, directory_service_addr, composition, path_info_service_addr, pin_service_addr
    )


cli.add_command(castore)
cli.add_command(daemon)
cli.add_command(import_)
cli.add_command(dump_path)
cli.add_command(path_info)
cli.add_command(copy)
cli.add_command(mount)
cli.add_command(gc)
cli.add_command(delete)
cli.add_command(fsck_command)
castore.add_command(pin)
castore.add_command(unpin)
castore.add_command(pins)
cli.add_command(nar_bridge)
cli.add_command(generate_key)


def main() -> None:
    """Console-script entry point: every error is one line on stderr, and a failure exits at once."""
    try:
        _main()
    except SystemExit as e:
        exit_process(e.code)


def _main() -> None:
    if "GLIBC_TUNABLES" not in os.environ:
        tune_malloc()
    try:
        code = cli.main(prog_name="nixcas", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:  # bare `nixcas` / `nixcas castore`: show help
        click.echo(e.format_message(), err=True)
        sys.exit(EXIT_USAGE)
    except click.UsageError as e:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        fail(e.format_message() + hint, EXIT_USAGE)
    except click.ClickException as e:
        fail(e.format_message(), e.exit_code)
    except click.Abort:
        fail("interrupted", 130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()

"""``nixcas``: global options, then a subcommand."""

from __future__ import annotations

import click

from nixcas import __version__
from nixcas.cli.castore import castore
from nixcas.cli.common import Settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nixcas")
@click.option(
    "--store-dir",
    envvar="NIXCAS_STORE_DIR",
    type=click.Path(file_okay=False),
    help="Embedded store: blobs in DIR/blobs, directories in DIR/directories.sqlite [default: $XDG_DATA_HOME/nixcas].",
)
@click.option("--blob-service-addr", envvar="BLOB_SERVICE_ADDR", metavar="URL", help="Blob service URL.")
@click.option("--directory-service-addr", envvar="DIRECTORY_SERVICE_ADDR", metavar="URL", help="Directory service URL.")
@click.pass_context
def cli(
    ctx: click.Context, store_dir: str | None, blob_service_addr: str | None, directory_service_addr: str | None
) -> None:
    """A content-addressed store for Nix-style artifacts (tvix/snix compatible)."""
    ctx.obj = Settings(store_dir, blob_service_addr, directory_service_addr)


cli.add_command(castore)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="nixcas")


if __name__ == "__main__":
    main()

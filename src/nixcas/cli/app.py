"""The ``nixcas`` command tree: global options, then a subcommand (each imported when it runs)."""

from __future__ import annotations

import click

from nixcas import __version__
from nixcas.castore.sizerule import SIZE_RULE_NAMES
from nixcas.cli.common import Settings
from nixcas.cli.fast import LOG_FORMATS, LOG_LEVELS
from nixcas.cli.lazy import LazyCommand, LazyGroup

COMMANDS = {
    "castore": LazyCommand(
        "nixcas.cli.castore", "castore", "Content-addressed blobs and directories (no Nix involved)."
    ),
    "daemon": LazyCommand(
        "nixcas.cli.daemon",
        "daemon",
        "Serve the blob, directory, path info and pin services over gRPC "
        "(tvix.* and snix.* names, health, reflection).",
    ),
    "import": LazyCommand(
        "nixcas.cli.store",
        "import_",
        "Import files, symlinks or trees as store paths, as `nix-store --add` does; print each store path.",
    ),
    "dump-path": LazyCommand(
        "nixcas.cli.store", "dump_path", "Write the NAR of STORE_PATH to standard output (as `nix-store --dump`)."
    ),
    "export": LazyCommand(
        "nixcas.cli.store",
        "export",
        "Write the contents of STORE_PATH to the new path DEST, every byte verified (as `nix-store --restore`).",
    ),
    "path-info": LazyCommand("nixcas.cli.store", "path_info", "Show what the store knows about STORE_PATH."),
    "copy": LazyCommand(
        "nixcas.cli.store", "copy", "Copy paths of the local Nix store into nixcas, with Nix's metadata."
    ),
    "mount": LazyCommand(
        "nixcas.cli.mount",
        "mount",
        "Mount the store paths read-only at MOUNTPOINT (one entry per <hash>-<name>), until unmounted or signalled.",
    ),
    "virtiofs": LazyCommand(
        "nixcas.cli.virtiofs",
        "virtiofs",
        "Serve the store paths to VMs as a virtio-fs device (vhost-user socket SOCKET), until signalled.",
    ),
    "gc": LazyCommand(
        "nixcas.cli.gc",
        "gc",
        "Delete every blob, chunk and directory no PathInfo or pin reaches (older than --grace).",
    ),
    "delete": LazyCommand(
        "nixcas.cli.gc", "delete", "Remove the PathInfos of STORE_PATHS (their data is freed by the next gc)."
    ),
    "fsck": LazyCommand(
        "nixcas.cli.gc",
        "fsck_command",
        "Verify the store; print each problem with its path; exit 1 if anything is (still) wrong.",
    ),
    "nar-bridge": LazyCommand(
        "nixcas.cli.bridge",
        "nar_bridge",
        "Serve the store as a Nix HTTP binary cache (nix copy --from/--to http://ADDR).",
    ),
    "nix-daemon": LazyCommand(
        "nixcas.cli.nixdaemon",
        "nix_daemon",
        "Serve the store to Nix over its worker protocol (nix copy --to unix://PATH, ssh-ng://).",
    ),
    "generate-key": LazyCommand(
        "nixcas.cli.bridge", "generate_key", "Make a Nix signing key pair NAME (e.g. cache.example.org-1)."
    ),
}
"""Every subcommand, imported only when it runs (``--help`` shows the short help kept here)."""


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nixcas", message="%(prog)s, version %(version)s")
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
@click.option(
    "--directory-size-rule",
    envvar="NIXCAS_DIRECTORY_SIZE_RULE",
    type=click.Choice(SIZE_RULE_NAMES),
    help="Directory size rule of a new store [default: snix]; an existing store must already follow it.",
)
@click.option(
    "--log-level",
    envvar="NIXCAS_LOG_LEVEL",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    help="Log level [default: info for servers, warning otherwise; -v/-q move it].",
)
@click.option("-v", "--verbose", count=True, help="Log more (repeatable).")
@click.option("-q", "--quiet", count=True, help="Log less (repeatable).")
@click.option(
    "--log-format",
    envvar="NIXCAS_LOG_FORMAT",
    type=click.Choice(LOG_FORMATS),
    default="text",
    show_default=True,
    help="Log lines on stderr as text (time level logger: message) or as one JSON object each.",
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
    directory_size_rule: str | None,
    log_level: str | None,
    verbose: int,
    quiet: int,
    log_format: str,
) -> None:
    """A content-addressed store for Nix-style artifacts (tvix/snix compatible)."""
    from nixcas.ops.logs import LogOptions, configure

    configure(LogOptions(log_level.lower() if log_level else None, verbose - quiet, log_format))
    ctx.obj = Settings(
        store_dir,
        blob_service_addr,
        directory_service_addr,
        composition,
        path_info_service_addr,
        pin_service_addr,
        directory_size_rule,
    )

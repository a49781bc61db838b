"""The Nix layer's commands: ``import``, ``dump-path``, ``path-info``, ``copy``."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from nixcas.cli.common import Settings, pass_settings, run, share_the_gil_finely
from nixcas.cli.render import path_info_lines
from nixcas.errors import NotFoundError, PathInfoError, StorePathError
from nixcas.store.store_path import STORE_DIR, StorePath

if TYPE_CHECKING:  # each command imports what it uses: `path-info` stays light
    from nixcas.api import Store
    from nixcas.store.importer import Services
    from nixcas.store.pathinfo.base import PathInfoService
    from nixcas.store.pathinfo.model import PathInfo

IMPORT_PARALLEL = 4


def services(store: Store) -> Services:
    from nixcas.store.importer import Services

    assert store.pathinfos is not None
    return Services(store.blobs, store.directories, store.pathinfos, store.nar_calculation())


def parse_store_path(text: str) -> StorePath:
    try:
        return StorePath.parse(text)
    except StorePathError as e:
        raise click.BadParameter(str(e)) from None


async def lookup(pathinfos: PathInfoService | None, path: StorePath) -> PathInfo:
    """The PathInfo of ``path``; the name must match too (tvix compares only the hash)."""
    assert pathinfos is not None
    info = await pathinfos.get(path.digest)
    if info is None or info.store_path != path:
        raise NotFoundError(f"{path}: not in the store")
    return info


@click.command("import")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print each path's info as one JSON object per line.")
@pass_settings
def import_(settings: Settings, paths: tuple[Path, ...], as_json: bool) -> None:
    """Import files, symlinks or trees as store paths, as `nix-store --add` does; print each store path.

    On a terminal, stderr shows the files and bytes to read, the rate and the time left.
    """
    from nixcas.cli import prewalk
    from nixcas.cli.progress import transfer_progress
    from nixcas.store.importer import import_path, path_to_name

    for path in paths:
        if not os.path.lexists(path):
            raise click.BadParameter(f"{path}: no such file or directory", param_hint="PATHS")
        try:
            path_to_name(path)
        except StorePathError as e:
            raise click.BadParameter(str(e), param_hint="PATHS") from None

    share_the_gil_finely()
    walkers = {path: prewalk.take(path) for path in paths}  # one already walking, started with the process

    async def go() -> None:
        async with settings.open_store_to_write(with_pathinfo=True) as store:
            svc = services(store)
            limit = asyncio.Semaphore(IMPORT_PARALLEL)
            with transfer_progress("importing", paths) as shown:
                advance = shown.advance if shown is not None else None

                async def one(path: Path) -> PathInfo:
                    async with limit:
                        return await import_path(path, svc, progress=advance, walker=walkers.pop(path, None))

                tasks = [asyncio.ensure_future(one(p)) for p in paths]
                try:
                    for task in tasks:  # print in argument order as each is ready
                        info = await task
                        click.echo(json.dumps(info.to_json()) if as_json else str(info.store_path))
                finally:
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)

    try:
        run(go)
    finally:
        for walker in walkers.values():  # not reached: the store could not be opened
            if walker is not None:
                walker.close()


@click.command("dump-path")
@click.argument("store_path")
@pass_settings
def dump_path(settings: Settings, store_path: str) -> None:
    """Write the NAR of STORE_PATH to standard output (as `nix-store --dump`)."""
    from nixcas.cli.fast import dump_written
    from nixcas.store.nar.source import NarSource

    path = parse_store_path(store_path)
    if sys.stdout.isatty():
        raise click.UsageError("refusing to write a NAR to a terminal; redirect standard output")

    async def go() -> None:
        sys.stdout.flush()
        async with await settings.open_store(with_pathinfo=True) as store:
            info = await lookup(store.pathinfos, path)
            # after the fast path stopped at a file it could not read: the rest of the NAR (or the error)
            await NarSource(info.node, store.blobs, store.directories).dump(sys.stdout.fileno(), skip=dump_written())

    run(go)


@click.command("export")
@click.argument("store_path")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--link", is_flag=True, help="Write each blob once; further files with its contents are hard links.")
@pass_settings
def export(settings: Settings, store_path: str, dest: Path, link: bool) -> None:
    """Write the contents of STORE_PATH to the new path DEST, every byte verified (as `nix-store --restore`).

    DEST must not exist (or be an empty directory, for a directory). It appears
    only once complete: a failed export leaves nothing behind.
    """
    from nixcas.castore.export import export_node

    path = parse_store_path(store_path)

    async def go() -> None:
        async with await settings.open_store(with_pathinfo=True) as store:
            info = await lookup(store.pathinfos, path)
            await export_node(info.node, dest, store.blobs, store.directories, link=link)

    run(go)


@click.command("path-info")
@click.argument("store_path")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_settings
def path_info(settings: Settings, store_path: str, as_json: bool) -> None:
    """Show what the store knows about STORE_PATH."""
    path = parse_store_path(store_path)

    async def go() -> PathInfo:
        async with settings.open_pathinfos() as pathinfos:
            return await lookup(pathinfos, path)

    for line in path_info_lines(run(go), as_json):
        click.echo(line)


@click.command("copy")
@click.argument("source", type=click.File("rb"), default="-")
@click.option(
    "--nix-store-dir",
    type=click.Path(file_okay=False, exists=True),
    default=STORE_DIR,
    show_default=True,
    help="Where the paths' contents are read from.",
)
@click.option("--json", "as_json", is_flag=True, help='Print {"copied": [...], "skipped": [...]} (store paths).')
@pass_settings
def copy(settings: Settings, source: Any, nix_store_dir: str, as_json: bool) -> None:
    """Copy paths of the local Nix store into nixcas, with Nix's metadata.

    SOURCE (default: standard input) is the output of `nix path-info --json --recursive PATH…`
    or a JSON object with a "closure" list (exportReferencesGraph). Paths already present are
    skipped; the rest are ingested and their NAR hash and size checked against Nix's record.
    On a terminal, stderr shows paths, files and bytes to copy, the rate and the time left.
    """
    from nixcas.cli.progress import transfer_progress
    from nixcas.store.importer import copy_path, parse_path_infos, references_first

    name = getattr(source, "name", "-")
    try:
        infos = references_first(parse_path_infos(json.load(source), name))
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"{name}: not JSON: {e}", param_hint="SOURCE") from None
    except PathInfoError as e:
        raise click.BadParameter(str(e), param_hint="SOURCE") from None
    share_the_gil_finely()

    async def go() -> tuple[list[str], list[str]]:
        copied: list[str] = []
        skipped: list[str] = []
        async with settings.open_store_to_write(with_pathinfo=True) as store:
            svc = services(store)
            present = {i.store_path for i in infos}
            for exported in infos:  # every reference is in the input or already in the store
                for ref in exported.references:
                    if ref in present:
                        continue
                    found = await svc.pathinfos.get(ref.digest)
                    if found is None or found.store_path != ref:
                        raise PathInfoError(
                            f"{exported.store_path} refers to {ref}, which is neither in the input nor in the store"
                        )
                    present.add(ref)
            missing = []
            for exported in infos:
                existing = await svc.pathinfos.get(exported.store_path.digest)
                if existing is not None and existing.store_path == exported.store_path:
                    skipped.append(str(exported.store_path))
                else:
                    missing.append(exported)
            sources = [Path(nix_store_dir) / e.store_path.basename for e in missing]
            with transfer_progress("copying", sources, f"{len(missing)} paths, ") as shown:
                for done, exported in enumerate(missing):
                    if shown is not None:
                        shown.describe(f"copying {done + 1}/{len(missing)} paths, {shown.files:,} files")
                    await copy_path(
                        exported, svc, store_dir=nix_store_dir, progress=shown.advance if shown is not None else None
                    )
                    copied.append(str(exported.store_path))
        return copied, skipped

    copied, skipped = run(go)
    if as_json:
        click.echo(json.dumps({"copied": copied, "skipped": skipped}))
    click.echo(f"copied {len(copied)} paths, {len(skipped)} already present", err=True)

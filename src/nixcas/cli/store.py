"""The Nix layer's commands: ``import``, ``dump-path``, ``path-info``, ``copy``."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from nixcas.cli.common import Settings, run
from nixcas.errors import NotFoundError, PathInfoError, StorePathError
from nixcas.store.store_path import STORE_DIR, StorePath

if TYPE_CHECKING:  # each command imports what it uses: `path-info` stays light
    from rich.progress import Progress

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


@contextmanager
def progress_bar(what: str, total: int | None) -> Iterator[Progress | None]:
    """A progress bar on stderr when it is a terminal, else nothing."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn(what),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    with bar:
        yield bar


@click.command("import")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=False, path_type=Path))
@click.pass_obj
def import_(settings: Settings, paths: tuple[Path, ...]) -> None:
    """Import files, symlinks or trees as store paths, as `nix-store --add` does; print each store path."""
    from nixcas.store.importer import import_path, path_to_name

    for path in paths:
        if not os.path.lexists(path):
            raise click.BadParameter(f"{path}: no such file or directory", param_hint="PATHS")
        try:
            path_to_name(path)
        except StorePathError as e:
            raise click.BadParameter(str(e), param_hint="PATHS") from None

    async def go() -> None:
        async with settings.open_store_to_write(with_pathinfo=True) as store:
            svc = services(store)
            limit = asyncio.Semaphore(IMPORT_PARALLEL)

            async def one(path: Path) -> PathInfo:
                async with limit:
                    return await import_path(path, svc)

            tasks = [asyncio.ensure_future(one(p)) for p in paths]
            try:
                for task in tasks:  # print in argument order as each is ready
                    click.echo(str((await task).store_path))
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    run(go)


@click.command("dump-path")
@click.argument("store_path")
@click.pass_obj
def dump_path(settings: Settings, store_path: str) -> None:
    """Write the NAR of STORE_PATH to standard output (as `nix-store --dump`)."""
    from nixcas.store.nar.render import render_nar

    path = parse_store_path(store_path)
    if sys.stdout.isatty():
        raise click.UsageError("refusing to write a NAR to a terminal; redirect standard output")

    async def go() -> None:
        out = sys.stdout.buffer
        async with await settings.open_store(with_pathinfo=True) as store:
            info = await lookup(store.pathinfos, path)
            async for piece in render_nar(info.node, store.blobs, store.directories):
                out.write(piece)
        out.flush()

    run(go)


@click.command("export")
@click.argument("store_path")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--link", is_flag=True, help="Write each blob once; further files with its contents are hard links.")
@click.pass_obj
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
@click.pass_obj
def path_info(settings: Settings, store_path: str, as_json: bool) -> None:
    """Show what the store knows about STORE_PATH."""
    path = parse_store_path(store_path)

    async def go() -> PathInfo:
        async with settings.open_pathinfos() as pathinfos:
            return await lookup(pathinfos, path)

    info = run(go)
    data = info.to_json()
    if as_json:
        click.echo(json.dumps(data, indent=None))
        return
    click.echo(f"StorePath: {data['path']}")
    click.echo(f"NarHash: {info.nar_hash.to_nix32()}")
    click.echo(f"NarSize: {info.nar_size}")
    click.echo("References:" + "".join(f" {r.basename}" for r in sorted(info.references)))
    if info.deriver is not None:
        click.echo(f"Deriver: {info.deriver.basename}.drv")
    for sig in info.signatures:
        click.echo(f"Sig: {sig}")
    if info.ca is not None:
        click.echo(f"CA: {info.ca}")
    node: dict[str, Any] = data["rootNode"]  # type: ignore[assignment]
    click.echo("RootNode: " + " ".join(f"{k}={v}" for k, v in node.items()))


@click.command("copy")
@click.argument("source", type=click.File("rb"), default="-")
@click.option(
    "--nix-store-dir",
    type=click.Path(file_okay=False, exists=True),
    default=STORE_DIR,
    show_default=True,
    help="Where the paths' contents are read from.",
)
@click.pass_obj
def copy(settings: Settings, source: Any, nix_store_dir: str) -> None:
    """Copy paths of the local Nix store into nixcas, with Nix's metadata.

    SOURCE (default: standard input) is the output of `nix path-info --json --recursive PATH…`
    or a JSON object with a "closure" list (exportReferencesGraph). Paths already present are
    skipped; the rest are ingested and their NAR hash and size checked against Nix's record.
    """
    from nixcas.store.importer import copy_path, parse_path_infos, references_first

    name = getattr(source, "name", "-")
    try:
        infos = references_first(parse_path_infos(json.load(source), name))
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"{name}: not JSON: {e}", param_hint="SOURCE") from None
    except PathInfoError as e:
        raise click.BadParameter(str(e), param_hint="SOURCE") from None

    async def go() -> tuple[int, int]:
        copied = skipped = 0
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
            with progress_bar("copying", len(infos)) as bar:
                task = bar.add_task("", total=len(infos)) if bar is not None else None
                for exported in infos:
                    if bar is not None and task is not None:
                        bar.update(task, description=exported.store_path.name)
                    existing = await svc.pathinfos.get(exported.store_path.digest)
                    if existing is not None and existing.store_path == exported.store_path:
                        skipped += 1
                    else:
                        await copy_path(exported, svc, store_dir=nix_store_dir)
                        copied += 1
                    if bar is not None and task is not None:
                        bar.advance(task)
        return copied, skipped

    copied, skipped = run(go)
    click.echo(f"copied {copied} paths, {skipped} already present", err=True)

"""``nixcas castore …``: the content-addressed layer alone."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import click

from nixcas.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from nixcas.cli.common import Settings, parse_digest, pass_settings, run, share_the_gil_finely
from nixcas.cli.lazy import LazyCommand, LazyGroup
from nixcas.cli.mount import mount_options, serve_mount, virtiofs_options
from nixcas.cli.prewalk import TAR_SUFFIXES
from nixcas.cli.render import ls_line, node_json, node_line
from nixcas.errors import NixcasError, NotFoundError, ValidationError

if TYPE_CHECKING:  # each command imports what it uses: `castore ls` and `cat` stay light
    from nixcas.api import Store
    from nixcas.castore.blob.base import BlobService
    from nixcas.castore.digest import B3Digest
    from nixcas.castore.fs.roots import RootNodes


def node_from_json(text: str) -> Node:
    """A node as :func:`node_json` (``castore ingest --json``) prints it."""
    from nixcas.castore.digest import B3Digest

    try:
        data = json.loads(text)
        kind = data["type"]
        if kind == "symlink":
            return SymlinkNode(os.fsencode(data["target"]))
        digest = B3Digest.parse(data["digest"])
        size = data["size"]
        if not isinstance(size, int) or isinstance(size, bool):
            raise ValidationError(f"size {size!r} is not an integer")
        if kind == "directory":
            return DirectoryNode(digest, size)
        if kind == "file":
            return FileNode(digest, size, data.get("executable", False) is True)
        raise ValidationError(f"unknown node type {kind!r}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        detail = f"missing {e}" if isinstance(e, KeyError) else str(e)
        raise click.BadParameter(
            f"not a node as `castore ingest --json` prints it ({detail})", param_hint="ROOT"
        ) from None


async def pin_node(store: Store, name: str, node: Node) -> None:
    """Pin a root node (a directory or a file) as ``name`` in the store's pin service."""
    if isinstance(node, SymlinkNode):
        raise ValidationError("a symlink has no digest to pin (pin the directory that holds it)")
    assert store.pins is not None
    await store.pins.pin(name, node.digest)


PIN_COMMANDS = {
    "pin": LazyCommand(
        "nixcas.cli.gc", "pin", "Keep DIGEST (a directory with its closure, or a blob) through GC, under NAME."
    ),
    "unpin": LazyCommand(
        "nixcas.cli.gc",
        "unpin",
        "Remove the pin NAME (its objects are freed by the next gc unless reachable otherwise).",
    ),
    "pins": LazyCommand("nixcas.cli.gc", "pins", "List the pins: NAME DIGEST CREATED."),
    "rewrite-directories": LazyCommand(
        "nixcas.cli.rewrite",
        "rewrite_directories_command",
        "Convert the store's directories to the other size rule (snix 2026 or tvix).",
    ),
}
"""The pin commands live with GC; imported only when one runs."""


@contextmanager
def byte_progress(what: str) -> Iterator[Callable[[int], None] | None]:
    """A bytes-ingested display on stderr when it is a terminal (rich is loaded only then), else nothing."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        DownloadColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )

    progress = Progress(
        SpinnerColumn(),
        TextColumn("ingesting {task.description}"),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    with progress:
        task = progress.add_task(what, total=None)
        yield lambda n: progress.advance(task, n)


@contextmanager
def progress_for(path: Path, as_tar: bool) -> Iterator[Callable[[int], None] | None]:
    """A tree's progress with files, bytes, rate and ETA; an archive's as bytes and rate (its size is unknown)."""
    if as_tar:
        with byte_progress(str(path)) as advance:
            yield advance
        return
    from nixcas.cli.progress import transfer_progress

    with transfer_progress(f"ingesting {path}:", [path]) as shown:
        yield shown.advance if shown is not None else None


@click.group(cls=LazyGroup, lazy=PIN_COMMANDS)
def castore() -> None:
    """Content-addressed blobs and directories (no Nix involved)."""


@castore.command()
@click.argument("path", type=click.Path(exists=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the root node as JSON.")
@click.option(
    "--as",
    "kind",
    type=click.Choice(["auto", "path", "tar"]),
    default="auto",
    show_default=True,
    help="Import PATH as a filesystem object or as a tar archive (auto: tar if the name ends in .tar[.gz|.xz|.zst]).",
)
@click.option("--pin", "pin_name", metavar="NAME", help="Pin the root as NAME (a GC root), before GC can see it.")
@pass_settings
def ingest(settings: Settings, path: Path, as_json: bool, kind: str, pin_name: str | None) -> None:
    """Import a file, symlink, directory tree or tarball; print its root node."""
    from nixcas.castore.pins import validate_pin_name
    from nixcas.cli import prewalk

    if pin_name is not None:
        try:
            validate_pin_name(pin_name)
        except NixcasError as e:
            raise click.BadParameter(str(e), param_hint="--pin") from None
    if not os.path.lexists(path):
        raise click.BadParameter(f"{path}: no such file or directory", param_hint="PATH")
    as_tar = kind == "tar" or (kind == "auto" and path.name.endswith(TAR_SUFFIXES) and path.is_file())
    share_the_gil_finely()
    walker = None if as_tar else prewalk.take(path)  # already walking, started with the process

    async def go() -> Node:
        with progress_for(path, as_tar) as advance:
            async with settings.open_store_to_write(with_pins=pin_name is not None) as store:
                if as_tar:
                    node = await store.ingest_archive(path, progress=advance)
                else:
                    node = await store.ingest(path, progress=advance, walker=walker)
                if pin_name is not None:
                    await pin_node(store, pin_name, node)
                return node

    try:
        node = run(go)
    finally:
        if walker is not None:
            walker.close()  # if the store could not be opened; else closed already
    click.echo(json.dumps(node_json(node)) if as_json else node_line(node))


@castore.command()
@click.argument("digest")
@click.option("-r", "--recursive", is_flag=True, help="List the whole tree below the directory.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@pass_settings
def ls(settings: Settings, digest: str, recursive: bool, as_json: bool) -> None:
    """List the entries of the directory DIGEST."""
    root = parse_digest(digest)

    async def go() -> None:
        async with await settings.open_store() as store:
            if recursive:
                entries = store.walk(root)
                await anext(entries)  # the root itself
                async for path, node in entries:
                    emit(path, node)
            else:
                for name, node in await store.get_directory(root):
                    emit(name, node)

    def emit(name: bytes, node: Node) -> None:
        click.echo(ls_line(name, node, as_json))

    run(go)


RANGE_PIECE = 8 << 20
"""Bytes verified and written per step of ``cat --range``."""


def parse_range(text: str) -> tuple[int, int]:
    """``START:END`` (bytes ``[START, END)``; END may be omitted: to the end)."""
    start, sep, end = text.partition(":")
    try:
        lo = int(start)
        hi = int(end) if end else -1
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected START:END (byte offsets, END exclusive)") from None
    if not sep or lo < 0 or (hi >= 0 and hi < lo):
        raise click.BadParameter(f"{text!r}: expected START:END with 0 <= START <= END")
    return lo, hi


@castore.command()
@click.argument("digest")
@click.option(
    "--range",
    "byte_range",
    metavar="START:END",
    help="Only bytes [START, END), each verified through the blob's bao outboard before it is written.",
)
@pass_settings
def cat(settings: Settings, digest: str, byte_range: str | None) -> None:
    """Write the blob DIGEST to standard output (verified as it streams)."""
    blob = parse_digest(digest)
    bounds = parse_range(byte_range) if byte_range is not None else None

    async def go() -> None:
        out = sys.stdout.buffer
        async with await settings.open_store() as store:
            if bounds is not None:
                await write_verified_range(store.blobs, blob, *bounds, out)
            else:
                async with await store.open_blob(blob) as reader:
                    async for block in reader.iter_blocks():
                        out.write(block)
        out.flush()

    run(go)


@castore.command("export")
@click.argument("root")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--link", is_flag=True, help="Write each blob once; further files with its contents are hard links.")
@click.option("--executable", is_flag=True, help="Write a blob ROOT as an executable file.")
@pass_settings
def export(settings: Settings, root: str, dest: Path, link: bool, executable: bool) -> None:
    """Write the tree ROOT to the new path DEST, every byte verified: the inverse of ingest.

    ROOT is a directory or blob digest, or a root node as `castore ingest --json`
    prints it (also a symlink). DEST must not exist (or be an empty directory,
    for a directory). It appears only once complete: a failed export leaves nothing behind.
    """
    from nixcas.castore.export import export_node

    given = node_from_json(root) if root.lstrip().startswith("{") else parse_digest(root)
    if executable and isinstance(given, DirectoryNode | SymlinkNode):
        raise click.BadParameter("--executable applies to a blob root only", param_hint="--executable")

    async def go() -> None:
        async with await settings.open_store() as store:
            node = await resolve_root(store, given, executable)
            await export_node(node, dest, store.blobs, store.directories, link=link)

    run(go)


async def resolve_root(store: Store, root: Node | B3Digest, executable: bool) -> Node:
    """A digest as a root node: the directory of that digest, else the blob; a node as given."""
    if not isinstance(root, DirectoryNode | FileNode | SymlinkNode):
        directory = await store.directories.get(root)
        if directory is not None:
            if executable:
                raise ValidationError(f"{root.hex()} is a directory: --executable applies to a blob root only")
            return directory.node(store.directories.size_rule)
        size = await store.blobs.size(root)
        if size is None:
            raise NotFoundError(f"{root.hex()}: neither a directory nor a blob in the store")
        return FileNode(root, size, executable)
    if isinstance(root, FileNode) and executable:
        return FileNode(root.digest, root.size, True)
    return root


@castore.command()
@click.argument("digest")
@click.argument("mountpoint", type=click.Path(file_okay=False, path_type=Path))
@mount_options
@pass_settings
def mount(
    settings: Settings, digest: str, mountpoint: Path, list_root: bool, allow_other: bool, show_xattr: bool
) -> None:
    """Mount the directory DIGEST read-only at MOUNTPOINT, until unmounted or signalled.

    Its entries are the root of the mount; contents are fetched lazily.
    """
    root = parse_digest(digest)

    async def roots(store: Store) -> RootNodes:
        from nixcas.castore.fs.roots import DirectoryRootNodes

        return DirectoryRootNodes(await store.get_directory(root))

    serve_mount(settings, mountpoint, roots, list_root=list_root, allow_other=allow_other, show_xattr=show_xattr)


@castore.command()
@click.argument("digest")
@click.argument("socket_path", metavar="SOCKET", type=click.Path(dir_okay=False, path_type=Path))
@virtiofs_options
@pass_settings
def virtiofs(settings: Settings, digest: str, socket_path: Path, list_root: bool, show_xattr: bool) -> None:
    """Serve the directory DIGEST to VMs as a virtio-fs device (vhost-user socket SOCKET), until signalled.

    Its entries are the root of the filesystem; contents are fetched lazily.
    """
    from nixcas.cli.virtiofs import serve_virtiofs

    root = parse_digest(digest)

    async def roots(store: Store) -> RootNodes:
        from nixcas.castore.fs.roots import DirectoryRootNodes

        return DirectoryRootNodes(await store.get_directory(root))

    serve_virtiofs(settings, socket_path, roots, list_root=list_root, show_xattr=show_xattr)


async def write_verified_range(blobs: BlobService, blob: B3Digest, start: int, end: int, out: BinaryIO) -> None:
    """Bytes ``[start, end)`` (``end`` -1: to the end) in verified pieces; one outboard fetch."""
    from nixcas.castore import bao  # NumPy: loaded only for --range
    from nixcas.castore.blob.verified import read_verified_range

    outboard = await blobs.outboard(blob)
    if outboard is None:
        raise NotFoundError(f"blob {blob.hex()} not found")
    size = bao.outboard_size(outboard)
    end = size if end < 0 else end
    if end > size:
        raise ValidationError(f"range {start}:{end} is past the end of the {size}-byte blob")
    for lo in range(start, end, RANGE_PIECE):
        out.write(await read_verified_range(blobs, blob, lo, min(RANGE_PIECE, end - lo), outboard=outboard))

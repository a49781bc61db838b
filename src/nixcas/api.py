"""The library entry point: open a store, ingest paths, read blobs, walk trees.

Example::

    import asyncio, nixcas

    async def main() -> None:
        async with await nixcas.open_store("/tmp/demo-store") as store:
            root = await store.ingest("some/dir")
            async for path, node in store.walk(root):
                print(path, node)

    asyncio.run(main())

A blocking twin lives in :mod:`nixcas.sync`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from nixcas._aio import Closing
from nixcas.castore.digest import B3Digest
from nixcas.castore.nodes import DirectoryNode, Node
from nixcas.composition import ENTRYPOINT, Composition
from nixcas.errors import NotFoundError

if TYPE_CHECKING:  # the Nix layer and ingest are loaded only by the calls that use them
    from nixcas.castore.blob.base import BlobReader, BlobService
    from nixcas.castore.directory import Directory
    from nixcas.castore.dirs.base import DirectoryService
    from nixcas.castore.ingest import Progress
    from nixcas.store.nar.hashing import NarCalculationService
    from nixcas.store.pathinfo.base import PathInfoService

__all__ = ["Store", "default_store_dir", "open_store", "service_urls"]


def default_store_dir() -> Path:
    """``$NIXCAS_STORE_DIR``, else ``$XDG_DATA_HOME/nixcas``, else ``~/.local/share/nixcas``."""
    explicit = os.environ.get("NIXCAS_STORE_DIR")
    if explicit:
        return Path(explicit)
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data_home) / "nixcas"


def service_urls(store_dir: str | os.PathLike[str] | None = None) -> tuple[str, str, str]:
    """The blob, directory and path info service URLs of the embedded store in ``store_dir``.

    The embedded store keeps blobs in ``DIR/blobs`` (object layout),
    directories in ``DIR/directories.sqlite`` and path infos in ``DIR/pathinfo.sqlite``.
    """
    base = Path(store_dir) if store_dir is not None else default_store_dir()
    base = base.expanduser().absolute()
    return (
        f"objectstore+file://{base / 'blobs'}",
        f"sqlite://{base / 'directories.sqlite'}",
        f"sqlite://{base / 'pathinfo.sqlite'}",
    )


@dataclass
class Store(Closing):
    """A blob service and a directory service used together."""

    blobs: BlobService
    directories: DirectoryService
    pathinfos: PathInfoService | None = None
    """Present when the store was opened with ``with_pathinfo`` (the Nix layer)."""
    composition: Composition = field(default_factory=Composition)
    """Owns every service instance; closing the store closes it."""
    _nar: NarCalculationService | None = field(default=None, repr=False)

    @classmethod
    async def open(
        cls,
        store_dir: str | os.PathLike[str] | None = None,
        *,
        blob_service_url: str | None = None,
        directory_service_url: str | None = None,
        pathinfo_service_url: str | None = None,
        composition: Composition | str | os.PathLike[str] | None = None,
        with_pathinfo: bool = False,
    ) -> Store:
        """Open the services to use (the path info service only ``with_pathinfo``).

        Each service is, by priority: the explicit URL (or the name of a
        composition entry), the composition's entrypoint (``root``), the
        embedded store in ``store_dir``.
        """
        if composition is None:
            composition = Composition()
        elif not isinstance(composition, Composition):
            composition = Composition.from_toml(composition)
        blob_url, dir_url, pathinfo_url = service_urls(store_dir)
        try:
            blobs = await composition.blob_service(
                blob_service_url or composition.entrypoint("blobservices") or blob_url
            )
            directories = await composition.directory_service(
                directory_service_url or composition.entrypoint("directoryservices") or dir_url
            )
            pathinfos = None
            composition.provide("blobservices", ENTRYPOINT, blobs)
            composition.provide("directoryservices", ENTRYPOINT, directories)
            if with_pathinfo:
                pathinfos = await composition.pathinfo_service(
                    pathinfo_service_url or composition.entrypoint("pathinfoservices") or pathinfo_url
                )
        except BaseException:
            await composition.close()
            raise
        return cls(blobs, directories, pathinfos, composition)

    def nar_calculation(self) -> NarCalculationService:
        """NAR size/hash of nodes (cached per node).

        Computed by the daemon (``CalculateNAR``) when blobs, directories and path
        infos all live on the same one, so no blob travels back; else locally.
        """
        if self._nar is None:
            from nixcas.store.nar.hashing import SimpleNarCalculationService

            remote = self.pathinfos.nar_calculation_service() if self.pathinfos is not None else None
            targets = {getattr(s, "target", None) for s in (self.blobs, self.directories, self.pathinfos)}
            if remote is None or len(targets) != 1 or None in targets:
                remote = None
            self._nar = remote or SimpleNarCalculationService(self.blobs, self.directories)
        return self._nar

    async def ingest(self, path: str | os.PathLike[str], *, progress: Progress | None = None) -> Node:
        """Import a file, symlink or directory tree; return its root node."""
        from nixcas.castore.ingest import ingest_path

        return await ingest_path(path, self.blobs, self.directories, progress=progress)

    async def ingest_archive(
        self, source: str | os.PathLike[str] | BinaryIO, *, progress: Progress | None = None
    ) -> Node:
        """Import a tar archive (plain, gzip, xz or zstd); return its root node."""
        from nixcas.castore.archive import ingest_archive

        return await ingest_archive(source, self.blobs, self.directories, progress=progress)

    async def open_blob(self, digest: B3Digest) -> BlobReader:
        """A verified, seekable reader; :class:`~nixcas.errors.NotFoundError` if absent."""
        reader = await self.blobs.open_read(digest)
        if reader is None:
            raise NotFoundError(f"blob {digest.hex()} not found")
        return reader

    async def read_blob(self, digest: B3Digest) -> bytes:
        """A whole blob in memory (for small blobs), verified."""
        async with await self.open_blob(digest) as reader:
            return await reader.read_all()

    async def get_directory(self, digest: B3Digest) -> Directory:
        """One Directory; :class:`~nixcas.errors.NotFoundError` if absent."""
        directory = await self.directories.get(digest)
        if directory is None:
            raise NotFoundError(f"directory {digest.hex()} not found")
        return directory

    async def walk(self, root: Node | B3Digest) -> AsyncIterator[tuple[bytes, Node]]:
        """Every node below ``root`` (a node or a directory digest), depth-first in name order.

        Paths are ``/``-joined names relative to the root; the root itself is ``b""``.
        """
        if isinstance(root, B3Digest):
            root = (await self.get_directory(root)).node()
        yield b"", root
        if not isinstance(root, DirectoryNode):
            return
        closure = {d.digest: d async for d in self.directories.get_recursive(root.digest)}
        if root.digest not in closure:
            raise NotFoundError(f"directory {root.digest.hex()} not found")
        stack: list[tuple[bytes, Iterator[tuple[bytes, Node]]]] = [(b"", iter(closure[root.digest]))]
        while stack:
            prefix, entries = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                continue
            name, node = entry
            path = prefix + b"/" + name if prefix else name
            yield path, node
            if isinstance(node, DirectoryNode):
                stack.append((path, iter(closure[node.digest])))

    async def close(self) -> None:
        """Close both services and everything the composition opened for them."""
        try:
            await self.blobs.close()
            await self.directories.close()
            if self.pathinfos is not None:
                await self.pathinfos.close()
        finally:
            await self.composition.close()


async def open_store(
    store_dir: str | os.PathLike[str] | None = None,
    *,
    blob_service_url: str | None = None,
    directory_service_url: str | None = None,
    pathinfo_service_url: str | None = None,
    composition: Composition | str | os.PathLike[str] | None = None,
    with_pathinfo: bool = False,
) -> Store:
    """Open a :class:`Store` (see :meth:`Store.open`)."""
    return await Store.open(
        store_dir,
        blob_service_url=blob_service_url,
        directory_service_url=directory_service_url,
        pathinfo_service_url=pathinfo_service_url,
        composition=composition,
        with_pathinfo=with_pathinfo,
    )

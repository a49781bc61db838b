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
from nixcas.castore.nodes import MAX_DEPTH, DirectoryNode, Node
from nixcas.castore.treepath import TreePath
from nixcas.composition import ENTRYPOINT, Composition
from nixcas.embedded import BLOBS, DIRECTORIES_DB, PATHINFO_DB, PINS_DB, default_store_path, store_base
from nixcas.errors import ConfigurationError, DepthError, NotFoundError
from nixcas.registry import KINDS

if TYPE_CHECKING:  # the Nix layer and ingest are loaded only by the calls that use them
    from nixcas.castore.blob.base import BlobReader, BlobService
    from nixcas.castore.directory import Directory
    from nixcas.castore.dirs.base import DirectoryService
    from nixcas.castore.ingest import Progress
    from nixcas.castore.pins.base import PinService
    from nixcas.castore.sizerule import SizeRule
    from nixcas.castore.walkproc import WalkProcess
    from nixcas.config import ServiceConfig
    from nixcas.store.nar.hashing import NarCalculationService
    from nixcas.store.pathinfo.base import PathInfoService

__all__ = [
    "Store",
    "default_pin_service",
    "default_store_dir",
    "embedded_pin_service_url",
    "open_store",
    "service_urls",
    "shared_services",
]


def default_store_dir() -> Path:
    """``$NIXCAS_STORE_DIR``, else ``$XDG_DATA_HOME/nixcas``, else ``~/.local/share/nixcas``."""
    return Path(default_store_path())


def _store_base(store_dir: str | os.PathLike[str] | None) -> Path:
    """The embedded store's directory, absolute (``store_dir``, else :func:`default_store_dir`)."""
    return Path(store_base(store_dir))


def service_urls(store_dir: str | os.PathLike[str] | None = None) -> tuple[str, str, str]:
    """The blob, directory and path info service URLs of the embedded store in ``store_dir``.

    The embedded store keeps blobs in ``DIR/blobs`` (small ones in pack files indexed by ``DIR/blobs/packs.sqlite``,
    large ones in the object layout; see :mod:`nixcas.castore.blob.packed`),
    directories in ``DIR/directories.sqlite`` and path infos in ``DIR/pathinfo.sqlite``.
    """
    base = _store_base(store_dir)
    return (
        f"packed://{base / BLOBS}",
        f"sqlite://{base / DIRECTORIES_DB}",
        f"sqlite://{base / PATHINFO_DB}",
    )


def embedded_pin_service_url(store_dir: str | os.PathLike[str] | None = None) -> str:
    """The embedded store's pin service: ``DIR/pins.sqlite`` (on this host only)."""
    return f"sqlite://{_store_base(store_dir) / PINS_DB}"


_SHARED_TAGS = frozenset({"postgresql", "postgres", "grpc", "nix"})
_LOCAL_OBJECT_STORES = ("file:", "memory:")


def _is_shared(composition: Composition, kind: str, name: str, seen: frozenset[tuple[str, str]] = frozenset()) -> bool:
    """Whether ``kind``/``name`` keeps (or reaches) data other hosts see: S3 & co., PostgreSQL, a daemon."""
    config = composition.config(kind, name)
    if config.type_tag in _SHARED_TAGS:
        return True
    object_store_url = getattr(config, "object_store_url", None)
    if isinstance(object_store_url, str) and not object_store_url.startswith(_LOCAL_OBJECT_STORES):
        return True
    for key in _references(composition, config):
        if key not in seen and _is_shared(composition, *key, seen | {(kind, name)}):
            return True
    return False


def _references(
    composition: Composition, config: ServiceConfig[object], *, skip_near: bool = False
) -> list[tuple[str, str]]:
    """The services ``config`` wraps that the composition has configs for (not those it only provides)."""
    out = []
    for field_name, ref_kind, ref in config.referenced():
        if skip_near and field_name == "near":
            continue
        try:
            composition.config(ref_kind, ref)
        except ConfigurationError:  # an instance offered by Store.open (the store's own services)
            continue
        out.append((ref_kind, ref))
    return out


def shared_services(composition: Composition, services: dict[str, tuple[str, str]]) -> list[str]:
    """Which of ``services`` (``label -> (kind, name)``) other hosts share, as ``label (type)``."""
    return [
        f"{label} ({composition.config(kind, name).type_tag})"
        for label, (kind, name) in services.items()
        if _is_shared(composition, kind, name)
    ]


def default_pin_service(
    composition: Composition, services: list[tuple[str, str]], store_dir: str | os.PathLike[str] | None = None
) -> ServiceConfig[object]:
    """Where pins live unless configured: with the store they protect.

    ``services`` are the directory and path info services (``(kind, name)``),
    looked at in order (through cache/wrapper entries to what they wrap, never
    to a near cache): the first in PostgreSQL gives a pin table in the same
    database; the first reached through ``grpc+…`` gives that daemon's pin
    service.  Otherwise the embedded store's ``DIR/pins.sqlite``.
    """
    for kind, name in services:
        found = _pin_home(composition, kind, name, frozenset())
        if found is not None:
            return found
    from nixcas.registry import parse_service_url

    return parse_service_url("pinservices", embedded_pin_service_url(store_dir))


def _pin_home(
    composition: Composition, kind: str, name: str, seen: frozenset[tuple[str, str]]
) -> ServiceConfig[object] | None:
    config = composition.config(kind, name)
    if config.type_tag in ("postgresql", "postgres"):
        from nixcas._postgres import PostgresConfig
        from nixcas.castore.pins.postgres import PostgresPinServiceConfig

        assert isinstance(config, PostgresConfig)
        return PostgresPinServiceConfig(config.url, pool_min=0, pool_max=2, connect_timeout=config.connect_timeout)
    if config.type_tag == "grpc":
        from nixcas.castore.grpc.channel import GrpcUrlConfig
        from nixcas.castore.pins.grpc import GrpcPinServiceConfig

        assert isinstance(config, GrpcUrlConfig)
        return GrpcPinServiceConfig(config.url)
    for key in _references(composition, config, skip_near=True):
        if key[0] != kind or key in seen:
            continue
        found = _pin_home(composition, *key, seen | {(kind, name)})
        if found is not None:
            return found
    return None


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
    pins: PinService | None = None
    """Present when the store was opened with ``with_pins``: the GC roots of castore users."""
    shared: list[str] = field(default_factory=list)
    """The services other hosts share (``directories (postgresql)``…); empty for a store of this host alone."""

    @classmethod
    async def open(
        cls,
        store_dir: str | os.PathLike[str] | None = None,
        *,
        blob_service_url: str | None = None,
        directory_service_url: str | None = None,
        pathinfo_service_url: str | None = None,
        pin_service_url: str | None = None,
        composition: Composition | str | os.PathLike[str] | None = None,
        with_pathinfo: bool = False,
        with_pins: bool = False,
        size_rule: SizeRule | None = None,
    ) -> Store:
        """Open the services to use (the path info service only ``with_pathinfo``, pins only ``with_pins``).

        Each service is, by priority: the explicit URL (or the name of a
        composition entry), the composition's entrypoint (``root``), the
        embedded store in ``store_dir``.  Pins default to the store they
        protect (see :func:`default_pin_service`).  ``size_rule``: the
        directory size rule asked for (a new store records it; an existing
        store that follows the other rule is an error naming both).  A
        composition file with no entrypoint at all is a
        :class:`ConfigurationError` unless every service is named explicitly:
        it would silently leave the store embedded.
        """
        if composition is None:
            composition = Composition()
        elif not isinstance(composition, Composition):
            source = composition
            composition = Composition.from_toml(source)
            explicit = [blob_service_url, directory_service_url, pathinfo_service_url if with_pathinfo else "-"]
            if not all(explicit) and not any(composition.entrypoint(kind) for kind in KINDS):
                raise ConfigurationError(
                    f"{os.fspath(source)}: the composition has no root service (e.g. [blobservices.root]); "
                    "name its services root, or pick them with --blob-service-addr etc. "
                    "(nixcas does not fall back to the embedded store)"
                )
        if size_rule is not None:
            composition.size_rule = size_rule
        blob_url, dir_url, pathinfo_url = service_urls(store_dir)
        blob_name = blob_service_url or composition.entrypoint("blobservices") or blob_url
        dir_name = directory_service_url or composition.entrypoint("directoryservices") or dir_url
        pathinfo_name = pathinfo_service_url or composition.entrypoint("pathinfoservices") or pathinfo_url
        pins: PinService | None = None
        try:
            used = {"blobs": ("blobservices", blob_name), "directories": ("directoryservices", dir_name)}
            if with_pathinfo:
                used["path infos"] = ("pathinfoservices", pathinfo_name)
            blobs = await composition.blob_service(blob_name)
            directories = await composition.directory_service(dir_name)
            pathinfos = None
            composition.provide("blobservices", ENTRYPOINT, blobs)
            composition.provide("directoryservices", ENTRYPOINT, directories)
            if with_pathinfo:
                pathinfos = await composition.pathinfo_service(pathinfo_name)
            shared = shared_services(composition, used)
            if with_pins:
                pin_name = pin_service_url or composition.entrypoint("pinservices")
                if pin_name is None:
                    homes = [("directoryservices", dir_name), ("pathinfoservices", pathinfo_name)]
                    composition.define("pinservices", ENTRYPOINT, default_pin_service(composition, homes, store_dir))
                    pin_name = ENTRYPOINT
                pins = await composition.pin_service(pin_name)
        except BaseException:
            await composition.close()
            raise
        return cls(blobs, directories, pathinfos, composition, pins=pins, shared=shared)

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

    async def ingest(
        self, path: str | os.PathLike[str], *, progress: Progress | None = None, walker: WalkProcess | None = None
    ) -> Node:
        """Import a file, symlink or directory tree; return its root node (``walker``: its walk, already running)."""
        from nixcas.castore.ingest import ingest_path

        return await ingest_path(path, self.blobs, self.directories, progress=progress, walker=walker)

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
            root = (await self.get_directory(root)).node(self.directories.size_rule)
        yield b"", root
        if not isinstance(root, DirectoryNode):
            return
        closure = {d.digest: d async for d in self.directories.get_recursive(root.digest)}
        if root.digest not in closure:
            raise NotFoundError(f"directory {root.digest.hex()} not found")
        # Open directories as parent-linked paths: memory linear in the depth (names joined per yield).
        stack: list[tuple[TreePath, Iterator[tuple[bytes, Node]]]] = [(TreePath(None, b""), iter(closure[root.digest]))]
        while stack:
            parent, entries = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                continue
            name, node = entry
            path = TreePath(parent, name)
            yield b"/".join(path.below_root()), node
            if isinstance(node, DirectoryNode):
                if path.depth >= MAX_DEPTH and len(closure[node.digest]):
                    raise DepthError(
                        f"{path.show_below_root()}: nested deeper than the {MAX_DEPTH} levels a tree may have"
                    )
                stack.append((path, iter(closure[node.digest])))

    async def close(self) -> None:
        """Close both services and everything the composition opened for them."""
        try:
            await self.blobs.close()
            await self.directories.close()
            if self.pathinfos is not None:
                await self.pathinfos.close()
            if self.pins is not None:
                await self.pins.close()
        finally:
            await self.composition.close()


open_store = Store.open
"""Open a :class:`Store` (the same as :meth:`Store.open`)."""

"""The Nix layer's part of garbage collection: every PathInfo is a root; deleting PathInfos.

:func:`collect_garbage` fixes the cutoff (GC start minus the grace period,
no later than the oldest running writer's lease), *then* reads the roots —
every PathInfo's root node and every castore pin — and hands them to
:func:`nixcas.castore.gc.collect`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from nixcas.castore.blob.base import BlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.gc import GcProgress, GcReport, WriteLeases, check_grace, collect, require_sweepable
from nixcas.castore.nodes import DirectoryNode, FileNode, Node
from nixcas.castore.pins import PinService
from nixcas.errors import ConfigurationError, NotFoundError, StorageError, ValidationError
from nixcas.store.pathinfo.base import PathInfoService
from nixcas.store.pathinfo.model import PathInfo
from nixcas.store.store_path import StorePath

__all__ = ["DeletablePathInfos", "Roots", "check_pins_are_shared", "collect_garbage", "delete_paths", "gather_roots"]


@runtime_checkable
class DeletablePathInfos(Protocol):
    """A path info service records can be removed from (the local ones)."""

    async def delete(self, digest: bytes) -> bool: ...


@dataclass
class Roots:
    directories: list[B3Digest] = field(default_factory=list)
    blobs: list[B3Digest] = field(default_factory=list)
    pathinfos: int = 0
    pins: int = 0

    pinned: list[B3Digest] = field(default_factory=list)
    """Pinned digests: directories or blobs (:meth:`resolve_pins` sorts them)."""

    def add(self, node: Node) -> None:
        if isinstance(node, DirectoryNode):
            self.directories.append(node.digest)
        elif isinstance(node, FileNode):
            self.blobs.append(node.digest)

    async def resolve_pins(self, directories: DirectoryService) -> None:
        """Each pinned digest is a directory root if such a directory is stored, else a blob root."""
        for i in range(0, len(self.pinned), 1000):
            batch = self.pinned[i : i + 1000]
            found = await directories.get_many_raw(batch)
            for digest in batch:
                (self.directories if digest in found else self.blobs).append(digest)
        self.pinned = []


def check_pins_are_shared(shared: Sequence[str], pins: PinService | None) -> None:
    """Refuse to collect a shared store whose pins other hosts cannot see (or that has none configured).

    A pin made on another host would be invisible here, and what it keeps would be deleted.
    """
    if not shared:
        return
    if pins is None or pins.per_host:
        where = "no pin service" if pins is None else f"pins in {pins!r}, seen on this host only"
        raise ConfigurationError(
            f"refusing to collect a shared store ({', '.join(shared)}) with {where}: "
            "use a shared pin service (--pin-service-addr postgresql://… or the daemon's grpc+… URL)"
        )


async def gather_roots(pathinfos: PathInfoService | None, pins: PinService | None) -> Roots:
    """The root nodes of every PathInfo and every pinned digest."""
    roots = Roots()
    if pathinfos is not None:
        async for info in pathinfos.list():
            roots.add(info.node)
            roots.pathinfos += 1
    if pins is not None:
        try:
            listed = await pins.list()
        except StorageError as e:
            raise StorageError(f"cannot read the pins (nothing was deleted): {e}") from None
        for pin in listed:
            roots.pinned.append(pin.digest)
            roots.pins += 1
    return roots


async def collect_garbage(
    blobs: BlobService,
    directories: DirectoryService,
    pathinfos: PathInfoService | None,
    pins: PinService | None,
    leases: WriteLeases,
    *,
    grace_ns: int,
    dry_run: bool = False,
    progress: GcProgress | None = None,
    shared: Sequence[str] = (),
) -> tuple[GcReport, Roots]:
    """One collection of the store; see the module docstring for the order of steps.

    ``shared`` names the services other hosts use too (:attr:`nixcas.api.Store.shared`): then the
    pins must be in a shared pin service (:func:`check_pins_are_shared`).
    """
    require_sweepable(blobs, directories)
    check_pins_are_shared(shared, pins)
    if grace_ns < 0:
        raise ValidationError("the grace period cannot be negative")
    check_grace(grace_ns, blobs, directories)
    with leases.collecting():
        cutoff_ns = leases.cutoff_ns(grace_ns)
        roots = await gather_roots(pathinfos, pins)
        await roots.resolve_pins(directories)
        report = await collect(
            blobs,
            directories,
            roots.directories,
            roots.blobs,
            cutoff_ns=cutoff_ns,
            dry_run=dry_run,
            progress=progress,
        )
    return report, roots


async def delete_paths(
    pathinfos: PathInfoService, paths: Sequence[StorePath], *, force: bool = False
) -> list[PathInfo]:
    """Remove the PathInfos of ``paths``; their data goes at the next GC.

    Every path must be present.  Unless ``force``, a path still referenced by
    a PathInfo that is not itself being deleted is refused (nothing is deleted
    then).  Returns the records removed.
    """
    if not isinstance(pathinfos, DeletablePathInfos):
        raise ConfigurationError(
            f"cannot delete path infos from {pathinfos!r} (only from sqlite, postgresql and memory ones)"
        )
    doomed: dict[StorePath, PathInfo] = {}
    for path in paths:
        info = await pathinfos.get(path.digest)
        if info is None or info.store_path != path:
            raise NotFoundError(f"{path}: not in the store")
        doomed[path] = info
    if not force:
        referrers = await _referrers(pathinfos, doomed)
        if referrers:
            path, by = next(iter(referrers.items()))
            more = f" (and {len(referrers) - 1} more paths are referenced)" if len(referrers) > 1 else ""
            names = ", ".join(sorted(str(b) for b in by))
            raise ValidationError(f"{path} is still referenced by {names}{more}; use --force to delete anyway")
    for info in doomed.values():
        await pathinfos.delete(info.digest)
    return list(doomed.values())


async def _referrers(pathinfos: PathInfoService, doomed: dict[StorePath, PathInfo]) -> dict[StorePath, list[StorePath]]:
    """For each path to delete, the other (staying) PathInfos that refer to it."""
    found: dict[StorePath, list[StorePath]] = {}
    async for info in pathinfos.list():
        if info.store_path in doomed:
            continue
        for ref in info.references:
            if ref in doomed and ref != info.store_path:
                found.setdefault(ref, []).append(info.store_path)
    return found

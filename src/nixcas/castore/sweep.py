"""The garbage-collection contract a backend implements (beside the service interfaces).

A backend that can be collected implements :class:`SweepableBlobs` /
:class:`SweepableDirectories` (and optionally :class:`HasOutboards`,
:class:`HasTemporaryFiles`): enumerate stored objects as
:class:`StoredObject` batches, and delete an object only if it is still older
than a cutoff when looked at again, reporting a :class:`Deletion`.  The
collector itself (marking, sweeping, reports, write leases) is
:mod:`nixcas.castore.gc`; this module holds only the types, so a backend
does not load the collector.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from nixcas.castore.digest import B3Digest

__all__ = [
    "FOREVER_NS",
    "SCAN_BATCH",
    "Deletion",
    "HasOutboards",
    "HasTemporaryFiles",
    "StoredObject",
    "SweepableBlobs",
    "SweepableDirectories",
    "delete_in_memory",
    "scan_in_memory",
]

FOREVER_NS = (1 << 63) - 1
"""A cutoff no object is younger than (deletes unconditionally: repairs)."""


@dataclass(frozen=True, slots=True)
class StoredObject:
    """One stored object as a sweep sees it."""

    digest: B3Digest
    size: int
    """Bytes it occupies in the backend (compressed chunk bytes, index bytes, encoded directory)."""
    mtime_ns: int
    """When it was last written or re-put (nanoseconds since the epoch)."""
    chunks: tuple[B3Digest, ...] = ()
    """Blobs: the chunk objects its index lists (empty when the blob is one chunk)."""


@dataclass
class Deletion:
    """What a delete call did: removed, or kept because it turned out younger than the cutoff.

    Objects in neither list were already gone (counted as success).
    """

    deleted: list[StoredObject] = field(default_factory=list)
    kept: list[StoredObject] = field(default_factory=list)


@runtime_checkable
class SweepableBlobs(Protocol):
    """A blob service GC can enumerate and delete from."""

    def scan_blobs(self) -> AsyncIterator[list[StoredObject]]:
        """Every stored blob, in batches."""

    def scan_chunks(self) -> AsyncIterator[list[StoredObject]]:
        """Every stored chunk object (none for backends that keep blobs whole), in batches."""

    async def delete_blobs(self, objects: Sequence[StoredObject], cutoff_ns: int) -> Deletion:
        """Delete those blobs (not their chunks) that are still older than ``cutoff_ns``."""

    async def delete_chunks(self, objects: Sequence[StoredObject], cutoff_ns: int) -> Deletion:
        """Delete those chunk objects that are still older than ``cutoff_ns``."""


@runtime_checkable
class HasOutboards(Protocol):
    """A blob backend that caches derived bao outboards (``bao/``), one per blob digest."""

    def scan_outboards(self) -> AsyncIterator[list[StoredObject]]:
        """Every cached outboard, in batches (``digest`` is the blob's)."""

    async def delete_outboards(self, objects: Sequence[StoredObject], cutoff_ns: int) -> Deletion:
        """Delete those outboards that are still older than ``cutoff_ns``."""


@runtime_checkable
class HasTemporaryFiles(Protocol):
    """A backend that keeps temporary files (the local blob store's ``tmp/``)."""

    async def sweep_temporary(self, cutoff_ns: int, dry_run: bool) -> list[StoredObject]:
        """Undo interrupted deletions; remove temporary files older than the cutoff; return those removed."""


@runtime_checkable
class SweepableDirectories(Protocol):
    """A directory service GC can enumerate and delete from."""

    def scan_directories(self) -> AsyncIterator[list[StoredObject]]:
        """Every stored directory, in batches."""

    async def delete_directories(self, objects: Sequence[StoredObject], cutoff_ns: int) -> Deletion:
        """Delete those directories that are still older than ``cutoff_ns``."""


SCAN_BATCH = 1000


def scan_in_memory(data: dict[B3Digest, bytes], mtimes: dict[B3Digest, int]) -> Iterator[list[StoredObject]]:
    """The objects of an in-memory backend (``digest -> bytes``, ``digest -> mtime``), in batches."""
    items = list(data.items())
    for i in range(0, len(items), SCAN_BATCH):
        yield [StoredObject(d, len(raw), mtimes.get(d, 0)) for d, raw in items[i : i + SCAN_BATCH]]


def delete_in_memory(
    data: dict[B3Digest, bytes], mtimes: dict[B3Digest, int], objects: Sequence[StoredObject], cutoff_ns: int
) -> Deletion:
    """Delete-if-older for an in-memory backend (runs on the event loop: atomic with its puts)."""
    done = Deletion()
    for obj in objects:
        if obj.digest not in data:
            continue
        if mtimes.get(obj.digest, 0) >= cutoff_ns:
            done.kept.append(obj)
        else:
            del data[obj.digest]
            mtimes.pop(obj.digest, None)
            done.deleted.append(obj)
    return done

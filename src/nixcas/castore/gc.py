"""Garbage collection of the castore: mark from root digests, sweep what is old and unmarked.

Backends that can be collected implement :class:`SweepableBlobs` /
:class:`SweepableDirectories`: enumerate stored objects (with their stored
size and the time they were last written *or re-put*), and delete an object
only if it is still older than a cutoff when looked at again (idempotent:
an object already gone counts as done).  Remote and composite services do
not implement them; :func:`require_sweepable` names the service instead.

Safety under concurrent writers rests on three rules:

* the cutoff is at most the GC start minus the grace period, and at most the
  start of every live :class:`WriteLeases` lease, so anything written while
  GC runs, or by an import that was already running, is newer than it;
* a put that finds its object already stored refreshes its time, so an old
  unreferenced object that is re-referenced becomes young again;
* backends re-check the time at the moment of deletion (atomically, or by
  moving the object aside first), so such a refresh racing the sweep wins.

Nothing here knows about Nix: the Nix layer adds its roots (every PathInfo)
in :mod:`nixcas.store.gc`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import blake3

from nixcas.castore.blob.base import BlobService
from nixcas.castore.digest import EMPTY_DIGEST, B3Digest
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.sweep import (
    FOREVER_NS,
    Deletion,
    HasOutboards,
    HasTemporaryFiles,
    StoredObject,
    SweepableBlobs,
    SweepableDirectories,
)
from nixcas.errors import ChecksumMismatch, ConfigurationError, StorageError, ValidationError
from nixcas.urls import is_decimal

__all__ = [
    "FOREVER_NS",
    "KINDS",
    "Deletion",
    "GcProgress",
    "GcReport",
    "HasOutboards",
    "HasTemporaryFiles",
    "KindReport",
    "Marked",
    "StoredObject",
    "SweepableBlobs",
    "SweepableDirectories",
    "WriteLeases",
    "check_grace",
    "collect",
    "mark",
    "parse_duration",
    "require_sweepable",
]

KINDS = ("directory", "blob", "chunk", "outboard", "temporary")
"""The kinds of object a collection reports on, in sweep order."""


def require_sweepable(blobs: BlobService, directories: DirectoryService) -> tuple[SweepableBlobs, SweepableDirectories]:
    """The two services as sweepable ones, or a :class:`ConfigurationError` naming the one that is not."""
    supported = "objectstore and memory blobs; sqlite, postgresql, objectstore and memory directories"
    if not isinstance(blobs, SweepableBlobs):
        raise ConfigurationError(
            f"garbage collection works on the store's own backends ({supported}), not on {blobs!r}; "
            "run it where the blobs are stored"
        )
    if not isinstance(directories, SweepableDirectories):
        raise ConfigurationError(
            f"garbage collection works on the store's own backends ({supported}), not on {directories!r}; "
            "run it where the directories are stored"
        )
    return blobs, directories


def check_grace(grace_ns: int, *services: object) -> None:
    """Refuse a grace period shorter than a service needs (object stores: twice their ``refresh_after``).

    Object stores cannot refresh an object's age in place; their writers rely
    on objects written within ``refresh_after`` and rewrite older ones, so a
    collection must keep more than that (see ``min_grace_ns``).
    """
    for service in services:
        needed = int(getattr(service, "min_grace_ns", 0))
        if grace_ns < needed:
            raise ValidationError(
                f"a grace period of {grace_ns / 1e9:g} s is too short for {service!r}: it needs at least "
                f"{needed / 1e9:g} s (twice its refresh_after; more if an import takes longer than refresh_after)"
            )


_UNITS = {"ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9, "d": 86400 * 10**9}


def parse_duration(text: str) -> int:
    """``0s``, ``30m``, ``1h``, ``1h30m``, ``2d``, ``500ms`` (or bare seconds) in nanoseconds."""
    rest = text.strip()
    if is_decimal(rest):
        return int(rest) * 10**9
    total = 0
    parts = re.fullmatch(r"(?:\d+(?:ms|s|m|h|d))+", rest)
    if not rest or parts is None:
        raise ConfigurationError(f"invalid duration {text!r} (examples: 0s, 30m, 1h, 1h30m, 2d)")
    for number, unit in re.findall(r"(\d+)(ms|s|m|h|d)", rest):
        total += int(number) * _UNITS[unit]
    return total


# -- write leases ------------------------------------------------------------------


class WriteLeases:
    """Leases of running writers, as lock files in one directory of the store.

    A writer holds a lease (:meth:`hold`) from before its first write until it
    has published the roots that keep its objects (a PathInfo, a pin).  The
    lease file's modification time is its start; it is ``flock``-ed while
    held, so a lease whose process died is recognized and removed.  GC never
    deletes anything newer than the oldest live lease.  Times come from the
    filesystem's clock (:meth:`now_ns`), the same one that stamps objects.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """A lease for the duration of the ``with`` block."""
        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            name = f"{os.getpid()}.{secrets.token_hex(8)}"
            path = self.directory / name
            # Locked under a hidden name first, so no collector sees it unlocked and takes it for a dead one.
            hidden = self.directory / f".new.{name}"
            fd = os.open(hidden, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.rename(hidden, path)
                break
            except FileNotFoundError:  # a collector removed it in the instant before the lock: again
                os.close(fd)
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            os.close(fd)

    @contextlib.contextmanager
    def collecting(self) -> Iterator[None]:
        """One collection at a time per store (another one running is a :class:`StorageError`)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / ".gc.lock", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StorageError(f"another garbage collection is running on this store ({self.directory})") from None
            yield
        finally:
            os.close(fd)

    def now_ns(self) -> int:
        """The filesystem's current time here (a new file's mtime); never later than the true time."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f".clock.{os.getpid()}.{secrets.token_hex(8)}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            return os.fstat(fd).st_mtime_ns
        finally:
            os.close(fd)
            path.unlink()

    def oldest_ns(self) -> int | None:
        """Start of the oldest live lease (``None``: none); leases of dead processes are removed."""
        oldest: int | None = None
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return None
        for entry in entries:
            if entry.name.startswith(".") and not entry.name.startswith(".new."):
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # released meanwhile
            try:
                start = os.fstat(fd).st_mtime_ns
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if not entry.name.startswith("."):  # a ".new." one is renamed before its first write
                        oldest = start if oldest is None else min(oldest, start)
                    continue
                # Nobody holds it: the writer died (or released it just now); it protects nothing.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
            finally:
                os.close(fd)
        return oldest

    def cutoff_ns(self, grace_ns: int) -> int:
        """The GC cutoff: now minus ``grace_ns``, and no later than the oldest live lease."""
        cutoff = self.now_ns() - grace_ns
        oldest = self.oldest_ns()
        return cutoff if oldest is None else min(cutoff, oldest)


# -- mark ----------------------------------------------------------------------------


@dataclass
class Marked:
    """What the roots reach."""

    directories: set[B3Digest] = field(default_factory=set)
    blobs: set[B3Digest] = field(default_factory=set)
    missing_directories: set[B3Digest] = field(default_factory=set)


MARK_BATCH = 2000


def _children(digest: B3Digest, raw: bytes) -> tuple[list[B3Digest], list[B3Digest]]:
    """The sub-directory and file blob digests of a stored Directory, after checking its hash."""
    from nixcas._proto.tvix.castore.protos import castore_pb2 as pb  # loaded when GC runs, not by `import`

    got = blake3.blake3(raw).digest()
    if got != digest:
        raise ChecksumMismatch(f"directory {digest.hex()} (run nixcas fsck)", digest.hex(), got.hex())
    try:
        msg = pb.Directory.FromString(raw)
    except Exception as e:  # protobuf DecodeError and friends
        raise StorageError(f"directory {digest.hex()} is stored in an invalid form: {e} (run nixcas fsck)") from None
    return [B3Digest(d.digest) for d in msg.directories], [B3Digest(f.digest) for f in msg.files]


async def mark(
    directories: DirectoryService,
    root_directories: Iterable[B3Digest],
    root_blobs: Iterable[B3Digest] = (),
    *,
    on_directory: Callable[[int], None] | None = None,
) -> Marked:
    """Everything reachable from the roots (breadth-first over all roots at once, batched reads).

    A missing directory is recorded (its subtree cannot be marked; fsck
    reports it); a corrupt one stops the collection: what it refers to is
    unknown, so nothing may be swept.
    """
    marked = Marked(blobs=set(root_blobs))
    level = [d for d in dict.fromkeys(root_directories)]
    marked.directories.update(level)
    if directories.closures_only:
        await _mark_closures(directories, level, marked, on_directory)
        return marked
    while level:
        next_level: list[B3Digest] = []
        for i in range(0, len(level), MARK_BATCH):
            batch = level[i : i + MARK_BATCH]
            found = await directories.get_many_raw(batch)
            for digest in batch:
                raw = found.get(digest)
                if raw is None:
                    marked.missing_directories.add(digest)
                    continue
                subdirs, files = _children(digest, raw)
                marked.blobs.update(files)
                for child in subdirs:
                    if child not in marked.directories:
                        marked.directories.add(child)
                        next_level.append(child)
            if on_directory is not None:
                on_directory(len(batch))
        level = next_level
    return marked


CLOSURES_AT_ONCE = 16
"""Closures :func:`mark` reads at once from a service that stores whole closures."""


async def _mark_closures(
    directories: DirectoryService,
    roots: Sequence[B3Digest],
    marked: Marked,
    on_directory: Callable[[int], None] | None,
) -> None:
    """Mark for a service that answers only closure roots: each root's closure read whole.

    A root inside a closure already read is not read again (its closure is
    part of that one).  The service checks each closure as it reads it.
    """
    expanded: set[B3Digest] = set()

    async def one(root: B3Digest) -> None:
        if root in expanded:
            return
        count = 0
        async for digest, raw in directories.get_recursive_raw(root):
            count += 1
            if digest in expanded:
                continue
            expanded.add(digest)
            subdirs, files = _children(digest, raw)
            marked.directories.add(digest)
            marked.directories.update(subdirs)
            marked.blobs.update(files)
        if not count:
            marked.missing_directories.add(root)
        if on_directory is not None:
            on_directory(count)

    for i in range(0, len(roots), CLOSURES_AT_ONCE):
        await asyncio.gather(*(one(root) for root in roots[i : i + CLOSURES_AT_ONCE]))


# -- sweep ---------------------------------------------------------------------------


@dataclass
class KindReport:
    """One kind of object in a collection."""

    scanned: int = 0
    live: int = 0
    """Reachable from a root."""
    young: int = 0
    """Unreachable but newer than the cutoff (kept)."""
    freed: int = 0
    freed_bytes: int = 0

    def to_json(self) -> dict[str, int]:
        return {
            "scanned": self.scanned,
            "live": self.live,
            "young": self.young,
            "freed": self.freed,
            "freed_bytes": self.freed_bytes,
        }


@dataclass
class GcReport:
    """The outcome of :func:`collect`."""

    dry_run: bool
    cutoff_ns: int
    kinds: dict[str, KindReport] = field(default_factory=lambda: {k: KindReport() for k in KINDS})
    missing_directories: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time per phase: ``mark``, then the sweep of each kind."""

    @property
    def freed(self) -> int:
        return sum(k.freed for k in self.kinds.values())

    @property
    def freed_bytes(self) -> int:
        return sum(k.freed_bytes for k in self.kinds.values())

    def to_json(self) -> dict[str, object]:
        return {
            "dry_run": self.dry_run,
            "cutoff_ns": self.cutoff_ns,
            "freed": self.freed,
            "freed_bytes": self.freed_bytes,
            "missing_directories": self.missing_directories,
            "kinds": {name: k.to_json() for name, k in self.kinds.items()},
            "seconds": {name: round(t, 3) for name, t in self.seconds.items()},
        }


class GcProgress(Protocol):
    """Receives progress: a phase starts (with a total if known), then steps of it complete."""

    def phase(self, name: str, total: int | None) -> None: ...

    def advance(self, n: int) -> None: ...


class _NoProgress:
    def phase(self, name: str, total: int | None) -> None:
        pass

    def advance(self, n: int) -> None:
        pass


async def _sweep(
    scan: AsyncIterator[list[StoredObject]],
    live: Callable[[StoredObject], bool],
    delete: Callable[[Sequence[StoredObject], int], Awaitable[Deletion]],
    report: KindReport,
    cutoff_ns: int,
    dry_run: bool,
    progress: GcProgress,
    survivors: Callable[[StoredObject], None] | None = None,
) -> None:
    """Scan one kind, delete the old unmarked ones; ``survivors`` sees every object that stays."""
    async for batch in scan:
        report.scanned += len(batch)
        doomed: list[StoredObject] = []
        for obj in batch:
            if live(obj):
                report.live += 1
            elif obj.mtime_ns >= cutoff_ns:
                report.young += 1
            else:
                doomed.append(obj)
                continue
            if survivors is not None:
                survivors(obj)
        if dry_run:
            report.freed += len(doomed)
            report.freed_bytes += sum(o.size for o in doomed)
        elif doomed:
            done = await delete(doomed, cutoff_ns)
            report.freed += len(done.deleted)
            report.freed_bytes += sum(o.size for o in done.deleted)
            report.young += len(done.kept)
            if survivors is not None:
                for obj in done.kept:
                    survivors(obj)
        progress.advance(len(batch))


class _Laps:
    """Seconds per phase, into ``report.seconds``."""

    def __init__(self, report: GcReport) -> None:
        self.report = report
        self.started = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.report.seconds[name] = now - self.started
        self.started = now


async def collect(
    blobs: BlobService,
    directories: DirectoryService,
    root_directories: Iterable[B3Digest],
    root_blobs: Iterable[B3Digest] = (),
    *,
    cutoff_ns: int,
    dry_run: bool = False,
    progress: GcProgress | None = None,
) -> GcReport:
    """Mark from the roots, then sweep directories, blobs and chunks older than ``cutoff_ns``.

    The roots must have been read *after* ``cutoff_ns`` was fixed (see
    :meth:`WriteLeases.cutoff_ns`).  Chunks are swept last and only if no
    surviving blob lists them (a blob kept as young keeps its chunks).
    Restartable: an interrupted run leaves only garbage that the next run
    finds again.
    """
    sweep_blobs, sweep_dirs = require_sweepable(blobs, directories)
    progress = progress or _NoProgress()
    report = GcReport(dry_run, cutoff_ns)
    lap = _Laps(report)

    progress.phase("marking", None)
    marked = await mark(directories, root_directories, root_blobs, on_directory=progress.advance)
    report.missing_directories = len(marked.missing_directories)
    lap("mark")

    progress.phase("directories", None)
    await _sweep(
        sweep_dirs.scan_directories(),
        lambda o: o.digest in marked.directories,
        sweep_dirs.delete_directories,
        report.kinds["directory"],
        cutoff_ns,
        dry_run,
        progress,
    )
    lap("directory")
    await _sweep_blob_side(sweep_blobs, marked, report, lap, progress)
    return report


async def _sweep_blob_side(
    blobs: SweepableBlobs, marked: Marked, report: GcReport, lap: Callable[[str], None], progress: GcProgress
) -> None:
    """Blobs, then what only surviving blobs keep alive (chunks, cached outboards), then temporary files."""
    cutoff_ns, dry_run = report.cutoff_ns, report.dry_run
    # A single-chunk blob's chunk object has the blob's own digest; marked blobs keep theirs
    # even if their index went missing.
    live_chunks: set[B3Digest] = set(marked.blobs)

    def keep_chunks(obj: StoredObject) -> None:
        live_chunks.add(obj.digest)
        live_chunks.update(obj.chunks)

    progress.phase("blobs", None)
    await _sweep(
        blobs.scan_blobs(),
        lambda o: o.digest in marked.blobs or o.digest == EMPTY_DIGEST,
        blobs.delete_blobs,
        report.kinds["blob"],
        cutoff_ns,
        dry_run,
        progress,
        survivors=keep_chunks,
    )
    lap("blob")
    dependents = [("chunk", blobs.scan_chunks, blobs.delete_chunks)]
    if isinstance(blobs, HasOutboards):
        dependents.append(("outboard", blobs.scan_outboards, blobs.delete_outboards))
    for kind, scan, delete in dependents:
        progress.phase(f"{kind}s", None)
        live = report.kinds[kind]
        await _sweep(scan(), lambda o: o.digest in live_chunks, delete, live, cutoff_ns, dry_run, progress)
        lap(kind)
    if isinstance(blobs, HasTemporaryFiles):
        swept = await blobs.sweep_temporary(cutoff_ns, dry_run)
        temporary = report.kinds["temporary"]
        temporary.scanned = temporary.freed = len(swept)
        temporary.freed_bytes = sum(o.size for o in swept)
        lap("temporary")

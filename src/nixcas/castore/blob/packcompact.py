"""Compaction of ``packed://`` pack files: the dead space a GC sweep leaves behind, freed (and the
creation of a pack file, and the ``fsync`` of the rows' write-ahead log, which ``packed.py`` leaves here).

A pack with no row (its writer died before the first one) is removed once
older than the cutoff, one whose live bytes are less than half its size is
rewritten, and small packs (each import process writes its own) are merged
into one once there are :data:`MERGE_COUNT` of them.  A pack is only touched
while this process holds its ``flock``: a writer appending to it holds the
lock, so its pack is never compacted.  Rewriting copies the live blobs into a
new pack, ``fsync``-s it and moves their rows in one transaction; the old
files are removed after the commit.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import secrets
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from nixcas.castore.digest import EMPTY_DIGEST
from nixcas.castore.sweep import StoredObject
from nixcas.errors import StorageError

__all__ = [
    "MERGE_BELOW",
    "MERGE_COUNT",
    "LockedPack",
    "LogBarrier",
    "OpenPack",
    "Survey",
    "copy_live_blobs",
    "create_pack",
    "survey_packs",
    "sync_directory",
    "sync_wal",
]

MERGE_BELOW = 64 << 20
"""Packs smaller than this are merged by GC once there are :data:`MERGE_COUNT` of them."""

MERGE_COUNT = 16
"""How many small packs make GC merge them into one."""

LockedPack = tuple[int, int, str]
"""``(pack id, open and locked descriptor, path)`` of a pack being compacted."""


@dataclass
class OpenPack:
    """A pack file being appended to (locked by its writer)."""

    id: int
    fd: int
    size: int


def create_pack(path_of: Callable[[str], str]) -> tuple[str, int]:
    """A new, empty pack file at ``path_of(name)`` for a fresh random name, locked (``flock``: never compacted
    while its writer holds it), its name durable (the directory synced): ``(name, fd)``."""
    while True:
        name = secrets.token_hex(12)
        path = path_of(name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(path, fd):  # not taken for an orphan and removed by a GC before the lock was held
                sync_directory(os.path.dirname(path))
                return name, fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _same_file(path: str, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


class LogBarrier:
    """Makes the transactions committed to a SQLite database in WAL mode (``synchronous=NORMAL``) durable.

    Writers call :meth:`committed` after each commit; :meth:`sync` returns once an ``fsync`` of the
    write-ahead log that started after every commit counted before the call has completed (callers
    waiting together share one), and does nothing when none was counted since the last.
    """

    def __init__(self, db_path: str) -> None:
        self.db_path = db_path
        self._count = 0
        self._count_lock = threading.Lock()
        self._synced = 0
        self._named = 0  # the inode of the log whose name was made durable
        self._sync_lock = asyncio.Lock()

    def committed(self) -> None:
        with self._count_lock:
            self._count += 1

    def covered(self, count: int) -> None:
        """Commits up to ``count`` (a :meth:`count` taken before a barrier that covered them) are durable."""
        with self._count_lock:
            self._synced = max(self._synced, count)

    def count(self) -> int:
        with self._count_lock:
            return self._count

    def sync_now(self) -> None:
        """An ``fsync`` of the log now, in the calling (worker) thread, for the commits counted so far."""
        start = self.count()
        self._named = sync_wal(self.db_path, self._named)
        self.covered(start)

    async def sync(self, first: Callable[[], Awaitable[None]] | None = None) -> None:
        """The log's ``fsync`` if needed; ``first``: a barrier to run before, which covers what was committed."""
        if first is not None:
            before = self.count()
            await first()
            self.covered(before)
        target = self.count()
        async with self._sync_lock:
            if target <= self._synced:  # nothing new, or covered by an fsync this call waited for (or sync_now)
                return
            start = self.count()
            self._named = await asyncio.to_thread(sync_wal, self.db_path, self._named)
            self.covered(start)


def sync_wal(db_path: str, named: int) -> int:
    """``fsync`` the write-ahead log of the SQLite database ``db_path`` (its committed transactions are durable
    then), and its directory too unless ``named`` is the log's inode (its name made durable before): that inode.

    A missing log was checkpointed into the database and removed, which SQLite syncs itself.
    """
    try:
        fd = os.open(f"{db_path}-wal", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return named
    try:
        os.fsync(fd)
        inode = os.fstat(fd).st_ino
    finally:
        os.close(fd)
    if inode != named:
        sync_directory(os.path.dirname(db_path))
    return inode


def sync_directory(path: str) -> None:
    """``fsync`` the directory ``path``: the names created in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Survey:
    """What :func:`survey_packs` found: the space it frees, and the packs to rewrite (held locked)."""

    freed: list[StoredObject] = field(default_factory=list)
    rewrite: list[LockedPack] = field(default_factory=list)
    small: list[LockedPack] = field(default_factory=list)
    """Mostly live packs below :data:`MERGE_BELOW`: merged (moved to :attr:`rewrite`) once there are enough."""
    small_dead: list[StoredObject] = field(default_factory=list)
    """The dead bytes of each small pack, freed if they are merged."""

    def close(self) -> None:
        """Release every pack held (closing its descriptor drops its lock)."""
        for _, fd, _ in self.rewrite + self.small:
            os.close(fd)
        self.rewrite, self.small = [], []


def survey_packs(db: sqlite3.Connection, packs_dir: str, cutoff_ns: int, dry_run: bool) -> Survey:
    """Lock every pack no writer holds and decide its fate; orphans older than ``cutoff_ns`` are removed now.

    The caller rewrites :attr:`Survey.rewrite` (unless ``dry_run``) and closes the survey.
    """
    known = dict(db.execute("SELECT name, id FROM packs"))
    live = {
        pack: (count, used)
        for pack, count, used in db.execute("SELECT pack, count(*), sum(length) FROM blobs GROUP BY pack")
    }
    survey = Survey()
    try:
        for entry in list(os.scandir(packs_dir)):
            name = entry.name.removesuffix(".pack")
            if name == entry.name:
                continue
            fd = _lock(entry.path)
            if fd is not None:
                _judge(survey, fd, entry.path, known.get(name), live, cutoff_ns, dry_run)
        if len(survey.small) >= MERGE_COUNT:
            survey.rewrite.extend(survey.small)
            survey.freed.extend(o for o in survey.small_dead if o.size)
            survey.small = []
    except BaseException:
        survey.close()
        raise
    return survey


def _lock(path: str) -> int | None:
    """An open descriptor of the pack at ``path``, locked; ``None`` if it is gone or a writer holds it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None  # a writer is appending to it
    return fd


def _judge(
    survey: Survey,
    fd: int,
    path: str,
    pack_id: int | None,
    live: dict[int, tuple[int, int]],
    cutoff_ns: int,
    dry_run: bool,
) -> None:
    """Remove, keep (closing ``fd``), rewrite or hold as small the locked pack ``fd``."""
    st = os.fstat(fd)
    if pack_id is None:  # a writer died before its first row: nothing refers to it
        if st.st_mtime_ns < cutoff_ns:
            if not dry_run:
                os.unlink(path)
            survey.freed.append(StoredObject(EMPTY_DIGEST, st.st_size, st.st_mtime_ns))
        os.close(fd)
        return
    count, used = live.get(pack_id, (0, 0))
    if count and used * 2 >= st.st_size:  # mostly live (an empty blob's row keeps an empty pack)
        if st.st_size < MERGE_BELOW:
            survey.small.append((pack_id, fd, path))
            survey.small_dead.append(StoredObject(EMPTY_DIGEST, st.st_size - used, st.st_mtime_ns))
        else:
            os.close(fd)
        return
    survey.rewrite.append((pack_id, fd, path))
    survey.freed.append(StoredObject(EMPTY_DIGEST, st.st_size - used, st.st_mtime_ns))


def copy_live_blobs(
    db: sqlite3.Connection,
    packs: Sequence[LockedPack],
    open_pack: Callable[[sqlite3.Connection], OpenPack],
    where: str,
) -> None:
    """Copy the live blobs of ``packs`` into one new pack (from ``open_pack``), move their rows, drop the packs.

    One write transaction; the copies are on disk before it commits.  The
    caller holds the service's write lock and removes the old files after.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        new: OpenPack | None = None
        moved = []
        try:
            for pack_id, fd, path in packs:
                rows = db.execute(
                    "SELECT digest, offset, length FROM blobs WHERE pack = ? ORDER BY offset", (pack_id,)
                ).fetchall()
                for digest, offset, length in rows:
                    data = os.pread(fd, length, offset)
                    if len(data) != length:
                        raise StorageError(f"{where}: pack {path} ends early; run fsck")
                    if new is None:
                        new = open_pack(db)
                    os.pwrite(new.fd, data, new.size)
                    moved.append((new.id, new.size, digest))
                    new.size += length
            if new is not None:
                os.fsync(new.fd)  # the copies are on disk before any row names them
        finally:
            if new is not None:
                os.close(new.fd)
        db.executemany("UPDATE blobs SET pack = ?, offset = ? WHERE digest = ?", moved)
        db.executemany("DELETE FROM packs WHERE id = ?", [(pack_id,) for pack_id, _, _ in packs])
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise

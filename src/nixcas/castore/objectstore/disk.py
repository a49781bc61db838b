"""The local-disk adapter of the snix layout: plain files under a directory.

Every object appears by an atomic ``rename`` of a finished temporary file
under ``tmp/`` (readers never see a partial object; an interrupted write
leaves only a temp file).  Empty blob indexes are hard links to one shared
empty file.  An object's age is its mtime, refreshed in place when a writer
relies on it (``utime``); a deletion moves the object aside first and looks at
its age again, so a refresh racing it wins, and an interrupted one is undone
by the next sweep.  Durability is batched: :meth:`DiskObjects.sync` is one
``syncfs`` barrier.

The synchronous primitives are the hot path of an import (tens of thousands
of calls in worker threads), so they use plain ``os.*`` calls on ``str``
paths.  :class:`DiskIO` offers the same files as the async :class:`~.io.ObjectIO`
(one worker-thread hop per call) to code written against that protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import itertools
import os
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import zstandard

from nixcas._aio import to_thread_uninterrupted
from nixcas.castore.objectstore.io import ObjectMeta
from nixcas.castore.objectstore.layout import (
    ZSTD_LEVEL,
)
from nixcas.errors import StorageError

__all__ = ["CREATE_NEW", "READ_ONLY", "DiskIO", "DiskObjects", "start_writeback"]

CREATE_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
"""Flags for creating a file that must not exist yet."""
READ_ONLY = os.O_RDONLY | os.O_CLOEXEC


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)  # the process's own symbols, libc's among them (no ldconfig run)


_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Start writing ``fd``'s dirty pages to disk now, without waiting (Linux ``sync_file_range``).

    The kernel otherwise keeps an import's bytes in memory until the final
    ``syncfs`` (or its 30 s expiry), so that barrier would write them all
    while everything else waits.  Started early, the disk writes while the
    import goes on hashing and chunking; the barrier that makes the data
    durable is unchanged and only waits for what is left.
    """
    call = getattr(_libc(), "sync_file_range", None)
    if call is not None:
        call(fd, ctypes.c_int64(0), ctypes.c_int64(0), _SYNC_FILE_RANGE_WRITE)  # a failure only loses the head start


def _syncfs(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if getattr(_libc(), "syncfs", None) is None or _libc().syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


class DiskObjects:
    """Objects as files under ``root`` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str], *, zstd_level: int = ZSTD_LEVEL) -> None:
        self.root = Path(root)
        self.zstd_level = zstd_level
        self._root = str(self.root)
        self._tmp = f"{self._root}/tmp"
        os.makedirs(self._tmp, exist_ok=True)
        self._made_dirs: set[str] = set()
        self._counter = itertools.count()
        self._temp_prefix = f"{os.getpid()}.{secrets.token_hex(6)}"
        self._links_dir = f"{self._root}/.links"
        self._link_path: str | None = None
        self._links_work = True
        self._link_lock = threading.Lock()
        self._local = threading.local()
        self._dirty = False

    # -- synchronous primitives (run in worker threads) --------------------------

    def _dir_for(self, path: str) -> None:
        """Create the shard directory of ``path`` once per process (before, not after, a failure)."""
        parent = os.path.dirname(path)
        if parent not in self._made_dirs:
            try:
                os.mkdir(parent)
            except FileExistsError:
                pass
            except FileNotFoundError:
                os.makedirs(parent, exist_ok=True)
            self._made_dirs.add(parent)

    def _new_temp(self) -> tuple[str, int]:
        """A new, exclusively created temp file (path, fd) under ``tmp/``."""
        while True:
            path = f"{self._tmp}/{self._temp_prefix}.{next(self._counter)}"
            try:
                return path, os.open(path, CREATE_NEW, 0o644)
            except FileExistsError:  # a forked sibling with the same prefix: take the next number
                continue

    def _publish(self, tmp_path: str, final: str) -> None:
        """Move a finished temp file into place; an existing final file has the same content."""
        self._dir_for(final)
        os.rename(tmp_path, final)

    def _write_index(self, path: str) -> None:
        """Publish an empty index at ``path`` (single chunk / empty blob); it is written last.

        All empty indexes are the same bytes, so, like ``nix-store --optimise``,
        they are hard links to one empty file under ``.links/`` (saving an inode
        per blob).  Indexes are never written in place, only created or
        replaced, so sharing is safe.  Past the link-count limit a new shared
        file is started; where hard links are unsupported, plain files are made.
        """
        self._dir_for(path)
        for _ in range(3):
            source = self._link_source()
            if source is None:
                break
            try:
                os.link(source, path)
                return
            except FileExistsError:
                return
            except OSError as e:
                self._link_failed(source, e)
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, CREATE_NEW, 0o644))

    def _link_source(self) -> str | None:
        """The shared empty file to link indexes to (``None``: hard links do not work here)."""
        with self._link_lock:
            if self._link_path is None and self._links_work:
                os.makedirs(self._links_dir, exist_ok=True)
                path = f"{self._links_dir}/empty-index.{self._temp_prefix}.{next(self._counter)}"
                os.close(os.open(path, CREATE_NEW, 0o644))
                self._link_path = path
            return self._link_path

    def _link_failed(self, source: str, error: OSError) -> None:
        with self._link_lock:
            if self._link_path != source:
                return  # another thread already moved on
            self._link_path = None  # EMLINK, or the shared file vanished: start a new one
            if error.errno in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES):
                self._links_work = False

    def _compressor(self) -> zstandard.ZstdCompressor:
        cctx: zstandard.ZstdCompressor | None = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = self._local.cctx = zstandard.ZstdCompressor(level=self.zstd_level)
        return cctx

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        dctx: zstandard.ZstdDecompressor | None = getattr(self._local, "dctx", None)
        if dctx is None:
            dctx = self._local.dctx = zstandard.ZstdDecompressor()
        return dctx

    def _put_object_sync(self, path: str, data: bytes) -> None:
        """Publish ``data`` at ``path`` (written to a temp file, then renamed into place)."""
        tmp_path, fd = self._new_temp()
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                start_writeback(fd)
            finally:
                os.close(fd)
            self._publish(tmp_path, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_path)
            raise
        self._dirty = True

    @staticmethod
    def _refresh_sync(path: str) -> bool:
        """Set ``path``'s mtime to now (a writer found it stored); ``False`` if it is gone."""
        try:
            os.utime(path)
        except FileNotFoundError:
            return False
        return True

    def _mtime_sync(self, path: str) -> int:
        try:
            return os.stat(path).st_mtime_ns
        except FileNotFoundError:
            return -1

    def _shards(self, kind: str) -> list[str]:
        try:
            return sorted(e.path for e in os.scandir(f"{self._root}/{kind}/b3") if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []

    def _trash_path(self, path: str) -> str:
        """Where a deletion moves ``path`` first; the name keeps its key, so an interrupted one can be undone."""
        kind, name = path[len(self._root) + 1 :].split("/", 1)[0], os.path.basename(path)
        return f"{self._tmp}/gc.{self._temp_prefix}.{next(self._counter)}.{kind}.{name}"

    def _delete_sync(self, path: str, age: Callable[[str], int], cutoff_ns: int) -> bool | None:
        """Move ``path`` aside, look at its age again, then drop it (``True``) or put it back (``False``).

        ``None``: it was already gone.  Putting back never replaces a file written meanwhile.
        """
        trash = self._trash_path(path)
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return None
        try:
            if age(trash) >= cutoff_ns:
                with contextlib.suppress(FileExistsError):
                    os.link(trash, path)
                return False
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(trash)

    async def sync(self) -> None:
        if self._dirty:
            self._dirty = False
            await asyncio.to_thread(_syncfs, self.root)


class DiskIO:
    """:class:`~.io.ObjectIO` over a :class:`DiskObjects` (one worker-thread hop per call)."""

    def __init__(self, disk: DiskObjects) -> None:
        self.disk = disk

    def __repr__(self) -> str:
        return f"DiskIO({self.disk!r})"

    def _get_sync(self, key: str, cap: int | None) -> bytes | None:
        try:
            fd = os.open(f"{self.disk._root}/{key}", READ_ONLY)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            if cap is not None and size > cap:
                raise StorageError(f"{self.disk}: {key} holds {size} bytes, more than the {cap} it may")
            parts = []
            while part := os.read(fd, max(size, 1 << 16)):
                parts.append(part)
        finally:
            os.close(fd)
        return b"".join(parts)

    async def get(self, key: str, cap: int | None = None) -> bytes | None:
        return await asyncio.to_thread(self._get_sync, key, cap)

    def _head_sync(self, key: str) -> ObjectMeta | None:
        try:
            st = os.stat(f"{self.disk._root}/{key}")
        except FileNotFoundError:
            return None
        return ObjectMeta(key, st.st_size, st.st_mtime_ns)

    async def head(self, key: str) -> ObjectMeta | None:
        return await asyncio.to_thread(self._head_sync, key)

    async def put(self, key: str, data: bytes) -> None:
        await to_thread_uninterrupted(lambda: self.disk._put_object_sync(f"{self.disk._root}/{key}", data))

    async def delete(self, key: str) -> None:
        def unlink() -> None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.disk._root}/{key}")

        await asyncio.to_thread(unlink)

    def _list_dir_sync(self, directory: str) -> list[ObjectMeta]:
        found: list[ObjectMeta] = []
        try:
            entries = list(os.scandir(f"{self.disk._root}/{directory}"))
        except (FileNotFoundError, NotADirectoryError):
            return found
        for entry in sorted(entries, key=lambda e: e.name):
            try:
                if entry.is_dir(follow_symlinks=False):
                    found.extend(self._list_dir_sync(f"{directory}/{entry.name}"))
                    continue
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            found.append(ObjectMeta(f"{directory}/{entry.name}", st.st_size, st.st_mtime_ns))
        return found

    async def list(self, prefix: str, page: int = 1000, after: str | None = None) -> AsyncIterator[list[ObjectMeta]]:
        """Every object under the directory ``prefix``, in key order, a page at a time."""
        found = await asyncio.to_thread(self._list_dir_sync, prefix.rstrip("/"))
        if after is not None:
            found = [m for m in found if m.key > after]
        for i in range(0, len(found), page):
            yield found[i : i + page]

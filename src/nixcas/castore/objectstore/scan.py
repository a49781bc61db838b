"""Enumerating and deleting stored objects for garbage collection (:mod:`nixcas.castore.sweep`).

:class:`DiskSweep` — the local-disk store: shard directories scanned in
worker threads, deletions that move an object aside and look at its age
again (undone by :meth:`DiskSweep.sweep_temporary` if interrupted).
:func:`scan_listing` — any :class:`~.io.ObjectIO`: listings of a kind's keys,
blob indexes read for the chunks they keep alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Sequence

from nixcas.castore.digest import DIGEST_LEN, EMPTY_DIGEST, B3Digest
from nixcas.castore.objectstore.disk import DiskObjects
from nixcas.castore.objectstore.io import ObjectIO, ObjectMeta
from nixcas.castore.objectstore.layout import (
    bao_key,
    blob_index_key,
    chunk_key,
    decode_index,
    key_digest,
)
from nixcas.castore.sweep import Deletion, StoredObject

__all__ = ["DiskSweep", "scan_listing"]

MAX_INDEX_BYTES = 64 << 20
"""The largest blob index read (about 1.6 million chunks: blobs of 200 GiB and more)."""


async def scan_listing(store: ObjectIO, kind: str) -> AsyncIterator[list[StoredObject]]:
    """Every object of ``kind`` (``blobs``, ``chunks``, ``bao``, ``dirs``) a listing of ``store`` finds, in batches.

    Keys that do not name a digest in their place are skipped; a blob's
    non-empty index is read for the chunks it lists.
    """
    async for page in store.list(f"{kind}/b3/"):
        objects = []
        for meta in page:
            digest = key_digest(meta.key)
            if digest is not None:
                objects.append((digest, meta))
        if not objects:
            continue
        if kind != "blobs":
            yield [StoredObject(d, m.size, m.mtime_ns) for d, m in objects]
            continue

        async def stored(digest: B3Digest, meta: ObjectMeta) -> StoredObject | None:
            chunks: tuple[B3Digest, ...] = ()
            if meta.size:
                raw = await store.get(meta.key, cap=MAX_INDEX_BYTES)
                if raw is None:
                    return None
                chunks = tuple(c.digest for c in decode_index(digest, raw))
            return StoredObject(digest, meta.size, meta.mtime_ns, chunks)

        found = await asyncio.gather(*(stored(d, m) for d, m in objects))
        yield [o for o in found if o is not None]


class DiskSweep(DiskObjects):
    """The :class:`~nixcas.castore.sweep.SweepableBlobs` half of the local-disk blob store."""

    def _index_path(self, digest: B3Digest) -> str:
        return f"{self._root}/{blob_index_key(digest)}"

    def _chunk_path(self, digest: B3Digest) -> str:
        return f"{self._root}/{chunk_key(digest)}"

    def _scan_sync(self, shards: Sequence[str], blobs: bool) -> list[StoredObject]:
        found: list[StoredObject] = []
        for shard in shards:
            try:
                entries = list(os.scandir(shard))
            except FileNotFoundError:
                continue
            for entry in entries:
                try:
                    raw = bytes.fromhex(entry.name)
                except ValueError:
                    continue
                if len(raw) != DIGEST_LEN:
                    continue
                digest = B3Digest(raw)
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not blobs:
                    found.append(StoredObject(digest, st.st_size, st.st_mtime_ns))
                    continue
                chunks: tuple[B3Digest, ...] = ()
                mtime = self._mtime_sync(self._chunk_path(digest))
                if st.st_size:
                    try:
                        with open(entry.path, "rb") as f:
                            chunks = tuple(c.digest for c in decode_index(digest, f.read()))
                    except FileNotFoundError:
                        continue
                    mtime = max(mtime, st.st_mtime_ns)
                found.append(StoredObject(digest, st.st_size, mtime, chunks))
        return found

    async def _scan(self, kind: str) -> AsyncIterator[list[StoredObject]]:
        shards = await asyncio.to_thread(self._shards, kind)
        for i in range(0, len(shards), 256):
            batch = await asyncio.to_thread(self._scan_sync, shards[i : i + 256], kind == "blobs")
            if batch:
                yield batch

    def scan_blobs(self) -> AsyncIterator[list[StoredObject]]:
        return self._scan("blobs")

    def scan_chunks(self) -> AsyncIterator[list[StoredObject]]:
        return self._scan("chunks")

    def scan_outboards(self) -> AsyncIterator[list[StoredObject]]:
        return self._scan("bao")

    def _delete_objects_sync(self, objects: Sequence[StoredObject], cutoff_ns: int, kind: str) -> Deletion:
        done = Deletion()
        for obj in objects:
            if kind == "blobs":
                if obj.digest == EMPTY_DIGEST:
                    done.kept.append(obj)
                    continue
                chunk = self._chunk_path(obj.digest)

                def age(moved: str, chunk: str = chunk) -> int:
                    own = os.stat(moved)
                    return max(self._mtime_sync(chunk), own.st_mtime_ns if own.st_size else -1)

                result = self._delete_sync(self._index_path(obj.digest), age, cutoff_ns)
            else:
                path = self._chunk_path(obj.digest) if kind == "chunks" else f"{self._root}/{bao_key(obj.digest)}"
                result = self._delete_sync(path, self._mtime_sync, cutoff_ns)
            if result is True:
                done.deleted.append(obj)
            elif result is False:
                done.kept.append(obj)
        return done

    async def delete_blobs(self, objects: Sequence[StoredObject], cutoff_ns: int) -> Deletion:
        return await asyncio.to_thread(self._delete_objects_sync, objects, cutoff_ns, "blobs")

    def _sweep_temporary_sync(self, cutoff_ns: int, dry_run: bool) -> list[StoredObject]:
        """Undo interrupted deletions (``gc.…`` names: moved back); remove other temp files older than the cutoff."""
        swept: list[StoredObject] = []
        for entry in list(os.scandir(self._tmp)):
            parts = entry.name.split(".")
            if entry.name.startswith("gc.") and len(parts) == 6 and parts[4] in ("blobs", "chunks"):
                try:
                    digest = B3Digest(bytes.fromhex(parts[5]))
                except ValueError:
                    digest = None
                if digest is not None and len(digest) == DIGEST_LEN:
                    if not dry_run:  # put it back: the next collection decides again
                        final = f"{self._root}/{blob_index_key(digest) if parts[4] == 'blobs' else chunk_key(digest)}"
                        self._dir_for(final)
                        with contextlib.suppress(FileExistsError, FileNotFoundError):
                            os.link(entry.path, final)
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.path)
                    continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if st.st_mtime_ns < cutoff_ns:  # left by a writer that died (live writers keep it fresh)
                if not dry_run:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                swept.append(StoredObject(EMPTY_DIGEST, st.st_size, st.st_mtime_ns))
        return swept

    async def sweep_temporary(self, cutoff_ns: int, dry_run: bool) -> list[StoredObject]:
        return await asyncio.to_thread(self._sweep_temporary_sync, cutoff_ns, dry_run)

    async def delete_chunks(self, objects: Sequence[StoredObject], cutoff_ns: int) -> Deletion:
        return await asyncio.to_thread(self._delete_objects_sync, objects, cutoff_ns, "chunks")

    async def delete_outboards(self, objects: Sequence[StoredObject], cutoff_ns: int) -> Deletion:
        return await asyncio.to_thread(self._delete_objects_sync, objects, cutoff_ns, "bao")

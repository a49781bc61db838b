"""One NAR source: the NAR of a castore root node, for every reader of NARs in the Nix layer.

:class:`NarSource` answers what the nar-bridge, ``CalculateNAR``, the
nix-daemon's ``NarFromPath`` and ``nixcas dump-path`` ask of a NAR:

* :meth:`~NarSource.size`, from the directory closure alone (no blob is read);
* :meth:`~NarSource.check` (every blob stored with the size its file nodes
  declare, before a server promises the bytes) and :meth:`~NarSource.present`;
* :meth:`~NarSource.stream`, the bytes in order, and :meth:`~NarSource.range`,
  a byte range of them;
* :meth:`~NarSource.size_sha256` and :meth:`~NarSource.dump` (to a file
  descriptor, through :func:`~nixcas.store.nar.dump.dump_nar`).

The closure is fetched once per source, as stored bytes, and laid out as a
:class:`~nixcas.store.nar.rawplan.Plan` (framing and file holes) that every
answer shares.  On a blob service with
:class:`~nixcas.castore.blob.base.BulkReads` (the embedded store) the stream
reads on a worker thread (:mod:`nixcas.store.nar.bulk`), hashing each byte
once before it is yielded; elsewhere it is :func:`~nixcas.store.nar.render.render_nar`.
The bytes are the same either way, and so are the errors: a missing blob or
directory is :class:`~nixcas.store.nar.plan.NarContentNotFound`, a blob of
another size :class:`~nixcas.store.nar.plan.BlobSizeMismatch`, each naming the
digest and the file's path in the NAR.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncGenerator, Iterator

from nixcas.castore.blob.base import BlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.nodes import Node
from nixcas.errors import NotFoundError
from nixcas.store.nar.dump import dump_nar, fetch_raw_closure
from nixcas.store.nar.plan import BlobSizeMismatch, Hole
from nixcas.store.nar.rawplan import Plan, plan_nar
from nixcas.store.nar.render import BUFFER_BYTES, PREFETCH, render_nar
from nixcas.store.nar.seekable import SeekableNar

__all__ = ["RANGE_CHUNK", "NarSource"]

RANGE_CHUNK = 1 << 20
"""A byte range is yielded in pieces of at most this size."""
_HAS_BATCH = 256


class NarSource:
    """The NAR of ``node`` (an anonymous root) over ``blobs`` and ``directories``.

    Nothing is read until a method needs it; the closure is then fetched once
    and kept for the source's other answers.  A source is cheap: make one per
    request.
    """

    def __init__(
        self,
        node: Node,
        blobs: BlobService,
        directories: DirectoryService,
        *,
        prefetch: int = PREFETCH,
        buffer_bytes: int = BUFFER_BYTES,
    ) -> None:
        """``prefetch`` and ``buffer_bytes`` bound the stream's window on blob services without bulk reads
        (see :func:`~nixcas.store.nar.render.render_nar`)."""
        self.node = node
        self.blobs = blobs
        self.directories = directories
        self._prefetch = prefetch
        self._buffer_bytes = buffer_bytes
        self._plan: Plan | None = None

    async def plan(self) -> Plan:
        """The NAR's framing and holes (fetching and checking the directory closure the first time)."""
        if self._plan is None:
            self._plan = plan_nar(self.node, await fetch_raw_closure(self.node, self.directories))
        return self._plan

    async def size(self) -> int:
        """The NAR's size in bytes (no blob is read)."""
        return (await self.plan()).nar_size

    async def blob_digests(self) -> list[B3Digest]:
        """The blobs the NAR reads (each once): the contents of its files, empty files excepted."""
        return [B3Digest(d) for d in dict.fromkeys((await self.plan()).digests)]

    def _declared(self, plan: Plan) -> dict[bytes, set[int]]:
        declared: dict[bytes, set[int]] = {}
        for digest, size in zip(plan.digests, plan.sizes, strict=True):
            declared.setdefault(digest, set()).add(size)
        return declared

    async def check(self) -> None:
        """Every blob of the NAR is stored, with the size its file nodes declare.

        For a server before it sends a header (a 200 with a Content-Length
        promises bytes the stream cannot deliver otherwise): a missing blob is
        a :class:`~nixcas.errors.NotFoundError`, a blob whose size contradicts
        a file node a :class:`~nixcas.store.nar.plan.BlobSizeMismatch`.
        """
        declared = self._declared(await self.plan())
        digests = [B3Digest(d) for d in declared]
        for digest, size in zip(digests, await self.blobs.sizes(digests), strict=True):
            if size is None:
                raise NotFoundError("the content of this NAR is not (completely) in the store")
            wrong = sorted(declared[bytes(digest)] - {size})
            if wrong:
                raise BlobSizeMismatch(
                    f"blob {digest.hex()} has {size} bytes, but a file node of this NAR declares {wrong[0]}"
                )

    async def present(self) -> bool:
        """Whether every directory and blob of the NAR is in the store (sizes are not checked)."""
        try:
            pending = await self.blob_digests()
        except NotFoundError:
            return False
        for i in range(0, len(pending), _HAS_BATCH):
            if not all(await asyncio.gather(*(self.blobs.has(d) for d in pending[i : i + _HAS_BATCH]))):
                return False
        return True

    def _items(self, plan: Plan) -> Iterator[bytes | Hole]:
        """The plan as framing and holes in stream order (no empty framing)."""
        for i, frame in enumerate(plan.frames[:-1]):
            if frame:
                yield frame
            yield plan.hole(i)
        if plan.frames[-1]:
            yield plan.frames[-1]

    async def stream(self) -> AsyncGenerator[bytes | memoryview, None]:
        """The NAR's bytes in order, each verified before it is yielded (pieces of varying size).

        Close the iterator (``aclose``) to stop early; reads ahead are then
        abandoned.
        """
        plan = await self.plan()
        reads = self.blobs.bulk_reads()
        chunks: AsyncGenerator[bytes | memoryview, None]
        if reads is None:
            chunks = render_nar(
                self.node,
                self.blobs,
                self.directories,
                plan=self._items(plan),
                prefetch=self._prefetch,
                buffer_bytes=self._buffer_bytes,
            )
        else:
            from nixcas.store.nar.bulk import bulk_stream

            chunks = bulk_stream(plan, reads, self.blobs)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()

    async def range(self, start: int, length: int) -> AsyncGenerator[bytes, None]:
        """``length`` bytes of the NAR from ``start`` (fewer at its end), in pieces of at most :data:`RANGE_CHUNK`."""
        plan = await self.plan()
        async with SeekableNar(self.blobs, list(self._items(plan))) as nar:
            await nar.seek(start)
            while length > 0:
                data = await nar.read(min(RANGE_CHUNK, length))
                if not data:
                    return
                length -= len(data)
                yield data

    async def size_sha256(self) -> tuple[int, bytes]:
        """The NAR's size and raw SHA-256 digest (32 bytes), streaming it once."""
        h = hashlib.sha256()
        size = 0
        chunks = self.stream()
        try:
            async for chunk in chunks:
                h.update(chunk)
                size += len(chunk)
        finally:
            await chunks.aclose()
        return size, h.digest()

    async def dump(self, fd: int, *, skip: int = 0) -> int:
        """Write the NAR to the file descriptor ``fd`` (blocking writes, for a command), less its first ``skip`` bytes
        (already written by the command line's fast path); return its size."""
        return await dump_nar(fd, self.node, self.blobs, self.directories, skip=skip)

"""Reads on worker threads, for blob services with :class:`~nixcas.castore.blob.base.BulkReads`."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from nixcas.castore.blob.base import BulkReads
from nixcas.castore.digest import B3Digest
from nixcas.castore.export.writer import write_all
from nixcas.castore.nodes import FileNode


def bulk_batch(
    reads: BulkReads, sizes: dict[B3Digest, int]
) -> tuple[dict[B3Digest, bytes | memoryview], list[B3Digest]]:
    """A batch of small blobs through ``reads``: the ones up to ``run_max`` as one read run, the others whole.

    Everything returned has been hashed against its digest (see
    :class:`~nixcas.castore.blob.base.BulkReads`).  The digests it could not
    serve are returned for :meth:`~nixcas.castore.blob.base.BlobService.read_many`,
    which leaves out a missing blob or one of another size, so the writer names it.
    """
    found: dict[B3Digest, bytes | memoryview] = {}
    rest: list[B3Digest] = []
    run = [d for d, size in sizes.items() if size <= reads.run_max]
    if run:
        got = reads.read_run([(bytes(d), sizes[d]) for d in run], memoryview(bytearray()))
        if got is None:
            rest += run
        else:
            found.update(zip(run, got, strict=True))
    for digest, size in sizes.items():
        if size > reads.run_max:
            data = reads.read_whole(bytes(digest), size, memoryview(bytearray()))
            if data is None:
                rest.append(digest)
            else:
                found[digest] = data
    return found, rest


def bulk_copier(reads: BulkReads, whole_max: int) -> Callable[[int, FileNode, threading.Event], bool]:
    """Copy a large blob into a file descriptor in a worker thread, verified (see :class:`BulkReads`).

    Up to ``whole_max`` bytes it is read whole (and hashed once); a larger one
    is streamed chunk by chunk (:meth:`~nixcas.castore.blob.base.BulkReads.read_chunks`:
    each chunk checked, the whole blob's BLAKE3 at its end, a mismatch raises
    and the export is then removed).  ``False``, with nothing written, for
    what ``reads`` does not serve: the blob service's verifying reader takes
    those and names any problem.  Stops between chunks once ``stop`` is set.
    """

    def copy(fd: int, node: FileNode, stop: threading.Event) -> bool:
        raw = bytes(node.digest)
        if node.size <= whole_max:
            data = reads.read_whole(raw, node.size, memoryview(bytearray()))
            if data is not None:
                write_all(fd, data)
                return True
        chunks = reads.read_chunks(raw, node.size)
        if chunks is None:
            return False
        for data in chunks:
            if stop.is_set():
                raise asyncio.CancelledError
            write_all(fd, data)
        return True

    return copy

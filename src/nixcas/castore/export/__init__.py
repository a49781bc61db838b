"""Materializing a castore node on the local filesystem: the inverse of ingest.

:func:`export_node` writes a directory tree, a file or a symlink to a new
path ``dest``, as ``nix-store --restore`` writes a NAR:

* **what is written** -- directories, regular files (mode ``0666``, or
  ``0777`` when executable, less the umask), symlinks created as symlinks
  (their targets are never followed); timestamps are left as the kernel sets
  them (the time of writing), as ``nix-store --restore`` leaves them;
* **where** -- ``dest`` must not exist; a directory root may also replace an
  existing *empty* directory.  Everything is written below a staging
  directory created (mode ``0700``, so no other user can reach inside) next
  to ``dest``, ``.nixcas-export-<random>-<name>``, and published in one step
  at the end: renamed to ``dest`` (a directory root), or hard-linked there (a
  file or symlink root: ``link`` fails if ``dest`` appeared meanwhile, where
  a rename would replace it).  Every entry is created relative to an open
  descriptor of its parent directory (``mkdir``/``open``/``symlink``/``link``
  with ``dir_fd``, directories opened with ``O_NOFOLLOW``, files with
  ``O_CREAT | O_EXCL``), and each name is checked again before use, so
  neither a name nor a symlink inside the tree can direct a write elsewhere;
* **verification** -- small files are read with
  :meth:`~nixcas.castore.blob.base.BlobService.read_many`, which hashes each
  blob before returning it; larger ones stream through the blob service's
  verifying reader (chunked backends check each chunk before handing it out,
  and the whole blob's BLAKE3 is checked at its end).  The staging directory
  is published only after every file has passed, so no unverified byte ever
  appears at ``dest``;
* **failure** -- on any error (or cancellation) the staging directory is
  removed and the error raised; nothing is left at ``dest``.  A process
  killed outright leaves its staging directory (the name says what it is);
* **links** -- with ``link=True``, the first file of each blob (and
  executable bit) is written and every further one is a hard link to it
  (a copy of it once the file system's link limit is reached);
* **reads in parallel, memory bounded** -- like the NAR renderer, a window
  of at most ``prefetch`` fetches (batches of small files read with one
  ``read_many``, or the head of a large file) runs ahead of the writers, and
  about ``buffer_bytes`` are held at most; large files stream in blocks or
  chunks.  From a blob service with
  :class:`~nixcas.castore.blob.base.BulkReads` (``packed://``,
  ``objectstore+file://``) a batch is read on a worker thread (its smallest
  blobs as one read run, the others whole), and a large file is copied in a
  worker thread (:data:`STREAMS` at once), whole up to an eighth of
  ``buffer_bytes``, chunk by chunk above; all verified.  Files are created by
  :data:`WRITERS` threads that take the batches in turn, each waiting for
  its reads itself, so reading (hashing) and writing overlap without a round
  trip through the event loop between two batches.
"""

from __future__ import annotations

import os

from nixcas._aio import to_thread_uninterrupted
from nixcas.castore.blob.base import BlobService
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.export.base import (
    BATCH_BYTES,
    BATCH_FILES,
    BLOCK,
    BUFFER_BYTES,
    DIR_FLAGS,
    PREFETCH,
    SMALL_FILE,
    WRITERS,
    ExportError,
    ExportStats,
)
from nixcas.castore.export.plan import Plan, fetch_closure
from nixcas.castore.export.staging import check_dest, make_staging, publish, remove_staging
from nixcas.castore.export.window import Materializer
from nixcas.castore.export.writer import Writer
from nixcas.castore.nodes import DirectoryNode, Node

__all__ = [
    "BATCH_BYTES",
    "BATCH_FILES",
    "BLOCK",
    "BUFFER_BYTES",
    "PREFETCH",
    "SMALL_FILE",
    "ExportError",
    "ExportStats",
    "export_node",
    "fetch_closure",
]


async def export_node(
    node: Node,
    dest: str | os.PathLike[str],
    blobs: BlobService,
    directories: DirectoryService,
    *,
    link: bool = False,
    prefetch: int = PREFETCH,
    buffer_bytes: int = BUFFER_BYTES,
) -> ExportStats:
    """Write ``node`` (a directory tree, a file or a symlink) to the new path ``dest``; see the module docs.

    Raises :class:`ExportError` when ``dest`` exists (other than an empty
    directory for a directory root), :class:`~nixcas.errors.NotFoundError`
    for a missing blob or directory, :class:`~nixcas.errors.ChecksumMismatch`
    or :class:`~nixcas.errors.StorageError` for damaged content; in every
    case nothing is left behind.
    """
    path = os.path.abspath(os.fspath(dest))
    parent, base = os.path.split(path)
    if not base:
        raise ExportError(f"{dest}: cannot export to the root directory")
    check_dest(path, node)
    plan = Plan(node, await fetch_closure(node, directories), link)
    parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        staging = make_staging(parent_fd, base)
        try:
            staging_fd = os.open(staging, DIR_FLAGS, dir_fd=parent_fd)
            try:
                # Links need their first file to exist: one writer then, which creates everything in order.
                writers = [Writer(plan, staging_fd) for _ in range(1 if link else WRITERS)]
                try:
                    await Materializer(plan, writers, blobs, prefetch, buffer_bytes).run()
                finally:
                    for writer in writers:
                        writer.close()
                publish(parent_fd, staging, staging_fd, base, path, isinstance(node, DirectoryNode))
            finally:
                os.close(staging_fd)
        except BaseException as e:
            problem = await to_thread_uninterrupted(lambda: remove_staging(parent_fd, staging, parent))
            if problem is not None and isinstance(e, Exception):
                raise ExportError(f"{e}; {problem}") from e
            raise
    finally:
        os.close(parent_fd)
    return plan.stats

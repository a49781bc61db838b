"""What an export shares: its limits, the entry kinds of a plan, its errors and statistics."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeAlias

from nixcas.errors import NixcasError

PREFETCH = 16
"""Default number of fetches (batches of small files, or large files) in flight."""
BUFFER_BYTES = 64 << 20
"""Default byte budget of the fetches held ahead of the writer."""
BLOCK = 1 << 20
"""Large files are read and written in blocks of this size."""
SMALL_FILE = 1 << 20
"""Files up to this size are read whole, in batches (one ``read_many`` each)."""
BATCH_FILES = 128
"""Most files read in one batch."""
BATCH_BYTES = 8 << 20
"""Most content bytes in one batch."""
BATCH_OPS = 2048
"""Most entries of any kind (directories, symlinks, links, files) written in one worker-thread call."""
WRITERS = 2
"""Threads creating files (of consecutive batches) at once."""
STREAMS = 2
"""Large files written at once (each streams in its own worker thread with BulkReads)."""
BATCHES = 6
"""Batches in the window at once: the ones being written and the ones read ahead of them.

Under load every hand-off between the threads (read, event loop, writer) waits for a CPU;
batches read well ahead keep the writers from waiting on that latency.
"""
DIR_FDS = 64
"""Directory descriptors kept open (least recently used closed first)."""

ROOT = "root"
"""The root's name inside the staging directory."""

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

Closure: TypeAlias = dict[bytes, Any]
"""Directory messages (``castore.proto.pb.Directory``) by digest, as :func:`fetch_closure` returns them."""

MKDIR, SYMLINK, FILE, LINK = range(4)
Op: TypeAlias = tuple[int, int, bytes, object]
"""One entry to create: ``(kind, parent directory id, name, argument)``.

The argument is the new directory's id (``MKDIR``), the target (``SYMLINK``)
or the :class:`FileNode` (``FILE``: write it; ``LINK``: link to the first
file of the same blob and executable bit).
"""


class ExportError(NixcasError):
    """The destination cannot be written (it exists, say), or a partial export could not be removed."""


@dataclass
class ExportStats:
    """What an export wrote."""

    directories: int = 0
    files: int = 0
    symlinks: int = 0
    links: int = 0
    """Files written as hard links to an earlier file of the same blob (``link=True``)."""
    bytes: int = 0
    """Content bytes of the files written (links not counted)."""


class BadBlob(Exception):
    """A batch's blob is missing or has another size than its file declares (the caller explains which)."""

    def __init__(self, op: Op) -> None:
        super().__init__()
        self.op = op

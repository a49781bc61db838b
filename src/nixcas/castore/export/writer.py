"""File-system calls of an export, in a worker thread, one call at a time, relative to open directories."""

from __future__ import annotations

import errno
import os
from collections import OrderedDict

from nixcas.castore.digest import B3Digest
from nixcas.castore.export.base import DIR_FDS, DIR_FLAGS, FILE, MKDIR, NEW_FILE, SYMLINK, BadBlob, Op
from nixcas.castore.export.plan import Plan
from nixcas.castore.nodes import FileNode
from nixcas.errors import StorageError


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Writer:
    """Creates entries below the staging directory; every call resolves a parent by descriptor.

    Descriptors of recently used directories are cached (at most
    :data:`DIR_FDS`); one not cached is opened from its nearest cached
    ancestor, a component at a time with ``O_NOFOLLOW``.
    """

    def __init__(self, plan: Plan, staging_fd: int) -> None:
        self.plan = plan
        self.staging_fd = staging_fd
        self.fds: OrderedDict[int, int] = OrderedDict()
        self.firsts: dict[tuple[B3Digest, bool], tuple[int, bytes]] = {}

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.popitem()[1])

    def _keep(self, d: int, fd: int, pinned: int) -> None:
        self.fds[d] = fd
        while len(self.fds) > DIR_FDS:
            old, old_fd = next(iter(self.fds.items()))
            if old == pinned:
                self.fds.move_to_end(old)
                continue
            del self.fds[old]
            os.close(old_fd)

    def dir_fd(self, d: int, pinned: int = -1) -> int:
        if d == 0:
            return self.staging_fd
        fd = self.fds.get(d)
        if fd is not None:
            self.fds.move_to_end(d)
            return fd
        chain: list[int] = []
        while d != 0 and d not in self.fds:
            chain.append(d)
            d = self.plan.parents[d]
        fd = self.dir_fd(d)
        for child in reversed(chain):
            fd = os.open(self.plan.names[child], DIR_FLAGS, dir_fd=fd)
            self._keep(child, fd, pinned)
        return fd

    def mkdir(self, parent: int, name: bytes, new: int) -> None:
        pfd = self.dir_fd(parent)
        os.mkdir(name, 0o777, dir_fd=pfd)
        self._keep(new, os.open(name, DIR_FLAGS, dir_fd=pfd), parent)

    def create(self, parent: int, name: bytes, node: FileNode) -> int:
        """A new, empty file (``O_EXCL``: never an existing file, never through a symlink)."""
        fd = os.open(name, NEW_FILE, 0o777 if node.executable else 0o666, dir_fd=self.dir_fd(parent))
        if self.plan.link:
            self.firsts[(node.digest, node.executable)] = (parent, name)
        return fd

    def link(self, parent: int, name: bytes, node: FileNode) -> None:
        """A hard link to the first file of the blob; a copy of it once that file has too many links."""
        src_parent, src_name = self.firsts[(node.digest, node.executable)]
        src_fd = self.dir_fd(src_parent)
        dst_fd = self.dir_fd(parent, pinned=src_parent)
        try:
            os.link(src_name, name, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
            return
        except OSError as e:
            if e.errno != errno.EMLINK:
                raise
        source = os.open(src_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_fd)
        try:
            target = self.create(parent, name, node)  # further links go to this copy
            try:
                left = node.size
                while left > 0:
                    copied = os.copy_file_range(source, target, left)
                    if copied == 0:
                        raise StorageError(f"{self.plan.show(parent, name)}: its first copy shrank while linking")
                    left -= copied
            finally:
                os.close(target)
        finally:
            os.close(source)

    def run(self, ops: list[Op], found: dict[B3Digest, bytes | memoryview]) -> None:
        """Create ``ops`` in order; a file's bytes come from ``found`` (checked against its size)."""
        for op in ops:
            kind, parent, name, arg = op
            if kind == FILE:
                assert isinstance(arg, FileNode)
                if arg.size:
                    data = found.get(arg.digest)
                    if data is None or len(data) != arg.size:
                        raise BadBlob(op)
                fd = self.create(parent, name, arg)
                try:
                    if arg.size:
                        write_all(fd, found[arg.digest])
                finally:
                    os.close(fd)
            elif kind == MKDIR:
                assert isinstance(arg, int)
                self.mkdir(parent, name, arg)
            elif kind == SYMLINK:
                assert isinstance(arg, bytes)
                os.symlink(arg, name, dir_fd=self.dir_fd(parent))
            else:
                assert isinstance(arg, FileNode)
                self.link(parent, name, arg)

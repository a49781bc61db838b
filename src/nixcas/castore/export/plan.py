"""The plan of an export: every entry of the tree in depth-first pre-order, and the closure it comes from."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from nixcas.castore.digest import DIGEST_LEN, EMPTY_DIGEST, B3Digest
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.export.base import FILE, LINK, MKDIR, ROOT, SYMLINK, Closure, ExportStats, Op
from nixcas.castore.nodes import (
    MAX_DEPTH,
    DirectoryNode,
    FileNode,
    Node,
    SymlinkNode,
    validate_name,
    validate_symlink_target,
)
from nixcas.castore.treepath import show_names
from nixcas.errors import DepthError, DirectoryError, NotFoundError, StorageError

# -- the plan: every entry in depth-first pre-order ---------------------------------------


class Plan:
    """The entries of a tree in creation order, with the directory table the writer resolves parents in.

    Directory 0 is the staging directory; the root is its entry :data:`ROOT`.
    """

    def __init__(self, root: Node, closure: Closure, link: bool) -> None:
        self.root = root
        self.closure = closure
        self.link = link
        self.parents: list[int] = [-1]
        self.names: list[bytes] = [b""]
        self.stats = ExportStats()

    def show(self, parent: int, name: bytes) -> str:
        """The path of entry ``name`` of directory ``parent`` inside the export (``/`` for the root)."""
        names = [name]
        while parent > 0:
            names.append(self.names[parent])
            parent = self.parents[parent]
        names.reverse()
        return show_names(names[1:], "/")

    def _file(self, parent: int, name: bytes, node: FileNode, seen: set[tuple[B3Digest, bool]]) -> Op:
        if (node.size == 0) != (node.digest == EMPTY_DIGEST):
            raise StorageError(
                f"file {self.show(parent, name)}: size {node.size} contradicts digest {node.digest.hex()}"
            )
        if self.link:
            key = (node.digest, node.executable)
            if key in seen:
                self.stats.links += 1
                return (LINK, parent, name, node)
            seen.add(key)
        self.stats.files += 1
        self.stats.bytes += node.size
        return (FILE, parent, name, node)

    def _mkdir(self, parent: int, name: bytes) -> Op:
        new = len(self.parents)
        self.parents.append(parent)
        self.names.append(name)
        self.stats.directories += 1
        return (MKDIR, parent, name, new)

    def ops(self) -> Iterator[Op]:
        seen: set[tuple[B3Digest, bool]] = set()
        root = ROOT.encode()
        node = self.root
        if isinstance(node, FileNode):
            yield self._file(0, root, node, seen)
            return
        if isinstance(node, SymlinkNode):
            self.stats.symlinks += 1
            yield (SYMLINK, 0, root, node.target)
            return
        first = self._mkdir(0, root)
        yield first
        stack: list[tuple[int, int, Iterator[tuple[int, Any]]]] = [
            (1, 0, _entries(self._directory(node.digest, 0, root)))
        ]
        while stack:
            parent, depth, entries = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                continue
            kind, msg = entry
            name: bytes = msg.name
            validate_name(name)  # checked when the Directory was stored; again, as it becomes a path
            if kind == FILE:
                if len(msg.digest) != DIGEST_LEN:
                    raise DirectoryError(f"file {self.show(parent, name)}: invalid digest length {len(msg.digest)}")
                yield self._file(parent, name, FileNode(B3Digest(msg.digest), msg.size, msg.executable), seen)
            elif kind == SYMLINK:
                self.stats.symlinks += 1
                yield (SYMLINK, parent, name, validate_symlink_target(msg.target))
            else:
                directory = self._directory(msg.digest, parent, name)
                if depth + 1 >= MAX_DEPTH and (directory.directories or directory.files or directory.symlinks):
                    raise DepthError(
                        f"directory {self.show(parent, name)} is nested {depth + 1} levels deep: its entries "
                        f"would exceed the {MAX_DEPTH} levels a tree may have"
                    )
                op = self._mkdir(parent, name)
                yield op
                stack.append((len(self.parents) - 1, depth + 1, _entries(directory)))

    def _directory(self, digest: bytes, parent: int, name: bytes) -> Any:
        directory = self.closure.get(digest)
        if directory is None:
            raise NotFoundError(f"directory {digest.hex()} not found (needed at {self.show(parent, name)})")
        return directory


def _entries(directory: Any) -> Iterator[tuple[int, Any]]:
    """A Directory message's entries (their order does not matter to an export: each has its own name)."""
    for msg in directory.directories:
        yield MKDIR, msg
    for msg in directory.files:
        yield FILE, msg
    for msg in directory.symlinks:
        yield SYMLINK, msg


async def fetch_closure(node: Node, directories: DirectoryService) -> Closure:
    """Every Directory message below ``node`` by digest: each checked against its digest (by the service),
    announced by its parent, none missing.

    The messages are kept as they were parsed (upb), not turned into
    :class:`~nixcas.castore.directory.Directory` objects: for a tree of many
    small files that decoding cost more than the rest of the export's own work.
    """
    if not isinstance(node, DirectoryNode):
        return {}
    from google.protobuf.message import DecodeError

    from nixcas.castore.proto import pb

    closure: Closure = {}
    expected: set[bytes] = {node.digest}
    async for digest, raw in directories.get_recursive_raw(node.digest):
        if digest not in expected:
            raise StorageError(f"received unexpected directory {digest.hex()}")
        try:
            directory = pb.Directory.FromString(raw)
        except DecodeError as e:
            raise StorageError(f"directory {digest.hex()} is stored in an invalid form: {e}") from None
        closure[digest] = directory
        expected.update(child.digest for child in directory.directories)
    if node.digest not in closure:
        raise NotFoundError(f"directory {node.digest.hex()} not found")
    missing = expected - closure.keys()
    if missing:
        raise StorageError(f"directory closure of {node.digest.hex()} incomplete: {len(missing)} directories missing")
    return closure

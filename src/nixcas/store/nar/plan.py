"""The layout of a castore tree's NAR: framing bytes and blob "holes".

Rendering and seeking share one description of the NAR: a sequence of
literal byte runs (all the framing, coalesced) and :class:`Hole` records
standing for file contents, each naming the blob digest, its size and the
path of the file inside the NAR.  The plan is computed from the directory
closure alone, so the NAR's size is known without reading a single blob.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from nixcas.castore.digest import EMPTY_DIGEST, B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.graph import RootToLeavesValidator
from nixcas.castore.nodes import MAX_DEPTH, DirectoryNode, FileNode, Node, SymlinkNode
from nixcas.castore.treepath import TreePath
from nixcas.errors import ChecksumMismatch, DepthError, NotFoundError, StorageError
from nixcas.store.nar.wire import (
    ENTRY_PREFIX,
    NAR_MAGIC,
    NODE_DIRECTORY,
    NODE_EXECUTABLE,
    NODE_REGULAR,
    NODE_SYMLINK,
    TOK_CLOSE,
    TOK_NODE,
    encode_str,
    padding,
    u64_le,
)

__all__ = [
    "BlobSizeMismatch",
    "Closure",
    "Hole",
    "NarContentNotFound",
    "fetch_closure",
    "iter_plan",
    "show_path",
]

LITERAL_CHUNK = 64 << 10
"""Framing runs are cut into pieces of about this size (bounds look-ahead memory)."""

Path = TreePath
ROOT = TreePath(None, b"")
"""The path of the NAR's (anonymous) root."""
Closure = dict[B3Digest, Directory]
"""A directory closure by digest, as :func:`fetch_closure` returns it."""


class NarContentNotFound(NotFoundError, StorageError):
    """A blob or directory the NAR needs is not in the store.

    Both a :class:`~nixcas.errors.NotFoundError` and a
    :class:`~nixcas.errors.StorageError`: the node was given explicitly, but
    its absence also means the store lost part of what the node refers to.
    """

    def __init__(self, kind: str, digest: B3Digest, path: Path) -> None:
        super().__init__(f"{kind} {digest.hex()} not found (needed at {show_path(path)} in the NAR)")
        self.kind = kind
        self.digest = digest
        self.path = path


class BlobSizeMismatch(StorageError):
    """A blob yielded fewer or more bytes than the file node declares."""


def show_path(path: Path) -> str:
    """A path inside the NAR for messages: ``/`` for the root, ``/a/b`` below it."""
    return path.show_below_root()


def too_deep(path: Path) -> DepthError:
    """The error for a stored tree with an entry below ``path``, which is already :data:`MAX_DEPTH` deep."""
    return DepthError(
        f"directory {show_path(path)} is nested {path.depth} levels deep: its entries would exceed "
        f"the {MAX_DEPTH} levels a tree may have"
    )


@dataclass(frozen=True, slots=True)
class Hole:
    """File contents inside the NAR: ``size`` bytes of blob ``digest``, for the file at ``path``."""

    digest: B3Digest
    size: int
    path: Path

    def short(self, got: int) -> BlobSizeMismatch:
        """The error for a blob that ended after ``got`` bytes."""
        return BlobSizeMismatch(
            f"blob {self.digest.hex()} short read: ended after {got} of {self.size} bytes "
            f"(file {show_path(self.path)} in the NAR)"
        )

    def long(self) -> BlobSizeMismatch:
        """The error for a blob that continues past the declared size."""
        return BlobSizeMismatch(
            f"blob {self.digest.hex()} continued to yield data beyond its declared size {self.size} "
            f"(file {show_path(self.path)} in the NAR)"
        )

    def missing(self) -> NarContentNotFound:
        """The error for a blob that is not in the store."""
        return NarContentNotFound("blob", self.digest, self.path)


async def fetch_closure(node: Node, directories: DirectoryService) -> Closure:
    """All Directories below ``node`` by digest (empty unless ``node`` is a directory).

    Fetched with one ``get_recursive`` and validated (every directory was
    announced by its parent and every announced one arrived).  Anything
    missing raises :class:`NarContentNotFound` naming the digest and the
    first path inside the NAR that needs it.
    """
    if not isinstance(node, DirectoryNode):
        return {}
    closure: Closure = {}
    validator = RootToLeavesValidator(node.digest, directories.size_rule)
    try:
        async for directory in directories.get_recursive(node.digest):
            validator.add(directory)
            closure[directory.digest] = directory
        validator.finish()
    except ChecksumMismatch:
        raise
    except StorageError as e:
        # A descendant is missing (or the backend sent an incomplete closure):
        # find out which one, and where it hangs in the tree.
        await _raise_missing(node.digest, closure, directories)
        raise StorageError(f"fetching the closure of directory {node.digest.hex()}: {e}") from e
    if node.digest not in closure:
        raise NarContentNotFound("directory", node.digest, ROOT)
    return closure


async def _raise_missing(root: B3Digest, closure: Closure, directories: DirectoryService) -> None:
    """Walk the tree, filling ``closure`` one by one; raise for the first missing directory."""
    stack: list[tuple[B3Digest, Path]] = [(root, ROOT)]
    seen: set[B3Digest] = set()
    while stack:
        digest, path = stack.pop()
        if digest in seen:
            continue
        seen.add(digest)
        directory = closure.get(digest)
        if directory is None:
            directory = await directories.get(digest)
            if directory is None:
                raise NarContentNotFound("directory", digest, path)
            closure[digest] = directory
        stack.extend((child.digest, path.child(name)) for name, child in reversed(list(directory.directories())))


def _check_file(node: FileNode, path: Path) -> Hole | None:
    """The hole for a file's contents; ``None`` for a (well-formed) empty file."""
    empty_digest = node.digest == EMPTY_DIGEST
    if node.size == 0 and empty_digest:
        return None
    if node.size == 0 or empty_digest:
        # Sizes are part of content addressing: only the empty blob has size 0.
        raise BlobSizeMismatch(
            f"file {show_path(path)}: size {node.size} contradicts digest {node.digest.hex()} "
            f"({'the empty blob' if empty_digest else 'not the empty blob'})"
        )
    return Hole(node.digest, node.size, path)


def iter_plan(root: Node, closure: Closure) -> Iterator[bytes | Hole]:
    """The NAR of ``root`` as literal byte runs and holes, in order.

    Framing between two holes is coalesced into runs of about
    :data:`LITERAL_CHUNK` bytes (never empty).  ``closure`` must hold every directory below
    ``root`` (see :func:`fetch_closure`).  A file of size 0 is pure framing
    (its digest must be the empty blob's); a size that contradicts the digest
    in that respect raises :class:`BlobSizeMismatch`; a tree nested deeper than
    :data:`~nixcas.castore.nodes.MAX_DEPTH` raises :class:`~nixcas.errors.DepthError`.
    """
    buf = bytearray(NAR_MAGIC)
    # Each stack frame: remaining entries of a directory (reversed, pop from the end) and its path.
    stack: list[tuple[list[tuple[bytes, Node]], Path]] = []
    node: Node = root
    path: Path = ROOT
    while True:
        if isinstance(node, FileNode):
            buf += NODE_EXECUTABLE if node.executable else NODE_REGULAR
            buf += u64_le(node.size)
            hole = _check_file(node, path)
            if hole is not None:
                yield bytes(buf)
                buf.clear()
                yield hole
                buf += padding(node.size)
            buf += TOK_CLOSE
            if path.parent is not None:
                buf += TOK_CLOSE  # the entry
        elif isinstance(node, SymlinkNode):
            buf += NODE_SYMLINK
            buf += encode_str(node.target)
            buf += TOK_CLOSE
            if path.parent is not None:
                buf += TOK_CLOSE
        else:
            directory = closure.get(node.digest)
            if directory is None:
                raise NarContentNotFound("directory", node.digest, path)
            if path.depth >= MAX_DEPTH and directory.entries:
                raise too_deep(path)
            buf += NODE_DIRECTORY
            stack.append((list(directory.entries)[::-1], path))
        # Advance to the next entry, closing finished directories on the way.
        while stack:
            entries, dir_path = stack[-1]
            if entries:
                name, node = entries.pop()
                buf += ENTRY_PREFIX
                buf += encode_str(name)
                buf += TOK_NODE
                path = TreePath(dir_path, name)
                break
            stack.pop()
            buf += TOK_CLOSE
            if dir_path.parent is not None:
                buf += TOK_CLOSE
        else:
            break
        if len(buf) >= LITERAL_CHUNK:
            yield bytes(buf)
            buf.clear()
    yield bytes(buf)


def plan_size(root: Node, closure: Closure) -> int:
    """The NAR size of ``root`` (no blob is read)."""
    return sum(len(item) if isinstance(item, bytes) else item.size for item in iter_plan(root, closure))

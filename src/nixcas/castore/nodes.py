"""Nodes (directory / file / symlink) and the rules for names and symlink targets.

A node carries no name: a name is given to it by the Directory that holds it,
or by a context such as a store path.  Nodes are immutable and validated when
constructed.
"""

from __future__ import annotations

from nixcas._record import Record
from nixcas.castore.digest import B3Digest
from nixcas.errors import InvalidNameError, InvalidSymlinkTargetError, ValidationError

TYPE_CHECKING = False  # not typing's: `castore ls` and `path-info` load nothing else of it
if TYPE_CHECKING:
    from typing import TypeAlias

MAX_NAME_LEN = 255
MAX_TARGET_LEN = 4095
U64_MAX = 2**64 - 1
MAX_DEPTH = 2048
"""The most components a path inside a tree may have (``a/b/c`` has 3): the deepest nesting accepted.

Linux refuses paths of more than 4096 bytes (``PATH_MAX``, NUL included), so a
tree nested deeper than 2048 levels cannot be written out or read back by full
paths even with one-byte names.  Every entry point refuses deeper trees with a
:class:`~nixcas.errors.DepthError` (NAR, tar and filesystem imports, Directory
uploads, PathInfo roots, NAR rendering), so memory stays bounded by the input.
"""


def validate_name(name: bytes) -> bytes:
    """Check a path component; return it unchanged.

    Rules in order: non-empty, not ``..``, not ``.``, at most 255 bytes, no NUL,
    no ``/``.  Any other bytes (also non-UTF-8) are allowed.
    """
    if not name:
        raise InvalidNameError(name, "empty")
    if name == b"..":
        raise InvalidNameError(name, "is '..'")
    if name == b".":
        raise InvalidNameError(name, "is '.'")
    if len(name) > MAX_NAME_LEN:
        raise InvalidNameError(name, f"longer than {MAX_NAME_LEN} bytes ({len(name)})")
    if b"\0" in name:
        raise InvalidNameError(name, "contains NUL")
    if b"/" in name:
        raise InvalidNameError(name, "contains '/'")
    return name


def validate_symlink_target(target: bytes) -> bytes:
    """Check a symlink target: non-empty, at most 4095 bytes, no NUL."""
    if not target:
        raise InvalidSymlinkTargetError(target, "empty")
    if len(target) > MAX_TARGET_LEN:
        raise InvalidSymlinkTargetError(target, f"longer than {MAX_TARGET_LEN} bytes ({len(target)})")
    if b"\0" in target:
        raise InvalidSymlinkTargetError(target, "contains NUL")
    return target


_set = object.__setattr__


def _check_size(size: int) -> None:
    if not 0 <= size <= U64_MAX:
        raise ValidationError(f"size {size} is not an unsigned 64-bit integer")


class _DigestAndSize(Record):
    """What both nodes that reference stored data hold: its digest and its size (checked on creation)."""

    __slots__ = ("digest", "size")
    __match_args__ = ("digest", "size")
    digest: B3Digest
    size: int

    def __init__(self, digest: B3Digest, size: int) -> None:
        _set(self, "digest", digest if type(digest) is B3Digest else B3Digest(digest))
        if not 0 <= size <= U64_MAX:
            _check_size(size)
        _set(self, "size", size)


class DirectoryNode(_DigestAndSize):
    """A reference to a Directory by digest, with the Directory's size."""

    __slots__ = ()


class FileNode(_DigestAndSize):
    """A reference to a blob by digest, with its size and executable bit."""

    __slots__ = ("executable",)
    __match_args__ = ("digest", "size", "executable")
    executable: bool

    def __init__(self, digest: B3Digest, size: int, executable: bool = False) -> None:
        _DigestAndSize.__init__(self, digest, size)
        _set(self, "executable", executable)


class SymlinkNode(Record):
    """A symbolic link; the target is raw bytes."""

    __slots__ = ("target",)
    __match_args__ = ("target",)
    target: bytes

    def __init__(self, target: bytes) -> None:
        _set(self, "target", validate_symlink_target(target))


Node: TypeAlias = DirectoryNode | FileNode | SymlinkNode


def node_kind(node: Node) -> str:
    """``"directory"``, ``"file"`` or ``"symlink"``."""
    if isinstance(node, DirectoryNode):
        return "directory"
    if isinstance(node, FileNode):
        return "file"
    return "symlink"


__all__ = [
    "MAX_DEPTH",
    "MAX_NAME_LEN",
    "MAX_TARGET_LEN",
    "DirectoryNode",
    "FileNode",
    "Node",
    "SymlinkNode",
    "node_kind",
    "validate_name",
    "validate_symlink_target",
]

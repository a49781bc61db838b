"""The tvix/snix castore fixtures, built from the data model.

Names follow ``castore/src/fixtures.rs``.  Digests of these values are
listed in ``tests/data/vectors.json``; the tests check them against it, so
this module only states the definitions.
"""

from __future__ import annotations

from nixcas.castore.digest import B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.nodes import FileNode, Node, SymlinkNode
from nixcas.castore.sizerule import SizeRule

__all__ = [
    "BLOB_A",
    "BLOB_A_DIGEST",
    "BLOB_B",
    "BLOB_B_DIGEST",
    "DIRECTORY_A",
    "DIRECTORY_B",
    "DIRECTORY_C",
    "DIRECTORY_COMPLICATED",
    "DIRECTORY_D",
    "DIRECTORY_WITH_KEEP",
    "DUMMY_DIGEST",
    "DUMMY_DIGEST_2",
    "EMPTY",
    "EMPTY_DIGEST",
    "HELLOWORLD",
    "HELLOWORLD_DIGEST",
    "SYMLINK_TARGET",
]

EMPTY = b""
"""The empty blob."""

HELLOWORLD = b"Hello World!"
"""12 bytes, no trailing newline."""

BLOB_A = bytes([0x00, 0x01])
"""Two bytes; always a single chunk."""

BLOB_B = bytes(range(255)) * 4096
"""Bytes ``0..=254`` repeated 4096 times (1 044 480 bytes)."""

EMPTY_DIGEST = B3Digest.of(EMPTY)
HELLOWORLD_DIGEST = B3Digest.of(HELLOWORLD)
BLOB_A_DIGEST = B3Digest.of(BLOB_A)
BLOB_B_DIGEST = B3Digest.of(BLOB_B)

DUMMY_DIGEST = B3Digest(bytes(32))
"""32 zero bytes."""

DUMMY_DIGEST_2 = B3Digest(b"\x10" + bytes(31))

SYMLINK_TARGET = b"/nix/store/somewhereelse"

DIRECTORY_A = Directory()
"""The empty Directory (its digest equals the empty blob's)."""

DIRECTORY_WITH_KEEP = Directory({b".keep": FileNode(EMPTY_DIGEST, 0, executable=False)})
"""``{file '.keep' -> EMPTY}``."""

_COMPLICATED_ENTRIES: dict[bytes, Node] = {
    b"keep": DIRECTORY_WITH_KEEP.node(SizeRule.TVIX),
    b".keep": FileNode(EMPTY_DIGEST, 0, executable=False),
    b"aa": SymlinkNode(SYMLINK_TARGET),
}
DIRECTORY_COMPLICATED = Directory(_COMPLICATED_ENTRIES)
"""``{dir 'keep' -> WITH_KEEP, file '.keep' -> EMPTY, symlink 'aa' -> /nix/store/somewhereelse}``,
'keep' sized by the tvix rule (2; the tvix-era fixture)."""

DIRECTORY_COMPLICATED_SNIX = Directory({**_COMPLICATED_ENTRIES, b"keep": DIRECTORY_WITH_KEEP.node(SizeRule.SNIX)})
"""The same tree with 'keep' sized by the snix rule (1): another digest."""

DIRECTORY_B = Directory({b"a": DIRECTORY_A.node(SizeRule.TVIX)})
"""``{dir 'a' -> A}``."""

DIRECTORY_C = Directory(
    {
        b"a": DIRECTORY_A.node(SizeRule.TVIX),
        b"a'": DIRECTORY_A.node(SizeRule.TVIX),
    }
)
"""``{dir 'a' -> A, dir "a'" -> A}`` (the same child twice)."""

DIRECTORY_D = Directory(
    {
        b"a": DIRECTORY_A.node(SizeRule.TVIX),
        b"b": DIRECTORY_B.node(SizeRule.TVIX),
    }
)
"""``{dir 'a' -> A, dir 'b' -> B}`` (A is reachable twice)."""

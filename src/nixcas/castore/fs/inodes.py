"""Inode numbers for the nodes a mount has shown the kernel, and their eviction.

The root is inode 1; other inodes are handed out from 2 on, never reused.
Identical content shares one inode while the kernel knows it: a node is its
own key, so a directory is shared by digest and size, a symlink by target,
and a file by digest, size **and** executable bit (tvix keys files by digest
alone, so an executable and a plain copy of the same bytes end up with one
inode and one mode).

The kernel counts the references it holds (``lookup`` replies and entries of
``readdirplus``) and returns them with ``forget``; an inode whose count drops
to zero is dropped together with the directory listing it may hold, so a
long-running mount holds only what the kernel still caches.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from nixcas.castore.directory import Directory
from nixcas.castore.nodes import Node
from nixcas.castore.treepath import TreePath

__all__ = ["ROOT_INODE", "Inode", "InodeTable"]

ROOT_INODE = 1
ROOT_PATH = TreePath(None, b"")
"""The path of the mount's root."""


@dataclass(eq=False, slots=True)
class Inode:
    """One inode: its node (``None`` for the root), a path it was reached by, its state."""

    ino: int
    node: Node | None
    path: TreePath
    """The first path this inode was reached by (below the mount's root), for messages; a link to the
    parent's path, so a deep walk costs memory linear in its depth."""
    lookups: int = 0
    directory: Directory | None = None
    """The Directory's entries once fetched (directories start sparse: only digest and size known)."""
    loading: asyncio.Future[Directory] | None = field(default=None, repr=False)
    """The fetch of ``directory`` in flight, shared by concurrent lookups."""

    def show_path(self) -> str:
        """The path for log messages (``/`` for the root)."""
        return self.path.show_below_root()


class InodeTable:
    """Live inodes by number, and by node for sharing identical content."""

    def __init__(self) -> None:
        self._inodes: dict[int, Inode] = {ROOT_INODE: Inode(ROOT_INODE, None, ROOT_PATH, lookups=1)}
        self._by_node: dict[Node, Inode] = {}
        self._next = ROOT_INODE + 1

    def __len__(self) -> int:
        return len(self._inodes)

    @property
    def root(self) -> Inode:
        return self._inodes[ROOT_INODE]

    def get(self, ino: int) -> Inode | None:
        return self._inodes.get(ino)

    def ref(self, node: Node, path: TreePath) -> Inode:
        """The inode of ``node`` (created if needed), with one more kernel reference."""
        inode = self._by_node.get(node)
        if inode is None:
            inode = Inode(self._next, node, path)
            self._next += 1
            self._inodes[inode.ino] = inode
            self._by_node[node] = inode
        inode.lookups += 1
        return inode

    def forget(self, ino: int, count: int) -> None:
        """The kernel dropped ``count`` references; an inode left with none is evicted."""
        inode = self._inodes.get(ino)
        if inode is None or ino == ROOT_INODE:
            return
        inode.lookups -= count
        if inode.lookups <= 0:
            del self._inodes[ino]
            assert inode.node is not None
            del self._by_node[inode.node]

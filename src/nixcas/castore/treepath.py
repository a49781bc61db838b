"""Paths inside a tree as links to their parent directory's path.

A walk over a tree keeps the path of every open directory.  Held as tuples of
names, a chain of ``n`` nested directories costs memory in ``n²`` (every level
copies its parent's names); a :class:`TreePath` names only its last component
and points to its parent's :class:`TreePath`, which all siblings share, so the
same walk costs memory linear in ``n``.  Names are joined into text only when
a message needs them (:meth:`TreePath.show`, abbreviated in the middle for
deep paths).

Two paths are equal when their names are (root first), whether or not they
share objects; hashing is computed once per object.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["SHOW_COMPONENTS", "TreePath", "show_names"]

SHOW_COMPONENTS = 16
"""Messages show at most this many leading and trailing components of a deep path."""


def show_names(names: Sequence[bytes], prefix: str = "") -> str:
    """``names`` joined by ``/`` for a message, with the middle left out of a deep path."""
    if len(names) > 2 * SHOW_COMPONENTS + 1:
        left = len(names) - 2 * SHOW_COMPONENTS
        names = [*names[:SHOW_COMPONENTS], f"…({left} more)…".encode(), *names[-SHOW_COMPONENTS:]]
    return prefix + "/".join(n.decode("utf-8", "backslashreplace") for n in names)


class TreePath:
    """The path of a node: its ``name`` below ``parent`` (``None`` for the root), and its ``depth``.

    The root has depth 0; a child is one deeper than its parent.  Create
    children with :meth:`child` so that siblings share their parent.
    """

    __slots__ = ("_hash", "depth", "name", "parent")

    parent: TreePath | None
    name: bytes
    depth: int

    def __init__(self, parent: TreePath | None, name: bytes) -> None:
        self.parent = parent
        self.name = name
        self.depth = 0 if parent is None else parent.depth + 1
        self._hash: int | None = None

    @classmethod
    def of(cls, names: Sequence[bytes]) -> TreePath:
        """The path with these names, root first (at least one)."""
        if not names:
            raise ValueError("a tree path has at least the root's name")
        path = cls(None, names[0])
        for name in names[1:]:
            path = cls(path, name)
        return path

    def child(self, name: bytes) -> TreePath:
        """The path of the entry ``name`` of this directory."""
        return TreePath(self, name)

    def names(self) -> tuple[bytes, ...]:
        """All names, root first."""
        out: list[bytes] = []
        path: TreePath | None = self
        while path is not None:
            out.append(path.name)
            path = path.parent
        out.reverse()
        return tuple(out)

    def below_root(self) -> tuple[bytes, ...]:
        """The names after the root's (``()`` for the root)."""
        return self.names()[1:]

    def show(self) -> str:
        """All names joined by ``/`` (the middle of a deep path abbreviated)."""
        return show_names(self.names())

    def show_below_root(self) -> str:
        """``/`` for the root, ``/a/b`` below it (the middle of a deep path abbreviated)."""
        return show_names(self.below_root(), "/")

    def __hash__(self) -> int:
        if self._hash is None:
            # Iteratively: the first hash of a deep path must not recurse.
            chain: list[TreePath] = []
            path: TreePath | None = self
            while path is not None and path._hash is None:
                chain.append(path)
                path = path.parent
            parent_hash = None if path is None else path._hash
            for p in reversed(chain):
                p._hash = parent_hash = hash((parent_hash, p.name))
        assert self._hash is not None
        return self._hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TreePath):
            return NotImplemented
        if self.depth != other.depth:
            return False
        a: TreePath | None = self
        b: TreePath | None = other
        while a is not None and b is not None:
            if a is b:
                return True
            if a.name != b.name:
                return False
            a, b = a.parent, b.parent
        return a is None and b is None

    def __repr__(self) -> str:
        return f"TreePath.of({self.names()!r})"

"""Validation of directory closures as they travel between services.

* :class:`LeavesToRootValidator` checks an upload: every child must have been
  sent earlier in the same closure with the size it really has under the
  store's :class:`~nixcas.castore.sizerule.SizeRule`, no path may be
  deeper than :data:`~nixcas.castore.nodes.MAX_DEPTH`, and at the end there
  must be exactly one root.
* :class:`RootToLeavesValidator` checks a download: the first directory is the
  requested root and every later one must be a child of one already received,
  with the size its parents record under the rule.
* :func:`leaves_first` turns a downloaded closure into an upload order.
"""

from __future__ import annotations

from collections.abc import Sequence

from nixcas.castore.digest import B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.nodes import MAX_DEPTH
from nixcas.castore.sizerule import SizeRule
from nixcas.errors import ClosureError, DepthError, StorageError

__all__ = ["LeavesToRootValidator", "RootToLeavesValidator", "leaves_first"]


def leaves_first(closure: Sequence[Directory]) -> list[Directory]:
    """A closure (root first) reordered so that each directory follows all its sub-directories.

    Reversed breadth-first order is not enough: a directory reachable at two
    depths (``D -> A`` and ``D -> B -> A``) is yielded at the shallower one,
    so reversing puts ``B`` before ``A``.  This is a depth-first post-order.
    Sub-directories not in ``closure`` are left out (the upload then rejects a
    closure that needs them).
    """
    by_digest = {d.digest: d for d in closure}
    order: list[Directory] = []
    done: set[B3Digest] = set()
    stack: list[tuple[Directory, bool]] = [(closure[0], False)] if closure else []
    while stack:
        directory, children_done = stack.pop()
        if directory.digest in done:
            continue
        if children_done:
            done.add(directory.digest)
            order.append(directory)
            continue
        stack.append((directory, True))
        for _, node in directory.directories():
            child = by_digest.get(node.digest)
            if child is not None and node.digest not in done:
                stack.append((child, False))
    return order


class LeavesToRootValidator:
    """Accumulates a closure sent leaves first; duplicates are dropped.

    Each directory's *height* (the most path components below it: 0 when
    empty, 1 with only files and symlinks) is computed from its children's as
    it arrives; a height above :data:`~nixcas.castore.nodes.MAX_DEPTH` is a
    :class:`~nixcas.errors.DepthError` at once, so no tree deeper than the
    limit is ever stored through a closure upload.
    """

    def __init__(self, rule: SizeRule) -> None:
        self.rule = rule
        self._seen: dict[B3Digest, Directory] = {}
        self._heights: dict[B3Digest, int] = {}
        self._referenced: set[B3Digest] = set()

    def add(self, directory: Directory) -> bool:
        """Check ``directory`` against what came before; ``False`` for a duplicate."""
        digest = directory.digest
        if digest in self._seen:
            return False
        height = 1 if len(directory) else 0
        for name, child in directory.directories():
            known = self._seen.get(child.digest)
            if known is None:
                raise ClosureError(
                    f"directory {digest.hex()}: {name[:300]!r} points to {child.digest.hex()}, "
                    "which was not uploaded before it (dangling pointer)"
                )
            wrong = known.size_mismatch(self.rule, child.size, f"directory {digest.hex()}: {name[:300]!r}")
            if wrong is not None:
                raise ClosureError(wrong)
            self._referenced.add(child.digest)
            height = max(height, self._heights[child.digest] + 1)
        if height > MAX_DEPTH:
            raise DepthError(
                f"directory {digest.hex()}: nested {height} levels deep, more than the {MAX_DEPTH} a tree may have"
            )
        self._seen[digest] = directory
        self._heights[digest] = height
        return True

    def finish(self) -> tuple[B3Digest, list[Directory]]:
        """The root digest and the directories in upload order (leaves first)."""
        if not self._seen:
            raise ClosureError("got no directories (empty closure)")
        roots = [d for d in self._seen if d not in self._referenced]
        if len(roots) != 1:
            raise ClosureError(
                f"graph has disconnected roots: {len(roots)} directories are not referenced by any other"
            )
        return roots[0], list(self._seen.values())


class RootToLeavesValidator:
    """Checks a closure received root first (as ``get_recursive`` yields it).

    Each sub-directory must have the size its parents record under ``rule``
    (a peer of the other rule sends trees this store cannot hold).
    """

    def __init__(self, root: B3Digest, rule: SizeRule) -> None:
        self.rule = rule
        self._expected: dict[B3Digest, tuple[int, str] | None] = {root: None}
        self._received: set[B3Digest] = set()

    def add(self, directory: Directory) -> None:
        """Accept ``directory`` only if it was announced by the root or a received parent."""
        digest = directory.digest
        if digest not in self._expected:
            raise StorageError(f"received unexpected directory {digest.hex()}")
        recorded = self._expected[digest]
        if recorded is not None:
            wrong = directory.size_mismatch(self.rule, *recorded)
            if wrong is not None:
                raise StorageError(f"received {wrong}")
        self._received.add(digest)
        for name, child in directory.directories():
            if child.digest not in self._expected:
                self._expected[child.digest] = (child.size, f"directory {digest.hex()}: {name[:300]!r}")

    def finish(self) -> None:
        """Fail unless every announced directory was received."""
        missing = self._expected.keys() - self._received
        if missing:
            raise StorageError(f"closure incomplete: still expected {len(missing)} directories")

"""What a mount shows at its root: the :class:`RootNodes` interface and a castore Directory as one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from nixcas.castore.directory import Directory
from nixcas.castore.nodes import Node

__all__ = ["DirectoryRootNodes", "RootNodes"]


@runtime_checkable
class RootNodes(Protocol):
    """The named nodes at the root of a mounted filesystem.

    Both methods may raise :class:`~nixcas.errors.NixcasError` (or ``OSError``)
    when the backing service fails; the filesystem answers ``EIO`` then.
    """

    async def get_by_basename(self, name: bytes) -> Node | None:
        """The node called ``name`` (a valid path component), or ``None``."""
        ...

    def list(self) -> AsyncIterator[tuple[bytes, Node]]:
        """Every ``(name, node)`` at the root (order as the backend gives it)."""
        ...


class DirectoryRootNodes:
    """A castore Directory's entries as the root (``nixcas castore mount DIGEST``)."""

    def __init__(self, directory: Directory) -> None:
        self.directory = directory

    async def get_by_basename(self, name: bytes) -> Node | None:
        return self.directory.get(name)

    async def list(self) -> AsyncIterator[tuple[bytes, Node]]:
        for entry in self.directory:
            yield entry

"""The object-I/O protocol the snix layout is written against, and what a listing says about an object.

Two adapters implement :class:`ObjectIO`: :class:`~.client.ObjectStore`
(obstore: S3, GCS, Azure, memory, and obstore's own local store) and
:class:`~.disk.DiskObjects` (plain files under a directory, written by
atomic rename).  Keys are ``/``-separated paths relative to the store's base.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

__all__ = ["ObjectIO", "ObjectMeta"]


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    """What a listing or ``HEAD`` says about one object."""

    key: str
    size: int
    mtime_ns: int


class ObjectIO(Protocol):
    """A flat key → bytes store: the only operations the layout needs."""

    async def get(self, key: str, cap: int | None = None) -> bytes | None:
        """The object's bytes (``None``: absent); more than ``cap`` bytes is a :class:`~nixcas.errors.StorageError`."""

    async def head(self, key: str) -> ObjectMeta | None:
        """The object's size and age (``None``: absent)."""

    async def put(self, key: str, data: bytes) -> None:
        """Write ``data`` at ``key`` whole (a reader sees the old object or the whole new one)."""

    async def delete(self, key: str) -> None:
        """Delete ``key`` (absent already: done)."""

    def list(self, prefix: str, page: int = 1000, after: str | None = None) -> AsyncIterator[list[ObjectMeta]]:
        """Every object under ``prefix`` (a whole path segment), a page at a time."""

"""Blocking wrappers for code that is not async (scripts, notebooks, FUSE callbacks).

:class:`SyncStore` runs an :class:`~nixcas.api.Store` on a private event loop
in a background thread and forwards each call to it::

    from nixcas.sync import open_store

    with open_store("/tmp/demo-store") as store:
        root = store.ingest("some/dir")
        for path, node in store.walk(root):
            print(path, node)
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Self, TypeVar

from nixcas.api import Store
from nixcas.castore.digest import B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.nodes import Node

__all__ = ["SyncStore", "open_store"]

T = TypeVar("T")


class SyncStore:
    """A :class:`~nixcas.api.Store` driven from synchronous code."""

    def __init__(self, store_dir: str | os.PathLike[str] | None = None, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nixcas-sync", daemon=True)
        self._thread.start()
        try:
            self.store: Store = self._run(Store.open(store_dir, **options))
        except BaseException:
            self._stop()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def ingest(self, path: str | os.PathLike[str]) -> Node:
        """See :meth:`nixcas.api.Store.ingest`."""
        return self._run(self.store.ingest(path))

    def ingest_archive(self, path: str | os.PathLike[str]) -> Node:
        """See :meth:`nixcas.api.Store.ingest_archive`."""
        return self._run(self.store.ingest_archive(path))

    def read_blob(self, digest: B3Digest) -> bytes:
        """See :meth:`nixcas.api.Store.read_blob`."""
        return self._run(self.store.read_blob(digest))

    def get_directory(self, digest: B3Digest) -> Directory:
        """See :meth:`nixcas.api.Store.get_directory`."""
        return self._run(self.store.get_directory(digest))

    def walk(self, root: Node | B3Digest) -> list[tuple[bytes, Node]]:
        """See :meth:`nixcas.api.Store.walk` (collected into a list)."""

        async def collect() -> list[tuple[bytes, Node]]:
            return [item async for item in self.store.walk(root)]

        return self._run(collect())

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def close(self) -> None:
        """Close the store and stop the background loop."""
        try:
            self._run(self.store.close())
        finally:
            self._stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def open_store(
    store_dir: str | os.PathLike[str] | None = None,
    *,
    blob_service_url: str | None = None,
    directory_service_url: str | None = None,
) -> SyncStore:
    """Open a :class:`SyncStore` (arguments as :func:`nixcas.open_store`)."""
    return SyncStore(store_dir, blob_service_url=blob_service_url, directory_service_url=directory_service_url)

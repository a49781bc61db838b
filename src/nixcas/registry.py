"""From a service URL to a service instance.

The backend is chosen by the URL *tag*: the scheme up to the first ``+``.

==========================  ====================================================
blob services
``memory://``               :class:`~nixcas.castore.blob.memory.MemoryBlobService`
``objectstore+file:///p``   :class:`~nixcas.castore.blob.local.LocalBlobService`
                            (options: ``zstd_level``)
directory services
``memory://``               :class:`~nixcas.castore.dirs.memory.MemoryDirectoryService`
``sqlite:///p.sqlite``      :class:`~nixcas.castore.dirs.sqlite.SqliteDirectoryService`
``sqlite://``               the same, in memory
==========================  ====================================================

Unknown tags, hosts or paths where none belong, and unknown options raise
:class:`~nixcas.errors.ConfigurationError` when the URL is parsed, never later.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar
from urllib.parse import SplitResult, urlsplit

from nixcas.castore.blob.base import BlobService
from nixcas.castore.blob.local import LocalBlobService
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.dirs.sqlite import SqliteDirectoryService
from nixcas.errors import ConfigurationError
from nixcas.urls import url_tag

__all__ = ["BLOB_SERVICES", "DIRECTORY_SERVICES", "blob_service_from_url", "directory_service_from_url"]

S = TypeVar("S")


def _objectstore_blob_service(url: SplitResult) -> BlobService:
    inner = url.scheme.partition("+")[2]
    if inner == "file":
        return LocalBlobService.from_url(url)
    raise ConfigurationError(
        f"{url.geturl()!r}: unsupported object store {inner or '(none)'!r} (supported: objectstore+file)"
    )


BLOB_SERVICES: dict[str, Callable[[SplitResult], BlobService]] = {
    "memory": MemoryBlobService.from_url,
    "objectstore": _objectstore_blob_service,
}
DIRECTORY_SERVICES: dict[str, Callable[[SplitResult], DirectoryService]] = {
    "memory": MemoryDirectoryService.from_url,
    "sqlite": SqliteDirectoryService.from_url,
}


def _build(kind: str, table: dict[str, Callable[[SplitResult], S]], url: str) -> S:
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise ConfigurationError(f"invalid {kind} URL {url!r}: {e}") from None
    if not parts.scheme:
        raise ConfigurationError(f"invalid {kind} URL {url!r}: no scheme (e.g. memory://)")
    factory = table.get(url_tag(parts))
    if factory is None:
        known = ", ".join(sorted(table))
        raise ConfigurationError(f"invalid {kind} URL {url!r}: unknown type {url_tag(parts)!r} (known: {known})")
    return factory(parts)


def blob_service_from_url(url: str) -> BlobService:
    """A :class:`BlobService` for ``url``."""
    return _build("blob service", BLOB_SERVICES, url)


def directory_service_from_url(url: str) -> DirectoryService:
    """A :class:`DirectoryService` for ``url``."""
    return _build("directory service", DIRECTORY_SERVICES, url)

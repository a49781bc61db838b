"""From a service URL (or a composition table) to a service instance.

The backend is chosen by the URL *tag*: the scheme up to the first ``+``.
In composition files the same tag is the ``type`` field.

===============================  ======================================================
blob services
``memory://``                    :class:`~nixcas.castore.blob.memory.MemoryBlobService`
``objectstore+file:///p``        :class:`~nixcas.castore.blob.local.LocalBlobService`
                                 (options: ``zstd_level``)
``grpc+unix:///sock``,           :class:`~nixcas.castore.blob.grpc.GrpcBlobService`
``grpc+http(s)://host:port``     (options: ``wait-connect``, ``connect-timeout``, ``protocol``)
``combined://?near=A&far=B``     :class:`~nixcas.castore.blob.combined.CombinedBlobService`
directory services
``memory://``                    :class:`~nixcas.castore.dirs.memory.MemoryDirectoryService`
``sqlite:///p.sqlite``           :class:`~nixcas.castore.dirs.sqlite.SqliteDirectoryService`
``sqlite://``                    the same, in memory
``grpc+…``                       :class:`~nixcas.castore.dirs.grpc.GrpcDirectoryService`
``cache://?near=A&far=B``        :class:`~nixcas.castore.dirs.cache.CacheDirectoryService`
``lru://?capacity=N``            :class:`~nixcas.castore.dirs.lru.LruDirectoryService`
path info services
``memory://``                    :class:`~nixcas.store.pathinfo.memory.MemoryPathInfoService`
``sqlite:///p.sqlite``           :class:`~nixcas.store.pathinfo.sqlite.SqlitePathInfoService`
``grpc+…``                       :class:`~nixcas.store.pathinfo.grpc.GrpcPathInfoService`
===============================  ======================================================

``A``/``B`` are names in a composition file, or (percent-encoded) URLs.
Unknown tags, hosts or paths where none belong, and unknown options raise
:class:`~nixcas.errors.ConfigurationError` when the URL is parsed, never later.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, cast
from urllib.parse import urlsplit

from nixcas.castore.blob.base import BlobService
from nixcas.castore.blob.combined import CombinedBlobServiceConfig
from nixcas.castore.blob.grpc import GrpcBlobServiceConfig
from nixcas.castore.blob.local import LocalBlobServiceConfig
from nixcas.castore.blob.memory import MemoryBlobServiceConfig
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.dirs.cache import CacheDirectoryServiceConfig
from nixcas.castore.dirs.grpc import GrpcDirectoryServiceConfig
from nixcas.castore.dirs.lru import LruDirectoryServiceConfig
from nixcas.castore.dirs.memory import MemoryDirectoryServiceConfig
from nixcas.castore.dirs.sqlite import SqliteDirectoryServiceConfig
from nixcas.config import ServiceConfig
from nixcas.errors import ConfigurationError
from nixcas.store.pathinfo.base import PathInfoService
from nixcas.store.pathinfo.grpc import GrpcPathInfoServiceConfig
from nixcas.store.pathinfo.memory import MemoryPathInfoServiceConfig
from nixcas.store.pathinfo.sqlite import SqlitePathInfoServiceConfig
from nixcas.urls import url_tag

__all__ = [
    "BLOB_SERVICES",
    "DIRECTORY_SERVICES",
    "KINDS",
    "blob_service_from_url",
    "directory_service_from_url",
    "parse_service_url",
    "pathinfo_service_from_url",
]


def _by_tag(*configs: type[ServiceConfig[object]]) -> dict[str, type[ServiceConfig[object]]]:
    return {c.type_tag: c for c in configs}


BLOB_SERVICES: Final = _by_tag(
    MemoryBlobServiceConfig, LocalBlobServiceConfig, GrpcBlobServiceConfig, CombinedBlobServiceConfig
)
DIRECTORY_SERVICES: Final = _by_tag(
    MemoryDirectoryServiceConfig,
    SqliteDirectoryServiceConfig,
    GrpcDirectoryServiceConfig,
    CacheDirectoryServiceConfig,
    LruDirectoryServiceConfig,
)
PATHINFO_SERVICES: Final = _by_tag(MemoryPathInfoServiceConfig, SqlitePathInfoServiceConfig, GrpcPathInfoServiceConfig)

KINDS: Final[Mapping[str, Mapping[str, type[ServiceConfig[object]]]]] = {
    "blobservices": BLOB_SERVICES,
    "directoryservices": DIRECTORY_SERVICES,
    "pathinfoservices": PATHINFO_SERVICES,
}


def parse_service_url(kind: str, url: str) -> ServiceConfig[object]:
    """The config that ``url`` describes for a service of ``kind`` (``blobservices``, ...)."""
    noun = kind.removesuffix("services") + " service"
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise ConfigurationError(f"invalid {noun} URL {url!r}: {e}") from None
    if not parts.scheme:
        raise ConfigurationError(f"invalid {noun} URL {url!r}: no scheme (e.g. memory://)")
    table = KINDS[kind]
    backend = table.get(url_tag(parts))
    if backend is None:
        known = ", ".join(sorted(table))
        raise ConfigurationError(f"invalid {noun} URL {url!r}: unknown type {url_tag(parts)!r} (known: {known})")
    return backend.from_url(parts)


async def blob_service_from_url(url: str) -> BlobService:
    """A :class:`BlobService` for ``url``; closing it closes whatever it wraps."""
    from nixcas.composition import Composition

    config = parse_service_url("blobservices", url)
    return cast(BlobService, await config.build(Composition(owns_instances=True)))


async def directory_service_from_url(url: str) -> DirectoryService:
    """A :class:`DirectoryService` for ``url``; closing it closes whatever it wraps."""
    from nixcas.composition import Composition

    config = parse_service_url("directoryservices", url)
    return cast(DirectoryService, await config.build(Composition(owns_instances=True)))


async def pathinfo_service_from_url(url: str) -> PathInfoService:
    """A :class:`PathInfoService` for ``url``; closing it closes whatever it wraps."""
    from nixcas.composition import Composition

    config = parse_service_url("pathinfoservices", url)
    return cast(PathInfoService, await config.build(Composition(owns_instances=True)))

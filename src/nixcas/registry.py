"""From a service URL (or a composition table's ``type``) to the backend's config.

The backend is chosen by the URL *tag*: the scheme up to the first ``+``.
In composition files the same tag is the ``type`` field.

===============================  ======================================================
blob services
``memory://``                    :class:`~nixcas.castore.blob.memory.MemoryBlobService`
``objectstore+file:///p``        :class:`~nixcas.castore.blob.local.LocalBlobService`
                                 (options: ``zstd_level``)
``packed:///p``                  :class:`~nixcas.castore.blob.packed.PackedBlobService` (the embedded
                                 store: small blobs in packs, large ones as ``objectstore+file``;
                                 options: ``compress``, ``zstd_level``)
``objectstore+s3://bucket/p``    :class:`~nixcas.castore.blob.objectstore.ObjectStoreBlobService`
(also ``gs``, ``az``,            (options: ``endpoint``, ``region``, credentials and every other
``memory:///``, ``http(s)``)     obstore option; ``zstd_level``, ``refresh_after``, ``concurrency``, …)
``grpc+unix:///sock``,           :class:`~nixcas.castore.blob.grpc.GrpcBlobService`
``grpc+http(s)://host:port``     (options: ``wait-connect``, ``connect-timeout``, ``protocol``)
``combined://?near=A&far=B``     :class:`~nixcas.castore.blob.combined.CombinedBlobService`
``priority://?member=A&member=B`` :class:`~nixcas.castore.blob.members.MembersBlobService` (read-only;
``race://?member=A&member=B``    ``priority`` asks in order, ``race`` all at once: first valid answer wins)
directory services
``memory://``                    :class:`~nixcas.castore.dirs.memory.MemoryDirectoryService`
``sqlite:///p.sqlite``           :class:`~nixcas.castore.dirs.sqlite.SqliteDirectoryService`
``sqlite://``                    the same, in memory
``postgresql://u:p@h:port/db``   :class:`~nixcas.castore.dirs.postgres.PostgresDirectoryService`
                                 (options: ``pool_min``, ``pool_max``, ``connect_timeout``, libpq's)
``objectstore+s3://bucket/p``    :class:`~nixcas.castore.dirs.objectstore.ObjectStoreDirectoryService`
(also ``gs``, ``az``, ``file``,  (one zstd object per closure, keyed by its root; options as for blobs,
``memory:///``, ``http(s)``)     plus ``max_closure_bytes``)
``grpc+…``                       :class:`~nixcas.castore.dirs.grpc.GrpcDirectoryService`
``cache://?near=A&far=B``        :class:`~nixcas.castore.dirs.cache.CacheDirectoryService`
``lru://?capacity=N``            :class:`~nixcas.castore.dirs.lru.LruDirectoryService`
``priority://``, ``race://``     :class:`~nixcas.castore.dirs.members.MembersDirectoryService` (as for blobs)
path info services
``memory://``                    :class:`~nixcas.store.pathinfo.memory.MemoryPathInfoService`
``sqlite:///p.sqlite``           :class:`~nixcas.store.pathinfo.sqlite.SqlitePathInfoService`
``postgresql://u:p@h:port/db``   :class:`~nixcas.store.pathinfo.postgres.PostgresPathInfoService`
                                 (``postgres://`` too; options as for directories)
``grpc+…``                       :class:`~nixcas.store.pathinfo.grpc.GrpcPathInfoService`
``nix+http(s)://host[/p]``       :class:`~nixcas.store.pathinfo.nixhttp.NixHttpPathInfoService`
                                 (options: ``trusted-public-keys``, ``blob_service``, ``directory_service``)
``cache://?near=A&far=B``        :class:`~nixcas.store.pathinfo.cache.CachePathInfoService`
``lru://?capacity=N``            :class:`~nixcas.store.pathinfo.lru.LruPathInfoService`
``priority://``, ``race://``     :class:`~nixcas.store.pathinfo.members.MembersPathInfoService` (as for blobs)
(composition) keyfile-signing    :class:`~nixcas.store.pathinfo.signing.KeyfileSigningPathInfoService`
pin services
``memory://``                    :class:`~nixcas.castore.pins.memory.MemoryPinService`
``sqlite:///p.sqlite``           :class:`~nixcas.castore.pins.sqlite.SqlitePinService` (this host only)
``postgresql://u:p@h:port/db``   :class:`~nixcas.castore.pins.postgres.PostgresPinService`
                                 (``postgres://`` too; options as for directories)
``grpc+…``                       :class:`~nixcas.castore.pins.grpc.GrpcPinService` (a nixcas daemon's)
===============================  ======================================================

``A``/``B`` (each ``member`` too, in order) are names in a composition file, or (percent-encoded) URLs.
Unknown tags, hosts or paths where none belong, and unknown options raise
:class:`~nixcas.errors.ConfigurationError` when the URL is parsed, never later.

Imports go one way: :mod:`nixcas.config` (the config base classes) <- this
module (which config a tag names) <- :mod:`nixcas.composition` (configs built
into instances, e.g. :func:`~nixcas.composition.blob_service_from_url`).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Final, cast
from urllib.parse import urlsplit

from nixcas._extras import MissingExtra, missing_extra
from nixcas.config import ServiceConfig
from nixcas.errors import ConfigurationError
from nixcas.urls import remember_secrets, shown, url_tag

__all__ = [
    "BLOB_SERVICES",
    "DIRECTORY_SERVICES",
    "KINDS",
    "PATHINFO_SERVICES",
    "PIN_SERVICES",
    "BackendTable",
    "check_references",
    "parse_service_url",
]


class BackendTable(Mapping[str, type[ServiceConfig[object]]]):
    """Tag → config class, each backend module imported on first use.

    Keeps ``import nixcas`` (and every CLI start) from loading grpc, SQLite
    and friends for backends the command never touches.
    """

    def __init__(self, entries: Mapping[str, str]) -> None:
        self._paths = dict(entries)
        self._loaded: dict[str, type[ServiceConfig[object]]] = {}

    def __getitem__(self, tag: str) -> type[ServiceConfig[object]]:
        config = self._loaded.get(tag)
        if config is None:
            module, _, name = self._paths[tag].rpartition(".")
            try:
                config = cast(type[ServiceConfig[object]], getattr(importlib.import_module(module), name))
            except ImportError as e:  # psycopg, say: an extra that was not installed
                missing = missing_extra(e, f"type {tag!r}")
                if missing is None:
                    raise
                raise missing from None
            if config.type_tag != tag:
                raise AssertionError(f"registry: {self._paths[tag]} has tag {config.type_tag!r}, not {tag!r}")
            self._loaded[tag] = config
        return config

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)


BLOB_SERVICES: Final = BackendTable(
    {
        "memory": "nixcas.castore.blob.memory.MemoryBlobServiceConfig",
        "objectstore": "nixcas.castore.blob.objectstore.ObjectStoreBlobServiceConfig",
        "packed": "nixcas.castore.blob.packed.PackedBlobServiceConfig",
        "grpc": "nixcas.castore.blob.grpc.GrpcBlobServiceConfig",
        "combined": "nixcas.castore.blob.combined.CombinedBlobServiceConfig",
        "priority": "nixcas.castore.blob.members.PriorityBlobServiceConfig",
        "race": "nixcas.castore.blob.members.RaceBlobServiceConfig",
    }
)
DIRECTORY_SERVICES: Final = BackendTable(
    {
        "memory": "nixcas.castore.dirs.memory.MemoryDirectoryServiceConfig",
        "sqlite": "nixcas.castore.dirs.sqlite.SqliteDirectoryServiceConfig",
        "postgresql": "nixcas.castore.dirs.postgres.PostgresDirectoryServiceConfig",
        "postgres": "nixcas.castore.dirs.postgres.PostgresAliasDirectoryServiceConfig",
        "objectstore": "nixcas.castore.dirs.objectstore.ObjectStoreDirectoryServiceConfig",
        "grpc": "nixcas.castore.dirs.grpc.GrpcDirectoryServiceConfig",
        "cache": "nixcas.castore.dirs.cache.CacheDirectoryServiceConfig",
        "lru": "nixcas.castore.dirs.lru.LruDirectoryServiceConfig",
        "priority": "nixcas.castore.dirs.members.PriorityDirectoryServiceConfig",
        "race": "nixcas.castore.dirs.members.RaceDirectoryServiceConfig",
    }
)
PATHINFO_SERVICES: Final = BackendTable(
    {
        "memory": "nixcas.store.pathinfo.memory.MemoryPathInfoServiceConfig",
        "sqlite": "nixcas.store.pathinfo.sqlite.SqlitePathInfoServiceConfig",
        "postgresql": "nixcas.store.pathinfo.postgres.PostgresPathInfoServiceConfig",
        "postgres": "nixcas.store.pathinfo.postgres.PostgresAliasPathInfoServiceConfig",
        "grpc": "nixcas.store.pathinfo.grpc.GrpcPathInfoServiceConfig",
        "nix": "nixcas.store.pathinfo.nixhttp.NixHttpPathInfoServiceConfig",
        "cache": "nixcas.store.pathinfo.cache.CachePathInfoServiceConfig",
        "lru": "nixcas.store.pathinfo.lru.LruPathInfoServiceConfig",
        "keyfile-signing": "nixcas.store.pathinfo.signing.KeyfileSigningPathInfoServiceConfig",
        "priority": "nixcas.store.pathinfo.members.PriorityPathInfoServiceConfig",
        "race": "nixcas.store.pathinfo.members.RacePathInfoServiceConfig",
    }
)
PIN_SERVICES: Final = BackendTable(
    {
        "memory": "nixcas.castore.pins.memory.MemoryPinServiceConfig",
        "sqlite": "nixcas.castore.pins.sqlite.SqlitePinServiceConfig",
        "postgresql": "nixcas.castore.pins.postgres.PostgresPinServiceConfig",
        "postgres": "nixcas.castore.pins.postgres.PostgresAliasPinServiceConfig",
        "grpc": "nixcas.castore.pins.grpc.GrpcPinServiceConfig",
    }
)

KINDS: Final[Mapping[str, Mapping[str, type[ServiceConfig[object]]]]] = {
    "blobservices": BLOB_SERVICES,
    "directoryservices": DIRECTORY_SERVICES,
    "pathinfoservices": PATHINFO_SERVICES,
    "pinservices": PIN_SERVICES,
}


def parse_service_url(kind: str, url: str) -> ServiceConfig[object]:
    """The config that ``url`` describes for a service of ``kind`` (``blobservices``, ...)."""
    noun = kind.removesuffix("services") + " service"
    remember_secrets(url)  # hidden from every later log line and error body (nixcas.urls.redacted)
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise ConfigurationError(f"invalid {noun} URL {shown(url)!r}: {e}") from None
    if not parts.scheme:
        raise ConfigurationError(f"invalid {noun} URL {shown(url)!r}: no scheme (e.g. memory://)")
    table = KINDS[kind]
    try:
        backend = table.get(url_tag(parts))
    except MissingExtra as e:
        raise MissingExtra(f"{noun} URL {shown(url)!r}: {e}") from None
    if backend is None:
        known = ", ".join(sorted(table))
        raise ConfigurationError(f"invalid {noun} URL {shown(url)!r}: unknown type {url_tag(parts)!r} (known: {known})")
    config = backend.from_url(parts)
    check_references(config, repr(shown(parts)))
    return config


def check_references(config: ServiceConfig[object], where: str) -> None:
    """Refuse empty references and parse those that are URLs, so a bad one fails now, not when built."""
    for name, kind, ref in config.referenced():
        if not ref:
            raise ConfigurationError(f"{where}: {name} must name a service (a composition entry or a URL)")
        if "://" in ref:
            try:
                parse_service_url(kind, ref)
            except ConfigurationError as e:
                raise ConfigurationError(f"{where}: {name}: {e}") from None

"""``objectstore+<s3|gs|az|memory|http(s)>://…`` — blobs in object storage, in the snix layout.

The store itself is :class:`~nixcas.castore.objectstore.remoteblobs.ObjectStoreBlobService`
(the layout, once, in :mod:`nixcas.castore.objectstore`); this module is its
configuration.  ``objectstore+file://`` is the same layout on a local disk and
has its own backend (:mod:`.local`); :class:`ObjectStoreBlobServiceConfig`
builds either, by the URL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Self
from urllib.parse import SplitResult, urlsplit, urlunsplit

from nixcas.castore.blob.base import BlobService
from nixcas.castore.blob.chunking import AVG_CHUNK_SIZE, check_avg_chunk_size
from nixcas.castore.objectstore.client import open_object_store
from nixcas.castore.objectstore.options import (
    check_client_options,
    parse_objectstore_url,
    refresh_after_option,
    zstd_level_option,
)
from nixcas.castore.objectstore.remoteblobs import ObjectStoreBlobService
from nixcas.config import Resolver, ServiceConfig
from nixcas.errors import ConfigurationError
from nixcas.urls import query_options, shown

__all__ = ["ObjectStoreBlobService", "ObjectStoreBlobServiceConfig"]

_BLOB_OPTIONS = {"zstd_level", "refresh_after"}


@dataclass(frozen=True)
class ObjectStoreBlobServiceConfig(ServiceConfig[BlobService]):
    """``objectstore+<url>``: ``file:///abs/path`` (local disk) or any obstore URL.

    Composition: ``type = "objectstore"``, ``object_store_url = "s3://bucket/prefix"``,
    ``object_store_options = { endpoint = "…", region = "…", … }``, ``avg_chunk_size``
    (the tvix/snix field names; the URL form always uses the default chunk size).
    Options of our own: ``zstd_level``, ``refresh_after`` and
    :data:`~nixcas.castore.objectstore.CLIENT_OPTIONS`; all others are obstore's.
    """

    type_tag: ClassVar[str] = "objectstore"
    object_store_url: str
    object_store_options: dict[str, str] = field(default_factory=dict, repr=False)  # may hold credentials
    avg_chunk_size: int = AVG_CHUNK_SIZE

    @classmethod
    def from_url(cls, url: SplitResult) -> Self:
        inner = url.scheme.partition("+")[2]
        if inner == "file":
            options = query_options(url, {"zstd_level"})
            if url.path and not url.path.startswith("/"):
                raise ConfigurationError(f"{shown(url)!r}: needs an absolute path (write objectstore+file:///abs/path)")
            config = cls(urlunsplit((inner, url.netloc, url.path, "", "")), options)
        else:
            bare, options = parse_objectstore_url(url)
            config = cls(bare, options)
        config.validate(repr(shown(url)))
        return config

    def _local(self) -> ServiceConfig[BlobService]:
        from nixcas.castore.blob.local import LocalBlobServiceConfig

        return LocalBlobServiceConfig(self.object_store_url, self.object_store_options, self.avg_chunk_size)

    def validate(self, where: str) -> None:
        if urlsplit(self.object_store_url).scheme == "file":
            self._local().validate(where)
            return
        check_avg_chunk_size(self.avg_chunk_size, where)
        zstd_level_option(self.object_store_options, where)
        refresh_after_option(self.object_store_options, where)
        client = {k: v for k, v in self.object_store_options.items() if k not in _BLOB_OPTIONS}
        check_client_options(self.object_store_url, client, where)

    async def build(self, resolver: Resolver) -> BlobService:
        if urlsplit(self.object_store_url).scheme == "file":
            return await self._local().build(resolver)
        where = repr(shown(self.object_store_url))
        options = self.object_store_options
        client = {k: v for k, v in options.items() if k not in _BLOB_OPTIONS}
        store = await open_object_store(self.object_store_url, client)
        return ObjectStoreBlobService(
            store,
            avg_chunk_size=self.avg_chunk_size,
            zstd_level=zstd_level_option(options, where),
            refresh_after=refresh_after_option(options, where),
        )

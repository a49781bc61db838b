"""``objectstore+file:///abs/path`` — the snix object layout on a local filesystem.

The store itself is :class:`~nixcas.castore.objectstore.diskblobs.LocalBlobService`
over the local-disk adapter (the layout, once, in :mod:`nixcas.castore.objectstore`);
this module is its configuration.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import ClassVar, Self
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

from nixcas.castore.blob.base import BlobService
from nixcas.castore.blob.chunking import AVG_CHUNK_SIZE, check_avg_chunk_size
from nixcas.castore.objectstore.codec import raw_blocks
from nixcas.castore.objectstore.diskblobs import LocalBlobService, _Slow
from nixcas.castore.objectstore.layout import ZSTD_LEVEL
from nixcas.config import Resolver, ServiceConfig
from nixcas.errors import ConfigurationError
from nixcas.urls import query_options, shown

__all__ = ["LocalBlobService", "LocalBlobServiceConfig", "_Slow", "raw_blocks"]

_OPTIONS = {"zstd_level"}


@dataclass(frozen=True)
class LocalBlobServiceConfig(ServiceConfig[BlobService]):
    """``objectstore+file:///abs/path[?zstd_level=N]``.

    Composition: ``type = "objectstore"``, ``object_store_url = "file:///abs/path"``,
    ``object_store_options = { zstd_level = "3" }``, ``avg_chunk_size = 262144`` (the
    tvix/snix field names; as in snix, the URL form always uses the default chunk size).
    """

    type_tag: ClassVar[str] = "objectstore"
    object_store_url: str
    object_store_options: dict[str, str] = field(default_factory=dict)
    avg_chunk_size: int = AVG_CHUNK_SIZE

    @classmethod
    def from_url(cls, url: SplitResult) -> Self:
        inner = url.scheme.partition("+")[2]
        options = query_options(url, _OPTIONS if inner == "file" else set())
        if url.path and not url.path.startswith("/"):
            raise ConfigurationError(f"{shown(url)!r}: needs an absolute path (write objectstore+file:///abs/path)")
        bare = urlunsplit((inner, url.netloc, url.path, "", ""))
        config = cls(bare, options)
        config.validate(repr(shown(url)))
        return config

    def validate(self, where: str) -> None:
        url = urlsplit(self.object_store_url)
        if url.scheme != "file":
            raise ConfigurationError(
                f"{where}: unsupported object store {url.scheme or '(none)'!r} (supported: objectstore+file)"
            )
        if url.netloc:
            raise ConfigurationError(f"{where}: file URLs take no host (write file:///abs/path)")
        if url.query or url.fragment:
            raise ConfigurationError(f"{where}: options go into object_store_options, not the URL")
        path = unquote(url.path)
        if not path.startswith("/") or path.rstrip("/") == "":
            raise ConfigurationError(f"{where}: needs an absolute path other than /")
        unknown = set(self.object_store_options) - _OPTIONS
        if unknown:
            raise ConfigurationError(f"{where}: unknown option {min(unknown)!r} (known: {', '.join(sorted(_OPTIONS))})")
        if "zstd_level" in self.object_store_options:
            try:
                level = int(self.object_store_options["zstd_level"])
            except ValueError:
                raise ConfigurationError(f"{where}: zstd_level must be an integer") from None
            if not -7 <= level <= 22:
                raise ConfigurationError(f"{where}: zstd_level must be between -7 and 22")
        check_avg_chunk_size(self.avg_chunk_size, where)

    async def build(self, resolver: Resolver) -> BlobService:
        path = unquote(urlsplit(self.object_store_url).path)
        level = int(self.object_store_options.get("zstd_level", ZSTD_LEVEL))
        return await asyncio.to_thread(LocalBlobService, path, zstd_level=level, avg_chunk_size=self.avg_chunk_size)

"""The snix object layout, once, over a small object-I/O protocol (object storage or a local disk).

Shared by the object-store blob and directory backends (``castore/blob/local.py``,
``castore/blob/objectstore.py``, ``castore/dirs/objectstore.py``, which keep only
their configuration and service class):

* :mod:`.layout` — keys (``blobs/b3/…``, ``chunks/b3/…``, ``bao/b3/…``, ``dirs/b3/…``),
  the blob index encoding, the one-object-per-small-blob rule, how a blob is cut;
* :mod:`.codec` — chunk encoding: zstd frames, bounded decompression, verification;
* :mod:`.io` — the object-I/O protocol (:class:`ObjectIO`) the layout is written against;
* :mod:`.client` — its obstore adapter (:class:`ObjectStore`: request window, counters,
  tracing, errors) and :mod:`.options` (URLs and options);
* :mod:`.disk` — its local-disk adapter (:class:`~.disk.DiskObjects`: temp file and
  rename, shared empty indexes, ages refreshed in place, deletions that can be undone);
* :mod:`.presence` — batched existence checks and the ``refresh_after`` rule;
* :mod:`.scan` — enumerating stored objects for garbage collection (both adapters);
* :mod:`.readers` — the verified single-object read, chunked and legacy readers;
* :mod:`.writers` — the streaming blob writers (buffer, cut, store chunks, index last);
* :mod:`.diskblobs`, :mod:`.bulk`, :mod:`.remoteblobs` — the blob stores on each adapter.

The names below are the package's public interface, loaded on first use (the local-disk store
loads neither the obstore client nor its options).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nixcas.castore.objectstore.client import ObjectStore, create_bucket, create_bucket_sync, open_object_store
    from nixcas.castore.objectstore.io import ObjectIO, ObjectMeta
    from nixcas.castore.objectstore.options import (
        CLIENT_OPTIONS,
        REFRESH_AFTER,
        SCHEMES,
        check_client_options,
        parse_objectstore_url,
        refresh_after_option,
        zstd_level_option,
    )
    from nixcas.castore.objectstore.presence import ObjectStoreBacked, Presence, key_range

_HOMES = {
    "ObjectStore": "client",
    "create_bucket": "client",
    "create_bucket_sync": "client",
    "open_object_store": "client",
    "ObjectIO": "io",
    "ObjectMeta": "io",
    "CLIENT_OPTIONS": "options",
    "REFRESH_AFTER": "options",
    "SCHEMES": "options",
    "check_client_options": "options",
    "parse_objectstore_url": "options",
    "refresh_after_option": "options",
    "zstd_level_option": "options",
    "ObjectStoreBacked": "presence",
    "Presence": "presence",
    "key_range": "presence",
}


def __getattr__(name: str) -> Any:
    """The public names, each loaded from its module on first use (a local store never loads the obstore client)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{home}"), name)


__all__ = [
    "CLIENT_OPTIONS",
    "REFRESH_AFTER",
    "SCHEMES",
    "ObjectIO",
    "ObjectMeta",
    "ObjectStore",
    "ObjectStoreBacked",
    "Presence",
    "check_client_options",
    "create_bucket",
    "create_bucket_sync",
    "key_range",
    "open_object_store",
    "parse_objectstore_url",
    "refresh_after_option",
    "zstd_level_option",
]

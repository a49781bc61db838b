"""NAR (Nix ARchive) support: wire format, rendering castore nodes, seeking, parsing and import.

* :func:`render_nar` / :func:`write_nar` / :func:`nar_size_sha256` stream a
  castore node as a NAR, prefetching blobs in a bounded window;
* :class:`NarSource` is the NAR of one root node for every reader of NARs
  (size, presence, a verified stream, byte ranges, SHA-256, a dump to a file);
* :class:`SeekableNar` reads a node's NAR at arbitrary offsets;
* :class:`NarCalculationService` / :class:`SimpleNarCalculationService`
  compute (and cache) NAR size and SHA-256 per node;
* :func:`parse_nar` is a strict streaming parser; :func:`ingest_nar` imports
  a NAR into castore atomically.

The names are loaded on first use (module ``__getattr__``): importing one
submodule (say :mod:`nixcas.store.nar.hashing`) does not load the others.
"""

from __future__ import annotations

from nixcas._lazy import lazy_exports

TYPE_CHECKING = False  # not typing's: `nixcas dump-path` loads this package and nothing of typing
if TYPE_CHECKING:
    from nixcas.store.nar.hashing import NarCalculationService, SimpleNarCalculationService
    from nixcas.store.nar.ingest import ingest_nar, ingest_nar_bytes
    from nixcas.store.nar.parser import (
        AsyncByteSource,
        BytesSource,
        IterableSource,
        NarDirectory,
        NarDirectoryEnd,
        NarEvent,
        NarFile,
        NarFileChunk,
        NarSymlink,
        as_source,
        parse_nar,
    )
    from nixcas.store.nar.plan import BlobSizeMismatch, NarContentNotFound
    from nixcas.store.nar.render import nar_size, nar_size_sha256, render_nar, write_nar
    from nixcas.store.nar.seekable import SeekableNar
    from nixcas.store.nar.source import NarSource

_EXPORTS = {
    "AsyncByteSource": "parser",
    "BlobSizeMismatch": "plan",
    "BytesSource": "parser",
    "IterableSource": "parser",
    "NarCalculationService": "hashing",
    "NarContentNotFound": "plan",
    "NarDirectory": "parser",
    "NarDirectoryEnd": "parser",
    "NarEvent": "parser",
    "NarFile": "parser",
    "NarFileChunk": "parser",
    "NarSource": "source",
    "NarSymlink": "parser",
    "SeekableNar": "seekable",
    "SimpleNarCalculationService": "hashing",
    "as_source": "parser",
    "ingest_nar": "ingest",
    "ingest_nar_bytes": "ingest",
    "nar_size": "render",
    "nar_size_sha256": "render",
    "parse_nar": "parser",
    "render_nar": "render",
    "write_nar": "render",
}

__all__ = [
    "AsyncByteSource",
    "BlobSizeMismatch",
    "BytesSource",
    "IterableSource",
    "NarCalculationService",
    "NarContentNotFound",
    "NarDirectory",
    "NarDirectoryEnd",
    "NarEvent",
    "NarFile",
    "NarFileChunk",
    "NarSource",
    "NarSymlink",
    "SeekableNar",
    "SimpleNarCalculationService",
    "as_source",
    "ingest_nar",
    "ingest_nar_bytes",
    "nar_size",
    "nar_size_sha256",
    "parse_nar",
    "render_nar",
    "write_nar",
]


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS, relative=True)

"""NAR (Nix ARchive) support: wire format, rendering castore nodes, seeking, parsing and import.

* :func:`render_nar` / :func:`write_nar` / :func:`nar_size_sha256` stream a
  castore node as a NAR, prefetching blobs in a bounded window;
* :class:`SeekableNar` reads a node's NAR at arbitrary offsets;
* :class:`NarCalculationService` / :class:`SimpleNarCalculationService`
  compute (and cache) NAR size and SHA-256 per node;
* :func:`parse_nar` is a strict streaming parser; :func:`ingest_nar` imports
  a NAR into castore atomically.
"""

from __future__ import annotations

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

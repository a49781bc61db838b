"""What the store did, counted in this process without any dependency; servers export it as metrics.

Library code (backends, GC, the bridge) calls :func:`count`; one dict update,
cheap enough for every chunk.  :mod:`nixcas.ops.metrics` turns the counts into
the Prometheus counters documented in :data:`COUNTERS` at each scrape; a
command that serves no metrics just never reads them.
"""

from __future__ import annotations

from typing import Final

__all__ = ["COUNTERS", "count", "snapshot"]

COUNTERS: Final[dict[str, tuple[str, tuple[str, ...]]]] = {
    "nixcas_cache_lookups": (
        "Reads a combined/cache service answered from near (result=hit) or had to ask far for (result=miss).",
        ("service", "result"),
    ),
    "nixcas_upstream_fetches": (
        "Reads a combined/cache service sent to its far service, by outcome (ok, failed).",
        ("service", "outcome"),
    ),
    "nixcas_blobs_written": ("Blobs committed to a blob store, by backend.", ("backend",)),
    "nixcas_blob_bytes_written": ("Bytes of the blobs committed to a blob store, by backend.", ("backend",)),
    "nixcas_chunks_written": ("Chunks stored (each new chunk once), by backend.", ("backend",)),
    "nixcas_bridge_uploads": (
        "NAR and narinfo uploads to nar-bridge, by kind (nar, narinfo) and result (accepted, refused).",
        ("kind", "result"),
    ),
    "nixcas_gc_runs": ("Garbage collections run (mark and sweep).", ()),
    "nixcas_gc_freed_bytes": ("Bytes freed by garbage collection.", ()),
}
"""Counter name (``_total`` is appended when exported) -> (help, label names)."""

_counts: dict[tuple[str, tuple[str, ...]], float] = {}


def count(name: str, *labels: str, n: float = 1) -> None:
    """Add ``n`` to counter ``name`` (one of :data:`COUNTERS`) for ``labels`` (its label values, in order)."""
    key = (name, labels)
    _counts[key] = _counts.get(key, 0) + n


def snapshot() -> dict[tuple[str, tuple[str, ...]], float]:
    """Every count so far (a copy)."""
    return dict(_counts)

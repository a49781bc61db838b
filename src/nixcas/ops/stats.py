"""What the store did, counted in this process without any dependency; servers export it as metrics.

Library code (backends, GC, the bridge) calls :func:`count`; one dict update,
cheap enough for every chunk.  :mod:`nixcas.ops.metrics` turns the counts into
the Prometheus counters documented in :data:`COUNTERS` at each scrape; a
command that serves no metrics just never reads them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from typing import Final

__all__ = ["COUNTERS", "count", "lookup", "snapshot", "upstream", "written"]

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
_lock = threading.Lock()  # backends count from worker threads too


def count(name: str, *labels: str, n: float = 1) -> None:
    """Add ``n`` to counter ``name`` (one of :data:`COUNTERS`) for ``labels`` (its label values, in order)."""
    key = (name, labels)
    with _lock:
        _counts[key] = _counts.get(key, 0) + n


def snapshot() -> dict[tuple[str, tuple[str, ...]], float]:
    """Every count so far (a copy)."""
    with _lock:
        return dict(_counts)


@contextlib.contextmanager
def upstream(service: str) -> Iterator[None]:
    """Count the far-side read inside as an upstream fetch of ``service``: ``ok``, or ``failed`` if it raised."""
    try:
        yield
    except Exception:
        count("nixcas_upstream_fetches", service, "failed")
        raise
    count("nixcas_upstream_fetches", service, "ok")


def lookup(service: str, hit: bool) -> None:
    """Count a combined/cache read answered from near (``hit``) or not."""
    count("nixcas_cache_lookups", service, "hit" if hit else "miss")


def written(backend: str, blobs: Iterable[int]) -> None:
    """Count committed blobs of these sizes in ``backend``."""
    sizes = list(blobs)
    count("nixcas_blobs_written", backend, n=len(sizes))
    count("nixcas_blob_bytes_written", backend, n=sum(sizes))

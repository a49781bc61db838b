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
from pathlib import Path
from typing import Final

__all__ = ["COUNTERS", "GC_RECORD", "count", "lookup", "read_gc", "record_gc", "snapshot", "upstream", "written"]

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


GC_RECORD: Final = "gc-stats.json"
"""In the store directory: what ``nixcas gc`` runs on this store did (for the servers' metrics)."""


def record_gc(store_root: Path, freed_bytes: int, when: float) -> None:
    """Add a collection that freed ``freed_bytes`` at ``when`` to the store's :data:`GC_RECORD` (atomically)."""
    import json
    import os

    previous = read_gc(store_root)
    record = {
        "runs": previous.get("runs", 0) + 1,
        "freed_bytes": previous.get("freed_bytes", 0) + freed_bytes,
        "last_run_timestamp": when,
        "last_freed_bytes": freed_bytes,
    }
    path = store_root / GC_RECORD
    tmp = path.with_name(f".{GC_RECORD}.{os.getpid()}")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def read_gc(store_root: Path) -> dict[str, float]:
    """The store's :data:`GC_RECORD` (empty if no collection ran, or it is unreadable)."""
    import json

    try:
        data = json.loads((store_root / GC_RECORD).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: float(v) for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)}

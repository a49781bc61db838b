"""Reading a run of small ``packed://`` blobs at once (:class:`~nixcas.castore.blob.base.BulkReads`).

``nixcas dump-path`` and exports read the small files of a tree as runs: one
SQLite lookup for the whole run, then the pack bytes in offset order, nearby
blobs with one ``preadv``, every blob checked against its size and BLAKE3.
"""

from __future__ import annotations

import operator
import sqlite3
from collections.abc import Callable, Sequence

import blake3
import zstandard

from nixcas.castore.blob.packfile import CODEC_ZSTD

__all__ = ["RUN_GAP", "read_run"]

RUN_GAP = 64 << 10
"""Blobs of one run this close in a pack are read with one ``preadv`` (the gap too)."""

_RUN_SELECT = "SELECT digest, size, codec, pack, offset, length FROM blobs WHERE digest IN ({})"
_RUN_QUERY = 900
"""Digests per query of a run (below SQLite's oldest limit of 999 parameters)."""
_PACK_OFFSET = operator.itemgetter(3, 4)


def read_run(
    db: sqlite3.Connection,
    wanted: Sequence[tuple[bytes, int]],
    buffer: memoryview,
    preadv: Callable[[int, memoryview, int], int],
    decompressor: Callable[[], zstandard.ZstdDecompressor],
) -> list[bytes | memoryview] | None:
    """The blobs ``wanted`` (digest, size), each verified, if every one is a pack row; ``None`` otherwise.

    One indexed lookup for the run, then its pack bytes in offset order, blobs
    at most :data:`RUN_GAP` apart read with one ``preadv(pack, into, offset)``
    (the gap too) into ``buffer`` (a larger one is allocated if it is too small).
    ``None`` also for anything unexpected: the caller then reads blob by blob,
    which reports it.
    """
    if not wanted:
        return []
    keys = list(dict.fromkeys(raw for raw, _ in wanted))
    rows: list[tuple[bytes, int, int, int, int, int]] = []
    for i in range(0, len(keys), _RUN_QUERY):
        batch = keys[i : i + _RUN_QUERY]
        rows += db.execute(_RUN_SELECT.format(",".join("?" * len(batch))), batch).fetchall()
    if len(rows) != len(keys):
        return None  # not all in packs (or missing): the caller reads them blob by blob
    rows.sort(key=_PACK_OFFSET)
    # Read ranges (pack, start, end, place in buffer): blobs at most RUN_GAP apart share one.
    ranges: list[tuple[int, int, int, int]] = []
    placed: list[int] = []  # each row's place in the buffer
    room = len(buffer)
    at = 0  # the buffer's end so far
    pack_id = start = end = -1
    for _, size, _, pack, offset, length in rows:
        if length > size + (size >> 8) + 1024:  # more than size bytes can compress to
            return None
        if pack == pack_id and end <= offset <= end + RUN_GAP and at + offset + length - end <= room:
            at += offset - end
            placed.append(at)
            at += length
            end = offset + length
            continue
        if pack_id >= 0:
            ranges.append((pack_id, start, end, at - (end - start)))
        pack_id, start, end = pack, offset, offset + length
        placed.append(at)
        at += length
    ranges.append((pack_id, start, end, at - (end - start)))
    view = buffer if at <= room else memoryview(bytearray(at))
    for pack, start, end, place in ranges:
        if preadv(pack, view[place : place + end - start], start) != end - start:
            return None  # the pack file ends early: the per-blob path reports it
    found: dict[bytes, bytes | memoryview] = {}
    hasher = blake3.blake3
    for (raw, size, codec, _, _, length), place in zip(rows, placed, strict=True):
        data: bytes | memoryview = view[place : place + length]
        if codec:
            if codec != CODEC_ZSTD:
                return None
            data = decompressor().decompress(data, max_output_size=size)
        if len(data) != size or hasher(data).digest() != raw:
            return None
        found[raw] = data
    out: list[bytes | memoryview] = []
    for raw, size in wanted:
        data = found[raw]
        if len(data) != size:
            return None
        out.append(data)
    return out

"""Verified byte ranges of a blob from an untrusted blob service (bao).

:func:`read_verified_range` asks the service for the blob's outboard
(``Stat(send_bao)`` over gRPC) unless the caller has one, fetches the chunk
groups covering the range (plus the last group, which proves the length),
checks them against the blob's digest through the outboard, and only then
returns bytes.  When a peer lies the error is a
:class:`~nixcas.castore.bao.BaoMismatch` naming the chunk group (or outboard
node) that failed; nothing it sent is returned.

The groups come from whatever the service offers: when it keeps the blob in
chunks (``Stat`` lists them), only the chunks overlapping the wanted groups
are read (each also checked against its own digest); otherwise the blob is
read from the first wanted group on, skipping what lies between.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Sequence

from nixcas.castore import bao
from nixcas.castore.blob.base import BlobService, ChunkMeta, run_bounded
from nixcas.castore.digest import B3Digest
from nixcas.errors import NotFoundError, StorageError, ValidationError

__all__ = ["read_verified_range"]

FETCH_PARALLEL = 8
"""Chunks fetched at once for one range."""


async def read_verified_range(
    blobs: BlobService, digest: B3Digest, start: int, length: int, *, outboard: bytes | None = None
) -> bytes:
    """Bytes ``[start, start + length)`` of blob ``digest``, verified before anything is returned.

    ``outboard`` (16 KiB groups) is fetched from ``blobs`` when not given;
    it need not be trusted either.  A range past the end of the blob is a
    :class:`~nixcas.errors.ValidationError`; a missing blob a
    :class:`~nixcas.errors.NotFoundError`.
    """
    if start < 0 or length < 0:
        raise ValidationError(f"invalid range: start {start}, length {length}")
    if outboard is None:
        outboard = await blobs.outboard(digest)
        if outboard is None:
            raise NotFoundError(f"blob {digest.hex()} not found")
    size = bao.outboard_size(outboard)
    wanted = bao.groups_for_range(size, start, start + length)
    needed = sorted({*wanted, bao.group_count(size) - 1})
    groups = await _fetch_groups(blobs, digest, size, needed)
    await asyncio.to_thread(bao.verify_groups, digest, outboard, groups)
    if length == 0:
        return b""
    first = wanted.start * bao.GROUP_SIZE
    joined = b"".join(groups[g] for g in wanted)
    return joined[start - first : start - first + length]


async def _fetch_groups(blobs: BlobService, digest: B3Digest, size: int, needed: Sequence[int]) -> dict[int, bytes]:
    spans = {g: bao.group_span(size, g) for g in needed}
    chunks = await blobs.chunks(digest)
    if chunks is None:
        raise NotFoundError(f"blob {digest.hex()} not found")
    if len(chunks) >= 2:
        return await _groups_from_chunks(blobs, digest, size, chunks, spans)
    reader = await blobs.open_raw(digest)  # unverified on purpose: the outboard checks it
    if reader is None:
        raise NotFoundError(f"blob {digest.hex()} not found")
    out: dict[int, bytes] = {}
    async with reader:
        for g, (lo, hi) in spans.items():
            await reader.seek(lo)
            parts: list[bytes] = []
            got = 0
            while got < hi - lo and (data := await reader.read(hi - lo - got)):
                parts.append(data)
                got += len(data)
            out[g] = b"".join(parts)  # a short group fails verification, naming it
    return out


async def _groups_from_chunks(
    blobs: BlobService, digest: B3Digest, size: int, chunks: Sequence[ChunkMeta], spans: dict[int, tuple[int, int]]
) -> dict[int, bytes]:
    starts: list[int] = []
    total = 0
    for c in chunks:
        starts.append(total)
        total += c.size
    if total != size:
        raise StorageError(f"blob {digest.hex()}: the chunk list adds up to {total} bytes, the outboard says {size}")
    wanted: set[int] = set()
    for lo, hi in spans.values():
        first = bisect.bisect_right(starts, lo) - 1
        last = bisect.bisect_left(starts, hi) - 1
        wanted.update(range(first, last + 1))
    fetched: dict[int, bytes] = {}

    async def fetch(i: int) -> None:
        data = await blobs.read_chunk(chunks[i])
        if data is None:
            raise StorageError(f"blob {digest.hex()}: chunk {chunks[i].digest.hex()} not found")
        fetched[i] = data

    await run_bounded(sorted(wanted), fetch, FETCH_PARALLEL)
    out: dict[int, bytes] = {}
    for g, (lo, hi) in spans.items():
        first = bisect.bisect_right(starts, lo) - 1
        last = bisect.bisect_left(starts, hi) - 1
        joined = b"".join(fetched[i] for i in range(first, last + 1))
        out[g] = joined[lo - starts[first] : hi - starts[first]]
    return out

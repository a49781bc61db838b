"""Bao outboards over BLAKE3 chunk groups, verified ranges and bao slices.

A blob's BLAKE3 tree has a 1 KiB chunk at every leaf.  Cut off below
subtrees of ``2**group_log`` chunks (chunk groups: 16 KiB for the default
``group_log`` of 4, as bao-tree / iroh use), what is left is a binary tree
whose leaves are chunk groups.  Its **outboard** is::

    8 bytes   the blob's length, unsigned little-endian
    64 bytes  per parent node, in pre-order (node, then its left subtree, then its right):
              the left child's 32-byte chaining value, then the right child's

A blob of ``n`` groups (``n = max(1, ceil(len / group_size))``) has ``n - 1``
parents, so the outboard is ``8 + 64·(n-1)`` bytes: 0.39 % of the blob at
16 KiB groups.  The left subtree of a node always holds the largest power of
two of groups that is smaller than the node's group count (the BLAKE3 tree
shape), and the root node's chaining value computed with the ROOT flag is the
blob's BLAKE3 digest.  With ``group_log = 0`` this is exactly the outboard
format of the ``bao`` tool, which the tests check against its vectors.

:class:`OutboardEncoder` builds an outboard in one streaming pass (bounded
memory: one batch of input plus 32 bytes per group).  :func:`verify_groups`
checks chunk groups fetched from anywhere against a root digest through an
outboard before anything is returned; :func:`extract_slice` and
:func:`verify_slice` speak bao's slice format.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Mapping
from typing import Final

import blake3
import numpy as np

from nixcas.castore import blake3_tree as bt
from nixcas.castore.digest import B3Digest
from nixcas.errors import ChecksumMismatch, StorageError, ValidationError

__all__ = [
    "GROUP_LOG",
    "GROUP_SIZE",
    "HEADER_LEN",
    "PARENT_LEN",
    "BaoMismatch",
    "OutboardEncoder",
    "check_outboard",
    "encode_outboard",
    "extract_slice",
    "group_count",
    "groups_for_range",
    "outboard_len",
    "outboard_size",
    "slice_span",
    "verify_groups",
    "verify_slice",
]

GROUP_LOG: Final = 4
"""Chunk groups of 2**4 BLAKE3 chunks = 16 KiB: the outboards nixcas serves (``Stat.bao``)."""
GROUP_SIZE: Final = 1024 << GROUP_LOG
"""Bytes per chunk group (16 KiB)."""
HEADER_LEN: Final = 8
PARENT_LEN: Final = 64
_BATCH_GROUP_BYTES: Final = 4 << 20
"""Input hashed per NumPy batch (fastest on this machine; a multiple of every group size used)."""


class BaoMismatch(ChecksumMismatch):
    """Data or outboard does not verify against the root digest; says which chunk group or node failed."""

    def __init__(self, what: str, expected: object, got: object, *, group: int | None = None) -> None:
        super().__init__(what, expected, got)
        self.group = group


def group_count(size: int, group_log: int = GROUP_LOG) -> int:
    """Chunk groups of a blob of ``size`` bytes (at least one, even when empty)."""
    group_size = bt.CHUNK_LEN << group_log
    return max(1, -(-size // group_size))


def outboard_len(size: int, group_log: int = GROUP_LOG) -> int:
    """Length of the outboard of a blob of ``size`` bytes."""
    return HEADER_LEN + PARENT_LEN * (group_count(size, group_log) - 1)


def _split(groups: int) -> int:
    """Groups in the left subtree of a node over ``groups`` (≥ 2) groups."""
    return 1 << ((groups - 1).bit_length() - 1)


def _group_cvs_of_whole_groups(data: memoryview, first_chunk: int, group_log: int) -> bt.Words:
    """CVs of whole groups (``len(data)`` a multiple of the group size), ``(8, G)``."""
    cvs = bt.chunk_cvs(data, first_chunk)
    for _ in range(group_log):  # groups are aligned, so pairing neighbours stays inside a group
        cvs = bt.parent_cvs(cvs[:, 0::2], cvs[:, 1::2])
    return cvs


def _group_cv(data: memoryview, group: int, group_log: int) -> bt.Words:
    """The (non-root) CV of one group of 1..group_size bytes (the last one may be short), ``(8, 1)``."""
    first_chunk = group << group_log
    full = len(data) // bt.CHUNK_LEN * bt.CHUNK_LEN
    parts = []
    if full:
        parts.append(bt.chunk_cvs(data[:full], first_chunk))
    if full < len(data) or not full:
        parts.append(bt.partial_chunk_cv(data[full:], first_chunk + full // bt.CHUNK_LEN))
    return bt.merge_subtree(np.concatenate(parts, axis=1))


class OutboardEncoder:
    """Builds an outboard in one pass: :meth:`update` with the blob's bytes, then :meth:`finish`."""

    def __init__(self, group_log: int = GROUP_LOG) -> None:
        self._group_log = group_log
        self._group_size = bt.CHUNK_LEN << group_log
        self._batch = max(self._group_size, _BATCH_GROUP_BYTES // self._group_size * self._group_size)
        self._buffer = bytearray()
        self._groups_done = 0
        self._cvs: list[bt.Words] = []
        self._size = 0

    def update(self, data: bytes | memoryview) -> None:
        self._size += len(data)
        self._buffer += data
        if len(self._buffer) > self._batch:
            # keep at least one byte back: the last group must be hashed knowing it is the last
            whole = (len(self._buffer) - 1) // self._group_size * self._group_size
            self._hash_whole(memoryview(self._buffer)[:whole])
            del self._buffer[:whole]

    def _hash_whole(self, view: memoryview) -> None:
        for start in range(0, len(view), self._batch):
            part = view[start : start + self._batch]
            self._cvs.append(_group_cvs_of_whole_groups(part, self._groups_done << self._group_log, self._group_log))
            self._groups_done += len(part) // self._group_size

    def finish(self) -> bytes:
        """The outboard (the encoder cannot be used afterwards)."""
        view = memoryview(self._buffer)
        if self._groups_done == 0 and len(view) <= self._group_size:
            return self._size.to_bytes(HEADER_LEN, "little")  # one group: no parents
        whole = (len(view) - 1) // self._group_size * self._group_size
        if whole:
            self._hash_whole(view[:whole])
        self._cvs.append(_group_cv(view[whole:], self._groups_done, self._group_log))
        del view
        self._buffer = bytearray()
        cvs = np.concatenate(self._cvs, axis=1)
        self._cvs = []
        return b"".join(_preorder_outboard(self._size, cvs))


def _levels(cvs: bt.Words) -> list[bytes]:
    """Per tree level above the groups, the CVs of its nodes as concatenated 32-byte values."""
    levels = [np.ascontiguousarray(cvs.T, dtype="<u4").tobytes()]
    while cvs.shape[1] > 1:
        pairs = cvs.shape[1] // 2
        merged = bt.parent_cvs(cvs[:, 0 : 2 * pairs : 2], cvs[:, 1 : 2 * pairs : 2])
        cvs = np.concatenate([merged, cvs[:, 2 * pairs :]], axis=1) if cvs.shape[1] % 2 else merged
        levels.append(np.ascontiguousarray(cvs.T, dtype="<u4").tobytes())
    return levels


def _preorder_outboard(size: int, group_cvs: bt.Words) -> Iterator[bytes]:
    levels = _levels(group_cvs)

    def cv(start: int, count: int) -> bytes:
        level = (count - 1).bit_length()  # ceil(log2(count)): the node over [start, start + count)
        i = start >> level
        return levels[level][32 * i : 32 * i + 32]

    yield size.to_bytes(HEADER_LEN, "little")
    stack = [(0, group_cvs.shape[1])]
    while stack:
        start, count = stack.pop()
        if count < 2:
            continue
        split = _split(count)
        yield cv(start, split) + cv(start + split, count - split)
        stack.append((start + split, count - split))
        stack.append((start, split))


def encode_outboard(data: bytes | memoryview, group_log: int = GROUP_LOG) -> bytes:
    """The outboard of ``data`` held in memory."""
    encoder = OutboardEncoder(group_log)
    encoder.update(data)
    return encoder.finish()


# -- verification --------------------------------------------------------------------------------


def _parse_header(outboard: bytes, group_log: int) -> tuple[int, int]:
    """(size, groups), checking the outboard is exactly as long as that size needs."""
    if len(outboard) < HEADER_LEN:
        raise StorageError(f"outboard of {len(outboard)} bytes is truncated: no 8-byte length header")
    size = int.from_bytes(outboard[:HEADER_LEN], "little")
    want = outboard_len(size, group_log)
    if len(outboard) != want:
        what = "truncated" if len(outboard) < want else "too long"
        raise StorageError(f"outboard is {what}: {len(outboard)} bytes, a {size}-byte blob needs {want}")
    return size, group_count(size, group_log)


def outboard_size(outboard: bytes, group_log: int = GROUP_LOG) -> int:
    """The blob length an outboard states, once its length is checked against it."""
    return _parse_header(outboard, group_log)[0]


def groups_for_range(size: int, start: int, end: int, group_log: int = GROUP_LOG) -> range:
    """The chunk groups a verified read of bytes ``[start, end)`` fetches: those covering it, plus the last.

    The last group is always included: it is what proves the length the
    outboard claims (as bao does for a seek past the end).
    """
    if start < 0 or end < start:
        raise ValidationError(f"invalid range {start}..{end}")
    if end > size:
        raise ValidationError(f"range {start}..{end} is past the end of the {size}-byte blob")
    group_size = bt.CHUNK_LEN << group_log
    return range(start // group_size, max(start // group_size + 1, -(-end // group_size)))


def group_span(size: int, group: int, group_log: int = GROUP_LOG) -> tuple[int, int]:
    """Byte range ``[start, end)`` of a chunk group."""
    group_size = bt.CHUNK_LEN << group_log
    return group * group_size, min(size, (group + 1) * group_size)


def _group_cv_bytes(groups: Mapping[int, bytes], group_log: int) -> dict[int, bytes]:
    """The (non-root) CV of every given group, whole groups hashed together in batches."""
    group_size = bt.CHUNK_LEN << group_log
    out: dict[int, bytes] = {}
    whole = [g for g in sorted(groups) if len(groups[g]) == group_size]
    per_batch = max(1, _BATCH_GROUP_BYTES // group_size)
    offsets = np.arange(1 << group_log, dtype=np.uint64)
    for i in range(0, len(whole), per_batch):
        batch = whole[i : i + per_batch]
        counters = (np.array(batch, dtype=np.uint64)[:, None] * np.uint64(1 << group_log) + offsets).reshape(-1)
        cvs = bt.chunk_cvs(b"".join(groups[g] for g in batch), counters)
        for _ in range(group_log):
            cvs = bt.parent_cvs(cvs[:, 0::2], cvs[:, 1::2])
        raw = np.ascontiguousarray(cvs.T, dtype="<u4").tobytes()
        out.update((g, raw[32 * k : 32 * k + 32]) for k, g in enumerate(batch))
    for g in groups:
        if g not in out:
            out[g] = bt.words_to_bytes(_group_cv(memoryview(groups[g]), g, group_log))
    return out


def verify_groups(root: B3Digest, outboard: bytes, groups: Mapping[int, bytes], group_log: int = GROUP_LOG) -> int:
    """Check chunk groups (index → bytes) against ``root`` through ``outboard``; return the blob size.

    Walks from the root to every given group, checking each parent node of
    the outboard it passes against the chaining value its parent announced
    (the root node against ``root`` itself) and each group's bytes against
    the chaining value of its leaf.  The first failure in that (pre-)order
    raises :class:`BaoMismatch` naming the outboard node or the chunk group;
    a group of the wrong length is a mismatch too.  ``groups`` must include
    the last group (see :func:`groups_for_range`).  Hashing is batched: all
    visited nodes in one NumPy pass, all whole groups in another.
    """
    size, count = _parse_header(outboard, group_log)
    if count - 1 not in groups:
        raise ValidationError("verify_groups: the last chunk group must be included (it proves the length)")
    for g, data in groups.items():
        if not 0 <= g < count:
            raise ValidationError(f"verify_groups: chunk group {g} is past the {count} groups of the blob")
        lo, hi = group_span(size, g, group_log)
        if len(data) != hi - lo:
            raise BaoMismatch(f"chunk group {g} (bytes {lo}..{hi})", f"{hi - lo} bytes", f"{len(data)} bytes", group=g)
    if count == 1:
        got = blake3.blake3(groups[0]).digest()
        if got != root:
            raise BaoMismatch("chunk group 0 (the whole blob)", root.hex(), got.hex(), group=0)
        return size
    wanted = sorted(groups)
    # Walk once to list what is visited: (node index or -1-group, first group, group count, expected CV).
    visits: list[tuple[int, int, int, bytes]] = []
    stack: list[tuple[int, int, bytes, int]] = [(0, count, bytes(root), 0)]
    while stack:
        start, n, expected, index = stack.pop()
        if n == 1:
            visits.append((-1 - start, start, 1, expected))
            continue
        visits.append((index, start, n, expected))
        node = outboard[HEADER_LEN + PARENT_LEN * index : HEADER_LEN + PARENT_LEN * (index + 1)]
        split = _split(n)
        if _any_in(wanted, start + split, start + n):
            stack.append((start + split, n - split, node[32:], index + split))
        if _any_in(wanted, start, start + split):
            stack.append((start, split, node[:32], index + 1))
    inner = [v[0] for v in visits if v[0] > 0]
    node_cvs: dict[int, bytes] = {0: _root_cv(_node_words(outboard, [0]))}
    if inner:
        words = _node_words(outboard, inner)
        raw = np.ascontiguousarray(bt.parent_cvs(words[:8], words[8:]).T, dtype="<u4").tobytes()
        node_cvs.update((index, raw[32 * k : 32 * k + 32]) for k, index in enumerate(inner))
    group_cvs = _group_cv_bytes(groups, group_log)
    for index, start, n, expected in visits:
        if index >= 0:
            if node_cvs[index] != expected:
                raise BaoMismatch(
                    f"outboard parent node {index} (groups {start}..{start + n})", expected.hex(), node_cvs[index].hex()
                )
        elif group_cvs[start] != expected:
            lo, hi = group_span(size, start, group_log)
            raise BaoMismatch(
                f"chunk group {start} (bytes {lo}..{hi})", expected.hex(), group_cvs[start].hex(), group=start
            )
    return size


def check_outboard(root: B3Digest, outboard: bytes, size: int | None, group_log: int = GROUP_LOG) -> None:
    """Check a whole outboard against the blob digest ``root`` (and the blob's ``size`` if known).

    Every parent node is hashed (one NumPy pass) and compared with the chaining
    value its parent announces, the root node (with the ROOT flag) with
    ``root``: so every byte of the tree is checked, without the blob's data.
    The length header binds only the group count that way (the last group's
    length is in the data), hence the comparison with ``size`` when the
    caller knows it.  A mismatch raises :class:`BaoMismatch` naming the node;
    a malformed outboard :class:`StorageError`.
    """
    stated, count = _parse_header(outboard, group_log)
    if size is not None and stated != size:
        raise BaoMismatch("outboard length header", size, stated)
    if count == 1:
        return
    cvs = {0: _root_cv(_node_words(outboard, [0]))}
    if count > 2:
        words = _node_words(outboard, list(range(1, count - 1)))
        raw = np.ascontiguousarray(bt.parent_cvs(words[:8], words[8:]).T, dtype="<u4").tobytes()
        cvs.update((i + 1, raw[32 * i : 32 * i + 32]) for i in range(count - 2))
    stack: list[tuple[int, int, bytes, int]] = [(0, count, bytes(root), 0)]
    while stack:
        start, n, expected, index = stack.pop()
        if cvs[index] != expected:
            raise BaoMismatch(
                f"outboard parent node {index} (groups {start}..{start + n})", expected.hex(), cvs[index].hex()
            )
        node = outboard[HEADER_LEN + PARENT_LEN * index : HEADER_LEN + PARENT_LEN * (index + 1)]
        split = _split(n)
        if n - split > 1:
            stack.append((start + split, n - split, node[32:], index + split))
        if split > 1:
            stack.append((start, split, node[:32], index + 1))


def _node_words(outboard: bytes, indexes: list[int]) -> bt.Words:
    """The 16 message words of the given parent nodes, ``(16, K)``."""
    raw = np.frombuffer(outboard, dtype="<u4", offset=HEADER_LEN).reshape(-1, 16)
    return np.ascontiguousarray(raw[indexes].T, dtype=np.uint32)


def _any_in(sorted_items: list[int], lo: int, hi: int) -> bool:
    i = bisect_left(sorted_items, lo)
    return i < len(sorted_items) and sorted_items[i] < hi


def _root_cv(block: bt.Words) -> bytes:
    """The root node's CV (with the ROOT flag): the blob's digest if the node is right."""
    out = bt.compress(bt._key_words(None, 1), block, 0, bt.BLOCK_LEN, bt.PARENT | bt.ROOT)
    return bt.words_to_bytes(out[0:8])


# -- bao slices ------------------------------------------------------------------------------


def _slice_range(size: int, start: int, length: int) -> tuple[int, int]:
    """bao's rule: an empty range still covers one byte; a start at or past the end covers the last byte."""
    if start >= size:
        start = max(0, size - 1)
    return start, max(start + 1, min(size, start + length))


def slice_span(size: int, start: int, length: int, group_log: int = GROUP_LOG) -> tuple[int, int]:
    """The blob bytes a slice of ``[start, start + length)`` carries: whole groups, ``(first byte, end)``."""
    lo, hi = _slice_range(size, start, length)
    group_size = bt.CHUNK_LEN << group_log
    return lo // group_size * group_size, min(size, -(-hi // group_size) * group_size)


def extract_slice(
    data: bytes | memoryview,
    outboard: bytes,
    start: int,
    length: int,
    group_log: int = GROUP_LOG,
    *,
    data_offset: int = 0,
) -> bytes:
    """The bao slice of ``[start, start + length)``: header, then pre-order the parents and groups on its paths.

    ``data`` holds the blob's bytes from ``data_offset`` on; it must cover
    :func:`slice_span` (the whole blob when ``data_offset`` is 0).
    """
    size, count = _parse_header(outboard, group_log)
    lo, hi = _slice_range(size, start, length)
    group_size = bt.CHUNK_LEN << group_log
    out = [outboard[:HEADER_LEN]]
    stack = [(0, count, 0)]
    while stack:
        first, n, index = stack.pop()
        if not (first * group_size < hi and lo < (first + n) * group_size):
            continue
        if n == 1:
            lo_byte, hi_byte = first * group_size - data_offset, min(size, (first + 1) * group_size) - data_offset
            if lo_byte < 0 or hi_byte > len(data):
                raise ValueError(f"extract_slice: group {first} is outside the data given")
            out.append(bytes(data[lo_byte:hi_byte]))
            continue
        out.append(outboard[HEADER_LEN + PARENT_LEN * index : HEADER_LEN + PARENT_LEN * (index + 1)])
        split = _split(n)
        stack.append((first + split, n - split, index + split))
        stack.append((first, split, index + 1))
    return b"".join(out)


def verify_slice(root: B3Digest, slice_: bytes, start: int, length: int, group_log: int = GROUP_LOG) -> bytes:
    """Decode a bao slice: the verified bytes of ``[start, start + length)`` (clamped to the blob)."""
    if len(slice_) < HEADER_LEN:
        raise StorageError("bao slice is truncated: no 8-byte length header")
    size = int.from_bytes(slice_[:HEADER_LEN], "little")
    count = group_count(size, group_log)
    lo, hi = _slice_range(size, start, length)
    group_size = bt.CHUNK_LEN << group_log
    pos = HEADER_LEN
    groups: dict[int, bytes] = {}

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(slice_):
            raise StorageError(f"bao slice is truncated at byte {len(slice_)}")
        pos += n
        return slice_[pos - n : pos]

    stack: list[tuple[int, int, bytes | None]] = [(0, count, None)]
    while stack:
        first, n, expected = stack.pop()
        if not (first * group_size < hi and lo < (first + n) * group_size):
            continue
        if n == 1:
            data = take(min(size, (first + 1) * group_size) - first * group_size)
            if count == 1:
                got = blake3.blake3(data).digest()
                want = bytes(root)
            else:
                got = bt.words_to_bytes(_group_cv(memoryview(data), first, group_log))
                want = expected or b""
            if got != want:
                raise BaoMismatch(f"chunk group {first}", want.hex(), got.hex(), group=first)
            groups[first] = data
            continue
        node = take(PARENT_LEN)
        block = np.frombuffer(node, dtype="<u4").astype(np.uint32)[:, None]
        got = _root_cv(block) if expected is None else bt.words_to_bytes(bt.parent_cvs(block[:8], block[8:]))
        want = bytes(root) if expected is None else expected
        if got != want:
            raise BaoMismatch(f"bao slice parent node (groups {first}..{first + n})", want.hex(), got.hex())
        split = _split(n)
        stack.append((first + split, n - split, node[32:]))
        stack.append((first, split, node[:32]))
    if pos != len(slice_):
        raise StorageError(f"bao slice has {len(slice_) - pos} bytes of trailing data")
    end = min(size, start + length)
    if start >= end:
        return b""
    joined = b"".join(groups[g] for g in sorted(groups))
    offset = min(groups) * group_size
    return joined[start - offset : end - offset]

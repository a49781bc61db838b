"""The BLAKE3 compression function, vectorised with NumPy, and the BLAKE3 tree above it.

The ``blake3`` package hashes whole inputs but exposes no chaining values
(CVs), and bao outboards are made of exactly those: the CV of every 1 KiB
chunk and of every parent node.  This module computes them, many at once:
:func:`compress` runs one compression over N independent inputs, each a
column of ``(16, N)`` word arrays, so one NumPy call does the work of N
scalar steps.  The state is kept as four ``(4, N)`` row blocks (a, b, c, d)
so that the four column G functions of a round are one set of NumPy calls,
and the four diagonal ones another (rows of b, c, d rotated in between).

Everything is little-endian ``uint32`` arithmetic modulo 2³², as the
specification states it; the module is checked against the official test
vectors (``tests/data/blake3_test_vectors.json``) in all three modes.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "CHUNK_LEN",
    "CHUNK_END",
    "CHUNK_START",
    "IV",
    "PARENT",
    "ROOT",
    "Words",
    "chunk_cvs",
    "compress",
    "hash_bytes",
    "merge_subtree",
    "parent_cvs",
    "partial_chunk_cv",
]

Words = npt.NDArray[np.uint32]
"""Words of many inputs: shape ``(k, N)``, column ``i`` belongs to input ``i``."""

CHUNK_LEN: Final = 1024
BLOCK_LEN: Final = 64

CHUNK_START: Final = 1
CHUNK_END: Final = 2
PARENT: Final = 4
ROOT: Final = 8
KEYED_HASH: Final = 16
DERIVE_KEY_CONTEXT: Final = 32
DERIVE_KEY_MATERIAL: Final = 64

IV: Final = np.array(
    [0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19],
    dtype=np.uint32,
)

_PERMUTATION: Final = [2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8]


def _schedules() -> list[tuple[list[int], list[int], list[int], list[int]]]:
    """Per round, the message words of (column x, column y, diagonal x, diagonal y) as row indexes."""
    order = list(range(16))
    out = []
    for _ in range(7):
        out.append((order[0:8:2], order[1:8:2], order[8:16:2], order[9:16:2]))
        order = [order[p] for p in _PERMUTATION]
    return out


_SCHEDULE: Final = _schedules()
_ROT1: Final = [1, 2, 3, 0]
_ROT2: Final = [2, 3, 0, 1]
_ROT3: Final = [3, 0, 1, 2]


def _rotr(x: Words, n: int, tmp: Words) -> None:
    np.right_shift(x, n, out=tmp)
    np.left_shift(x, 32 - n, out=x)
    np.bitwise_or(x, tmp, out=x)


def _g(a: Words, b: Words, c: Words, d: Words, mx: Words, my: Words, tmp: Words) -> None:
    """Four G functions at once (rows of a, b, c, d), over all N inputs."""
    a += b
    a += mx
    d ^= a
    _rotr(d, 16, tmp)
    c += d
    b ^= c
    _rotr(b, 12, tmp)
    a += b
    a += my
    d ^= a
    _rotr(d, 8, tmp)
    c += d
    b ^= c
    _rotr(b, 7, tmp)


def compress(
    cv: Words, block: Words, counter: npt.NDArray[np.uint64] | int, block_len: Words | int, flags: Words | int
) -> Words:
    """The full 16-word output of the compression function, for N inputs at once.

    ``cv`` is ``(8, N)``, ``block`` ``(16, N)`` message words; ``counter``,
    ``block_len`` and ``flags`` are scalars or ``(N,)`` arrays.  Words 0 to 7 of
    the result are the new chaining value; all 16 are the root output block.
    """
    n = cv.shape[1]
    a = np.array(cv[0:4], dtype=np.uint32)
    b = np.array(cv[4:8], dtype=np.uint32)
    c = np.empty((4, n), dtype=np.uint32)
    c[:] = IV[0:4, None]
    d = np.empty((4, n), dtype=np.uint32)
    counter64 = np.asarray(counter, dtype=np.uint64)
    d[0] = (counter64 & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    d[1] = (counter64 >> np.uint64(32)).astype(np.uint32)
    d[2] = block_len
    d[3] = flags
    tmp = np.empty((4, n), dtype=np.uint32)
    for col_x, col_y, diag_x, diag_y in _SCHEDULE:
        _g(a, b, c, d, block[col_x], block[col_y], tmp)
        b, c, d = b[_ROT1], c[_ROT2], d[_ROT3]  # diagonalise
        _g(a, b, c, d, block[diag_x], block[diag_y], tmp)
        b, c, d = b[_ROT3], c[_ROT2], d[_ROT1]  # and back
    out = np.empty((16, n), dtype=np.uint32)
    np.bitwise_xor(a, c, out=out[0:4])
    np.bitwise_xor(b, d, out=out[4:8])
    np.bitwise_xor(c, cv[0:4], out=out[8:12])
    np.bitwise_xor(d, cv[4:8], out=out[12:16])
    return out


def _key_words(key: Words | None, n: int) -> Words:
    base = IV if key is None else key
    out = np.empty((8, n), dtype=np.uint32)
    out[:] = base[:, None]
    return out


def chunk_cvs(
    data: bytes | memoryview,
    first_chunk: int | npt.NDArray[np.uint64],
    *,
    key: Words | None = None,
    flags: int = 0,
) -> Words:
    """The (non-root) CVs of whole 1 KiB chunks, ``(8, N)``; ``len(data)`` is a multiple of 1024.

    ``first_chunk`` is the index of the first chunk in the whole input (the
    chunk counter), or an array of N counters for chunks that are not
    neighbours.
    """
    n = len(data) // CHUNK_LEN
    assert n * CHUNK_LEN == len(data)
    words = np.frombuffer(data, dtype="<u4").reshape(n, CHUNK_LEN // 4).T  # (256, N)
    words = np.ascontiguousarray(words, dtype=np.uint32)
    counter = (
        first_chunk if not isinstance(first_chunk, int) else np.arange(first_chunk, first_chunk + n, dtype=np.uint64)
    )
    cv = _key_words(key, n)
    for i in range(CHUNK_LEN // BLOCK_LEN):
        block_flags = flags | (CHUNK_START if i == 0 else 0) | (CHUNK_END if i == 15 else 0)
        cv = compress(cv, words[16 * i : 16 * i + 16], counter, BLOCK_LEN, block_flags)[0:8]
    return cv


def _chunk_last_block(
    data: bytes | memoryview, chunk_index: int, key: Words | None, flags: int
) -> tuple[Words, Words, int, int]:
    """For one chunk of 0..1024 bytes: (cv before its last block, last block words, block_len, flags)."""
    blocks = max(1, -(-len(data) // BLOCK_LEN))
    padded = bytes(data) + bytes(blocks * BLOCK_LEN - len(data))
    words = np.frombuffer(padded, dtype="<u4").astype(np.uint32).reshape(blocks, 16)
    cv = _key_words(key, 1)
    for i in range(blocks - 1):
        cv = compress(cv, words[i][:, None], chunk_index, BLOCK_LEN, flags | (CHUNK_START if i == 0 else 0))[0:8]
    last_len = len(data) - (blocks - 1) * BLOCK_LEN
    last_flags = flags | CHUNK_END | (CHUNK_START if blocks == 1 else 0)
    return cv, words[blocks - 1][:, None], last_len, last_flags


def partial_chunk_cv(data: bytes | memoryview, chunk_index: int, *, key: Words | None = None, flags: int = 0) -> Words:
    """The (non-root) CV of one chunk of at most 1024 bytes, ``(8, 1)``."""
    cv, block, block_len, block_flags = _chunk_last_block(data, chunk_index, key, flags)
    return compress(cv, block, chunk_index, block_len, block_flags)[0:8]


def parent_cvs(left: Words, right: Words, *, key: Words | None = None, flags: int = 0) -> Words:
    """The (non-root) CVs of parent nodes over ``left`` and ``right`` child CVs, each ``(8, N)``."""
    block = np.concatenate([left, right])
    return compress(_key_words(key, left.shape[1]), block, 0, BLOCK_LEN, flags | PARENT)[0:8]


def merge_subtree(cvs: Words, *, key: Words | None = None, flags: int = 0) -> Words:
    """The CV of the (non-root) subtree whose leaves are the ``N`` CVs ``cvs``, ``(8, 1)``.

    The BLAKE3 tree puts the largest power of two of leaves on the left;
    pairing neighbours level by level and carrying an odd last one up
    unchanged builds exactly that tree.
    """
    while cvs.shape[1] > 1:
        pairs = cvs.shape[1] // 2
        merged = parent_cvs(cvs[:, 0 : 2 * pairs : 2], cvs[:, 1 : 2 * pairs : 2], key=key, flags=flags)
        cvs = np.concatenate([merged, cvs[:, 2 * pairs :]], axis=1) if cvs.shape[1] % 2 else merged
    return cvs


def words_to_bytes(words: Words) -> bytes:
    """``(k, 1)`` or ``(k,)`` words as little-endian bytes."""
    return np.ascontiguousarray(words.reshape(-1), dtype="<u4").tobytes()


def _root_output(cv: Words, block: Words, counter: int, block_len: int, flags: int, length: int) -> bytes:
    outputs = -(-length // 64)
    n = max(1, outputs)
    words = compress(
        np.repeat(cv, n, axis=1),
        np.repeat(block, n, axis=1),
        np.arange(n, dtype=np.uint64),
        block_len,
        flags | ROOT,
    )
    return np.ascontiguousarray(words.T, dtype="<u4").tobytes()[:length]


def hash_bytes(data: bytes | memoryview, length: int = 32, *, key: bytes | None = None, mode_flags: int = 0) -> bytes:
    """BLAKE3 of ``data`` (``length`` bytes of extended output), computed by this module.

    ``key`` (32 bytes) selects keyed hashing, or the derive-key context key
    when ``mode_flags`` is :data:`DERIVE_KEY_MATERIAL`.
    """
    key_words = None if key is None else np.frombuffer(key, dtype="<u4").astype(np.uint32)
    flags = mode_flags | (KEYED_HASH if key is not None and mode_flags == 0 else 0)
    chunks = max(1, -(-len(data) // CHUNK_LEN))
    if chunks == 1:
        cv, block, block_len, block_flags = _chunk_last_block(data, 0, key_words, flags)
        return _root_output(cv, block, 0, block_len, block_flags, length)
    view = memoryview(data)
    full = (chunks - 1) * CHUNK_LEN
    cvs = np.concatenate(
        [
            chunk_cvs(view[:full], 0, key=key_words, flags=flags),
            partial_chunk_cv(view[full:], chunks - 1, key=key_words, flags=flags),
        ],
        axis=1,
    )
    split = 1 << ((chunks - 1).bit_length() - 1)  # largest power of two below the chunk count
    left = merge_subtree(cvs[:, :split], key=key_words, flags=flags)
    right = merge_subtree(cvs[:, split:], key=key_words, flags=flags)
    return _root_output(_key_words(key_words, 1), np.concatenate([left, right]), 0, BLOCK_LEN, flags | PARENT, length)


def derive_key(context: str, material: bytes, length: int = 32) -> bytes:
    """BLAKE3 ``derive_key`` mode (checked against the official vectors)."""
    context_key = hash_bytes(context.encode(), 32, mode_flags=DERIVE_KEY_CONTEXT)
    return hash_bytes(material, length, key=context_key, mode_flags=DERIVE_KEY_MATERIAL)

"""The NumPy BLAKE3 and bao outboards, against the official BLAKE3 and bao test vectors.

``tests/data/blake3_test_vectors.json`` is the BLAKE3 project's file,
``tests/data/bao_test_vectors.json`` the bao project's (1 KiB groups, i.e.
``group_log = 0``); both give expected outputs (or their BLAKE3) computed by
the reference implementations.  Larger inputs are checked against the
``blake3`` package (its root digest).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import blake3
import pytest

from nixcas.castore import bao
from nixcas.castore import blake3_tree as bt
from nixcas.castore.digest import B3Digest
from nixcas.errors import StorageError, ValidationError

DATA = Path(__file__).parents[1] / "data"
BLAKE3_VECTORS = json.loads((DATA / "blake3_test_vectors.json").read_text())
BAO_VECTORS = json.loads((DATA / "bao_test_vectors.json").read_text())


def blake3_input(n: int) -> bytes:
    return bytes(i % 251 for i in range(n))


def bao_input(n: int) -> bytes:
    """bao's generate_input.py: little-endian 4-byte counters starting at 1."""
    return b"".join(struct.pack("<I", i + 1) for i in range((n + 3) // 4))[:n]


def b3hex(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def groups_of(data: bytes, group_log: int) -> dict[int, bytes]:
    size = 1024 << group_log
    return {g: data[g * size : (g + 1) * size] for g in range(bao.group_count(len(data), group_log))}


# -- BLAKE3 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", BLAKE3_VECTORS["cases"], ids=lambda c: str(c["input_len"]))
def test_blake3_vectors(case: dict[str, Any]) -> None:
    data = blake3_input(case["input_len"])
    length = len(case["hash"]) // 2
    assert bt.hash_bytes(data, length).hex() == case["hash"]
    assert bt.hash_bytes(data).hex() == case["hash"][:64]
    assert bt.hash_bytes(data, length, key=BLAKE3_VECTORS["key"].encode()).hex() == case["keyed_hash"]
    assert bt.derive_key(BLAKE3_VECTORS["context_string"], data, length).hex() == case["derive_key"]


@pytest.mark.parametrize("size", [1 << 20, (5 << 20) + 1234, 3 * 1024 * 17])
def test_blake3_large_against_package(size: int) -> None:
    data = blake3.blake3(b"large %d" % size).digest(length=size)
    assert bt.hash_bytes(data).hex() == b3hex(data)


# -- bao outboards, encodings and slices (1 KiB groups) ----------------------------------------


@pytest.mark.parametrize("case", BAO_VECTORS["outboard"], ids=lambda c: str(c["input_len"]))
def test_bao_outboard_vectors(case: dict[str, Any]) -> None:
    data = bao_input(case["input_len"])
    outboard = bao.encode_outboard(data, group_log=0)
    assert len(outboard) == case["output_len"] == bao.outboard_len(len(data), 0)
    assert b3hex(outboard) == case["encoded_blake3"]
    root = B3Digest(bytes.fromhex(case["bao_hash"]))
    assert bao.verify_groups(root, outboard, groups_of(data, 0), group_log=0) == len(data)
    for offset in case["outboard_corruptions"]:
        bad = bytearray(outboard)
        bad[offset] ^= 1
        with pytest.raises(StorageError):
            bao.verify_groups(root, bytes(bad), groups_of(data, 0), group_log=0)
    for offset in case["input_corruptions"]:
        bad = bytearray(data)
        bad[offset] ^= 1
        with pytest.raises(bao.BaoMismatch) as info:
            bao.verify_groups(root, outboard, groups_of(bytes(bad), 0), group_log=0)
        assert info.value.group == offset // 1024


@pytest.mark.parametrize("case", BAO_VECTORS["encode"], ids=lambda c: str(c["input_len"]))
def test_bao_combined_encoding_vectors(case: dict[str, Any]) -> None:
    """The combined encoding is the slice of the whole input."""
    data = bao_input(case["input_len"])
    encoded = bao.extract_slice(data, bao.encode_outboard(data, 0), 0, len(data), group_log=0)
    assert len(encoded) == case["output_len"]
    assert b3hex(encoded) == case["encoded_blake3"]


@pytest.mark.parametrize("case", BAO_VECTORS["slice"], ids=lambda c: str(c["input_len"]))
def test_bao_slice_vectors(case: dict[str, Any]) -> None:
    data = bao_input(case["input_len"])
    outboard = bao.encode_outboard(data, 0)
    root = B3Digest(bytes.fromhex(case["bao_hash"]))
    for s in case["slices"]:
        sliced = bao.extract_slice(data, outboard, s["start"], s["len"], group_log=0)
        assert len(sliced) == s["output_len"], s
        assert b3hex(sliced) == s["output_blake3"], s
        got = bao.verify_slice(root, sliced, s["start"], s["len"], group_log=0)
        assert got == data[s["start"] : s["start"] + s["len"]]
        for offset in s["corruptions"]:
            bad = bytearray(sliced)
            bad[offset] ^= 1
            with pytest.raises(StorageError):
                bao.verify_slice(root, bytes(bad), s["start"], s["len"], group_log=0)


# -- 16 KiB groups ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 16384, 16385, 5 * 16384 + 3, (4 << 20) + 16384 * 3 + 100, 9 << 20])
def test_outboard_16k_groups(size: int) -> None:
    data = blake3.blake3(b"groups %d" % size).digest(length=size)
    outboard = bao.encode_outboard(data)
    groups = max(1, -(-size // 16384))
    assert len(outboard) == 8 + 64 * (groups - 1)
    assert outboard[:8] == size.to_bytes(8, "little")
    root = B3Digest(blake3.blake3(data).digest())
    assert bao.verify_groups(root, outboard, groups_of(data, 4)) == size
    # streaming in odd pieces gives the same bytes
    encoder = bao.OutboardEncoder()
    for i in range(0, size, 1_000_003):
        encoder.update(data[i : i + 1_000_003])
    assert encoder.finish() == outboard
    # the outboard is the 1 KiB-group outboard with the nodes below 16 KiB left out: its root node is the same
    if groups > 1:
        assert bao.encode_outboard(data, 0)[8:72] == outboard[8:72]


def test_outboard_not_matching_the_root() -> None:
    data = blake3.blake3(b"not matching").digest(length=100_000)
    other = blake3.blake3(b"other").digest(length=100_000)
    root = B3Digest(blake3.blake3(data).digest())
    with pytest.raises(bao.BaoMismatch, match="outboard parent node 0"):
        bao.verify_groups(root, bao.encode_outboard(other), groups_of(data, 4))


def test_truncated_outboard() -> None:
    data = blake3.blake3(b"truncated").digest(length=100_000)
    outboard = bao.encode_outboard(data)
    root = B3Digest(blake3.blake3(data).digest())
    for cut in (0, 5, 8, len(outboard) - 1):
        with pytest.raises(StorageError, match="truncated"):
            bao.verify_groups(root, outboard[:cut], groups_of(data, 4))
    with pytest.raises(StorageError, match="too long"):
        bao.verify_groups(root, outboard + b"\0", groups_of(data, 4))


def test_range_past_eof() -> None:
    assert bao.groups_for_range(100_000, 99_000, 100_000) == range(6, 7)
    with pytest.raises(ValidationError, match="past the end"):
        bao.groups_for_range(100_000, 99_000, 100_001)
    with pytest.raises(ValidationError):
        bao.groups_for_range(100_000, 10, 5)


def test_the_last_group_is_required() -> None:
    data = blake3.blake3(b"last").digest(length=100_000)
    root = B3Digest(blake3.blake3(data).digest())
    with pytest.raises(ValidationError, match="last chunk group"):
        bao.verify_groups(root, bao.encode_outboard(data), {0: data[:16384]})


def prune_to_groups(outboard_1k: bytes, size: int, group_chunks: int) -> bytes:
    """The 16 KiB-group outboard derived from bao's 1 KiB one: keep the parents above whole groups.

    Written independently of nixcas.castore.bao: a pre-order walk of bao's
    tree (left subtree = largest power of two of chunks below the count)
    that keeps each parent covering more than ``group_chunks`` chunks.
    """
    kept = [outboard_1k[:8]]
    index = 0

    def walk(chunks: int) -> None:
        nonlocal index
        if chunks == 1:
            return
        node = outboard_1k[8 + 64 * index : 8 + 64 * (index + 1)]
        index += 1
        if chunks > group_chunks:
            kept.append(node)
        left = 1
        while left * 2 < chunks:
            left *= 2
        walk(left)
        walk(chunks - left)

    walk(max(1, -(-size // 1024)))
    return b"".join(kept)


@pytest.mark.parametrize("size", [16385, 3 * 16384, 100_000, 1 << 20, (1 << 20) + 5000])
def test_16k_outboard_is_the_1k_outboard_above_the_groups(size: int) -> None:
    data = blake3.blake3(b"prune %d" % size).digest(length=size)
    assert bao.encode_outboard(data) == prune_to_groups(bao.encode_outboard(data, 0), size, 16)


@pytest.mark.parametrize("size", [1, 16384, 16385, 5 * 16384 + 7, 33 * 16384])
def test_check_outboard_detects_every_flipped_bit(size: int) -> None:
    data = blake3.blake3(b"check %d" % size).digest(length=size)
    root = B3Digest(blake3.blake3(data).digest())
    outboard = bao.encode_outboard(data)
    bao.check_outboard(root, outboard, size)
    bao.check_outboard(root, outboard, None)
    for pos in range(len(outboard)):
        bad = bytearray(outboard)
        bad[pos] ^= 1 << (pos % 8)
        with pytest.raises(StorageError):
            bao.check_outboard(root, bytes(bad), size)
    with pytest.raises(bao.BaoMismatch):
        bao.check_outboard(B3Digest(bytes(32)), outboard, None if size > 16384 else size + 1)

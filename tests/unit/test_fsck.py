"""fsck: each kind of damage is found with its path, exits 1, and is repaired from a second store."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import blake3
import pytest
import zstandard

from nixcas.api import Store
from nixcas.castore.digest import B3Digest
from nixcas.castore.nodes import DirectoryNode, FileNode
from nixcas.castore.objectstore.layout import blob_index_key, chunk_key
from nixcas.store.pathinfo.model import PathInfo
from nixcas.testing import packed
from nixcas.testing.daemon import running_daemon
from nixcas.testing.maintenance import dump_path, import_all, nixcas, one_line_error, write_chunked, write_tree
from nixcas.testing.nix import NIX_STORE, run_nix

CHUNKS = [bytes([i]) * 40_000 + bytes(range(256)) for i in range(3)]
"""The content of ``data/chunked``, stored in the damaged store as a three-chunk blob."""


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return write_tree(
        tmp_path / "src" / "pkg",
        {
            "bin": {"tool": b"#!/bin/sh\necho tool\n"},
            "data": {"chunked": b"".join(CHUNKS), "plain": b"plain data\n" * 50},
            "share": {"doc": {"README": b"read me\n"}},
        },
    )


def blob_of(data: bytes) -> B3Digest:
    return B3Digest(blake3.blake3(data).digest())


def make_store(store: Path, source: Path, *, chunked: bool) -> PathInfo:
    # The blobs are files of the object layout (a store written before packed://; small blobs as
    # rows are damaged in test_damaged_rows_are_found_and_repaired).
    (info,) = asyncio.run(import_all(store, [source], object_layout=True))
    if chunked:  # replace the single-chunk blob by the same content in three chunks
        digest = blob_of(b"".join(CHUNKS))
        (store / "blobs" / blob_index_key(digest)).unlink()
        (store / "blobs" / chunk_key(digest)).unlink()
        assert write_chunked(store / "blobs", CHUNKS) == digest
    return info


async def tree_digests(store: Path, info: PathInfo) -> dict[str, B3Digest]:
    """Path inside the store path -> digest, for directories and files."""
    out: dict[str, B3Digest] = {}
    async with await Store.open(store) as s:
        async for path, node in s.walk(info.node):
            if isinstance(node, DirectoryNode | FileNode):
                out[path.decode()] = node.digest
    return out


def flip_byte(store: Path, digest: B3Digest) -> None:
    rows = packed.rows(store / "blobs", [digest])
    if rows:
        data = bytearray(rows[0])
        data[3] ^= 0x01
        assert packed.corrupt_blob(store / "blobs", digest, bytes(data), compress=False)
        return
    path = store / "blobs" / chunk_key(digest)
    data = bytearray(zstandard.ZstdDecompressor().decompress(path.read_bytes()))
    data[3] ^= 0x01
    path.write_bytes(zstandard.ZstdCompressor().compress(bytes(data)))


@pytest.fixture
def damaged(tmp_path: Path, source: Path) -> tuple[Path, Path, PathInfo, dict[str, B3Digest]]:
    """A store with every kind of damage, and a second, intact store with the same path."""
    good, bad = tmp_path / "good", tmp_path / "bad"
    make_store(good, source, chunked=False)
    info = make_store(bad, source, chunked=True)
    digests = asyncio.run(tree_digests(bad, info))
    return good, bad, info, digests


def problems(result_stdout: str) -> list[str]:
    return [line for line in result_stdout.splitlines() if line.startswith("/nix/store/")]


def test_clean_store_passes(damaged: tuple[Path, Path, PathInfo, dict[str, B3Digest]]) -> None:
    good, bad, _, _ = damaged
    for store in (good, bad):
        result = nixcas("fsck", "--check-contents", "--check-nar", store=store)
        assert result.returncode == 0 and result.stdout == "", result
        assert "0 problems" in result.stderr


def test_flipped_byte_is_found_with_check_contents(damaged: tuple[Path, Path, PathInfo, dict[str, B3Digest]]) -> None:
    _, bad, info, digests = damaged
    flip_byte(bad, digests["bin/tool"])
    assert nixcas("fsck", store=bad).returncode == 0  # presence only: a flipped byte needs --check-contents
    result = nixcas("fsck", "--check-contents", store=bad)
    assert result.returncode == 1
    assert problems(result.stdout) == [
        f"{info.store_path}/bin/tool: blob {digests['bin/tool'].hex()} is corrupt "
        f"(its bytes hash to {blake3.blake3(flipped_bytes(bad, digests['bin/tool'])).hexdigest()})"
    ]


def flipped_bytes(store: Path, digest: B3Digest) -> bytes:
    rows = packed.rows(store / "blobs", [digest])
    if rows:
        return rows[0]
    return zstandard.ZstdDecompressor().decompress((store / "blobs" / chunk_key(digest)).read_bytes())


def test_missing_chunk_is_found(damaged: tuple[Path, Path, PathInfo, dict[str, B3Digest]]) -> None:
    _, bad, info, digests = damaged
    (bad / "blobs" / chunk_key(blob_of(CHUNKS[1]))).unlink()
    result = nixcas("fsck", store=bad)
    assert result.returncode == 1
    assert problems(result.stdout) == [
        f"{info.store_path}/data/chunked: blob {digests['data/chunked'].hex()} "
        f"is missing its chunk {blob_of(CHUNKS[1]).hex()}"
    ]


def test_missing_directory_is_found(damaged: tuple[Path, Path, PathInfo, dict[str, B3Digest]]) -> None:
    _, bad, info, digests = damaged
    with sqlite3.connect(bad / "directories.sqlite") as conn:
        conn.execute("DELETE FROM directories WHERE digest = ?", (digests["share/doc"],))
    conn.close()
    result = nixcas("fsck", store=bad)
    assert result.returncode == 1
    doc = digests["share/doc"].hex()
    assert problems(result.stdout) == [f"{info.store_path}/share/doc: directory {doc} is missing"]


def test_corrupt_directory_is_found(damaged: tuple[Path, Path, PathInfo, dict[str, B3Digest]]) -> None:
    _, bad, info, digests = damaged
    with sqlite3.connect(bad / "directories.sqlite") as conn:
        (raw,) = conn.execute("SELECT data FROM directories WHERE digest = ?", (digests["bin"],)).fetchone()
        conn.execute("UPDATE directories SET data = ? WHERE digest = ?", (raw + b"\0", digests["bin"]))
    conn.close()
    result = nixcas("fsck", store=bad)
    assert result.returncode == 1
    found = problems(result.stdout)
    assert len(found) == 1, result
    line = found[0]
    assert line.startswith(f"{info.store_path}/bin: directory {digests['bin'].hex()} is corrupt")
    one_line_error(nixcas("gc", store=bad), 1, "run nixcas fsck")  # GC refuses to sweep a store it cannot mark


def set_nar_hash(store: Path, info: PathInfo, sha256: bytes) -> None:
    async def go() -> None:
        async with await Store.open(store, with_pathinfo=True) as s:
            assert s.pathinfos is not None
            await s.pathinfos.put(info.replace(nar_sha256=sha256, ca=None))

    asyncio.run(go())


def test_wrong_nar_hash_is_found_with_check_nar(damaged: tuple[Path, Path, PathInfo, dict[str, B3Digest]]) -> None:
    _, bad, info, _ = damaged
    set_nar_hash(bad, info, bytes(32))
    assert nixcas("fsck", store=bad).returncode == 0
    result = nixcas("fsck", "--check-nar", "--json", store=bad)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    (found,) = report["remaining"]
    assert found["path"] == str(info.store_path) and found["kind"] == "pathinfo"
    assert "NarHash/NarSize recorded sha256-AAAAAAAA" in found["problem"]
    assert f"content gives {info.nar_hash.to_sri()} {info.nar_size}" in found["problem"]


def damage_everything(bad: Path, info: PathInfo, digests: dict[str, B3Digest]) -> None:
    flip_byte(bad, digests["bin/tool"])
    (bad / "blobs" / chunk_key(blob_of(CHUNKS[1]))).unlink()
    with sqlite3.connect(bad / "directories.sqlite") as conn:
        conn.execute("DELETE FROM directories WHERE digest = ?", (digests["share/doc"],))
    conn.close()
    set_nar_hash(bad, info, bytes(32))


def assert_repaired(bad: Path, info: PathInfo, source: Path, tmp_path: Path) -> None:
    after = nixcas("fsck", "--check-contents", "--check-nar", store=bad)
    assert after.returncode == 0, after
    nar = dump_path(bad, str(info.store_path))
    if NIX_STORE is not None:
        assert nar == run_nix([NIX_STORE, "--dump", str(source)], tmp_path, binary=True)


def test_repair_from_a_store_directory(
    damaged: tuple[Path, Path, PathInfo, dict[str, B3Digest]], source: Path, tmp_path: Path
) -> None:
    good, bad, info, digests = damaged
    damage_everything(bad, info, digests)
    found = nixcas("fsck", "--check-contents", "--check-nar", store=bad)
    assert found.returncode == 1 and len(problems(found.stdout)) == 4, found.stdout

    result = nixcas("fsck", "--check-contents", "--check-nar", "--repair-from", str(good), store=bad)
    assert result.returncode == 0, result
    repaired = [line for line in result.stdout.splitlines() if line.startswith("repaired: ")]
    assert len(repaired) == 4, result.stdout
    assert "4 problems, 4 repaired, 0 remaining" in result.stderr
    assert_repaired(bad, info, source, tmp_path)


def test_repair_from_a_daemon(
    damaged: tuple[Path, Path, PathInfo, dict[str, B3Digest]], source: Path, tmp_path: Path
) -> None:
    good, bad, info, digests = damaged
    damage_everything(bad, info, digests)
    with sqlite3.connect(bad / "directories.sqlite") as conn:  # and a corrupt directory above the flipped blob
        (raw,) = conn.execute("SELECT data FROM directories WHERE digest = ?", (digests["bin"],)).fetchone()
        conn.execute("UPDATE directories SET data = ? WHERE digest = ?", (raw + b"\0", digests["bin"]))
    conn.close()
    with running_daemon("-l", "127.0.0.1:0", store=good, log=tmp_path / "daemon.log") as daemon:
        result = nixcas("fsck", "--check-contents", "--check-nar", "--repair-from", daemon.url, store=bad)
    assert result.returncode == 0, result
    assert "5 problems, 5 repaired, 0 remaining" in result.stderr
    assert_repaired(bad, info, source, tmp_path)


def test_what_the_source_lacks_stays_reported(
    damaged: tuple[Path, Path, PathInfo, dict[str, B3Digest]], tmp_path: Path
) -> None:
    _, bad, info, _ = damaged
    (bad / "blobs" / chunk_key(blob_of(CHUNKS[1]))).unlink()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = nixcas("fsck", "--repair-from", str(empty), store=bad)
    assert result.returncode == 1
    assert f"not repaired: {info.store_path}/data/chunked: blob" in result.stdout
    nowhere = nixcas("fsck", "--repair-from", str(tmp_path / "nowhere"), store=bad)
    one_line_error(nowhere, 2, "not a store directory or a service URL")
    one_line_error(nixcas("fsck", "--repair-from", "ftp://x", store=bad), 2, "ftp")


def test_unreferenced_damage_is_reported(tmp_path: Path) -> None:
    store = tmp_path / "store"

    async def put() -> B3Digest:
        async with await Store.open(store) as s:
            return await s.blobs.put(b"nobody refers to me\n")

    digest = asyncio.run(put())
    flip_byte(store, digest)
    result = nixcas("fsck", "--check-contents", store=store)
    assert result.returncode == 1
    assert result.stdout.splitlines()[0].startswith(f"(unreferenced): blob {digest.hex()} is corrupt")


def test_damaged_rows_are_found_and_repaired(tmp_path: Path, source: Path) -> None:
    """The embedded store's own layout: small blobs are SQLite rows."""
    good, bad = tmp_path / "good", tmp_path / "bad"
    (info,) = asyncio.run(import_all(good, [source]))
    asyncio.run(import_all(bad, [source]))
    digests = asyncio.run(tree_digests(bad, info))
    tool, plain = digests["bin/tool"], digests["data/plain"]
    assert packed.has_row(bad / "blobs", tool) and packed.has_row(bad / "blobs", plain)
    flip_byte(bad, tool)
    assert packed.delete_blob(bad / "blobs", plain)
    result = nixcas("fsck", "--check-contents", store=bad)
    assert result.returncode == 1
    assert problems(result.stdout) == [
        f"{info.store_path}/bin/tool: blob {tool.hex()} is corrupt "
        f"(its bytes hash to {blake3.blake3(flipped_bytes(bad, tool)).hexdigest()})",
        f"{info.store_path}/data/plain: blob {plain.hex()} is missing",
    ]
    repaired = nixcas("fsck", "--check-contents", "--repair-from", str(good), store=bad)
    assert repaired.returncode == 0, repaired
    assert nixcas("fsck", "--check-contents", "--check-nar", store=bad).returncode == 0
    assert dump_path(bad, str(info.store_path)) == dump_path(good, str(info.store_path))


def test_invalid_pathinfo_record(damaged: tuple[Path, Path, PathInfo, dict[str, B3Digest]]) -> None:
    good, bad, info, _ = damaged
    with sqlite3.connect(bad / "pathinfo.sqlite") as conn:
        conn.execute("UPDATE pathinfo SET data = ? WHERE digest = ?", (b"\xff garbage", info.digest))
    conn.close()
    one_line_error(nixcas("gc", store=bad), 1, "is invalid")  # no collection without knowing every root
    result = nixcas("fsck", store=bad)
    assert result.returncode == 1
    hash_part = str(info.store_path)[len("/nix/store/") :].split("-", 1)[0]
    assert result.stdout.startswith(f"/nix/store/{hash_part}: pathinfo-record {hash_part} is invalid: ")
    repaired = nixcas("fsck", "--repair-from", str(good), store=bad)
    assert repaired.returncode == 0, repaired
    assert nixcas("path-info", str(info.store_path), store=bad).returncode == 0


def test_corrupt_chunk_is_attributed_to_its_blob_once(
    damaged: tuple[Path, Path, PathInfo, dict[str, B3Digest]],
) -> None:
    good, bad, info, digests = damaged
    chunk = blob_of(CHUNKS[1])
    flip_byte(bad, chunk)
    result = nixcas("fsck", "--check-contents", store=bad)
    assert result.returncode == 1
    flipped = blake3.blake3(flipped_bytes(bad, chunk)).hexdigest()
    assert result.stdout.splitlines() == [  # not again as an unreferenced chunk
        f"{info.store_path}/data/chunked: blob {digests['data/chunked'].hex()}: "
        f"chunk {chunk.hex()} is corrupt (its bytes hash to {flipped})"
    ]
    assert "1 problems" in result.stderr
    repaired = nixcas("fsck", "--check-contents", "--repair-from", str(good), store=bad)
    assert repaired.returncode == 0, repaired
    assert nixcas("fsck", "--check-contents", store=bad).returncode == 0


def test_corrupt_chunk_of_unreferenced_blob(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    digest = write_chunked(store / "blobs", CHUNKS)
    chunk = blob_of(CHUNKS[2])
    flip_byte(store, chunk)
    result = nixcas("fsck", "--check-contents", store=store)
    assert result.returncode == 1
    flipped = blake3.blake3(flipped_bytes(store, chunk)).hexdigest()
    assert result.stdout.splitlines() == [
        f"(unreferenced): blob {digest.hex()}: chunk {chunk.hex()} is corrupt (its bytes hash to {flipped})"
    ]


def test_zstd_bomb_in_place_of_a_blob_is_reported(damaged: tuple[Path, Path, PathInfo, dict[str, B3Digest]]) -> None:
    """A frame expanding to 256 MiB in place of a small blob: streamed through the hash (bounded memory), reported."""
    _, bad, info, digests = damaged
    bomb = zstandard.ZstdCompressor().compress(bytes(256 << 20))
    (bad / "blobs" / chunk_key(digests["bin/tool"])).write_bytes(bomb)
    result = nixcas("fsck", "--check-contents", store=bad)
    assert result.returncode == 1
    (line,) = problems(result.stdout)
    expected = f"{info.store_path}/bin/tool: blob {digests['bin/tool'].hex()} is corrupt (its bytes hash to "
    assert line == expected + blake3.blake3(bytes(256 << 20)).hexdigest() + ")"


def test_corrupt_cached_outboard(tmp_path: Path) -> None:
    store, empty = tmp_path / "store", tmp_path / "empty"
    empty.mkdir()
    data = blake3.blake3(b"outboard").digest(length=50_000)

    async def put() -> B3Digest:
        async with await Store.open(store) as s:
            digest = await s.blobs.put(data)
            assert await s.blobs.outboard(digest) is not None
            return digest

    digest = asyncio.run(put())
    assert nixcas("fsck", store=store).returncode == 0
    path = store / "blobs" / "bao" / "b3" / digest.hex()[:4] / digest.hex()
    raw = bytearray(path.read_bytes())
    raw[8 + 64 + 7] ^= 0x40
    path.write_bytes(bytes(raw))
    result = nixcas("fsck", store=store)
    assert result.returncode == 1
    (line,) = result.stdout.splitlines()
    assert line.startswith(f"(cache): outboard {digest.hex()} is corrupt (")
    repaired = nixcas("fsck", "--repair-from", str(empty), store=store)
    assert repaired.returncode == 0, repaired
    assert not path.exists()
    assert nixcas("fsck", store=store).returncode == 0

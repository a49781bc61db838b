"""Reading imported blobs back from their source files (the import's NAR hashing)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import blake3
import pytest

from nixcas.castore.blob.base import BlobReader
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.blob.source import SourceBlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.nodes import Node
from nixcas.errors import ChecksumMismatch
from nixcas.store.importer import Services, import_path
from nixcas.store.nar.hashing import SimpleNarCalculationService
from nixcas.store.pathinfo.memory import MemoryPathInfoService
from nixcas.testing.nix import NIX_STORE, run_nix


def b3(data: bytes) -> B3Digest:
    return B3Digest(blake3.blake3(data).digest())


async def test_reads_the_source_file_and_falls_back_to_the_store(tmp_path: Path) -> None:
    store = MemoryBlobService()
    data = b"imported bytes" * 1000
    digest = await store.put(data)
    source = tmp_path / "f"
    source.write_bytes(data)
    svc = SourceBlobService({digest: bytes(source)}, store)
    assert await svc.read(digest) == data
    reader = await svc.open_read(digest)
    assert reader is not None
    async with reader:
        await reader.seek(-4, 2)
        assert await reader.read() == data[-4:]
    source.unlink()  # gone: the store answers
    assert await svc.read(digest) == data


async def test_a_source_file_changed_since_import_is_refused(tmp_path: Path) -> None:
    store = MemoryBlobService()
    data = b"original"
    digest = await store.put(data)
    source = tmp_path / "f"
    source.write_bytes(b"modified")
    svc = SourceBlobService({digest: bytes(source)}, store)
    with pytest.raises(ChecksumMismatch):
        await svc.read(digest)
    with pytest.raises(ChecksumMismatch):
        await svc.read_many({digest: 100})


async def test_import_hashes_the_nar_without_reading_the_store_back(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a").write_bytes(b"a" * 10)
    (tree / "sub" / "big").write_bytes(blake3.blake3(b"big").digest(length=3 << 20))

    class NoReads(MemoryBlobService):
        reads = 0

        async def _open_read(self, digest: B3Digest) -> BlobReader | None:
            NoReads.reads += 1
            return await super()._open_read(digest)

    blobs, dirs = NoReads(), MemoryDirectoryService()
    info = await import_path(
        tree, Services(blobs, dirs, MemoryPathInfoService(), SimpleNarCalculationService(blobs, dirs))
    )
    assert NoReads.reads == 0
    if NIX_STORE is not None:
        out = run_nix([NIX_STORE, "--add", str(tree)], tmp_path)
        assert str(info.store_path) == out.strip()


async def test_read_many_reads_sources_in_one_go_and_checks_them(tmp_path: Path) -> None:
    store = MemoryBlobService()
    blobs = [f"file {i}".encode() * (i + 1) for i in range(20)]
    digests = [await store.put(b) for b in blobs]
    sources = {}
    for i, (d, data) in enumerate(zip(digests, blobs, strict=True)):
        (tmp_path / str(i)).write_bytes(data)
        sources[d] = bytes(tmp_path / str(i))
    svc = SourceBlobService(sources, store)
    (tmp_path / "3").unlink()  # falls back to the store
    got = await svc.read_many({d: 60 for d in digests})
    assert got == {d: b for d, b in zip(digests, blobs, strict=True) if len(b) <= 60}
    (tmp_path / "0").write_bytes(b"changed")
    with pytest.raises(ChecksumMismatch):
        await svc.read_many({digests[0]: 60})


async def test_a_file_changed_between_ingest_and_nar_hashing_falls_back_to_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nixcas.store.importer as importer

    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(b"as imported")
    real_ingest = importer.ingest_path  # type: ignore[attr-defined]

    async def ingest_then_change(*args: Any, **kwargs: Any) -> Node:
        node = await real_ingest(*args, **kwargs)
        (tree / "f").write_bytes(b"changed after")  # before the NAR is hashed
        return node

    monkeypatch.setattr(importer, "ingest_path", ingest_then_change)
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService()
    nar = SimpleNarCalculationService(blobs, dirs)
    info = await import_path(tree, Services(blobs, dirs, MemoryPathInfoService(), nar))
    # The PathInfo describes what was stored, hashed from the store: the same as a fresh calculation.
    assert (info.nar_size, info.nar_sha256) == await SimpleNarCalculationService(blobs, dirs).calculate_nar(info.node)


async def test_a_source_replaced_by_a_fifo_or_symlink_falls_back_to_the_store(tmp_path: Path) -> None:
    store = MemoryBlobService()
    data = b"stored bytes"
    digest = await store.put(data)
    fifo, link = tmp_path / "fifo", tmp_path / "link"
    os.mkfifo(fifo)  # opening it for reading would block forever
    (tmp_path / "elsewhere").write_bytes(data)
    link.symlink_to(tmp_path / "elsewhere")
    for path in (fifo, link):
        svc = SourceBlobService({digest: bytes(path)}, store)
        assert await asyncio.wait_for(svc.read(digest), timeout=10) == data
        assert await asyncio.wait_for(svc.read_many({digest: 100}), timeout=10) == {digest: data}

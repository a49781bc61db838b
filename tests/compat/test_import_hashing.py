"""The import's NAR hash: computed while the tree is read, never by reading the store back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import blake3
import pytest

from nixcas.castore.blob.base import BlobReader
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.nodes import Node
from nixcas.castore.sizerule import SizeRule
from nixcas.store.importer import Services, import_path
from nixcas.store.nar.hashing import SimpleNarCalculationService
from nixcas.store.pathinfo.memory import MemoryPathInfoService
from nixcas.testing.nix import NIX_STORE, run_nix


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

    blobs, dirs = NoReads(), MemoryDirectoryService(SizeRule.TVIX)
    info = await import_path(
        tree, Services(blobs, dirs, MemoryPathInfoService(), SimpleNarCalculationService(blobs, dirs))
    )
    assert NoReads.reads == 0
    if NIX_STORE is not None:
        out = run_nix([NIX_STORE, "--add", str(tree)], tmp_path)
        assert str(info.store_path) == out.strip()


async def test_a_file_changed_after_the_import_read_it_does_not_change_the_pathinfo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nixcas.store.importer as importer

    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(b"as imported")
    real_ingest = importer.ingest_path  # type: ignore[attr-defined]

    async def ingest_then_change(*args: Any, **kwargs: Any) -> Node:
        node = await real_ingest(*args, **kwargs)
        (tree / "f").write_bytes(b"changed after")  # after the walk read (and hashed) it
        return node

    monkeypatch.setattr(importer, "ingest_path", ingest_then_change)
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX)
    nar = SimpleNarCalculationService(blobs, dirs)
    info = await import_path(tree, Services(blobs, dirs, MemoryPathInfoService(), nar))
    # The PathInfo describes what was stored, hashed from the store: the same as a fresh calculation.
    assert (info.nar_size, info.nar_sha256) == await SimpleNarCalculationService(blobs, dirs).calculate_nar(info.node)

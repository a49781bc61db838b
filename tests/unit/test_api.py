"""The library facade, async and blocking."""

from __future__ import annotations

from pathlib import Path

import pytest

import nixcas
from nixcas.errors import NotFoundError
from nixcas.sync import open_store


def make_tree(root: Path) -> Path:
    (root / "t" / "a" / "b").mkdir(parents=True)
    (root / "t" / "a" / "b" / "deep").write_bytes(b"deep")
    (root / "t" / "a" / "z").write_bytes(b"z")
    (root / "t" / "m").write_bytes(b"m")
    return root / "t"


async def test_async_store_walk_order(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    async with await nixcas.open_store(tmp_path / "store") as store:
        root = await store.ingest(tree)
        paths = [p async for p, _ in store.walk(root)]
        assert paths == [b"", b"a", b"a/b", b"a/b/deep", b"a/z", b"m"]
        with pytest.raises(NotFoundError):
            await store.read_blob(nixcas.B3Digest(bytes(32)))
        with pytest.raises(NotFoundError):
            await store.get_directory(nixcas.B3Digest(bytes(32)))


def test_sync_store_persists(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    with open_store(tmp_path / "store") as store:
        root = store.ingest(tree)
    assert isinstance(root, nixcas.DirectoryNode)
    with open_store(tmp_path / "store") as store:
        walked = dict(store.walk(root.digest))
        deep = walked[b"a/b/deep"]
        assert isinstance(deep, nixcas.FileNode)
        assert store.read_blob(deep.digest) == b"deep"


def test_urls_override_store_dir(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    with open_store(tmp_path / "unused", blob_service_url="memory://", directory_service_url="memory://") as store:
        store.ingest(tree)
    assert not (tmp_path / "unused").exists()


def test_default_store_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NIXCAS_STORE_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert nixcas.default_store_dir() == tmp_path / "xdg" / "nixcas"
    monkeypatch.setenv("NIXCAS_STORE_DIR", str(tmp_path / "explicit"))
    assert nixcas.default_store_dir() == tmp_path / "explicit"

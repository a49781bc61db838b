"""Helpers for tests of store maintenance (gc, fsck): the CLI as a subprocess, trees, hand-made chunked blobs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import blake3
import zstandard

from nixcas.api import Store
from nixcas.castore.blob.base import ChunkMeta
from nixcas.castore.digest import B3Digest
from nixcas.castore.objectstore.layout import blob_index_key, chunk_key, encode_index
from nixcas.store.importer import Services, import_path
from nixcas.store.pathinfo.model import PathInfo

__all__ = ["dump_path", "import_all", "nixcas", "one_line_error", "write_chunked", "write_tree"]


def nixcas(*args: str, store: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_SERVICE_ADDR")}
    return subprocess.run(
        [sys.executable, "-m", "nixcas.cli.main", "--store-dir", str(store), *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


def dump_path(store: Path, store_path: str) -> bytes:
    """``nixcas dump-path``'s output (the command must succeed)."""
    args = [sys.executable, "-m", "nixcas.cli.main", "--store-dir", str(store), "dump-path", store_path]
    result = subprocess.run(args, capture_output=True, check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[str], code: int, fragment: str) -> None:
    assert result.returncode == code, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert fragment in lines[0], lines[0]


def write_tree(root: Path, spec: dict[str, bytes | dict[str, object]]) -> Path:
    root.mkdir(parents=True)
    for name, value in spec.items():
        if isinstance(value, dict):
            write_tree(root / name, value)  # type: ignore[arg-type]
        else:
            (root / name).write_bytes(value)
    return root


async def import_all(store_dir: Path, paths: list[Path], *, object_layout: bool = False) -> list[PathInfo]:
    """Import ``paths`` into the embedded store in ``store_dir``.

    ``object_layout``: write every blob as files of the object layout
    (``objectstore+file``: what the embedded store held before ``packed://``),
    which the embedded store reads as they are.
    """
    blob_url = f"objectstore+file://{store_dir.absolute() / 'blobs'}" if object_layout else None
    async with await Store.open(store_dir, with_pathinfo=True, blob_service_url=blob_url) as store:
        assert store.pathinfos is not None
        svc = Services(store.blobs, store.directories, store.pathinfos, store.nar_calculation())
        return [await import_path(p, svc) for p in paths]


def write_chunked(blob_root: Path, parts: list[bytes]) -> B3Digest:
    """A multi-chunk blob written with the layout helpers: chunk objects (those not present), then the index."""
    for part in parts:
        path = blob_root / chunk_key(B3Digest(blake3.blake3(part).digest()))
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_bytes(zstandard.ZstdCompressor().compress(part))
    digest = B3Digest(blake3.blake3(b"".join(parts)).digest())
    metas = [ChunkMeta(B3Digest(blake3.blake3(p).digest()), len(p)) for p in parts]
    index = blob_root / blob_index_key(digest)
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_bytes(encode_index(metas))
    return digest

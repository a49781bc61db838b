"""Store paths as NAR samples for the binary cache tests: a tree written to disk, its NAR, its facts."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.ingest import ingest_path
from nixcas.castore.nodes import Node
from nixcas.castore.sizerule import SizeRule
from nixcas.store import nixbase32
from nixcas.store.nar.render import render_nar
from nixcas.store.store_path import StorePath, build_nar_path

__all__ = ["Sample", "make_sample"]


@dataclass
class Sample:
    """A tree's NAR and the facts a narinfo states about it."""

    name: str
    nar: bytes
    node: Node
    store_path: StorePath

    @property
    def sha256(self) -> bytes:
        return hashlib.sha256(self.nar).digest()

    @property
    def nb32(self) -> str:
        return nixbase32.encode(self.sha256)

    def narinfo(self, *, store_path: str | None = None, nar_hash: str | None = None, nar_size: int | None = None,
                references: str = "", extra: str = "") -> str:  # fmt: skip
        return (
            f"StorePath: {store_path or self.store_path}\n"
            f"URL: nar/{self.nb32}.nar\n"
            "Compression: none\n"
            f"NarHash: {nar_hash or 'sha256:' + self.nb32}\n"
            f"NarSize: {len(self.nar) if nar_size is None else nar_size}\n"
            f"References: {references}\n"
            f"CA: fixed:r:sha256:{self.nb32}\n" + extra
        )


async def make_sample(tmp_path: Path, name: str, files: dict[str, bytes]) -> Sample:
    root = tmp_path / "trees" / name
    root.mkdir(parents=True)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    blobs, dirs = (
        MemoryBlobService(),
        MemoryDirectoryService(SizeRule.TVIX),
    )  # not the bridge's store; tvix like test stores
    node = await ingest_path(root, blobs, dirs)
    nar = b"".join([c async for c in render_nar(node, blobs, dirs)])
    return Sample(name, nar, node, build_nar_path(name, hashlib.sha256(nar).digest()))

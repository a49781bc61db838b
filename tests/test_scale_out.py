"""Many daemons, one store: two ``nixcas daemon`` processes on the same SeaweedFS + PostgreSQL.

One daemon imports, the other serves what it imported at once; a client with
a local near store in front of the cluster fetches each byte from it once.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import blake3
import pytest

from nixcas.castore.blob.combined import CombinedBlobService
from nixcas.castore.blob.local import LocalBlobService
from nixcas.castore.dirs.cache import CacheDirectoryService
from nixcas.castore.dirs.sqlite import SqliteDirectoryService
from nixcas.registry import blob_service_from_url, directory_service_from_url, pathinfo_service_from_url
from nixcas.store.nar.render import render_nar
from nixcas.store.pathinfo.cache import CachePathInfoService
from nixcas.store.pathinfo.sqlite import SqlitePathInfoService
from nixcas.store.store_path import StorePath
from nixcas.testing.daemon import Daemon, clean_env, nixcas_command, running_daemon, short_tmpdir
from nixcas.testing.maintenance import write_tree
from nixcas.testing.nix import NIX_STORE, run_nix
from nixcas.testing.seaweedfs import SeaweedFS
from test_nar import InstrumentedBlobs


def addrs(blob: str, directory: str, pathinfo: str) -> list[str]:
    return ["--blob-service-addr", blob, "--directory-service-addr", directory, "--path-info-service-addr", pathinfo]


def via(daemon: Daemon) -> list[str]:
    url = daemon.client_url()
    return addrs(url, url, url)


def run_cli(*args: str, binary: bool = False) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(nixcas_command(*args), capture_output=True, env=clean_env(), check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    big = blake3.blake3(b"scale-out big").digest(length=3 << 20)  # several chunks
    files: dict[str, object] = {f"f{i}": f"file {i}\n".encode() * (i + 1) for i in range(40)}
    return write_tree(
        tmp_path / "src" / "tree",
        {"big": big, "small": files, "deeper": {"x": b"x\n", "more": {"y": b"y" * 70_000}}},  # type: ignore[dict-item]
    )


def content_bytes(root: Path) -> int:
    """Bytes of distinct file contents under ``root`` (counted here, not by the store)."""
    seen: dict[bytes, int] = {}
    for p in root.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            seen[hashlib.sha256(data).digest()] = len(data)
    return sum(seen.values())


async def test_two_daemons_one_store_and_a_client_cache(
    seaweedfs: SeaweedFS, s3_url: str, pg_url: str, tree: Path, tmp_path: Path
) -> None:
    shared = addrs(s3_url, pg_url, pg_url)
    with short_tmpdir() as sockets:
        with (
            running_daemon("-l", str(sockets / "a.sock"), store=None, log=tmp_path / "a.log", global_args=shared) as a,
            running_daemon("-l", str(sockets / "b.sock"), store=None, log=tmp_path / "b.log", global_args=shared) as b,
        ):
            # Import through A ...
            store_path = run_cli(*via(a), "import", str(tree)).stdout.decode().strip()
            assert store_path.startswith("/nix/store/")
            # ... and B serves it at once: PathInfo, closure and every blob.
            dumped = run_cli(*via(b), "dump-path", store_path).stdout
            if NIX_STORE is not None:
                assert dumped == run_nix([NIX_STORE, "--dump", str(tree)], tmp_path, binary=True)
            assert dumped == run_cli(*via(a), "dump-path", store_path).stdout

            # A client: local near stores in front of daemon B.
            far_blobs = InstrumentedBlobs(await blob_service_from_url(b.client_url()))
            blobs = CombinedBlobService(LocalBlobService(tmp_path / "near" / "blobs"), far_blobs)
            dirs = CacheDirectoryService(
                SqliteDirectoryService(str(tmp_path / "near" / "dirs.sqlite")),
                await directory_service_from_url(b.client_url()),
            )
            pathinfos = CachePathInfoService(
                SqlitePathInfoService(str(tmp_path / "near" / "pi.sqlite")),
                await pathinfo_service_from_url(b.client_url()),
            )
            digest = StorePath.parse(store_path).digest
            for round_ in range(2):
                info = await pathinfos.get(digest)
                assert info is not None
                nar = b"".join([c async for c in render_nar(info.node, blobs, dirs)])
                assert nar == dumped
                # Each byte comes from the cluster once: all of it in the first round, none after.
                assert far_blobs.bytes_read == (content_bytes(tree) if round_ == 0 else 0)
                far_blobs.bytes_read = 0
            await far_blobs.inner.close()
            await blobs.near.close()

        # With both daemons gone, the client still has everything near.
        info = await pathinfos.near.get(digest)
        assert info is not None
        assert b"".join([c async for c in render_nar(info.node, blobs.near, dirs.near)]) == dumped
    await dirs.near.close()
    await pathinfos.near.close()
    assert os.path.exists(tmp_path / "near" / "blobs")

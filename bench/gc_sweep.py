#!/usr/bin/env python3
"""Benchmark: ``nixcas gc`` (mark + sweep) on a store of 100,000 objects, against ``nix-store --gc``.

Run from the repository root::

    .venv/bin/python bench/gc_sweep.py [--objects 100000] [--workdir DIR] [--json OUT] [--skip-nix]

**nixcas.**  An embedded store (``objectstore+file`` blobs, ``sqlite``
directories) is filled through the library with ``--objects`` castore
objects: half blobs, half directories, as ``objects / 100`` trees of one root
directory holding 49 sub-directories of one small file each, plus one file
(so 50 directories and 50 blobs per tree).  Every blob is a single chunk,
hence one index file and one chunk file on disk.  Half of the trees are
pinned (``nixcas castore pin``), the other half is garbage.  Then, each as a
child process (start-up included, what a user runs), with ``--grace 0s``:

1. ``nixcas gc --dry-run``: marks and scans everything, deletes nothing;
2. ``nixcas gc``: marks, scans, deletes the garbage half (50,000 objects, 75,000 files/rows);
3. ``nixcas gc`` again: nothing left to delete (the steady state of a clean store).

The per-phase times come from the ``seconds`` field of ``--json``.

**Nix.**  A private chroot store (``nix-store --store DIR``) gets
``--objects`` store paths (one small file each, added in batches of 2,000
with ``nix-store --add``); half of them are made GC roots (symlinks under
``DIR/nix/var/nix/gcroots``).  Timed like the nixcas steps 2 and 3:
``nix-store --gc`` deleting the unrooted half, then again with nothing to
delete.  (A Nix store path is one file plus one database row; a nixcas
object is a blob — index and chunk file — or a directory row.)

Every figure is the wall time of one run (filling the stores dominates the
benchmark's duration; each GC destroys what it measures).  The page cache
is warm: the stores were just written.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from nixcas.api import Store
from nixcas.castore.digest import B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.nodes import DirectoryNode, FileNode
from nixcas.castore.pins.sqlite import SqlitePinService
from nixcas.castore.sizerule import SizeRule

SUBDIRS = 49


def nixcas_command(store: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "nixcas.cli.main", "--store-dir", str(store), *args]


async def fill_nixcas(store_dir: Path, objects: int) -> tuple[int, int, int]:
    """``objects / 100`` trees of 50 directories and 50 blobs; pin the even ones. Returns (trees, blobs, dirs)."""
    trees = objects // 100
    blobs = dirs = 0
    async with await Store.open(store_dir) as store, SqlitePinService(str(store_dir / "pins.sqlite")) as pins:
        for t in range(trees):
            data = [f"tree {t} file {i}\n".encode() * (1 + i % 7) for i in range(SUBDIRS + 1)]
            digests = await store.blobs.put_many(data)
            blobs += len(digests)
            pairs = zip(digests[:-1], data[:-1], strict=True)
            subdirs = [Directory([(b"file", FileNode(d, len(x)))]) for d, x in pairs]
            entries: list[tuple[bytes, DirectoryNode | FileNode]] = [
                (b"d%03d" % i, sub.node(SizeRule.TVIX)) for i, sub in enumerate(subdirs)
            ]
            entries.append((b"top", FileNode(digests[-1], len(data[-1]))))
            root = Directory(entries)
            async with store.directories.put_multiple_start() as putter:
                for sub in subdirs:
                    await putter.put(sub)
                await putter.put(root)
                digest: B3Digest = await putter.close()
            dirs += len(subdirs) + 1
            if t % 2 == 0:
                await pins.pin(f"tree-{t}", digest)
        await store.blobs.sync()
    return trees, blobs, dirs


def timed(args: list[str], **kwargs: Any) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True, check=False, **kwargs)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{args[:6]}...: exit {result.returncode}: {result.stderr}")
    return elapsed, result


def bench_nixcas(work: Path, objects: int) -> dict[str, Any]:
    store = work / "nixcas-store"
    started = time.perf_counter()
    trees, blobs, dirs = asyncio.run(fill_nixcas(store, objects))
    fill_s = time.perf_counter() - started
    subprocess.run(["sync"], check=True)
    out: dict[str, Any] = {"trees": trees, "blobs": blobs, "directories": dirs, "fill_s": round(fill_s, 2)}
    for step, extra in (("dry_run", ["--dry-run"]), ("collect", []), ("clean", [])):
        elapsed, result = timed(nixcas_command(store, "gc", "--grace", "0s", "--json", *extra))
        report = json.loads(result.stdout)
        out[step] = {"wall_s": round(elapsed, 3), "freed": report["freed"], "seconds": report["seconds"]}
        print(f"nixcas gc {step:8}: {elapsed:6.2f} s wall, freed {report['freed']}, phases {report['seconds']}")
    expected = trees // 2 * 100 + (trees // 2) * 50  # blobs + dirs + chunk objects of the unpinned half
    if out["collect"]["freed"] != expected:
        raise SystemExit(f"nixcas gc freed {out['collect']['freed']} objects, expected {expected}")
    return out


def bench_nix(work: Path, paths: int, nix_store: str) -> dict[str, Any]:
    root = work / "nix-root"
    src = work / "nix-src"
    src.mkdir()
    for i in range(paths):
        (src / f"p{i}").write_text(f"path {i}\n")
    names = sorted(os.listdir(src))
    added: list[str] = []
    started = time.perf_counter()
    for i in range(0, len(names), 2000):
        _, result = timed([nix_store, "--store", str(root), "--add", *names[i : i + 2000]], cwd=src)
        added += result.stdout.split()
    fill_s = time.perf_counter() - started
    gcroots = root / "nix" / "var" / "nix" / "gcroots" / "bench"
    gcroots.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(added):
        if i % 2 == 0:
            os.symlink(path, gcroots / f"r{i}")
    subprocess.run(["sync"], check=True)
    out: dict[str, Any] = {"paths": len(added), "fill_s": round(fill_s, 2)}
    for step in ("collect", "clean"):
        elapsed, result = timed([nix_store, "--store", str(root), "--gc"])
        deleted = next((line for line in result.stdout.splitlines() if "store paths deleted" in line), "")
        out[step] = {"wall_s": round(elapsed, 3), "summary": deleted.strip()}
        print(f"nix-store --gc {step:8}: {elapsed:6.2f} s wall, {deleted.strip()}")
    left = len([n for n in os.listdir(root / "nix" / "store") if not n.startswith(".")])
    if left != (len(added) + 1) // 2:
        raise SystemExit(f"nix-store --gc left {left} paths, expected {(len(added) + 1) // 2}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=100_000, help="castore objects / Nix store paths")
    parser.add_argument("--workdir", type=Path, help="where the stores go (default: a temporary directory)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--skip-nix", action="store_true", help="only nixcas")
    parser.add_argument("--nix-store", default=shutil.which("nix-store") or "nix-store")
    args = parser.parse_args()
    if args.objects < 200 or args.objects % 200:
        parser.error("--objects must be a positive multiple of 200")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp).absolute()
        results: dict[str, Any] = {
            "objects": args.objects,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
        results["nixcas"] = bench_nixcas(work, args.objects)
        if not args.skip_nix:
            results["nix"] = bench_nix(work, args.objects, args.nix_store)
            ratio = results["nix"]["collect"]["wall_s"] / results["nixcas"]["collect"]["wall_s"]
            results["ratio_collect"] = round(ratio, 2)
            print(f"collect: nix-store --gc time / nixcas gc time = {ratio:.2f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

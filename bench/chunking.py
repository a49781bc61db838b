#!/usr/bin/env python3
"""Benchmark: chunked writes, bao outboards, and dedup of two tree versions against casync and borg.

Run from the repository root::

    .venv/bin/python bench/chunking.py [--size-mib 256] [--runs 3] [--tree-mib 192] [--workdir DIR] [--json OUT]

Three parts, all in one run:

* **chunked write**: ``open_write`` … ``close`` of a ``--size-mib`` blob of
  seeded random bytes (incompressible), written in 1 MiB blocks into a fresh
  ``objectstore+file`` store (FastCDC 2020, 256 KiB average, zstd level 1,
  staged chunk files renamed into place, index last; no fsync).  Beside it
  the parts on their own over the same bytes, single-threaded: FastCDC
  (``pyfastcdc``), BLAKE3 of every chunk and of the blob (``blake3``), zstd
  level 1 of every chunk; they show where the time goes.
* **outboard**: :class:`nixcas.castore.bao.OutboardEncoder` (NumPy BLAKE3,
  16 KiB groups) over the same bytes in memory, against one ``blake3``
  package hash of them (Rust, SIMD, one thread) as the ceiling.
* **dedup**: a tree of ``--tree-mib`` MiB (large files of 1-8 MiB and small
  files of 4-64 KiB, random bytes so compression plays no part) and a second
  version in which 10 % of the bytes changed: a contiguous third of some
  large files overwritten, a 4 KiB insertion in every seventh large file,
  every tenth small file rewritten.  Both versions go into one store each of nixcas
  (``Store.ingest``, the embedded store), ``casync make`` (one
  ``--store``, default chunk sizes) and ``borg create`` (one repository,
  ``--encryption=none``, default chunker).  Reported: the bytes each store
  holds afterwards (sum of file sizes) divided by the bytes of one version;
  target for nixcas ≤ 1.15.  Times are wall clock for both versions.

MB/s = bytes / median seconds / 10^6.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import zstandard
from pyfastcdc import FastCDC

import nixcas
from nixcas.castore.bao import OutboardEncoder
from nixcas.castore.blob.local import LocalBlobService

BLOCK = 1 << 20


def noise(seed: bytes, size: int) -> bytes:
    return blake3.blake3(seed).digest(length=size)


def median_seconds(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def mbps(size: int, seconds: float) -> float:
    return round(size / seconds / 1e6, 1)


# -- chunked write and outboard -------------------------------------------------------------------


def bench_write(workdir: Path, data: bytes, runs: int) -> dict[str, Any]:
    async def one(run: int) -> None:
        root = workdir / f"write-{run}"
        svc = LocalBlobService(root)
        view = memoryview(data)
        async with await svc.open_write(len(data)) as writer:
            for i in range(0, len(data), BLOCK):
                await writer.write(bytes(view[i : i + BLOCK]))
            await writer.close()
        await svc.close()

    counter = iter(range(10_000))
    times = []
    for _ in range(runs):
        run = next(counter)
        start = time.perf_counter()
        asyncio.run(one(run))
        times.append(time.perf_counter() - start)
        shutil.rmtree(workdir / f"write-{run}")
    write = statistics.median(times)
    cdc = FastCDC(256 << 10, min_size=128 << 10, max_size=512 << 10, normalized_chunking=1)
    chunks = [bytes(c.data) for c in cdc.cut_buf(data)]
    t_cdc, _ = median_seconds(lambda: list(cdc.cut_buf(data)), runs)
    t_b3, _ = median_seconds(lambda: ([blake3.blake3(c).digest() for c in chunks], blake3.blake3(data).digest()), runs)
    cctx = zstandard.ZstdCompressor(level=1)
    t_zstd, _ = median_seconds(lambda: [cctx.compress(c) for c in chunks], runs)
    return {
        "bytes": len(data),
        "chunks": len(chunks),
        "write_MBps": mbps(len(data), write),
        "write_best_MBps": mbps(len(data), min(times)),
        "fastcdc_MBps": mbps(len(data), t_cdc),
        "blake3_MBps": mbps(len(data), t_b3),
        "zstd1_MBps": mbps(len(data), t_zstd),
    }


def bench_outboard(data: bytes, runs: int) -> dict[str, Any]:
    def encode() -> bytes:
        encoder = OutboardEncoder()
        view = memoryview(data)
        for i in range(0, len(data), BLOCK):
            encoder.update(view[i : i + BLOCK])
        return encoder.finish()

    t_ob, best = median_seconds(encode, runs)
    t_b3, _ = median_seconds(lambda: blake3.blake3(data).digest(), runs)
    return {
        "bytes": len(data),
        "outboard_bytes": len(encode()),
        "outboard_MBps": mbps(len(data), t_ob),
        "outboard_best_MBps": mbps(len(data), best),
        "blake3_package_MBps": mbps(len(data), t_b3),
        "target_MBps": 100,
    }


# -- dedup ------------------------------------------------------------------------------------------


def make_versions(base: Path, total: int, seed: int) -> tuple[Path, Path, int, int]:
    """Two versions of a tree; returns (v1, v2, bytes of v1, bytes changed)."""
    rng = random.Random(seed)  # noqa: S311 - reproducible test data, not crypto
    v1, v2 = base / "v1", base / "v2"
    files: list[tuple[str, bytes]] = []
    size = 0
    k = 0
    while size < total:
        large = k % 5 == 0
        n = rng.randint(1 << 20, 8 << 20) if large else rng.randint(4 << 10, 64 << 10)
        files.append((f"d{k % 16:02d}/f{k:05d}.{'big' if large else 'dat'}", rng.randbytes(n)))
        size += n
        k += 1
    # 10 % of the bytes change: every tenth small file is rewritten, every seventh large file gets a
    # 4 KiB insertion, and a contiguous third of large files (in a shuffled order) is overwritten
    # until the total reaches 10 % (the last region trimmed to hit it).
    target = size // 10
    changed = 0
    edited = dict(files)
    names = [name for name, _ in files]
    seen = {".dat": 0, ".big": 0}
    for name in names:
        data = edited[name]
        kind = name[-4:]
        seen[kind] += 1
        if kind == ".dat" and seen[kind] % 10 == 0:
            edited[name] = rng.randbytes(len(data))
            changed += len(data)
        elif kind == ".big" and seen[kind] % 7 == 0:
            at = rng.randrange(0, len(data))
            edited[name] = data[:at] + rng.randbytes(4096) + data[at:]
            changed += 4096
    big_files = [name for name in names if name.endswith(".big")]
    rng.shuffle(big_files)
    for name in big_files:
        if changed >= target:
            break
        data = edited[name]
        span = min(len(data) // 3, target - changed)
        start = rng.randrange(0, len(data) - span)
        edited[name] = data[:start] + rng.randbytes(span) + data[start + span :]
        changed += span
    for root, content in ((v1, files), (v2, list(edited.items()))):
        for name, data in content:
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return v1, v2, size, changed


def stored_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def run(cmd: list[str], **kw: Any) -> None:
    done = subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)}: exit {done.returncode}: {done.stderr.decode(errors='replace').strip()}")


def bench_dedup(workdir: Path, tree_bytes: int) -> dict[str, Any]:
    v1, v2, size, changed = make_versions(workdir / "trees", tree_bytes, 20261124)
    out: dict[str, Any] = {"version_bytes": size, "changed_bytes": changed, "changed_share": round(changed / size, 3)}

    async def nixcas_ingest() -> None:
        async with await nixcas.open_store(workdir / "nixcas") as store:
            await store.ingest(v1)
            await store.ingest(v2)

    start = time.perf_counter()
    asyncio.run(nixcas_ingest())
    seconds = time.perf_counter() - start
    blobs = stored_bytes(workdir / "nixcas" / "blobs")
    out["nixcas"] = {"stored_bytes": blobs, "ratio": round(blobs / size, 3), "seconds": round(seconds, 2)}

    store = workdir / "casync.castr"
    start = time.perf_counter()
    for v in (v1, v2):
        run(["casync", "make", f"--store={store}", str(workdir / f"{v.name}.caidx"), str(v)])
    seconds = time.perf_counter() - start
    held = stored_bytes(store) + sum(stored_bytes(p) for p in workdir.glob("*.caidx"))
    out["casync"] = {"stored_bytes": held, "ratio": round(held / size, 3), "seconds": round(seconds, 2)}

    repo = workdir / "borg"
    env = {**os.environ, "BORG_BASE_DIR": str(workdir / "borg-home")}
    env["BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK"] = "yes"
    run(["borg", "init", "--encryption=none", str(repo)], env=env)
    start = time.perf_counter()
    for v in (v1, v2):
        run(["borg", "create", f"{repo}::{v.name}", "."], env=env, cwd=v)
    seconds = time.perf_counter() - start
    held = stored_bytes(repo)
    out["borg"] = {"stored_bytes": held, "ratio": round(held / size, 3), "seconds": round(seconds, 2)}
    out["target_ratio"] = 1.15
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tree-mib", type=int, default=192)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    for tool in ("casync", "borg"):
        if shutil.which(tool) is None:
            sys.exit(f"bench/chunking.py: {tool} is not installed (Debian: casync, borgbackup)")
    workdir = Path(tempfile.mkdtemp(prefix="nixcas-chunking-", dir=args.workdir)).resolve()
    try:
        data = noise(b"bench chunking", args.size_mib << 20)
        results = {
            "commit": subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
            ).stdout.strip(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "write": bench_write(workdir, data, args.runs),
            "outboard": bench_outboard(data, args.runs),
        }
        del data
        results["dedup"] = bench_dedup(workdir, args.tree_mib << 20)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

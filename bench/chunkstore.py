#!/usr/bin/env python3
"""Benchmark: uploading and fetching a second version of a large blob, with and without ``chunkstore=1``.

Run from the repository root::

    .venv/bin/python bench/chunkstore.py [--runs 3] [--size-mib 64] [--json OUT] [--workdir DIR]

A real ``nixcas daemon`` (child process) serves an ``objectstore+file``
store over TCP loopback; this process is the client.  Each run makes a new
version 1 (``--size-mib`` of seeded random bytes) and two versions 2, each
version 1 with 64 KiB replaced at a different place, then alternates (the
first one rotating per run):

* **upload, plain**: ``Put`` of a version 2 through ``grpc+http://…`` (the
  2024 BlobService: every byte crosses the wire);
* **upload, chunkstore**: the other version 2 through
  ``grpc+http://…?chunkstore=1`` (FastCDC in the client, ``StatChunk`` per
  chunk, ``PutChunk`` of the missing ones, ``PutBlob``);
* **fetch, plain / chunkstore**: ``combined`` with an empty
  ``objectstore+file`` near that already holds version 1, far the daemon
  (``Stat(send_chunks)`` + ``Read`` per chunk, or ``GetBlob`` + ``GetChunk``),
  reading the version 2 that was uploaded plainly (each run a fresh near).

Version 1 is uploaded untimed, through ``chunkstore=1``.  Bytes sent are
the chunk bytes the daemon lacked (computed here by chunking both versions);
times are medians over the runs (wall clock, seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import blake3

from nixcas.castore.blob.chunking import cut
from nixcas.castore.blob.combined import CombinedBlobService
from nixcas.castore.blob.local import LocalBlobService
from nixcas.composition import blob_service_from_url


def noise(seed: bytes, size: int) -> bytes:
    return blake3.blake3(seed).digest(length=size)


def start_daemon(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    nixcas = Path(sys.executable).parent / "nixcas"
    proc = subprocess.Popen(
        [
            str(nixcas),
            "daemon",
            "-l",
            "127.0.0.1:0",
            "--blob-service-addr",
            f"objectstore+file://{workdir}/blobs",
            "--directory-service-addr",
            "memory://",
            "--path-info-service-addr",
            "memory://",
            "--pin-service-addr",
            "memory://",
        ],
        stdout=subprocess.PIPE,
        # nothing of the user's own store: a private home under the work directory
        env={**os.environ, "HOME": str(workdir / "home"), "XDG_DATA_HOME": str(workdir / "home" / "data")},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().strip()
    if not line.startswith("listening on "):
        proc.kill()
        raise SystemExit(f"daemon did not start: {line!r}")
    return proc, line.removeprefix("listening on ")


def lacking(old: bytes, new: bytes) -> int:
    known = {blake3.blake3(c).digest() for c in cut(old)}
    return sum(len(c) for c in cut(new) if blake3.blake3(c).digest() not in known)


async def run(args: argparse.Namespace, workdir: Path, url: str) -> tuple[dict[str, list[float]], dict[str, int]]:
    size = args.size_mib << 20
    names = ("upload plain", "upload chunkstore", "fetch plain", "fetch chunkstore")
    times: dict[str, list[float]] = {k: [] for k in names}
    sent: dict[str, int] = {}
    async with (
        await blob_service_from_url(url) as plain,
        await blob_service_from_url(url + "?chunkstore=1") as chunked,
    ):
        for r in range(args.runs):
            v1 = noise(b"v1 %d" % r, size)
            patch = 64 << 10
            v2a = v1[: size // 3] + noise(b"a %d" % r, patch) + v1[size // 3 + patch :]
            v2b = v1[: 2 * size // 3] + noise(b"b %d" % r, patch) + v1[2 * size // 3 + patch :]
            await chunked.put(v1)
            uploads = [("upload plain", plain, v2a), ("upload chunkstore", chunked, v2b)]
            for name, svc, data in uploads if r % 2 == 0 else uploads[::-1]:
                start = time.perf_counter()
                await svc.put(data)
                times[name].append(time.perf_counter() - start)
            sent["upload plain"] = size
            sent["upload chunkstore"] = lacking(v1, v2b)
            fetches = [("fetch plain", plain), ("fetch chunkstore", chunked)]
            for name, far in fetches if r % 2 == 0 else fetches[::-1]:
                near_dir = workdir / f"near-{r}-{name.split()[1]}"
                near = LocalBlobService(near_dir)
                await near.put(v1)
                combined = CombinedBlobService(near, far)
                start = time.perf_counter()
                got = await combined.read(blake3.blake3(v2a).digest())  # type: ignore[arg-type]
                times[name].append(time.perf_counter() - start)
                assert got == v2a
                await near.close()
                shutil.rmtree(near_dir)
            sent["fetch plain"] = sent["fetch chunkstore"] = lacking(v1, v2a)
    return times, sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-chunkstore-", dir=args.workdir))
    proc, url = start_daemon(workdir)
    try:
        times, sent = asyncio.run(run(args, workdir, url))
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(workdir, ignore_errors=True)
    medians = {name: statistics.median(seconds) for name, seconds in times.items()}
    for name, seconds in medians.items():
        print(f"{name:20s} {seconds:7.3f} s   {sent[name] / 2**20:8.2f} MiB of chunks moved")
    if args.json:
        result = {"size_mib": args.size_mib, "runs": args.runs, "median_s": medians, "all_s": times}
        args.json.write_text(json.dumps({**result, "chunk_bytes_moved": sent}, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

"""Benchmark: NAR listings from castore, and castore-infused substitution, each against its peer.

1. ``.ls``: a tree of ``--dirs`` directories of 100 files of 1,280 bytes (in
   memory).  The listing (fetching the directory closure, the UTF-8 check and
   the JSON) against what a listing needs without castore: rendering the NAR
   (the peer; parsing it would come on top).
2. Infused substitution: a path of ``--files`` files of 1 MiB behind a
   nar-bridge on loopback (castore reachable over gRPC, in process), of which
   the substituting store already holds all but one.  ``nix+http`` with the
   castore options (fetches one blob, renders and hashes the NAR locally)
   against the NAR download (the peer: the whole NAR over HTTP, ingested).

Each side runs ``--runs`` times, alternating; the best time of each is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import tempfile
import time
from pathlib import Path

from aiohttp import web

from nixcas.bridge.app import NarBridge
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.nodes import DirectoryNode, FileNode
from nixcas.composition import blob_service_from_url, directory_service_from_url
from nixcas.server import start_server
from nixcas.store.nar.ingest import ingest_nar_bytes
from nixcas.store.nar.listing import check_listable, nar_listing
from nixcas.store.nar.plan import fetch_closure
from nixcas.store.nar.render import render_nar
from nixcas.store.narindex import NarIndex
from nixcas.store.narinfo import NarInfo
from nixcas.store.pathinfo.memory import MemoryPathInfoService
from nixcas.store.pathinfo.nixhttp import NixHttpPathInfoService
from nixcas.testing.samples import make_sample


async def bench_listing(dirs_count: int, runs: int) -> None:
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService()
    subdirs: dict[bytes, DirectoryNode] = {}
    for d in range(dirs_count):
        files: dict[bytes, FileNode] = {}
        for f in range(100):
            data = hashlib.sha256(f"{d}/{f}".encode()).digest() * 40
            files[f"file-{f:04d}".encode()] = FileNode(await blobs.put(data), len(data), f % 7 == 0)
        sub = Directory(files)
        await dirs.put(sub)
        subdirs[f"dir-{d:04d}".encode()] = sub.node(dirs.size_rule)
    root = Directory(subdirs)
    await dirs.put(root)
    node = root.node(dirs.size_rule)
    listing, rendering = [], []
    size = nar = 0
    for _ in range(runs):
        t = time.perf_counter()
        closure = await fetch_closure(node, dirs)
        check_listable(node, closure)
        size = sum(len(c) for c in nar_listing(node, closure))
        listing.append(time.perf_counter() - t)
        t = time.perf_counter()
        nar = 0
        async for chunk in render_nar(node, blobs, dirs):
            nar += len(chunk)
        rendering.append(time.perf_counter() - t)
    print(f".ls of {dirs_count * 100} files: listing ({size} bytes) {min(listing) * 1000:.0f} ms; ", end="")
    print(f"peer, rendering the {nar}-byte NAR: {min(rendering) * 1000:.0f} ms")


async def bench_infused(file_count: int, runs: int) -> None:
    files = {f"f{i:03d}": os.urandom(1 << 20) for i in range(file_count)}
    with tempfile.TemporaryDirectory() as tmp:
        sample = await make_sample(Path(tmp), "big-1.0", files)
    far_blobs, far_dirs, far_paths = MemoryBlobService(), MemoryDirectoryService(), MemoryPathInfoService()
    node, _, _ = await ingest_nar_bytes(sample.nar, far_blobs, far_dirs)
    await far_paths.put(NarInfo.parse(sample.narinfo()).to_path_info(node))
    bridge = NarBridge(far_blobs, far_dirs, far_paths, NarIndex(None), nar_prefix="snix-castore")
    runner = web.AppRunner(bridge.application(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    grpc = await start_server("127.0.0.1:0", far_blobs, far_dirs)
    castore = (await blob_service_from_url(grpc.url), await directory_service_from_url(grpc.url))
    times: dict[str, list[float]] = {"infused": [], "nar": []}
    try:
        for i in range(runs):
            for mode in ("infused", "nar") if i % 2 == 0 else ("nar", "infused"):
                local_blobs, local_dirs = MemoryBlobService(), MemoryDirectoryService()
                for data in list(files.values())[1:]:
                    await local_blobs.put(data)
                svc = NixHttpPathInfoService(
                    url, local_blobs, local_dirs, None, castore=castore if mode == "infused" else None
                )
                t = time.perf_counter()
                info = await svc.get(sample.store_path.digest)
                times[mode].append(time.perf_counter() - t)
                assert info is not None and info.node == sample.node
                await svc.close()
    finally:
        for service in castore:
            await service.close()
        await grpc.stop(0)
        await runner.cleanup()
        await bridge.index.close()
    print(
        f"substituting {file_count} MiB, all but 1 MiB local: infused {min(times['infused']) * 1000:.0f} ms; ", end=""
    )
    print(f"peer, NAR download: {min(times['nar']) * 1000:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dirs", type=int, default=200)
    parser.add_argument("--files", type=int, default=40)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(bench_listing(args.dirs, args.runs))
    asyncio.run(bench_infused(args.files, args.runs))


if __name__ == "__main__":
    main()

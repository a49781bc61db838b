#!/usr/bin/env python3
"""Benchmark: ``nix copy --to http://BRIDGE`` against ``nix copy --to file://CACHE`` of the same paths.

Run from the repository root::

    .venv/bin/python bench/bridge_push.py [--workdir DIR] [--small 200] [--large-mib 64] [--runs 3]
                                          [--workers N] [--json OUT]

Setup (not timed): a throwaway chroot Nix store gets ``--small`` small files
(1-8 KiB) and one ``--large-mib`` MiB file (half random, half 4 bits of
entropy per byte), each a store path via ``nix-store --add``.

Each round, alternating which side goes first, times one ``nix copy`` of all
the paths (uncompressed, ``?compression=none`` on both sides):

* **nar-bridge**: into a fresh embedded store through a freshly started
  ``nixcas nar-bridge --allow-writes`` (started before the clock starts); every
  upload it accepts is durable (blobs synced, SQLite commits with
  ``synchronous=FULL``) before its 2xx;
* **file://**: into a fresh directory (what Nix's own binary-cache writer does;
  it does not fsync);
* **nginx WebDAV** (for information: the floor of the HTTP protocol itself): the
  same ``nix copy --to http://…`` into nginx with ``dav_methods PUT``, which
  stores each uploaded file as it comes, checking nothing and syncing nothing.

Each side gets a fresh Nix cache directory (``XDG_CACHE_HOME``) per round, so
neither answers from narinfos it remembers.  After the timed copies the bridge's
upload is checked: every path's narinfo is served with the NarHash Nix has.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The sibling scripts (``bench/`` is on sys.path when this file is run).
from bridge import FOUR_BITS, Servers, fetch, free_port, nix_env, run, wait_port
from import_tree import base_facts

from nixcas.store.narinfo import NarInfo


def make_paths(workdir: Path, small: int, large_mib: int, seed: int, tree_files: int = 0) -> tuple[Path, list[str]]:
    """``small`` files of 1 to 8 KiB, a tree of ``tree_files`` files in 50 directories (if any) and one file of
    ``large_mib`` MiB (half compressible), added to a new chroot store: (the store, their store paths)."""
    rng = random.Random(seed)  # noqa: S311 - benchmark data
    src = workdir / "src"
    src.mkdir()
    files = []
    for i in range(small):
        p = src / f"small-{i}.txt"
        p.write_bytes(rng.randbytes(rng.randint(1024, 8192)))
        files.append(str(p))
    if tree_files:
        tree = src / "tree"
        for i in range(tree_files):
            d = tree / f"d{i % 50}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"f{i}").write_bytes(rng.randbytes(rng.randint(100, 16384)))
        files.append(str(tree))
    large = src / "large.bin"
    with open(large, "wb") as f:
        for i in range(large_mib):
            block = rng.randbytes(1 << 20)
            f.write(block if i % 2 == 0 else block.translate(FOUR_BITS))
    files.append(str(large))
    store = workdir / "nix-a"
    paths = run(["nix-store", "--store", str(store), "--add", *files], nix_env(workdir, "add")).split()
    return store, paths


DAV_CONF = """
daemon off;
user {user};
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_max_body_size 0;
    client_body_temp_path {dir}/tmp; proxy_temp_path {dir}/tmp; fastcgi_temp_path {dir}/tmp;
    uwsgi_temp_path {dir}/tmp; scgi_temp_path {dir}/tmp;
    server {{
        listen 127.0.0.1:{port};
        root {dir}/root;
        dav_methods PUT;
        create_full_put_path on;
    }}
}}
"""


def start_dav(servers: Servers, directory: Path) -> str:
    """nginx accepting PUTs into ``directory/root`` (with a nix-cache-info), by PID in ``servers``."""
    (directory / "root").mkdir(parents=True)
    (directory / "tmp").mkdir()
    (directory / "root" / "nix-cache-info").write_text("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n")
    port = free_port()
    conf = directory / "nginx.conf"
    conf.write_text(DAV_CONF.format(user=pwd.getpwuid(os.getuid()).pw_name, dir=directory, port=port))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    servers.procs.append(subprocess.Popen([nginx, "-c", str(conf), "-p", str(directory)], stderr=subprocess.DEVNULL))
    wait_port(port)
    return f"http://127.0.0.1:{port}"


SIDES = ("nar-bridge", "file://", "nginx-dav")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--large-mib", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="nar-bridge --workers (default: its own)")
    parser.add_argument("--seed", type=int, default=20261207)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    for tool in ("nix", "nix-store"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed (scripts/system-deps.sh bench)")
    parent = args.workdir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bridge-push-", dir=parent)).absolute()
    try:
        facts = base_facts(workdir)
        facts["nix_version"] = run(["nix-store", "--version"]).strip()
        print(f"generating {args.small} small + {args.large_mib} MiB paths in {workdir} ...", flush=True)
        store, paths = make_paths(workdir, args.small, args.large_mib, args.seed)
        times: dict[str, list[float]] = {side: [] for side in SIDES}
        for r in range(args.runs):
            for side in SIDES[r % 3 :] + SIDES[: r % 3]:  # each side goes first in turn
                env = nix_env(workdir, f"copy-{side[:4]}-{r}")
                servers = Servers(workdir / f"{side[:4]}-{r}")
                try:
                    if side == "nar-bridge":
                        (workdir / f"{side[:4]}-{r}").mkdir()
                        extra = [] if args.workers is None else ["--workers", str(args.workers)]
                        url = servers.start_bridge(extra) + "?compression=none"
                    elif side == "nginx-dav":
                        url = start_dav(servers, workdir / f"{side[:4]}-{r}") + "?compression=none"
                    else:
                        url = f"file://{workdir / f'cache-{r}'}?compression=none"
                    t0 = time.perf_counter()
                    run(["nix", "copy", "--store", str(store), "--to", url, *paths], env)
                    times[side].append(time.perf_counter() - t0)
                    if side == "nar-bridge":  # the upload is complete: every narinfo names Nix's NarHash
                        base = url.partition("?")[0]
                        for p in paths:
                            info = NarInfo.parse(fetch(f"{base}/{p[11:43]}.narinfo").decode())
                            assert str(info.store_path) == p, (info.store_path, p)
                finally:
                    servers.stop()
                print(f"round {r + 1} {side:10}: {times[side][-1]:.3f} s", flush=True)
        medians = {side: statistics.median(t) for side, t in times.items()}
        ours, peer, dav = medians["nar-bridge"], medians["file://"], medians["nginx-dav"]
        print(f"\nnix copy of {len(paths)} paths (medians): nar-bridge {ours:.2f} s, file:// {peer:.2f} s, ", end="")
        print(f"nginx WebDAV {dav:.2f} s; bridge / file:// {ours / peer:.2f}x, / WebDAV {ours / dav:.2f}x")
        facts["loadavg_end"] = os.getloadavg()
        report: dict[str, Any] = {"facts": facts, "paths": len(paths), "seconds": times, "medians": medians}
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

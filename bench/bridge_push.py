#!/usr/bin/env python3
"""Benchmark: ``nix copy --to http://BRIDGE`` against ``nix copy --to file://CACHE`` of the same paths.

Run from the repository root::

    .venv/bin/python bench/bridge_push.py [--workdir DIR] [--small 200] [--large-mib 64] [--runs 3]
                                          [--tree-files N] [--workers N] [--compare-src SRC] [--no-floors]
                                          [--json OUT]

Setup (not timed): a throwaway chroot Nix store gets ``--small`` small files
(1-8 KiB) and one ``--large-mib`` MiB file (half random, half 4 bits of
entropy per byte), each a store path via ``nix-store --add``; with ``--tree-files N``
one more path, a tree of N files (100 B to 16 KiB) in 50 directories.

Each round, rotating which side goes first, times one ``nix copy`` of all
the paths (uncompressed, ``?compression=none`` on both sides):

* **nar-bridge**: into a fresh embedded store through a freshly started
  ``nixcas nar-bridge --allow-writes`` (started before the clock starts); every
  upload it accepts is durable (blobs synced, SQLite commits with
  ``synchronous=FULL``) before its 2xx;
* **file://**: into a fresh directory (what Nix's own binary-cache writer does;
  it does not fsync);
* **nginx WebDAV** (for information: the floor of the HTTP protocol itself): the
  same ``nix copy --to http://…`` into nginx with ``dav_methods PUT``, which
  stores each uploaded file as it comes, checking nothing and syncing nothing;
* **floor-sync** (the durable floor): ``bench/put_floor.py``, a minimal asyncio
  server appending each PUT to one log file and ``fdatasync``-ing it before the
  2xx (one durable write a request, nothing checked); **floor-nosync** the same
  without the ``fdatasync`` (Python's HTTP handling alone);
* **before** (with ``--compare-src SRC``): the bridge run from other sources.

The bridge's and the floors' CPU time (their process trees) during each copy is
reported too.

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
from bridge import FOUR_BITS, Servers, fetch, free_port, nix_env, run, tree_cpu, wait_port
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


def start_floor(servers: Servers, directory: Path, sync: bool) -> str:
    """``bench/put_floor.py`` (one ``fdatasync`` a PUT, or none) serving ``directory``, by PID in ``servers``."""
    directory.mkdir(parents=True)
    port = free_port()
    argv = [sys.executable, str(Path(__file__).with_name("put_floor.py")), str(directory), str(port)]
    proc = subprocess.Popen([*argv, *([] if sync else ["--no-sync"])], stdout=subprocess.DEVNULL)
    servers.procs.append(proc)
    servers.pids[f"http://127.0.0.1:{port}"] = proc.pid
    wait_port(port)
    return f"http://127.0.0.1:{port}"


SIDES = ("nar-bridge", "before", "file://", "nginx-dav", "floor-sync", "floor-nosync")
"""``before`` only with ``--compare-src``."""


def start_side(side: str, servers: Servers, directory: Path, args: argparse.Namespace) -> str:
    """Start the server of ``side`` (if it has one): the URL ``nix copy --to`` gets."""
    if side in ("nar-bridge", "before"):
        directory.mkdir()
        extra = [] if args.workers is None else ["--workers", str(args.workers)]
        return servers.start_bridge(extra, src=args.compare_src if side == "before" else None)
    if side == "nginx-dav":
        return start_dav(servers, directory)
    if side.startswith("floor-"):
        return start_floor(servers, directory, side == "floor-sync")
    return f"file://{directory}"


def settled_cpu(pid: int) -> float:
    """The CPU time of ``pid``'s process tree once it stopped growing (every worker started): the copy's start."""
    before = tree_cpu(pid)
    for _ in range(50):
        time.sleep(0.1)
        now = tree_cpu(pid)
        if now - before < 0.005:
            return now
        before = now
    return before


def check_upload(base: str, paths: list[str]) -> None:
    """Every path's narinfo is served, naming the path (the upload is complete)."""
    for p in paths:
        info = NarInfo.parse(fetch(f"{base}/{p[11:43]}.narinfo").decode())
        assert str(info.store_path) == p, (info.store_path, p)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--large-mib", type=int, default=64)
    parser.add_argument("--tree-files", type=int, default=0, help="one more path: a tree of this many files")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="nar-bridge --workers (default: its own)")
    parser.add_argument("--compare-src", default=None, help="also push into a bridge from these sources, as 'before'")
    parser.add_argument("--no-floors", action="store_true", help="skip the put_floor.py sides")
    parser.add_argument("--seed", type=int, default=20261207)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    for tool in ("nix", "nix-store"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed (scripts/system-deps.sh bench)")
    sides = [s for s in SIDES if (s != "before" or args.compare_src) and not (args.no_floors and "floor" in s)]
    parent = args.workdir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bridge-push-", dir=parent)).absolute()
    try:
        facts = base_facts(workdir)
        facts["nix_version"] = run(["nix-store", "--version"]).strip()
        tree = f" + a tree of {args.tree_files} files" if args.tree_files else ""
        print(f"generating {args.small} small{tree} + {args.large_mib} MiB paths in {workdir} ...", flush=True)
        store, paths = make_paths(workdir, args.small, args.large_mib, args.seed, args.tree_files)
        shutil.rmtree(workdir / "src")  # added to the store: the sources are not needed any more
        times: dict[str, list[float]] = {side: [] for side in sides}
        cpu: dict[str, list[float]] = {side: [] for side in sides if side != "file://"}
        loads: list[float] = []
        for r in range(args.runs):
            loads.append(os.getloadavg()[0])
            for side in sides[r % len(sides) :] + sides[: r % len(sides)]:  # each side goes first in turn
                env = nix_env(workdir, f"copy-{side[:6]}-{r}")
                directory = workdir / f"{side.replace('/', '').replace(':', '')}-{r}"
                servers = Servers(directory)
                try:
                    base = start_side(side, servers, directory, args)
                    pid = servers.procs[0].pid if servers.procs else None
                    cpu0 = settled_cpu(pid) if pid is not None else 0.0
                    t0 = time.perf_counter()
                    run(["nix", "copy", "--store", str(store), "--to", base + "?compression=none", *paths], env)
                    times[side].append(time.perf_counter() - t0)
                    if pid is not None:
                        cpu[side].append(tree_cpu(pid) - cpu0)
                    if side in ("nar-bridge", "before", "floor-sync"):
                        check_upload(base, paths)
                finally:
                    servers.stop()
                    shutil.rmtree(directory, ignore_errors=True)  # one side's copy on disk at a time
                shown = f", server CPU {cpu[side][-1]:.2f} s" if side in cpu else ""
                print(f"round {r + 1} {side:12}: {times[side][-1]:.3f} s{shown}", flush=True)
        medians = {side: statistics.median(t) for side, t in times.items()}
        peer = medians["file://"]
        load = f"load average {min(loads):.1f}-{max(loads):.1f}"
        print(f"\nnix copy of {len(paths)} paths, medians of {args.runs} ({load}):")
        for side in sides:
            shown = f", server CPU {statistics.median(cpu[side]):.2f} s" if side in cpu else ""
            print(f"  {side:12} {medians[side]:7.3f} s  {medians[side] / peer:5.2f}x file://{shown}")
        facts["loadavg_rounds"] = loads
        facts["loadavg_end"] = os.getloadavg()
        report: dict[str, Any] = {
            "facts": facts, "paths": len(paths), "seconds": times, "server_cpu": cpu, "medians": medians,
        }  # fmt: skip
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

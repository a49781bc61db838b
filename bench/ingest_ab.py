"""Before/after: two source trees of nixcas and the native peer, alternating in one run.

Run from the repository root, with ``BASE`` a checkout's ``src`` directory (e.g.
``git archive OLD src | tar -x -C /tmp/base``)::

    .venv/bin/python bench/ingest_ab.py tree --base /tmp/base/src [--tree tiny --files 20000] [--command import]
    .venv/bin/python bench/ingest_ab.py nar --base /tmp/base/src [--tree tiny --files 20000]

``tree``: the rounds of ``bench/import_tree.py`` (its tree generators and its
``Bench``: a fresh store per nixcas run, the tree renamed each round so that
``nix-store --add`` really adds, an untimed ``sync`` before each run, the store
path or root checked), with two nixcas runs per round — the ``--base`` sources
and this checkout's, in alternating order — then ``nix-store --add``.

``nar``: the tree's NAR (``nix-store --dump``, once) is fed to ``ingest_nar``
from a file in 1 MiB reads, into a fresh embedded store (``--store-dir``
layout) in a child process per run (wall and CPU of ``ingest_nar`` alone, its
final ``syncfs`` included); the peer is ``nix-store --restore`` of the same NAR
into a fresh directory followed by ``sync -f`` of that file system.

Nothing is deleted until the end (see "Measuring on this machine" in BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

import import_tree  # noqa: E402  (a sibling script)

NAR_CHILD = """
import asyncio, sys, time, tempfile
from nixcas.api import open_store
from nixcas.store.nar.ingest import ingest_nar

async def blocks(path):
    with open(path, "rb") as f:
        while block := await asyncio.to_thread(f.read, 1 << 20):
            yield block

async def main():
    store = await open_store(sys.argv[2])
    t0, c0 = time.perf_counter(), time.process_time()
    node, size, sha256 = await ingest_nar(blocks(sys.argv[1]), store.blobs, store.directories)
    print(f"{time.perf_counter() - t0} {time.process_time() - c0} {size} {sha256.hex()}")
    await store.close()

asyncio.run(main())
"""


def summary(results: dict[str, list[tuple[float, float]]], peer: str) -> None:
    theirs = statistics.median(w for w, _ in results[peer])
    for tool, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        paired = statistics.median(a[0] / b[0] for a, b in zip(runs, results[peer], strict=True))
        print(
            f"{tool:22s} median {wall:6.2f} s (min {min(w for w, _ in runs):.2f}), CPU {cpu:.2f} s, "
            f"ratio {wall / theirs:.2f}x, paired {paired:.2f}x"
        )


def run_floor(
    bench: import_tree.Bench, store_parent: Path, index: int, threads: int = 1, chunk: bool = False
) -> import_tree.ChildResult:
    """``bench/import_floor.py`` (on ``threads`` threads; ``chunk``: large files cut and hashed as chunks) into a new
    directory (after an untimed ``sync``); its NAR hash must be Nix's."""
    store = tempfile.mkdtemp(dir=store_parent, prefix=".nixcas-floor-")
    os.sync()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    floor = [sys.executable, str(REPO / "bench" / "import_floor.py"), "--threads", str(threads)]
    if chunk:
        floor.append("--chunk")
    r = import_tree.run_child([*floor, str(bench.tree), store], env)
    import_tree.check_ok(r)
    if bench.nix_nar_hash is not None and f"sha256:{r.stdout.strip()}" != bench.nix_nar_hash:
        raise SystemExit(f"round {index}: the floor's NAR hash {r.stdout.strip()} is not Nix's {bench.nix_nar_hash}")
    return r


def run_tree(args: argparse.Namespace, workdir: Path) -> None:
    tree = workdir / "tree"
    stats = import_tree.make_tree(args.tree, tree, args.files, args.large, args.large_mib)
    print(f"tree {args.tree}: {stats.small_files + stats.large_files} files, {stats.content_bytes / 2**20:.1f} MiB")
    bench = import_tree.Bench(
        tree, workdir, args.nixcas, args.nix_store, delete_between=False, store_parent=args.store_parent,
        command=args.command,
    )  # fmt: skip
    sources = {"nixcas before": str(args.base), "nixcas after": str(REPO / "src")}
    peers = ["nix-store --add", *(["floor", "floor-2t", "floor-2t-cdc"] if args.floor else [])]
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in [*sources, *peers]}
    try:
        for i in range(args.runs + 1):
            bench.rename_tree(f"tree-{os.getpid()}-{i}")  # a new store path, even beside kept ones
            order = list(sources) if i % 2 == 0 else list(sources)[::-1]
            for tool in [*order, *peers]:
                r: import_tree.Run | import_tree.ChildResult
                if tool in sources:
                    os.environ["PYTHONPATH"] = sources[tool]
                    r = bench.run_nixcas(i, i == 0)
                elif tool.startswith("floor"):
                    r = run_floor(bench, args.store_parent, i, 1 if tool == "floor" else 2, tool.endswith("-cdc"))
                else:
                    r = bench.run_nix(i, i == 0)
                cpu = r.user_seconds + r.system_seconds
                print(f"{'warm-up' if i == 0 else i} {tool:16s} {r.seconds:6.2f} s  CPU {cpu:.2f} s  "
                      f"RSS {r.maxrss_kib / 1024:.0f} MiB", flush=True)  # fmt: skip
                if i:
                    results[tool].append((r.seconds, cpu))
        print(f"load average at the end: {os.getloadavg()}")
        summary(results, "nix-store --add")
    finally:
        if args.no_delete:
            print(f"deleted nothing: {workdir}, the stores and nix paths {' '.join(bench.nix_paths)}")
        else:
            bench.cleanup()


def run_nar(args: argparse.Namespace, workdir: Path) -> None:
    tree = workdir / "tree"
    stats = import_tree.make_tree(args.tree, tree, args.files, args.large, args.large_mib)
    nar = workdir / "tree.nar"
    with open(nar, "wb") as dump:
        subprocess.run([args.nix_store, "--dump", str(tree)], stdout=dump, check=True)
    print(f"tree {args.tree}: {stats.small_files + stats.large_files} files, NAR {nar.stat().st_size / 2**20:.1f} MiB")
    sources = {"ingest_nar before": str(args.base), "ingest_nar after": str(REPO / "src")}
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in [*sources, "nix-store --restore"]}
    env = dict(os.environ)
    made: list[str] = []
    answers: set[str] = set()
    try:
        for i in range(args.runs + 1):
            order = list(sources) if i % 2 == 0 else list(sources)[::-1]
            for tool in [*order, "nix-store --restore"]:
                target = tempfile.mkdtemp(dir=args.store_parent, prefix=".nixcas-ab-")
                made.append(target)
                os.sync()
                if tool in sources:
                    env["PYTHONPATH"] = sources[tool]
                    argv = [sys.executable, "-c", NAR_CHILD, str(nar), target]
                    out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout.split()
                    wall, cpu = float(out[0]), float(out[1])
                    answers.add(" ".join(out[2:]))
                else:
                    start = time.perf_counter()
                    with open(nar, "rb") as f:
                        subprocess.run([args.nix_store, "--restore", f"{target}/out"], stdin=f, check=True)
                    subprocess.run(["sync", "-f", target], check=True)
                    wall, cpu = time.perf_counter() - start, 0.0
                print(f"{'warm-up' if i == 0 else i} {tool:20s} {wall:6.2f} s  CPU {cpu:.2f} s", flush=True)
                if i:
                    results[tool].append((wall, cpu))
        if len(answers) != 1:
            raise SystemExit(f"NAR size and SHA-256 differ between runs: {answers}")
        print(f"load average at the end: {os.getloadavg()}  (nix-store --restore's CPU is not measured: 0)")
        summary(results, "nix-store --restore")
    finally:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["tree", "nar"])
    p.add_argument("--base", type=Path, required=True, help="the 'before' sources (a checkout's src directory)")
    p.add_argument("--tree", default="tiny", help="as bench/import_tree.py: tiny, generated or copy:PATH")
    p.add_argument("--files", type=int, default=None)
    p.add_argument("--large", type=int, default=8)
    p.add_argument("--large-mib", type=int, default=64)
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--command", choices=["ingest", "import"], default="ingest")
    p.add_argument(
        "--floor",
        action="store_true",
        help="tree: also run bench/import_floor.py in every round (one and two threads, two chunking large files)",
    )
    p.add_argument(
        "--no-delete",
        action="store_true",
        help="tree: keep the trees, stores and nix paths (delete later: ~15 GB a run on the generated tree)",
    )
    p.add_argument("--store-parent", type=Path, default=Path("/nix/store"))
    p.add_argument("--nixcas", default=str(REPO / ".venv" / "bin" / "nixcas"))
    p.add_argument("--nix-store", default="nix-store")
    args = p.parse_args()
    print(f"load average at the start: {os.getloadavg()}")
    workdir = Path(tempfile.mkdtemp(prefix="nixcas-ab-", dir="/var/tmp"))
    try:
        (run_tree if args.what == "tree" else run_nar)(args, workdir)
    finally:
        if not args.no_delete:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

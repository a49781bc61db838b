#!/usr/bin/env python3
"""Benchmark: ``nixcas dump-path`` against ``nix-store --dump`` of the same store path.

Run from the repository root::

    .venv/bin/python bench/dump_path.py [--tree generated|tiny|copy:PATH] [--runs 7] [--workdir DIR] [--json OUT]
        [--reuse DIR --path STORE_PATH] [--baseline NIXCAS]

The tree (the generators of ``bench/import_tree.py``) is added once with
``nix-store --add`` and imported once into a fresh embedded nixcas store
(both untimed); the store paths must be equal.  Each tool's NAR is checked
once (same SHA-256).  Then the tools alternate, each writing the NAR of the
path to ``/dev/null`` as a child process (start-up, opening the store, the
PathInfo lookup and every byte's BLAKE3 check included for nixcas); wall
time and CPU of the child from ``os.wait4``.  One untimed warm-up each, so
both read from the page cache.

``--no-delete`` keeps the tree, the store and the store path; ``--reuse DIR --path P`` measures
them again without adding or importing anything (the NARs are still compared).  ``--baseline
NIXCAS`` runs another ``nixcas`` (say, an older checkout's) as one more peer in the same rounds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from import_tree import REPO, make_tree


def timed(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system) of ``argv`` with stdout on /dev/null."""
    with open(os.devnull, "wb") as null:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=null, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(argv)}: {proc.stderr.read().decode() if proc.stderr else ''}")
    if proc.stderr is not None:
        proc.stderr.close()
    return seconds, usage.ru_utime + usage.ru_stime


def summarize(runs: dict[str, list[tuple[float, float]]]) -> tuple[dict[str, Any], float, float]:
    """Each tool's median and minimum wall time and median CPU; nixcas / nix-store by median and paired by round."""
    summary: dict[str, Any] = {}
    for name, rs in runs.items():
        summary[name] = {
            "median_s": statistics.median(r[0] for r in rs),
            "min_s": min(r[0] for r in rs),
            "median_cpu_s": statistics.median(r[1] for r in rs),
        }
    ratio = summary["nixcas"]["median_s"] / summary["nix-store"]["median_s"]
    paired = statistics.median(a[0] / b[0] for a, b in zip(runs["nixcas"], runs["nix-store"], strict=True))
    return summary, ratio, paired


def print_summary(summary: dict[str, Any]) -> None:
    """The summary as a Markdown table."""
    print("| tool | median s | min s | median CPU s |")
    print("|---|---:|---:|---:|")
    for name, s in summary.items():
        print(f"| {name} | {s['median_s']:.3f} | {s['min_s']:.3f} | {s['median_cpu_s']:.3f} |")


def sha256_of(argv: list[str]) -> str:
    h = hashlib.sha256()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as proc:
        assert proc.stdout is not None
        while block := proc.stdout.read(1 << 20):
            h.update(block)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(argv)}")
    return h.hexdigest()


def setup(args: argparse.Namespace) -> tuple[Path, str, Path, Path, str]:
    """A new tree added with ``nix-store --add`` and imported into a new nixcas store (work dir, path, tree, store)."""
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dump-path-", dir=args.workdir))
    tree = work / "tree"
    stats = make_tree(args.tree, tree, args.files, args.large, args.large_mib)
    store = work / "nixcas"
    nix_path = subprocess.run([args.nix_store, "--add", str(tree)], check=True, capture_output=True, text=True)
    path = nix_path.stdout.strip()
    ours = subprocess.run(
        [args.nixcas, "--store-dir", str(store), "import", str(tree)], check=True, capture_output=True, text=True
    ).stdout.strip()
    if ours != path:
        raise SystemExit(f"store paths differ: nixcas {ours}, nix-store {path}")
    return work, path, tree, store, f"{stats.small_files} files, {stats.content_bytes / 1e6:.1f} MB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", default="generated", help="generated | tiny | copy:PATH (see bench/import_tree.py)")
    p.add_argument("--files", type=int, default=None, help="files of the generated/tiny tree (10,000 / 20,000)")
    p.add_argument("--large", type=int, default=8)
    p.add_argument("--large-mib", type=int, default=64)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    p.add_argument("--json", type=Path)
    p.add_argument("--no-delete", action="store_true", help="keep the store path, the tree and the store")
    p.add_argument("--nixcas", default=str(REPO / ".venv" / "bin" / "nixcas"))
    p.add_argument("--nix-store", default=shutil.which("nix-store") or "nix-store")
    p.add_argument("--reuse", type=Path, help="the work directory of an earlier --no-delete run (with --path)")
    p.add_argument("--path", help="its store path")
    p.add_argument("--baseline", help="another nixcas command, measured as one more peer")
    args = p.parse_args()
    if args.reuse is not None:
        work, path = args.reuse, args.path
        tree, store = work / "tree", work / "nixcas"
        files = sum(len(names) for _, _, names in os.walk(tree))
        size = sum(os.lstat(os.path.join(d, n)).st_size for d, _, names in os.walk(tree) for n in names)
        described = f"{files} files, {size / 1e6:.1f} MB"
    else:
        work, path, tree, store, described = setup(args)
    nixcas = [args.nixcas, "--store-dir", str(store), "dump-path", path]
    nix = [args.nix_store, "--dump", path]
    tools = [("nixcas", nixcas), ("nix-store", nix)]
    if args.baseline:
        tools.append(("baseline", [args.baseline, "--store-dir", str(store), "dump-path", path]))
    expected = sha256_of(nix)
    for name, argv in tools:
        if sha256_of(argv) != expected:
            raise SystemExit(f"the NARs differ: {name}")
    floor = Path(__file__).resolve().parent / "dump_floor.py"  # (its own small process: bench/dump_floor.py)
    tools.append(("floor", [sys.executable, str(floor), str(store)]))
    tools.append(("floor-2t", [sys.executable, str(floor), str(store), "2"]))  # the two-core floor
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in tools}
    for i in range(args.runs + 1):
        for name, argv in tools:
            result = timed(argv)
            if i:
                runs[name].append(result)
    summary, ratio, paired = summarize(runs)
    print(f"tree {args.reuse or args.tree}: {described}; path {path}")
    print_summary(summary)
    print(f"ratio (median) {ratio:.2f}x, paired {paired:.2f}x; load average {os.getloadavg()}")
    cpu = summary["nixcas"]["median_cpu_s"] / summary["nix-store"]["median_cpu_s"]
    floor_ratio = summary["floor"]["median_s"] / summary["nix-store"]["median_s"]
    floor_2t = summary["floor-2t"]["median_s"] / summary["nix-store"]["median_s"]
    print(f"CPU ratio (median) {cpu:.2f}x; floor / nix-store {floor_ratio:.2f}x, on two threads {floor_2t:.2f}x")
    if args.baseline:
        before = summary["baseline"]["median_s"] / summary["nix-store"]["median_s"]
        print(f"baseline / nix-store (median) {before:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"tree": args.tree, "runs": runs, "summary": summary, "ratio": ratio}))
    if args.no_delete or args.reuse is not None:
        print(f"deleted nothing: {work}, {path}")
        return
    subprocess.run([args.nix_store, "--delete", path], capture_output=True, check=False)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

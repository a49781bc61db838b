#!/usr/bin/env python3
"""Benchmark: ``nixcas export`` against ``nix-store --dump | nix-store --restore`` of the same tree.

Run from the repository root::

    .venv/bin/python bench/export.py [--tree generated|tiny|copy:PATH] [--runs 5] [--link] [--workdir DIR] [--json OUT]

The tree (the generators of ``bench/import_tree.py``) is imported once into a
fresh embedded nixcas store (untimed).  Nix's side needs no store: ``nix-store
--dump TREE | nix-store --restore DEST`` is the same pipeline a store path
takes (Nix reads the files of the path and writes them out again, checking
nothing).  Then the tools alternate, each writing a new copy of the tree as a
child process (start-up, opening the store, the PathInfo lookup and every
byte's BLAKE3 check included for nixcas); wall time and CPU of the children
from ``os.wait4``.  One untimed warm-up each, so both read from the page
cache.  Each output is kept until the end (deleting thousands of files on this
machine's ext4 slows the next creations down: BENCHMARKS.md, "Measuring on
this machine"); the first pair of outputs is checked to be identical (the same
``nix-store --dump`` of both, and of the tree).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dump_path import print_summary, sha256_of, summarize, timed
from import_tree import PROBE_DIRS, REPO, create_probe, make_tree


def nar_sha256(nix_store: str, path: Path) -> str:
    return sha256_of([nix_store, "--dump", str(path)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", default="generated", help="generated | tiny | copy:PATH (see bench/import_tree.py)")
    p.add_argument("--files", type=int, default=None, help="files of the generated/tiny tree (10,000 / 20,000)")
    p.add_argument("--large", type=int, default=8)
    p.add_argument("--large-mib", type=int, default=64)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--link", action="store_true", help="nixcas export --link (hard links for repeated blobs)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    p.add_argument("--json", type=Path)
    p.add_argument("--no-delete", action="store_true", help="keep the tree, the store and every output")
    p.add_argument("--nixcas", default=str(REPO / ".venv" / "bin" / "nixcas"))
    p.add_argument("--nix-store", default=shutil.which("nix-store") or "nix-store")
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="export-", dir=args.workdir))
    tree = work / "tree"
    stats = make_tree(args.tree, tree, args.files, args.large, args.large_mib)
    need = stats.content_bytes * 2 * (args.runs + 1) * 11 // 10  # every output is kept until the end
    free = shutil.disk_usage(work).free
    if free < need + (4 << 30):
        shutil.rmtree(work, ignore_errors=True)
        raise SystemExit(f"{work}: {free >> 20} MiB free, the outputs need {need >> 20} MiB (and 4 GiB to spare)")
    store = work / "nixcas"
    path = subprocess.run(
        [args.nixcas, "--store-dir", str(store), "import", str(tree)], check=True, capture_output=True, text=True
    ).stdout.strip()
    outputs = work / "out"
    outputs.mkdir()
    probe = create_probe(outputs)
    link = ["--link"] if args.link else []

    def nixcas(dest: Path) -> list[str]:
        return [args.nixcas, "--store-dir", str(store), "export", *link, path, str(dest)]

    def nix(dest: Path) -> list[str]:
        pipeline = f"{args.nix_store} --dump {tree} | {args.nix_store} --restore {dest}"
        return ["bash", "-o", "pipefail", "-c", pipeline]

    runs: dict[str, list[tuple[float, float]]] = {"nixcas": [], "nix-store": []}
    for i in range(args.runs + 1):
        for name, argv in (("nixcas", nixcas(outputs / f"nixcas-{i}")), ("nix-store", nix(outputs / f"nix-{i}"))):
            result = timed(argv)
            if i:
                runs[name].append(result)
        if i == 0:
            want = nar_sha256(args.nix_store, tree)
            for out in (outputs / "nixcas-0", outputs / "nix-0"):
                if nar_sha256(args.nix_store, out) != want:
                    raise SystemExit(f"{out} differs from the tree")
    summary, ratio, paired = summarize(runs)
    print(
        f"tree {args.tree}: {stats.small_files} files, {stats.content_bytes / 1e6:.1f} MB; "
        f"file-creation probe {probe:.1f} µs{'; --link' if args.link else ''}"
    )
    print_summary(summary)
    print(
        "runs (nixcas, nix-store): "
        + ", ".join(f"{a[0]:.3f}/{b[0]:.3f}" for a, b in zip(runs["nixcas"], runs["nix-store"], strict=True))
    )
    print(f"ratio (median) {ratio:.2f}x, paired {paired:.2f}x; load average {os.getloadavg()}")
    if args.json:
        args.json.write_text(
            json.dumps({"tree": args.tree, "link": args.link, "probe_us": probe, "runs": runs, "summary": summary})
        )
    if args.no_delete:
        print(f"deleted nothing: {work}")
        return
    shutil.rmtree(work, ignore_errors=True)
    for d in PROBE_DIRS:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()

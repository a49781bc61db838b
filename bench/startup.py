"""Benchmark: start-up of everyday commands, against the matching native Nix command.

A throw-away chroot Nix store (``nix-store --store DIR --add``) and a nixcas
store (``nixcas --store-dir DIR import``) get the same two paths: a small
directory tree and a small file.  Then ``--runs`` rounds, each running every
pair once in alternating order (hyperfine style, child processes, standard
output discarded), and the median wall time of each side (also its minimum,
and its median user + system CPU time, which a busy machine inflates less):

=========================  ==============================================
nixcas                     peer
=========================  ==============================================
``nixcas --version``       ``true``, ``python -c pass``
``nixcas path-info P``     ``nix-store --query --hash P``
``nixcas castore ls D``    ``nix-store --query --references P``
``nixcas castore cat B``   ``nix-store --dump F`` (F: the small file's path in the chroot)
=========================  ==============================================

Each store command also has *floor* rows: this Python importing the two
libraries any reader of this store cannot do without (sqlite3 for the
indexes, blake3 to verify what it reads) and doing nothing else, and this
Python without ``site`` (``-S``) doing nothing at all.  Their ratios show how
much of the time is the interpreter itself.  (These three commands run on the
read-only fast path, :mod:`nixcas.cli.fast`: no click, asyncio or protobuf.)

With ``--baseline SRC`` every nixcas command is also run with ``PYTHONPATH=SRC``
(say, an older checkout's ``src``) as one more peer in the same rounds.

Targets (issue "[perf]", part 3): ``--version`` ≤ 50 ms; the others ≤ 3x their
peer.  Before timing, each pair's answers are checked against each other (the
NAR hash ``path-info`` prints is the one ``nix-store --query --hash`` prints, and
``castore cat`` writes the file's bytes), so both sides do the work asked.

Python's bytecode cache is left on for the children (``PYTHONDONTWRITEBYTECODE``
is dropped from their environment) and two warm-up rounds fill it, as an
installed nixcas has its ``.pyc`` files.  The nixcas command defaults to the
console script next to this Python (``nixcas``), which imports the sources on
``PYTHONPATH`` first.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

VERSION_TARGET_S = 0.050
RATIO_TARGET = 3.0


@dataclass
class Pair:
    """One nixcas command and its peer(s); wall times in seconds per run."""

    what: str
    nixcas: list[str]
    peers: dict[str, list[str]]
    target: str
    times: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    """User + system CPU seconds of each run (less sensitive than wall time to a shared machine)."""

    def commands(self) -> dict[str, list[str]]:
        return {"nixcas": self.nixcas, **self.peers}


def nix_env(home: Path) -> dict[str, str]:
    """Nix isolated from the machine's state: private HOME and caches, no substituters."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIX_")}
    env["HOME"] = str(home / "home")
    env["XDG_CACHE_HOME"] = str(home / "cache")
    env["XDG_CONFIG_HOME"] = str(home / "config")
    env["NIX_CONFIG"] = "experimental-features = nix-command\nsandbox = false\nsubstituters =\n"
    return env


def child_env(home: Path) -> dict[str, str]:
    """The environment of every timed command: Nix's isolation, bytecode cache on, no store overrides."""
    env = nix_env(home)
    for name in ("PYTHONDONTWRITEBYTECODE", "BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR", "PATH_INFO_SERVICE_ADDR"):
        env.pop(name, None)
    env.pop("NIXCAS_COMPOSITION", None)
    return env


def output(argv: list[str], env: dict[str, str]) -> bytes:
    result = subprocess.run(argv, capture_output=True, env=env, check=False, timeout=120)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr.decode(errors='replace')}")
    return result.stdout


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one run of ``argv``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, check=False)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr.decode(errors='replace')}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def default_nixcas() -> list[str]:
    script = Path(sys.executable).parent / "nixcas"
    return [str(script)] if script.exists() else [sys.executable, "-m", "nixcas.cli.main"]


def make_source(root: Path) -> tuple[Path, Path]:
    """A small tree (files, an executable, a symlink, a sub-directory) and a small file."""
    tree = root / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "hello").write_bytes(b"#!/bin/sh\necho hello\n")
    (tree / "bin" / "hello").chmod(0o755)
    for i in range(8):
        (tree / f"file-{i}.txt").write_bytes(f"small file {i}\n".encode() * (i + 1))
    (tree / "link").symlink_to("bin/hello")
    small = root / "small.txt"
    small.write_bytes(b"a small blob, written by castore cat\n" * 10)
    return tree, small


def setup(workdir: Path, nixcas: list[str], env: dict[str, str]) -> list[Pair]:
    nix_store = shutil.which("nix-store")
    if nix_store is None:
        raise SystemExit("nix-store not found (Debian nix-bin; `scripts/system-deps.sh bench`)")
    chroot = workdir / "nix-chroot"
    store_dir = workdir / "nixcas-store"
    tree, small = make_source(workdir / "src")
    nix = [nix_store, "--store", str(chroot)]
    nix_paths = output([*nix, "--add", str(tree), str(small)], env).decode().split()
    ours = [*nixcas, "--store-dir", str(store_dir)]
    our_paths = output([*ours, "import", str(tree), str(small)], env).decode().split()
    if nix_paths != our_paths:
        raise SystemExit(f"store paths differ: nix-store {nix_paths}, nixcas {our_paths}")
    tree_path, small_path = our_paths
    info = json.loads(output([*ours, "path-info", "--json", tree_path], env))
    root = info["rootNode"]["digest"]
    small_info = json.loads(output([*ours, "path-info", "--json", small_path], env))
    blob = small_info["rootNode"]["digest"]

    # Both sides give the same answers, so both do the work asked.
    nix_hash = output([*nix, "--query", "--hash", tree_path], env).decode().strip()
    our_hash = output([*ours, "path-info", tree_path], env).decode()
    if f"NarHash: {nix_hash}\n" not in our_hash:
        raise SystemExit(f"NAR hashes differ: nix-store {nix_hash}, nixcas {our_hash!r}")
    if output([*ours, "castore", "cat", blob], env) != small.read_bytes():
        raise SystemExit("castore cat did not write the small file's bytes")
    listing = output([*ours, "castore", "ls", root], env).decode().splitlines()
    if len(listing) != len(os.listdir(tree)):
        raise SystemExit(f"castore ls listed {len(listing)} entries, the tree has {len(os.listdir(tree))}")

    return [
        Pair(
            "--version",
            [*nixcas, "--version"],
            {"true": ["true"], "python -c pass": [sys.executable, "-c", "pass"]},
            f"<= {VERSION_TARGET_S * 1000:.0f} ms",
        ),
        Pair(
            "path-info P",
            [*ours, "path-info", tree_path],
            {
                "nix-store --query --hash P": [*nix, "--query", "--hash", tree_path],
                **floor(),
            },
            f"<= {RATIO_TARGET:.0f}x",
        ),
        Pair(
            "castore ls D",
            [*ours, "castore", "ls", root],
            {"nix-store --query --references P": [*nix, "--query", "--references", tree_path], **floor()},
            f"<= {RATIO_TARGET:.0f}x",
        ),
        Pair(
            "castore cat B",
            [*ours, "castore", "cat", blob],
            {"nix-store --dump F": [nix_store, "--dump", f"{chroot}{small_path}"], **floor()},
            f"<= {RATIO_TARGET:.0f}x",
        ),
    ]


FLOOR_MODULES = ("sqlite3", "blake3")
"""What any reader of the embedded store loads: the indexes' database and BLAKE3, to verify what it reads."""


def floor() -> dict[str, list[str]]:
    """The floor: the interpreter loading what a reader cannot do without; the interpreter alone, without site."""
    return {
        "floor: python -c 'import " + ", ".join(FLOOR_MODULES) + "'": [
            sys.executable,
            "-c",
            "import " + ", ".join(FLOOR_MODULES),
        ],
        "floor: python -S -c pass": [sys.executable, "-S", "-c", "pass"],
    }


def add_baseline(pairs: list[Pair], src: Path) -> None:
    """Each nixcas command again with ``PYTHONPATH=src`` (through ``env``: ~1 ms more), as one more peer."""
    for pair in pairs:
        pair.peers[f"baseline: nixcas with {src.name}"] = ["env", f"PYTHONPATH={src}", *pair.nixcas]


def measure(pairs: list[Pair], runs: int, warmup: int, env: dict[str, str]) -> None:
    for index in range(warmup + runs):
        for pair in pairs:
            commands = list(pair.commands().items())
            if index % 2:
                commands.reverse()  # alternate who goes first
            for name, argv in commands:
                seconds, cpu = timed(argv, env)
                if index >= warmup:
                    pair.times.setdefault(name, []).append(seconds)
                    pair.cpu.setdefault(name, []).append(cpu)


def report(pairs: list[Pair]) -> tuple[list[dict[str, object]], bool]:
    rows: list[dict[str, object]] = []
    met = True
    print(
        f"{'nixcas':<16} {'median':>9} {'min':>9} {'cpu':>9}   {'peer':<52} {'median':>9} {'min':>9} {'cpu':>9}"
        f" {'ratio':>7}  target"
    )
    for pair in pairs:
        ours = statistics.median(pair.times["nixcas"])
        best = min(pair.times["nixcas"])
        our_cpu = statistics.median(pair.cpu["nixcas"])
        for peer in pair.peers:
            theirs = statistics.median(pair.times[peer])
            their_best = min(pair.times[peer])
            their_cpu = statistics.median(pair.cpu[peer])
            ratio = ours / theirs
            shown_only = peer.startswith(("floor:", "baseline:"))  # shown beside, not judged
            judged = not shown_only and (pair.what == "--version" or peer == next(iter(pair.peers)))
            ok = ours <= VERSION_TARGET_S if pair.what == "--version" else ratio <= RATIO_TARGET
            met = met and (ok or not judged)
            verdict = f"{pair.target} {'met' if ok else 'NOT met'}" if judged else ""
            if peer.startswith("floor:"):
                verdict = "(the floor of this stack)"
            elif peer.startswith("baseline:"):
                verdict = "(nixcas / baseline)"
            print(
                f"{pair.what:<16} {ours * 1000:>7.1f}ms {best * 1000:>7.1f}ms {our_cpu * 1000:>7.1f}ms   {peer:<52} "
                f"{theirs * 1000:>7.1f}ms {their_best * 1000:>7.1f}ms {their_cpu * 1000:>7.1f}ms"
                f" {ratio:>6.2f}x  {verdict}"
            )
            rows.append(
                {
                    "what": pair.what,
                    "peer": peer,
                    "nixcas_median_s": ours,
                    "nixcas_min_s": best,
                    "nixcas_cpu_median_s": our_cpu,
                    "peer_median_s": theirs,
                    "peer_min_s": their_best,
                    "peer_cpu_median_s": their_cpu,
                    "ratio": ratio,
                    "target": pair.target,
                    "met": ok if judged else None,
                    "nixcas_runs_s": pair.times["nixcas"],
                    "peer_runs_s": pair.times[peer],
                }
            )
    return rows, met


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=21, help="timed rounds (default 21)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--nixcas", nargs="+", default=None, help="nixcas command (default: the console script)")
    p.add_argument("--workdir", type=Path, help="work directory (default: a new temp dir, removed after)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument(
        "--baseline",
        type=Path,
        metavar="SRC",
        help="also time the same nixcas commands with PYTHONPATH=SRC (e.g. an older checkout's src), alternating",
    )
    args = p.parse_args()
    nixcas: list[str] = args.nixcas or default_nixcas()

    with tempfile.TemporaryDirectory(prefix="nixcas-startup-") as tmp:
        workdir: Path = args.workdir or Path(tmp)
        if args.workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)  # a chroot store has read-only directories: chmod first
        workdir.mkdir(parents=True, exist_ok=True)
        env = child_env(workdir)
        try:
            pairs = setup(workdir, nixcas, env)
            if args.baseline is not None:
                add_baseline(pairs, args.baseline.absolute())
            print(f"nixcas: {' '.join(nixcas)}; {args.runs} rounds (+{args.warmup} warm-up), median wall time")
            measure(pairs, args.runs, args.warmup, env)
        finally:
            subprocess.run(["chmod", "-R", "u+w", str(workdir)], check=False)  # Nix makes store paths read-only
        rows, met = report(pairs)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"runs": args.runs, "nixcas": nixcas, "results": rows}, indent=1))
    print("all targets met" if met else "some targets NOT met")


if __name__ == "__main__":
    main()

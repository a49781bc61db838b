#!/usr/bin/env python3
"""Benchmark: import a generated tree with ``nixcas castore ingest`` and with ``nix-store --add``.

Run from the repository root::

    .venv/bin/python bench/import_tree.py [--files 10000] [--large 8] [--large-mib 64] [--runs 3]
                                          [--workdir DIR] [--keep] [--json OUT] [--profile]
                                          [--seed N] [--delete-between]

The tree is generated deterministically from ``--seed``:

* ``--files`` small files of 1-16 KiB spread over ``tree/dNN/sNN/`` (20 x 20 leaf
  directories, so ~25 files per leaf, 20 entries in the upper levels); every
  10th file is executable; half of the files (chosen by the seeded RNG) are
  incompressible random bytes, the other half are "compressible": random bytes
  mapped onto a 16-letter alphabet (4 bits of entropy per byte, so zstd roughly
  halves them);
* one relative symlink to a sibling file in every 20th leaf directory, plus one
  dangling symlink at the top;
* ``--large`` files of ``--large-mib`` MiB under ``tree/large/``; even-numbered
  ones incompressible, odd-numbered ones compressible as above.

Both tools are driven as subprocesses.  Each child is reaped with
``os.wait4`` so that its own peak RSS (``ru_maxrss``, KiB on Linux) and CPU
times are recorded, and wall time is measured with ``time.perf_counter``
around ``Popen`` .. ``wait4``.  One untimed warm-up round of each tool comes
first (the tree is hot in the page cache for both), then the tools alternate
run by run (nixcas, nix-store, nixcas, ...), and ``sync`` is called (untimed)
before every run so that one tool's pending write-back is not charged to the
other (nixcas ends with a ``syncfs`` of its store's file system, which may
also be the file system of ``/nix/store``).

Both tools really write everything in every run: every nixcas run gets a
fresh, empty ``--store-dir``, and before every round the tree directory is
renamed (``tree-0``, ``tree-1``, ...), which gives ``nix-store --add`` a new
store path (same NAR hash, checked) each time.  All results are deleted at
the end (``nix-store --delete``, ``rm -r``).  ``--delete-between`` instead
deletes the previous nix path before each nix run and each nixcas store right
after its run, with a fixed tree name.  Beware: on ext4 *without a journal*,
creating inodes within a minute or so of deleting thousands makes every
create scan the recently deleted ones (``recently_deleted()`` in
``find_inode_bit``), which inflates the system time of later runs for both
tools; deferring the deletions avoids that, and for the same reason
invocations of this script (or anything else deleting many files on that
file system) should be at least 6 minutes apart (ext4 looks back 60 s, or
360 s while the inode table block is dirty).  The load average is recorded at
start and end to flag concurrent activity.

Only the standard library is used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SMALL_MIN = 1 << 10
SMALL_MAX = 16 << 10
FANOUT = 20
"""Entries per directory in the two upper levels (``dNN`` and ``sNN``)."""
EXEC_EVERY = 10
SYMLINK_EVERY_LEAF = 20
LARGE_BLOCK = 4 << 20
ALPHABET = b"etaoinshrdlucmfw"
COMPRESSIBLE_TABLE = bytes(ALPHABET[b & 0x0F] for b in range(256))
PROFILE_LINES = 30


# -- tree generation ---------------------------------------------------------------


@dataclass
class TreeStats:
    """What was generated."""

    root: str
    small_files: int = 0
    large_files: int = 0
    executables: int = 0
    symlinks: int = 0
    directories: int = 0
    content_bytes: int = 0
    compressible_bytes: int = 0
    generate_seconds: float = 0.0


def _content(rng: random.Random, size: int, compressible: bool) -> bytes:
    data = rng.randbytes(size)
    return data.translate(COMPRESSIBLE_TABLE) if compressible else data


def generate_tree(root: Path, n_files: int, n_large: int, large_mib: int, seed: int) -> TreeStats:
    """Write the benchmark tree at ``root`` (which must not exist)."""
    start = time.perf_counter()
    stats = TreeStats(root=str(root))
    rng = random.Random(seed)  # noqa: S311 - reproducible test data, not crypto
    root.mkdir(parents=True)
    stats.directories += 1
    leaves: list[Path] = []
    for i in range(FANOUT):
        top = root / f"d{i:02d}"
        top.mkdir()
        stats.directories += 1
        for j in range(FANOUT):
            leaf = top / f"s{j:02d}"
            leaf.mkdir()
            stats.directories += 1
            leaves.append(leaf)
    first_in_leaf: dict[int, str] = {}
    for k in range(n_files):
        leaf_index = k % len(leaves)
        name = f"f{k:05d}.dat"
        size = rng.randint(SMALL_MIN, SMALL_MAX)
        compressible = rng.random() < 0.5
        data = _content(rng, size, compressible)
        path = leaves[leaf_index] / name
        path.write_bytes(data)
        if k % EXEC_EVERY == 0:
            path.chmod(0o755)
            stats.executables += 1
        first_in_leaf.setdefault(leaf_index, name)
        stats.small_files += 1
        stats.content_bytes += size
        if compressible:
            stats.compressible_bytes += size
    for leaf_index, name in sorted(first_in_leaf.items()):
        if leaf_index % SYMLINK_EVERY_LEAF == 0:
            (leaves[leaf_index] / "link").symlink_to(name)
            stats.symlinks += 1
    (root / "dangling").symlink_to("does/not/exist")
    stats.symlinks += 1
    if n_large:
        large_dir = root / "large"
        large_dir.mkdir()
        stats.directories += 1
        size = large_mib << 20
        for k in range(n_large):
            compressible = k % 2 == 1
            with open(large_dir / f"big{k:02d}.bin", "wb") as f:
                remaining = size
                while remaining:
                    n = min(LARGE_BLOCK, remaining)
                    f.write(_content(rng, n, compressible))
                    remaining -= n
            stats.large_files += 1
            stats.content_bytes += size
            if compressible:
                stats.compressible_bytes += size
    stats.generate_seconds = time.perf_counter() - start
    return stats


def generate_tiny(root: Path, n_files: int, seed: int) -> TreeStats:
    """``n_files`` files of 1 B-1 KiB in 20 x 20 directories (half compressible), at ``root``."""
    start = time.perf_counter()
    stats = TreeStats(root=str(root))
    rng = random.Random(seed)  # noqa: S311 - reproducible test data, not crypto
    root.mkdir(parents=True)
    stats.directories += 1
    leaves = []
    for i in range(FANOUT):
        for j in range(FANOUT):
            leaf = root / f"d{i:02d}" / f"s{j:02d}"
            leaf.mkdir(parents=True)
            leaves.append(leaf)
    stats.directories += FANOUT + FANOUT * FANOUT
    for k in range(n_files):
        size = rng.randint(1, 1 << 10)
        compressible = rng.random() < 0.5
        (leaves[k % len(leaves)] / f"f{k:05d}").write_bytes(_content(rng, size, compressible))
        stats.small_files += 1
        stats.content_bytes += size
        stats.compressible_bytes += size if compressible else 0
    stats.generate_seconds = time.perf_counter() - start
    return stats


def copy_tree(source: Path, root: Path) -> TreeStats:
    """A copy of an existing directory (symlinks kept as symlinks), at ``root``."""
    start = time.perf_counter()
    shutil.copytree(source, root, symlinks=True)
    stats = TreeStats(root=str(root))
    for dirpath, dirnames, filenames in os.walk(root):
        stats.directories += 1
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if os.path.islink(os.path.join(dirpath, name)):
                stats.symlinks += 1
                continue
            stats.small_files += 1
            stats.content_bytes += st.st_size
            stats.executables += bool(st.st_mode & 0o100)
        stats.symlinks += sum(os.path.islink(os.path.join(dirpath, d)) for d in dirnames)
    stats.generate_seconds = time.perf_counter() - start
    return stats


# -- running children ----------------------------------------------------------------


@dataclass
class ChildResult:
    """One child process: what it printed and what it cost."""

    argv: list[str]
    returncode: int
    seconds: float
    maxrss_kib: int
    user_seconds: float
    system_seconds: float
    stdout: str
    stderr: str


def make_tree(spec: str, root: Path, files: int | None, large: int, large_mib: int, seed: int = 20240901) -> TreeStats:
    """The benchmarks' ``--tree``: ``tiny`` (``files`` or 20,000), ``copy:PATH``, or the generated tree (``files``
    or 10,000 small files plus ``large`` files of ``large_mib`` MiB)."""
    if spec == "tiny":
        return generate_tiny(root, files or 20_000, seed)
    if spec.startswith("copy:"):
        return copy_tree(Path(spec.removeprefix("copy:")), root)
    return generate_tree(root, files or 10_000, large, large_mib, seed)


def run_child(argv: list[str], env: dict[str, str] | None = None) -> ChildResult:
    """Run ``argv`` to completion; time it and read its own rusage via ``wait4``."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    return ChildResult(
        argv=argv,
        returncode=proc.returncode,
        seconds=seconds,
        maxrss_kib=usage.ru_maxrss,
        user_seconds=usage.ru_utime,
        system_seconds=usage.ru_stime,
        stdout=stdout,
        stderr=stderr,
    )


def check_ok(result: ChildResult) -> None:
    """Abort the benchmark if a child failed."""
    if result.returncode != 0:
        sys.stderr.write(
            f"command failed with exit code {result.returncode}: {' '.join(result.argv)}\n"
            f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}\n"
        )
        raise SystemExit(1)


@dataclass
class Run:
    """One timed (or warm-up) run of one tool."""

    tool: str
    index: int
    warmup: bool
    seconds: float
    maxrss_kib: int
    user_seconds: float
    system_seconds: float
    output: str
    extra: dict[str, Any] = field(default_factory=dict)


class Bench:
    """Drives the two tools against one tree.

    By default nothing is deleted until the end: every nixcas run gets a new
    store directory, and before every round the tree directory is renamed
    (``tree-0``, ``tree-1``, ...) so that ``nix-store --add`` yields a new store
    path (same NAR hash, different name) instead of finding the previous one.
    With ``delete_between`` the previous nix path is deleted with
    ``nix-store --delete`` before each nix run and each nixcas store is removed
    right after its run, keeping the tree name fixed.
    """

    def __init__(
        self,
        tree: Path,
        workdir: Path,
        nixcas: str,
        nix_store: str,
        *,
        delete_between: bool,
        warm_shards: bool = False,
        store_parent: Path | None = None,
        command: str = "ingest",
    ) -> None:
        self.command = command
        self.warm_shards = warm_shards
        self.store_parent = store_parent or workdir
        self.tree = tree
        self.workdir = workdir
        self.nixcas = nixcas
        self.nix_store = nix_store
        self.delete_between = delete_between
        self.runs: list[Run] = []
        self._store_counter = 0
        self._stores: list[Path] = []
        self.nixcas_root: dict[str, Any] | None = None
        self.nix_paths: list[str] = []
        self.nix_nar_hash: str | None = None

    def rename_tree(self, name: str) -> None:
        """Give the tree a new name (no-op with ``delete_between``)."""
        if self.delete_between or self.tree.name == name:
            return
        target = self.tree.with_name(name)
        os.rename(self.tree, target)
        self.tree = target

    def fresh_store_dir(self) -> Path:
        self._store_counter += 1
        path = self.store_parent / f".nixcas-bench-{os.getpid()}-{self._store_counter}"
        if path.exists():
            shutil.rmtree(path)
        path.mkdir()
        self._stores.append(path)
        if self.warm_shards:
            # A store that has seen a few hundred thousand blobs has every shard
            # directory already; create them (untimed) to measure that steady state.
            for kind in ("chunks", "blobs"):
                base = path / "blobs" / kind / "b3"
                base.mkdir(parents=True)
                for shard in range(1 << 16):
                    os.mkdir(base / f"{shard:04x}")
        return path

    def drop_store(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)
        self._stores.remove(path)

    def run_nixcas(self, index: int, warmup: bool) -> Run:
        store = self.fresh_store_dir()
        os.sync()
        if self.command == "import":
            argv = [self.nixcas, "--store-dir", str(store), "import", str(self.tree)]
        else:
            argv = [self.nixcas, "--store-dir", str(store), "castore", "ingest", str(self.tree), "--json"]
        result = run_child(argv)
        check_ok(result)
        if self.command == "import":
            # The same store path as nix-store --add of the same tree (checked after nix's run of the round).
            root: dict[str, Any] = {"store_path_name": result.stdout.strip().split("-", 1)[-1]}
        else:
            root = json.loads(result.stdout)
            if not isinstance(root, dict) or root.get("type") not in ("directory", "file"):
                raise SystemExit(f"nixcas: expected a node, got {result.stdout!r}")
        if self.nixcas_root is None:
            self.nixcas_root = root
        elif root != self.nixcas_root and self.command != "import":
            raise SystemExit(f"nixcas: root changed between runs: {self.nixcas_root} -> {root}")
        store_bytes = disk_usage(store)
        if self.delete_between:
            self.drop_store(store)
        extra = {"store_bytes_on_disk": store_bytes, "tree": str(self.tree)}
        return self._record("nixcas", index, warmup, result, result.stdout.strip(), extra)

    def delete_nix_paths(self) -> None:
        """``nix-store --delete`` every path added so far (failures, e.g. already gone, are ignored)."""
        if self.nix_paths:
            run_child([self.nix_store, "--delete", *self.nix_paths])
            self.nix_paths = []

    def run_nix(self, index: int, warmup: bool) -> Run:
        if self.delete_between:
            self.delete_nix_paths()
        os.sync()
        result = run_child([self.nix_store, "--add", str(self.tree)])
        check_ok(result)
        path = result.stdout.strip()
        if not path.startswith("/nix/store/") or not os.path.isdir(path):
            raise SystemExit(f"nix-store --add: expected a /nix/store directory, got {result.stdout!r}")
        if path in self.nix_paths:
            raise SystemExit(f"nix-store --add: {path} was already added in this benchmark")
        self.nix_paths.append(path)
        ours = [r for r in self.runs if r.tool == "nixcas" and r.index == index]
        if self.command == "import" and ours and ours[-1].output != path:
            raise SystemExit(f"nixcas import gave {ours[-1].output}, nix-store --add {path}: the store paths differ")
        query = run_child([self.nix_store, "--query", "--hash", path])
        check_ok(query)
        nar_hash = query.stdout.strip()
        if self.nix_nar_hash is None:
            self.nix_nar_hash = nar_hash
        elif nar_hash != self.nix_nar_hash:
            raise SystemExit(f"nix-store --add: NAR hash changed between runs: {self.nix_nar_hash} -> {nar_hash}")
        return self._record("nix-store", index, warmup, result, path, {"nar_hash": nar_hash})

    def _record(
        self, tool: str, index: int, warmup: bool, result: ChildResult, output: str, extra: dict[str, Any]
    ) -> Run:
        run = Run(
            tool=tool,
            index=index,
            warmup=warmup,
            seconds=result.seconds,
            maxrss_kib=result.maxrss_kib,
            user_seconds=result.user_seconds,
            system_seconds=result.system_seconds,
            output=output,
            extra=extra,
        )
        self.runs.append(run)
        return run

    def cleanup(self) -> None:
        self.delete_nix_paths()
        for store in list(self._stores):
            self.drop_store(store)


def disk_usage(path: Path) -> int:
    """Bytes allocated on disk below ``path`` (like ``du -s --block-size=1``)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames]:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


# -- machine facts -------------------------------------------------------------------


def command_output(argv: list[str], cwd: Path | None = None) -> str | None:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


PROBE_DIRS: list[Path] = []
"""Probe directories, deleted only at the very end (see create_probe)."""


def create_probe(parent: Path, count: int = 500) -> float:
    """Microseconds per empty-file creation in a new directory below ``parent``.

    On some VMs, metadata operations in different parts of one filesystem
    differ by 30x; both tools' outputs should land in comparable places.  The
    files are deleted at the end, not now: on ext4 without a journal, inode
    creation within minutes of mass deletion is much slower, which would
    disturb the timed runs.
    """
    probe = Path(tempfile.mkdtemp(prefix=".create-probe-", dir=parent))
    PROBE_DIRS.append(probe)
    start = time.perf_counter()
    for i in range(count):
        os.close(os.open(probe / str(i), os.O_CREAT | os.O_WRONLY, 0o644))
    return (time.perf_counter() - start) / count * 1e6


def base_facts(workdir: Path) -> dict[str, Any]:
    """What every benchmark records about the machine and the code measured."""
    return {
        "nproc": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "sched_affinity_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "memory_total_kib": _meminfo_total(),
        "memory_free_kib_start": meminfo_kib("MemFree"),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nixcas_commit": command_output(["git", "rev-parse", "--short", "HEAD"], cwd=REPO),
        "nixcas_src_dirty": bool(command_output(["git", "status", "--porcelain", "--", "src"], cwd=REPO)),
        "workdir_fs": command_output(["df", "--output=source,fstype", str(workdir)]),
    }


def machine_facts(nix_store: str, workdir: Path, store_parent: Path) -> dict[str, Any]:
    return {
        "file_create_us_workdir": round(create_probe(workdir), 1),
        "file_create_us_store_parent": round(create_probe(store_parent), 1),
        **base_facts(workdir),
        "nix_store_version": command_output([nix_store, "--version"]),
        "nix_store_fs": command_output(["df", "--output=source,fstype", "/nix/store"]),
    }


def _meminfo_total() -> int | None:
    return meminfo_kib("MemTotal")


def meminfo_kib(field: str) -> int | None:
    """A field of /proc/meminfo in KiB (``MemTotal``, ``MemFree``...), ``None`` if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# -- profile ---------------------------------------------------------------------------


def run_profile(bench: Bench, python: str) -> dict[str, Any]:
    """Run nixcas once under cProfile (main thread only!) and return the top of the report."""
    bench.rename_tree("tree-profile")
    store = bench.fresh_store_dir()
    os.sync()
    argv = [
        python,
        "-m",
        "cProfile",
        "-s",
        "cumtime",
        "-m",
        "nixcas.cli.main",
        "--store-dir",
        str(store),
        "castore",
        "ingest",
        str(bench.tree),
    ]
    result = run_child(argv)
    check_ok(result)
    lines = result.stdout.splitlines()
    header = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), None)
    if header is None:
        top = lines[:PROFILE_LINES]
    else:
        preamble = [line for line in lines[:header] if "function calls" in line or "Ordered by" in line]
        top = [*preamble, lines[header], *lines[header + 1 : header + 1 + PROFILE_LINES]]
    return {
        "argv": argv,
        "store_bytes_on_disk": disk_usage(store),
        "seconds": result.seconds,
        "maxrss_kib": result.maxrss_kib,
        "user_seconds": result.user_seconds,
        "system_seconds": result.system_seconds,
        "top": top,
    }


# -- reporting ---------------------------------------------------------------------------


def summarize(runs: list[Run], content_bytes: int) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for tool in ("nixcas", "nix-store"):
        timed = [r for r in runs if r.tool == tool and not r.warmup]
        if not timed:
            continue
        median = statistics.median(r.seconds for r in timed)
        summary[tool] = {
            "runs": [r.seconds for r in timed],
            "median_seconds": median,
            "mb_per_second": content_bytes / median / 1e6,
            "max_peak_rss_mib": max(r.maxrss_kib for r in timed) / 1024,
            "median_user_seconds": statistics.median(r.user_seconds for r in timed),
            "median_system_seconds": statistics.median(r.system_seconds for r in timed),
        }
    for tool in summary:
        summary[tool]["min_seconds"] = min(summary[tool]["runs"])
    if "nixcas" in summary and "nix-store" in summary:
        ours, theirs = summary["nixcas"], summary["nix-store"]
        ours["ratio_to_nix"] = ours["median_seconds"] / theirs["median_seconds"]
        theirs["ratio_to_nix"] = 1.0
        # Runs alternate, so run i of each tool saw the same machine state:
        # the median of the per-pair ratios is the least noisy comparison.
        pairs = [a / b for a, b in zip(ours["runs"], theirs["runs"], strict=False)]
        ours["paired_ratio_median"] = statistics.median(pairs)
        ours["best_ratio"] = ours["min_seconds"] / theirs["min_seconds"]
    return summary


def print_report(facts: dict[str, Any], stats: TreeStats, runs: list[Run], summary: dict[str, dict[str, Any]]) -> None:
    print()
    print("## Machine")
    for key, value in facts.items():
        print(f"- {key}: {value}")
    print()
    print("## Tree")
    mib = stats.content_bytes / (1 << 20)
    print(
        f"- {stats.small_files} small files (1-16 KiB), {stats.large_files} large files, "
        f"{stats.directories} directories, {stats.symlinks} symlinks, {stats.executables} executables"
    )
    print(
        f"- content: {stats.content_bytes} bytes ({mib:.1f} MiB), of which "
        f"{stats.compressible_bytes / max(stats.content_bytes, 1):.0%} compressible (4-bit alphabet), "
        f"the rest incompressible random"
    )
    print(f"- generated in {stats.generate_seconds:.1f} s at {stats.root}")
    print()
    print("## Runs (alternating; warm-up runs are not counted)")
    print()
    print("| tool | run | wall s | user s | sys s | peak RSS MiB |")
    print("|---|---|---:|---:|---:|---:|")
    for r in runs:
        label = "warm-up" if r.warmup else str(r.index)
        print(
            f"| {r.tool} | {label} | {r.seconds:.2f} | {r.user_seconds:.2f} | {r.system_seconds:.2f} "
            f"| {r.maxrss_kib / 1024:.1f} |"
        )
    print()
    print("## Results")
    print()
    print("| tool | median s | min s | MB/s | peak RSS MiB | ratio (median) | ratio (paired) | ratio (best) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for tool, s in summary.items():

        def ratio(key: str, s: dict[str, Any] = s) -> str:
            value = s.get(key)
            return f"{value:.2f}x" if value is not None else "-"

        print(
            f"| {tool} | {s['median_seconds']:.2f} | {s['min_seconds']:.2f} | {s['mb_per_second']:.0f} "
            f"| {s['max_peak_rss_mib']:.1f} | {ratio('ratio_to_nix')} | {ratio('paired_ratio_median')} "
            f"| {ratio('best_ratio')} |"
        )
    print()
    print(
        "MB/s = total file content bytes / median wall seconds / 10^6; peak RSS = max over timed runs; "
        "ratio (paired) = median over runs i of nixcas_i / nix_i (runs alternate); ratio (best) = min / min."
    )


# -- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--tree",
        default="generated",
        help="'generated' (--files small files + --large large ones), 'tiny' (--files files of 1 B-1 KiB), "
        "or 'copy:PATH' (a copy of an existing directory, e.g. copy:/usr/include)",
    )
    p.add_argument(
        "--command",
        choices=["ingest", "import"],
        default="ingest",
        help="nixcas castore ingest (default) or nixcas import (store path compared with nix-store --add's)",
    )
    p.add_argument("--files", type=int, default=10_000, help="number of small files (default 10000)")
    p.add_argument("--large", type=int, default=8, help="number of large files (default 8)")
    p.add_argument("--large-mib", type=int, default=64, help="size of each large file in MiB (default 64)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per tool (default 3; 0 skips timing)")
    p.add_argument("--seed", type=int, default=20240901, help="seed of the tree generator")
    p.add_argument(
        "--store-parent",
        type=Path,
        default=Path("/nix/store"),
        help="where the nixcas stores are created (default /nix/store, as .nixcas-bench-* entries, removed at the "
        "end): on VMs whose metadata speed differs 10x between parts of one filesystem, only the same parent "
        "directory as nix-store's output is a fair place",
    )
    p.add_argument(
        "--warm-shards",
        action="store_true",
        help="pre-create (untimed) all 2x65536 shard directories in each nixcas store: a well-used store",
    )
    p.add_argument("--workdir", type=Path, help="work directory (default: a new temp dir under /var/tmp)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (and the tree) at the end")
    p.add_argument(
        "--no-delete",
        action="store_true",
        help="delete nothing at the end (stores, nix paths, tree): for several benchmarks in a row on ext4 without "
        "a journal, where mass deletions slow down every later inode creation; clean up afterwards",
    )
    p.add_argument(
        "--delete-between",
        action="store_true",
        help="delete each result before the next run instead of at the end (slow on ext4 without a journal: "
        "creating inodes right after deleting thousands makes ext4 scan the recently deleted ones)",
    )
    p.add_argument("--json", type=Path, metavar="OUT", help="write all raw numbers to this JSON file")
    p.add_argument("--profile", action="store_true", help="also run nixcas once under cProfile and print the top")
    p.add_argument("--nixcas", default=str(REPO / ".venv" / "bin" / "nixcas"), help="nixcas executable")
    p.add_argument("--python", default=sys.executable, help="python of the venv nixcas is installed in")
    p.add_argument("--nix-store", default=shutil.which("nix-store") or "nix-store", help="nix-store executable")
    args = p.parse_args(argv)
    if args.files < 0 or args.large < 0 or args.large_mib < 0 or args.runs < 0:
        p.error("counts must not be negative")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="import-tree-", dir=args.workdir))
    else:
        workdir = Path(tempfile.mkdtemp(prefix="nixcas-import-tree-", dir="/var/tmp"))
    bench: Bench | None = None
    try:
        tree = workdir / "tree"
        print(f"generating tree in {tree} ...", flush=True)
        if args.tree == "tiny":
            stats = generate_tiny(tree, args.files, args.seed)
        elif args.tree.startswith("copy:"):
            stats = copy_tree(Path(args.tree.removeprefix("copy:")), tree)
        elif args.tree == "generated":
            stats = generate_tree(tree, args.files, args.large, args.large_mib, args.seed)
        else:
            raise SystemExit(f"--tree: unknown tree {args.tree!r}")
        print(
            f"  {stats.small_files + stats.large_files} files, {stats.content_bytes / (1 << 20):.1f} MiB "
            f"in {stats.generate_seconds:.1f} s",
            flush=True,
        )
        facts = machine_facts(args.nix_store, workdir, args.store_parent)
        facts["protocol"] = "delete-between" if args.delete_between else "deferred-delete"
        facts["nixcas_store"] = "warm shards (all shard directories exist)" if args.warm_shards else "fresh, empty"
        bench = Bench(
            tree,
            workdir,
            args.nixcas,
            args.nix_store,
            delete_between=args.delete_between,
            warm_shards=args.warm_shards,
            store_parent=args.store_parent,
            command=args.command,
        )

        if args.runs:
            for i in range(args.runs + 1):
                warmup = i == 0
                bench.rename_tree(f"tree-{os.getpid()}-{i}")  # a new store path, even beside kept ones
                for tool in ("nixcas", "nix-store"):
                    print(f"{'warm-up' if warmup else f'run {i}'}: {tool} ...", flush=True)
                    r = bench.run_nixcas(i, warmup) if tool == "nixcas" else bench.run_nix(i, warmup)
                    print(
                        f"  {r.seconds:.2f} s (user {r.user_seconds:.2f}, sys {r.system_seconds:.2f}), "
                        f"{r.maxrss_kib / 1024:.1f} MiB",
                        flush=True,
                    )

        profile: dict[str, Any] | None = None
        if args.profile:
            print("profiling nixcas under cProfile (main thread only) ...", flush=True)
            profile = run_profile(bench, args.python)

        facts["loadavg_end"] = os.getloadavg()
        summary = summarize(bench.runs, stats.content_bytes)
        print_report(facts, stats, bench.runs, summary)
        if bench.nixcas_root is not None:
            print(f"nixcas root: {json.dumps(bench.nixcas_root)}")
        if bench.nix_nar_hash is not None:
            print(f"nix NAR hash (every run): {bench.nix_nar_hash}")
        if profile is not None:
            print()
            print(
                f"## cProfile of one nixcas ingest (wall {profile['seconds']:.2f} s, "
                f"user {profile['user_seconds']:.2f} s, sys {profile['system_seconds']:.2f} s, "
                f"peak RSS {profile['maxrss_kib'] / 1024:.1f} MiB)"
            )
            print()
            print("```")
            print("\n".join(profile["top"]))
            print("```")

        if args.json is not None:
            report = {
                "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "machine": facts,
                "tree": asdict(stats),
                "runs": [asdict(r) for r in bench.runs],
                "summary": summary,
                "nixcas_root": bench.nixcas_root,
                "nix_nar_hash": bench.nix_nar_hash,
                "profile": profile,
            }
            args.json.write_text(json.dumps(report, indent=2) + "\n")
            print(f"\nwrote {args.json}")
    finally:
        if args.no_delete:
            paths = " ".join(bench.nix_paths) if bench is not None else ""
            print(f"deleted nothing: {workdir}, {args.store_parent}/.nixcas-bench-*, nix paths {paths}")
        else:
            for probe in PROBE_DIRS:
                shutil.rmtree(probe, ignore_errors=True)
            if bench is not None:
                bench.cleanup()
        if args.keep or args.no_delete:
            print(f"kept {workdir} (tree: {bench.tree if bench is not None else workdir / 'tree'})")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

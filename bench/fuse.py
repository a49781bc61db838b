#!/usr/bin/env python3
"""Benchmark: reading through a ``nixcas castore mount`` against the same tree on the local disk.

Run from the repository root::

    .venv/bin/python bench/fuse.py [--workdir DIR] [--runs 5] [--large-mib 1024] [--files 10000]
                                   [--no-grpc] [--json OUT] [--seed N] [--peer-src DIR]

One source directory is generated (deterministically from ``--seed``) and
kept in the work directory: ``large/big.bin``, one file of ``--large-mib`` MiB
(4 MiB blocks alternating incompressible and compressible bytes, as in
``bench/nar.py``), and ``small/``, the 10,000-file tree of
``bench/import_tree.py`` (1-16 KiB files in 20 x 20 directories).  It is
ingested with ``nixcas castore ingest`` into a fresh embedded store
(``objectstore+file`` blobs, ``sqlite`` directories) and mounted with
``nixcas castore mount DIGEST MP --list-root``.

Every timed operation is a child process, timed by wall clock:

* **sequential read**: ``dd if=FILE of=/dev/null bs=1M`` of the 1 GiB file,
  - *local, page cache*: the source file, already in the page cache;
  - *mount, fresh*: a fresh mount (nothing in the kernel's caches for it),
    the store's chunk file in the page cache;
  - *mount, again*: the same mount read a second time (the kernel keeps the
    pages: ``keep_cache``, everything is immutable);
  - *local, cold* and *mount, cold*: the source file, or the store's chunk
    file, evicted from the page cache first (``posix_fadvise(DONTNEED)`` on
    that one file), so the bytes come from the disk;
  - *mount over gRPC, fresh*: a fresh mount whose blob and directory services
    are a ``nixcas daemon`` on a unix socket serving the same store;
  - *mount (peer sources), fresh*: with ``--peer-src DIR``, a fresh mount
    running the nixcas sources in ``DIR`` (say another checkout's ``src``),
    right after this tree's: before and after a change, in the same run.
* **floor**: what any verifying reader of this store must do for the large
  file, without FUSE: read every chunk object, decompress it, BLAKE3 it
  against its name, and BLAKE3 the whole blob in order, on two threads (both
  cores) in a child process; *into reused buffers*: the same with each object
  read and decompressed into memory reused from chunk to chunk, the whole-blob
  hash on a third thread (``bench/nar_floor.py --verify``), the least of the two.
* **find + stat**: ``find DIR -printf '%i %m %s %P\\n'`` (one ``lstat`` per
  entry) of the 10,000-file tree: *local* (dentries cached), *mount, fresh*
  (every directory fetched on first access), *mount, again*, and *mount over
  gRPC, fresh*.

One untimed warm-up checks correctness (SHA-256 of the large file and the
``find`` output through the mount equal the local ones) and warms the page
cache; then ``--runs`` rounds, each running every measurement once.  The
mount's peak RSS after reading the 1 GiB file is taken from
``/proc/PID/status`` (``VmHWM``), and the CPU time the mount (and the
daemon) spent during each measurement from ``/proc/PID/stat``.  Medians are reported; MB/s = bytes /
median seconds / 10^6.  The target ratio (fresh mount / cold local read) is taken per round, from
the two reads of that round, and reported with the load average at the start of each round: the
machine may be shared.
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
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import blake3

# The sibling scripts (``bench/`` is on sys.path when this file is run): the same tree generators.
from import_tree import base_facts, generate_tree, meminfo_kib
from nar import chunk_object_paths, generate_large_file

from nixcas.castore.digest import B3Digest
from nixcas.testing.daemon import clean_env, nixcas_command, running_daemon
from nixcas.testing.fuse import FUSE_SKIP_REASON, Mount, running_mount

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
TARGET_SEQUENTIAL_MBS = 200.0
TARGET_FIND_SECONDS = 2.0
TARGET_COLD_RATIO = 0.5
"""Sequential read through a fresh mount: at least this fraction of a cold local read's speed."""

FLOOR_SCRIPT = """
import sys
from concurrent.futures import ThreadPoolExecutor
import blake3, zstandard
want, paths = bytes.fromhex(sys.argv[1]), sys.argv[2:]
def chunk(path):
    with open(path, "rb") as f:
        data = zstandard.ZstdDecompressor().decompress(f.read())
    h = blake3.blake3()
    h.update(data)
    if h.hexdigest() != path.rsplit("/", 1)[1]:
        raise SystemExit(path + ": BLAKE3 mismatch")
    return data
whole = blake3.blake3()
with ThreadPoolExecutor(2) as pool:
    for at in range(0, len(paths), 32):
        for data in pool.map(chunk, paths[at : at + 32]):
            whole.update(data)
if whole.digest() != want:
    raise SystemExit("blob: BLAKE3 mismatch")
"""
"""The floor: chunk objects read, decompressed and BLAKE3-checked on two threads, the blob hashed in order."""


def run_timed(argv: list[str]) -> tuple[float, bytes]:
    """Run ``argv``; (wall seconds, stdout).  A failure aborts the benchmark."""
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, check=False)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {result.stderr.decode(errors='replace')}")
    return seconds, result.stdout


def dd(path: Path) -> float:
    return run_timed(["dd", f"if={path}", "of=/dev/null", "bs=1M"])[0]


def find(path: Path) -> tuple[float, bytes]:
    """``find`` printing inode, mode and size of every entry (an ``lstat`` each)."""
    return run_timed(["find", str(path), "-printf", "%i %m %s %P\\n"])


def shape(path: Path) -> list[bytes]:
    """What must be equal between the source and the mount: types and names, file sizes (sorted)."""
    kinds = run_timed(["find", str(path), "-printf", "%y %P\\n"])[1]
    sizes = run_timed(["find", str(path), "-type", "f", "-printf", "%s %P\\n"])[1]
    return sorted(kinds.splitlines()) + sorted(sizes.splitlines())


def evict(path: Path) -> None:
    """Drop one file's pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MIB):
            h.update(block)
    return h.hexdigest()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.workdir).absolute()
        self.src = self.work / "src"
        self.store = self.work / "store"
        self.big = self.src / "large" / "big.bin"
        self.small = self.src / "small"
        self.samples: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}
        self.daemon_pid: int | None = None
        self.rss: list[float] = []
        self.digest = ""
        self.big_digest = ""
        self.loads: list[float] = []
        self.free_mib: list[int] = []
        """MemFree at each round's start: a fresh read takes 1 GiB of page cache, costly to reclaim in a full memory."""
        self.chunks: list[Path] = []
        self.mounts = 0
        self.entries = 0

    def record(self, key: str, fn: Callable[[], float], *pids: int) -> None:
        """Time ``fn`` (its own wall clock) and the CPU the given server processes spent meanwhile."""
        before = [cpu_seconds(pid) for pid in pids]
        seconds = fn()
        cpu = sum(cpu_seconds(pid) - b for pid, b in zip(pids, before, strict=True))
        self.samples.setdefault(key, []).append(seconds)
        if pids:
            self.cpu.setdefault(key, []).append(cpu)
        print(f"  {key:<34} {seconds:8.3f} s" + (f"  (server CPU {cpu:.2f} s)" if pids else ""), flush=True)

    def prepare(self) -> None:
        if not self.big.exists():
            shutil.rmtree(self.src, ignore_errors=True)
            print(f"generating {self.src} ...", flush=True)
            generate_tree(self.small, self.args.files, 0, 0, self.args.seed)
            generate_large_file(self.big, self.args.large_mib, self.args.seed)
        shutil.rmtree(self.store, ignore_errors=True)
        start = time.perf_counter()
        out = subprocess.run(
            nixcas_command("--store-dir", str(self.store), "castore", "ingest", str(self.src), "--json"),
            capture_output=True,
            check=True,
            env=clean_env(),
        ).stdout
        self.digest = json.loads(out)["digest"]
        print(f"ingested in {time.perf_counter() - start:.1f} s: {self.digest}", flush=True)
        h = blake3.blake3(max_threads=blake3.blake3.AUTO)
        with open(self.big, "rb") as f:
            while block := f.read(16 * MIB):
                h.update(block)
        self.big_digest = h.hexdigest()
        self.chunks = chunk_object_paths(self.store / "blobs", B3Digest(h.digest()))
        assert all(p.exists() for p in self.chunks), self.chunks

    @contextmanager
    def mount(self, *global_args: str, src: str | None = None) -> Iterator[Mount]:
        """A fresh mount of the tree; ``src``: run the nixcas sources there instead (``--peer-src``)."""
        env = None
        if src is not None:
            env = clean_env()
            env["PYTHONPATH"] = src
        self.mounts += 1
        mp = self.work / f"mp{self.mounts}"
        mp.mkdir()
        args = [*global_args, "castore", "mount", self.digest, str(mp), "--list-root"]
        if not global_args:
            args = ["--store-dir", str(self.store), *args]
        try:
            with running_mount(args, mp, self.work / f"mount{self.mounts}.log", env=env) as m:
                yield m
                if m.stop() != 0:
                    raise SystemExit(f"mount exited with an error:\n{m.stderr()}")
        finally:
            mp.rmdir()

    def check(self) -> None:
        """The untimed warm-up: the mount shows the same bytes and the same tree."""
        want_sha, want_shape = sha256_file(self.big), shape(self.small)
        with self.mount() as m:
            got_sha = sha256_file(m.path / "large" / "big.bin")
            got_shape = shape(m.path / "small")
            self.entries = find(m.path / "small")[1].count(b"\n")
        if got_sha != want_sha or got_shape != want_shape:
            raise SystemExit("the mount differs from the source tree")
        print(f"checked: same SHA-256 {want_sha[:16]}..., same find output ({self.entries} entries)", flush=True)

    def round(self, grpc_url: str | None) -> None:
        assert self.chunks
        big = Path("large") / "big.bin"
        self.loads.append(os.getloadavg()[0])
        self.free_mib.append((meminfo_kib("MemFree") or 0) // 1024)
        self.record("read local, page cache", lambda: dd(self.big))
        with self.mount() as m:
            self.record("read mount, fresh", lambda: dd(m.path / big), m.pid)
            self.rss.append(peak_rss_mib(m.pid))
            self.record("read mount, again", lambda: dd(m.path / big), m.pid)
        if self.args.peer_src:
            with self.mount(src=self.args.peer_src) as m:
                self.record("read mount (peer sources), fresh", lambda: dd(m.path / big), m.pid)
        evict(self.big)
        self.record("read local, cold", lambda: dd(self.big))
        for path in self.chunks:
            evict(path)
        with self.mount() as m:
            self.record("read mount, cold", lambda: dd(m.path / big), m.pid)
        floor = [sys.executable, "-c", FLOOR_SCRIPT, self.big_digest, *map(str, self.chunks)]
        self.record("floor: verify chunks, 2 threads", lambda: run_timed(floor)[0])
        chunk_list = self.work / "floor-chunks.txt"
        chunk_list.write_text("\n".join(map(str, self.chunks)))
        reused = [sys.executable, str(REPO / "bench" / "nar_floor.py"), "--verify", self.big_digest, str(chunk_list)]
        self.record("floor: verify chunks into reused buffers", lambda: run_timed(reused)[0])
        self.record("find local", lambda: find(self.small)[0])
        with self.mount() as m:
            self.record("find mount, fresh", lambda: find(m.path / "small")[0], m.pid)
            self.record("find mount, again", lambda: find(m.path / "small")[0], m.pid)
        if grpc_url is not None:
            assert self.daemon_pid is not None
            with self.mount("--blob-service-addr", grpc_url, "--directory-service-addr", grpc_url) as m:
                self.record("read mount over gRPC, fresh", lambda: dd(m.path / big), m.pid, self.daemon_pid)
            with self.mount("--blob-service-addr", grpc_url, "--directory-service-addr", grpc_url) as m:
                self.record("find mount over gRPC, fresh", lambda: find(m.path / "small")[0], m.pid, self.daemon_pid)

    def run(self) -> dict[str, Any]:
        self.prepare()
        self.check()
        with tempfile.TemporaryDirectory(prefix="nixcas-fb-") as sock_dir, ExitStack() as stack:
            url = None
            if self.args.grpc:
                log = self.work / "daemon.log"
                daemon = stack.enter_context(running_daemon("-l", f"{sock_dir}/d.sock", store=self.store, log=log))
                url = daemon.client_url()
                self.daemon_pid = daemon.pid
            for i in range(self.args.runs):
                print(f"round {i + 1}/{self.args.runs}", flush=True)
                self.round(url)
        return self.report()

    def report(self) -> dict[str, Any]:
        size = self.args.large_mib * MIB
        rows: dict[str, Any] = {}
        print(f"\n{'measurement':<34} {'median s':>9} {'min s':>8} {'MB/s':>8} {'server CPU s':>13}")
        for key, values in self.samples.items():
            median = statistics.median(values)
            row: dict[str, Any] = {"median_s": median, "min_s": min(values), "runs": values}
            mbs = cpu = ""
            if key.startswith("read"):
                row["mb_s"] = size / median / 1e6
                mbs = f"{row['mb_s']:8.0f}"
            if key in self.cpu:
                row["server_cpu_s"] = self.cpu[key]
                cpu = f"{statistics.median(self.cpu[key]):13.2f}"
            rows[key] = row
            print(f"{key:<34} {median:9.3f} {min(values):8.3f} {mbs:>8} {cpu:>13}")
        seq = rows["read mount, fresh"]["mb_s"]
        find_s = rows["find mount, fresh"]["median_s"]
        ratios = [
            cold / fresh
            for cold, fresh in zip(self.samples["read local, cold"], self.samples["read mount, fresh"], strict=True)
        ]
        ratio = statistics.median(ratios)
        verdicts = [
            f"sequential read through a fresh mount: {seq:.0f} MB/s "
            f"({'met' if seq >= TARGET_SEQUENTIAL_MBS else 'NOT met'}: target >= {TARGET_SEQUENTIAL_MBS:.0f})",
            f"fresh mount / cold local read, same round: {ratio:.2f}x median "
            f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)}; "
            f"{'met' if ratio >= TARGET_COLD_RATIO else 'NOT met'}: target >= {TARGET_COLD_RATIO}x); "
            f"load average at each round's start: {', '.join(f'{x:.1f}' for x in self.loads)}; "
            f"free memory {min(self.free_mib)}-{max(self.free_mib)} MiB",
            f"find + stat of {self.entries} entries through a fresh mount: {find_s:.3f} s "
            f"({'met' if find_s <= TARGET_FIND_SECONDS else 'NOT met'}: target <= {TARGET_FIND_SECONDS:.0f} s)",
            f"mount peak RSS after reading the large file: {statistics.median(self.rss):.0f} MiB (median)",
        ]
        for floor in ("floor: verify chunks, 2 threads", "floor: verify chunks into reused buffers"):
            floor_ratios = [c / f for c, f in zip(self.samples["read local, cold"], self.samples[floor], strict=True)]
            verdicts.append(
                f"{floor}: cold local read / floor, same round {statistics.median(floor_ratios):.2f}x median "
                f"(rounds: {', '.join(f'{r:.2f}' for r in floor_ratios)})"
            )
        peer = self.samples.get("read mount (peer sources), fresh")
        if peer:
            peer_ratios = [c / p for c, p in zip(self.samples["read local, cold"], peer, strict=True)]
            verdicts.append(
                f"peer sources ({self.args.peer_src}): fresh mount / cold local read "
                f"{statistics.median(peer_ratios):.2f}x median (rounds: {', '.join(f'{r:.2f}' for r in peer_ratios)})"
            )
        print("\n" + "\n".join(verdicts))
        return {
            "facts": base_facts(self.work),
            "args": vars(self.args),
            "large_bytes": size,
            "find_entries": self.entries,
            "results": rows,
            "mount_peak_rss_mib": self.rss,
            "fresh_vs_cold_ratios": ratios,
            "load_averages": self.loads,
            "free_memory_mib": self.free_mib,
            "verdicts": verdicts,
        }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=str(REPO / ".bench-work" / "fuse"), help="where trees and store go")
    p.add_argument("--runs", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--large-mib", type=int, default=1024, help="size of the large file (default 1024)")
    p.add_argument("--files", type=int, default=10_000, help="files in the small tree (default 10000)")
    p.add_argument("--no-grpc", dest="grpc", action="store_false", help="skip the mounts over a gRPC daemon")
    p.add_argument("--seed", type=int, default=20261124)
    p.add_argument(
        "--peer-src",
        help="also read through a fresh mount running the nixcas sources in this src/ directory "
        "(another checkout: before/after in the same run)",
    )
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if FUSE_SKIP_REASON is not None:
        raise SystemExit(f"cannot run: {FUSE_SKIP_REASON}")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    result = Bench(args).run()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

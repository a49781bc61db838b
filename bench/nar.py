#!/usr/bin/env python3
"""Benchmark: NAR rendering and NAR ingest, against ``nix-store --dump`` of the same tree.

Run from the repository root::

    .venv/bin/python bench/nar.py [--runs 5] [--workdir DIR] [--small-files 10000] [--large-mib 1024]
                                  [--json OUT] [--keep] [--seed N]

Two source trees are generated (deterministically from ``--seed``):

* ``small``: the shape of ``bench/import_tree.py`` (its generator is reused):
  ``--small-files`` files of 1-16 KiB in 20 x 20 directories (every 10th
  executable, 21 symlinks) plus ``--tree-large`` files of ``--tree-large-mib``
  MiB (default 8 x 64 MiB); half of the bytes incompressible, half
  compressible (4 bits of entropy per byte);
* ``large``: one file of ``--large-mib`` MiB (default 1 GiB), alternating 4 MiB
  blocks of incompressible and compressible bytes.  Its NAR's root is a file.

Both trees are imported once with ``nixcas --store-dir STORE import TREE`` (the
Nix layer: castore nodes plus a PathInfo), into one embedded store
(``objectstore+file`` blobs, ``sqlite`` directories and path infos) in the work
directory, beside the trees.

**Render** (per tree): three ways to produce the tree's NAR, each timed
(``time.perf_counter``, wall) to a sink that discards it:

* ``render lib``: :func:`nixcas.store.nar.render_nar` of the imported root
  node, in this process, every chunk dropped (the store stays open across
  runs; opening it is not timed);
* ``render CLI``: ``nixcas --store-dir STORE dump-path /nix/store/...`` as a
  child process with standard output on ``/dev/null`` (start-up, store
  opening and the PathInfo lookup included: what a user runs);
* ``nix-store --dump TREE`` as a child process with standard output on
  ``/dev/null``;
* ``floor: unzstd+BLAKE3``: not a renderer but its lower bound on this store:
  read, zstd-decompress and BLAKE3-verify every file's chunk object in NAR
  order, in one thread, without asyncio and without output.

The tree, the store and the NAR files are all on the same disk, and this
machine has ample RAM: one untimed warm-up of each way first (these also
check correctness: the SHA-256 and size of the NAR that ``render_nar`` and
``dump-path`` produce must equal those of ``nix-store --dump``, and the NAR
hash nixcas recorded at import), so every timed run reads from the page
cache.  Then ``--runs`` rounds, alternating lib, CLI, nix-store within each
round, an untimed ``sync`` before every run.  Throughput is NAR bytes / wall
seconds; the ratio is nixcas throughput / ``nix-store --dump`` throughput
(= nix seconds / nixcas seconds), of the medians and paired per round.

**Ingest** (per tree): the NAR written by ``nix-store --dump TREE > FILE``
(once) is fed to :func:`nixcas.store.nar.ingest_nar`, streamed from the file
in 1 MiB reads (on a worker thread, one block read ahead: never loaded
whole), into (1) fresh ``memory://`` blob and directory services and (2) a
fresh, empty embedded store (``objectstore+file`` + ``sqlite``) per run, so
every blob is really written; the time covers ``ingest_nar`` alone, whose
end includes the store's durability barrier (``syncfs``).  One untimed
warm-up each, then ``--runs`` rounds alternating memory, file.  Every run
must return the root node of the import, the NAR size and SHA-256.

Deletions are deferred to the end (the file stores, the trees): on this
machine's ext4 without a journal, creating inodes within minutes of mass
deletion is several times slower (see ``bench/import_tree.py``); leave ~6
minutes between invocations.  A file-creation probe of the work directory is
printed to recognise a disturbed state.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Any

import blake3
import zstandard

# The sibling script (``bench/`` is on sys.path when this file is run): the same tree generator.
from import_tree import (
    COMPRESSIBLE_TABLE,
    LARGE_BLOCK,
    PROBE_DIRS,
    TreeStats,
    base_facts,
    command_output,
    create_probe,
    generate_tree,
)

from nixcas.api import Store
from nixcas.castore.blob.local import LocalBlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.nodes import Node
from nixcas.castore.objectstore.layout import blob_index_key, chunk_key, decode_index
from nixcas.composition import blob_service_from_url, directory_service_from_url
from nixcas.store.nar import ingest_nar, render_nar
from nixcas.store.nar.plan import Hole, fetch_closure, iter_plan
from nixcas.store.store_path import StorePath

REPO = Path(__file__).resolve().parent.parent
READ_BLOCK = 1 << 20
"""The ingest source reads the NAR file in blocks of this size."""
HASH_BLOCK = 1 << 20
MIB = 1 << 20

FLOOR = "floor: unzstd+BLAKE3"
RENDER_TOOLS = ("render lib", "render CLI", "nix-store --dump", FLOOR)
INGEST_TOOLS = ("ingest memory://", "ingest objectstore+file+sqlite")


# -- trees ------------------------------------------------------------------------------


@dataclass
class Tree:
    """One source tree, its import into nixcas and its NAR."""

    key: str
    path: Path
    description: str
    content_bytes: int
    files: int
    generate_seconds: float
    store_path: str = ""
    node: Node | None = None
    import_seconds: float = 0.0
    nar_file: Path | None = None
    nar_size: int = 0
    nar_sha256: str = ""
    holes: list[Hole] = field(default_factory=list)
    """The NAR's file contents, in order (for the floor measurement)."""


def generate_large_file(path: Path, mib: int, seed: int) -> Tree:
    """One file of ``mib`` MiB: 4 MiB blocks alternating incompressible and compressible bytes."""
    start = time.perf_counter()
    rng = random.Random(seed)  # noqa: S311 - reproducible test data, not crypto
    path.parent.mkdir(parents=True)
    remaining = mib << 20
    block = 0
    with open(path, "wb") as f:
        while remaining:
            n = min(LARGE_BLOCK, remaining)
            data = rng.randbytes(n)
            f.write(data.translate(COMPRESSIBLE_TABLE) if block % 2 else data)
            remaining -= n
            block += 1
    return Tree(
        key="large",
        path=path,
        description=f"one file of {mib} MiB (4 MiB blocks alternating incompressible / compressible)",
        content_bytes=mib << 20,
        files=1,
        generate_seconds=time.perf_counter() - start,
    )


def small_tree(stats: TreeStats, n_large: int, large_mib: int) -> Tree:
    return Tree(
        key="small",
        path=Path(stats.root),
        description=(
            f"{stats.small_files:,} files of 1-16 KiB in {stats.directories} directories "
            f"({stats.executables} executable, {stats.symlinks} symlinks)"
            + (f" + {n_large} x {large_mib} MiB" if n_large else "")
        ),
        content_bytes=stats.content_bytes,
        files=stats.small_files + stats.large_files,
        generate_seconds=stats.generate_seconds,
    )


# -- child processes ----------------------------------------------------------------------


@dataclass
class Child:
    """A finished child process: its wall time and CPU times.

    (Its ``ru_maxrss`` is not used: a child spawned from this process reports
    at least this process's RSS at the time of the spawn.)
    """

    seconds: float
    user_seconds: float
    system_seconds: float


def _reap(proc: subprocess.Popen[bytes], argv: list[str], start: float, stderr: IO[bytes]) -> Child:
    """Wait for ``proc`` with ``wait4``; abort the benchmark if it failed."""
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
    if proc.returncode != 0:
        stderr.seek(0)
        message = stderr.read().decode(errors="replace")
        raise SystemExit(f"command failed with exit code {proc.returncode}: {' '.join(argv)}\n{message}")
    return Child(seconds, usage.ru_utime, usage.ru_stime)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Kill and reap a child that is still running (on errors and interrupts)."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(proc.pid, 0)
        proc.returncode = -9


def run_to_fd(argv: list[str], stdout: int) -> Child:
    """Run ``argv`` with standard output on ``stdout``; time it (wall) and read its rusage."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=err)
        try:
            return _reap(proc, argv, start, err)
        finally:
            _kill(proc)


def run_hashing(argv: list[str]) -> tuple[Child, int, str]:
    """Run ``argv``, hashing its standard output: (child, size, SHA-256 hex)."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        try:
            assert proc.stdout is not None
            h = hashlib.sha256()
            size = 0
            while block := proc.stdout.read(HASH_BLOCK):
                h.update(block)
                size += len(block)
            proc.stdout.close()
            return _reap(proc, argv, start, err), size, h.hexdigest()
        finally:
            if proc.stdout is not None:
                proc.stdout.close()
            _kill(proc)


def file_sha256(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


# -- in-process measurements ------------------------------------------------------------------


@dataclass
class Run:
    """One timed (or warm-up) run."""

    phase: str
    tree: str
    tool: str
    index: int
    warmup: bool
    seconds: float
    nar_bytes: int
    user_seconds: float
    system_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def _cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


async def timed_in_process(fn: Callable[[], Awaitable[int]]) -> tuple[float, int, float, float]:
    """(wall seconds, result, user CPU, system CPU) of awaiting ``fn()`` in this process (all threads)."""
    user0, sys0 = _cpu()
    start = time.perf_counter()
    result = await fn()
    seconds = time.perf_counter() - start
    user1, sys1 = _cpu()
    return seconds, result, user1 - user0, sys1 - sys0


async def render_discard(node: Node, store: Store) -> int:
    """Render ``node``'s NAR and drop every chunk; return the NAR size."""
    size = 0
    async with contextlib.aclosing(render_nar(node, store.blobs, store.directories)) as chunks:
        async for chunk in chunks:
            size += len(chunk)
    return size


async def render_sha256(node: Node, store: Store) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    async with contextlib.aclosing(render_nar(node, store.blobs, store.directories)) as chunks:
        async for chunk in chunks:
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def chunk_object_paths(blob_root: str | Path, digest: B3Digest) -> list[Path]:
    """The chunk objects holding blob ``digest`` in an ``objectstore+file`` store, in order."""
    index = Path(blob_root) / blob_index_key(digest)
    chunks = decode_index(digest, index.read_bytes())
    return [Path(blob_root) / chunk_key(c.digest) for c in chunks] or [Path(blob_root) / chunk_key(digest)]


def unzstd_blake3(blob_root: str, holes: list[Hole]) -> int:
    """The floor of rendering from this store: read, decompress and BLAKE3-verify every blob, in order.

    One thread, no asyncio, no output: the work any verifying renderer of
    zstd-compressed chunk objects has to do.  Returns the content bytes.
    """
    total = 0
    for hole in holes:
        hasher = blake3.blake3()
        for path in chunk_object_paths(blob_root, hole.digest):
            with open(path, "rb") as f:
                reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
                while block := reader.read(READ_BLOCK):
                    hasher.update(block)
                    total += len(block)
                reader.close()  # type: ignore[no-untyped-call]
        if hasher.digest() != hole.digest:
            raise SystemExit(f"blob {hole.digest.hex()}: BLAKE3 mismatch")
    return total


class FileSource:
    """An async byte source over a file: ``READ_BLOCK`` reads on a worker thread, one block ahead.

    ``read(n)`` hands out (slices of) the current block, the whole block
    without a copy when ``n`` covers it.  Call :meth:`aclose` at the end.
    """

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._buf = b""
        self._pos = 0
        self._next: asyncio.Future[bytes] | None = None
        self._eof = False

    def _start(self) -> None:
        self._next = asyncio.ensure_future(asyncio.to_thread(os.read, self._fd, READ_BLOCK))

    async def read(self, n: int, /) -> bytes:
        if self._pos >= len(self._buf):
            if self._eof:
                return b""
            if self._next is None:
                self._start()
            assert self._next is not None
            self._buf, self._pos, self._next = await self._next, 0, None
            if not self._buf:
                self._eof = True
                return b""
            self._start()
        whole = self._pos == 0 and n >= len(self._buf)
        out = self._buf if whole else self._buf[self._pos : self._pos + n]
        self._pos += len(out)
        return out

    async def aclose(self) -> None:
        if self._next is not None:
            with contextlib.suppress(BaseException):
                await self._next
            self._next = None
        os.close(self._fd)


async def ingest_file(nar: Path, store: Store | None, tree: Tree) -> tuple[float, int, float, float]:
    """Time ``ingest_nar`` of ``nar`` into ``store`` (``None``: fresh memory:// services); check the result."""
    if store is None:
        blobs = await blob_service_from_url("memory://")
        directories = await directory_service_from_url("memory://")
    else:
        blobs, directories = store.blobs, store.directories
    source = FileSource(nar)
    try:
        result: list[tuple[Node, int, bytes]] = []

        async def go() -> int:
            result.append(await ingest_nar(source, blobs, directories))
            return result[0][1]

        measured = await timed_in_process(go)
    finally:
        await source.aclose()
        if store is None:
            await blobs.close()
            await directories.close()
    node, size, sha256 = result[0]
    if node != tree.node or size != tree.nar_size or sha256.hex() != tree.nar_sha256:
        raise SystemExit(
            f"ingest of {nar}: got {node} ({size} bytes, sha256 {sha256.hex()}), "
            f"expected {tree.node} ({tree.nar_size} bytes, sha256 {tree.nar_sha256})"
        )
    return measured


# -- the benchmark ------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.store_dir = workdir / "store"
        self.runs: list[Run] = []
        self._ingest_stores = 0
        self.store: Store | None = None

    def nixcas(self, *argv: str) -> list[str]:
        return [self.args.nixcas, "--store-dir", str(self.store_dir), *argv]

    def record(self, run: Run) -> None:
        self.runs.append(run)
        label = "warm-up" if run.warmup else f"run {run.index}"
        print(
            f"  {run.phase} {run.tree} {label}: {run.tool}: {run.seconds:.3f} s "
            f"({run.nar_bytes / run.seconds / 1e6:.0f} MB/s; user {run.user_seconds:.2f}, "
            f"sys {run.system_seconds:.2f})",
            flush=True,
        )

    # -- set-up ----------------------------------------------------------------------------

    def import_tree(self, tree: Tree) -> None:
        """``nixcas import`` the tree; write its NAR to a file with ``nix-store --dump``."""
        os.sync()
        with tempfile.TemporaryFile() as out:
            child = run_to_fd(self.nixcas("import", str(tree.path)), out.fileno())
            out.seek(0)
            tree.store_path = out.read().decode().strip()
        tree.import_seconds = child.seconds
        print(f"  nixcas import {tree.key}: {child.seconds:.2f} s -> {tree.store_path}", flush=True)
        tree.nar_file = self.workdir / f"{tree.key}.nar"
        with open(tree.nar_file, "wb") as f:
            child = run_to_fd([self.args.nix_store, "--dump", str(tree.path)], f.fileno())
        tree.nar_size, tree.nar_sha256 = file_sha256(tree.nar_file)
        print(
            f"  nix-store --dump {tree.key} > {tree.nar_file.name}: {child.seconds:.2f} s, "
            f"{tree.nar_size:,} bytes, sha256 {tree.nar_sha256}",
            flush=True,
        )

    async def lookup(self, tree: Tree) -> None:
        """The imported root node; nixcas's recorded NAR hash and size must be nix-store's."""
        assert self.store is not None and self.store.pathinfos is not None
        path = StorePath.from_absolute_path(tree.store_path)
        info = await self.store.pathinfos.get(path.digest)
        if info is None or info.store_path != path:
            raise SystemExit(f"{tree.store_path}: not found in {self.store_dir}")
        if info.nar_sha256.hex() != tree.nar_sha256 or info.nar_size != tree.nar_size:
            raise SystemExit(
                f"{tree.store_path}: nixcas recorded NAR {info.nar_size} bytes sha256 {info.nar_sha256.hex()}, "
                f"nix-store --dump gives {tree.nar_size} bytes sha256 {tree.nar_sha256}"
            )
        tree.node = info.node
        closure = await fetch_closure(info.node, self.store.directories)
        tree.holes = [item for item in iter_plan(info.node, closure) if isinstance(item, Hole)]

    # -- render ------------------------------------------------------------------------------

    async def render_run(self, tree: Tree, tool: str, index: int) -> None:
        warmup = index == 0
        assert tree.node is not None and self.store is not None
        os.sync()
        if tool == "render lib":
            if warmup:
                size, sha256 = await render_sha256(tree.node, self.store)
                self._check(tree, tool, size, sha256)
            node, store = tree.node, self.store
            seconds, size, user, system = await timed_in_process(lambda: render_discard(node, store))
            if size != tree.nar_size:
                raise SystemExit(f"render lib {tree.key}: {size} bytes, expected {tree.nar_size}")
            self.record(Run("render", tree.key, tool, index, warmup, seconds, size, user, system))
            return
        if tool == FLOOR:
            if type(self.store.blobs) is not LocalBlobService:  # the floor reads the object layout's files
                return
            root, holes = str(self.store.blobs.root), tree.holes

            async def floor() -> int:
                return unzstd_blake3(root, holes)

            seconds, size, user, system = await timed_in_process(floor)
            if size != sum(h.size for h in holes):
                raise SystemExit(f"{FLOOR} {tree.key}: {size} bytes of content, expected {sum(h.size for h in holes)}")
            # Throughput is counted in NAR bytes like the others (the framing is a small part).
            self.record(Run("render", tree.key, tool, index, warmup, seconds, tree.nar_size, user, system))
            return
        if tool == "render CLI":
            argv = self.nixcas("dump-path", tree.store_path)
        else:
            argv = [self.args.nix_store, "--dump", str(tree.path)]
        if warmup:
            _, size, sha256 = run_hashing(argv)
            self._check(tree, tool, size, sha256)
        with open(os.devnull, "wb") as devnull:
            child = run_to_fd(argv, devnull.fileno())
        self.record(
            Run(
                "render",
                tree.key,
                tool,
                index,
                warmup,
                child.seconds,
                tree.nar_size,
                child.user_seconds,
                child.system_seconds,
            )
        )

    @staticmethod
    def _check(tree: Tree, tool: str, size: int, sha256: str) -> None:
        if size != tree.nar_size or sha256 != tree.nar_sha256:
            raise SystemExit(
                f"{tool} {tree.key}: NAR of {size} bytes sha256 {sha256}, "
                f"but nix-store --dump gives {tree.nar_size} bytes sha256 {tree.nar_sha256}"
            )
        print(f"  {tool} {tree.key}: NAR identical to nix-store --dump (sha256 {sha256[:16]}...)", flush=True)

    # -- ingest ------------------------------------------------------------------------------

    async def ingest_run(self, tree: Tree, tool: str, index: int) -> None:
        warmup = index == 0
        assert tree.nar_file is not None
        store: Store | None = None
        extra: dict[str, Any] = {}
        if tool != "ingest memory://":
            self._ingest_stores += 1
            path = self.workdir / "ingest-stores" / f"{tree.key}-{self._ingest_stores}"
            path.mkdir(parents=True)
            store = await Store.open(path)
            extra["store"] = str(path)
        gc.collect()
        os.sync()
        try:
            seconds, size, user, system = await ingest_file(tree.nar_file, store, tree)
        finally:
            if store is not None:
                await store.close()
        gc.collect()
        self.record(Run("ingest", tree.key, tool, index, warmup, seconds, size, user, system, extra=extra))


# -- reporting ------------------------------------------------------------------------------


def summarize(runs: list[Run], phase: str, tree: str, tools: tuple[str, ...], peer: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tool in tools:
        timed = [r for r in runs if r.phase == phase and r.tree == tree and r.tool == tool and not r.warmup]
        if not timed:
            continue
        median = statistics.median(r.seconds for r in timed)
        out[tool] = {
            "runs": [r.seconds for r in timed],
            "median_seconds": median,
            "min_seconds": min(r.seconds for r in timed),
            "nar_bytes": timed[0].nar_bytes,
            "mb_per_second": timed[0].nar_bytes / median / 1e6,
            "median_user_seconds": statistics.median(r.user_seconds for r in timed),
            "median_system_seconds": statistics.median(r.system_seconds for r in timed),
        }
    if peer is not None and peer in out:
        theirs = out[peer]
        for ours in out.values():
            # Throughput ratio nixcas / nix = nix seconds / nixcas seconds.
            ours["throughput_ratio"] = theirs["median_seconds"] / ours["median_seconds"]
            pairs = [b / a for a, b in zip(ours["runs"], theirs["runs"], strict=True)]
            ours["paired_throughput_ratio"] = statistics.median(pairs)
            ours["best_throughput_ratio"] = theirs["min_seconds"] / ours["min_seconds"]
    return out


def print_report(
    facts: dict[str, Any], trees: list[Tree], runs: list[Run], summary: dict[str, dict[str, Any]], runs_n: int
) -> None:
    print()
    print("## Machine")
    for key, value in facts.items():
        print(f"- {key}: {value}")
    print()
    print("## Trees")
    for t in trees:
        print(
            f"- {t.key}: {t.description}; {t.content_bytes / MIB:.1f} MiB of content, NAR {t.nar_size:,} bytes; "
            f"generated in {t.generate_seconds:.1f} s; `nixcas import` {t.import_seconds:.2f} s -> {t.store_path}"
        )
    print()
    print("## All runs")
    print()
    print("| phase | tree | tool | run | wall s | MB/s | user s | sys s |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for r in runs:
        label = "warm-up" if r.warmup else str(r.index)
        print(
            f"| {r.phase} | {r.tree} | {r.tool} | {label} | {r.seconds:.3f} | {r.nar_bytes / r.seconds / 1e6:.0f} "
            f"| {r.user_seconds:.2f} | {r.system_seconds:.2f} |"
        )
    print()
    print(f"## Render (median of {runs_n}; ratio = nixcas throughput / nix-store --dump throughput)")
    print()
    print("| tree | tool | median s | min s | MB/s | ratio (median) | ratio (paired) | ratio (best) | user s | sys s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in trees:
        for tool, s in summary.get(f"render/{t.key}", {}).items():
            print(
                f"| {t.key} | {tool} | {s['median_seconds']:.3f} | {s['min_seconds']:.3f} | {s['mb_per_second']:.0f} "
                f"| {s['throughput_ratio']:.2f}x | {s['paired_throughput_ratio']:.2f}x "
                f"| {s['best_throughput_ratio']:.2f}x | {s['median_user_seconds']:.2f} "
                f"| {s['median_system_seconds']:.2f} |"
            )
    print()
    print(f"## Ingest (median of {runs_n})")
    print()
    print("| tree | backend | median s | min s | MB/s | user s | sys s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for t in trees:
        for tool, s in summary.get(f"ingest/{t.key}", {}).items():
            print(
                f"| {t.key} | {tool} | {s['median_seconds']:.3f} | {s['min_seconds']:.3f} | {s['mb_per_second']:.0f} "
                f"| {s['median_user_seconds']:.2f} | {s['median_system_seconds']:.2f} |"
            )
    print()
    print("MB/s = NAR bytes / median wall seconds / 10^6. In-process CPU times include all threads of this process.")
    print()
    print("## Targets")
    for line in verdicts(summary, trees):
        print(f"- {line}")


def tree_json(tree: Tree) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(tree):
        value = getattr(tree, f.name)
        if f.name == "holes":
            out["blobs"] = len(value)
        elif isinstance(value, (str, int, float)):
            out[f.name] = value
        else:
            out[f.name] = str(value)
    return out


def verdicts(summary: dict[str, dict[str, Any]], trees: list[Tree]) -> list[str]:
    lines: list[str] = []
    for t in trees:
        for tool in ("render lib", "render CLI"):
            s = summary.get(f"render/{t.key}", {}).get(tool)
            if s is not None:
                ratio = s["throughput_ratio"]
                verdict = "met" if ratio >= 0.8 else "NOT met"
                lines.append(f"{tool} {t.key} >= 0.8x nix-store --dump: {verdict} ({ratio:.2f}x)")
    large = next((t for t in trees if t.key == "large"), None)
    if large is not None:
        for tool in INGEST_TOOLS:
            s = summary.get("ingest/large", {}).get(tool)
            if s is not None:
                verdict = "met" if s["mb_per_second"] >= 200 else "NOT met"
                lines.append(f"{tool} large file >= 200 MB/s: {verdict} ({s['mb_per_second']:.0f} MB/s)")
    return lines


# -- machine facts ------------------------------------------------------------------------------


def machine_facts(nix_store: str, workdir: Path) -> dict[str, Any]:
    return {
        "file_create_us_workdir": round(create_probe(workdir), 1),
        **base_facts(workdir),
        "nix_store_version": command_output([nix_store, "--version"]),
    }


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="timed runs per tool (default 5)")
    p.add_argument("--small-files", type=int, default=10_000, help="small files in the 'small' tree (default 10000)")
    p.add_argument("--tree-large", type=int, default=8, help="large files in the 'small' tree (default 8)")
    p.add_argument("--tree-large-mib", type=int, default=64, help="their size in MiB (default 64)")
    p.add_argument("--large-mib", type=int, default=1024, help="size of the 'large' tree's one file (default 1024)")
    p.add_argument("--seed", type=int, default=20240901, help="seed of the tree generators")
    p.add_argument("--skip-render", action="store_true", help="only the ingest benchmark")
    p.add_argument("--skip-ingest", action="store_true", help="only the render benchmark")
    p.add_argument("--workdir", type=Path, help="work directory (default: a new temp dir under /var/tmp)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (trees, store, NARs) at the end")
    p.add_argument("--json", type=Path, metavar="OUT", help="write all raw numbers to this JSON file")
    p.add_argument("--nixcas", default=str(REPO / ".venv" / "bin" / "nixcas"), help="nixcas executable")
    p.add_argument("--nix-store", default=shutil.which("nix-store") or "nix-store", help="nix-store executable")
    args = p.parse_args(argv)
    if args.runs < 1 or min(args.small_files, args.tree_large, args.tree_large_mib) < 0 or args.large_mib < 1:
        p.error("--runs and --large-mib must be positive, counts must not be negative")
    return args


async def run_bench(args: argparse.Namespace, workdir: Path) -> None:
    print("generating trees ...", flush=True)
    stats = generate_tree(workdir / "small" / "tree", args.small_files, args.tree_large, args.tree_large_mib, args.seed)
    trees = [
        small_tree(stats, args.tree_large, args.tree_large_mib),
        generate_large_file(workdir / "large" / "big.bin", args.large_mib, args.seed + 1),
    ]
    for t in trees:
        print(f"  {t.key}: {t.description}, {t.content_bytes / MIB:.1f} MiB in {t.generate_seconds:.1f} s", flush=True)
    facts = machine_facts(args.nix_store, workdir)
    print(f"file-creation probe: {facts['file_create_us_workdir']} us per file in the work directory", flush=True)
    bench = Bench(args, workdir)
    bench.store_dir.mkdir()
    print("importing with nixcas, dumping with nix-store ...", flush=True)
    for t in trees:
        bench.import_tree(t)
    bench.store = await Store.open(bench.store_dir, with_pathinfo=True)
    try:
        for t in trees:
            await bench.lookup(t)
        if not args.skip_render:
            print("render: warm-up (with correctness checks), then alternating timed runs ...", flush=True)
            for t in trees:
                for i in range(args.runs + 1):
                    for tool in RENDER_TOOLS:
                        await bench.render_run(t, tool, i)
    finally:
        await bench.store.close()
        bench.store = None
    if not args.skip_ingest:
        print("ingest: warm-up, then alternating timed runs ...", flush=True)
        for t in trees:
            for i in range(args.runs + 1):
                for tool in INGEST_TOOLS:
                    await bench.ingest_run(t, tool, i)

    facts["loadavg_end"] = os.getloadavg()
    summary: dict[str, dict[str, Any]] = {}
    for t in trees:
        summary[f"render/{t.key}"] = summarize(bench.runs, "render", t.key, RENDER_TOOLS, "nix-store --dump")
        summary[f"ingest/{t.key}"] = summarize(bench.runs, "ingest", t.key, INGEST_TOOLS, None)
    print_report(facts, trees, bench.runs, summary, args.runs)
    if args.json is not None:
        report = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": facts,
            "trees": [tree_json(t) for t in trees],
            "runs": [asdict(r) for r in bench.runs],
            "summary": summary,
            "verdicts": verdicts(summary, trees),
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Ctrl-C and SIGTERM interrupt at once, even a blocking wait for a child (which is then
    # killed and reaped); asyncio's own SIGINT handling would let the child finish first.
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(sig, _interrupt)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="nar-", dir=args.workdir))
    else:
        workdir = Path(tempfile.mkdtemp(prefix="nixcas-nar-", dir="/var/tmp"))
    try:
        asyncio.run(run_bench(args, workdir))
    finally:
        for probe in PROBE_DIRS:
            shutil.rmtree(probe, ignore_errors=True)
        if args.keep:
            print(f"kept {workdir}")
        else:
            print(f"removing {workdir} ...", flush=True)
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

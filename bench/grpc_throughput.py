#!/usr/bin/env python3
"""Benchmark: blob Put/Read and recursive directory Get over gRPC, TCP loopback and unix socket.

Run from the repository root::

    .venv/bin/python bench/grpc_throughput.py [--runs 5] [--size-mib 256] [--dirs 10000] [--json OUT]
                                              [--message-sizes 64,256,1024,2048] [--sweep-runs 5]
                                              [--in-process] [--scenarios memory,file|none]
                                              [--read-size BYTES] [--workdir DIR] [--keep]

The server is a real ``nixcas daemon`` in a child process (started through
``python -c`` so that the server's ``READ_MESSAGE_SIZE`` can be set for the
message-size sweep; otherwise it is exactly ``nixcas daemon -l ADDR
--blob-service-addr URL --directory-service-addr URL``); the client is this
process, using the library's gRPC clients (``GrpcBlobService``,
``GrpcDirectoryService``) as any caller would.  Client and server are two
processes, two interpreters, two GILs, as deployed.  The daemons get this
process's environment (``PYTHONPATH``, ``GLIBC_TUNABLES``, ...).

Scenarios, each over TCP loopback (``127.0.0.1:0``) and over a unix socket,
each with its own daemon and fresh, empty store:

* ``memory``: ``memory://`` blobs and directories: the wire and the two
  processes' Python code (plus, for Put, the memory backend joining the
  received parts into one 256 MiB ``bytes``);
* ``file``: the embedded store, ``objectstore+file://WORKDIR/…/blobs`` (zstd
  level 1 chunk files) and ``sqlite://WORKDIR/…/directories.sqlite``.  No
  ``fsync``/``syncfs`` is timed (a daemon's Put does not sync either); reads
  come from the page cache.

Per daemon: one untimed warm-up, then ``--runs`` timed runs of

* **Put**: ``open_write`` … ``close`` of a ``--size-mib`` blob, written in
  1 MiB blocks from a generator (the blob is never one bytes object).  The
  content is ``--size-mib`` distinct blocks of seeded random bytes, generated
  before any timing (incompressible, so zstd cannot shortcut the file
  store); for the file store the first 8 bytes are the run number, so every
  run stores a new blob;
* **Read**: ``open_read`` … EOF of that blob, draining it with
  ``reader.read(--read-size)`` (1 MiB, the library's ``READ_BLOCK``).  The
  client verifies the BLAKE3 of what it received, as every library reader does;
* **Dir Put**: upload of a ``--dirs``-directory closure through one putter
  (leaves first; client-side validation included), a different closure per
  run (file digests are salted with the run number);
* **Get recursive**: ``get_recursive(root)`` of that closure until the last
  directory (client-side decoding and closure validation included); the
  count is checked.

All daemons of a phase run at the same time and are measured in turn (run 1
on every daemon, then run 2, …, the starting daemon rotating), so that a slow
spell of the machine hits all of them alike instead of one scenario.

The closure is a complete ``--fanout``-ary tree (10: 1 + 10 + 100 + 1,000 +
8,889 directories for 10,000) in which every directory also holds three
files (one executable) and one symlink whose digests/targets derive from the
directory's number, so all directories are distinct.

MB/s = bytes / median seconds / 10^6 (``best`` = bytes / min seconds).  CPU
seconds and minor page faults of the client (this process: ``getrusage``)
and of the daemon (``/proc/PID/stat``) are recorded per operation: on a VM
where touching fresh memory is expensive, page faults explain most of the
variance between runs.

Message sizes: the main scenarios use the library's constants
(``nixcas.castore.grpc.servicers.READ_MESSAGE_SIZE`` on the server, and
``nixcas.castore.blob.grpc.WRITE_MESSAGE_SIZE`` on the client).  The sweep
then repeats Put/Read on ``memory://`` with both set to each of
``--message-sizes`` (KiB); for sizes above 1 MiB the blob is written in blocks
of the message size, or the writer could never send a message that large.
``--sweep-runs 0`` skips it.

``--in-process`` additionally measures the ``memory`` scenario with the
server in this process (``nixcas.server.start_server``): one event loop and
one GIL for both ends, which is how the tests run but not how it is deployed.

Daemons are stopped by PID with SIGTERM (SIGKILL after 15 s) and die with
this process (``PR_SET_PDEATHSIG``); the work directory (stores, sockets,
daemon logs) is removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import blake3

# The sibling script (``bench/`` is on sys.path when this file is run): shared machine facts.
from import_tree import base_facts

import nixcas
import nixcas.castore.blob.grpc as blob_grpc
import nixcas.castore.blob.grpc.chunkstore as blob_grpc_chunkstore
import nixcas.castore.blob.grpc.writing as blob_grpc_writing
import nixcas.castore.grpc.servicers as servicers
from nixcas.castore.blob.base import BlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.nodes import FileNode, Node, SymlinkNode
from nixcas.castore.sizerule import SizeRule
from nixcas.composition import blob_service_from_url, directory_service_from_url
from nixcas.server import RunningServer, start_server

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
KIB = 1 << 10
BLOCK = MIB
"""Bytes per ``write`` of the blob (raised to the message size in the sweep, if larger)."""
FILES_PER_DIR = 3
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
TRANSPORTS = ("tcp", "unix")
TARGET_MB_S = 300.0
TARGET_GET_SECONDS = 1.0
T = TypeVar("T")

DAEMON_CODE = """\
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: end with the benchmark
if os.getppid() != int(sys.argv[1]):
    sys.exit("benchmark gone")
import nixcas.castore.grpc.servicers as servicers
if sys.argv[2] != "default":
    servicers.READ_MESSAGE_SIZE = int(sys.argv[2])
from nixcas.cli.main import main
sys.argv = ["nixcas", *sys.argv[3:]]
main()
"""
"""``python -c`` program: ``nixcas ARGS…``, with the server's Read message size set first."""


# -- test data ---------------------------------------------------------------------


class BlobData:
    """``size_mib`` distinct random 1 MiB blocks, made once; a run number makes each blob distinct."""

    def __init__(self, size_mib: int, seed: int) -> None:
        rng = random.Random(seed)  # noqa: S311 - reproducible test data, not crypto
        self.blocks = [rng.randbytes(BLOCK) for _ in range(size_mib)]
        self.size = size_mib * BLOCK
        self._joined: dict[int, list[bytes]] = {BLOCK: self.blocks}

    def blocks_of(self, block: int) -> list[bytes]:
        """The same bytes in blocks of ``block`` (a multiple of 1 MiB), made before any timing."""
        if block not in self._joined:
            per = block // BLOCK
            self._joined[block] = [b"".join(self.blocks[i : i + per]) for i in range(0, len(self.blocks), per)]
        return self._joined[block]

    def salted_first(self, block: int, salt: int) -> bytes:
        """The first block of the blob of run ``salt``."""
        first = self.blocks_of(block)[0]
        return salt.to_bytes(8, "little") + first[8:]

    @staticmethod
    def stream(blocks: list[bytes], first: bytes) -> Iterator[bytes]:
        """The blob, block by block (a generator; nothing is joined)."""
        yield first
        yield from blocks[1:]


def build_closure(n_dirs: int, fanout: int, salt: int) -> tuple[list[Directory], B3Digest]:
    """A complete ``fanout``-ary tree of ``n_dirs`` distinct directories, leaves first, and its root."""
    built: dict[int, Directory] = {}
    order: list[Directory] = []
    for i in range(n_dirs - 1, -1, -1):  # children (fanout*i+1 … fanout*i+fanout) have larger numbers
        entries: dict[bytes, Node] = {}
        for k in range(FILES_PER_DIR):
            digest = B3Digest(blake3.blake3(f"{salt}:{i}:{k}".encode()).digest())
            entries[f"file-{k}".encode()] = FileNode(digest, 1000 * k + i, executable=k == 0)
        entries[b"link"] = SymlinkNode(f"../target-{i}".encode())
        for c in range(fanout * i + 1, min(fanout * i + fanout, n_dirs - 1) + 1):
            child = built.pop(c)
            entries[f"sub-{c:06d}".encode()] = child.node(SizeRule.TVIX)
        directory = Directory(entries)
        directory.encode()  # canonical bytes and digest cached before timing
        built[i] = directory
        order.append(directory)
    return order, built[0].digest


# -- the daemon --------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """CPU seconds (user + system) and minor page faults of a process so far."""

    cpu: float
    minflt: int

    def __sub__(self, other: Usage) -> Usage:
        return Usage(self.cpu - other.cpu, self.minflt - other.minflt)


def proc_usage(pid: int) -> Usage:
    """Usage of process ``pid`` (all its threads), from ``/proc/PID/stat``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return Usage((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[7]))


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs of the machine spent busy since boot (``/proc/stat``, idle and iowait excluded)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of its reaped children (the daemons, once stopped)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def self_usage() -> Usage:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return Usage(usage.ru_utime + usage.ru_stime, usage.ru_minflt)


class Daemon:
    """A ``nixcas daemon`` child process; it dies with this process (``PR_SET_PDEATHSIG``)."""

    def __init__(
        self,
        python: str,
        listen: str,
        store_dir: Path,
        blob_url: str,
        dir_url: str,
        read_message_size: int | None,
        log: Path,
    ) -> None:
        self.argv = [
            python,
            "-c",
            DAEMON_CODE,
            str(os.getpid()),
            "default" if read_message_size is None else str(read_message_size),
            "daemon",
            "-l",
            listen,
            # Anything not named below (e.g. a path info service) goes here, not to the user's default store.
            "--store-dir",
            str(store_dir),
            "--blob-service-addr",
            blob_url,
            "--directory-service-addr",
            dir_url,
            "--shutdown-grace",
            "1",
        ]
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""

    async def start(self) -> str:
        with open(self.log, "wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err
            )
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), STARTUP_TIMEOUT)
        except TimeoutError:
            line = b""
        text = line.decode(errors="replace").strip()
        if not text.startswith("listening on "):
            await self.stop()
            raise RuntimeError(f"daemon did not start ({text!r}); log:\n{self.log.read_text(errors='replace')}")
        self.url = text.removeprefix("listening on ")
        return self.url

    def usage(self) -> Usage:
        assert self.proc is not None
        return proc_usage(self.proc.pid)

    async def stop(self) -> None:
        """SIGTERM by PID; SIGKILL if it has not exited after STOP_TIMEOUT seconds."""
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()


# -- measuring ---------------------------------------------------------------------


@dataclass
class Sample:
    """One timed (or warm-up) operation."""

    scenario: str
    transport: str
    op: str
    """``put``, ``read`` (blob), ``dir_put``, ``get_recursive`` (closure)."""
    run: int
    warmup: bool
    seconds: float
    amount: int
    """Bytes for put/read, directories for dir_put/get_recursive."""
    client_cpu: float
    client_minflt: int
    server_cpu: float | None
    """``None`` for an in-process server (its CPU is in ``client_cpu``)."""
    server_minflt: int | None
    other_cpu: float
    """CPU seconds the rest of the machine used meanwhile (other processes, kernel threads; ~10 ms resolution)."""
    message_size: int | None = None
    """Sweep only: the server's Read and the client's Put message size."""


async def put_blob(blobs: BlobService, stream: Iterator[bytes], size: int) -> tuple[int, B3Digest]:
    writer = await blobs.open_write(size)
    async with writer:
        written = 0
        for block in stream:
            await writer.write(block)
            written += len(block)
        return written, await writer.close()


async def read_blob(blobs: BlobService, digest: B3Digest, read_size: int) -> int:
    reader = await blobs.open_read(digest)
    if reader is None:
        raise RuntimeError(f"blob {digest.hex()} not found")
    got = 0
    async with reader:
        while data := await reader.read(read_size):  # ends with the client's BLAKE3 check
            got += len(data)
    return got


async def put_closure(directories: DirectoryService, closure: list[Directory], root: B3Digest) -> int:
    async with directories.put_multiple_start() as putter:
        for directory in closure:
            await putter.put(directory)
        got = await putter.close()
    if got != root:
        raise RuntimeError(f"Put answered root {got.hex()}, expected {root.hex()}")
    return len(closure)


async def get_closure(directories: DirectoryService, root: B3Digest) -> int:
    count = 0
    async for _ in directories.get_recursive(root):
        count += 1
    return count


@dataclass
class Endpoint:
    """One server under test and this process's clients of it."""

    scenario: str
    transport: str
    blobs: BlobService
    directories: DirectoryService
    server_usage: Callable[[], Usage] | None
    salted: bool
    """Store a new blob every run (the file store writes everything again even for a known blob, but be sure)."""
    message_size: int | None = None

    async def close(self) -> None:
        await self.blobs.close()
        await self.directories.close()


def rotated(endpoints: list[Endpoint], run: int) -> list[Endpoint]:
    """Every run starts with the next endpoint, so none is always first after a pause."""
    k = run % len(endpoints)
    return endpoints[k:] + endpoints[:k]


@dataclass
class Bench:
    args: argparse.Namespace
    data: BlobData
    closures: list[tuple[list[Directory], B3Digest]]
    workdir: Path
    samples: list[Sample] = field(default_factory=list)
    daemons: list[Daemon] = field(default_factory=list)

    async def timed(self, ep: Endpoint, op: str, run: int, work: Awaitable[T]) -> T:
        """Await ``work`` (an operation returning ``(amount, …)`` or ``amount``); record a Sample."""
        server0 = ep.server_usage() if ep.server_usage is not None else None
        client0 = self_usage()
        busy0 = machine_busy_seconds()
        t0 = time.perf_counter()
        result = await work
        seconds = time.perf_counter() - t0
        busy = machine_busy_seconds() - busy0
        client = self_usage() - client0
        server = ep.server_usage() - server0 if ep.server_usage is not None and server0 is not None else None
        other = busy - client.cpu - (server.cpu if server is not None else 0.0)
        amount = result[0] if isinstance(result, tuple) else result
        assert isinstance(amount, int)
        sample = Sample(
            ep.scenario,
            ep.transport,
            op,
            run,
            run == 0,
            seconds,
            amount,
            client.cpu,
            client.minflt,
            None if server is None else server.cpu,
            None if server is None else server.minflt,
            max(0.0, other),
            ep.message_size,
        )
        self.samples.append(sample)
        self.print_sample(sample)
        return result

    @staticmethod
    def print_sample(s: Sample) -> None:
        label = "warm-up" if s.warmup else f"run {s.run}"
        rate = f"{s.amount / s.seconds / 1e6:6.0f} MB/s" if s.op in ("put", "read") else f"{s.amount:6d} dirs"
        size = f" {s.message_size // KIB:4d} KiB" if s.message_size is not None else ""
        server = f"{s.server_cpu:.2f} s {s.server_minflt} flt" if s.server_cpu is not None else "-"
        print(
            f"  {s.scenario:9s} {s.transport:4s}{size} {s.op:13s} {label:7s} {s.seconds:6.3f} s {rate}"
            f"  CPU client {s.client_cpu:.2f} s {s.client_minflt} flt, server {server}, other {s.other_cpu:.2f} s",
            flush=True,
        )

    async def blob_rounds(self, endpoints: list[Endpoint], runs: int) -> None:
        """Put then Read, on every endpoint in turn; run 0 is the warm-up."""
        for run in range(runs + 1):
            for ep in rotated(endpoints, run):
                block = max(BLOCK, ep.message_size or 0)
                first = self.data.salted_first(block, run if ep.salted else 0)
                stream = BlobData.stream(self.data.blocks_of(block), first)
                set_write_message_size(ep.message_size or DEFAULT_WRITE_MESSAGE_SIZE)
                _, digest = await self.timed(ep, "put", run, put_blob(ep.blobs, stream, self.data.size))
                got = await self.timed(ep, "read", run, read_blob(ep.blobs, digest, self.args.read_size))
                if got != self.data.size:
                    raise RuntimeError(f"read {got} bytes, expected {self.data.size}")
        set_write_message_size(DEFAULT_WRITE_MESSAGE_SIZE)

    async def dir_rounds(self, endpoints: list[Endpoint], runs: int) -> None:
        """Put then recursive Get of a new closure per run, on every endpoint in turn."""
        for run in range(runs + 1):
            closure, root = self.closures[run]
            for ep in rotated(endpoints, run):
                await self.timed(ep, "dir_put", run, put_closure(ep.directories, closure, root))
                got = await self.timed(ep, "get_recursive", run, get_closure(ep.directories, root))
                if got != len(closure):
                    raise RuntimeError(f"recursive Get returned {got} directories, expected {len(closure)}")

    def listen_address(self, transport: str, name: str) -> str:
        return "127.0.0.1:0" if transport == "tcp" else str(self.workdir / f"{name}.sock")

    async def daemon_endpoint(self, scenario: str, transport: str, message_size: int | None = None) -> Endpoint:
        """Start a daemon with a fresh store; connect clients to it."""
        name = f"{scenario}-{transport}" + (f"-{message_size // KIB}k" if message_size is not None else "")
        store = self.workdir / name
        store.mkdir()
        if scenario == "file":
            blob_url, dir_url = f"objectstore+file://{store}/blobs", f"sqlite://{store}/directories.sqlite"
        else:
            blob_url, dir_url = "memory://", "memory://"
        daemon = Daemon(
            self.args.python,
            self.listen_address(transport, name),
            store,
            blob_url,
            dir_url,
            message_size,
            self.workdir / f"{name}.log",
        )
        self.daemons.append(daemon)
        url = await daemon.start()
        return Endpoint(
            scenario,
            transport,
            await blob_service_from_url(url),
            await directory_service_from_url(url),
            daemon.usage,
            salted=scenario == "file",
            message_size=message_size,
        )

    async def main_scenarios(self) -> None:
        endpoints: list[Endpoint] = []
        try:
            for scenario in self.args.scenarios:
                for transport in TRANSPORTS:
                    endpoints.append(await self.daemon_endpoint(scenario, transport))
            print(f"blob Put/Read, {len(endpoints)} daemons in turn:", flush=True)
            await self.blob_rounds(endpoints, self.args.runs)
            print(f"closure Put/Get, {len(endpoints)} daemons in turn:", flush=True)
            await self.dir_rounds(endpoints, self.args.runs)
        finally:
            for ep in endpoints:
                await ep.close()
            await self.stop_daemons()

    async def sweep(self) -> None:
        endpoints: list[Endpoint] = []
        try:
            for size in self.args.message_sizes:
                for transport in TRANSPORTS:
                    endpoints.append(await self.daemon_endpoint("sweep", transport, size))
            print(f"message-size sweep, memory://, {len(endpoints)} daemons in turn:", flush=True)
            await self.blob_rounds(endpoints, self.args.sweep_runs)
        finally:
            for ep in endpoints:
                await ep.close()
            await self.stop_daemons()

    async def in_process(self) -> None:
        from nixcas.castore.blob.memory import MemoryBlobService
        from nixcas.castore.dirs.memory import MemoryDirectoryService

        servers: list[RunningServer] = []
        endpoints: list[Endpoint] = []
        try:
            for transport in TRANSPORTS:
                listen = self.listen_address(transport, f"inprocess-{transport}")
                running = await start_server(listen, MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX))
                servers.append(running)
                endpoints.append(
                    Endpoint(
                        "inprocess",
                        transport,
                        await blob_service_from_url(running.url),
                        await directory_service_from_url(running.url),
                        None,
                        salted=False,
                    )
                )
            print("in-process servers (memory://), in turn:", flush=True)
            await self.blob_rounds(endpoints, self.args.runs)
            await self.dir_rounds(endpoints, self.args.runs)
        finally:
            for ep in endpoints:
                await ep.close()
            for running in servers:
                await running.stop(1.0)

    async def stop_daemons(self) -> None:
        daemons, self.daemons = self.daemons, []
        for daemon in daemons:
            await daemon.stop()


DEFAULT_WRITE_MESSAGE_SIZE: int = blob_grpc.WRITE_MESSAGE_SIZE
DEFAULT_READ_MESSAGE_SIZE: int = servicers.READ_MESSAGE_SIZE


def set_write_message_size(size: int) -> None:
    """The client's Put message size (a ``Final`` of the library, patched here only)."""
    for module in (blob_grpc_writing, blob_grpc_chunkstore):  # the modules that read it
        setattr(module, "WRITE_MESSAGE_SIZE", size)  # noqa: B010


# -- reporting ---------------------------------------------------------------------


def summarize(samples: list[Sample]) -> list[dict[str, Any]]:
    """Median per (scenario, transport, op, message size) over the timed runs."""
    groups: dict[tuple[str, str, str, int | None], list[Sample]] = {}
    for s in samples:
        if not s.warmup:
            groups.setdefault((s.scenario, s.transport, s.op, s.message_size), []).append(s)
    rows: list[dict[str, Any]] = []
    for (scenario, transport, op, message_size), group in groups.items():
        seconds = [s.seconds for s in group]
        median = statistics.median(seconds)
        row: dict[str, Any] = {
            "scenario": scenario,
            "transport": transport,
            "op": op,
            "message_size": message_size,
            "runs": len(group),
            "seconds": seconds,
            "median_seconds": median,
            "min_seconds": min(seconds),
            "max_seconds": max(seconds),
            "median_client_cpu": statistics.median(s.client_cpu for s in group),
            "median_client_minflt": statistics.median(s.client_minflt for s in group),
            "max_other_cpu": max(s.other_cpu for s in group),
            "median_server_cpu": _median_or_none([s.server_cpu for s in group]),
            "median_server_minflt": _median_or_none([s.server_minflt for s in group]),
        }
        if op in ("put", "read"):
            row["mb_per_second"] = group[0].amount / median / 1e6
            row["mb_per_second_best"] = group[0].amount / min(seconds) / 1e6
        rows.append(row)
    return rows


def _median_or_none(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known and len(known) == len(values) else None


def _find(
    rows: list[dict[str, Any]], scenario: str, transport: str, op: str, size: int | None = None
) -> dict[str, Any] | None:
    for row in rows:
        if (row["scenario"], row["transport"], row["op"], row["message_size"]) == (scenario, transport, op, size):
            return row
    return None


def _cpu(row: dict[str, Any]) -> str:
    server = row["median_server_cpu"]
    return f"{row['median_client_cpu']:.2f} / " + (f"{server:.2f}" if server is not None else "-")


def _faults(row: dict[str, Any]) -> str:
    server = row["median_server_minflt"]
    return f"{row['median_client_minflt'] / 1000:.0f}k / " + (f"{server / 1000:.0f}k" if server is not None else "-")


def print_report(facts: dict[str, Any], rows: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """Print markdown tables; return the target verdicts."""
    print()
    print("## Machine")
    for key, value in facts.items():
        print(f"- {key}: {value}")
    scenarios = [s for s in ("memory", "file", "inprocess") if any(r["scenario"] == s for r in rows)]
    if scenarios:
        print()
        print(f"## Blob Put / Read of {args.size_mib} MiB (median of {args.runs}; MB/s = 10^6 B/s)")
        print()
        print(
            "| scenario | transport | Put MB/s | Put best | Read MB/s | Read best "
            "| Put CPU s client/server | Put page faults | Read CPU s | Read page faults |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for scenario in scenarios:
            for transport in TRANSPORTS:
                put, read = _find(rows, scenario, transport, "put"), _find(rows, scenario, transport, "read")
                if put is None or read is None:
                    continue
                print(
                    f"| {scenario} | {transport} | {put['mb_per_second']:.0f} | {put['mb_per_second_best']:.0f} "
                    f"| {read['mb_per_second']:.0f} | {read['mb_per_second_best']:.0f} | {_cpu(put)} | {_faults(put)} "
                    f"| {_cpu(read)} | {_faults(read)} |"
                )
        print()
        print(f"## Directory closure of {args.dirs} directories (median of {args.runs})")
        print()
        print("| scenario | transport | Put s | Get recursive s | Get min s | Put CPU s client/server | Get CPU s |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for scenario in scenarios:
            for transport in TRANSPORTS:
                put, get = (
                    _find(rows, scenario, transport, "dir_put"),
                    _find(rows, scenario, transport, "get_recursive"),
                )
                if put is None or get is None:
                    continue
                print(
                    f"| {scenario} | {transport} | {put['median_seconds']:.3f} | {get['median_seconds']:.3f} "
                    f"| {get['min_seconds']:.3f} | {_cpu(put)} | {_cpu(get)} |"
                )
    sweep = [r for r in rows if r["scenario"] == "sweep"]
    if sweep:
        print()
        print(f"## Message size sweep, memory:// (MB/s: median of {args.sweep_runs} (best))")
        print()
        print("| message size | Put tcp | Put unix | Read tcp | Read unix |")
        print("|---:|---:|---:|---:|---:|")
        for size in args.message_sizes:
            cells = []
            for op in ("put", "read"):
                for transport in TRANSPORTS:
                    row = _find(rows, "sweep", transport, op, size)
                    cells.append(
                        f"{row['mb_per_second']:.0f} ({row['mb_per_second_best']:.0f})" if row is not None else "-"
                    )
            print(f"| {size // KIB} KiB | {' | '.join(cells)} |")
    verdicts: list[str] = []
    for scenario in ("memory", "file"):
        for transport in TRANSPORTS:
            for op in ("put", "read"):
                row = _find(rows, scenario, transport, op)
                if row is not None:
                    ok = row["mb_per_second"] >= TARGET_MB_S
                    verdicts.append(
                        f"{op} {scenario} {transport}: {row['mb_per_second']:.0f} MB/s "
                        f"{'>=' if ok else '<'} {TARGET_MB_S:.0f}: {'met' if ok else 'NOT met'}"
                    )
            row = _find(rows, scenario, transport, "get_recursive")
            if row is not None:
                ok = row["median_seconds"] <= TARGET_GET_SECONDS
                verdicts.append(
                    f"get_recursive {scenario} {transport}: {row['median_seconds']:.3f} s "
                    f"{'<=' if ok else '>'} {TARGET_GET_SECONDS:.0f} s: {'met' if ok else 'NOT met'}"
                )
    if verdicts and (args.size_mib != 256 or args.dirs != 10_000):
        verdicts.append("(the targets are defined for --size-mib 256 --dirs 10000)")
    print()
    print("## Targets")
    for line in verdicts:
        print(f"- {line}")
    return verdicts


# -- machine facts -----------------------------------------------------------------


def machine_facts(workdir: Path, label: str | None) -> dict[str, Any]:
    """Where and what was measured (the commit only if nixcas is imported from this checkout)."""
    import grpc

    from_repo = Path(nixcas.__file__).resolve().is_relative_to(REPO / "src")

    facts = base_facts(workdir)
    if not from_repo:
        facts["nixcas_commit"] = facts["nixcas_src_dirty"] = None
    return {
        "label": label,
        **facts,
        "grpcio": grpc.__version__,
        "nixcas_imported_from": str(Path(nixcas.__file__).parent),
        "default_read_message_size": DEFAULT_READ_MESSAGE_SIZE,
        "default_write_message_size": DEFAULT_WRITE_MESSAGE_SIZE,
    }


# -- main --------------------------------------------------------------------------


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) * KIB for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of KiB: {text!r}") from None
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError("message sizes must be positive")
    return sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="timed runs per scenario and transport (default 5)")
    p.add_argument("--size-mib", type=int, default=256, help="blob size in MiB (default 256)")
    p.add_argument("--dirs", type=int, default=10_000, help="directories in the closure (default 10000)")
    p.add_argument("--fanout", type=int, default=10, help="sub-directories per directory (default 10)")
    p.add_argument("--read-size", type=int, default=MIB, help="bytes per reader.read() (default 1 MiB)")
    p.add_argument(
        "--message-sizes",
        type=_sizes,
        default=_sizes("64,256,1024,2048"),
        metavar="KIB,…",
        help="Read/Put message sizes of the sweep, in KiB (default 64,256,1024,2048)",
    )
    p.add_argument("--sweep-runs", type=int, default=5, help="timed runs per sweep point (default 5; 0 skips)")
    p.add_argument(
        "--scenarios", default="memory,file", help="daemon scenarios: memory,file (default), one of them, or none"
    )
    p.add_argument("--in-process", action="store_true", help="also measure memory:// with the server in-process")
    p.add_argument("--seed", type=int, default=20240901, help="seed of the blob content")
    p.add_argument("--workdir", type=Path, help="where stores, sockets and logs go (default: a new dir in /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--label", help="free text recorded with the results (e.g. which source tree was measured)")
    p.add_argument("--json", type=Path, metavar="OUT", help="write all raw numbers to this JSON file")
    p.add_argument("--python", default=sys.executable, help="python that runs the daemon (default: this one)")
    args = p.parse_args(argv)
    if args.runs < 1 or args.sweep_runs < 0 or args.size_mib < 1 or args.dirs < 1 or args.fanout < 1:
        p.error("--runs, --size-mib, --dirs, --fanout must be positive, --sweep-runs not negative")
    if args.read_size < 1:
        p.error("--read-size must be positive")
    if any(size > MIB and size % MIB for size in args.message_sizes):
        p.error("message sizes above 1 MiB must be multiples of 1 MiB")
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip() and s.strip() != "none"]
    if not set(args.scenarios) <= {"memory", "file"}:
        p.error("--scenarios: memory and/or file")
    return args


async def amain(args: argparse.Namespace, workdir: Path) -> None:
    facts = machine_facts(workdir, args.label)
    print(f"generating {args.size_mib} MiB of random blocks and {args.runs + 1} closures of {args.dirs} dirs ...")
    t0 = time.perf_counter()
    data = BlobData(args.size_mib, args.seed)
    closures = [build_closure(args.dirs, args.fanout, salt) for salt in range(args.runs + 1)]
    print(f"  {time.perf_counter() - t0:.1f} s", flush=True)
    bench = Bench(args, data, closures, workdir)
    started = time.perf_counter()
    busy0, own0 = machine_busy_seconds(), own_cpu_seconds()
    try:
        if args.scenarios:
            await bench.main_scenarios()
        if args.sweep_runs:
            await bench.sweep()
        if args.in_process:
            await bench.in_process()
    finally:
        await bench.stop_daemons()
    facts["loadavg_end"] = os.getloadavg()
    facts["measuring_seconds"] = round(time.perf_counter() - started, 1)
    # Anything else running meanwhile competed for the 2 CPUs: report how much.
    facts["other_cpu_seconds_approx"] = round((machine_busy_seconds() - busy0) - (own_cpu_seconds() - own0), 1)
    rows = summarize(bench.samples)
    verdicts = print_report(facts, rows, args)
    if args.json is not None:
        report = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": facts,
            "samples": [asdict(s) for s in bench.samples],
            "summary": rows,
            "targets": verdicts,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="nixcas-grpc-bench-", dir=args.workdir))
    try:
        asyncio.run(amain(args, workdir))
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

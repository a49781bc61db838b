#!/usr/bin/env python3
"""Benchmark: nar-bridge against nginx serving a ``nix copy --to file://`` cache of the same paths.

Run from the repository root::

    .venv/bin/python bench/bridge.py [--workdir DIR] [--large-mib 256] [--small 500] [--runs 5]
                                     [--seconds 5] [--json OUT] [--nar-only] [--compare-src SRC]

Setup (not timed, except where noted):

* a throwaway chroot Nix store gets one large file (``--large-mib`` MiB, half
  random, half compressible bytes) and ``--small`` small files (1-8 KiB), each
  a store path via ``nix-store --add``;
* ``nix copy --to http://BRIDGE?compression=none`` uploads all of them into a
  fresh embedded nixcas store through a running ``nixcas nar-bridge``
  (the real upload flow; its wall time is reported as information);
* ``nix copy --to file://CACHE?compression=none`` writes the peer's cache, which
  nginx (``nginx-light``, a generated config, one worker, ``sendfile on``)
  serves on another loopback port.  Both serve uncompressed NARs, so both
  send the same bytes.

Measurements, alternating bridge / nginx within each of ``--runs`` rounds:

* **NAR single stream**: one ``curl -o /dev/null`` of the large path's NAR (the
  URL each server's narinfo names); MiB/s = NAR bytes / curl's total time; and
  the CPU time (user + system) the server's processes used during it, per GiB;
* **NAR 8 concurrent**: eight such curls at once; MiB/s = 8 x NAR bytes / wall
  time from the first start to the last exit;
* **narinfo/s**: ``wrk -t2 -c16 -d{seconds}s`` with a Lua script requesting the
  small paths' narinfos in random order;
* **HTTP floor** (bridge only, for information): the same ``wrk`` on
  ``/nix-cache-info``, a constant body the bridge answers without touching the
  store: what its HTTP stack (aiohttp, its workers) manages by itself;
* **NAR floors** (for information, in this process, no HTTP): the same NAR
  rendered by ``render_nar`` and streamed by ``NarSource.stream`` (what the
  bridge sends) from the bridge's store into nothing, and one BLAKE3 pass over
  the NAR's bytes held in memory, one thread (the least a stream that verifies
  every byte must do).
* **NAR single stream, floor**: the same ``curl`` from ``bench/nar_floor.py``, a
  server that does only what serving this NAR with every byte verified needs
  (each chunk object read, decompressed and BLAKE3-checked on two threads before
  it is sent, the whole blob hashed on a third; no store API, no asyncio, no HTTP
  library): the least a verifying server of this store's layout can do, measured
  against nginx in the same rounds.

``--nar-only`` measures the single stream alone (no 8 concurrent, no ``wrk``);
``--narinfo-only`` measures the narinfo rate, the CPU the server used per narinfo
and each bridge's HTTP floor alone (no NAR streams, no NAR floors).
``--compare-src SRC`` starts a second bridge on the same store from other
sources (``PYTHONPATH=SRC``, e.g. main's ``src``), measured as ``before`` in the
same rounds; the order of the servers alternates every round.  ``--compare-env
KEY=VALUE`` (repeatable) starts that second bridge with these environment
variables (from these sources, unless ``--compare-src`` is given too), e.g.
``NIXCAS_BRIDGE_FRONT=0`` for the bridge without its front protocol.

The bridge runs on the event loop ``--event-loop`` names (default: its own
``auto``, uvloop when installed); the one it used is recorded in the facts.

Before timing, each server's NAR is downloaded once and its SHA-256 checked
against the NarHash Nix recorded.  Both servers and the clients share the
machine's two cores; curl and wrk take part of them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pwd
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

# The sibling scripts (``bench/`` is on sys.path when this file is run): shared machine facts, chunk objects.
from import_tree import base_facts
from nar import chunk_object_paths

from nixcas.castore.digest import B3Digest
from nixcas.store import nixbase32
from nixcas.store.narinfo import NarInfo

REPO = Path(__file__).resolve().parent.parent
NIXCAS = [sys.executable, "-m", "nixcas.cli.main"]
NGINX_CONF = """
daemon off;
user {user};
worker_processes 1;
pid {pid};
error_log {log} warn;
events {{ worker_connections 1024; }}
http {{
    {access_log};
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    types {{ text/x-nix-narinfo narinfo; application/x-nix-nar nar; }}
    client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};
    uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""
WRK_SCRIPT = """
local paths = {{{paths}}}
math.randomseed(42)
request = function()
  return wrk.format("GET", paths[math.random(#paths)])
end
"""


FOUR_BITS = bytes(0x61 + (b & 0x0F) for b in range(256))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nix_env(workdir: Path, name: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIX_")}
    env["HOME"] = str(workdir / f"home-{name}")
    env["XDG_CACHE_HOME"] = str(workdir / f"cache-{name}")
    env["NIX_CONFIG"] = "experimental-features = nix-command\nsandbox = false\nsubstituters =\n"
    return env


def run(argv: list[str], env: dict[str, str] | None = None) -> str:
    result = subprocess.run(argv, capture_output=True, env=env, check=False, timeout=3600)
    if result.returncode != 0:
        sys.exit(f"{argv[:4]}: {result.stderr.decode(errors='replace')}")
    return result.stdout.decode()


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on 127.0.0.1:{port}")


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 - loopback http
        body: bytes = response.read()
        return body


def nar_sha256(url: str) -> tuple[int, bytes]:
    h = hashlib.sha256()
    size = 0
    with urllib.request.urlopen(url, timeout=600) as response:  # noqa: S310 - loopback http
        while block := response.read(1 << 20):
            h.update(block)
            size += len(block)
    return size, h.digest()


def make_paths(workdir: Path, large_mib: int, small: int, seed: int) -> tuple[Path, str, list[str]]:
    rng = random.Random(seed)  # noqa: S311 - benchmark data
    src = workdir / "src"
    src.mkdir()
    large = src / "large.bin"
    with open(large, "wb") as f:
        for i in range(large_mib):
            block = rng.randbytes(1 << 20)
            f.write(block if i % 2 == 0 else block.translate(FOUR_BITS))  # half random, half 4 bits/byte
    smalls = []
    for i in range(small):
        p = src / f"small-{i}.txt"
        p.write_bytes(rng.randbytes(rng.randint(1024, 8192)))
        smalls.append(str(p))
    store = workdir / "nix-a"
    env = nix_env(workdir, "add")
    large_path = run(["nix-store", "--store", str(store), "--add", str(large)], env).strip()
    small_paths = run(["nix-store", "--store", str(store), "--add", *smalls], env).split()
    return store, large_path, small_paths


class Servers:
    """The bridge and nginx, started and stopped by PID."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pids: dict[str, int] = {}
        """Base URL -> PID of the server's first process (its workers are its children)."""

    def start_bridge(
        self, extra: list[str] | None = None, src: str | None = None, name: str = "bridge",
        env: dict[str, str] | None = None,
    ) -> str:  # fmt: skip
        """A bridge on the benchmark's store; ``src``: run it from those sources (``PYTHONPATH``), with ``env`` set."""
        port = free_port()
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        if src is not None or env:
            env = {**os.environ, **(env or {}), **({"PYTHONPATH": src} if src is not None else {})}
        proc = subprocess.Popen(
            [*NIXCAS, "--store-dir", str(self.workdir / "nixcas"), "nar-bridge", "-l", f"127.0.0.1:{port}",
             "--allow-writes", *(extra or [])],
            stdout=subprocess.DEVNULL, stderr=log, env=env,
        )  # fmt: skip
        self.procs.append(proc)
        self.pids[f"http://127.0.0.1:{port}"] = proc.pid
        wait_port(port)
        return f"http://127.0.0.1:{port}"

    def start_nginx(self, root: Path, access_log: bool = False) -> str:
        """nginx serving ``root``; ``access_log``: one line a request to a file, as the bridge writes one to stderr."""
        port = free_port()
        conf = self.workdir / "nginx.conf"
        tmp = self.workdir / "nginx-tmp"
        tmp.mkdir(exist_ok=True)
        conf.write_text(
            NGINX_CONF.format(
                user=pwd.getpwuid(os.getuid()).pw_name,
                pid=self.workdir / "nginx.pid",
                log=self.workdir / "nginx.log",
                tmp=tmp,
                port=port,
                root=root,
                access_log=f"access_log {self.workdir / 'access.log'}" if access_log else "access_log off",
            )
        )
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(self.workdir)], stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        self.pids[f"http://127.0.0.1:{port}"] = proc.pid
        wait_port(port)
        return f"http://127.0.0.1:{port}"

    def start_floor(self, nar_file: Path, blob: bytes, chunks: list[Path]) -> str:
        """``bench/nar_floor.py``: the least a server verifying every byte of this NAR before sending it does."""
        port = free_port()
        chunk_list = self.workdir / "floor-chunks.txt"
        chunk_list.write_text("\n".join(map(str, chunks)))
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "bench" / "nar_floor.py"), str(port), str(nar_file), blob.hex(),
             str(chunk_list)],
            stdout=subprocess.DEVNULL, stderr=open(self.workdir / "floor.log", "wb"),  # noqa: SIM115
        )  # fmt: skip
        self.procs.append(proc)
        self.pids[f"http://127.0.0.1:{port}"] = proc.pid
        wait_port(port)
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` and its descendants still running."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += times.get(p, 0.0)
        todo.extend(c for c, parent in parents.items() if parent == p)
    return total


def curl_time(url: str) -> tuple[float, int]:
    out = run(["curl", "-sf", "-o", "/dev/null", "-w", "%{time_total} %{size_download}", url])
    seconds, size = out.split()
    return float(seconds), int(size)


def concurrent(url: str, n: int) -> tuple[float, int]:
    start = time.perf_counter()
    procs = [
        subprocess.Popen(["curl", "-sf", "-o", "/dev/null", "-w", "%{size_download}", url], stdout=subprocess.PIPE)
        for _ in range(n)
    ]
    total = 0
    for p in procs:
        out, _ = p.communicate(timeout=600)
        if p.returncode != 0:
            sys.exit(f"curl {url} failed")
        total += int(out)
    return time.perf_counter() - start, total


def wrk_rate(base: str, paths: list[str], seconds: int, workdir: Path) -> float:
    """Requests/s of ``wrk`` GETting ``paths`` (store paths: their narinfos; else URL paths as given)."""
    script = workdir / "narinfos.lua"
    urls = [f"/{p[11:43]}.narinfo" if p.startswith("/nix/store/") else p for p in paths]
    script.write_text(WRK_SCRIPT.format(paths=", ".join(f'"{u}"' for u in urls)))
    out = run(["wrk", "-t2", "-c16", f"-d{seconds}s", "-s", str(script), base])
    for line in out.splitlines():
        if line.startswith("Requests/sec:"):
            if "Non-2xx" in out:
                sys.exit(f"wrk saw errors against {base}:\n{out}")
            return float(line.split()[1])
    sys.exit(f"wrk output without a rate:\n{out}")


def narinfo_round(rows: dict[str, list[float]], base: str, pid: int, smalls: list[str], seconds: int,
                  workdir: Path, floor: bool) -> None:  # fmt: skip
    """One ``--narinfo-only`` round of one server: narinfo/s, server CPU per narinfo (µs), the HTTP floor."""
    cpu = tree_cpu(pid)
    rate = wrk_rate(base, smalls, seconds, workdir)
    rows["narinfo"].append(rate)
    rows["narinfo_cpu_us"].append((tree_cpu(pid) - cpu) / (rate * seconds) * 1e6)
    if floor:
        rows.setdefault("floor", []).append(wrk_rate(base, ["/nix-cache-info"], seconds, workdir))


def large_blob(store_dir: Path, store_path: str) -> B3Digest:
    """The BLAKE3 digest of the large path's file in the bridge's store."""
    import asyncio

    from nixcas.api import open_store

    async def digest() -> B3Digest:
        async with await open_store(store_dir, with_pathinfo=True) as store:
            assert store.pathinfos is not None
            info = await store.pathinfos.get(nixbase32.decode(store_path[11:43]))
            assert info is not None
            return info.node.digest  # type: ignore[union-attr]

    return asyncio.run(digest())


def nar_floors(store_dir: Path, store_path: str, nar_file: Path) -> tuple[float, float, float]:
    """MiB/s of ``render_nar`` and of ``NarSource.stream`` (what the bridge sends) of ``store_path`` from
    the store in ``store_dir`` (no HTTP), and of one BLAKE3 pass over the NAR in ``nar_file`` (read into
    memory first, not timed)."""
    import asyncio

    import blake3

    from nixcas.api import open_store
    from nixcas.store.nar.render import render_nar

    try:
        from nixcas.store.nar.source import NarSource
    except ImportError:  # sources from before NarSource
        NarSource = None  # type: ignore[misc,assignment]

    async def render() -> tuple[int, float, float]:
        async with await open_store(store_dir, with_pathinfo=True) as store:
            assert store.pathinfos is not None
            info = await store.pathinfos.get(nixbase32.decode(store_path[11:43]))
            assert info is not None
            size = 0
            start = time.perf_counter()
            async for chunk in render_nar(info.node, store.blobs, store.directories):
                size += len(chunk)
            rendered = time.perf_counter() - start
            streamed = float("nan")
            if NarSource is not None:
                start = time.perf_counter()
                async for piece in NarSource(info.node, store.blobs, store.directories).stream():
                    size -= len(piece)
                streamed = time.perf_counter() - start
                assert size == 0
            return len(data), rendered, streamed

    data = nar_file.read_bytes()
    size, rendered, streamed = asyncio.run(render())
    start = time.perf_counter()
    blake3.blake3(data).digest()
    hashed = time.perf_counter() - start
    return size / rendered / 2**20, size / streamed / 2**20, size / hashed / 2**20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--large-mib", type=int, default=256)
    parser.add_argument("--small", type=int, default=500)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=20261124)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--workers", type=int, default=None, help="nar-bridge --workers (default: its own)")
    parser.add_argument(
        "--nginx-access-log", action="store_true", help="nginx writes an access line a request too (as the bridge does)"
    )
    parser.add_argument("--event-loop", default=None, help="nar-bridge --event-loop (default: its own, auto)")
    parser.add_argument("--nar-only", action="store_true", help="only the single NAR stream (no 8x, no wrk)")
    parser.add_argument("--narinfo-only", action="store_true", help="only narinfo/s and the HTTP floor (no NARs)")
    parser.add_argument(
        "--compare-env", action="append", default=[], metavar="KEY=VALUE",
        help="start the 'before' bridge with this environment variable (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--compare-src", default=None, help="also serve from these sources (a PYTHONPATH, e.g. main's src) as 'before'"
    )
    args = parser.parse_args(argv)
    for tool in ("nix", "nix-store", "nginx", "wrk", "curl"):
        if shutil.which(tool) is None and not (tool == "nginx" and Path("/usr/sbin/nginx").exists()):
            sys.exit(f"{tool} is needed (scripts/system-deps.sh bench)")
    parent = args.workdir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bridge-bench-", dir=parent)).absolute()
    servers = Servers(workdir)
    try:
        facts = base_facts(workdir)
        facts["nix_version"] = run(["nix-store", "--version"]).strip()
        nginx_v = subprocess.run(["nginx", "-v"], capture_output=True, check=False)
        facts["nginx_version"] = nginx_v.stderr.decode().strip()
        print(f"generating {args.large_mib} MiB + {args.small} small paths in {workdir} ...", flush=True)
        store, large, smalls = make_paths(workdir, args.large_mib, args.small, args.seed)
        extra = [] if args.workers is None else ["--workers", str(args.workers)]
        extra += [] if args.event_loop is None else ["--event-loop", args.event_loop]
        bridge = servers.start_bridge(extra)
        cache = workdir / "file-cache"
        env = nix_env(workdir, "copy")
        t0 = time.perf_counter()
        run(["nix", "copy", "--store", str(store), "--to", f"{bridge}?compression=none", large, *smalls], env)
        upload_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        run(["nix", "copy", "--store", str(store), "--to", f"file://{cache}?compression=none", large, *smalls], env)
        file_copy_s = time.perf_counter() - t0
        print(f"nix copy to the bridge: {upload_s:.2f} s; to file://: {file_copy_s:.2f} s", flush=True)
        nginx = servers.start_nginx(cache, access_log=args.nginx_access_log)
        bases = {"nar-bridge": bridge, "nginx": nginx}
        if args.compare_src is not None or args.compare_env:
            compare_env = dict(item.split("=", 1) for item in args.compare_env)
            bases["before"] = servers.start_bridge(extra, src=args.compare_src, name="before", env=compare_env)

        urls: dict[str, str] = {}
        for name, base in bases.items():
            info = NarInfo.parse(fetch(f"{base}/{large[11:43]}.narinfo").decode())
            if name == "nginx":
                nar_file = cache / info.url
            urls[name] = f"{base}/{info.url}"
            size, sha = nar_sha256(urls[name])
            if (size, sha) != (info.nar_size, info.nar_sha256):
                sys.exit(f"{name}: the NAR does not match its NarHash/NarSize")
            print(f"{name}: NAR {size} bytes, sha256:{nixbase32.encode(sha)} ok", flush=True)
        nar_bytes = info.nar_size
        if not args.narinfo_only:  # the verifying floor server: the same NAR, no store API, no HTTP library
            blob = large_blob(workdir / "nixcas", large)
            bases["floor"] = servers.start_floor(nar_file, blob, chunk_object_paths(workdir / "nixcas" / "blobs", blob))
            urls["floor"] = f"{bases['floor']}/{info.url}"
            size, sha = nar_sha256(urls["floor"])
            if (size, sha) != (info.nar_size, info.nar_sha256):
                sys.exit("floor: the NAR does not match its NarHash/NarSize")
            print(f"floor: NAR {size} bytes ok", flush=True)
        log_text = (workdir / "bridge.log").read_text(errors="replace")
        loop_used = log_text.split("event loop: ", 1)[1].split(";", 1)[0] if "event loop: " in log_text else "?"
        facts["bridge_event_loop"] = loop_used

        results: dict[str, dict[str, list[float]]] = {
            n: {"single": [], "cpu_per_gib": [], "concurrent": [], "narinfo": [], "narinfo_cpu_us": []} for n in urls
        }
        results["nar-bridge"]["floor"] = []
        results["floors"] = {"render_only": [], "stream_only": [], "blake3_one_pass": [], "loadavg": []}
        order = list(urls)
        for r in range(args.runs):
            results["floors"]["loadavg"].append(os.getloadavg()[0])
            for name in order if r % 2 == 0 else order[::-1]:
                base = bases[name]
                if args.narinfo_only:
                    narinfo_round(results[name], base, servers.pids[base], smalls, args.seconds, workdir,
                                  name != "nginx")  # fmt: skip
                    rows = results[name]
                    floor_text = f", floor {rows['floor'][-1]:8.0f}/s" if "floor" in rows else ""
                    print(f"round {r + 1} {name:10}: narinfo {rows['narinfo'][-1]:8.0f}/s, "
                          f"{rows['narinfo_cpu_us'][-1]:.0f} µs CPU each{floor_text}", flush=True)  # fmt: skip
                    continue
                cpu = tree_cpu(servers.pids[base])
                seconds, size = curl_time(urls[name])
                cpu = tree_cpu(servers.pids[base]) - cpu
                assert size == nar_bytes
                results[name]["single"].append(size / seconds / 2**20)
                results[name]["cpu_per_gib"].append(cpu / (size / 2**30))
                if not args.nar_only and name != "floor":
                    wall, total = concurrent(urls[name], 8)
                    assert total == 8 * nar_bytes
                    results[name]["concurrent"].append(total / wall / 2**20)
                    results[name]["narinfo"].append(wrk_rate(base, smalls, args.seconds, workdir))
                if name == "nar-bridge" and not args.nar_only:
                    results[name]["floor"].append(wrk_rate(base, ["/nix-cache-info"], args.seconds, workdir))
                if name == "nar-bridge":
                    rendered, streamed, hashed = nar_floors(workdir / "nixcas", large, nar_file)
                    results["floors"]["render_only"].append(rendered)
                    results["floors"]["stream_only"].append(streamed)
                    results["floors"]["blake3_one_pass"].append(hashed)
                extra_text = (
                    ""
                    if args.nar_only or name == "floor"
                    else f", 8x {results[name]['concurrent'][-1]:7.0f} MiB/s, "
                    f"narinfo {results[name]['narinfo'][-1]:8.0f}/s"
                )
                print(
                    f"round {r + 1} {name:10}: single {results[name]['single'][-1]:7.0f} MiB/s "
                    f"({results[name]['cpu_per_gib'][-1]:.2f} CPU-s/GiB){extra_text}",
                    flush=True,
                )
        summary = {
            name: {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in rows.items() if v}
            for name, rows in results.items()
        }
        print("\n| measure | nar-bridge (median) | nginx (median) | ratio |\n|---|---:|---:|---:|")
        for key, label, unit in (
            ("single", "NAR GET, single stream", "MiB/s"),
            ("cpu_per_gib", "NAR GET, single stream, server CPU", "s/GiB"),
            ("concurrent", "NAR GET, 8 concurrent", "MiB/s"),
            ("narinfo", "narinfo GET", "req/s"),
            ("narinfo_cpu_us", "narinfo GET, server CPU per request", "µs"),
        ):
            if key not in summary["nar-bridge"]:
                continue
            ours, peer = summary["nar-bridge"][key]["median"], summary["nginx"][key]["median"]
            print(f"| {label} ({unit}) | {ours:,.2f} | {peer:,.2f} | {f'{ours / peer:.2f}x' if peer else '-'} |")
            for other in ("before", "floor"):
                if key in summary.get(other, {}):
                    value = summary[other][key]["median"]
                    ratio = f"{value / peer:.2f}x" if peer else "-"
                    print(f"| {label} ({unit}), {other} | {value:,.2f} | {peer:,.2f} | {ratio} |")
        for name in ("nar-bridge", "before"):
            if "floor" in summary.get(name, {}):
                floor = summary[name]["floor"]["median"]
                floor_ratio = floor / summary["nginx"]["narinfo"]["median"]
                print(f"| {name} HTTP floor: /nix-cache-info (req/s) | {floor:,.0f} | | {floor_ratio:.2f}x |")
        print(f"load average (1 min) at the rounds' starts: {results['floors']['loadavg']}")
        if args.narinfo_only:
            ours, peer = summary["nar-bridge"]["narinfo"]["median"], summary["nginx"]["narinfo"]["median"]
            print(f"target narinfo >= 0.5x nginx: {'met' if ours >= 0.5 * peer else 'NOT met'}")
            facts["loadavg_end"] = os.getloadavg()
            if args.json is not None:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({"facts": facts, "runs": results, "summary": summary}, indent=1))
            return
        single = summary["nginx"]["single"]["median"]
        floor_labels = (
            ("render_only", "render_nar alone, no HTTP"),
            ("stream_only", "NarSource.stream alone, no HTTP"),
            ("blake3_one_pass", "one BLAKE3 pass, 1 thread"),
        )
        for key, label in floor_labels:
            value = summary["floors"][key]["median"]
            print(f"| NAR floor: {label} (MiB/s) | {value:,.0f} | | {value / single:.2f}x |")
        print(f"bridge event loop: {facts['bridge_event_loop']}")
        targets = {"single stream >= 0.8x nginx": summary["nar-bridge"]["single"]["median"] >= 0.8 * single}
        if "narinfo" in summary["nar-bridge"]:
            targets["narinfo >= 0.5x nginx"] = (
                summary["nar-bridge"]["narinfo"]["median"] >= 0.5 * summary["nginx"]["narinfo"]["median"]
            )
        for target, met in targets.items():
            print(f"target {target}: {'met' if met else 'NOT met'}")
        facts["loadavg_end"] = os.getloadavg()
        report: dict[str, Any] = {
            "facts": facts,
            "nar_bytes": nar_bytes,
            "small_paths": len(smalls),
            "upload_seconds": upload_s,
            "file_copy_seconds": file_copy_s,
            "runs": results,
            "summary": summary,
            "targets": targets,
        }
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1))
    finally:
        servers.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Benchmark: ``nix copy --to unix://NIXCAS`` against ``nix copy --to`` a local chroot store, same paths.

Run from the repository root::

    .venv/bin/python bench/nix_daemon.py [--workdir DIR] [--small 200] [--large-mib 32] [--tree-files 2000]
                                         [--runs 3] [--json OUT]

Setup (not timed): a throw-away chroot Nix store gets ``--small`` small files
(1-8 KiB), one tree of ``--tree-files`` small files, and one ``--large-mib`` MiB
file (half random, half 4 bits of entropy per byte), each a store path via
``nix-store --add``.

Each round, alternating which side goes first, times one ``nix copy`` of all the paths:

* **nixcas nix-daemon**: into a fresh embedded store through a freshly started
  ``nixcas nix-daemon -l SOCK`` (started before the clock starts), Nix speaking the
  worker protocol (``AddMultipleToStore``); every path is durable (blobs synced,
  SQLite commits) before the daemon acknowledges it;
* **local chroot store**: ``nix copy --to /fresh/dir``, Nix writing its own store
  directly, no daemon (what a nix-daemon would do, minus the protocol).

Both sides get a fresh Nix cache directory per round.  After the timed copies,
``nix path-info --json`` through the daemon must equal the source's NAR hashes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The sibling script (``bench/`` is on sys.path when this file is run).
from bridge import nix_env, run
from bridge_push import make_paths


def start_daemon(workdir: Path, store: Path, sock: Path) -> subprocess.Popen[bytes]:
    log = open(workdir / "daemon.log", "ab")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "nixcas.cli.main", "--store-dir", str(store), "nix-daemon", "-l", str(sock)],
        stdout=subprocess.PIPE,
        stderr=log,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("listening on unix://"):
        proc.kill()
        sys.exit(f"nixcas nix-daemon did not start: {line!r}; see {workdir / 'daemon.log'}")
    return proc


def cpu_of(pid: int) -> float:
    """User + system CPU seconds a process used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(argv: list[str], env: dict[str, str], daemon_pid: int | None = None) -> tuple[float, float]:
    """Wall seconds, and CPU seconds of the Nix client plus the daemon (if any), of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    daemon_before = cpu_of(daemon_pid) if daemon_pid is not None else 0.0
    start = time.perf_counter()
    run(argv, env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if daemon_pid is not None:
        cpu += cpu_of(daemon_pid) - daemon_before
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--tree-files", type=int, default=2000)
    parser.add_argument("--large-mib", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if shutil.which("nix") is None:
        sys.exit("nix is not installed (Debian nix-bin)")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="nd-", dir=args.workdir))
    try:
        source, paths = make_paths(workdir, args.small, args.large_mib, args.seed, args.tree_files)
        info_argv = ["nix", "path-info", "--store", str(source), "--json", *paths]
        nar_bytes = sum(e["narSize"] for e in json.loads(run(info_argv, nix_env(workdir, "info"))))
        times: dict[str, list[float]] = {"nixcas nix-daemon": [], "local chroot store": []}
        cpus: dict[str, list[float]] = {side: [] for side in times}
        for r in range(args.runs):
            order = list(times) if r % 2 == 0 else list(reversed(times))
            for side in order:
                env = nix_env(workdir, f"{side.split()[0]}-{r}")
                if side == "nixcas nix-daemon":
                    store, sock = workdir / f"cas-{r}", workdir / f"s{r}.sock"
                    proc = start_daemon(workdir, store, sock)
                    try:
                        argv = ["nix", "copy", "--store", str(source), "--to", f"unix://{sock}", *paths]
                        wall, cpu = timed(argv, env, proc.pid)
                        times[side].append(wall)
                        cpus[side].append(cpu)
                        if r == args.runs - 1:
                            ours = json.loads(run(["nix", "path-info", "--store", f"unix://{sock}", "--json", *paths],
                                                  env))  # fmt: skip
                            theirs = json.loads(run(["nix", "path-info", "--store", str(source), "--json", *paths],
                                                    env))  # fmt: skip
                            assert {e["path"]: e["narHash"] for e in ours} == {e["path"]: e["narHash"] for e in theirs}
                    finally:
                        proc.send_signal(signal.SIGTERM)
                        proc.wait(30)
                    shutil.rmtree(store)
                else:
                    target = workdir / f"nix-b-{r}"
                    wall, cpu = timed(["nix", "copy", "--store", str(source), "--to", str(target), *paths], env)
                    times[side].append(wall)
                    cpus[side].append(cpu)
                    run(["chmod", "-R", "u+w", str(target)])
                    shutil.rmtree(target)
        medians = {side: statistics.median(t) for side, t in times.items()}
        ratio = medians["nixcas nix-daemon"] / medians["local chroot store"]
        cpu_medians = {side: statistics.median(t) for side, t in cpus.items()}
        cpu_ratio = cpu_medians["nixcas nix-daemon"] / cpu_medians["local chroot store"]
        result: dict[str, Any] = {
            "paths": len(paths),
            "nar_bytes": nar_bytes,
            "runs": times,
            "median_s": medians,
            "ratio": ratio,
            "cpu_runs": cpus,
            "cpu_median_s": cpu_medians,
            "cpu_ratio": cpu_ratio,
            "load_average": os.getloadavg(),
        }
        for side, t in times.items():
            print(f"{side:20s} median {medians[side]:.3f} s  runs {' '.join(f'{x:.3f}' for x in t)}  "
                  f"({nar_bytes / medians[side] / 1e6:.1f} MB/s of NAR)")  # fmt: skip
            print(f"{'':20s} CPU (client + daemon) median {cpu_medians[side]:.3f} s")
        print(f"ratio nixcas / local: wall {ratio:.2f}x, CPU {cpu_ratio:.2f}x ({len(paths)} paths, "
              f"{nar_bytes / 1e6:.1f} MB of NAR; load average {os.getloadavg()[0]:.1f})")  # fmt: skip
        if args.json is not None:
            args.json.write_text(json.dumps(result, indent=2))
    finally:
        run(["chmod", "-R", "u+w", str(workdir)])
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

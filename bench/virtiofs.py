#!/usr/bin/env python3
"""Benchmark (informational): a VM reading over virtio-fs against the FUSE mount on the host, same tree, same run.

Run from the repository root (as root, with QEMU, a Debian kernel and busybox-static installed)::

    .venv/bin/python bench/virtiofs.py [--workdir DIR] [--runs 2] [--large-mib 64] [--files 1000] [--json OUT]

One tree is generated (``large/big.bin`` of ``--large-mib`` MiB from
``bench/nar.py``; ``small/``, ``--files`` files of ``bench/import_tree.py``
in 20 x 20 directories) and ingested into an embedded store.  Each round,
alternating:

* **virtio-fs**: ``nixcas castore virtiofs DIGEST SOCK`` and a QEMU guest
  (Debian's kernel, a busybox initramfs; KVM when it works, else TCG) that
  mounts the tag and times, with ``/proc/uptime``, ``dd if=big.bin
  of=/dev/null bs=1M`` and ``ls -lRn small`` (an ``lstat`` per entry), fresh
  and then again (guest page cache);
* **FUSE**: ``nixcas castore mount DIGEST MP`` on the host, the same two
  commands (GNU ``dd`` and ``ls``), on a fresh mount and again.

The CPU the server process used during each step is taken from
``/proc/PID/stat`` (for the VM: sampled when the guest prints its step
markers on the serial console).  Under TCG the guest's own CPU emulation
dominates its times; the server CPU is the comparable figure then.
"""

from __future__ import annotations

import argparse
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

from import_tree import generate_tree
from nar import generate_large_file

from nixcas.testing.daemon import clean_env, nixcas_command, read_line
from nixcas.testing.fuse import FUSE_SKIP_REASON, running_mount
from nixcas.testing.vm import build_initramfs, kvm_usable, qemu_command, vm_skip_reason

GUEST_INIT = r"""#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
/load-modules
$B mount -t virtiofs nixstore /mnt -o ro || { echo MOUNT-FAILED; $B poweroff -f; }
now() { $B cut -d' ' -f1 /proc/uptime; }
step() {
  echo "MARK $1"
  t0=$(now)
  shift
  "$@" > /dev/null 2>&1
  t1=$(now)
  echo "T $t0 $t1"
}
for round in fresh again; do
  step "read-$round" $B dd if=/mnt/large/big.bin of=/dev/null bs=1M
  step "find-$round" $B ls -lRn /mnt/small
done
echo DONE
$B umount /mnt
$B poweroff -f
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def run_guest(store: Path, digest: str, initramfs: Path, work: Path) -> dict[str, tuple[float, float]]:
    """One VM round: each step's guest seconds and the server CPU seconds during it."""
    sock = Path(tempfile.mkdtemp(prefix="vfs-")) / "s"
    console = work / "console.txt"
    console.unlink(missing_ok=True)
    env = clean_env()
    server = subprocess.Popen(
        nixcas_command("--store-dir", str(store), "castore", "virtiofs", digest, str(sock)),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    results: dict[str, tuple[float, float]] = {}
    try:
        if not read_line(server, 30).startswith(b"listening on"):
            raise RuntimeError("the virtiofs server did not start")
        vm = subprocess.Popen(qemu_command(initramfs, sock, console), stdin=subprocess.DEVNULL)
        seen, step, cpu0 = 0, "", 0.0
        deadline = time.monotonic() + 600
        while vm.poll() is None and time.monotonic() < deadline:
            lines = console.read_text(errors="replace").splitlines() if console.exists() else []
            for line in lines[seen:]:
                if line.startswith("MARK "):
                    step, cpu0 = line.split()[1], cpu_seconds(server.pid)
                elif line.startswith("T ") and step:
                    t0, t1 = (float(x) for x in line.split()[1:3])
                    results[step] = (t1 - t0, cpu_seconds(server.pid) - cpu0)
                elif "MOUNT-FAILED" in line:
                    raise RuntimeError("the guest could not mount the tag")
            seen = len(lines)
            time.sleep(0.02)
        if vm.poll() is None:
            vm.kill()
        vm.wait()
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(sock.parent, ignore_errors=True)
    return results


def run_host(store: Path, digest: str, work: Path) -> dict[str, tuple[float, float]]:
    mountpoint = work / "mp"
    mountpoint.mkdir(exist_ok=True)
    results: dict[str, tuple[float, float]] = {}
    args = ["--store-dir", str(store), "castore", "mount", digest, str(mountpoint)]
    with running_mount(args, mountpoint, work / "mount.log") as mount:
        for round_ in ("fresh", "again"):
            for step, command in (
                ("read", ["dd", f"if={mountpoint}/large/big.bin", "of=/dev/null", "bs=1M"]),
                ("find", ["ls", "-lRn", f"{mountpoint}/small"]),
            ):
                cpu0, t0 = cpu_seconds(mount.pid), time.perf_counter()
                subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
                results[f"{step}-{round_}"] = (time.perf_counter() - t0, cpu_seconds(mount.pid) - cpu0)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(".bench-work/virtiofs"))
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--large-mib", type=int, default=64)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    for reason in (vm_skip_reason(), FUSE_SKIP_REASON):
        if reason is not None:
            print(f"cannot run: {reason}", file=sys.stderr)
            return 2
    work: Path = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    src, store = work / "src", work / "store"
    generate_large_file(src / "large" / "big.bin", args.large_mib, args.seed)
    generate_tree(src / "small", args.files, 0, 0, args.seed)
    ingest = subprocess.run(
        nixcas_command("--store-dir", str(store), "castore", "ingest", str(src), "--json"),
        capture_output=True,
        env=clean_env(),
        check=True,
    )
    digest = json.loads(ingest.stdout)["digest"]
    initramfs = build_initramfs(GUEST_INIT, work / "initramfs.gz")
    accel = "KVM" if kvm_usable() else "TCG"
    print(f"tree: {args.large_mib} MiB file, {args.files} small files; guest accelerator {accel}", flush=True)
    samples: dict[str, dict[str, list[tuple[float, float]]]] = {"virtio-fs": {}, "fuse": {}}
    loads: list[str] = []
    for r in range(args.runs):
        loads.append(loadavg())
        for peer in ("virtio-fs", "fuse"):
            got = run_guest(store, digest, initramfs, work) if peer == "virtio-fs" else run_host(store, digest, work)
            for step, value in got.items():
                samples[peer].setdefault(step, []).append(value)
                print(
                    f"  round {r + 1} {peer:<9} {step:<12} {value[0]:7.2f} s  server CPU {value[1]:6.2f} s", flush=True
                )
    size = args.large_mib * (1 << 20)
    report: dict[str, Any] = {"accelerator": accel, "loadavg": loads, "large_mib": args.large_mib, "files": args.files}
    print(f"\nmedians ({args.runs} rounds; load average at round starts {', '.join(loads)}):")
    print(f"  {'step':<12} {'virtio-fs (guest)':>24} {'FUSE (host)':>24}")
    for step in ("read-fresh", "read-again", "find-fresh", "find-again"):
        cells = []
        for peer in ("virtio-fs", "fuse"):
            values = samples[peer].get(step, [])
            if not values:
                cells.append("-")
                continue
            seconds = statistics.median(v[0] for v in values)
            cpu = statistics.median(v[1] for v in values)
            rate = f" {size / seconds / 1e6:5.0f} MB/s" if step.startswith("read") and seconds > 0 else ""
            cells.append(f"{seconds:6.2f} s{rate} cpu {cpu:5.2f}")
            report.setdefault(peer, {})[step] = {"seconds": seconds, "server_cpu_s": cpu}
        print(f"  {step:<12} {cells[0]:>24} {cells[1]:>24}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

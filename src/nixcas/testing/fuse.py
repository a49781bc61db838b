"""Running ``nixcas … mount`` as a real subprocess from tests and benchmarks (started and killed by PID)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from nixcas.castore.fs.fuse import FUSERMOUNT
from nixcas.castore.fs.fuse import unmount as unmount_lazily
from nixcas.testing.daemon import ServerProcess, clean_env, nixcas_command, read_line

__all__ = [
    "FUSE_SKIP_REASON",
    "Mount",
    "mount_impossible",
    "needs_fuse",
    "running_mount",
    "start_mount",
    "unmount",
]

MOUNT_TIMEOUT = 20.0
"""Seconds a mount may take to print its 'mounted at' line."""


def _fuse_skip_reason() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is absent on this machine: FUSE mounts are impossible here"
    if shutil.which(FUSERMOUNT) is None:
        return f"{FUSERMOUNT} is missing (Debian fuse3; `make test` installs it): it makes every mount"
    return None


FUSE_SKIP_REASON = _fuse_skip_reason()

needs_fuse = pytest.mark.skipif(FUSE_SKIP_REASON is not None, reason=FUSE_SKIP_REASON or "")


def mount_impossible(workdir: Path) -> str | None:
    """Why this machine cannot mount at all (fusermount3 refuses: no permission, no kernel support), or None.

    Mounts an empty directory with ``nixcas castore mount``.  Only a refusal
    by fusermount3 itself counts; any other failure is left to the tests to report.
    """
    store, mountpoint, empty = workdir / "store", workdir / "mp", workdir / "empty"
    mountpoint.mkdir()
    empty.mkdir()
    env = clean_env()
    ingest = subprocess.run(
        nixcas_command("--store-dir", str(store), "castore", "ingest", str(empty), "--json"),
        capture_output=True,
        env=env,
        check=True,
    )
    digest = json.loads(ingest.stdout)["digest"]
    proc = subprocess.Popen(
        nixcas_command("--store-dir", str(store), "castore", "mount", digest, str(mountpoint)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        line = read_line(proc, MOUNT_TIMEOUT)
        if line.startswith(b"mounted at "):
            return None
        proc.wait(MOUNT_TIMEOUT)
        assert proc.stderr is not None
        err = proc.stderr.read().decode(errors="replace")
        if "cannot mount at" in err and f"{FUSERMOUNT}:" in err:  # the kernel or fusermount3 refused
            return "mounting is impossible here: " + " / ".join(err.strip().splitlines())
        return None
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(MOUNT_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        unmount(mountpoint)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def unmount(mountpoint: Path) -> None:
    """Detach ``mountpoint`` if something is still mounted there (lazily, so a hung server cannot block us)."""
    if not os.path.ismount(mountpoint):
        return
    unmount_lazily(str(mountpoint))
    if os.path.ismount(mountpoint):
        subprocess.run(["umount", "-l", str(mountpoint)], check=False, capture_output=True)


@dataclass
class Mount(ServerProcess):
    """A running ``nixcas … mount`` subprocess and its mountpoint."""

    path: Path = Path()

    kind: ClassVar[str] = "mount"
    exit_timeout: ClassVar[float] = 20.0

    def kill(self) -> None:
        """Remove the mount and the process, whatever state they are in."""
        super().kill()
        unmount(self.path)

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        """The first stderr line containing ``text`` (waiting for it)."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.stderr().splitlines():
                if text in line:
                    return line
            if time.monotonic() > deadline:
                pytest.fail(f"no log line with {text!r} within {timeout} s; stderr:\n{self.stderr()}")
            time.sleep(0.05)


def start_mount(args: Sequence[str], mountpoint: Path, log: Path, *, env: dict[str, str] | None = None) -> Mount:
    """Run ``nixcas *args`` (a mount command ending in the mountpoint) and wait until it is mounted."""
    with open(log, "wb") as err:
        proc = subprocess.Popen(nixcas_command(*args), stdout=subprocess.PIPE, stderr=err, env=env or clean_env())
    mount = Mount(proc, log, path=mountpoint)
    try:
        line = read_line(proc, MOUNT_TIMEOUT).decode()
        if line != f"mounted at {mountpoint.absolute()}\n":
            pytest.fail(f"mount did not start: stdout {line!r}, exit {proc.poll()}, stderr:\n{mount.stderr()}")
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.ismount(mountpoint):
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail(f"{mountpoint} is not a mount point; stderr:\n{mount.stderr()}")
            time.sleep(0.02)
    except BaseException:
        mount.kill()
        raise
    return mount


@contextlib.contextmanager
def running_mount(
    args: Sequence[str], mountpoint: Path, log: Path, *, env: dict[str, str] | None = None
) -> Iterator[Mount]:
    """A mount that is unmounted and killed (by PID) when the block is left, however it is left."""
    mount = start_mount(args, mountpoint, log, env=env)
    try:
        yield mount
    finally:
        mount.kill()

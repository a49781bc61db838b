"""A throw-away QEMU VM that mounts a virtio-fs tag, for tests and benchmarks (Debian's kernel, busybox).

:func:`build_initramfs` packs busybox-static, the kernel modules virtio-fs
needs (found through ``modules.dep``, decompressed if the distribution
compresses them) and an ``/init`` script into a gzip'd newc cpio;
:func:`run_vm` boots the host's Debian kernel with it under QEMU (KVM when
``/dev/kvm`` can be opened, TCG otherwise), with guest memory in a shared
memfd (vhost-user needs it) and a ``vhost-user-fs-pci`` device on a
socket, and returns what the guest printed on its serial console.
"""

from __future__ import annotations

import glob
import gzip
import io
import lzma
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "LISTING_INIT",
    "VIRTIOFS_MODULES",
    "VmImage",
    "build_initramfs",
    "kvm_usable",
    "run_vm",
    "vm_skip_reason",
]

VIRTIOFS_MODULES = ("virtiofs", "virtio_pci")
"""What the guest loads (with their dependencies, in order)."""

TAG = "nixstore"
MEMORY_MIB = 256


LISTING_INIT = r"""#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
/load-modules
if $B mount -t virtiofs nixstore /mnt -o ro; then
  echo NIXCAS-BEGIN
  cd /mnt
  $B find . | while read -r p; do
    if [ -L "$p" ]; then printf 'L\t%s\t%s\n' "$p" "$($B readlink "$p")"
    elif [ -d "$p" ]; then printf 'D\t%s\t%s\n' "$p" "$($B stat -c %a "$p")"
    else printf 'F\t%s\t%s\t%s\t%s\t%s\n' "$p" "$($B stat -c %a "$p")" "$($B stat -c %s "$p")" \
      "$($B sha256sum "$p" | $B cut -d' ' -f1)" "$($B stat -c %i "$p")"
    fi
  done
  cd /
  $B umount /mnt && echo NIXCAS-END
else
  echo NIXCAS-MOUNT-FAILED
fi
$B poweroff -f
"""
"""A guest ``/init`` that mounts the tag and prints one tab-separated line per path: ``F path mode size sha256 inode``,
``D path mode``, ``L path target``, between ``NIXCAS-BEGIN`` and ``NIXCAS-END`` (printed after a clean unmount)."""


@dataclass(frozen=True)
class VmImage:
    kernel: Path
    modules_dir: Path
    busybox: Path
    qemu: Path


def _find_image() -> VmImage | str:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return "qemu-system-x86_64 is missing (Debian qemu-system-x86; `make test` installs it)"
    busybox = next((Path(p) for p in ("/bin/busybox", "/usr/bin/busybox") if os.path.exists(p)), None)
    if busybox is None:
        return "busybox is missing (Debian busybox-static)"
    for kernel in sorted(glob.glob("/boot/vmlinuz-*"), reverse=True):
        version = kernel.removeprefix("/boot/vmlinuz-")
        modules = Path("/lib/modules") / version
        if (modules / "modules.dep").exists() and os.access(kernel, os.R_OK):
            return VmImage(Path(kernel), modules, busybox, Path(qemu))
    return "no readable /boot/vmlinuz-* with its /lib/modules (Debian linux-image-amd64)"


def vm_skip_reason() -> str | None:
    """Why a VM cannot run here, or ``None``."""
    found = _find_image()
    return found if isinstance(found, str) else None


def image() -> VmImage:
    found = _find_image()
    if isinstance(found, str):
        raise RuntimeError(found)
    return found


def kvm_usable() -> bool:
    """Whether QEMU can run a ``-cpu host`` guest under KVM here (a nested or restricted KVM may refuse it)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    found = _find_image()
    if isinstance(found, str):
        return False
    probe = [str(found.qemu), "-accel", "kvm", "-cpu", "host", "-nodefaults", "-no-user-config"]
    probe += ["-display", "none", "-m", "16M", "-S", "-monitor", "stdio"]
    try:
        done = subprocess.run(probe, input=b"quit\n", capture_output=True, timeout=10, check=False)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def _module_order(modules_dir: Path, wanted: tuple[str, ...]) -> list[Path]:
    """The module files for ``wanted`` and their dependencies, dependencies first."""
    deps: dict[str, list[str]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
    by_name = {os.path.basename(p).split(".ko")[0].replace("-", "_"): p for p in deps}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        if name not in by_name:  # built into the kernel
            continue
        visit(by_name[name])
    return [modules_dir / p for p in order]


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    return data


class _Cpio:
    """A newc cpio archive (what the kernel unpacks as its initramfs)."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.ino = 1

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self.ino += 1
        self.out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        self.out.write(b"\0" * (-self.out.tell() % 4))
        self.out.write(data)
        self.out.write(b"\0" * (-self.out.tell() % 4))

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return self.out.getvalue()


def build_initramfs(init_script: str, dest: Path) -> Path:
    """A gzip'd initramfs at ``dest``: busybox, the virtio-fs modules (loaded by ``/load-modules``), ``/init``."""
    img = image()
    cpio = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "mnt", "lib", "tmp"):
        cpio.add(d, stat.S_IFDIR | 0o755)
    cpio.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    cpio.add("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3))
    cpio.add("bin/busybox", stat.S_IFREG | 0o755, img.busybox.read_bytes())
    loads = []
    for path in _module_order(img.modules_dir, VIRTIOFS_MODULES):
        name = path.name.split(".ko")[0] + ".ko"
        cpio.add(f"lib/{name}", stat.S_IFREG | 0o644, _module_bytes(path))
        loads.append(f"/bin/busybox insmod /lib/{name}")
    cpio.add("load-modules", stat.S_IFREG | 0o755, ("#!/bin/busybox sh\n" + "\n".join(loads) + "\n").encode())
    cpio.add("init", stat.S_IFREG | 0o755, init_script.encode())
    dest.write_bytes(gzip.compress(cpio.finish(), compresslevel=1))
    return dest


def qemu_command(initramfs: Path, socket: Path, console: Path) -> list[str]:
    """The QEMU command line: a shared-memory guest with one ``vhost-user-fs-pci`` device (tag ``nixstore``)."""
    img = image()
    accel = ["-accel", "kvm", "-cpu", "host"] if kvm_usable() else ["-accel", "tcg"]
    return [
        str(img.qemu),
        *accel,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-smp",
        "1",
        "-m",
        f"{MEMORY_MIB}M",
        "-object",
        f"memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on",
        "-numa",
        "node,memdev=mem",
        "-chardev",
        f"socket,id=char0,path={socket}",
        "-device",
        f"vhost-user-fs-pci,chardev=char0,tag={TAG}",
        "-serial",
        f"file:{console}",
        "-kernel",
        str(img.kernel),
        "-initrd",
        str(initramfs),
        "-append",
        "console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init",
    ]


def run_vm(initramfs: Path, socket: Path, console: Path, *, timeout: float = 120.0) -> str:
    """Boot the VM until it powers off; what it printed on its serial console."""
    proc = subprocess.Popen(qemu_command(initramfs, socket, console), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(
            f"the VM did not power off in {timeout} s; console:\n{console.read_text(errors='replace')}"
        ) from None
    text = console.read_text(errors="surrogateescape") if console.exists() else ""
    if proc.returncode != 0:
        raise RuntimeError(f"qemu exited {proc.returncode}: {err.decode(errors='replace')}\nconsole:\n{text}")
    return text

"""A real VM reads a nixcas store path over virtio-fs: QEMU boots the host's Debian kernel with a busybox initramfs.

``nixcas virtiofs`` serves the store paths of an imported tree (and ``nixcas
castore virtiofs`` an ingested one) on a vhost-user socket;
the guest mounts the tag, walks it and prints names, modes, sizes, symlink
targets and the sha256 of every file on its serial console, then powers
off; the test compares that with the source tree.  KVM when it works here,
TCG otherwise (about 10 s on a busy 2-core machine).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
from pathlib import Path

import pytest

from nixcas.testing.daemon import ServerProcess, clean_env, nixcas_command, read_line, short_tmpdir
from nixcas.testing.vm import LISTING_INIT, build_initramfs, run_vm, vm_skip_reason

SKIP = vm_skip_reason()

pytestmark = pytest.mark.skipif(SKIP is not None, reason=f"no VM possible: {SKIP}")


def make_tree(root: Path) -> None:
    rng = random.Random(21)  # noqa: S311 - reproducible test data
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\necho tool\n")
    (root / "bin" / "tool").chmod(0o755)
    (root / "share" / "doc" / "deep").mkdir(parents=True)
    (root / "share" / "doc" / "README").write_bytes(b"read me\n")
    (root / "share" / "doc" / "deep" / "random").write_bytes(rng.randbytes(1_500_000))
    (root / "share" / "empty").write_bytes(b"")
    (root / "share" / "with space").write_bytes(b"spaced\n")
    (root / "share" / "copy-of-README").write_bytes(b"read me\n")  # the same content: the same inode
    (root / "share" / "README-executable").write_bytes(b"read me\n")  # ... but not with another mode
    (root / "share" / "README-executable").chmod(0o755)
    (root / "emptydir").mkdir()
    (root / "lib").symlink_to("share/doc")
    (root / "abs").symlink_to("/nix/store/somewhere-else")
    (root / "dangling").symlink_to("no/such/thing")


def expected_listing(root: Path) -> set[tuple[str, ...]]:
    """What the guest should print, from the source tree (read-only modes: 555 for directories and executables)."""
    out: set[tuple[str, ...]] = {("D", ".", "555")}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = "./" + str(path.relative_to(root))
            if path.is_symlink():
                out.add(("L", rel, os.readlink(path)))
            elif path.is_dir():
                out.add(("D", rel, "555"))
            else:
                data = path.read_bytes()
                mode = "555" if os.access(path, os.X_OK) else "444"
                out.add(("F", rel, mode, str(len(data)), hashlib.sha256(data).hexdigest()))
    return out


def serve_command(mode: str, tree: Path, store: Path, sock: Path) -> tuple[list[str], str]:
    """The server's command line for ``mode``, and the path under the mount root where ``tree`` appears."""
    env = clean_env()
    if mode == "store-path":  # nixcas import, then every store path at the root (one entry per <hash>-<name>)
        imported = subprocess.run(
            nixcas_command("--store-dir", str(store), "import", str(tree)),
            capture_output=True,
            env=env,
            check=True,
        )
        name = imported.stdout.decode().strip().rsplit("/", 1)[1]
        return nixcas_command("--store-dir", str(store), "virtiofs", "--list-root", str(sock)), f"./{name}"
    ingest = subprocess.run(
        nixcas_command("--store-dir", str(store), "castore", "ingest", str(tree), "--json"),
        capture_output=True,
        env=env,
        check=True,
    )
    digest = json.loads(ingest.stdout)["digest"]
    return nixcas_command("--store-dir", str(store), "castore", "virtiofs", "--list-root", digest, str(sock)), "."


@pytest.mark.parametrize("mode", ["store-path", "castore"])
def test_a_vm_reads_the_tree_over_virtiofs(tmp_path: Path, mode: str) -> None:
    tree, store = tmp_path / "tree", tmp_path / "store"
    make_tree(tree)
    initramfs = build_initramfs(LISTING_INIT, tmp_path / "initramfs.gz")
    with short_tmpdir() as short:
        sock = short / "fs.sock"
        command, at = serve_command(mode, tree, store, sock)
        log = tmp_path / "virtiofs.log"
        with log.open("wb") as err:
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, env=clean_env())
        server = ServerProcess(proc, log)
        try:
            assert read_line(proc, 20) == f"listening on {sock}\n".encode(), server.stderr()
            console = run_vm(initramfs, sock, tmp_path / "console.txt", timeout=90)
            assert server.proc.poll() is None  # the VM went away; the server waits for the next one
        finally:
            assert server.stop() == 0, server.stderr()
        assert not sock.exists()
    assert "NIXCAS-BEGIN" in console and "NIXCAS-END" in console, console
    body = console.split("NIXCAS-BEGIN", 1)[1].split("NIXCAS-END", 1)[0]
    lines = [line.split("\t") for line in body.replace("\r", "").splitlines() if "\t" in line]
    listing = {tuple(fields[:5]) for fields in lines}
    if at != ".":  # the store path's entry at the root, and the tree below it
        assert ("D", ".", "555") in listing
        listing = {(f[0], "." + f[1][len(at) :], *f[2:]) for f in listing if f[1].startswith(at)}
    assert listing == expected_listing(tree)
    inodes = {fields[1]: fields[5] for fields in lines if fields[0] == "F"}
    assert inodes[f"{at}/share/copy-of-README"] == inodes[f"{at}/share/doc/README"]  # one inode per content, as FUSE
    assert inodes[f"{at}/share/README-executable"] != inodes[f"{at}/share/doc/README"]
    assert len(set(inodes.values())) == len(inodes) - 1

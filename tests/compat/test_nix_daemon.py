"""``nixcas nix-daemon`` with the real Nix client (Debian nix-bin 2.8), against throw-away stores.

One daemon serves the whole module.  The Nix client (root here, or whoever runs the tests) is
*not* in its ``--trusted-users``: it may add content-addressed paths and paths signed by the
daemon's ``--trusted-public-keys``, nothing else.  Nix reads the files of a ``unix://`` store
from the local filesystem (it is a local-FS store to Nix), so reading back goes through a
``nixcas mount`` given as ``?real=``; over ``ssh-ng://`` everything goes through the daemon.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import nixcas
from nixcas.store.nar.wire import encode_str
from nixcas.store.signing import SigningKey
from nixcas.testing.daemon import Daemon, clean_env, free_port, nixcas_command, running_daemon
from nixcas.testing.fuse import FUSE_SKIP_REASON, running_mount
from nixcas.testing.nix import NIX, NIX_STORE, fixed_tree, needs_nix, nix_env

pytestmark = [needs_nix, pytest.mark.skipif(NIX is None, reason="the nix command is not installed (Debian nix-bin)")]

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
KEY = SigningKey.generate("nixcas-test-1")
HASH_CHARS = "0123456789abcdfghijklmnpqrsvwxyz"


def nix(args: list[str], home: Path, *, check: bool = True, extra_env: dict[str, str] | None = None) -> str:
    env = nix_env(home)
    env["NIX_CONFIG"] += f"trusted-public-keys = {KEY.public}\n"
    env.update(extra_env or {})
    result = subprocess.run(args, capture_output=True, env=env, timeout=120, check=False)
    out = result.stdout.decode() + ("" if check else result.stderr.decode())
    if check:
        assert result.returncode == 0, f"{args}: {result.stderr.decode(errors='replace')}"
    return out


def nar_file(contents: bytes) -> bytes:
    return b"".join(encode_str(t) for t in (b"nix-archive-1", b"(", b"type", b"regular", b"contents", contents, b")"))


def fake_path(name: str) -> str:
    digest = hashlib.sha256(name.encode()).digest()
    return "/nix/store/" + "".join(HASH_CHARS[b % 32] for b in digest[:32]) + "-" + name


def export(entries: list[tuple[str, bytes, list[str]]]) -> bytes:
    """``nix-store --export`` format: for each path 1, its NAR, the export magic, path, references, deriver, 0."""
    out = []
    for path, nar, refs in entries:
        out += [(1).to_bytes(8, "little"), nar, (0x4558494E).to_bytes(8, "little"), encode_str(path.encode())]
        out += [len(refs).to_bytes(8, "little"), *(encode_str(r.encode()) for r in refs), encode_str(b"")]
        out.append(bytes(8))
    out.append(bytes(8))
    return b"".join(out)


@dataclass
class World:
    tmp: Path
    source: Path  # Nix's chroot store
    daemon: Daemon
    socket: str
    cas: Path
    added: list[str]  # nix-store --add (content-addressed)
    dep: str
    top: str  # refers to dep, signed
    lonely: str  # neither signed nor content-addressed

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def paths(self) -> list[str]:
        return [*self.added, self.dep, self.top]

    def home(self, name: str) -> Path:
        return self.tmp / f"home-{name}"


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    assert NIX is not None and NIX_STORE is not None
    with tempfile.TemporaryDirectory(prefix="nixcas-nd-") as d:
        tmp = Path(d)
        source = tmp / "nix-a"
        src = tmp / "src"
        src.mkdir()
        fixed_tree(src / "tree")
        (src / "file.txt").write_bytes(b"Hello World!")
        added = nix([NIX_STORE, "--store", str(source), "--add", str(src / "tree"), str(src / "file.txt")], tmp).split()
        dep, top, lonely = fake_path("dep"), fake_path("top"), fake_path("lonely")
        stream = export(
            [
                (dep, nar_file(b"a dependency\n"), []),
                (top, nar_file(f"#!/bin/sh\nexec {dep}\n".encode()), [dep, top]),
                (lonely, nar_file(b"nobody vouches for me\n"), []),
            ]
        )
        subprocess.run(
            [NIX_STORE, "--store", str(source), "--import"],
            input=stream,
            capture_output=True,
            env=nix_env(tmp),
            timeout=60,
            check=True,
        )
        key_file = tmp / "secret.key"
        key_file.write_text(str(KEY))
        nix([NIX, "store", "sign", "--store", str(source), "--key-file", str(key_file), dep, top], tmp)
        cas = tmp / "cas"
        sock = str(tmp / "nix.sock")
        args = ["-l", sock, "--trusted-users", "nobody", "--trusted-public-keys", str(KEY.public)]
        with running_daemon(*args, store=cas, log=tmp / "daemon.log", command="nix-daemon") as daemon:
            assert daemon.url == f"unix://{sock}"
            world = World(tmp, source, daemon, sock, cas, added, dep, top, lonely)
            nix([NIX, "copy", "--store", str(source), "--to", world.url, *world.paths], world.home("copy"))
            yield world
            assert "Traceback" not in daemon.stderr()


def path_infos(store: str, paths: list[str], home: Path) -> dict[str, dict[str, object]]:
    assert NIX is not None
    out = json.loads(nix([NIX, "path-info", "--store", store, "--json", "-r", *paths], home))
    keys = ("narHash", "narSize", "references", "signatures", "ca")
    return {entry["path"]: {k: entry.get(k) for k in keys} for entry in out}


def test_copy_to_keeps_what_nix_knows(world: World) -> None:
    """``nix path-info --json -r`` through the daemon equals Nix's own: hashes, sizes, references, signatures."""
    ours = path_infos(world.url, world.paths, world.home("pi"))
    theirs = path_infos(str(world.source), world.paths, world.home("pi"))
    assert ours == theirs
    top = ours[world.top]
    assert top["signatures"] == [str(KEY.sign(fingerprint_of(top, world.top)))]
    assert top["references"] == sorted([world.dep, world.top])


def fingerprint_of(info: dict[str, object], path: str) -> bytes:
    from nixcas.store.hashes import HashAlgo, NixHash
    from nixcas.store.narinfo import fingerprint
    from nixcas.store.store_path import StorePath

    refs = info["references"]
    assert isinstance(refs, list) and isinstance(info["narSize"], int)
    sha = NixHash.parse(str(info["narHash"]), HashAlgo.SHA256).digest
    return fingerprint(
        StorePath.from_absolute_path(path), sha, info["narSize"], map(StorePath.from_absolute_path, refs)
    )


def test_a_second_daemon_on_a_live_socket_is_refused(world: World) -> None:
    result = subprocess.run(
        nixcas_command("--store-dir", str(world.tmp / "other"), "nix-daemon", "-l", world.socket),
        capture_output=True,
        env=clean_env(),
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert (
        result.stderr.decode().strip() == f"nixcas: error: {world.socket}: another daemon is listening on this socket"
    )
    nix([NIX_STORE or "nix-store", "--store", world.url, "--check-validity", world.top], world.home("live"))


def test_stdio_session(world: World) -> None:
    """``--stdio`` (what ssh-ng runs): one session on the pipes; ``--force-untrusted`` shows in the handshake."""
    import struct

    def u64(n: int) -> bytes:
        return struct.pack("<Q", n)

    path = world.top.encode()
    request = u64(0x6E697863) + u64(1 << 8 | 37) + u64(0) + u64(0)
    request += u64(1) + u64(len(path)) + path + bytes(-len(path) & 7)  # IsValidPath
    argv = nixcas_command("--store-dir", str(world.cas), "nix-daemon", "--stdio", "--force-untrusted")
    result = subprocess.run(argv, input=request, capture_output=True, env=clean_env(), timeout=60, check=False)
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout
    assert struct.unpack("<2Q", out[:16]) == (0x6478696F, 1 << 8 | 37)
    version_len = struct.unpack("<Q", out[16:24])[0]
    rest = out[24 + version_len + (-version_len & 7) :]
    assert struct.unpack("<4Q", rest) == (2, 0x616C7473, 0x616C7473, 1)  # not trusted, LAST; LAST, valid


def test_add_by_content(world: World) -> None:
    """``nix-store --add`` (AddToStore) and ``nix store add-file`` (a flat CA path, unsigned) through the daemon
    give the store paths Nix's own store gives; the untrusted client needs no signature for them."""
    assert NIX is not None and NIX_STORE is not None
    home = world.home("add")
    src = world.tmp / "src"
    added = nix([NIX_STORE, "--store", world.url, "--add", str(src / "tree"), str(src / "file.txt")], home).split()
    assert added == world.added
    (src / "flat.txt").write_bytes(b"a flat file\n")
    ours = nix([NIX, "store", "add-file", "--store", world.url, str(src / "flat.txt")], home).strip()
    theirs = nix([NIX, "store", "add-file", "--store", str(world.tmp / "nix-flat"), str(src / "flat.txt")], home)
    assert ours == theirs.strip()
    nix([NIX_STORE, "--store", world.url, "--check-validity", ours], home)


def test_nix_store_queries(world: World) -> None:
    assert NIX_STORE is not None
    store = ["--store", world.url]
    home = world.home("q")
    refs = nix([NIX_STORE, *store, "--query", "--references", world.top], home).split()
    assert sorted(refs) == sorted([world.dep, world.top])
    assert nix([NIX_STORE, *store, "--query", "--referrers", world.dep], home).split() == [world.top]
    nix([NIX_STORE, *store, "--check-validity", *world.paths], home)
    out = nix([NIX_STORE, *store, "--check-validity", world.lonely], home, check=False)
    assert f"path '{world.lonely}' is not valid" in out


def test_unsigned_path_is_refused_and_the_daemon_goes_on(world: World) -> None:
    """An untrusted client cannot add a path nobody signed; nothing is stored; the next client is served."""
    assert NIX is not None and NIX_STORE is not None
    home = world.home("unsigned")
    args = [NIX, "copy", "--store", str(world.source), "--to", world.url, world.lonely]
    out = nix(args, home, check=False)
    assert "lacks a signature by a trusted key" in out
    out = nix([*args[:2], "--no-check-sigs", *args[2:]], home, check=False)  # not trusted: cannot skip the check
    assert "lacks a signature by a trusted key" in out
    assert "not valid" in nix([NIX_STORE, "--store", world.url, "--check-validity", world.lonely], home, check=False)
    nix([NIX_STORE, "--store", world.url, "--check-validity", world.top], home)


@pytest.mark.skipif(FUSE_SKIP_REASON is not None, reason=FUSE_SKIP_REASON or "")
def test_copy_from_ls_and_verify_through_a_mount(world: World) -> None:
    """With the store mounted (``?real=``): ``nix copy --from`` is byte-identical; ``nix store ls`` and ``verify``."""
    assert NIX is not None and NIX_STORE is not None
    mountpoint = world.tmp / "mnt"
    mountpoint.mkdir(exist_ok=True)
    args = ["--store-dir", str(world.cas), "mount", str(mountpoint)]
    with running_mount(args, mountpoint, world.tmp / "mount.log"):
        url = f"{world.url}?real={mountpoint}"
        target = world.tmp / "nix-b"
        home = world.home("from")
        nix([NIX, "copy", "--store", str(target), "--from", url, *world.paths], home)
        for path in world.paths:
            original = nix_dump(world.source, path, home)
            assert nix_dump(target, path, home) == original, path
        listing = nix([NIX, "store", "ls", "--store", url, "-R", world.added[0]], home)
        assert "./bin/hello" in listing
        nix([NIX, "store", "verify", "--store", url, *world.paths], home)


def nix_dump(store: Path, path: str, home: Path) -> bytes:
    assert NIX_STORE is not None
    result = subprocess.run(
        [NIX_STORE, "--dump", f"{store}{path}"], capture_output=True, env=nix_env(home), timeout=60, check=True
    )
    return result.stdout


@pytest.mark.skipif(SSHD is None, reason="sshd is not installed (Debian openssh-server; `make test` installs it)")
def test_ssh_ng_round_trip(world: World) -> None:
    """``nix copy`` to and from ``ssh-ng://`` through a loopback sshd whose remote program is ``nixcas nix-daemon``."""
    assert NIX is not None and SSHD is not None
    ssh = world.tmp / "ssh"
    ssh.mkdir()
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / name)], check=True)
    (ssh / "authorized_keys").write_bytes((ssh / "client.pub").read_bytes())
    port = free_port()
    (ssh / "sshd_config").write_text(
        f"HostKey {ssh / 'host'}\nAuthorizedKeysFile {ssh / 'authorized_keys'}\nPidFile {ssh / 'sshd.pid'}\n"
        f"ListenAddress 127.0.0.1:{port}\nUsePAM no\nStrictModes no\nPasswordAuthentication no\n"
        f"KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nAllowUsers {getpass.getuser()}\n"
    )
    env_path = str(Path(nixcas.__file__).parent.parent)  # the nixcas under test, wherever the remote starts
    remote = ssh / "nixcas-remote"
    remote.write_text(
        f"#!/bin/sh\nexec env PYTHONPATH='{env_path}' '{sys.executable}' -m nixcas.cli.main "
        f"--store-dir '{world.tmp / 'cas-ssh'}' nix-daemon --force-trusted "
        f"--trusted-public-keys '{KEY.public}' \"$@\"\n"
    )
    remote.chmod(0o755)
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    proc = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", str(ssh / "sshd_config")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    try:
        assert b"Server listening" in read_line_stderr(proc), "sshd did not start"
        url = f"ssh-ng://{getpass.getuser()}@127.0.0.1?ssh-key={ssh / 'client'}&remote-program={remote}"
        opts = {
            "NIX_SSHOPTS": f"-p {port} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
        }
        paths = [world.added[1], world.dep, world.top]
        nix([NIX, "copy", "--store", str(world.source), "--to", url, *paths], world.home("ssh"), extra_env=opts)
        target = world.tmp / "nix-ssh"
        nix([NIX, "copy", "--store", str(target), "--from", url, *paths], world.home("ssh2"), extra_env=opts)
        for path in paths:
            assert nix_dump(target, path, world.tmp) == nix_dump(world.source, path, world.tmp), path
    finally:
        proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def read_line_stderr(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> bytes:
    """sshd's first log line (it logs to stderr with -e), or what came before it ended or timed out."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    deadline = time.monotonic() + timeout
    out = b""
    while b"\n" not in out and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        data = os.read(fd, 4096)
        if not data:
            break
        out += data
    return out

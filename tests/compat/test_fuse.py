"""Real FUSE mounts of imported trees (``nixcas castore mount``, ``nixcas mount``), compared with the source.

Every mount is a ``nixcas`` subprocess; teardown unmounts and kills it by PID.
Expected values come from the source tree on disk, ``tests/data/vectors.json``
and independent hashing, never from the code under test.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import blake3
import pytest
import zstandard
from pyfastcdc import FastCDC

from nixcas.castore.blob.combined import FILL_WINDOW
from nixcas.castore.digest import B3Digest
from nixcas.castore.objectstore.layout import blob_index_key, chunk_key
from nixcas.testing import packed
from nixcas.testing.daemon import clean_env, nixcas_command, running_daemon, short_tmpdir
from nixcas.testing.fixtures import BLOB_B, HELLOWORLD, SYMLINK_TARGET
from nixcas.testing.fuse import Mount, mount_impossible, needs_fuse, running_mount, start_mount

pytestmark = needs_fuse

VECTORS = json.loads((Path(__file__).parents[1] / "data" / "vectors.json").read_text())
HELLOWORLD_B3 = next(b["b3_display"] for b in VECTORS["blobs"] if b["name"] == "HELLOWORLD")
WITH_KEEP_HEX = next(d["digest_hex"] for d in VECTORS["directories"] if d["name"] == "DIRECTORY_WITH_KEEP")
COMPLICATED_PATH = VECTORS["ca_import_store_paths"]["complicated"]

RANDOM_SIZE = 6 * (1 << 20) + 12345
"""Several read-ahead blocks and a ragged end."""

NON_UTF8 = b"\xff\xfe-bytes"


def nixcas(*args: str) -> str:
    result = subprocess.run(nixcas_command(*args), capture_output=True, env=clean_env(), timeout=120, check=False)
    assert result.returncode == 0, f"nixcas {args}: {result.stderr.decode(errors='replace')}"
    return result.stdout.decode()


def make_tree(root: Path) -> None:
    """Files of every kind: empty, small, > 1 MiB, executable, same bytes with and without +x, symlinks, odd names."""
    rng = random.Random(6)  # noqa: S311 - reproducible test data
    (root / "bin").mkdir(parents=True)
    (root / "README").write_bytes(HELLOWORLD)
    (root / "empty").write_bytes(b"")
    script = root / "bin" / "run"
    script.write_bytes(b"#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    shared = b"the same bytes, once executable and once not\n"
    (root / "bin" / "same-plain").write_bytes(shared)
    (root / "bin" / "same-exec").write_bytes(shared)
    (root / "bin" / "same-exec").chmod(0o755)
    (root / "data").mkdir()
    (root / "data" / "blob_b").write_bytes(BLOB_B)
    (root / "data" / "random").write_bytes(rng.randbytes(RANDOM_SIZE))
    for name in ("keep", "keep2"):  # identical directories: DIRECTORY_WITH_KEEP
        (root / name).mkdir()
        (root / name / ".keep").write_bytes(b"")
    (root / "links").mkdir()
    (root / "links" / "rel").symlink_to("../README")
    (root / "links" / "abs").symlink_to(os.fsdecode(SYMLINK_TARGET))
    (root / "links" / "dangling").symlink_to("nowhere/at/all")
    (root / "links" / "dir").symlink_to("../bin")
    names = root / "names"
    names.mkdir()
    (names / "with space").write_bytes(b"space\n")
    (names / "ünïcødé").write_bytes(b"unicode\n")
    (names / os.fsdecode(NON_UTF8)).write_bytes(b"bytes\n")
    (root / "emptydir").mkdir()
    deep = root / "deep" / "a" / "b" / "c" / "d"
    deep.mkdir(parents=True)
    (deep / "file").write_bytes(rng.randbytes(3000))


def ingest(store: Path, tree: Path) -> str:
    node = json.loads(nixcas("--store-dir", str(store), "castore", "ingest", str(tree), "--json"))
    assert node["type"] == "directory"
    return str(node["digest"])


def castore_mount(store: Path, digest: str, mountpoint: Path, log: Path, *options: str) -> Mount:
    mountpoint.mkdir(exist_ok=True)
    return start_mount(
        ["--store-dir", str(store), "castore", "mount", digest, str(mountpoint), *options], mountpoint, log
    )


def b3_forms(data: bytes) -> tuple[bytes, bytes]:
    """The tvix and snix display forms of BLAKE3(data), computed here."""
    text = base64.b64encode(blake3.blake3(data).digest()).decode()
    return f"b3:{text}".encode(), f"blake3-{text}".encode()


def errno_of(fn: Callable[..., object], *args: object, **kwargs: object) -> int:
    """The errno ``fn(*args)`` fails with (failing the test if it does not)."""
    try:
        fn(*args, **kwargs)
    except OSError as e:
        return e.errno or 0
    pytest.fail(f"{getattr(fn, '__name__', fn)}{args} did not fail")


@pytest.fixture(scope="module", autouse=True)
def _can_mount(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skip (saying why) when fusermount3 refuses to mount on this machine although /dev/fuse exists."""
    reason = mount_impossible(tmp_path_factory.mktemp("probe"))
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("src") / "tree"
    make_tree(root)
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tree: Path) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("store")
    return path, ingest(path, tree)


@pytest.fixture(scope="module")
def mounted(tmp_path_factory: pytest.TempPathFactory, store: tuple[Path, str]) -> Iterator[Mount]:
    """The tree mounted with --list-root --show-xattr."""
    work = tmp_path_factory.mktemp("mnt")
    mount = castore_mount(store[0], store[1], work / "mp", work / "log", "--list-root", "--show-xattr")
    try:
        yield mount
    finally:
        mount.kill()


# -- the tree, byte for byte ---------------------------------------------------------------


def test_diff_finds_no_difference(mounted: Mount, tree: Path) -> None:
    result = subprocess.run(
        ["diff", "-r", "--no-dereference", str(tree), str(mounted.path)], capture_output=True, check=False
    )
    assert result.returncode == 0, result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")


def walk(root: Path) -> dict[bytes, tuple[str, object]]:
    """Every path below ``root`` (raw bytes) -> (kind, what identifies its content)."""
    out: dict[bytes, tuple[str, object]] = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, os.fsencode(root))
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", None)
            else:
                with open(full, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                out[rel] = ("file", (st.st_size, bool(st.st_mode & 0o100), digest))
    return out


def test_every_path_has_its_type_size_exec_bit_content_and_target(mounted: Mount, tree: Path) -> None:
    source, mount = walk(tree), walk(mounted.path)
    assert mount == source
    assert (b"names/" + NON_UTF8) in mount
    assert mount[b"links/abs"] == ("symlink", SYMLINK_TARGET)


def test_modes_and_attributes(mounted: Mount) -> None:
    mp = mounted.path
    root = os.stat(mp)
    assert root.st_ino == 1
    assert stat.S_IMODE(root.st_mode) == 0o555 and stat.S_ISDIR(root.st_mode)
    plain, exe = os.stat(mp / "README"), os.stat(mp / "bin" / "run")
    assert (stat.S_IFMT(plain.st_mode), stat.S_IMODE(plain.st_mode)) == (stat.S_IFREG, 0o444)
    assert stat.S_IMODE(exe.st_mode) == 0o555
    assert stat.S_IMODE(os.stat(mp / "deep").st_mode) == 0o555
    assert stat.S_ISLNK(os.lstat(mp / "links" / "rel").st_mode)
    assert os.lstat(mp / "links" / "rel").st_size == len("../README")
    assert (plain.st_uid, plain.st_gid, plain.st_size, plain.st_mtime) == (0, 0, len(HELLOWORLD), 1)


def test_same_blob_with_and_without_exec_bit_gets_two_inodes(mounted: Mount) -> None:
    plain, exe = os.stat(mounted.path / "bin" / "same-plain"), os.stat(mounted.path / "bin" / "same-exec")
    assert plain.st_ino != exe.st_ino
    assert (stat.S_IMODE(plain.st_mode), stat.S_IMODE(exe.st_mode)) == (0o444, 0o555)


def test_identical_directories_share_an_inode(mounted: Mount) -> None:
    assert os.stat(mounted.path / "keep").st_ino == os.stat(mounted.path / "keep2").st_ino
    assert os.stat(mounted.path / "keep" / ".keep").st_ino == os.stat(mounted.path / "empty").st_ino


def test_symlinks_resolve_inside_the_mount(mounted: Mount) -> None:
    assert (mounted.path / "links" / "rel").read_bytes() == HELLOWORLD
    assert sorted(os.listdir(mounted.path / "links" / "dir")) == ["run", "same-exec", "same-plain"]
    assert errno_of(os.stat, mounted.path / "links" / "dangling") == errno.ENOENT


# -- reads -------------------------------------------------------------------------------------


def test_positional_reads_seek_both_ways(mounted: Mount, tree: Path) -> None:
    """O_DIRECT bypasses the page cache, so every pread reaches the filesystem at its offset."""
    expected = (tree / "data" / "random").read_bytes()
    fd = os.open(mounted.path / "data" / "random", os.O_RDONLY | os.O_DIRECT)
    try:
        for offset, size in [
            (5 << 20, 4096),
            (1 << 20, 100_000),  # backwards
            ((1 << 20) - 10, 20),  # across a block boundary, just behind
            (RANDOM_SIZE - 100, 4096),  # the ragged end
            (0, 1 << 20),
            (3 << 20, 2 << 20),  # forward past the read-ahead window
            (RANDOM_SIZE, 10),  # at EOF
            (RANDOM_SIZE + 5000, 10),  # beyond
        ]:
            assert os.pread(fd, size, offset) == expected[offset : offset + size], (offset, size)
    finally:
        os.close(fd)


def test_concurrent_readers(mounted: Mount, tree: Path) -> None:
    files = ["data/random", "data/blob_b", "README", "deep/a/b/c/d/file", "bin/run"]
    expected = {name: (tree / name).read_bytes() for name in files}

    def reader(seed: int) -> None:
        rng = random.Random(seed)  # noqa: S311
        name = files[seed % len(files)]
        data = expected[name]
        flags = os.O_RDONLY | (os.O_DIRECT if seed % 2 else 0)
        fd = os.open(mounted.path / name, flags)
        try:
            whole = b"".join(iter(lambda: os.read(fd, rng.choice([4096, 65536, 1 << 20])), b""))
            assert whole == data, name
            for _ in range(20):
                offset = rng.randrange(len(data) + 1)
                size = rng.randrange(1, 300_000)
                assert os.pread(fd, size, offset) == data[offset : offset + size], (name, offset, size)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(reader, range(16)))


# -- names, listing, xattrs, writes ---------------------------------------------------------------


def test_wrong_names_are_enoent(mounted: Mount) -> None:
    mp = mounted.path
    assert errno_of(os.stat, mp / "nope") == errno.ENOENT
    assert errno_of(os.stat, mp / "bin" / "nope") == errno.ENOENT
    assert errno_of(os.stat, mp / "deep" / "a" / "b" / "c" / "d" / "File") == errno.ENOENT
    assert errno_of(os.stat, mp / "README" / "x") == errno.ENOTDIR
    assert errno_of(open, mp / "bin" / "missing") == errno.ENOENT


def test_root_listing_allowed(mounted: Mount, tree: Path) -> None:
    assert sorted(os.listdir(mounted.path)) == sorted(os.listdir(tree))
    assert sorted(os.listdir(os.fsencode(mounted.path / "names"))) == sorted(os.listdir(os.fsencode(tree / "names")))
    assert os.listdir(mounted.path / "emptydir") == []


def test_xattrs(mounted: Mount, tree: Path) -> None:
    mp = mounted.path
    tvix, snix = b3_forms(HELLOWORLD)
    assert tvix == HELLOWORLD_B3.encode()
    assert os.getxattr(mp / "README", "user.tvix.castore.blob.digest") == tvix
    assert os.getxattr(mp / "README", "user.snix.castore.blob.digest") == snix
    random_tvix, _ = b3_forms((tree / "data" / "random").read_bytes())
    assert os.getxattr(mp / "data" / "random", "user.tvix.castore.blob.digest") == random_tvix
    keep = "b3:" + base64.b64encode(bytes.fromhex(WITH_KEEP_HEX)).decode()
    assert os.getxattr(mp / "keep", "user.tvix.castore.directory.digest") == keep.encode()
    assert os.getxattr(mp / "keep", "user.snix.castore.directory.digest") == keep.replace("b3:", "blake3-").encode()
    assert sorted(os.listxattr(mp / "README")) == ["user.snix.castore.blob.digest", "user.tvix.castore.blob.digest"]
    assert sorted(os.listxattr(mp / "keep")) == [
        "user.snix.castore.directory.digest",
        "user.tvix.castore.directory.digest",
    ]
    assert os.listxattr(mp / "links" / "rel", follow_symlinks=False) == []
    assert errno_of(os.getxattr, mp / "README", "user.tvix.castore.directory.digest") == errno.ENODATA
    assert errno_of(os.getxattr, mp / "links" / "abs", "user.tvix.castore.blob.digest", follow_symlinks=False) == (
        errno.ENODATA
    )


def test_writes_are_refused(mounted: Mount) -> None:
    mp = mounted.path
    assert errno_of(open, mp / "README", "wb") == errno.EROFS
    assert errno_of(open, mp / "README", "ab") == errno.EROFS
    assert errno_of(open, mp / "new-file", "wb") == errno.EROFS
    assert errno_of(os.mkdir, mp / "bin" / "newdir") == errno.EROFS
    assert errno_of(os.unlink, mp / "README") == errno.EROFS
    assert errno_of(os.rename, mp / "README", mp / "README2") == errno.EROFS
    assert errno_of(os.chmod, mp / "README", 0o777) == errno.EROFS
    assert errno_of(os.symlink, "x", mp / "newlink") == errno.EROFS
    assert errno_of(os.setxattr, mp / "README", "user.x", b"1") == errno.EROFS
    assert (mp / "README").read_bytes() == HELLOWORLD


def held_inodes(mount: Mount) -> tuple[int, str]:
    """Ask the mount (SIGUSR1) what it holds: the number of inodes and the whole log line."""
    seen = mount.stderr().count("holding ")
    mount.signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while len(lines := [line for line in mount.stderr().splitlines() if "holding " in line]) <= seen:
        assert time.monotonic() < deadline, mount.stderr()
        time.sleep(0.02)
    line = lines[-1]
    return int(line.split("holding ")[1].split()[0]), line


def test_unused_inodes_are_evicted(mounted: Mount) -> None:
    """Once the kernel drops its dentries and inodes, the mount drops them too (only the root is left)."""
    try:
        fd = os.open("/proc/sys/vm/drop_caches", os.O_WRONLY)
    except OSError as e:
        pytest.skip(f"cannot make the kernel forget inodes here (/proc/sys/vm/drop_caches: {e.strerror})")
    try:
        walk(mounted.path)  # every file and directory gets an inode
        before, _ = held_inodes(mounted)
        assert before > 20
        os.write(fd, b"2")  # reclaim dentries and inodes (not the page cache)
    finally:
        os.close(fd)
    after, line = held_inodes(mounted)
    assert after < 5, line
    assert line.endswith("0 open files, 0 open directories")


# -- without --list-root / --show-xattr; unmounted by fusermount3 ------------------------------------


def test_plain_mount_refuses_root_listing_and_xattrs(tmp_path: Path, store: tuple[Path, str], tree: Path) -> None:
    mount = castore_mount(store[0], store[1], tmp_path / "mount point", tmp_path / "log")
    try:
        mp = mount.path
        if os.geteuid() == 0:  # the kernel's read-ahead was raised from 128 KiB (found despite the space)
            dev = os.stat(mp).st_dev
            assert Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").read_text() == "1024\n"
        assert errno_of(os.listdir, mp) == errno.EPERM
        assert (mp / "README").read_bytes() == HELLOWORLD  # lookups still work
        assert sorted(os.listdir(mp / "bin")) == sorted(os.listdir(tree / "bin"))
        assert errno_of(os.getxattr, mp / "README", "user.tvix.castore.blob.digest") == errno.EOPNOTSUPP
        assert errno_of(os.listxattr, mp / "README") == errno.EOPNOTSUPP
        subprocess.run(["fusermount3", "-u", str(mp)], check=True, capture_output=True)
        assert mount.wait() == 0
        assert not os.path.ismount(mp)
        assert "unmounted" in mount.stderr()
    finally:
        mount.kill()


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="acting as another user needs root and setpriv"
)
@pytest.mark.parametrize("allow_other", [False, True])
def test_allow_other(store: tuple[Path, str], allow_other: bool) -> None:
    with short_tmpdir() as work:
        work.chmod(0o755)  # nobody must reach the mountpoint itself
        options = ["--allow-other"] if allow_other else []
        mount = castore_mount(store[0], store[1], work / "mp", work / "log", *options)
        try:
            as_nobody = subprocess.run(
                ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", str(mount.path / "README")],
                capture_output=True,
                check=False,
                timeout=30,
            )
        finally:
            mount.kill()
    if allow_other:
        assert (as_nobody.returncode, as_nobody.stdout) == (0, HELLOWORLD), as_nobody.stderr
    else:
        assert as_nobody.returncode != 0 and b"Permission denied" in as_nobody.stderr


# -- content missing from the store; stopped by SIGINT ------------------------------------------------


def test_missing_and_corrupt_content_is_eio(tmp_path: Path, tree: Path) -> None:
    store = tmp_path / "store"
    digest = ingest(store, tree)
    blobs = store / "blobs"

    def drop_blob(data: bytes) -> None:
        hexd = blake3.blake3(data).hexdigest()
        packed.delete_blob(blobs, bytes.fromhex(hexd))  # a small blob is a row
        for kind in ("chunks", "blobs"):
            (blobs / kind / "b3" / hexd[:4] / hexd).unlink(missing_ok=True)

    drop_blob((tree / "data" / "random").read_bytes())
    # Corrupt: the chunk of bin/run replaced by a valid zstd frame of other bytes of the same length.
    run_hex = blake3.blake3((tree / "bin" / "run").read_bytes()).hexdigest()
    wrong = b"#!/bin/sh\necho HI\n"
    assert len(wrong) == len((tree / "bin" / "run").read_bytes())
    assert packed.corrupt_blob(blobs, bytes.fromhex(run_hex), wrong)
    # A directory missing from the directory service.
    db = sqlite3.connect(store / "directories.sqlite")
    try:
        with db:
            deleted = db.execute(
                "DELETE FROM directories WHERE digest = ?",
                (bytes.fromhex(ingest(tmp_path / "scratch", tree / "deep" / "a")),),
            ).rowcount
    finally:
        db.close()
    assert deleted == 1

    mount = castore_mount(store, digest, tmp_path / "mp", tmp_path / "log", "--list-root")
    try:
        mp = mount.path
        assert errno_of(open, mp / "data" / "random", "rb") == errno.EIO
        assert "/data/random" in mount.wait_for_log("opening /data/random")
        assert os.stat(mp / "deep" / "a").st_size > 0  # the entry itself comes from its parent
        assert errno_of(os.listdir, mp / "deep" / "a") == errno.EIO
        assert errno_of(os.stat, mp / "deep" / "a" / "b") == errno.EIO
        assert "/deep/a" in mount.wait_for_log("reading directory /deep/a")
        with open(mp / "bin" / "run", "rb") as f:
            assert errno_of(f.read) == errno.EIO  # the whole read is checked against the digest at EOF
        assert "/bin/run" in mount.wait_for_log("of /bin/run")
        assert (mp / "README").read_bytes() == HELLOWORLD  # the rest is fine
        mount.signal(signal.SIGINT)
        assert mount.wait() == 0
        assert not os.path.ismount(mp)
    finally:
        mount.kill()


BIG_SIZE = 12 << 20
"""Big files of some 48 chunks: past the mount's chunk-by-chunk threshold and its read-ahead window."""


def store_chunks(data: bytes) -> list[bytes]:
    """The chunks the store cuts ``data`` into (FastCDC 2020 at the store's default parameters), computed here."""
    return [bytes(c.data) for c in FastCDC(256 << 10, min_size=128 << 10, max_size=512 << 10).cut_buf(data)]


@pytest.fixture(scope="module")
def big_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mount, dict[str, bytes], range]]:
    """A mount of two big files, ``good`` and ``damaged``; one chunk in the middle of ``damaged`` replaced.

    The replacement is a valid zstd frame of other bytes of the chunk's length, so only its BLAKE3 can tell.
    Yields the mount, the source bytes and the byte range of the damaged chunk.
    """
    work = tmp_path_factory.mktemp("big")
    source = work / "src"
    source.mkdir()
    files = {name: blake3.blake3(name.encode()).digest(length=BIG_SIZE) for name in ("good", "damaged")}
    for name, data in files.items():
        (source / name).write_bytes(data)
    store = work / "store"
    root = ingest(store, source)
    chunks = store_chunks(files["damaged"])
    bad = len(chunks) // 2
    start = sum(map(len, chunks[:bad]))
    path = store / "blobs" / chunk_key(B3Digest(blake3.blake3(chunks[bad]).digest()))
    assert path.is_file()
    path.write_bytes(zstandard.ZstdCompressor().compress(bytes(b ^ 0x5A for b in chunks[bad])))
    mount = castore_mount(store, root, work / "mp", work / "log", "--list-root")
    try:
        yield mount, files, range(start, start + len(chunks[bad]))
    finally:
        mount.kill()


def test_damaged_chunk_in_a_big_file_is_eio_where_it_is(big_files: tuple[Mount, dict[str, bytes], range]) -> None:
    """Reads stop with EIO at the damaged chunk (not at the end), hand out no wrong byte, and the rest reads fine."""
    mount, files, bad = big_files
    want = files["damaged"]
    got = bytearray()

    def read_on() -> None:
        with open(mount.path / "damaged", "rb", buffering=0) as f:  # through the page cache and kernel read-ahead
            while piece := f.read(1 << 20):
                got.extend(piece)

    assert errno_of(read_on) == errno.EIO
    assert got == want[: len(got)]
    assert bad.start - (1 << 20) < len(got) <= bad.start  # stopped at the damaged chunk, within one read
    assert "of /damaged" in mount.wait_for_log("of /damaged")
    fd = os.open(mount.path / "damaged", os.O_RDONLY | os.O_DIRECT)  # every pread reaches the filesystem
    try:
        page = bad.start // 4096 * 4096
        assert os.pread(fd, 8192, page - 8192) == want[page - 8192 : page]
        assert errno_of(os.pread, fd, 4096, page) == errno.EIO
        assert errno_of(os.pread, fd, 1 << 20, bad.stop - 10) == errno.EIO
        after = -(-bad.stop // 4096) * 4096
        assert os.pread(fd, 1 << 20, after) == want[after : after + (1 << 20)]
        assert os.pread(fd, 4096, BIG_SIZE - 4096) == want[-4096:]  # past it, to the end: chunk-checked
    finally:
        os.close(fd)


def test_parallel_reads_of_a_big_file_are_exact(big_files: tuple[Mount, dict[str, bytes], range]) -> None:
    """Many threads at random offsets and sizes on one open file (the kernel sends their reads at once)."""
    mount, files, _ = big_files
    want = files["good"]
    buffered = os.open(mount.path / "good", os.O_RDONLY)
    direct = os.open(mount.path / "good", os.O_RDONLY | os.O_DIRECT)

    def reader(seed: int) -> None:
        rng = random.Random(seed)  # noqa: S311
        fd = direct if seed % 2 else buffered
        for _ in range(25):
            offset = rng.randrange(BIG_SIZE + 1)
            size = rng.choice([1, 4096, 100_000, 1 << 20, 3 << 20])
            assert os.pread(fd, size, offset) == want[offset : offset + size], (seed, offset, size)

    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(reader, range(16)))
        whole = b"".join(iter(lambda: os.read(buffered, 1 << 20), b""))
        assert whole == want
    finally:
        os.close(buffered)
        os.close(direct)


# -- the store's paths: nixcas mount -----------------------------------------------------------------


@pytest.fixture(scope="module")
def nix_store(tmp_path_factory: pytest.TempPathFactory, tree: Path) -> tuple[Path, str, str]:
    """A store holding the COMPLICATED fixture (store path from the vectors) and the test tree."""
    work = tmp_path_factory.mktemp("nixstore")
    complicated = work / "complicated"
    (complicated / "keep").mkdir(parents=True)
    (complicated / "keep" / ".keep").write_bytes(b"")
    (complicated / ".keep").write_bytes(b"")
    (complicated / "aa").symlink_to(os.fsdecode(SYMLINK_TARGET))
    store = work / "store"
    printed = nixcas("--store-dir", str(store), "import", str(complicated), str(tree)).split()
    assert printed[0] == COMPLICATED_PATH
    return store, printed[0].removeprefix("/nix/store/"), printed[1].removeprefix("/nix/store/")


def test_store_mount(tmp_path: Path, nix_store: tuple[Path, str, str], tree: Path) -> None:
    store, complicated, tree_base = nix_store
    args = ["--store-dir", str(store), "mount", str(tmp_path / "mp"), "--list-root", "--show-xattr"]
    (tmp_path / "mp").mkdir()
    with running_mount(args, tmp_path / "mp", tmp_path / "log") as mount:
        mp = mount.path
        assert sorted(os.listdir(mp)) == sorted([complicated, tree_base])
        result = subprocess.run(["diff", "-r", "--no-dereference", str(tree), str(mp / tree_base)], check=False)
        assert result.returncode == 0
        assert os.readlink(mp / complicated / "aa") == os.fsdecode(SYMLINK_TARGET)
        keep = "b3:" + base64.b64encode(bytes.fromhex(WITH_KEEP_HEX)).decode()
        assert os.getxattr(mp / complicated / "keep", "user.tvix.castore.directory.digest") == keep.encode()
        hash_part = complicated.split("-")[0]
        assert errno_of(os.stat, mp / f"{hash_part}-other-name") == errno.ENOENT  # tvix would resolve this
        assert errno_of(os.stat, mp / hash_part) == errno.ENOENT
        assert errno_of(os.stat, mp / "not-a-store-path") == errno.ENOENT
        assert errno_of(os.stat, mp / ("0" * 32 + "-complicated")) == errno.ENOENT
        assert mount.stop() == 0
        assert not os.path.ismount(mp)


def test_store_mount_without_list_root(tmp_path: Path, nix_store: tuple[Path, str, str]) -> None:
    store, complicated, _ = nix_store
    (tmp_path / "mp").mkdir()
    args = ["--store-dir", str(store), "mount", str(tmp_path / "mp")]
    with running_mount(args, tmp_path / "mp", tmp_path / "log") as mount:
        assert errno_of(os.listdir, mount.path) == errno.EPERM
        assert (mount.path / complicated / ".keep").read_bytes() == b""
        assert sorted(os.listdir(mount.path / complicated)) == [".keep", "aa", "keep"]


# -- over a composition: a gRPC daemon behind a local cache ------------------------------------------


def test_reads_through_a_local_cache_fill_it(tmp_path: Path, tree: Path) -> None:
    """Whole reads leave the blob (chunks and index) near; a partial read of a big file streams.

    The far store holds a big file (20 MiB, some 80 chunks); a 4 KiB read at 16 MiB, far past the
    mount's read-ahead (8 MiB), answers from the chunks there without copying the rest first.
    """
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(tree / "data" / "random", source / "random")
    (source / "blob_b").write_bytes(BLOB_B)
    big = blake3.blake3(b"fuse big").digest(length=20 << 20)
    (source / "big").write_bytes(big)
    far_store = tmp_path / "far"
    root = ingest(far_store, source)
    near = tmp_path / "near"
    with (
        short_tmpdir() as sock_dir,
        running_daemon("-l", str(sock_dir / "d.sock"), store=far_store, log=tmp_path / "daemon.log") as daemon,
    ):
        blob_url = (
            "combined://?near="
            + quote(f"objectstore+file://{near}", safe="")
            + "&far="
            + quote(daemon.client_url(), safe="")
        )
        args = [
            "--blob-service-addr",
            blob_url,
            "--directory-service-addr",
            daemon.client_url(),
            "castore",
            "mount",
            root,
            str(tmp_path / "mp"),
        ]
        (tmp_path / "mp").mkdir()
        with running_mount(args, tmp_path / "mp", tmp_path / "log") as mount:
            data = (mount.path / "random").read_bytes()
            assert data == (tree / "data" / "random").read_bytes()
            for name, offset, want in [("blob_b", 0, BLOB_B), ("big", 16 << 20, big)]:
                fd = os.open(mount.path / name, os.O_RDONLY | os.O_DIRECT)  # no kernel read-ahead
                try:
                    assert os.pread(fd, 4096, offset) == want[offset : offset + 4096]
                finally:
                    os.close(fd)
            assert mount.stop() == 0

    def index_near(blob: bytes) -> bool:
        return (near / blob_index_key(B3Digest(blake3.blake3(blob).digest()))).is_file()

    def chunk_near(chunk: bytes) -> bool:
        return (near / chunk_key(B3Digest(blake3.blake3(chunk).digest()))).is_file()

    # A blob is in the near store once its index is (written last, after all its chunks passed in order).
    assert index_near(data)
    # BLOB_B (two chunks, 1 MiB) fits in the mount's first 1 MiB block: any read of it reads it whole.
    assert index_near(BLOB_B)
    # The partial read of big left the chunks it touched (and its read-ahead window) near, no index.
    chunks = [bytes(c.data) for c in FastCDC(256 << 10, min_size=128 << 10, max_size=512 << 10).cut_buf(big)]
    assert not index_near(big)
    starts = [sum(map(len, chunks[:i])) for i in range(len(chunks))]
    # the mount reads the 1 MiB block at 16 MiB: the chunks covering it, and the window after the last one
    first = max(i for i, start in enumerate(starts) if start <= 16 << 20)
    last = max(i for i, start in enumerate(starts) if start < 17 << 20)
    near_chunks = [i for i, c in enumerate(chunks) if chunk_near(c)]
    assert set(range(first, last + 1)) <= set(near_chunks) <= set(range(first, last + FILL_WINDOW))


def test_a_killed_mount_leaves_no_dead_mount_behind(tmp_path: Path, store: tuple[Path, str]) -> None:
    """``kill -9`` of the mount process: fusermount3 (auto_unmount) removes the mount; a SIGTERM'd one too."""
    for sig in (signal.SIGKILL, signal.SIGTERM):
        mount = castore_mount(store[0], store[1], tmp_path / f"mp{sig}", tmp_path / f"log{sig}", "--list-root")
        try:
            assert os.path.ismount(mount.path)
            mount.proc.send_signal(sig)
            mount.proc.wait(20)
            deadline = time.monotonic() + 10
            while os.path.ismount(mount.path) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not os.path.ismount(mount.path)
            assert os.listdir(mount.path) == []  # the empty directory again, not "Transport endpoint not connected"
        finally:
            mount.kill()


# -- usage errors -----------------------------------------------------------------------------------------


def test_bad_mountpoint_and_digest_are_usage_errors(tmp_path: Path, store: tuple[Path, str]) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            nixcas_command("--store-dir", str(store[0]), *args), capture_output=True, env=clean_env(), timeout=60
        )

    missing = run("castore", "mount", store[1], str(tmp_path / "absent"))
    assert missing.returncode == 2 and b"not a directory" in missing.stderr
    (tmp_path / "mp").mkdir()
    unknown = run("castore", "mount", "00" * 32, str(tmp_path / "mp"))
    assert unknown.returncode == 1 and b"not found" in unknown.stderr
    assert not os.path.ismount(tmp_path / "mp")
    bad = run("castore", "mount", "xyz", str(tmp_path / "mp"))
    assert bad.returncode == 2

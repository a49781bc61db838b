"""Importing filesystem trees and entry streams into castore."""

from __future__ import annotations

import asyncio
import builtins
import errno
import gc
import os
import socket
import stat
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import blake3
import pytest
import pytest_asyncio

import nixcas.castore.ingest as ingest_module
import nixcas.castore.upload as upload_module
import nixcas.castore.walk as walk_module
from nixcas.castore.blob.base import BlobService, BlobWriter
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.ingest import IngestEntry, ingest_entries, ingest_path
from nixcas.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from nixcas.castore.sizerule import SizeRule
from nixcas.composition import blob_service_from_url, directory_service_from_url
from nixcas.errors import IngestError, StorageError

COMPLICATED_HEX = "424a7f6ce08d805d15b428062faae96299a1675d708c3a39261afe38cdd04feb"
WITH_KEEP_HEX = "8b5b5d642b646bb8ed504b0862c39413e87e57491497de7bd075953f7b83810e"
EMPTY_HEX = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
HELLOWORLD_HEX = "5ca7815adcb484e9a136c11efe69c1d530176d549b5d18d038eb5280b4b3470c"


def b3(data: bytes) -> B3Digest:
    return B3Digest(blake3.blake3(data).digest())


class Stores:
    """A blob and a directory service, with a record of every directory commit."""

    def __init__(self, blobs: BlobService, directories: DirectoryService) -> None:
        self.blobs = blobs
        self.directories = directories
        self.commits: list[list[B3Digest]] = []

    async def ingest(self, path: str | os.PathLike[str] | bytes) -> Node:
        return await ingest_path(path, self.blobs, self.directories)


@pytest_asyncio.fixture(
    params=[("memory://", "memory://"), ("objectstore+file://{tmp}/blobs", "sqlite://{tmp}/dirs.sqlite")],
    ids=["memory", "local"],
)
async def stores(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Stores]:
    blob_url, dir_url = request.param
    blobs = await blob_service_from_url(blob_url.format(tmp=tmp_path / "store"))
    directories = await directory_service_from_url(dir_url.format(tmp=tmp_path / "store"))
    s = Stores(blobs, directories)
    real_put_raw = directories._put_raw

    async def recording_put_raw(items: Any) -> None:
        s.commits.append([d for d, _ in items])
        await real_put_raw(items)

    monkeypatch.setattr(directories, "_put_raw", recording_put_raw)
    yield s
    await directories.close()
    await blobs.close()


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = tmp_path / "src"
    path.mkdir()
    return path


# -- reading a tree back, and describing one on disk ------------------------------------

Tree = dict[tuple[bytes, ...], tuple[Any, ...]]


async def read_back(stores: Stores, node: Node) -> Tree:
    """The tree under ``node`` as stored: path -> ("d",) / ("f", data, exec) / ("l", target)."""
    tree: Tree = {}
    directories: dict[B3Digest, Directory] = {}
    if isinstance(node, DirectoryNode):
        async for d in stores.directories.get_recursive(node.digest):
            assert d.digest not in directories, "get_recursive yielded a directory twice"
            directories[d.digest] = d

    async def visit(path: tuple[bytes, ...], n: Node) -> None:
        if isinstance(n, DirectoryNode):
            tree[path] = ("d",)
            d = directories[n.digest]
            assert d.size_under(SizeRule.TVIX) == n.size
            for name, child in d:
                await visit((*path, name), child)
        elif isinstance(n, FileNode):
            data = await stores.blobs.read(n.digest)
            assert data is not None
            assert len(data) == n.size
            tree[path] = ("f", data, n.executable)
        else:
            tree[path] = ("l", n.target)

    await visit((), node)
    return tree


def on_disk(root: Path) -> Tree:
    """The same description, taken from the filesystem directly."""
    tree: Tree = {}

    def visit(path: tuple[bytes, ...], fs: bytes) -> None:
        st = os.lstat(fs)
        if stat.S_ISDIR(st.st_mode):
            tree[path] = ("d",)
            for name in os.listdir(fs):
                visit((*path, name), os.path.join(fs, name))
        elif stat.S_ISLNK(st.st_mode):
            tree[path] = ("l", os.readlink(fs))
        else:
            with open(fs, "rb") as f:
                tree[path] = ("f", f.read(), bool(st.st_mode & 0o100))

    visit((), os.fsencode(root))
    return tree


def make_complicated(base: Path) -> Path:
    """DIRECTORY_COMPLICATED on disk."""
    root = base / "complicated"
    (root / "keep").mkdir(parents=True)
    (root / "keep" / ".keep").write_bytes(b"")
    (root / ".keep").write_bytes(b"")
    (root / "aa").symlink_to("/nix/store/somewhereelse")
    return root


# -- single objects ----------------------------------------------------------------------


async def test_single_file(stores: Stores, src: Path) -> None:
    (src / "hello").write_bytes(b"Hello World!")
    os.chmod(src / "hello", 0o644)
    node = await stores.ingest(src / "hello")
    assert isinstance(node, FileNode)
    assert node == FileNode(B3Digest(bytes.fromhex(HELLOWORLD_HEX)), 12, executable=False)
    assert await stores.blobs.read(node.digest) == b"Hello World!"
    assert stores.commits == []  # no Directory for a file root


@pytest.mark.parametrize(
    ("mode", "executable"),
    [(0o755, True), (0o700, True), (0o744, True), (0o644, False), (0o655, False), (0o600, False)],
)
async def test_executable_bit(stores: Stores, src: Path, mode: int, executable: bool) -> None:
    path = src / "tool"
    path.write_bytes(b"#!/bin/sh\n")
    os.chmod(path, mode)
    node = await stores.ingest(path)
    assert node == FileNode(b3(b"#!/bin/sh\n"), 10, executable=executable)


async def test_empty_file(stores: Stores, src: Path) -> None:
    (src / "e").write_bytes(b"")
    node = await stores.ingest(src / "e")
    assert isinstance(node, FileNode)
    assert node == FileNode(B3Digest(bytes.fromhex(EMPTY_HEX)), 0)
    assert await stores.blobs.read(node.digest) == b""


@pytest.mark.parametrize("target", ["/nix/store/somewhereelse", "hello", "dangling/x"])
async def test_symlink_root(stores: Stores, src: Path, target: str) -> None:
    (src / "hello").write_bytes(b"Hello World!")
    (src / "link").symlink_to(target)
    node = await stores.ingest(src / "link")
    assert node == SymlinkNode(target.encode())
    assert stores.commits == []


async def test_symlink_to_directory_not_followed(stores: Stores, src: Path) -> None:
    make_complicated(src)
    (src / "tree").mkdir()
    (src / "tree" / "c").symlink_to(src / "complicated")
    node = await stores.ingest(src / "tree")
    assert await read_back(stores, node) == {(): ("d",), (b"c",): ("l", os.fsencode(src / "complicated"))}


async def test_empty_dir(stores: Stores, src: Path) -> None:
    (src / "empty").mkdir()
    node = await stores.ingest(src / "empty")
    assert isinstance(node, DirectoryNode)
    assert node == DirectoryNode(B3Digest(bytes.fromhex(EMPTY_HEX)), 0)
    got = await stores.directories.get(node.digest)
    assert got is not None
    assert len(got) == 0
    assert stores.commits == [[node.digest]]


async def test_complicated(stores: Stores, src: Path) -> None:
    node = await stores.ingest(make_complicated(src))
    assert isinstance(node, DirectoryNode)
    assert node.digest.hex() == COMPLICATED_HEX
    assert node.size == 8
    got = [d.digest.hex() async for d in stores.directories.get_recursive(node.digest)]
    assert got == [COMPLICATED_HEX, WITH_KEEP_HEX]
    assert len(stores.commits) == 1  # one atomic commit
    assert {d.hex() for d in stores.commits[0]} == {COMPLICATED_HEX, WITH_KEEP_HEX}
    # the root's own name does not matter
    (src / "other").mkdir()
    os.rename(src / "complicated", src / "other" / "renamed")
    again = await stores.ingest(os.fsencode(src / "other" / "renamed"))
    assert again == node


# -- a big tree: several batches of small files, and a large file ---------------------------


def make_big_tree(base: Path) -> Path:
    root = base / "big"
    for d in range(4):
        sub = root / f"d{d}" / "nested"
        sub.mkdir(parents=True)
        for i in range(160):
            content = f"file {d}/{i}\n".encode() * (i % 7)  # some empty, some identical
            (sub / f"f{i:03d}").write_bytes(content)
        (root / f"d{d}" / "mid").write_bytes(
            blake3.blake3(b"mid%d" % d).digest(length=300 << 10)
        )  # just above the small-file limit
    (root / "large.bin").write_bytes(blake3.blake3(b"large").digest(length=3 << 20))
    (root / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "run.sh", 0o700)
    (root / "link").symlink_to("d0/nested/f001")
    (root / "empty-dir").mkdir()
    os.mkdir(os.path.join(os.fsencode(root), b"non-utf8-\xc5\xc4\xd6"))
    with open(os.path.join(os.fsencode(root), b"non-utf8-\xc5\xc4\xd6", b"\xff\xfe"), "wb") as f:
        f.write(b"bytes name")
    return root


async def test_big_tree(stores: Stores, src: Path) -> None:
    root = make_big_tree(src)
    expected = on_disk(root)
    assert sum(1 for v in expected.values() if v[0] == "f") > 600
    seen: list[int] = []
    node = await ingest_path(root, stores.blobs, stores.directories, progress=seen.append)
    assert isinstance(node, DirectoryNode)
    assert sum(seen) == sum(len(v[1]) for v in expected.values() if v[0] == "f")
    got = await read_back(stores, node)
    assert got.keys() == expected.keys()
    for path, value in expected.items():
        assert got[path] == value, path
    assert len(stores.commits) == 1
    # deterministic
    assert await stores.ingest(root) == node


# -- refused input: nothing is committed -----------------------------------------------------


def add_fifo(path: Path) -> None:
    os.mkfifo(path)


def add_socket(path: Path) -> None:
    # AF_UNIX paths are limited to ~108 bytes: bind by a short relative name.
    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path.name)
        finally:
            sock.close()
    finally:
        os.chdir(cwd)
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


@pytest.mark.parametrize(("kind", "make"), [("FIFO", add_fifo), ("socket", add_socket)])
async def test_special_file_refused(stores: Stores, src: Path, kind: str, make: Any) -> None:
    root = make_complicated(src)
    for d in ("a", "b", "z"):
        (root / d).mkdir()
        (root / d / "file").write_bytes(d.encode())
    bad = root / "b" / "special"
    make(bad)
    with pytest.raises(IngestError) as info:
        await stores.ingest(root)
    assert str(bad) in str(info.value)
    assert kind in str(info.value)
    assert stores.commits == []
    assert await stores.directories.get(B3Digest(bytes.fromhex(WITH_KEEP_HEX))) is None


async def test_fifo_root_refused(stores: Stores, src: Path) -> None:
    os.mkfifo(src / "fifo")
    with pytest.raises(IngestError, match="fifo"):
        await stores.ingest(src / "fifo")
    assert stores.commits == []


async def test_missing_path(stores: Stores, src: Path) -> None:
    with pytest.raises(IngestError) as info:
        await stores.ingest(src / "does-not-exist")
    assert str(src / "does-not-exist") in str(info.value)


# Unreadable files and unlistable directories (real chmod 000; as root, run without the DAC
# capabilities) are tested end to end in tests/test_cli.py::test_unreadable_input_as_unprivileged_user.


class FaultyFile:
    """A file whose reads fail, or return other content than its size promised."""

    def __init__(self, inner: Any, mode: str) -> None:
        self._inner = inner
        self._mode = mode
        self._served = False

    def read(self, n: int = -1) -> bytes:
        if self._mode == "eio":
            raise OSError(errno.EIO, "Input/output error")
        data: bytes = self._inner.read(n)
        if self._mode == "short":
            return data[: max(0, len(data) - 1)]
        if self._mode == "long" and not self._served and (n < 0 or len(data) < n):
            self._served = True
            data += b"surplus"
            return data if n < 0 else data[:n]
        return data

    def close(self) -> None:
        self._inner.close()

    def fileno(self) -> int:
        return int(self._inner.fileno())

    def __enter__(self) -> FaultyFile:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


@pytest.fixture
def faulty_open(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Make reading one path fail in a chosen way.

    Large files are read through ``open`` inside the ingest module, small ones
    through ``os.open``/``os.read``; both are patched, filtered by path.
    """
    real_open = builtins.open
    real_os_open = os.open
    real_os_read = os.read
    faults: dict[bytes, str] = {}
    fd_faults: dict[int, str] = {}

    def fake_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        mode = faults.get(os.fsencode(file))
        if mode == "eacces":
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(file))
        f = real_open(file, *args, **kwargs)
        return f if mode is None else FaultyFile(f, mode)

    def fake_os_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        fault = faults.get(os.fsencode(path)) if isinstance(path, (str, bytes, os.PathLike)) else None
        if fault == "eacces":
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        fd = real_os_open(path, flags, mode, dir_fd=dir_fd)
        if fault is not None:
            fd_faults[fd] = fault
        else:
            fd_faults.pop(fd, None)
        return fd

    def fake_os_read(fd: int, n: int) -> bytes:
        fault = fd_faults.get(fd)
        if fault == "eio":
            raise OSError(errno.EIO, "Input/output error")
        data = real_os_read(fd, n)
        if fault == "short" and data:
            fd_faults[fd] = "eof"
            return data[:-1]
        if fault == "eof":
            return b""
        if fault == "long":
            return data + b"x" if data else b""
        return data

    def arm(path: Path, mode: str) -> None:
        faults[os.fsencode(path)] = mode

    monkeypatch.setattr(ingest_module, "open", fake_open, raising=False)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "read", fake_os_read)
    return arm


@pytest.mark.parametrize("size", [pytest.param(10, id="small"), pytest.param(1 << 20, id="large")])
@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("eacces", "Permission denied"),
        ("eio", "Input/output error"),
        ("short", "changed"),
        ("long", "changed"),
    ],
)
async def test_read_errors(stores: Stores, src: Path, faulty_open: Any, size: int, mode: str, message: str) -> None:
    root = make_complicated(src)
    bad = root / "keep" / "victim"
    bad.write_bytes(b"v" * size)
    faulty_open(bad, mode)
    with pytest.raises(IngestError) as info:
        await stores.ingest(root)
    assert str(bad) in str(info.value)
    assert message in str(info.value)
    assert stores.commits == []


async def test_unaffected_by_faulty_open_fixture(stores: Stores, src: Path, faulty_open: Any) -> None:
    """The patched ``open`` passes other paths through (the fixture itself is sound)."""
    faulty_open(src / "elsewhere", "eio")
    node = await stores.ingest(make_complicated(src))
    assert isinstance(node, DirectoryNode)
    assert node.digest.hex() == COMPLICATED_HEX


# -- ingest_entries ----------------------------------------------------------------------------

EMPTY_FILE = FileNode(B3Digest(bytes.fromhex(EMPTY_HEX)), 0)
LINK = SymlinkNode(b"/nix/store/somewhereelse")


def complicated_entries(root: bytes = b"r") -> list[IngestEntry]:
    return [
        IngestEntry((root, b"keep", b".keep"), EMPTY_FILE),
        IngestEntry((root, b"keep"), None),
        IngestEntry((root, b".keep"), EMPTY_FILE),
        IngestEntry((root, b"aa"), LINK),
        IngestEntry((root,), None),
    ]


async def test_entries_complicated(stores: Stores) -> None:
    node = await ingest_entries(complicated_entries(), stores.directories)
    assert isinstance(node, DirectoryNode)
    assert node == DirectoryNode(B3Digest(bytes.fromhex(COMPLICATED_HEX)), 8)
    got = [d.digest.hex() async for d in stores.directories.get_recursive(node.digest)]
    assert got == [COMPLICATED_HEX, WITH_KEEP_HEX]
    assert len(stores.commits) == 1


async def test_entries_async_iterable(stores: Stores) -> None:
    async def gen() -> AsyncIterator[IngestEntry]:
        for e in complicated_entries():
            yield e

    node = await ingest_entries(gen(), stores.directories)
    assert isinstance(node, DirectoryNode)
    assert node.digest.hex() == COMPLICATED_HEX


@pytest.mark.parametrize(
    ("entries", "node"),
    [
        pytest.param([IngestEntry((b"f",), EMPTY_FILE)], EMPTY_FILE, id="file"),
        pytest.param([IngestEntry((b"l",), LINK)], LINK, id="symlink"),
        pytest.param(
            [IngestEntry((b"d",), None)], DirectoryNode(B3Digest(bytes.fromhex(EMPTY_HEX)), 0), id="empty-dir"
        ),
        pytest.param(
            [IngestEntry((b"d", b".keep"), EMPTY_FILE), IngestEntry((b"d",), None)],
            DirectoryNode(B3Digest(bytes.fromhex(WITH_KEEP_HEX)), 2),
            id="with-keep",
        ),
    ],
)
async def test_entries_simple(stores: Stores, entries: list[IngestEntry], node: Node) -> None:
    assert await ingest_entries(entries, stores.directories) == node
    assert len(stores.commits) == (1 if isinstance(node, DirectoryNode) else 0)


async def test_entries_before_commit_called_first(stores: Stores) -> None:
    calls: list[int] = []

    async def before() -> None:
        calls.append(len(stores.commits))

    await ingest_entries(complicated_entries(), stores.directories, before_commit=before)
    assert calls == [0]
    assert len(stores.commits) == 1


async def test_entries_before_commit_failure(stores: Stores) -> None:
    class Boom(Exception):
        pass

    async def before() -> None:
        raise Boom

    with pytest.raises(Boom):
        await ingest_entries(complicated_entries(), stores.directories, before_commit=before)
    assert stores.commits == []


@pytest.mark.parametrize(
    "entries",
    [
        pytest.param([], id="empty-stream"),
        pytest.param([*complicated_entries(), IngestEntry((b"x",), EMPTY_FILE)], id="entry-after-root"),
        pytest.param([*complicated_entries(), IngestEntry((b"r", b"late"), EMPTY_FILE)], id="child-after-root"),
        pytest.param(
            [
                IngestEntry((b"r", b"a"), EMPTY_FILE),
                IngestEntry((b"r", b"a"), LINK),
                IngestEntry((b"r",), None),
            ],
            id="duplicate-names",
        ),
        pytest.param(
            [
                IngestEntry((b"r", b"a", b"x"), EMPTY_FILE),
                IngestEntry((b"r", b"a"), None),
                IngestEntry((b"r", b"a"), None),
                IngestEntry((b"r",), None),
            ],
            id="duplicate-directory",
        ),
        pytest.param(complicated_entries()[:-1], id="no-root"),
        pytest.param([IngestEntry((b"r", b"f"), EMPTY_FILE)], id="only-child"),
        pytest.param([IngestEntry((), EMPTY_FILE)], id="empty-path"),
        pytest.param([IngestEntry((b"other", b"f"), EMPTY_FILE), IngestEntry((b"r",), None)], id="not-below-root"),
        pytest.param([IngestEntry((b"r", b"a/b"), EMPTY_FILE), IngestEntry((b"r",), None)], id="invalid-name"),
        pytest.param([IngestEntry((b"r", b".."), EMPTY_FILE), IngestEntry((b"r",), None)], id="dotdot-name"),
    ],
)
async def test_entries_refused(stores: Stores, entries: list[IngestEntry]) -> None:
    with pytest.raises(IngestError):
        await ingest_entries(entries, stores.directories)
    assert stores.commits == []


class _FailingWrites(MemoryBlobService):
    """Every streaming upload fails after a moment (as when the object store goes away); the first one last."""

    opened = 0

    async def open_write(self, expected_size: int | None = None) -> BlobWriter:
        writer = await super().open_write(expected_size)
        delay = 0.3 if self.opened == 0 else 0.02
        self.opened += 1

        async def fail(data: bytes) -> None:
            await asyncio.sleep(delay)
            raise StorageError("object store unreachable")

        writer.write = fail  # type: ignore[method-assign]
        return writer


async def test_parallel_large_uploads_failing_together_leave_no_unretrieved_error(tmp_path: Path) -> None:
    """Only the first failure is raised; the others are collected, not logged as 'never retrieved'."""
    root = tmp_path / "two-large"
    root.mkdir()
    for name in ("a", "b", "c"):
        (root / name).write_bytes(blake3.blake3(name.encode()).digest(length=2 * upload_module.SMALL_BLOB))
    unhandled: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    try:

        async def failing_import() -> str:
            try:
                await ingest_path(root, _FailingWrites(), MemoryDirectoryService(SizeRule.TVIX))
            except StorageError as e:
                return str(e)  # the traceback (and the tasks its frames hold) is dropped here
            return "no error"

        assert await failing_import() == "object store unreachable"
        await asyncio.sleep(0.5)
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert unhandled == []


class _FailingBatches(MemoryBlobService):
    """Batches of small files fail after a moment, while the walk has queued more behind them."""

    async def put_many(self, blobs: Sequence[bytes]) -> list[B3Digest]:
        await asyncio.sleep(0.2)
        raise StorageError("object store unreachable")


async def test_a_failing_upload_with_batches_queued_ends_the_import(tmp_path: Path) -> None:
    root = tmp_path / "many"
    root.mkdir()
    for i in range(4 * upload_module.BATCH_FILES):
        (root / str(i)).write_bytes(b"%d" % i)
    with pytest.raises(StorageError, match="unreachable"):
        await asyncio.wait_for(ingest_path(root, _FailingBatches(), MemoryDirectoryService(SizeRule.TVIX)), timeout=60)


class _Touching:
    """A walk observer that rewrites a large file (same size) right after the walk saw it."""

    def __init__(self, victim: Path) -> None:
        self.victim = os.fsencode(victim)

    def directory(self, name: bytes | None) -> None:
        pass

    def leave(self) -> None:
        pass

    def symlink(self, name: bytes | None, target: bytes) -> None:
        pass

    def file(
        self, name: bytes | None, executable: bool, size: int, data: bytes | None, fs_path: bytes, stamp: Any
    ) -> None:
        if fs_path == self.victim:
            with open(fs_path, "r+b") as f:
                f.write(b"!")  # same size, other bytes: only the stamp (mtime, ctime) tells


async def test_a_large_file_changed_after_the_walk_saw_it_fails_the_import(stores: Stores, src: Path) -> None:
    big = src / "big"
    big.write_bytes(os.urandom(upload_module.SMALL_BLOB + 1))
    (src / "small").write_bytes(b"small")
    with pytest.raises(IngestError, match="big: changed while being imported"):
        await ingest_path(src, stores.blobs, stores.directories, observer=_Touching(big))


async def test_nar_hasher_hashes_what_nix_hashes(tmp_path: Path) -> None:
    """The NAR hashed during the walk equals the NAR rendered from the store (small, large, symlink, exec)."""
    from nixcas.store.nar.hashing import NarHasher
    from nixcas.store.nar.render import nar_size_sha256

    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "big").write_bytes(os.urandom(upload_module.SMALL_BLOB * 3 + 5))
    (tree / "a").write_bytes(b"a\n")
    (tree / "x").write_bytes(b"#!/bin/sh\n")
    (tree / "x").chmod(0o755)
    (tree / "link").symlink_to("a")
    (tree / "empty").mkdir()
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX)
    for root in (tree, tree / "sub" / "big", tree / "link"):
        hasher = NarHasher(budget=1)  # the smallest budget: the walker waits for the hasher at every file
        try:
            node = await ingest_path(root, blobs, dirs, observer=hasher)
            got = await asyncio.to_thread(hasher.result)
        finally:
            hasher.close()
        assert got == await nar_size_sha256(node, blobs, dirs)


def test_a_small_file_is_read_in_one_call_and_a_changed_size_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small file of the size the walk saw is one read (size + 1 asked, size got: the end); a file that
    grew or shrank since the walk saw it is refused."""
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    reads: list[int] = []
    real_read = os.read

    def counting_read(fd: int, n: int) -> bytes:
        reads.append(n)
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", counting_read)
    assert walk_module.read_small(os.fsencode(path), 10) == b"0123456789"
    assert reads == [11]
    with pytest.raises(IngestError, match="changed while being imported"):
        walk_module.read_small(os.fsencode(path), 9)  # it grew
    with pytest.raises(IngestError, match="changed while being imported"):
        walk_module.read_small(os.fsencode(path), 11)  # it shrank

"""Materializing trees: ``nixcas export`` / ``nixcas castore export`` and :func:`nixcas.castore.export.export_node`."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import blake3
import pytest
import zstandard

from nixcas.api import Store
from nixcas.castore import export as ex
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.export import ExportError, export_node, window
from nixcas.castore.export.base import FILE, MKDIR
from nixcas.castore.export.plan import Plan
from nixcas.castore.export.writer import Writer
from nixcas.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from nixcas.castore.sizerule import SizeRule
from nixcas.errors import ChecksumMismatch, InvalidNameError, InvalidSymlinkTargetError, NotFoundError
from nixcas.testing import packed
from nixcas.testing.nix import NIX_STORE, fixed_tree, needs_nix, run_nix

T = TypeVar("T")

RULE = SizeRule.TVIX  # the tests' stores follow the rule conftest asks for


def run(fn: Callable[[Store], Awaitable[T]], store_dir: Path) -> T:
    async def go() -> T:
        async with await Store.open(store_dir) as store:
            return await fn(store)

    return asyncio.run(go())


def ingest(tree: Path, store_dir: Path) -> Node:
    return run(lambda store: store.ingest(tree), store_dir)


def export(node: Node, dest: Path, store_dir: Path, **kwargs: object) -> ex.ExportStats:
    return run(lambda store: export_node(node, dest, store.blobs, store.directories, **kwargs), store_dir)  # type: ignore[arg-type]


def describe(root: Path) -> dict[str, tuple[str, object]]:
    """Every entry below ``root`` (and ``root`` itself as ""): kind and contents, exec bit, or target."""
    out: dict[str, tuple[str, object]] = {}

    def one(path: Path, rel: str) -> None:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("symlink", os.readlink(path))
        elif stat.S_ISREG(st.st_mode):
            out[rel] = ("exe" if st.st_mode & 0o100 else "file", path.read_bytes())
        else:
            assert stat.S_ISDIR(st.st_mode), path
            out[rel] = ("dir", None)
            for entry in sorted(os.listdir(path)):
                one(path / entry, f"{rel}/{entry}")

    one(root, "")
    return out


def nothing_left(parent: Path, before: set[str]) -> None:
    """No destination and no staging directory was left in ``parent``."""
    assert set(os.listdir(parent)) == before


def cli(*args: str) -> int:
    """``nixcas ARGS`` in this process (the command's own error handling included); its exit code."""
    from nixcas.cli.app import cli as app

    try:
        app.main(list(args), prog_name="nixcas", standalone_mode=False)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


def test_round_trip_equals_the_tree_and_its_nar(tmp_path: Path) -> None:
    tree = fixed_tree(tmp_path / "tree")
    (tmp_path / "tree" / "share" / "doc" / "README").chmod(0o644)
    store = tmp_path / "store"
    node = ingest(tree, store)
    dest = tmp_path / "out"
    # buffer_bytes=64 KiB: "big" (1.28 MB) streams through the verifying reader in blocks.
    stats = export(node, dest, store, buffer_bytes=64 << 10)
    assert describe(dest) == describe(tree)
    assert stats.files == 4 + 9 and stats.symlinks == 2 and stats.directories == 5 and stats.links == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.lstat(dest / "bin" / "hello").st_mode) == 0o777 & ~umask
    assert stat.S_IMODE(os.lstat(dest / "big").st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(os.lstat(dest).st_mode) == 0o777 & ~umask
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".nixcas-export-")]
    if NIX_STORE is not None:
        nar = run_nix([NIX_STORE, "--dump", str(tree)], tmp_path, binary=True)
        assert run_nix([NIX_STORE, "--dump", str(dest)], tmp_path, binary=True) == nar


@needs_nix
def test_cli_export_of_a_store_path_is_nix_store_restore(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tree = fixed_tree(tmp_path / "tree")
    store = ["--store-dir", str(tmp_path / "store")]
    assert cli(*store, "import", str(tree)) == 0
    store_path = capsys.readouterr().out.strip()
    assert cli(*store, "export", "--link", store_path, str(tmp_path / "ours")) == 0
    assert capsys.readouterr() == ("", "")
    assert NIX_STORE is not None
    nar = run_nix([NIX_STORE, "--dump", str(tree)], tmp_path, binary=True)
    subprocess.run([NIX_STORE, "--restore", str(tmp_path / "theirs")], input=nar, check=True)
    assert describe(tmp_path / "ours") == describe(tmp_path / "theirs")
    assert run_nix([NIX_STORE, "--dump", str(tmp_path / "ours")], tmp_path, binary=True) == nar
    assert cli(*store, "export", store_path, str(tmp_path / "ours")) == 1
    assert capsys.readouterr().err == f"nixcas: error: {tmp_path / 'ours'}: exists and is not empty " + (
        "(export writes a new path, or into an empty directory)\n"
    )
    missing = store_path[:11] + "0" * 32 + store_path[43:]
    assert cli(*store, "export", missing, str(tmp_path / "never")) == 1
    assert capsys.readouterr().err == f"nixcas: error: {missing}: not in the store\n"
    assert not (tmp_path / "never").exists()


def test_link_writes_each_blob_once_per_executable_bit(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    for name in ("a", "b", "d/c", "x", "d/y"):
        (tree / name).write_bytes(b"same contents\n" * 3)
    (tree / "x").chmod(0o755)
    (tree / "d" / "y").chmod(0o755)
    (tree / "other").write_bytes(b"other\n")
    (tree / "e1").touch()
    (tree / "d" / "e2").touch()
    store = tmp_path / "store"
    node = ingest(tree, store)
    stats = export(node, tmp_path / "out", store, link=True)
    out = tmp_path / "out"
    ino = {n: os.lstat(out / n).st_ino for n in ("a", "b", "d/c", "x", "d/y", "other", "e1", "d/e2")}
    assert ino["a"] == ino["b"] == ino["d/c"] and os.lstat(out / "a").st_nlink == 3
    assert ino["x"] == ino["d/y"] != ino["a"] and ino["other"] not in (ino["a"], ino["x"])
    assert ino["e1"] == ino["d/e2"]
    assert (stats.files, stats.links) == (4, 4)
    assert describe(out) == describe(tree)
    plain = tmp_path / "plain"
    export(node, plain, store)
    assert len({os.lstat(plain / n).st_ino for n in ("a", "b", "d/c")}) == 3


def test_destination_must_be_new_or_an_empty_directory(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(b"data")
    store = tmp_path / "store"
    node = ingest(tree, store)
    file_node = FileNode(B3Digest(blake3.blake3(b"data").digest()), 4)
    work = tmp_path / "work"
    work.mkdir()
    (work / "full").mkdir()
    (work / "full" / "keep").write_bytes(b"keep")
    (work / "file").write_bytes(b"keep")
    (work / "empty").mkdir()
    (work / "outside").mkdir()
    (work / "link").symlink_to("outside")
    before = set(os.listdir(work))
    for dest, root in (("full", node), ("file", node), ("link", node), ("empty", file_node), ("file", file_node)):
        with pytest.raises(ExportError, match="exists"):
            export(root, work / dest, store)
        nothing_left(work, before)
    assert (work / "full" / "keep").read_bytes() == b"keep" and os.listdir(work / "outside") == []
    assert (work / "file").read_bytes() == b"keep"
    export(node, work / "empty", store)  # an empty directory is replaced by a directory root
    assert describe(work / "empty") == describe(tree)
    with pytest.raises(ExportError, match="root directory"):
        export(node, Path("/"), store)


def test_a_directory_swapped_for_a_symlink_cannot_redirect_writes(tmp_path: Path) -> None:
    """The race the descriptors guard against, made deterministic: a directory already created is
    replaced by a symlink to elsewhere before its files are written."""
    blob = b"payload"
    inner = Directory({b"f": FileNode(B3Digest(blake3.blake3(blob).digest()), len(blob))})
    root = Directory({b"d": inner.node(RULE)})
    plan = Plan(root.node(RULE), {root.digest: root.to_proto(), inner.digest: inner.to_proto()}, link=False)
    ops = list(plan.ops())
    assert [op[0] for op in ops] == [MKDIR, MKDIR, FILE]
    staging = tmp_path / "staging"
    staging.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
    writer = Writer(plan, fd)
    try:
        writer.run(ops[:2], {})
        writer.close()  # forget the descriptors: the next write must look the directory up again
        os.rmdir(staging / "root" / "d")
        (staging / "root" / "d").symlink_to(outside)
        with pytest.raises(OSError, match=r"Not a directory|Too many levels of symbolic links"):
            writer.run(ops[2:], {B3Digest(blake3.blake3(blob).digest()): blob})
    finally:
        writer.close()
        os.close(fd)
    assert os.listdir(outside) == []


def test_a_name_that_is_not_one_component_is_refused() -> None:
    """Directory services refuse such names when they decode; the export checks each name again itself."""
    digest = B3Digest(blake3.blake3(b"x").digest())
    for name in (b"../escaped", b"..", b"a/b", b"."):
        evil = Directory([(name, FileNode(digest, 1))], _names_checked=True)
        plan = Plan(evil.node(RULE), {evil.digest: evil.to_proto()}, link=False)
        with pytest.raises(InvalidNameError):
            list(plan.ops())
    from nixcas.castore.proto import pb

    bad = pb.Directory(symlinks=[pb.SymlinkNode(name=b"l", target=b"a\0b")])
    with pytest.raises(InvalidSymlinkTargetError):
        list(Plan(DirectoryNode(digest, 1), {digest: bad}, link=False).ops())


def test_a_corrupt_small_blob_fails_and_leaves_nothing(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(5):
        (tree / f"f{i}").write_bytes(b"file %d\n" % i)
    store = tmp_path / "store"
    node = ingest(tree, store)
    digest = blake3.blake3(b"file 3\n").digest()
    assert packed.corrupt_blob(store / "blobs", digest, b"file 9\n", compress=False)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(ChecksumMismatch, match=digest.hex()):
        export(node, work / "out", store)
    nothing_left(work, set())


def test_a_corrupt_large_blob_is_detected_after_streaming_and_removed(tmp_path: Path) -> None:
    """A backend whose reader checks only at the end: the bytes were written, then the export is removed."""
    good = os.urandom(300_000)
    digest = B3Digest(blake3.blake3(good).digest())
    entries: dict[bytes, Node] = {b"sub": Directory().node(RULE), b"z-big": FileNode(digest, len(good))}
    root = Directory(entries)
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService(RULE)

    async def go() -> None:
        await blobs.put(good)
        await dirs.put(Directory())
        await dirs.put(root)
        blobs._blobs[digest] = good[:-1] + bytes([good[-1] ^ 1])
        await export_node(root.node(RULE), tmp_path / "out", blobs, dirs, buffer_bytes=64 << 10)

    with pytest.raises(ChecksumMismatch, match=digest.hex()):
        asyncio.run(go())
    assert os.listdir(tmp_path) == []


def test_a_missing_blob_is_named_with_its_path(tmp_path: Path) -> None:
    digest = B3Digest(blake3.blake3(b"never stored").digest())
    inner = Directory({b"gone": FileNode(digest, 12)})
    root = Directory({b"dir": inner.node(RULE)})
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService(RULE)

    async def go(buffer: int) -> None:
        await dirs.put(inner)
        await dirs.put(root)
        await export_node(root.node(RULE), tmp_path / "out", blobs, dirs, buffer_bytes=buffer)

    for buffer in (64 << 20, 16):  # read in a batch, and streamed
        with pytest.raises(NotFoundError, match=f"blob {digest.hex()} not found .needed at /dir/gone"):
            asyncio.run(go(buffer))
        assert os.listdir(tmp_path) == []


def test_file_and_symlink_roots(tmp_path: Path) -> None:
    data = b"#!/bin/sh\n"
    digest = B3Digest(blake3.blake3(data).digest())
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService(RULE)

    async def go() -> None:
        await blobs.put(data)
        await export_node(FileNode(digest, len(data), True), tmp_path / "exe", blobs, dirs)
        await export_node(SymlinkNode(b"../some/where"), tmp_path / "link", blobs, dirs)

    asyncio.run(go())
    assert (tmp_path / "exe").read_bytes() == data and os.access(tmp_path / "exe", os.X_OK)
    assert os.readlink(tmp_path / "link") == "../some/where"
    assert sorted(os.listdir(tmp_path)) == ["exe", "link"]


def test_cli_castore_export_of_digests_and_nodes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(b"hello\n")
    (tree / "l").symlink_to("f")
    store = tmp_path / "store"
    root = ingest(tree, store)
    assert isinstance(root, DirectoryNode)
    blob = blake3.blake3(b"hello\n").hexdigest()
    given = ["--store-dir", str(store), "castore", "export"]
    assert cli(*given, root.digest.hex(), str(tmp_path / "d")) == 0
    assert cli(*given, "--executable", blob, str(tmp_path / "x")) == 0
    assert cli(*given, json.dumps({"type": "symlink", "target": "f"}), str(tmp_path / "s")) == 0
    node = json.dumps({"type": "file", "digest": blob, "size": 6, "executable": True})
    assert cli(*given, "--link", node, str(tmp_path / "y")) == 0
    assert capsys.readouterr() == ("", "")
    assert describe(tmp_path / "d") == describe(tree)
    for exe in ("x", "y"):
        assert (tmp_path / exe).read_bytes() == b"hello\n" and os.access(tmp_path / exe, os.X_OK)
    assert os.readlink(tmp_path / "s") == "f"
    missing = "00" * 32
    assert cli(*given, missing, str(tmp_path / "m")) == 1
    assert capsys.readouterr().err == f"nixcas: error: {missing}: neither a directory nor a blob in the store\n"
    assert cli(*given, "--executable", root.digest.hex(), str(tmp_path / "m")) == 1
    assert "applies to a blob root only" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_large_files_read_whole_or_chunk_by_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through BulkReads: whole up to an eighth of the buffer budget, chunk by chunk above; same bytes."""
    from nixcas.castore.blob.local import LocalBlobService

    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "big").write_bytes(os.urandom(3 << 20))
    (tree / "mid").write_bytes(os.urandom(600_000))  # above run_max: one read_whole in its batch
    store = tmp_path / "store"
    node = ingest(tree, store)
    calls: list[str] = []

    def spy(name: str) -> None:
        method = getattr(LocalBlobService, name)

        def counted(self: LocalBlobService, digest: bytes, size: int, *rest: object) -> object:
            calls.append(f"{name} {size}")
            return method(self, digest, size, *rest)

        monkeypatch.setattr(LocalBlobService, name, counted)

    spy("read_whole")
    spy("read_chunks")
    export(node, tmp_path / "whole", store)
    assert describe(tmp_path / "whole") == describe(tree)
    assert sorted(calls) == [f"read_whole {3 << 20}", "read_whole 600000"]
    calls.clear()
    export(node, tmp_path / "chunks", store, buffer_bytes=8 << 20)  # big files read whole up to 1 MiB
    assert describe(tmp_path / "chunks") == describe(tree)
    assert sorted(calls) == [f"read_chunks {3 << 20}", "read_whole 600000"]


@pytest.mark.parametrize("buffer_bytes", [64 << 20, 8 << 20])  # read whole (fails), then by chunks; by chunks
def test_a_corrupt_chunk_of_a_large_blob_fails_and_leaves_nothing(tmp_path: Path, buffer_bytes: int) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "big").write_bytes(os.urandom(3 << 20))  # chunked by the embedded store
    store = tmp_path / "store"
    node = ingest(tree, store)
    chunks = sorted(p for p in (store / "blobs" / "chunks").rglob("*") if p.is_file())
    assert len(chunks) > 1
    victim = chunks[len(chunks) // 2]
    size = len(zstandard.ZstdDecompressor().decompress(victim.read_bytes()))
    victim.write_bytes(zstandard.ZstdCompressor().compress(b"\0" * size))
    work = tmp_path / "work"
    work.mkdir()
    assert isinstance(node, DirectoryNode)
    big = run(lambda s: s.get_directory(node.digest), store).get(b"big")
    assert isinstance(big, FileNode)
    with pytest.raises(ChecksumMismatch, match=f"blob {big.digest.hex()}"):
        export(node, work / "out", store, buffer_bytes=buffer_bytes)
    nothing_left(work, set())


def test_cancelled_export_removes_everything_and_closes_its_files(tmp_path: Path) -> None:
    """Cancelled while the writer thread waits for a batch and a large file streams: nothing stays open or behind."""
    small, big = b"small file\n", os.urandom(100_000)
    entries: dict[bytes, Node] = {
        b"a-big": FileNode(B3Digest(blake3.blake3(big).digest()), len(big)),
        b"b-dir": Directory().node(RULE),
        b"c-small": FileNode(B3Digest(blake3.blake3(small).digest()), len(small)),
    }
    root = Directory(entries)
    started = asyncio.Event()

    class Stalling(MemoryBlobService):
        async def read_many(self, max_sizes: object, *, parallel: int = 8) -> dict[B3Digest, bytes]:
            started.set()
            await asyncio.Event().wait()  # never
            raise AssertionError

    blobs, dirs = Stalling(), MemoryDirectoryService(RULE)
    fds_before = len(os.listdir("/proc/self/fd"))

    async def go() -> None:
        await blobs.put(small)
        await blobs.put(big)
        await dirs.put(Directory())
        await dirs.put(root)
        task = asyncio.ensure_future(export_node(root.node(RULE), tmp_path / "out", blobs, dirs, buffer_bytes=64 << 10))
        await started.wait()
        assert [n for n in os.listdir(tmp_path) if n.startswith(".nixcas-export-")]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    assert os.listdir(tmp_path) == []
    assert len(os.listdir("/proc/self/fd")) == fds_before


@pytest.mark.parametrize("link", [False, True])
def test_many_small_batches_over_nested_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, link: bool
) -> None:
    """Batches of 3 files: the writers take turns, each batch's files land in directories made by earlier ones."""
    monkeypatch.setattr(window, "BATCH_FILES", 3)
    tree = tmp_path / "tree"
    for i in range(12):
        d = tree / f"d{i}" / "sub" / f"s{i % 3}"
        d.mkdir(parents=True)
        for j in range(5):
            (d / f"f{j}").write_bytes(b"%d %d\n" % (i, j % 3))
        (tree / f"d{i}" / "link").symlink_to("sub")
    store = tmp_path / "store"
    node = ingest(tree, store)
    stats = export(node, tmp_path / "out", store, link=link)
    assert describe(tmp_path / "out") == describe(tree)
    assert (stats.files, stats.links) == ((36, 24) if link else (60, 0))

"""The walk of an import in a process of its own (nixcas.castore.walkproc, nixcas.cli.prewalk)."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import blake3
import pytest

import nixcas.castore.walk as walk_module
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.ingest import ingest_path
from nixcas.castore.sizerule import SizeRule
from nixcas.castore.treepath import TreePath
from nixcas.castore.walk import SMALL_BLOB, FileItem, IngestEntry, Item
from nixcas.castore.walkproc import SLOTS, WalkProcess
from nixcas.cli import prewalk
from nixcas.composition import blob_service_from_url, directory_service_from_url
from nixcas.errors import DepthError, IngestError, StorageError
from nixcas.store.nar.hasher import NarHasher

Described = tuple[object, ...]


def describe(item: Item) -> Described:
    """What an item says, comparable across processes (paths as names, contents as bytes)."""
    path = item.path
    assert isinstance(path, TreePath)
    names = path.names()
    if isinstance(item, FileItem):
        data = None if item.data is None else bytes(item.data)
        return ("f", names, item.fs_path, item.size, item.executable, data, item.stamp)
    assert isinstance(item, IngestEntry)
    return ("e", names, item.node)


def in_process(root: Path) -> tuple[list[Described], object]:
    hasher = NarHasher()
    try:
        items = [
            describe(item)
            for batch in walk_module.walk(os.fsencode(root), TreePath(None, os.fsencode(root.name)), hasher)
            for item in batch
        ]
        return items, hasher.result()
    finally:
        hasher.close()


def in_child(root: Path) -> tuple[list[Described], object, list[FileItem]]:
    walker = WalkProcess.start(os.fsencode(root), NarHasher)
    try:
        items: list[Described] = []
        files: list[FileItem] = []
        while (handed := walker.next_batch()) is not None:
            slot, batch = handed
            for item in batch:
                items.append(describe(item))
                if isinstance(item, FileItem):
                    files.append(item)
            walker.release(slot)
        return items, walker.result(), files
    finally:
        walker.close()


def make_tree(base: Path) -> Path:
    root = base / "tree"
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "a" / "b" / "c" / "deep").write_bytes(b"deep\n")
    (root / "a" / "small").write_bytes(b"x" * 1000)
    (root / "a" / "nothing").write_bytes(b"")
    (root / "exe").write_bytes(b"#!/bin/sh\n")
    (root / "exe").chmod(0o755)
    (root / "big").write_bytes(os.urandom(SMALL_BLOB + 17))
    (root / "link").symlink_to("a/small")
    (root / "many").mkdir()
    for i in range(3000):  # more than one batch
        (root / "many" / f"f{i:04}").write_bytes(os.urandom(i % 700))
    return root


def test_the_child_yields_what_the_walk_yields_in_process(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    expected, expected_nar = in_process(root)
    got, nar, files = in_child(root)
    assert got == expected
    assert nar == expected_nar
    for item in files:  # each small file's digest is the BLAKE3 of the bytes handed over; none for large ones
        if item.data is None:
            assert item.digest is None and item.size > SMALL_BLOB
        else:
            assert item.digest == blake3.blake3(item.data).digest()


@pytest.mark.parametrize("kind", ["file", "symlink", "empty directory"])
def test_a_root_that_is_not_a_tree(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "root"
    if kind == "file":
        root.write_bytes(b"only")
    elif kind == "symlink":
        root.symlink_to("elsewhere")
    else:
        root.mkdir()
    expected, expected_nar = in_process(root)
    got, nar, _ = in_child(root)
    assert got == expected and nar == expected_nar


def walk_error(root: Path, walker: WalkProcess | None = None) -> BaseException:
    """The error the walk of ``root`` ends with (by ``walker``, if given)."""
    walker = walker or WalkProcess.start(os.fsencode(root), NarHasher)
    try:
        while (handed := walker.next_batch()) is not None:
            walker.release(handed[0])
    except Exception as e:
        return e
    finally:
        walker.close()
    raise AssertionError("the walk did not fail")


def test_errors_are_the_walks_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_tree(tmp_path)
    os.mkfifo(root / "a" / "fifo")
    error = walk_error(root)
    assert type(error) is IngestError
    assert str(error) == f"{root / 'a' / 'fifo'}: cannot import a FIFO"

    missing = walk_error(tmp_path / "missing")
    assert type(missing) is IngestError and str(missing).startswith(f"{tmp_path / 'missing'}: cannot stat")

    monkeypatch.setattr(walk_module, "MAX_DEPTH", 2)  # the child is a copy of this process
    deep = walk_error(root)
    assert type(deep) is DepthError and "tree/a/b/c: nested deeper than the 2 levels" in str(deep)


def test_the_child_waits_for_its_slots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(walk_module, "BATCH_BYTES", 1000)  # the child is a copy of this process: a file a batch
    root = tmp_path / "tree"
    root.mkdir()
    for i in range(SLOTS + 3):
        (root / f"f{i}").write_bytes(os.urandom(1000))
    walker = WalkProcess.start(os.fsencode(root))
    try:
        held = [walker.next_batch() for _ in range(SLOTS)]
        slots = [h[0] for h in held if h is not None]
        assert sorted(slots) == list(range(SLOTS))
        # every slot is held: the child has read the next file but cannot hand it over
        ready, _, _ = select.select([walker._messages], [], [], 0.5)
        assert ready == []
        walker.release(slots[0])
        following = walker.next_batch()
        assert following is not None and following[0] == slots[0]
        assert bytes(following[1][0].data) == (root / f"f{SLOTS}").read_bytes()  # type: ignore[union-attr, arg-type]
    finally:
        walker.close()


def test_close_stops_the_child_at_once(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    walker = WalkProcess.start(os.fsencode(root), NarHasher)
    pid = walker._pid
    assert walker.next_batch() is not None  # and never released: the child may be blocked
    walker.close()
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped: no zombie left


def test_a_killed_child_is_an_error_naming_it(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    walker = WalkProcess.start(os.fsencode(root), NarHasher)
    os.kill(walker._pid, signal.SIGKILL)
    error = walk_error(root, walker)
    assert type(error) is IngestError
    assert str(error) == f"walking {root}: the walking process was killed by signal 9"


@pytest.mark.parametrize("blob_url", ["packed://{tmp}/blobs", "memory://"], ids=["views", "copies"])
async def test_an_ingest_from_the_child_stores_what_an_ingest_in_process_stores(tmp_path: Path, blob_url: str) -> None:
    root = make_tree(tmp_path)
    (root / "mid").write_bytes(os.urandom(SMALL_BLOB - 5))  # chunked by the packed store, not packed
    expected_blobs, expected_dirs = MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX)
    expected = await ingest_path(root, expected_blobs, expected_dirs)
    blobs = await blob_service_from_url(blob_url.format(tmp=tmp_path / "store"))
    dirs = await directory_service_from_url(f"sqlite://{tmp_path / 'dirs.sqlite'}")
    try:
        walker = WalkProcess.start(os.fsencode(root), NarHasher)
        node = await ingest_path(root, blobs, dirs, walker=walker)
        assert node == expected
        nar = walker.result()
        hasher = NarHasher()
        try:
            await ingest_path(root, MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX), observer=hasher)
            assert nar == await asyncio.to_thread(hasher.result)
        finally:
            hasher.close()
        for digest in expected_blobs._blobs:
            assert await blobs.read(B3Digest(digest)) == expected_blobs._blobs[digest]
        if blob_url.startswith("packed"):  # a blob too large for a pack is chunked, as put_many would
            mid = blake3.blake3((root / "mid").read_bytes()).digest()
            with sqlite3.connect(tmp_path / "store" / "blobs" / "packs.sqlite") as db:
                assert db.execute("SELECT 1 FROM blobs WHERE digest = ?", (mid,)).fetchone() is None
            assert await blobs.has(B3Digest(mid))
        assert [d.digest async for d in dirs.get_recursive(node.digest)] == [  # type: ignore[union-attr]
            d.digest
            async for d in expected_dirs.get_recursive(node.digest)  # type: ignore[union-attr]
        ]
    finally:
        await dirs.close()
        await blobs.close()


async def test_a_wrong_given_digest_is_refused_where_it_is_checked(tmp_path: Path) -> None:
    blobs = MemoryBlobService()
    right = B3Digest(blake3.blake3(b"data").digest())
    assert await blobs.put_many_hashed([right], [b"data"]) == [right]
    with pytest.raises(StorageError, match="stored under others: a bug"):
        await blobs.put_many_hashed([B3Digest(bytes(32))], [b"data"])
    packed = await blob_service_from_url(f"packed://{tmp_path}/blobs")
    try:
        large = os.urandom(SMALL_BLOB - 5)  # chunked, hashed by the store in any case
        with pytest.raises(StorageError, match="stored under another digest: a bug"):
            await packed.put_many_hashed([B3Digest(bytes(32))], [large])
    finally:
        await packed.close()


@pytest.mark.parametrize(
    ("argv", "walked"),
    [
        (["import", "P"], "import"),
        (["import", "--json", "P"], "import"),
        (["--store-dir", "S", "import", "P"], "import"),
        (["--store-dir=S", "import", "P", "--json"], "import"),
        (["castore", "ingest", "P"], "ingest"),
        (["--store-dir", "S", "castore", "ingest", "--json", "P"], "ingest"),
        (["import", "P", "P"], None),  # several paths: walked in the importing process
        (["import", "P/"], None),  # named otherwise by the command
        (["import", "./P"], None),
        (["import", "missing"], None),  # click's error
        (["--log-level", "debug", "import", "P"], None),
        (["castore", "ingest", "--as", "tar", "P"], None),
        (["castore", "ingest", "P.tar"], None),  # perhaps an archive
        (["castore", "ls", "P"], None),
        (["import", "--json", "--json", "P"], None),
        (["import", "-P"], None),
    ],
)
def test_prewalk_recognizes_the_plain_forms_of_an_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str], walked: str | None
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "P").mkdir()
    (tmp_path / "P.tar").mkdir()
    assert prewalk.parse(argv) == (None if walked is None else (walked, b"P.tar" if "P.tar" in argv else b"P"))


@pytest.mark.parametrize("command", [["import"], ["castore", "ingest", "--json"]], ids=["import", "castore-ingest"])
def test_the_command_takes_the_walk_started_with_the_process(tmp_path: Path, command: list[str]) -> None:
    """`nixcas import PATH` forks its walk before click loads and uses it: the same output as without."""
    root = make_tree(tmp_path)
    script = (
        "import sys, nixcas.castore.walkproc as w\n"
        "started = []\n"
        "real = w.WalkProcess.start.__func__\n"
        "w.WalkProcess.start = classmethod(lambda cls, *a: started.append(a[0]) or real(cls, *a))\n"
        "import nixcas.cli.prewalk as p\n"
        "import atexit\n"
        "atexit.register(lambda: print('walked', started, 'left', list(p._started), file=sys.stderr))\n"
        "from nixcas.cli.main import main\n"
        "main()\n"
    )
    outputs = []
    for prewalk_env in ("1", "0"):
        store = tmp_path / f"store{prewalk_env}"
        env = {**os.environ, prewalk.ENV: prewalk_env}
        done = subprocess.run(
            [sys.executable, "-c", script, "--store-dir", str(store), *command, str(root)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        walked = [os.fsencode(root)] if prewalk_env == "1" else []
        assert done.stderr.strip() == f"walked {walked} left []"
        outputs.append(done.stdout)
    assert outputs[0] == outputs[1] and outputs[0].startswith("/nix/store/" if command == ["import"] else "{")


def test_an_interrupted_import_leaves_no_walking_process(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    for i in range(400):
        (root / f"f{i}").write_bytes(os.urandom(SMALL_BLOB))
    proc = subprocess.Popen(
        [sys.executable, "-m", "nixcas.cli.main", "--store-dir", str(tmp_path / "s"), "import", str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, the walking process in it
    )
    time.sleep(0.25)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: to the whole group
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError("a process of the import's group is still running")


def test_without_a_process_to_spare_the_command_walks_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "P").mkdir()
    monkeypatch.chdir(tmp_path)

    def no_fork() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    prewalk.start(["import", "P"])
    assert prewalk.take("P") is None


def test_a_slot_holds_any_batch_of_the_walk() -> None:
    from nixcas.castore import walkproc

    assert walkproc.SLOT_BYTES == walk_module.BATCH_BYTES + walk_module.SMALL_BLOB


def test_nothing_but_the_walk_process_module_is_loaded_before_the_fork(tmp_path: Path) -> None:
    """The earlier the fork, the earlier the walk: no click, asyncio, walk or data model before it."""
    (tmp_path / "P").mkdir()
    script = (
        "import os, sys\n"
        "real = os.fork\n"
        "def fork():\n"
        "    print(sorted(m for m in sys.modules if m.startswith(('nixcas', 'asyncio', 'click', 'blake3'))),"
        " file=sys.stderr, flush=True)\n"
        "    return real()\n"
        "os.fork = fork\n"
        "from nixcas.cli.main import main\n"
        "main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, "--store-dir", str(tmp_path / "s"), "import", "P"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    loaded = done.stderr.splitlines()[0]
    assert loaded == str(
        [
            "nixcas",
            "nixcas._lazy",
            "nixcas.castore",
            "nixcas.castore.walkproc",
            "nixcas.cli",
            "nixcas.cli.main",
            "nixcas.cli.prewalk",
        ]
    )

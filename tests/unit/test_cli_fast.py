"""The read-only fast path (nixcas.cli.fast) answers exactly as the full command line does.

Each case runs in this process twice on the same store: through the full
(click) command line alone, and as the console script does (the fast path,
falling back to the full command line when it does not answer).  Standard
output, standard error and the exit status must be the same; the cases also
say which ones the fast path answers itself.
"""

from __future__ import annotations

import base64
import sqlite3
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nixcas.castore.digest import EMPTY_DIGEST
from nixcas.castore.nodes import DirectoryNode, FileNode
from nixcas.cli import fast
from nixcas.cli.main import _main

ENV = ("NIXCAS_STORE_DIR", *fast.SERVICE_ENV, "PIN_SERVICE_ADDR")


@dataclass
class Store:
    dir: Path
    tree: str
    """The store path of the tree."""
    root: str
    """The tree's root directory digest (hex)."""
    blob: str
    """A small file's blob digest (hex)."""
    sub: str
    """The sub-directory's digest."""
    odd: str
    """A directory holding a name with an ANSI escape."""
    big: str
    """A blob too large for a pack file (kept in the object layout)."""


Outcome = tuple[bytes, bytes, int]


def full(argv: list[str], capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch) -> Outcome:
    """``nixcas ARGV`` through click alone: (stdout, stderr, exit status)."""
    monkeypatch.setattr(sys, "argv", ["nixcas", *argv])
    code: object = 0
    try:
        _main()
    except SystemExit as e:
        code = e.code
    out, err = capsysbinary.readouterr()
    return out, err, code if isinstance(code, int) else (0 if code is None else 1)


def console(
    argv: list[str], capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch
) -> tuple[Outcome, bool]:
    """``nixcas ARGV`` as the console script runs it: the outcome, and whether the fast path answered."""
    code = fast.answer(argv)
    if code is None:
        out, err = capsysbinary.readouterr()
        assert (out, err) == (b"", b""), "the fast path wrote before falling back"
        return full(argv, capsysbinary, monkeypatch), False
    out, err = capsysbinary.readouterr()
    return (out, err, code), True


@pytest.fixture(scope="module")
def known(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """An embedded store with a tree imported as a store path and a directory with an odd name (by the library)."""
    import asyncio

    from nixcas.api import Store as Opened
    from nixcas.cli.store import services
    from nixcas.store.importer import import_path

    root = tmp_path_factory.mktemp("fast")
    tree = root / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_bytes(b"hello\n" * 50)
    (tree / "run").write_bytes(b"#!/bin/sh\n")
    (tree / "run").chmod(0o755)
    (tree / "sub" / "b.txt").write_bytes(b"world\n")
    (tree / "sub2").mkdir()
    (tree / "sub2" / "c.txt").write_bytes(b"again\n")
    (tree / "sub2" / "a-copy.txt").write_bytes(b"hello\n" * 50)  # a.txt again: read and checked once per dump
    (tree / "link").symlink_to("a.txt")
    (tree / "caf\u00e9").write_bytes(b"")
    (tree / "big").write_bytes(bytes(range(256)) * 1024)
    odd = root / "odd"
    odd.mkdir()
    (odd / "\x1b[31mred").write_bytes(b"x")
    store_dir = root / "store"

    async def build() -> Store:
        async with await Opened.open(store_dir, with_pathinfo=True) as opened:
            info = await import_path(tree, services(opened))
            odd_root = await opened.ingest(odd)
            assert isinstance(info.node, DirectoryNode) and isinstance(odd_root, DirectoryNode)
            directory = await opened.get_directory(info.node.digest)
            a, sub, big = directory.get(b"a.txt"), directory.get(b"sub"), directory.get(b"big")
            assert isinstance(a, FileNode) and isinstance(sub, DirectoryNode) and isinstance(big, FileNode)
            return Store(
                store_dir, str(info.store_path), info.node.digest.hex(), a.digest.hex(), sub.digest.hex(),
                odd_root.digest.hex(), big.digest.hex(),
            )  # fmt: skip

    return asyncio.run(build())


@pytest.fixture(autouse=True)
def no_service_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def same(
    argv: list[str], capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch
) -> tuple[Outcome, bool]:
    """Run ``argv`` both ways; assert the outcomes are equal; return it and whether the fast path answered."""
    reference = full(argv, capsysbinary, monkeypatch)
    outcome, answered = console(argv, capsysbinary, monkeypatch)
    assert outcome == reference, argv
    return outcome, answered


def cases(s: Store) -> list[tuple[list[str], bool, int]]:
    """(argv, answered by the fast path, exit status)."""
    d = ["--store-dir", str(s.dir)]
    missing_path = "/nix/store/" + "1" * 32 + "-nothing"
    renamed = s.tree.rsplit("-", 1)[0] + "-renamed"
    zeros = "0" * 64
    return [
        # answered by the fast path
        ([*d, "path-info", s.tree], True, 0),
        ([*d, "path-info", "--json", s.tree], True, 0),
        ([*d, "path-info", s.tree.removeprefix("/nix/store/"), "--json"], True, 0),
        ([f"--store-dir={s.dir}", "path-info", s.tree], True, 0),
        ([*d, "castore", "ls", s.root], True, 0),
        ([*d, "castore", "ls", "--json", s.root], True, 0),
        ([*d, "castore", "ls", s.sub, "--json"], True, 0),
        ([*d, "castore", "ls", "b3:" + base64.b64encode(bytes.fromhex(s.root)).decode()], True, 0),
        ([*d, "castore", "cat", s.blob], True, 0),
        ([*d, "castore", "cat", f"  {s.blob.upper()} "], True, 0),
        ([*d, "castore", "cat", EMPTY_DIGEST.hex()], True, 0),  # the empty file's blob
        # not found: the full path reports it
        ([*d, "path-info", missing_path], False, 1),
        ([*d, "path-info", renamed], False, 1),
        ([*d, "castore", "ls", zeros], False, 1),
        ([*d, "castore", "ls", s.blob], False, 1),
        ([*d, "castore", "cat", zeros], False, 1),
        ([*d, "castore", "cat", s.root], False, 1),
        ([*d, "castore", "cat", s.big], False, 0),  # not in a pack: the blob service reads it
        # bad input and other forms: click's
        ([*d, "path-info", "not-a-store-path"], False, 2),
        ([*d, "path-info", "/nix/store/short"], False, 2),
        ([*d, "path-info"], False, 2),
        ([*d, "path-info", s.tree, s.tree], False, 2),
        ([*d, "path-info", "--json", "--json", s.tree], False, 0),
        ([*d, "path-info", "--bogus", s.tree], False, 2),
        ([*d, "castore", "ls", "xyz"], False, 2),
        ([*d, "castore", "ls", "--", s.root], False, 0),
        ([*d, "castore", "ls", "-r", s.root], False, 0),
        ([*d, "castore", "cat", "--json", s.blob], False, 2),
        ([*d, "castore", "cat", "--range", "0:3", s.blob], False, 0),
        ([*d, "castore", "cat", "b3:!!"], False, 2),
        ([*d, "castore", "ls", s.odd], False, 0),  # an ANSI escape in a name: click strips it
        (["--store-dir", str(s.dir / "pathinfo.sqlite"), "path-info", s.tree], False, 2),  # a file
        (["--store-dir", "", "castore", "ls", s.root], False, 1),
        ([*d, "castore", "--help"], False, 0),
        ([*d, "path-info", "--help"], False, 0),
    ]


def test_fast_path_answers_as_the_full_command_line(
    known: Store, capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # `--store-dir ""` is the current directory: the full path makes a store there
    for argv, answered, code in cases(known):
        (out, err, status), fast_answered = same(argv, capsysbinary, monkeypatch)
        assert (fast_answered, status) == (answered, code), (argv, err)
        if answered:
            assert (bool(out), err) == (argv[-1] != EMPTY_DIGEST.hex(), b"")
        elif status:
            assert err.startswith((b"nixcas: error: ", b"Usage:")), (argv, err)
    listing = full(["--store-dir", str(known.dir), "castore", "ls", known.root], capsysbinary, monkeypatch)[0]
    kinds = [line.split()[0] for line in listing.decode().splitlines()]
    assert kinds == ["file", "file", "file", "symlink", "exe", "dir", "dir"]
    cat = full(["--store-dir", str(known.dir), "castore", "cat", known.blob], capsysbinary, monkeypatch)[0]
    assert cat == b"hello\n" * 50


def test_the_default_store_is_the_environments(
    known: Store, capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without --store-dir: $NIXCAS_STORE_DIR, else $XDG_DATA_HOME/nixcas, as the full path finds them."""
    monkeypatch.setenv("NIXCAS_STORE_DIR", str(known.dir))
    outcome, answered = same(["castore", "ls", known.root], capsysbinary, monkeypatch)
    assert answered and outcome[2] == 0
    monkeypatch.delenv("NIXCAS_STORE_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    (tmp_path / "nixcas").symlink_to(known.dir)
    outcome, answered = same(["path-info", known.tree], capsysbinary, monkeypatch)
    assert answered and outcome[0].startswith(f"StorePath: {known.tree}\n".encode())


@pytest.mark.parametrize("name", [*fast.SERVICE_ENV])
def test_another_service_in_the_environment_goes_to_click(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(name, "memory://")
    assert fast.parse(["castore", "cat", "0" * 64]) is None


def test_a_corrupt_blob_or_directory_is_refused_by_both(
    tmp_path: Path, known: Store, capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every byte is checked: a flipped bit in a pack file or a directory row is the full path's error, not output."""
    import shutil

    store_dir = tmp_path / "store"
    shutil.copytree(known.dir, store_dir)
    d = ["--store-dir", str(store_dir)]
    assert same([*d, "castore", "cat", known.blob], capsysbinary, monkeypatch)[1]
    for pack in (store_dir / "blobs" / "packs").iterdir():
        data = bytearray(pack.read_bytes())
        data[data.find(b"hello")] ^= 1
        pack.write_bytes(bytes(data))
    (out, err, code), answered = same([*d, "castore", "cat", known.blob], capsysbinary, monkeypatch)
    assert (out, code, answered) == (b"", 1, False)
    assert b"checksum mismatch" in err
    db = sqlite3.connect(store_dir / "directories.sqlite")
    with db:
        (data,) = db.execute("SELECT data FROM directories WHERE digest = ?", (bytes.fromhex(known.sub),)).fetchone()
        db.execute(
            "UPDATE directories SET data = ? WHERE digest = ?",
            (data.replace(b"b.txt", b"c.txt"), bytes.fromhex(known.sub)),
        )
    db.close()
    (out, err, code), answered = same([*d, "castore", "ls", known.sub], capsysbinary, monkeypatch)
    assert (out, code, answered) == (b"", 1, False)
    assert b"checksum mismatch" in err


def test_a_broken_pipe_is_quiet(known: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """As `run` does: the reader went away, so stdout is discarded and the status is 141."""

    class Closed:
        encoding = "utf-8"
        errors = "strict"

        def write(self, text: str) -> int:
            raise BrokenPipeError

        def flush(self) -> None:
            raise BrokenPipeError

    discarded: list[bool] = []
    monkeypatch.setattr(sys, "stdout", Closed())
    monkeypatch.setattr(fast, "discard_stdout", lambda: discarded.append(True))
    assert fast.answer(["--store-dir", str(known.dir), "path-info", known.tree]) == fast.EXIT_BROKEN_PIPE
    assert discarded == [True]


def test_a_size_rule_the_store_does_not_record_goes_to_click(
    known: Store, capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The full path refuses a store of the other rule: asked for it, the fast path answers only on a match."""
    from nixcas.castore.sizerule import SIZE_RULE_ENV

    recorded = sqlite3.connect(known.dir / "directories.sqlite").execute("SELECT value FROM meta").fetchone()[0]
    other = "snix" if recorded == "tvix" else "tvix"
    d = ["--store-dir", str(known.dir)]
    for argv in ([*d, "castore", "ls", known.root], [*d, "castore", "cat", known.blob]):
        monkeypatch.setenv(SIZE_RULE_ENV, recorded)
        assert same(argv, capsysbinary, monkeypatch)[1]
        monkeypatch.setenv(SIZE_RULE_ENV, other)
        (out, err, code), answered = same(argv, capsysbinary, monkeypatch)
        assert (out, code, answered) == (b"", 2, False)
        assert f"not the requested {other}".encode() in err


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("NIXCAS_LOG_FORMAT", "xml"),
        ("NIXCAS_LOG_LEVEL", "bogus"),
        ("NIXCAS_DIRECTORY_SIZE_RULE", "bogus"),
        ("NIXCAS_DIRECTORY_SIZE_RULE", "SNIX"),
    ],
)
def test_a_global_option_click_refuses_in_the_environment_goes_to_click(
    name: str, value: str, known: Store, capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(name, value)
    (out, _err, code), answered = same(
        ["--store-dir", str(known.dir), "path-info", known.tree], capsysbinary, monkeypatch
    )
    assert (out, code, answered) == (b"", 2, False)


# -- dump-path: the NAR written by the fast path, or by the full path after what the fast path wrote -----------


def full_fd(argv: list[str], capfdbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch) -> Outcome:
    """``nixcas ARGV`` through click alone, standard output and error captured at the descriptors."""
    monkeypatch.setattr(sys, "argv", ["nixcas", *argv])
    code: object = 0
    try:
        _main()
    except SystemExit as e:
        code = e.code
    out, err = capfdbinary.readouterr()
    return out, err, code if isinstance(code, int) else (0 if code is None else 1)


def dump_both(
    argv: list[str], capfdbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch
) -> tuple[Outcome, bool]:
    """``dump-path`` through click alone, then as the console script runs it (the fast path, and the full path
    after whatever it wrote): the two outcomes must be equal; the outcome and whether the fast path answered."""
    monkeypatch.setattr(fast, "_dump_written", 0)
    reference = full_fd(argv, capfdbinary, monkeypatch)
    code = fast.answer(argv)
    out, err = capfdbinary.readouterr()
    if code is None:
        assert err == b""
        more, err, code = full_fd(argv, capfdbinary, monkeypatch)
        outcome, answered = (out + more, err, code), False
    else:
        outcome, answered = (out, err, code), True
    assert outcome == reference, argv
    return outcome, answered


def test_dump_path_answers_as_the_full_command_line(
    known: Store, capfdbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    d = ["--store-dir", str(known.dir)]
    prefetched: list[int] = []
    prefetch = fast.StoredDirectories.prefetch

    def recorded(self: fast.StoredDirectories, digests: list[bytes]) -> None:
        prefetched.append(len(digests))
        prefetch(self, digests)

    monkeypatch.setattr(fast.StoredDirectories, "prefetch", recorded)
    (nar, err, code), answered = dump_both([*d, "dump-path", known.tree], capfdbinary, monkeypatch)
    assert (answered, code, err) == (True, 0, b"")
    assert prefetched == [2]  # sub and sub2, read with one query
    assert nar.startswith(b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1") and bytes(range(256)) * 1024 in nar
    missing = "/nix/store/" + "1" * 32 + "-nothing"
    for argv, status in (
        ([*d, "dump-path", missing], 1),
        ([*d, "dump-path", known.tree.rsplit("-", 1)[0] + "-renamed"], 1),
        ([*d, "dump-path", "not-a-store-path"], 2),
        ([*d, "dump-path"], 2),
        ([*d, "dump-path", known.tree, known.tree], 2),
        ([*d, "dump-path", "--json", known.tree], 2),
    ):
        (out, err, code), answered = dump_both(argv, capfdbinary, monkeypatch)
        assert (out, code, answered) == (b"", status, False), argv
        assert err.startswith((b"nixcas: error: ", b"Usage:")), (argv, err)


@pytest.mark.parametrize("damage", ["pack", "chunk", "directory"])
def test_dump_path_of_a_damaged_store_is_a_verified_prefix_and_the_full_paths_error(
    damage: str,
    tmp_path: Path,
    known: Store,
    capfdbinary: pytest.CaptureFixture[bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nothing unverified is written: the fast path stops before the damaged file, and the full path writes the
    rest of the same prefix and reports the error in its words (the output is the full path's, byte for byte)."""
    import shutil

    store_dir = tmp_path / "store"
    shutil.copytree(known.dir, store_dir)
    d = ["--store-dir", str(store_dir)]
    good, _ = dump_both([*d, "dump-path", known.tree], capfdbinary, monkeypatch)
    if damage == "pack":  # sub/b.txt, in the last run: the fast path has written everything up to it
        for pack in (store_dir / "blobs" / "packs").iterdir():
            data = bytearray(pack.read_bytes())
            data[data.find(b"world")] ^= 1
            pack.write_bytes(bytes(data))
    elif damage == "chunk":
        chunk = next(p for p in (store_dir / "blobs" / "chunks").rglob("*") if p.is_file())
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 1
        chunk.write_bytes(bytes(data))
    else:
        db = sqlite3.connect(store_dir / "directories.sqlite")
        with db:
            db.execute("UPDATE directories SET data = data || x'00' WHERE digest = ?", (bytes.fromhex(known.sub),))
        db.close()
    (out, err, code), answered = dump_both([*d, "dump-path", known.tree], capfdbinary, monkeypatch)
    assert (code, answered) == (1, False)
    assert good[0].startswith(out) and len(out) < len(good[0])
    assert err.startswith(b"nixcas: error: "), err
    if damage == "pack":
        assert fast.dump_written() > len(bytes(range(256)) * 1024)  # the fast path wrote up to the damaged file
    elif damage == "directory":
        assert fast.dump_written() == 0 and out == b""


def test_dump_path_with_a_copy_and_the_index_read_whole_stops_before_a_damaged_blob(
    tmp_path: Path, known: Store, capfdbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run holding a kept copy (a.txt again) and a damaged blob (sub/b.txt), its rows from one scan of the
    index: the fast path writes nothing of it, the full path writes up to the damaged file, one line, exit 1."""
    import shutil

    from nixcas.castore.blob import packfile

    monkeypatch.setattr(packfile, "_LOOKUPS_PER_PAGE", 0)  # the index is read whole, however few the blobs
    store_dir = tmp_path / "store"
    shutil.copytree(known.dir, store_dir)
    argv = ["--store-dir", str(store_dir), "dump-path", known.tree]
    (good, err, code), answered = dump_both(argv, capfdbinary, monkeypatch)
    assert (answered, code, err) == (True, 0, b"")
    assert good.count(b"hello\n" * 50) == 2
    for pack in (store_dir / "blobs" / "packs").iterdir():
        data = bytearray(pack.read_bytes())
        data[data.find(b"world")] ^= 1
        pack.write_bytes(bytes(data))
    (out, err, code), answered = dump_both(argv, capfdbinary, monkeypatch)
    assert (code, answered) == (1, False)
    assert out == good[: good.index(b"world\n")]  # everything before the damaged file's contents
    assert 0 < fast.dump_written() < len(out)  # the fast path wrote the runs before, none of this one
    assert err.startswith(b"nixcas: error: ") and err.count(b"\n") == 1, err


@pytest.mark.parametrize("damaged", [False, True], ids=["good", "damaged-directory"])
def test_dump_path_reads_a_small_directory_database_at_once(
    damaged: bool,
    tmp_path: Path,
    known: Store,
    capfdbinary: pytest.CaptureFixture[bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tree that is a good share of ``directories.sqlite``: its Directories come from one scan, not a query per
    directory, and each is still checked against its digest when the plan takes it."""
    import shutil

    import nixcas._sqlite

    store_dir = tmp_path / "store"
    shutil.copytree(known.dir, store_dir)
    argv = ["--store-dir", str(store_dir), "dump-path", known.tree]
    (good, _, _), _ = dump_both(argv, capfdbinary, monkeypatch)
    if damaged:
        db = sqlite3.connect(store_dir / "directories.sqlite")
        with db:
            db.execute("UPDATE directories SET data = data || x'00' WHERE digest = ?", (bytes.fromhex(known.sub),))
        db.close()
    monkeypatch.setattr(fast, "_ENTRIES_PER_PAGE", 0)  # the known tree is small: scan whatever its size
    queried: list[int] = []
    select_in = nixcas._sqlite.select_in

    def recorded(db: sqlite3.Connection, query: str, keys: Sequence[bytes]) -> Iterator[Any]:
        queried.append(len(keys))
        return select_in(db, query, keys)

    monkeypatch.setattr(nixcas._sqlite, "select_in", recorded)
    code = fast.answer(argv)
    out, err = capfdbinary.readouterr()
    assert not any(queried)  # every subdirectory was read ahead
    if damaged:
        assert (code, out, err) == (None, b"", b"")  # the full path reports it, nothing written
        monkeypatch.setattr(fast, "_ENTRIES_PER_PAGE", 10**9)  # (and the scan declined: the same outcome)
        (out, err, code), answered = dump_both(argv, capfdbinary, monkeypatch)
        assert (code, answered, out) == (1, False, b"") and err.startswith(b"nixcas: error: ")
    else:
        assert (code, out, err) == (0, good, b"")


def test_dump_path_loads_nothing_heavy(tmp_path: Path, known: Store) -> None:
    """No click, asyncio, protobuf, zstandard or typing for a NAR of pack rows and a chunked blob."""
    script = (
        "import atexit, sys\n"
        "out = sys.argv.pop(1)\n"
        "atexit.register(lambda: open(out, 'w').write('\\n'.join(sorted(sys.modules))))\n"
        "from nixcas.cli.main import main\n"
        "main()\n"
    )
    modules = tmp_path / "modules"
    nar = tmp_path / "nar"
    with nar.open("wb") as stdout:
        subprocess.run(
            [sys.executable, "-c", script, str(modules), "--store-dir", str(known.dir), "dump-path", known.tree],
            stdout=stdout,
            check=True,
            timeout=120,
        )
    assert bytes(range(256)) * 1024 in nar.read_bytes()
    tops = {m.split(".")[0] for m in modules.read_text().split("\n")}
    assert tops & {"asyncio", "click", "google", "grpc", "zstandard", "concurrent", "typing", "logging"} == set()


def test_leaving_after_a_fast_answer_runs_atexit_and_flushes() -> None:
    """A fast-path answer ends the process without finalizing the interpreter, but as ``sys.exit`` would end it:
    ``atexit`` functions run, buffered output is written, the status is the answer's."""
    script = (
        "import atexit, sys\n"
        "from nixcas.cli.main import leave\n"
        "atexit.register(lambda: sys.stdout.write(' and atexit'))\n"
        "sys.stdout.write('buffered')\n"
        "sys.stderr.write('error line')\n"
        "leave(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, check=False, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (3, b"buffered and atexit", b"error line")

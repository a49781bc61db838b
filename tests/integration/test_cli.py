"""The `nixcas` command line, run as a real subprocess."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import blake3
import pytest

from nixcas.testing import packed

EMPTY_HEX = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
COMPLICATED_HEX = "424a7f6ce08d805d15b428062faae96299a1675d708c3a39261afe38cdd04feb"


def nixcas(
    *args: str, store: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR")}
    full_env.update(env or {})
    prefix = ["--store-dir", str(store)] if store is not None else []
    return subprocess.run(
        [sys.executable, "-m", "nixcas.cli.main", *prefix, *args],
        capture_output=True,
        text=True,
        env=full_env,
        check=False,
    )


def make_complicated(root: Path) -> Path:
    tree = root / "complicated"
    (tree / "keep").mkdir(parents=True)
    (tree / "keep" / ".keep").touch()
    (tree / ".keep").touch()
    (tree / "aa").symlink_to("/nix/store/somewhereelse")
    return tree


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, fragment: str) -> None:
    assert result.returncode == code, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert fragment in lines[0]


def test_ingest_ls_cat_roundtrip(tmp_path: Path) -> None:
    store = tmp_path / "store"
    tree = make_complicated(tmp_path)
    (tree / "keep" / "data").write_bytes(b"Hello World!")
    result = nixcas("castore", "ingest", str(tree), "--json", store=store)
    assert result.returncode == 0, result.stderr
    root = json.loads(result.stdout)
    assert root["type"] == "directory" and root["size"] == 10

    listing = nixcas("castore", "ls", root["digest"], "--json", store=store)
    entries = [json.loads(line) for line in listing.stdout.splitlines()]
    assert [e["name"] for e in entries] == [".keep", "aa", "keep"]
    assert entries[1] == {"name": "aa", "type": "symlink", "target": "/nix/store/somewhereelse"}

    recursive = nixcas("castore", "ls", "-r", root["digest"], "--json", store=store)
    names = [json.loads(line)["name"] for line in recursive.stdout.splitlines()]
    assert names == [".keep", "aa", "keep", "keep/.keep", "keep/data"]
    data = next(json.loads(line) for line in recursive.stdout.splitlines() if "keep/data" in line)
    assert data["digest"] == blake3.blake3(b"Hello World!").hexdigest()

    cat = subprocess.run(
        [sys.executable, "-m", "nixcas.cli.main", "--store-dir", str(store), "castore", "cat", data["digest"]],
        capture_output=True,
        check=True,
    )
    assert cat.stdout == b"Hello World!"


def test_ingest_matches_the_complicated_vector_and_env_store_dir(tmp_path: Path) -> None:
    tree = make_complicated(tmp_path)
    result = nixcas("castore", "ingest", str(tree), "--json", env={"NIXCAS_STORE_DIR": str(tmp_path / "s")})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"type": "directory", "digest": COMPLICATED_HEX, "size": 8}
    assert (tmp_path / "s" / "directories.sqlite").exists()
    assert packed.has_row(tmp_path / "s" / "blobs", bytes.fromhex(EMPTY_HEX))  # small blobs are rows


def test_ingest_file_and_symlink_roots(tmp_path: Path) -> None:
    f = tmp_path / "tool"
    f.write_bytes(b"\x00\x01")
    f.chmod(0o755)
    link = tmp_path / "link"
    link.symlink_to("tool")
    file_out = json.loads(nixcas("castore", "ingest", str(f), "--json", store=tmp_path / "s").stdout)
    assert file_out == {
        "type": "file",
        "digest": "7b7015bb92cf0b318037702a6cdd81dee41224f734684c2c122cd6359cb1ee63",
        "size": 2,
        "executable": True,
    }
    assert json.loads(nixcas("castore", "ingest", str(link), "--json", store=tmp_path / "s").stdout) == {
        "type": "symlink",
        "target": "tool",
    }
    human = nixcas("castore", "ingest", str(f), store=tmp_path / "s")
    assert human.stdout.strip() == f"file {file_out['digest']} size=2 executable"


def test_ingest_tarball_equals_tree(tmp_path: Path) -> None:
    tree = make_complicated(tmp_path)
    archive = tmp_path / "c.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tree, arcname="complicated")
    out = nixcas("castore", "ingest", str(archive), "--json", store=tmp_path / "s")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["digest"] == COMPLICATED_HEX
    as_blob = nixcas("castore", "ingest", "--as", "path", str(archive), "--json", store=tmp_path / "s")
    assert json.loads(as_blob.stdout)["type"] == "file"


def test_service_addr_options(tmp_path: Path) -> None:
    tree = make_complicated(tmp_path)
    blobs = f"objectstore+file://{tmp_path / 'b'}"
    dirs = f"sqlite://{tmp_path / 'd.sqlite'}"
    out = nixcas("--blob-service-addr", blobs, "--directory-service-addr", dirs, "castore", "ingest", str(tree))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "d.sqlite").exists() and (tmp_path / "b" / "blobs").is_dir()
    via_env = nixcas("castore", "ls", COMPLICATED_HEX, env={"BLOB_SERVICE_ADDR": blobs, "DIRECTORY_SERVICE_ADDR": dirs})
    assert via_env.returncode == 0 and "keep" in via_env.stdout


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["castore", "ls", "abc"], 2, "cannot parse digest"),
        (["castore", "ls", "0" * 64], 1, "not found"),
        (["castore", "cat", "0" * 64], 1, "not found"),
        (["castore", "ingest", "/nonexistent/path"], 2, "no such file"),
        (["--blob-service-addr", "bogus://", "castore", "ls", "0" * 64], 2, "unknown type 'bogus'"),
        (["--directory-service-addr", "memory://x", "castore", "ls", "0" * 64], 2, "takes no host"),
    ],
)
def test_errors_are_one_line(tmp_path: Path, args: list[str], code: int, fragment: str) -> None:
    assert_one_line_error(nixcas(*args, store=tmp_path / "s"), code, fragment)


def test_special_file_is_refused_and_nothing_committed(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "ok").write_text("fine")
    os.mkfifo(tree / "pipe")
    result = nixcas("castore", "ingest", str(tree), store=tmp_path / "s")
    assert_one_line_error(result, 1, f"{tree / 'pipe'}: cannot import a FIFO")
    import sqlite3

    with sqlite3.connect(tmp_path / "s" / "directories.sqlite") as db:
        assert db.execute("SELECT count(*) FROM directories").fetchone() == (0,)


def test_corrupt_blob_is_detected_by_cat(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"precious data")
    digest = json.loads(nixcas("castore", "ingest", str(f), "--json", store=tmp_path / "s").stdout)["digest"]
    assert packed.corrupt_blob(tmp_path / "s" / "blobs", bytes.fromhex(digest), b"precious dat4")
    result = nixcas("castore", "cat", digest, store=tmp_path / "s")
    assert_one_line_error(result, 1, "checksum mismatch")


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_unreadable_input_as_unprivileged_user(kind: str, tmp_path: Path) -> None:
    """chmod 000 only bites without the DAC capabilities: as root, the CLI runs without them (setpriv)."""
    import shutil
    import sqlite3

    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and setpriv (util-linux) is missing: cannot drop CAP_DAC_*")
        drop = "-dac_override,-dac_read_search"
        prefix = [setpriv, f"--bounding-set={drop}", f"--inh-caps={drop}"]
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "ok").write_text("fine")
    bad = tree / "secret"
    if kind == "file":
        bad.write_text("hidden")
    else:
        bad.mkdir()
    bad.chmod(0)
    store = tmp_path / "store"
    try:
        result = subprocess.run(
            [
                *prefix,
                sys.executable,
                "-m",
                "nixcas.cli.main",
                "--store-dir",
                str(store),
                "castore",
                "ingest",
                str(tree),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        bad.chmod(0o700)
    assert_one_line_error(result, 1, f"{bad}: cannot")
    assert "Permission denied" in result.stderr
    with sqlite3.connect(store / "directories.sqlite") as db:
        assert db.execute("SELECT count(*) FROM directories").fetchone() == (0,)


@pytest.mark.parametrize(("command", "verb", "first"), [(("castore", "ingest"), b"ingesting", "directory "),
                                                         (("import",), b"importing", "/nix/store/")])  # fmt: skip
def test_progress_bar_on_a_terminal(tmp_path: Path, command: tuple[str, ...], verb: bytes, first: str) -> None:
    """With stderr on a terminal, ingest and import show files, bytes, rate and ETA there (stdout stays clean)."""
    import pty

    tree = make_complicated(tmp_path)
    (tree / "big").write_bytes(os.urandom(1 << 20))
    files = sum(1 for p in tree.rglob("*") if p.is_file() and not p.is_symlink())
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "nixcas.cli.main", *command, "--store-dir", str(tmp_path / "s"), str(tree)],
            stdout=subprocess.PIPE,
            stderr=follower,
            check=False,
            env={**os.environ, "TERM": "xterm", "COLUMNS": "160"},
        )
        os.close(follower)
        follower = -1
        chunks = []
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
    finally:
        if follower != -1:
            os.close(follower)
        os.close(leader)
    assert proc.returncode == 0
    assert proc.stdout.decode().startswith(first)
    shown = b"".join(chunks)
    assert verb in shown
    assert f"{files} files".encode() in shown
    assert b"ETA" in shown
    assert b"MB" in shown  # bytes: the 1 MiB file dominates the total


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["castore", "ls"], "Missing argument 'DIGEST'"),
        (["castore", "bogus"], "No such command 'bogus'"),
        (["--bogus"], "No such option '--bogus'"),
    ],
)
def test_usage_errors_are_one_line(tmp_path: Path, args: list[str], fragment: str) -> None:
    assert_one_line_error(nixcas(*args, store=tmp_path / "s"), 2, fragment)


def test_help_and_version(tmp_path: Path) -> None:
    assert "castore" in nixcas("--help").stdout
    assert nixcas("--version").stdout.strip() == f"nixcas, version {importlib.metadata.version('nixcas')}"
    bare = nixcas()
    assert bare.returncode == 2
    assert "Usage: nixcas" in bare.stderr


@pytest.mark.parametrize(
    ("toml", "fragment"),
    [
        ("[blobservices.root\n", "invalid TOML"),
        ('[blobservices.root]\ntype = "nope"\n', "unknown type 'nope'"),
        ('[blobservices.root]\ntype = "combined"\nnear = "a"\nfar = "root"\n', "'a'"),
        ('[blobservices.root]\ntype = "combined"\nnear = "root"\nfar = "root"\n', "recursion"),
        ('[directoryservices.root]\ntype = "lru"\ncapacity = "ten"\n', "integer"),
        ("[stuff]\n", "unknown table"),
    ],
)
def test_bad_composition_file_is_one_line(tmp_path: Path, toml: str, fragment: str) -> None:
    composition = tmp_path / "c.toml"
    composition.write_text(toml)
    result = nixcas("--composition", str(composition), "castore", "ls", "0" * 64, store=tmp_path / "s")
    assert_one_line_error(result, 2, fragment)
    assert str(composition) in result.stderr


def test_composition_file_serves_the_commands(tmp_path: Path) -> None:
    composition = tmp_path / "c.toml"
    composition.write_text(
        f"""
[blobservices.root]
type = "combined"
near = "near"
far = "objectstore+file://{tmp_path / "far"}"

[blobservices.near]
type = "objectstore"
object_store_url = "file://{tmp_path / "near"}"

[directoryservices.root]
type = "sqlite"
path = "{tmp_path / "dirs.sqlite"}"
"""
    )
    tree = make_complicated(tmp_path)
    out = nixcas("--composition", str(composition), "castore", "ingest", "--json", str(tree))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["digest"] == COMPLICATED_HEX
    assert (tmp_path / "near" / "blobs").is_dir()  # writes go near
    assert not (tmp_path / "far" / "blobs").exists() or not any((tmp_path / "far" / "blobs").rglob("*"))
    listed = nixcas("--composition", str(composition), "castore", "ls", COMPLICATED_HEX)
    assert listed.returncode == 0 and "keep" in listed.stdout


def test_tune_malloc_on_glibc() -> None:
    import ctypes.util
    import platform

    from nixcas.cli.common import tune_malloc

    if platform.libc_ver()[0] != "glibc" or ctypes.util.find_library("c") is None:
        pytest.skip("not a glibc system: the allocator is left alone")
    assert tune_malloc() is True


def test_tune_gc_freezes_start_up_and_raises_the_young_threshold() -> None:
    import gc

    from nixcas.cli.main import GC_YOUNG_THRESHOLD, tune_gc

    before = gc.get_threshold()
    try:
        gc.unfreeze()
        tune_gc()
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, before[1], before[2])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_commands_run_with_the_tuned_collector(tmp_path: Path) -> None:
    """The console script's main tunes the collector before the command runs (an import spent ~10 % in it)."""
    probe = (
        "import gc, sys\n"
        "import nixcas.cli.app as app\n"
        "import click\n"
        "@app.cli.command('gc-probe')\n"
        "def probe():\n"
        "    click.echo(f'{gc.get_threshold()[0]} {gc.get_freeze_count() > 0}')\n"
        "from nixcas.cli.main import main\n"
        "sys.argv = ['nixcas', 'gc-probe']\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["50000", "True"]

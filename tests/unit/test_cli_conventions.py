"""CLI conventions (in process): service options after any command, ``--json`` on the commands that change the store."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from nixcas.cli.app import cli


def nixcas(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.mark.parametrize(
    "command",
    [
        ("gc", "--dry-run"),
        ("fsck",),
        ("castore", "pins"),
        ("delete", "/nix/store/" + "0" * 32 + "-absent"),
        ("export", "/nix/store/" + "0" * 32 + "-absent", "dest"),
        ("castore", "export", "0" * 64, "dest"),
        ("castore", "rewrite-directories", "--to", "snix", "--dry-run"),
    ],
)
def test_service_options_after_the_command_win(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: tuple[str, ...]
) -> None:
    """``nixcas gc --store-dir D`` works as ``daemon --store-dir D`` does, over the global option."""
    monkeypatch.chdir(tmp_path)  # an export's relative DEST
    rule = "NIXCAS_DIRECTORY_SIZE_RULE"  # rewrite-directories drops it from the environment; put it back after
    monkeypatch.setenv(rule, os.environ.get(rule, "tvix"))
    before, after = tmp_path / "before", tmp_path / "after"
    result = nixcas("--store-dir", str(before), *command[:2], "--store-dir", str(after), *command[2:])
    assert "no such option" not in result.output, result.output
    assert after.is_dir()
    assert not before.exists()


def _nar_string(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data + b"\0" * (-len(data) % 8)


def nar_of_file(contents: bytes) -> bytes:
    """The NAR of a regular file, written out by hand."""
    parts = [b"nix-archive-1", b"(", b"type", b"regular", b"contents", contents, b")"]
    return b"".join(_nar_string(p) for p in parts)


def test_json_of_import_copy_and_delete(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    (tmp_path / "hello.txt").write_bytes(b"hello\n")
    imported = nixcas("import", "--json", "--store-dir", store, str(tmp_path / "hello.txt"))
    assert imported.exit_code == 0, imported.output
    record = json.loads(imported.stdout)
    assert record["path"].endswith("-hello.txt") and record["narSize"] == len(nar_of_file(b"hello\n"))

    content = tmp_path / "nix" / "store"
    content.mkdir(parents=True)
    exported: list[dict[str, str | int | list[str]]] = []
    for i, name in enumerate(["a", "b"]):
        path = f"/nix/store/{'abcdfghijklmnpqrsvwxyz0123456789'[i] * 32}-{name}"
        (content / Path(path).name).write_bytes(name.encode())
        nar = nar_of_file(name.encode())
        sri = "sha256-" + base64.b64encode(hashlib.sha256(nar).digest()).decode()
        exported.append({"path": path, "narHash": sri, "narSize": len(nar), "references": []})
    (tmp_path / "paths.json").write_text(json.dumps(exported))
    copy = ("copy", "--json", "--store-dir", store, "--nix-store-dir", str(content), str(tmp_path / "paths.json"))
    first = nixcas(*copy)
    assert first.exit_code == 0, first.output
    paths = [str(e["path"]) for e in exported]
    assert json.loads(first.stdout) == {"copied": paths, "skipped": []}
    assert json.loads(nixcas(*copy).stdout) == {"copied": [], "skipped": paths}

    deleted = nixcas("delete", "--json", "--store-dir", store, paths[0], record["path"])
    assert deleted.exit_code == 0, deleted.output
    listed = json.loads(deleted.stdout)["deleted"]
    assert sorted(listed) == sorted([paths[0], record["path"]])


def test_shell_completion_as_documented() -> None:
    """The README's ``_NIXCAS_COMPLETE=bash_source nixcas``: click completes commands and their options."""
    env = {"_NIXCAS_COMPLETE": "bash_complete", "COMP_WORDS": "nixcas gc --st", "COMP_CWORD": "2"}
    result = CliRunner().invoke(cli, [], env=env, prog_name="nixcas")
    assert "plain,--store-dir" in result.stdout.splitlines()
    env = {**env, "COMP_WORDS": "nixcas g", "COMP_CWORD": "1"}
    assert CliRunner().invoke(cli, [], env=env, prog_name="nixcas").stdout.split() == ["plain,gc", "plain,generate-key"]


@pytest.mark.parametrize("command", ["import", "ingest", "copy", "dump-path"])
def test_the_commands_that_ingest_share_the_gil_finely(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """``import``, ``castore ingest`` and ``copy`` set a 1 ms GIL switch interval (their threads all work at
    once); other commands keep CPython's."""
    import sys

    intervals: list[float] = []
    monkeypatch.setattr(sys, "setswitchinterval", intervals.append)
    store = str(tmp_path / "store")
    source = tmp_path / "hello.txt"
    source.write_bytes(b"hello\n")
    paths = tmp_path / "paths.json"
    paths.write_text("[]")
    args = {
        "import": ("import", str(source)),
        "ingest": ("castore", "ingest", str(source)),
        "copy": ("copy", str(paths)),
        "dump-path": ("dump-path", "/nix/store/" + "0" * 32 + "-absent"),
    }[command]
    nixcas("--store-dir", store, *args)
    assert intervals == ([] if command == "dump-path" else [0.001])

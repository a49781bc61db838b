"""The test run keeps away from the user's own store (issue 16, defect 8).

``tests/conftest.py`` points HOME and the XDG directories at the run's temporary directory for
this process and every subprocess, unsets the variables that pick a store, and fails the run if
anything under the real data directory changed (snapshot at session start, compared at the end).
"""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

from nixcas.api import default_store_dir
from nixcas.testing.daemon import nixcas_command
from nixcas.testing.isolation import HOME_VARIABLES, STORE_VARIABLES, changes, snapshot


def real_home() -> Path:
    """The user's home from the password database: whatever HOME says now."""
    return Path(pwd.getpwuid(os.getuid()).pw_dir)


def test_home_and_xdg_directories_are_private() -> None:
    home = Path(os.environ["HOME"])
    assert home.resolve() != real_home().resolve()
    assert home.is_dir()
    for name in HOME_VARIABLES:
        path = Path(os.environ[name])
        assert path.is_relative_to(home), (name, path)
        assert not path.resolve().is_relative_to(real_home().resolve()) or real_home() == Path("/"), (name, path)
    for name in STORE_VARIABLES:
        assert name not in os.environ, name
    assert default_store_dir() == Path(os.environ["XDG_DATA_HOME"]) / "nixcas"
    assert Path(os.path.expanduser("~/.local/share/nixcas")).is_relative_to(home)


def test_a_command_without_store_options_uses_the_private_store(tmp_path: Path) -> None:
    real = real_home() / ".local" / "share" / "nixcas"
    before = snapshot(real)
    source = tmp_path / "hello.txt"
    source.write_bytes(b"isolation test payload\n" * 100)
    result = subprocess.run(
        nixcas_command("castore", "ingest", str(source), "--json"), capture_output=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    private = Path(os.environ["XDG_DATA_HOME"]) / "nixcas"
    assert any(p.is_file() for p in (private / "blobs").rglob("*")), "the blob is not in the private store"
    assert changes(before, snapshot(real)) == []


def test_snapshot_sees_every_change(tmp_path: Path) -> None:
    root = tmp_path / "data"
    assert snapshot(root) == {}
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a").write_bytes(b"a")
    (root / "b").write_bytes(b"b")
    first = snapshot(root)
    assert changes(first, snapshot(root)) == []
    (root / "sub" / "a").write_bytes(b"aa")
    (root / "b").unlink()
    (root / "sub" / "c").write_bytes(b"")
    found = changes(first, snapshot(root))
    assert "modified sub/a" in found and "deleted b" in found and "created sub/c" in found
    os.utime(root / "sub" / "c", ns=(1, 1))  # same size, other time
    second = snapshot(root)
    os.utime(root / "sub" / "c", ns=(2, 2))
    assert changes(second, snapshot(root)) == ["modified sub/c"]

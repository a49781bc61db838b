"""The README's library example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], str(README), "exec"), {"__name__": "readme"})  # noqa: S102
    out = capsys.readouterr().out.split("\n")
    assert out[:4] == [". DirectoryNode", "README FileNode", "bin DirectoryNode", "bin/run FileNode"]


def test_readme_limits_match_the_code() -> None:
    """Issue 16, defect 9: the README stated a 64 MiB slice limit while the bridge used 4 MiB."""
    from nixcas.bridge.app import MAX_SLICE_LENGTH
    from nixcas.castore.nodes import MAX_DEPTH

    text = README.read_text()
    assert MAX_SLICE_LENGTH == 4 << 20
    assert "a length over 4 MiB (`MAX_SLICE_LENGTH`" in text
    assert "over 64 MiB" not in text
    assert f"`MAX_DEPTH` = {MAX_DEPTH}" in text


def test_version_is_written_once_and_the_license_declared() -> None:
    """Issue 20, part 10: pyproject reads the version from ``nixcas.__version__``; LICENSE is the declared license."""
    import tomllib

    root = README.parent
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    project = pyproject["project"]
    assert "version" not in project
    assert "version" in project["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "nixcas.__version__"}
    src = root / "src" / "nixcas"
    assigned = [p for p in src.rglob("*.py") if re.search(r"^__version__\s*=", p.read_text(), flags=re.M)]
    assert assigned == [src / "__init__.py"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    assert (root / "LICENSE").read_text().startswith("MIT License\n")

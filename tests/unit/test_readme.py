"""The README's library example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


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

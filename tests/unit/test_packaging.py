"""The wheel ships the product only: no module in it imports pytest (the test helpers stay in the checkout)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEST_ONLY = frozenset({"pytest", "_pytest", "pytest_asyncio", "hypothesis"})


def imported_roots(source: str) -> set[str]:
    """The top-level names of every module ``source`` imports, anywhere in it (functions included)."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.partition(".")[0])
    return roots


def build_wheel(tmp_path: Path) -> Path:
    """A wheel built by setuptools (as ``pip wheel`` would) from a copy of the project, off the checkout."""
    copy = tmp_path / "project"
    copy.mkdir()
    for top in [ROOT / "pyproject.toml", *ROOT.glob("README*"), *ROOT.glob("LICEN[CS]E*")]:
        shutil.copy(top, copy)
    shutil.copytree(ROOT / "src", copy / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path / "dist"
    code = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    done = subprocess.run(
        [sys.executable, "-c", code, str(out)], cwd=copy, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return out / done.stdout.strip().splitlines()[-1]


def test_imported_roots() -> None:
    source = "import os.path, pytest as p\nfrom _pytest.fixtures import x\nfrom . import y\n"
    source += "def f():\n    import hypothesis\n"
    assert imported_roots(source) == {"os", "pytest", "_pytest", "hypothesis"}


def test_no_shipped_module_imports_pytest(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        modules = [name for name in z.namelist() if name.endswith(".py")]
        assert "nixcas/__init__.py" in modules and "nixcas/py.typed" in z.namelist()
        assert not [m for m in modules if m.startswith("nixcas/testing/")]
        offenders = {m: sorted(imported_roots(z.read(m).decode()) & TEST_ONLY) for m in modules}
    assert {m: found for m, found in offenders.items() if found} == {}

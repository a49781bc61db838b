"""The README and docs/ stay true: the library example runs, links resolve, names exist, the folder map is the tree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").exists())
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
IN_FLIGHT = re.compile(r"<!-- in-flight: begin -->.*?<!-- in-flight: end -->", flags=re.S)
"""A section naming files other branches are adding: not checked until the lead merges them."""


def test_readme_python_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = code_blocks(README.read_text(), "python")
    assert len(blocks) == 1
    exec(compile(blocks[0], str(README), "exec"), {"__name__": "readme"})  # noqa: S102
    out = capsys.readouterr().out.split("\n")
    assert out[:4] == [". DirectoryNode", "README FileNode", "bin DirectoryNode", "bin/run FileNode"]


def code_blocks(text: str, lang: str) -> list[str]:
    """The bodies of the fenced blocks of ``text`` tagged ``lang`` ("" for untagged ones), in order."""
    return [body for tag, body in re.findall(r"^```(\w*)\n(.*?)^```$", text, flags=re.S | re.M) if tag == lang]


def test_docs_limits_match_the_code() -> None:
    """Issue 16, defect 9: the README stated a 64 MiB slice limit while the bridge used 4 MiB."""
    from nixcas.bridge.app import MAX_SLICE_LENGTH
    from nixcas.castore.nodes import MAX_DEPTH

    text = "\n".join(page.read_text() for page in PAGES)
    assert MAX_SLICE_LENGTH == 4 << 20
    assert "a length over 4 MiB (`MAX_SLICE_LENGTH`" in text
    assert "over 64 MiB" not in text
    assert f"`MAX_DEPTH` = {MAX_DEPTH}" in text


def test_readme_is_short() -> None:
    """Issue 20, part 10: what it is, install, the two commands, a tour and links; the rest is in docs/."""
    assert len(README.read_text().split("\n")) <= 250


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the headings of ``page`` (code blocks skipped, repeats numbered)."""
    seen: dict[str, int] = {}
    fence = False
    for line in page.read_text().split("\n"):
        if line.lstrip().startswith("```"):
            fence = not fence
        elif not fence and (m := re.match(r"#{1,6} (.*)", line)):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            if count:
                seen[f"{slug}-{count}"] = 1
    return set(seen)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_links_resolve(page: Path) -> None:
    """Every relative link names an existing file, and an anchor of it (``BENCHMARKS.md`` included)."""
    text = IN_FLIGHT.sub("", page.read_text())
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
            broken.append(target)
    assert broken == []


def test_docs_name_only_existing_files() -> None:
    """Source paths in backquotes (``castore/blob/packed.py``, ``bench/nar.py``) exist."""
    missing = set()
    for page in PAGES:
        text = IN_FLIGHT.sub("", page.read_text())
        for name in re.findall(r"`((?:[\w.-]+/)+[\w.-]+\.(?:py|proto|md|sh))`", text):
            if not any((base / name).exists() for base in (ROOT, ROOT / "src", ROOT / "src" / "nixcas")):
                missing.add(name)
    assert sorted(missing) == []


NOT_PYTHON = ("nixcas.access", "nixcas.pin.v1.")
"""Dotted names in the docs that are not Python: a logger, a protobuf package."""


def resolves(dotted: str) -> bool:
    """``dotted`` is an importable module, or an attribute of one."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(value, name):
                return False
            value = getattr(value, name)
        return True
    return False


def test_docs_name_only_existing_python_names() -> None:
    """Dotted names in backquotes (``nixcas.urls.redacted``, ``nixcas.ops.web.USER``) can be imported."""
    names = set()
    for page in PAGES:
        prose = re.sub(r"```.*?```", "", IN_FLIGHT.sub("", page.read_text()), flags=re.S)
        for quoted in re.findall(r"`([^`]+)`", prose):
            names.update(re.findall(r"(?<![\w/@.])nixcas(?:\.\w+)+", quoted))
    unknown = sorted(n for n in names if not n.startswith(NOT_PYTHON) and not resolves(n))
    assert unknown == []


def folder_map(block: str) -> dict[str, bool]:
    """The paths a folder-map block names (first line: its root), each mapped to "is a directory"."""
    lines = block.rstrip("\n").split("\n")
    root = lines[0].rstrip("/")
    stack: list[tuple[int, str]] = [(-1, "" if root == "." else root)]
    named = {}
    for line in lines[1:]:
        indent = len(line) - len(line.lstrip(" "))
        name = line.split()[0]
        while stack[-1][0] >= indent:
            stack.pop()
        path = f"{stack[-1][1]}/{name}".lstrip("/").rstrip("/")
        named[path] = name.endswith("/")
        if name.endswith("/"):
            stack.append((indent, path))
    return named


def test_architecture_folder_map_is_the_tree() -> None:
    """docs/architecture.md names every module of the package and nothing that is not there."""
    text = IN_FLIGHT.sub("", (DOCS / "architecture.md").read_text())
    section = text[text.index("## Folder map") :]
    blocks = code_blocks(section, "")
    named: dict[str, bool] = {}
    for block in blocks:
        named.update(folder_map(block))
    wrong = sorted(p for p, is_dir in named.items() if (ROOT / p).is_dir() != is_dir or not (ROOT / p).exists())
    assert wrong == []
    package = ROOT / "src" / "nixcas"
    modules = {
        str(p.relative_to(ROOT))
        for p in package.rglob("*.py")
        if "_proto" not in p.parts and (p.name != "__init__.py" or p.parent == package)
    }
    packages = {str(p.relative_to(ROOT)) for p in package.rglob("*") if p.is_dir() and p.name != "__pycache__"}
    packages = {p for p in packages if "/_proto/" not in p}
    assert sorted(modules - named.keys()) == []
    assert sorted(packages - named.keys()) == []


CASTORE_MAY_IMPORT = {"castore", "_proto", "ops", "errors", "config", "urls", "_aio", "_extras", "_lru", "_members"}
CASTORE_MAY_IMPORT |= {"_lazy", "_postgres", "_record", "_sqlite"}
"""What docs/architecture.md allows castore to import: itself, the shared modules, never the Nix layer or an edge."""


def test_castore_imports_no_nix_layer_and_no_edge() -> None:
    """docs/architecture.md: castore knows nothing of Nix (no ``nixcas.store``) and nothing of the edges above it."""
    import ast

    wrong = set()
    for path in (ROOT / "src" / "nixcas" / "castore").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "nixcas" and parts[1] not in CASTORE_MAY_IMPORT:
                    wrong.add(f"{path.relative_to(ROOT)}: {name}")
    assert sorted(wrong) == []


def test_version_is_written_once_and_the_license_declared() -> None:
    """Issue 20, part 10: pyproject reads the version from ``nixcas.__version__``; LICENSE is the declared license."""
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    assert "version" not in project
    assert "version" in project["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "nixcas.__version__"}
    src = ROOT / "src" / "nixcas"
    assigned = [p for p in src.rglob("*.py") if re.search(r"^__version__\s*=", p.read_text(), flags=re.M)]
    assert assigned == [src / "__init__.py"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")

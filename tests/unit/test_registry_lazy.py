"""The registry loads backend modules only when a tag is used."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from nixcas.registry import KINDS


def test_every_registered_tag_loads_its_config() -> None:
    for table in KINDS.values():
        for tag in table:
            assert table[tag].type_tag == tag


def test_import_nixcas_does_not_load_grpc() -> None:
    code = "import sys, nixcas, nixcas.registry; print('grpc' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _nixcas_imports(module: str) -> set[str]:
    """Every ``nixcas.*`` module that ``module``'s source imports, at module level or inside a function."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("nixcas")}


def test_config_registry_composition_import_one_way() -> None:
    """config <- registry <- composition: no module imports one further along, not even inside a function."""
    layers = ["nixcas.config", "nixcas.registry", "nixcas.composition", "nixcas.api"]
    for i, module in enumerate(layers):
        later = set(layers[i + 1 :])
        assert _nixcas_imports(module) & later == set(), module

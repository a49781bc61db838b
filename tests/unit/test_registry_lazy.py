"""The registry loads backend modules only when a tag is used."""

from __future__ import annotations

import subprocess
import sys

from nixcas.registry import KINDS


def test_every_registered_tag_loads_its_config() -> None:
    for table in KINDS.values():
        for tag in table:
            assert table[tag].type_tag == tag


def test_import_nixcas_does_not_load_grpc() -> None:
    code = "import sys, nixcas, nixcas.registry; print('grpc' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

"""Optional drivers (extras): a base install serves the embedded store; a URL needing a missing one names its extra.

The drivers are made missing in a subprocess by a ``sitecustomize`` whose
meta-path finder refuses to import them, as if ``pip install nixcas`` had run
without the extras.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from nixcas._extras import DRIVERS, MissingExtra, missing_extra
from nixcas.errors import ConfigurationError
from nixcas.testing.daemon import clean_env, nixcas_command

BLOCKER = """
import sys

class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _NotInstalled())
"""


def without(tmp_path: Path, *modules: str) -> dict[str, str]:
    """An environment whose Python cannot import ``modules``."""
    site = tmp_path / "blocker"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER.format(blocked=set(modules)))
    env = clean_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    return env


def nixcas(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(nixcas_command(*args), capture_output=True, env=env, timeout=120, check=False)


def test_base_install_serves_the_embedded_store(tmp_path: Path) -> None:
    """Without any driver (the tests below show the blocker works), the embedded store imports and lists."""
    (tmp_path / "hello.txt").write_text("hello\n")
    store = ["--store-dir", str(tmp_path / "store")]
    imported = nixcas(without(tmp_path, *DRIVERS), *store, "import", str(tmp_path / "hello.txt"))
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.decode().strip().endswith("-hello.txt")


@pytest.mark.parametrize(
    ("blocked", "option", "url", "extra"),
    [
        ("obstore", "--blob-service-addr", "objectstore+s3://bucket/p?secret_access_key=hush", "s3"),
        ("psycopg", "--directory-service-addr", "postgresql://u:hush@127.0.0.1:1/db", "postgres"),
    ],
)
def test_a_url_without_its_extra_is_one_line_naming_it(
    tmp_path: Path, blocked: str, option: str, url: str, extra: str
) -> None:
    result = nixcas(
        without(tmp_path, blocked), "--store-dir", str(tmp_path / "s"), option, url, "castore", "ls", "0" * 64
    )
    assert result.returncode == 2, result.stderr
    assert f"pip install 'nixcas[{extra}]'".encode() in result.stderr
    assert result.stderr.count(b"\n") == 1 and b"hush" not in result.stderr
    assert b"Traceback" not in result.stderr


def test_missing_extra() -> None:
    error = missing_extra(ModuleNotFoundError("No module named 'psycopg_pool'", name="psycopg_pool"), "type 'x'")
    assert isinstance(error, MissingExtra) and isinstance(error, ConfigurationError)
    assert str(error) == (
        "type 'x' needs the PostgreSQL connection pool (psycopg-pool), which is not installed: "
        "pip install 'nixcas[postgres]'"
    )
    assert "nixcas[s3]" in str(missing_extra(ModuleNotFoundError(name="obstore.store"), "u"))
    assert missing_extra(ModuleNotFoundError(name="numpy"), "u") is None
    assert missing_extra(ImportError("something else"), "u") is None

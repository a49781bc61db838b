"""The README's tour runs as written: its commands, on a copy of examples/, print what the README shows."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from nixcas.testing.daemon import clean_env, nixcas_command

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").exists())
README = ROOT / "README.md"


def code_blocks(text: str, lang: str) -> list[str]:
    """The bodies of the fenced blocks of ``text`` tagged ``lang`` ("" for untagged ones), in order."""
    return [body for tag, body in re.findall(r"^```(\w*)\n(.*?)^```$", text, flags=re.S | re.M) if tag == lang]


def test_readme_tour_runs_as_written(tmp_path: Path) -> None:
    """The tour's first two blocks, run by bash on a copy of examples/, print what the README shows."""
    text = README.read_text()
    tour = text[text.index("## A 5-minute tour") :]
    nix_block, castore_block = code_blocks(tour, "sh")[:2]
    shown = code_blocks(tour, "")[0]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nixcas").write_text(f'#!/bin/sh\nexec {shlex.join(nixcas_command())} "$@"\n')
    (bin_dir / "nixcas").chmod(0o755)
    work = tmp_path / "work"
    shutil.copytree(ROOT / "examples", work / "examples", symlinks=True)
    env = {**clean_env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "NIXCAS_STORE_DIR": str(tmp_path / "s")}
    env.pop("NIXCAS_DIRECTORY_SIZE_RULE", None)  # the README shows the default rule (conftest sets tvix)

    def run(block: str) -> list[str]:
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block], cwd=work, env=env, capture_output=True, timeout=120, check=False
        )
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        return result.stdout.decode().splitlines()

    out = run(nix_block)
    store_path = nix_block.split("\n")[0].partition("#")[2].strip()
    assert out[0] == store_path
    assert f"StorePath: {store_path}" in out
    assert (work / "examples-copy" / "hello.txt").read_bytes() == (ROOT / "examples" / "hello.txt").read_bytes()
    assert os.readlink(work / "examples-copy" / "greeting") == "hello.txt"
    assert (work / "examples.nar").read_bytes().startswith(b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1")

    out = run(castore_block)
    ingested = castore_block.split("\n")[0].partition("#")[2].strip()
    assert out[0].startswith(ingested.partition("…")[0]) and out[0].endswith(ingested.partition("…")[2])
    assert out[1:] == shown.rstrip("\n").split("\n")

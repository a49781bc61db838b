"""Running the real Nix tools (Debian ``nix-bin``) from tests, isolated from the machine's Nix state."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

__all__ = [
    "NIX",
    "NIX_HASH",
    "NIX_INSTANTIATE",
    "NIX_STORE",
    "ODD_NAMES",
    "fixed_tree",
    "needs_nix",
    "nix_env",
    "run_nix",
]

NIX_STORE = shutil.which("nix-store")
NIX_HASH = shutil.which("nix-hash")
NIX_INSTANTIATE = shutil.which("nix-instantiate")
NIX = shutil.which("nix")

ODD_NAMES = ["with space", "ünïcödé", "-dash", ".hidden", "a\nnewline", "tab\there", "x" * 255, "'quote\"", "\\back"]
"""File names that stress quoting and encodings (all valid in a NAR)."""

needs_nix = pytest.mark.skipif(
    NIX_STORE is None or NIX_HASH is None, reason="nix-store not installed (Debian nix-bin; `make test` installs it)"
)


def nix_env(tmp_path: Path) -> dict[str, str]:
    """An environment for Nix commands: private HOME/caches, nix-command enabled, no substituters."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIX_")}
    env["HOME"] = str(tmp_path / "home")
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    env["NIX_CONFIG"] = "experimental-features = nix-command\nsandbox = false\nsubstituters =\n"
    return env


def run_nix(args: list[str], tmp_path: Path, *, binary: bool = False) -> str | bytes:
    """Run a Nix command; its stdout (stripped text, or raw bytes with ``binary``); fail the test on error."""
    result = subprocess.run(args, capture_output=True, env=nix_env(tmp_path), timeout=300, check=False)
    assert result.returncode == 0, f"{args}: {result.stderr.decode(errors='replace')}"
    return result.stdout if binary else result.stdout.decode().strip()


def fixed_tree(root: Path) -> Path:
    """A tree with every kind of entry: executables, empty file and directory, symlinks, odd names, a 1.28 MB file."""
    root.mkdir()
    (root / "bin").mkdir()
    (root / "bin" / "hello").write_bytes(b"#!/bin/sh\necho hello\n")
    (root / "bin" / "hello").chmod(0o755)
    (root / "share" / "doc").mkdir(parents=True)
    (root / "share" / "doc" / "README").write_text("read me\n")
    (root / "empty-file").write_bytes(b"")
    (root / "empty-dir").mkdir()
    (root / "link").symlink_to("bin/hello")
    (root / "dangling").symlink_to("/nowhere/at/all")
    (root / "big").write_bytes(hashlib.sha256(b"big").digest() * 40_000)  # 1.28 MB, several blocks
    for name in ODD_NAMES:
        (root / name).write_text(name)
    return root

"""The first five minutes: `make run` leaves a cache real Nix can use; a composition never falls back silently."""

from __future__ import annotations

import os
import select
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from nixcas.api import Store
from nixcas.errors import ConfigurationError
from nixcas.testing.daemon import clean_env, free_port, nixcas_command
from nixcas.testing.nix import NIX, nix_env

ROOT = Path(__file__).resolve().parents[2]
NO_ROOT = """
[blobservices.mine]
type = "memory"

[directoryservices.mine]
type = "memory"
"""


async def test_a_composition_without_root_is_an_error(tmp_path: Path) -> None:
    composition = tmp_path / "c.toml"
    composition.write_text(NO_ROOT)
    with pytest.raises(ConfigurationError, match="no root service") as e:
        await Store.open(tmp_path / "store", composition=composition)
    assert str(e.value).startswith(f"{composition}: ") and "\n" not in str(e.value)
    assert not (tmp_path / "store").exists()  # the embedded store was not touched
    async with await Store.open(  # every service named: nothing falls back, so the file is fine
        tmp_path / "store", composition=composition, blob_service_url="mine", directory_service_url="mine"
    ) as store:
        assert type(store.blobs).__name__ == "MemoryBlobService"
    composition.write_text(NO_ROOT.replace("blobservices.mine", "blobservices.root"))
    async with await Store.open(tmp_path / "store", composition=composition) as store:
        assert type(store.blobs).__name__ == "MemoryBlobService"


def test_a_composition_without_root_is_one_line_on_the_command_line(tmp_path: Path) -> None:
    composition = tmp_path / "c.toml"
    composition.write_text(NO_ROOT)
    args = nixcas_command("--store-dir", str(tmp_path / "store"), "--composition", str(composition), "gc", "--dry-run")
    result = subprocess.run(args, capture_output=True, env=clean_env(), timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    assert b"no root service" in result.stderr and result.stderr.count(b"\n") == 1
    assert not (tmp_path / "store").exists()


def _read_until(proc: subprocess.Popen[bytes], marker: bytes, count: int, timeout: float) -> bytes:
    """stdout until ``marker`` appeared ``count`` times (or the process ended, or the time ran out)."""
    assert proc.stdout is not None
    out = b""
    deadline = time.monotonic() + timeout
    while out.count(marker) < count and (remaining := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if ready:
            data = os.read(proc.stdout.fileno(), 65536)
            if not data:
                break
            out += data
    return out


@pytest.mark.skipif(NIX is None, reason="the nix command is not installed (Debian nix-bin)")
def test_make_run_leaves_a_cache_nix_can_use(tmp_path: Path) -> None:
    """scripts/run.sh (what `make run` runs): examples/ becomes a store path; the printed commands work."""
    assert NIX is not None
    wrapper = tmp_path / "nixcas"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.join(nixcas_command())} "$@"\n')
    wrapper.chmod(0o755)
    env = clean_env()
    bridge = f"127.0.0.1:{free_port()}"
    env.update(NIXCAS=str(wrapper), NIXCAS_STORE_DIR=str(tmp_path / "store"), LISTEN=f"127.0.0.1:{free_port()}")
    env["BRIDGE_LISTEN"] = bridge
    proc = subprocess.Popen(
        [str(ROOT / "scripts" / "run.sh")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path
    )
    try:
        out = _read_until(proc, b"listening on ", 2, 60).decode()
        assert out.count("listening on ") == 2, (out, proc.poll())
        lines = out.splitlines()
        path = lines[0].removeprefix("examples/ is now the store path ")
        assert path.startswith("/nix/store/") and path.endswith("-examples"), lines[0]
        assert "Uploads are off" in out and "BRIDGE_ARGS=--allow-writes" in out
        commands = [shlex.split(line.partition("#")[0]) for line in lines if line.startswith("  nix ")]
        assert [c[3] for c in commands] == ["path-info", "copy", "store"]
        assert f"http://{bridge}" in commands[0]

        home = tmp_path / "home"
        shown = subprocess.run([NIX, *commands[0][1:]], capture_output=True, env=nix_env(home), timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.decode().strip() == path
        copy = [NIX, *commands[1][1:]]
        copy[copy.index("/tmp/nixcas-try")] = str(tmp_path / "try")
        copied = subprocess.run(copy, capture_output=True, env=nix_env(home), timeout=60)
        assert copied.returncode == 0, copied.stderr
        restored = tmp_path / "try" / path.lstrip("/")
        assert (restored / "hello.txt").read_bytes() == (ROOT / "examples" / "hello.txt").read_bytes()
        assert os.readlink(restored / "greeting") == "hello.txt"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err

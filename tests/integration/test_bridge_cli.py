"""The command line of the bridge: nar-bridge startup, options, signals; generate-key; a unix socket."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import aiohttp
import pytest

from nixcas.bridge.app import NarBridge
from nixcas.bridge.server import start_bridge
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.sizerule import SizeRule
from nixcas.store.narindex import NarIndex
from nixcas.store.pathinfo.memory import MemoryPathInfoService
from nixcas.store.signing import SigningKey, VerifyingKey
from nixcas.testing.daemon import clean_env, nixcas_command, running_daemon, short_tmpdir


def nixcas(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(nixcas_command(*args), capture_output=True, env=clean_env(), timeout=120, check=False)


def test_generate_key_prints_a_pair() -> None:
    result = nixcas("generate-key", "cache.example.org-1")
    assert result.returncode == 0, result.stderr
    secret, public = result.stdout.decode().splitlines()
    key = SigningKey.parse(secret)
    assert key.name == "cache.example.org-1"
    assert key.public == VerifyingKey.parse(public)


def test_generate_key_files_and_refusals(tmp_path: Path) -> None:
    sec, pub = tmp_path / "k.sec", tmp_path / "k.pub"
    assert nixcas("generate-key", "k-1", str(sec), str(pub)).returncode == 0
    assert SigningKey.load(sec).public == VerifyingKey.parse(pub.read_text())
    before = sec.read_text()
    again = nixcas("generate-key", "k-1", str(sec), str(tmp_path / "other.pub"))
    assert again.returncode == 1 and b"File exists" in again.stderr and again.stderr.count(b"\n") == 1
    assert sec.read_text() == before and not (tmp_path / "other.pub").exists()
    one = nixcas("generate-key", "k-1", str(tmp_path / "only"))
    assert one.returncode == 2 and b"both" in one.stderr
    bad = nixcas("generate-key", "bad name")
    assert bad.returncode == 2 and b"invalid key name" in bad.stderr


@pytest.mark.parametrize(
    ("setup", "args", "words"),
    [
        (lambda d: (d / "t").write_text(""), ["--token-file", "{d}/t"], b"empty"),
        (lambda d: None, ["--token-file", "{d}/missing"], b"--token-file"),
        (lambda d: (d / "k").write_text("nope"), ["--sign-key", "{d}/k"], b"invalid secret key"),
        (lambda d: None, ["-l", "nonsense"], b"listen address"),
    ],
)
def test_bad_options_are_one_line_usage_errors(tmp_path: Path, setup: object, args: list[str], words: bytes) -> None:
    setup(tmp_path)  # type: ignore[operator]
    result = nixcas("--store-dir", str(tmp_path / "s"), "nar-bridge", *[a.format(d=tmp_path) for a in args])
    assert result.returncode == 2, result.stderr
    assert words in result.stderr and result.stderr.count(b"\n") == 1


def test_taken_port(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = nixcas("--store-dir", str(tmp_path / "s"), "nar-bridge", "-l", f"127.0.0.1:{port}")
    assert result.returncode == 2
    assert b"cannot listen" in result.stderr and result.stderr.count(b"\n") == 1


def test_starts_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    with running_daemon(
        "-l", "127.0.0.1:0", "--priority", "7", store=tmp_path / "s", log=tmp_path / "log", command="nar-bridge"
    ) as bridge:
        port = int(bridge.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(b"GET /nix-cache-info HTTP/1.0\r\n\r\n")
            reply = b""
            while data := conn.recv(4096):
                reply += data
        assert b"Priority: 7\n" in reply
        bridge.signal(signal.SIGTERM)
        assert bridge.wait() == 0
    assert (tmp_path / "s" / "nar-bridge.sqlite").exists()


async def test_unix_socket(tmp_path: Path) -> None:
    index = NarIndex(None)
    bridge = NarBridge(MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX), MemoryPathInfoService(), index)
    with short_tmpdir() as d:
        path = d / "bridge.sock"
        running = await start_bridge(str(path), bridge)
        try:
            assert running.url == f"unix://{path}"
            async with (
                aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as session,
                session.get("http://localhost/nix-cache-info") as r,
            ):
                assert r.status == 200
                assert "WantMassQuery: 1" in await r.text()
        finally:
            await running.stop()
        assert not path.exists()
    await index.close()


def test_the_command_line_loads_no_http_or_crypto_until_needed() -> None:
    """aiohttp and cryptography cost ~0.2 s of start-up; only the bridge and key commands load them."""
    code = "import sys, nixcas.cli.main; print(sorted({m.split('.')[0] for m in sys.modules} & {'aiohttp', 'cryptography'}))"  # noqa: E501
    out = subprocess.run(
        [*nixcas_command()[:1], "-c", code], capture_output=True, text=True, check=True, env=clean_env()
    )
    assert out.stdout.strip() == "[]"

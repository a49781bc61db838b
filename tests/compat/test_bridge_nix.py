"""nar-bridge and nix+http with the real Nix client (Debian nix-bin).

Nix runs against throwaway chroot stores (``--store DIR``); what it copies back
out of nixcas must dump (``nix-store --dump``) byte for byte like the original.
Each ``nix copy --from`` gets a fresh cache directory, so Nix cannot answer
from the narinfos it remembers from its own upload.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from nixcas.store import nixbase32
from nixcas.store.narinfo import NarInfo
from nixcas.store.signing import SigningKey, VerifyingKey, has_valid_signature
from nixcas.testing.daemon import Daemon, clean_env, nixcas_command, running_daemon
from nixcas.testing.nix import NIX, NIX_STORE, fixed_tree, needs_nix, nix_env

pytestmark = [needs_nix, pytest.mark.skipif(NIX is None, reason="the nix command is not installed (Debian nix-bin)")]


def nix(args: list[str], home: Path, *, check: bool = True, config: str = "") -> subprocess.CompletedProcess[bytes]:
    env = nix_env(home)
    env["NIX_CONFIG"] += config
    result = subprocess.run(args, capture_output=True, env=env, timeout=300, check=False)
    if check:
        assert result.returncode == 0, f"{args}: {result.stderr.decode(errors='replace')}"
    return result


def http(url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None) -> bytes:
    """GET (or PUT ``data``) on loopback; the response body."""
    assert url.startswith("http://127.0.0.1:")
    method = "GET" if data is None else "PUT"
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)  # noqa: S310
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - a loopback http:// URL
        body: bytes = response.read()
        return body


def nixcas(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(nixcas_command(*args), capture_output=True, env=clean_env(), timeout=300, check=False)


def make_paths(tmp_path: Path, store: Path) -> list[str]:
    """Store paths added to the chroot store ``store`` with nix-store --add."""
    src = tmp_path / "src"
    src.mkdir()
    tree = fixed_tree(src / "tree")
    (src / "file.txt").write_bytes(b"Hello World!")
    (src / "symlink").symlink_to("/nix/store/somewhereelse")
    assert NIX_STORE is not None
    out = nix(
        [NIX_STORE, "--store", str(store), "--add", str(tree), str(src / "file.txt"), str(src / "symlink")], tmp_path
    )
    return out.stdout.decode().split()


def dump(store: Path, path: str, home: Path) -> bytes:
    """The NAR of ``path`` in the chroot store ``store`` (its physical location)."""
    assert NIX_STORE is not None
    return nix([NIX_STORE, "--dump", str(store) + path], home).stdout


def copy_to(tmp_path: Path, store: Path, url: str, paths: list[str], config: str = "") -> None:
    assert NIX is not None
    nix([NIX, "copy", "--store", str(store), "--to", url, *paths], tmp_path / "home-to", config=config)


def copy_from(
    tmp_path: Path, url: str, paths: list[str], *, config: str = "", check: bool = True, trust: bool = False
) -> tuple[Path, subprocess.CompletedProcess[bytes]]:
    """``nix copy --from url`` into a fresh store, with a fresh narinfo cache."""
    assert NIX is not None
    fresh = tmp_path / f"from-{time.monotonic_ns()}"
    store = fresh / "store"
    args = [NIX, "copy", "--store", str(store), "--from", url, *paths]
    if not trust:
        args.insert(2, "--no-check-sigs")
    return store, nix(args, fresh, check=check, config=config)


@pytest.mark.parametrize("compression", ["", "none", "xz", "zstd"])
def test_nix_copy_to_and_from_the_bridge(tmp_path: Path, compression: str) -> None:
    """Nix uploads (default compression xz, or as given), then downloads into a fresh store: identical NARs."""
    source = tmp_path / "nix-a"
    paths = make_paths(tmp_path, source)
    with running_daemon(
        "-l", "127.0.0.1:0", "--allow-writes", store=tmp_path / "nixcas", log=tmp_path / "log", command="nar-bridge"
    ) as bridge:
        assert bridge.url.startswith("http://127.0.0.1:")
        copy_to(tmp_path, source, bridge.url + (f"?compression={compression}" if compression else ""), paths)
        target, _ = copy_from(tmp_path, bridge.url, paths)
        for path in paths:
            assert dump(target, path, tmp_path) == dump(source, path, tmp_path), path
        copy_to(tmp_path, source, bridge.url, paths)  # again: nothing to do, no error
    assert "Traceback" not in bridge.stderr()


def test_nar_listings_with_nix(tmp_path: Path) -> None:
    """The bridge's ``.ls`` equals the listing Nix writes itself; Nix uploads its own (dropped); ``nix store ls``."""
    assert NIX is not None
    source = tmp_path / "nix-a"
    paths = make_paths(tmp_path, source)
    cache = tmp_path / "file-cache"
    copy_to(tmp_path, source, f"file://{cache}?write-nar-listing=true&compression=none", paths)
    with running_daemon(
        "-l", "127.0.0.1:0", "--allow-writes", store=tmp_path / "nixcas", log=tmp_path / "log", command="nar-bridge"
    ) as bridge:
        copy_to(tmp_path, source, bridge.url + "?write-nar-listing=true", paths)
        for path in paths:
            ours = json.loads(http(f"{bridge.url}/{path[11:43]}.ls"))
            assert ours == json.loads((cache / f"{path[11:43]}.ls").read_bytes()), path
        assert b'"narOffset"' in (cache / f"{paths[0][11:43]}.ls").read_bytes()  # the tree: offsets compared too
        listed = nix([NIX, "store", "ls", "--store", bridge.url, "-lR", paths[0]], tmp_path / "home-ls")
        local = nix([NIX, "store", "ls", "--store", str(source), "-lR", paths[0]], tmp_path / "home-ls")
        assert listed.stdout == local.stdout and b"bin/hello" in listed.stdout
    assert "Traceback" not in bridge.stderr()


def start_daemon_with_bridge(tmp_path: Path, *args: str) -> tuple[Daemon, str]:
    """``nixcas daemon --nar-bridge``: two 'listening on' lines, gRPC then HTTP."""
    log = tmp_path / "daemon.log"
    cmd = nixcas_command(
        "--store-dir", str(tmp_path / "nixcas"), "daemon", "-l", "127.0.0.1:0", "--nar-bridge", "127.0.0.1:0", *args
    )
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=clean_env())
    daemon = Daemon(proc=proc, log=log, url="", store=tmp_path / "nixcas")
    assert proc.stdout is not None
    out = b""
    deadline = time.monotonic() + 20
    while out.count(b"\n") < 2 and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            data = os.read(proc.stdout.fileno(), 4096)
            if not data:
                break
            out += data
    lines = out.decode().splitlines()
    if len(lines) != 2:
        daemon.kill()
        pytest.fail(f"daemon did not start: {out!r}; {daemon.stderr()}")
    assert lines[0].startswith("listening on grpc+http://127.0.0.1:")
    assert lines[1].startswith("listening on http://127.0.0.1:")
    daemon.url = lines[0].removeprefix("listening on ")
    return daemon, lines[1].removeprefix("listening on ")


def test_signatures_and_token_with_nix(tmp_path: Path) -> None:
    """Keys from both tools; Nix signs uploads, the bridge signs on the fly; Nix checks both."""
    assert NIX_STORE is not None
    ours = tmp_path / "ours.sec", tmp_path / "ours.pub"
    generated = nixcas("generate-key", "nixcas.test-1", str(ours[0]), str(ours[1]))
    assert generated.returncode == 0, generated.stderr
    assert oct(ours[0].stat().st_mode & 0o777) == "0o600"
    theirs = tmp_path / "nix.sec", tmp_path / "nix.pub"
    nix([NIX_STORE, "--generate-binary-cache-key", "nix.test-1", str(theirs[0]), str(theirs[1])], tmp_path)
    (tmp_path / "token").write_text("tok-123\n")
    (tmp_path / "netrc").write_text("machine 127.0.0.1 login nix password tok-123\n")
    netrc = f"\nnetrc-file = {tmp_path / 'netrc'}\n"

    source = tmp_path / "nix-a"
    paths = make_paths(tmp_path, source)
    daemon, url = start_daemon_with_bridge(
        tmp_path, "--token-file", str(tmp_path / "token"), "--sign-key", str(ours[0])
    )
    try:
        assert NIX is not None
        denied = nix([NIX, "copy", "--store", str(source), "--to", url, paths[0]], tmp_path / "h0", check=False)
        assert denied.returncode != 0  # no token
        copy_to(tmp_path, source, f"{url}?secret-key={theirs[0]}", paths, config=netrc)

        narinfo = NarInfo.parse(http(f"{url}/{paths[0][11:43]}.narinfo").decode())
        nix_key, our_key = SigningKey.load(theirs[0]), SigningKey.load(ours[0])
        assert nix_key.sign(narinfo.fingerprint()) in narinfo.signatures  # Nix's signature, kept, equals ours
        assert has_valid_signature(narinfo.fingerprint(), narinfo.signatures, [our_key.public])
        assert VerifyingKey.parse(ours[1].read_text()) == our_key.public
        for pub in ours[1], theirs[1]:  # either signature satisfies Nix
            trusted = f"\ntrusted-public-keys = {pub.read_text()}\n"
            target, _ = copy_from(tmp_path, url, paths, trust=True, config=trusted)
            assert dump(target, paths[0], tmp_path) == dump(source, paths[0], tmp_path)

        # Content-addressed paths verify themselves; an input-addressed one needs a trusted signature.
        nar = dump(source, paths[1], tmp_path)
        nar_nb32 = nixbase32.encode(hashlib.sha256(nar).digest())
        auth = {"Authorization": "Bearer tok-123"}
        http(f"{url}/nar/{nar_nb32}.nar", data=nar, headers=auth)
        ia = "/nix/store/" + nixbase32.encode(hashlib.sha256(b"ia").digest()[:20]) + "-input-addressed"
        text = f"StorePath: {ia}\nURL: nar/{nar_nb32}.nar\nCompression: none\nNarHash: sha256:{nar_nb32}\n"
        text += f"NarSize: {len(nar)}\nReferences: \n"
        http(f"{url}/{ia[11:43]}.narinfo", data=text.encode(), headers=auth)
        stranger = SigningKey.generate("nixcas.test-1").public
        _, refused = copy_from(
            tmp_path, url, [ia], trust=True, check=False, config=f"\ntrusted-public-keys = {stranger}\n"
        )
        assert refused.returncode != 0
        assert b"signature" in refused.stderr
        target, _ = copy_from(tmp_path, url, [ia], trust=True, config=f"\ntrusted-public-keys = {our_key.public}\n")
        assert dump(target, ia, tmp_path) == nar
    finally:
        daemon.stop()
    assert daemon.proc.returncode == 0, daemon.stderr()


@pytest.fixture
def static_server(tmp_path: Path) -> Iterator[tuple[Path, str, subprocess.Popen[bytes]]]:
    """A directory served over HTTP on loopback (python -m http.server, stopped by PID)."""
    root = tmp_path / "cache"
    root.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(root), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    try:
        yield root, f"http://127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.mark.parametrize("compression", ["xz", "zstd"])
def test_nix_http_substitution_from_a_cache_nix_wrote(
    tmp_path: Path, static_server: tuple[Path, str, subprocess.Popen[bytes]], compression: str
) -> None:
    """nixcas substitutes lazily from a `nix copy --to file://` cache; the second lookup needs no upstream."""
    assert NIX_STORE is not None
    root, url, server = static_server
    key = tmp_path / "k.sec", tmp_path / "k.pub"
    nix([NIX_STORE, "--generate-binary-cache-key", "up.test-1", str(key[0]), str(key[1])], tmp_path)
    source = tmp_path / "nix-a"
    paths = make_paths(tmp_path, source)
    copy_to(tmp_path, source, f"file://{root}?compression={compression}&secret-key={key[0]}", paths[:2])
    copy_to(tmp_path, source, f"file://{root}?compression={compression}", paths[2:])  # unsigned
    composition = tmp_path / "composition.toml"
    composition.write_text(
        f"""
[pathinfoservices.root]
type = "cache"
near = "sqlite://{tmp_path / "nixcas" / "pathinfo.sqlite"}"
far = "upstream"

[pathinfoservices.upstream]
type = "nix"
base_url = "{url}"
public_keys = ["{key[1].read_text().strip()}"]
"""
    )
    store = ["--store-dir", str(tmp_path / "nixcas"), "--composition", str(composition)]
    for path in paths[:2]:
        result = nixcas(*store, "dump-path", path)
        assert result.returncode == 0, result.stderr
        assert result.stdout == dump(source, path, tmp_path)

    unsigned = nixcas(*store, "path-info", paths[2])
    assert unsigned.returncode == 1
    assert b"no valid signature" in unsigned.stderr and unsigned.stderr.count(b"\n") == 1

    server.kill()
    server.wait()
    for path in paths[:2]:  # local now
        result = nixcas(*store, "dump-path", path)
        assert result.returncode == 0, result.stderr
        assert result.stdout == dump(source, path, tmp_path)
    local_only = ["--store-dir", str(tmp_path / "nixcas")]
    assert nixcas(*local_only, "path-info", paths[0]).returncode == 0
    missing = nixcas(*local_only, "path-info", paths[2])  # the unsigned one was never stored
    assert missing.returncode == 1 and b"not in the store" in missing.stderr


def test_private_cache_with_nix(tmp_path: Path) -> None:
    """``--private`` with a read and a write token, sent by Nix from its netrc-file (Basic auth)."""
    assert NIX is not None
    writer, reader = "w-0123456789abcdef", "r-fedcba9876543210"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"write {writer} ci\nread {reader} alice\n")
    netrc = {}
    for name, secret in (("ci", writer), ("alice", reader)):
        (tmp_path / f"netrc-{name}").write_text(f"machine 127.0.0.1 login {name} password {secret}\n")
        netrc[name] = f"\nnetrc-file = {tmp_path / f'netrc-{name}'}\n"
    source = tmp_path / "nix-a"
    paths = make_paths(tmp_path, source)
    args = ["-l", "127.0.0.1:0", "--private", "--token-file", str(tokens)]
    with running_daemon(*args, store=tmp_path / "nixcas", log=tmp_path / "log", command="nar-bridge") as bridge:
        up = [NIX, "copy", "--store", str(source), "--to", bridge.url, *paths]
        refused = nix(up, tmp_path / "home-read", check=False, config=netrc["alice"])
        assert refused.returncode != 0 and b"403" in refused.stderr  # a read token may not upload
        assert http(f"{bridge.url}/").startswith(b"Hello")
        copy_to(tmp_path, source, bridge.url, paths, config=netrc["ci"])

        _, anonymous = copy_from(tmp_path, bridge.url, paths[:1], check=False)
        assert anonymous.returncode != 0  # Nix 2.8 reports the 401 of nix-cache-info as:
        assert b"does not appear to be a binary cache" in anonymous.stderr
        target, _ = copy_from(tmp_path, bridge.url, paths[:1], config=netrc["alice"])
        assert dump(target, paths[0], tmp_path) == dump(source, paths[0], tmp_path)
        substituted = tmp_path / "subst"  # substitution (what a build does), with the read token
        config = netrc["alice"] + f"\nsubstituters = {bridge.url}\nrequire-sigs = false\n"
        nix([NIX, "build", "--no-link", "--store", str(substituted / "store"), *paths[1:]], substituted, config=config)
        for path in paths[1:]:
            assert dump(substituted / "store", path, tmp_path) == dump(source, path, tmp_path), path
    assert "Traceback" not in bridge.stderr()
    assert writer not in bridge.stderr() and reader not in bridge.stderr()

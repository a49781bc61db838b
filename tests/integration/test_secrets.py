"""Credentials in service URLs never reach a log line, a warning, an error, a ``repr`` or a response body.

The upstream here is a binary cache reached as ``nix+http://user:SECRET@host/`` (aiohttp sends the
user part as basic auth); every way a message can carry its URL is provoked: the start-up log line
of ``nar-bridge`` and ``daemon``, the bridge's 404 for an unparsable or badly signed upstream narinfo,
its 500 for an upstream error answer and for a failed NAR download, the gRPC status details of the
same failures, and the refusal of ``grpc+http://u:SECRET@host``.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.grpc.channel import GrpcEndpoint
from nixcas.castore.sizerule import SizeRule
from nixcas.composition import pathinfo_service_from_url
from nixcas.errors import ConfigurationError, NixcasError
from nixcas.registry import parse_service_url
from nixcas.store import nixbase32
from nixcas.store.pathinfo.nixhttp import NixHttpPathInfoService, NixHttpPathInfoServiceConfig
from nixcas.store.signing import SigningKey
from nixcas.testing.daemon import running_daemon
from nixcas.urls import scrubbed, shown

SECRET = "Zq7-pass-not-for-logs"  # noqa: S105 (a made-up password that must never be shown)
KEY = SigningKey.generate("upstream.test-1")
OTHER = SigningKey.generate("other.test-1")


def hash_part(n: int) -> str:
    return nixbase32.encode(bytes([n]) * 20)


def narinfo(n: int, signer: SigningKey) -> bytes:
    """A well-formed narinfo for ``/nix/store/<hash n>-x`` signed by ``signer`` (its NAR is not served)."""
    path = f"/nix/store/{hash_part(n)}-x"
    nar_hash = nixbase32.encode(bytes([n]) * 32)
    sig = signer.sign(f"1;{path};sha256:{nar_hash};8;".encode())
    return (
        f"StorePath: {path}\nURL: nar/{nar_hash}.nar\nCompression: none\n"
        f"NarHash: sha256:{nar_hash}\nNarSize: 8\nReferences: \nSig: {sig}\n"
    ).encode()


UNPARSABLE, BADLY_SIGNED, UPSTREAM_500, NAR_500 = 1, 2, 3, 4


class Upstream(http.server.BaseHTTPRequestHandler):
    """A binary cache that fails in each way the bridge reports (needs basic auth with SECRET)."""

    files: ClassVar[dict[str, bytes]] = {
        f"/{hash_part(UNPARSABLE)}.narinfo": b"this is not a narinfo\n",
        f"/{hash_part(BADLY_SIGNED)}.narinfo": narinfo(BADLY_SIGNED, OTHER),
        f"/{hash_part(NAR_500)}.narinfo": narinfo(NAR_500, KEY),
    }

    def do_GET(self) -> None:
        expected = "Basic " + base64.b64encode(f"user:{SECRET}".encode()).decode()
        if self.headers.get("Authorization") != expected:
            self.send_response(401)
        elif self.path in self.files:
            body = self.files[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        else:
            self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def upstream_url() -> Iterator[str]:
    """``nix+http://user:SECRET@127.0.0.1:PORT/?trusted-public-keys=KEY``."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        yield f"nix+http://user:{SECRET}@127.0.0.1:{port}/?trusted-public-keys={KEY.public}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310 (loopback)
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_bridge_hides_the_upstream_password(upstream_url: str, tmp_path: Path) -> None:
    """Start-up log line, warnings, the 404 and 500 bodies: the URL shown as user:***@."""
    args = ["--path-info-service-addr", upstream_url]
    with running_daemon(store=tmp_path / "store", log=tmp_path / "log", global_args=args, command="nar-bridge") as d:
        bodies = {n: get(f"{d.url}/{hash_part(n)}.narinfo") for n in (UNPARSABLE, BADLY_SIGNED, UPSTREAM_500, NAR_500)}
        log = d.stderr()
    assert bodies[UNPARSABLE][0] == 404 and bodies[BADLY_SIGNED][0] == 404, bodies
    assert bodies[UPSTREAM_500][0] == 500 and bodies[NAR_500][0] == 500, bodies
    assert "no valid signature" in bodies[BADLY_SIGNED][1] and "HTTP 500" in bodies[UPSTREAM_500][1]
    for _, body in bodies.values():
        assert SECRET not in body
        assert "user:***@127.0.0.1" in body, body  # the URL is there, without its password
    assert SECRET not in log
    assert "NixHttpPathInfoService('http://user:***@127.0.0.1" in log  # the start-up line
    assert log.count("WARNING") >= 2 and log.count("ERROR") >= 2, log


def test_daemon_hides_the_upstream_password(upstream_url: str, tmp_path: Path) -> None:
    """Start-up log line, error log lines and the gRPC status details of each upstream failure."""
    args = ["--path-info-service-addr", upstream_url]
    with running_daemon(store=tmp_path / "store", log=tmp_path / "log", global_args=args) as d:

        async def lookups() -> list[str]:
            client = await pathinfo_service_from_url(d.client_url())
            errors = []
            try:
                for n in (UNPARSABLE, BADLY_SIGNED, UPSTREAM_500, NAR_500):
                    with pytest.raises(NixcasError) as raised:
                        await client.get(nixbase32.decode(hash_part(n)))
                    errors.append(str(raised.value))
            finally:
                await client.close()
            return errors

        errors = asyncio.run(lookups())
        log = d.stderr()
    for error in errors:
        assert SECRET not in error
        assert "user:***@127.0.0.1" in error, error
    assert SECRET not in log
    assert "NixHttpPathInfoService('http://user:***@127.0.0.1" in log


def test_grpc_url_with_credentials_is_refused_without_echoing_them(tmp_path: Path) -> None:
    url = f"grpc+http://u:{SECRET}@127.0.0.1:1"
    with pytest.raises(ConfigurationError, match="credentials in the URL are not supported") as raised:
        GrpcEndpoint.parse(url)
    assert SECRET not in str(raised.value) and "u:***@" in str(raised.value)
    for kind in ("blobservices", "directoryservices", "pathinfoservices"):
        with pytest.raises(ConfigurationError) as raised:
            parse_service_url(kind, url)
        assert SECRET not in str(raised.value)


def test_cli_refusal_does_not_echo_the_secret(tmp_path: Path) -> None:
    import subprocess

    from nixcas.testing.daemon import clean_env, nixcas_command

    for option in ("--blob-service-addr", "--directory-service-addr"):
        url = f"grpc+http://u:{SECRET}@127.0.0.1:1"
        cmd = nixcas_command("--store-dir", str(tmp_path / "s"), option, url, "castore", "ls", "0" * 64)
        result = subprocess.run(cmd, capture_output=True, env=clean_env(), timeout=60, check=False)
        assert result.returncode == 2, result
        assert SECRET.encode() not in result.stderr + result.stdout
        assert b"u:***@127.0.0.1" in result.stderr


def test_reprs_of_services_with_credentials(upstream_url: str) -> None:
    config = parse_service_url("pathinfoservices", upstream_url)
    assert SECRET not in repr(config) and "user:***@" in repr(config)

    assert isinstance(config, NixHttpPathInfoServiceConfig)
    text = repr(NixHttpPathInfoService(config.base_url, MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX)))
    assert SECRET not in text and "user:***@" in text
    for kind, url in (
        (
            "blobservices",
            f"objectstore+s3://bucket/p?endpoint=http://u:{SECRET}@127.0.0.1:1&secret_access_key={SECRET}",
        ),
        ("directoryservices", f"objectstore+s3://bucket/p?access_key_id=a&secret_access_key={SECRET}"),
        ("directoryservices", f"postgresql://u:{SECRET}@127.0.0.1:1/db"),
        ("pathinfoservices", f"postgresql://u:{SECRET}@127.0.0.1:1/db?sslmode=disable"),
    ):
        assert SECRET not in repr(parse_service_url(kind, url))
    for kind in ("blobservices", "pathinfoservices"):  # refused: the refusal does not echo it either
        with pytest.raises(ConfigurationError) as raised:
            parse_service_url(kind, f"postgresql://u:{SECRET}@127.0.0.1:1/db?password={SECRET}")
        assert SECRET not in str(raised.value) and "u:***@" in str(raised.value)


def test_the_one_redaction() -> None:
    assert shown(f"nix+https://user:{SECRET}@h/p?x=1") == "nix+https://user:***@h/p?x=1"
    assert shown(f"s3://b?endpoint=http://k:{SECRET}@h:1&secret_access_key={SECRET}&region=r") == (
        "s3://b?endpoint=http://k:***@h:1&secret_access_key=***&region=r"
    )
    assert shown(f"postgresql://u@h/db?password={SECRET}") == "postgresql://u@h/db?password=***"
    assert shown("http://[::1") == "<unparsable URL>"
    url = f"http://user:{SECRET}@h/?token=t0k3n"
    assert (
        scrubbed(f"Cannot connect to {url}; token t0k3n", url)
        == "Cannot connect to http://user:***@h/?token=***; token ***"
    )


async def test_object_store_errors_hide_the_credentials_they_were_given() -> None:
    """A library message (here: the endpoint refused the connection) is scrubbed of every credential."""
    from nixcas.castore.objectstore import open_object_store
    from nixcas.testing.daemon import free_port

    endpoint = f"http://user:{SECRET}@127.0.0.1:{free_port()}"
    options = {
        "endpoint": endpoint,
        "region": "r",
        "access_key_id": "AKIA-not-secret",
        "secret_access_key": SECRET + "-2",
        "max_retries": "0",
    }
    with pytest.raises(NixcasError) as raised:
        await open_object_store("s3://bucket/prefix", options)
    assert SECRET not in str(raised.value), str(raised.value)
    assert "unreachable" in str(raised.value)

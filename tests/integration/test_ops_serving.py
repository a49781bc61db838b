"""Operating the servers: draining on stop, /healthz, systemd activation and notification, TLS, exposure checks.

Mostly in process (the servers' own stop paths); one ``daemon --nar-bridge`` process checks the
whole signal path: systemd's sockets, READY/STOPPING, NOT_SERVING at once, and an exit within
the grace period + 1 s while a NAR download and a gRPC Read are stuck on clients that stopped reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import os
import re
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest
import pytest_asyncio
from aiohttp import ClientSession, TCPConnector
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nixcas._proto.tvix.castore.protos import rpc_blobstore_pb2 as blob_pb
from nixcas._proto.tvix.castore.protos import rpc_blobstore_pb2_grpc as blob_grpc
from nixcas.bridge.app import NarBridge, nar_url
from nixcas.bridge.server import CANCEL_WAIT, start_bridge
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.nodes import FileNode
from nixcas.cli.serving import DeploymentOptions
from nixcas.errors import ConfigurationError
from nixcas.listen import check_exposure, parse_listen_address, socket_is_loopback
from nixcas.server import start_server
from nixcas.store.importer import Services, import_path
from nixcas.store.nar.hashing import SimpleNarCalculationService
from nixcas.store.narindex import NarIndex
from nixcas.store.pathinfo.memory import MemoryPathInfoService
from nixcas.store.pathinfo.model import PathInfo
from nixcas.systemd import ActivatedSockets, notify
from nixcas.testing.daemon import as_systemd_starts, clean_env, nixcas_command
from nixcas.tls import ServerTls

BIG = 24 << 20
"""A file big enough that a client that stops reading leaves its server blocked on a full connection."""
GRACE = 0.6


@dataclass
class Stores:
    blobs: MemoryBlobService
    dirs: MemoryDirectoryService
    pathinfos: MemoryPathInfoService
    info: PathInfo

    @property
    def digest(self) -> bytes:
        assert isinstance(self.info.node, FileNode)
        return bytes(self.info.node.digest)


@pytest_asyncio.fixture
async def stores(tmp_path: Path) -> Stores:
    blobs, dirs, pathinfos = MemoryBlobService(), MemoryDirectoryService(), MemoryPathInfoService()
    (tmp_path / "big").write_bytes(b"\x5a" * BIG)
    info = await import_path(
        tmp_path / "big", Services(blobs, dirs, pathinfos, SimpleNarCalculationService(blobs, dirs))
    )
    return Stores(blobs, dirs, pathinfos, info)


# -- listen addresses and exposure -----------------------------------------------------------


def test_listen_addresses() -> None:
    assert parse_listen_address("[::1]:8000").url() == "grpc+http://[::1]:8000"
    assert parse_listen_address("127.0.0.1:0").url(4242) == "grpc+http://127.0.0.1:4242"
    for text, loopback in [("127.0.0.1:1", True), ("[::1]:1", True), ("localhost:1", True), ("0.0.0.0:1", False),
                           ("[::]:1", False), ("cache.example.org:1", False), ("./sock", True)]:  # fmt: skip
        assert parse_listen_address(text).is_loopback is loopback, text
    for port in ("65536", "99999", "123456789012345678901234567890"):
        with pytest.raises(ConfigurationError, match=rf"port {port[:12]} is out of range \(0 to 65535\)"):
            parse_listen_address(f"127.0.0.1:{port}")
    with socket.create_server(("127.0.0.1", 0)) as local:
        assert socket_is_loopback(local)


def test_exposure_refused_beyond_loopback() -> None:
    with pytest.raises(ConfigurationError) as e:
        check_exposure("0.0.0.0:9", False, open_writes="--allow-writes accepts uploads from anyone", i_know=False)
    assert "--allow-writes accepts uploads from anyone" in str(e.value)
    assert "--i-know-this-is-public" in str(e.value)
    check_exposure("0.0.0.0:9", False, open_writes="x", i_know=True)
    check_exposure("0.0.0.0:9", False, open_writes=None, i_know=False)  # a credential is configured
    check_exposure("127.0.0.1:9", True, open_writes="x", i_know=False)
    with_client_certs = DeploymentOptions("c", "k", "ca", False)
    with_client_certs.check_exposure("[::]:9", None, "the gRPC daemon accepts writes without authentication")
    with pytest.raises(ConfigurationError, match="gRPC daemon accepts writes without authentication"):
        DeploymentOptions(None, None, None, False).check_exposure("[::]:9", None, "the gRPC daemon accepts writes "
                                                                  "without authentication")  # fmt: skip


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (("daemon", "-l", "0.0.0.0:0"), "the gRPC daemon accepts writes without authentication"),
        (("nar-bridge", "--allow-writes", "-l", "[::]:0", "--workers", "1"), "--allow-writes accepts uploads"),
    ],
)
def test_cli_refuses_public_writes_before_binding(tmp_path: Path, args: tuple[str, ...], reason: str) -> None:
    from click.testing import CliRunner

    from nixcas.cli.app import cli

    result = CliRunner().invoke(cli, ["--store-dir", str(tmp_path / "s"), *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and reason in lines[0] and "--i-know-this-is-public" in lines[0], result.output
    assert not (tmp_path / "s").exists()  # refused before the store was even opened


# -- systemd ------------------------------------------------------------------------------------


def test_notify_sends_one_datagram(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(tmp_path / "notify"))
        assert notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "notify")})
        assert listener.recv(100) == b"READY=1"
    assert not notify("READY=1", {})
    with pytest.raises(ConfigurationError):
        notify("READY=1", {"NOTIFY_SOCKET": "relative"})


def test_activation_needs_this_process_and_names_choose() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "grpc:nar-bridge"}
    assert not ActivatedSockets.from_environment(env)
    assert env == {}  # never passed on to children
    with socket.socket() as a, socket.socket() as b:
        named = ActivatedSockets([("nar-bridge", a), ("grpc", b)])
        assert named.take("grpc", 0) is b and named.take("nar-bridge", 1) is a
        assert named.take("nix-daemon", 0) is None
        unnamed = ActivatedSockets([("", a), ("", b)])
        assert unnamed.take("grpc", 0) is a and unnamed.take("nar-bridge", 1) is b
    with pytest.raises(ConfigurationError, match="LISTEN_FDS"):
        ActivatedSockets.from_environment({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "x"})


# -- draining: gRPC ------------------------------------------------------------------------------


async def _read_all(call: grpc.aio.UnaryStreamCall) -> int:
    total = 0
    while (chunk := await call.read()) is not grpc.aio.EOF:
        total += len(chunk.data)
    return total


@pytest.mark.parametrize("reader_resumes", [True, False])
async def test_grpc_stop_drains_then_cancels(stores: Stores, reader_resumes: bool) -> None:
    running = await start_server("127.0.0.1:0", stores.blobs, stores.dirs, pathinfos=stores.pathinfos)
    target = running.url.removeprefix("grpc+http://")
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            blob = blob_grpc.BlobServiceStub(channel)
            read = blob.Read(blob_pb.ReadBlobRequest(digest=stores.digest))
            first = len((await read.read()).data)  # then the client stops reading
            started = time.monotonic()
            stopping = asyncio.create_task(running.stop(GRACE))
            assert (await asyncio.wait_for(watch.read(), 0.5)).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await blob.Stat(blob_pb.StatBlobRequest(digest=stores.digest), timeout=1)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            if reader_resumes:
                assert first + await _read_all(read) == BIG  # the call in flight finishes
                await stopping
                assert time.monotonic() - started < GRACE
            else:
                await stopping
                assert time.monotonic() - started < GRACE + 0.5
                with pytest.raises(grpc.aio.AioRpcError):
                    await _read_all(read)
    finally:
        await running.stop(0)


# -- draining: the bridge -------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def stalled_download(port: int, path: str) -> AsyncIterator[tuple[asyncio.StreamReader, int]]:
    """A GET whose client read the headers, then stopped reading: the reader, and the Content-Length."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 16)
    writer.write(f"GET /{path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    length = re.search(rb"Content-Length: (\d+)", head, re.IGNORECASE)
    assert length is not None
    try:
        yield reader, int(length.group(1))
    finally:
        writer.close()


async def _status(session: ClientSession, url: str) -> int:
    async with session.get(url) as r:
        return r.status


@pytest.mark.parametrize("reader_resumes", [True, False])
async def test_bridge_stop_drains_then_cancels(stores: Stores, reader_resumes: bool) -> None:
    bridge = NarBridge(stores.blobs, stores.dirs, stores.pathinfos, NarIndex(None))
    running = await start_bridge("127.0.0.1:0", bridge, shutdown_grace=GRACE)
    port = int(running.url.rpartition(":")[2])
    try:
        async with ClientSession(connector=TCPConnector(force_close=True)) as http:
            assert await _status(http, f"{running.url}/healthz") == 200
            nar = nar_url(stores.info.node, stores.info.nar_size)
            async with stalled_download(port, nar) as (reader, length):
                assert length == stores.info.nar_size
                started = time.monotonic()
                stopping = asyncio.create_task(running.stop())
                await asyncio.sleep(0)
                assert await _status(http, f"{running.url}/healthz") == 503
                assert await _status(http, f"{running.url}/nix-cache-info") == 503  # no new request
                received = 0
                if reader_resumes:
                    while data := await reader.read(1 << 20):
                        received += len(data)
                    assert received == length  # the download in flight finishes
                    await stopping
                    assert time.monotonic() - started < GRACE
                else:
                    await stopping
                    assert time.monotonic() - started < GRACE + 2 * CANCEL_WAIT + 0.3
                    with contextlib.suppress(ConnectionError):
                        while data := await reader.read(1 << 20):
                            received += len(data)
                    assert received < length  # cut off after the grace period
    finally:
        await running.stop()
        await bridge.index.close()


# -- TLS -------------------------------------------------------------------------------------------


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


async def test_tls_for_bridge_and_daemon(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    tls = ServerTls(str(cert), str(key))
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService()
    bridge = NarBridge(blobs, dirs, MemoryPathInfoService(), NarIndex(None))
    web = await start_bridge("127.0.0.1:0", bridge, ssl_context=tls.ssl_context())
    daemon = await start_server("127.0.0.1:0", blobs, dirs, tls=tls)
    try:
        assert web.url.startswith("https://127.0.0.1:") and daemon.url.startswith("grpc+https://127.0.0.1:")
        trusting = ssl.create_default_context(cafile=str(cert))
        async with ClientSession() as http:
            async with http.get(f"{web.url}/nix-cache-info", ssl=trusting) as r:
                assert r.status == 200 and "StoreDir: /nix/store" in await r.text()
            for path, status in (("/nope", 404), ("/nix-cache-info", 200)):  # handed to aiohttp over TLS: the same
                async with http.get(f"{web.url}{path}", ssl=trusting) as r:
                    assert r.status == status
            plain = web.url.replace("https://", "http://")
            with pytest.raises(Exception):  # noqa: B017,PT011 - plain HTTP gets no answer from a TLS port
                await _status(http, f"{plain}/nix-cache-info")
        target = daemon.url.removeprefix("grpc+https://")
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        async with grpc.aio.secure_channel(target, credentials) as channel:
            check = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert check.status == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.insecure_channel(target) as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
    finally:
        await web.stop()
        await daemon.stop(0)
        await bridge.index.close()


def test_tls_options_must_come_together(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="both --tls-cert and --tls-key"):
        ServerTls.from_options("c.pem", None)
    (tmp_path / "c.pem").write_text("not a certificate")
    with pytest.raises(ConfigurationError, match="not a PEM file"):
        ServerTls(str(tmp_path / "c.pem"), str(tmp_path / "c.pem")).ssl_context()


# -- the whole process: SIGTERM under systemd ---------------------------------------------------


async def test_daemon_with_bridge_under_systemd_stops_within_grace(tmp_path: Path) -> None:
    """systemd's two sockets, READY=1; on SIGTERM: STOPPING=1, NOT_SERVING and 503 at once, exit 0 in grace + 1 s."""
    from nixcas.api import Store

    store_dir = tmp_path / "store"
    (tmp_path / "big").write_bytes(b"\x5a" * BIG)
    async with await Store.open(str(store_dir), with_pathinfo=True) as store:
        assert store.pathinfos is not None
        svc = Services(store.blobs, store.directories, store.pathinfos, store.nar_calculation())
        info = await import_path(tmp_path / "big", svc)
    assert isinstance(info.node, FileNode)
    grpc_sock = socket.create_server(("127.0.0.1", 0))
    bridge_sock = socket.create_server(("127.0.0.1", 0))
    grpc_port, bridge_port = grpc_sock.getsockname()[1], bridge_sock.getsockname()[1]
    notifications = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notifications.bind(str(tmp_path / "notify"))
    notifications.setblocking(False)
    env = {
        **clean_env(),
        "LISTEN_FDS": "2",
        "LISTEN_FDNAMES": "nar-bridge:grpc",
        "NOTIFY_SOCKET": str(tmp_path / "notify"),
    }
    grace = 0.5

    command = nixcas_command("--store-dir", str(store_dir), "daemon", "-l", "127.0.0.1:1", "--nar-bridge",
                             "127.0.0.1:1", "--shutdown-grace", str(grace))  # fmt: skip
    argv, fds = as_systemd_starts(command, [bridge_sock, grpc_sock])  # at fds 3 and 4
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once, waited for in an executor
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, pass_fds=fds
    )
    for fd in fds:
        os.close(fd)
    grpc_sock.close()
    bridge_sock.close()
    loop = asyncio.get_running_loop()
    try:
        assert await asyncio.wait_for(loop.sock_recv(notifications, 100), 30) == b"READY=1"
        assert proc.stdout is not None
        lines = [proc.stdout.readline().decode().strip() for _ in range(2)]
        assert lines == [
            f"listening on grpc+http://127.0.0.1:{grpc_port}",
            f"listening on http://127.0.0.1:{bridge_port}",
        ]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            read = blob_grpc.BlobServiceStub(channel).Read(blob_pb.ReadBlobRequest(digest=bytes(info.node.digest)))
            await read.read()  # a gRPC Read whose client stops reading
            async with stalled_download(bridge_port, nar_url(info.node, info.nar_size)) as (reader, length):
                started = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(loop.sock_recv(notifications, 100), 1) == b"STOPPING=1"
                assert (await asyncio.wait_for(watch.read(), 1)).status == health_pb2.HealthCheckResponse.NOT_SERVING
                async with ClientSession(connector=TCPConnector(force_close=True)) as http:
                    assert await _status(http, f"http://127.0.0.1:{bridge_port}/healthz") == 503
                code = await loop.run_in_executor(None, proc.wait, 10)
                elapsed = time.monotonic() - started
                assert code == 0, proc.stderr.read() if proc.stderr else ""  # not the overrun backstop (exit 1)
                assert elapsed < grace + 1.0, elapsed
                received = 0
                with contextlib.suppress(ConnectionError):
                    while data := await reader.read(1 << 20):
                        received += len(data)
                assert received < length
    finally:
        notifications.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_a_stop_that_overruns_ends_the_process(tmp_path: Path) -> None:
    """The backstop: a stop still hanging at grace + 0.9 s ends the process with exit 1 and one line."""
    code = "import time; from nixcas.cli.serving import shutdown_deadline; shutdown_deadline(0.1); time.sleep(30)"
    started = time.monotonic()
    result = subprocess.run(
        [*nixcas_command()[:1], "-c", code], capture_output=True, text=True, env=clean_env(), timeout=30, check=False
    )
    assert time.monotonic() - started < 10
    assert result.returncode == 1
    assert result.stderr == "nixcas: error: shutdown took longer than 0.1 s + 0.9 s; exiting\n"


async def test_tls_client_certificates_are_required_with_a_client_ca(tmp_path: Path) -> None:
    """``--tls-client-ca`` (which lifts the beyond-loopback refusal) really turns away clients without a certificate."""
    cert, key = self_signed(tmp_path)  # self-signed: its own CA, so it serves as the client's certificate too
    tls = ServerTls(str(cert), str(key), client_ca=str(cert))
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService()
    bridge = NarBridge(blobs, dirs, MemoryPathInfoService(), NarIndex(None))
    web = await start_bridge("127.0.0.1:0", bridge, ssl_context=tls.ssl_context())
    daemon = await start_server("127.0.0.1:0", blobs, dirs, tls=tls)
    try:
        anonymous = ssl.create_default_context(cafile=str(cert))
        with_cert = ssl.create_default_context(cafile=str(cert))
        with_cert.load_cert_chain(str(cert), str(key))
        async with ClientSession(connector=TCPConnector(force_close=True)) as http:
            async with http.get(f"{web.url}/nix-cache-info", ssl=with_cert) as r:
                assert r.status == 200
            with pytest.raises(Exception):  # noqa: B017,PT011 - the handshake (or first read) fails
                async with http.get(f"{web.url}/nix-cache-info", ssl=anonymous) as r:
                    await r.read()
        target = daemon.url.removeprefix("grpc+https://")
        request = health_pb2.HealthCheckRequest(service="")
        trusted = cert.read_bytes()
        mutual = grpc.ssl_channel_credentials(trusted, key.read_bytes(), cert.read_bytes())
        async with grpc.aio.secure_channel(target, mutual) as channel:
            assert (
                await health_pb2_grpc.HealthStub(channel).Check(request)
            ).status == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(trusted)) as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await health_pb2_grpc.HealthStub(channel).Check(request, timeout=2)
    finally:
        await web.stop()
        await daemon.stop(0)
        await bridge.index.close()

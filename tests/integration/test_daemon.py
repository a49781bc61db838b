"""`nixcas daemon` as a real subprocess: the contract suites over the wire, health,
reflection, graceful shutdown, disconnects and startup errors.

Two module-scoped daemons (TCP and a unix socket, each over its own embedded
store) serve the contract suites.  The suites expect an empty store per test,
so :meth:`Daemon.reset` empties the store on disk between tests (object
files and the directories table; shard directories, ``.links/`` and
``blobs/tmp/`` are kept, so leftover temp files still show).  Tests that stop
or break a daemon start their own.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import ClassVar, cast

import blake3
import grpc
import grpc.aio
import pytest
import pytest_asyncio
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from test_blobservice import corrupt_object

from nixcas.castore.blob.base import BlobService
from nixcas.castore.blob.grpc import GrpcBlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.dirs.grpc import GrpcDirectoryService
from nixcas.castore.grpc.status import RemoteError
from nixcas.composition import blob_service_from_url, directory_service_from_url
from nixcas.errors import StorageError
from nixcas.testing import packed
from nixcas.testing.blobservice import BlobCorrupter, BlobServiceSuite, TempFiles
from nixcas.testing.daemon import (
    STARTUP_TIMEOUT,
    Daemon,
    clean_env,
    files_under,
    free_port,
    nixcas_command,
    read_line,
    running_daemon,
    short_tmpdir,
)
from nixcas.testing.directoryservice import DirectoryServiceSuite, RawStore
from nixcas.testing.fixtures import DIRECTORY_A, DIRECTORY_B, DIRECTORY_WITH_KEEP

SPILL = (1 << 20) + 4096
"""More than the local backend buffers in memory: a Put this large has a temp file under blobs/tmp."""

CASTORE_SERVICES = {
    "tvix.castore.v1.BlobService",
    "tvix.castore.v1.DirectoryService",
    "snix.castore.v1.BlobService",
    "snix.castore.v1.DirectoryService",
    "snix.castore.v1.ChunkStoreService",
    "snix.castore.v1.BlobStoreService",
}
HEALTH = "grpc.health.v1.Health"
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
REFLECTION_V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"

# blake3 of the DIRECTORY_* fixtures, from the tvix vectors (not computed by nixcas)
DIGEST_A = bytes.fromhex("af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262")
DIGEST_B = bytes.fromhex("8701f4722d8dae7f2c40fa003331b8437a3825f9e1bfd3a77998c64cc226b9cc")
DIGEST_WITH_KEEP = bytes.fromhex("8b5b5d642b646bb8ed504b0862c39413e87e57491497de7bd075953f7b83810e")


def b3(data: bytes) -> B3Digest:
    return B3Digest(blake3.blake3(data).digest())


def noise(seed: bytes, size: int) -> bytes:
    """Deterministic incompressible bytes."""
    return blake3.blake3(seed).digest(length=size)


# -- running nixcas ------------------------------------------------------------------


def run_nixcas(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run nixcas to completion (for invocations expected to fail at startup)."""
    return subprocess.run(
        nixcas_command(*args), capture_output=True, text=True, env=clean_env(), timeout=timeout, check=False
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int | None, *fragments: str) -> str:
    """Exit ``code`` (any non-zero code for ``None``), exactly one ``nixcas: error:`` line on stderr."""
    if code is None:
        assert result.returncode not in (0, None), result
    else:
        assert result.returncode == code, result
    assert result.stdout == "", result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("nixcas: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], result.stderr
    return lines[0]


def stale_socket(path: Path) -> None:
    """Leave a socket file at ``path`` that nobody listens on (as a killed daemon does)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen()
    s.close()
    assert stat.S_ISSOCK(path.lstat().st_mode)


def spawn_python(script: str) -> subprocess.Popen[bytes]:
    """A Python subprocess running ``script``, its stdout piped."""
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=clean_env())


DAMAGED: set[Path] = set()
"""Stores the suites' raw hooks wrote to past every check (see :func:`assert_clean_exit`)."""

DAMAGE_REPORTED = re.compile(
    r"Z ERROR nixcas\.castore\.grpc\.status: (DirectoryService\.Get failed: directory|BlobService\.\w+ failed: blob)"
    r" [0-9a-f]{64}(: checksum mismatch| is stored in an invalid form| is referenced but missing)"
)
"""How the daemon reports the damage the raw hook made (what the suite's clients see as errors)."""


def assert_clean_exit(daemon: Daemon, code: int) -> None:
    """Exit code 0, and nothing went wrong on the way (the daemon logs as ``TIME LEVEL logger: …``).

    A store the raw hook damaged may log that damage, and only that.
    """
    stderr = daemon.stderr()
    if daemon.store in DAMAGED:
        stderr = "\n".join(line for line in stderr.splitlines() if not DAMAGE_REPORTED.search(line))
    assert code == 0, stderr
    assert "Traceback" not in stderr, stderr
    for level in ("WARNING", "ERROR", "CRITICAL"):
        assert f"Z {level} " not in stderr, stderr
    assert "nixcas: error:" not in stderr, stderr


async def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# -- the shared daemons ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tcp_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    base = tmp_path_factory.mktemp("tcp-daemon")
    with running_daemon("-l", "127.0.0.1:0", store=base / "store", log=base / "stderr") as daemon:
        assert daemon.url.startswith("grpc+http://127.0.0.1:")
        yield daemon
        assert_clean_exit(daemon, daemon.stop())


@pytest.fixture(scope="module")
def unix_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    base = tmp_path_factory.mktemp("unix-daemon")
    with short_tmpdir() as sockets:
        sock = sockets / "castore.sock"
        # the service options given after the subcommand this time
        with running_daemon("-l", str(sock), store=base / "store", log=base / "stderr", store_global=False) as daemon:
            assert daemon.url == f"grpc+unix://{sock}"
            yield daemon
            assert_clean_exit(daemon, daemon.stop())
            assert not sock.exists()


@pytest.fixture(params=["tcp", "unix"])
def any_daemon(request: pytest.FixtureRequest) -> Daemon:
    return cast(Daemon, request.getfixturevalue(f"{request.param}_daemon"))


# -- the contract suites through the daemon ------------------------------------------------


class DaemonBlobSuite(BlobServiceSuite):
    """The BlobService contract through GrpcBlobService and a daemon (subclasses pick it)."""

    covers = ("grpc",)

    protocol: ClassVar[str] = "tvix"

    @pytest_asyncio.fixture
    async def blob_service(self, daemon: Daemon) -> AsyncIterator[BlobService]:
        daemon.reset()
        svc = await blob_service_from_url(daemon.client_url(protocol=self.protocol))
        assert isinstance(svc, GrpcBlobService)
        yield svc
        await svc.close()

    @pytest.fixture
    def temp_files(self, daemon: Daemon) -> TempFiles:
        return daemon.settled_temp_files

    corruption_error = StorageError  # the client's own check, or its server's DATA_LOSS

    @pytest.fixture
    def corrupt_blob(self, daemon: Daemon) -> BlobCorrupter:
        """Damage the daemon's embedded store on disk (a pack row, else an object file)."""
        assert daemon.store is not None
        root = daemon.store / "blobs"

        async def corrupt(digest: B3Digest, data: bytes) -> None:
            DAMAGED.add(root.parent)
            if not packed.corrupt_blob(root, digest, data):
                corrupt_object(root, digest, data)

        return corrupt


class DaemonDirectorySuite(DirectoryServiceSuite):
    """The DirectoryService contract through GrpcDirectoryService and a daemon."""

    covers = ("grpc",)

    protocol: ClassVar[str] = "tvix"

    @pytest_asyncio.fixture
    async def directory_service(self, daemon: Daemon) -> AsyncIterator[DirectoryService]:
        daemon.reset()
        svc = await directory_service_from_url(daemon.client_url(protocol=self.protocol))
        assert isinstance(svc, GrpcDirectoryService)
        yield svc
        await svc.close()

    corruption_error = RemoteError

    @pytest.fixture
    def store_raw(self, daemon: Daemon) -> RawStore:
        """A row of the daemon's directories.sqlite, written past every check (it caches none)."""
        assert daemon.store is not None
        path = daemon.store / "directories.sqlite"

        async def store(digest: B3Digest, raw: bytes) -> None:
            DAMAGED.add(path.parent)
            db = sqlite3.connect(path, timeout=10)
            try:
                with db:
                    db.execute("INSERT OR REPLACE INTO directories (digest, data) VALUES (?, ?)", (digest, raw))
            finally:
                db.close()

        return store


class TestTcpDaemonBlobService(DaemonBlobSuite):
    @pytest.fixture
    def daemon(self, tcp_daemon: Daemon) -> Daemon:
        return tcp_daemon


class TestUnixDaemonBlobService(DaemonBlobSuite):
    @pytest.fixture
    def daemon(self, unix_daemon: Daemon) -> Daemon:
        return unix_daemon


class TestTcpDaemonDirectoryService(DaemonDirectorySuite):
    @pytest.fixture
    def daemon(self, tcp_daemon: Daemon) -> Daemon:
        return tcp_daemon


class TestUnixDaemonDirectoryService(DaemonDirectorySuite):
    @pytest.fixture
    def daemon(self, unix_daemon: Daemon) -> Daemon:
        return unix_daemon


class TestUnixDaemonSnixBlobService(TestUnixDaemonBlobService):
    protocol = "snix"


class TestUnixDaemonSnixDirectoryService(TestUnixDaemonDirectoryService):
    protocol = "snix"


# -- protocol=snix ----------------------------------------------------------------------


async def test_snix_protocol_round_trips(unix_daemon: Daemon) -> None:
    """A client speaking the snix names; what it stores is the same store the tvix names see."""
    unix_daemon.reset()
    snix_blobs = await blob_service_from_url(unix_daemon.client_url(protocol="snix"))
    snix_dirs = await directory_service_from_url(unix_daemon.client_url(protocol="snix"))
    tvix_blobs = await blob_service_from_url(unix_daemon.client_url())
    try:
        for data in (b"", b"snix", noise(b"snix big", 700_000)):
            assert await snix_blobs.put(data) == b3(data)
            assert await snix_blobs.read(b3(data)) == data
            assert await tvix_blobs.read(b3(data)) == data
        via_tvix = noise(b"via tvix", 1000)
        await tvix_blobs.put(via_tvix)
        assert await snix_blobs.read(b3(via_tvix)) == via_tvix
        assert not await snix_blobs.has(b3(b"never stored"))

        putter = snix_dirs.put_multiple_start()
        await putter.put(DIRECTORY_A)
        await putter.put(DIRECTORY_B)
        assert await putter.close() == DIGEST_B
        got = [d.digest async for d in snix_dirs.get_recursive(B3Digest(DIGEST_B))]
        assert got == [DIGEST_B, DIGEST_A]
        assert await snix_dirs.get(B3Digest(DIGEST_WITH_KEEP)) is None
    finally:
        await snix_blobs.close()
        await snix_dirs.close()
        await tvix_blobs.close()


async def test_snix_method_paths_are_served(unix_daemon: Daemon) -> None:
    """The raw ``/snix.castore.v1.BlobService/Stat`` path answers (not only the client's choice of it)."""
    unix_daemon.reset()
    async with grpc.aio.insecure_channel(unix_daemon.target) as channel:
        for prefix in ("tvix", "snix"):
            stat_method = channel.unary_unary(f"/{prefix}.castore.v1.BlobService/Stat")
            # StatBlobRequest{digest = blake3("")}: field 1, 32 bytes
            request = b"\x0a\x20" + blake3.blake3(b"").digest()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stat_method(request)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
        missing = channel.unary_unary("/nix.castore.v1.BlobService/Stat")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await missing(b"")
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


# -- health -------------------------------------------------------------------------------


async def test_health(any_daemon: Daemon) -> None:
    async with grpc.aio.insecure_channel(any_daemon.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", "tvix.castore.v1.BlobService", "snix.castore.v1.DirectoryService", *CASTORE_SERVICES):
            response = await stub.Check(health_pb2.HealthCheckRequest(service=name))
            assert response.status == health_pb2.HealthCheckResponse.SERVING, name
        for unknown in ("nope.v1.Service", "tvix.castore.v1.NoSuchService"):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Check(health_pb2.HealthCheckRequest(service=unknown))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND


# -- reflection ----------------------------------------------------------------------------


async def reflect(
    channel: grpc.aio.Channel, version: str, requests: Sequence[reflection_pb2.ServerReflectionRequest]
) -> list[reflection_pb2.ServerReflectionResponse]:
    """One ServerReflectionInfo stream over ``grpc.reflection.<version>`` (v1 and v1alpha share the messages)."""
    method = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    call = method(iter(requests))
    return [cast(reflection_pb2.ServerReflectionResponse, r) async for r in call]


def file_descriptors(
    response: reflection_pb2.ServerReflectionResponse,
) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    assert response.WhichOneof("message_response") == "file_descriptor_response", response
    files = {}
    for raw in response.file_descriptor_response.file_descriptor_proto:
        proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
        files[proto.name] = proto
    return files


@pytest.mark.parametrize("version", ["v1alpha", "v1"])
async def test_reflection_list_services(any_daemon: Daemon, version: str) -> None:
    async with grpc.aio.insecure_channel(any_daemon.target) as channel:
        (response,) = await reflect(channel, version, [reflection_pb2.ServerReflectionRequest(list_services="")])
    names = {s.name for s in response.list_services_response.service}
    assert names >= CASTORE_SERVICES | {HEALTH, REFLECTION_V1, REFLECTION_V1ALPHA}, names


@pytest.mark.parametrize("version", ["v1alpha", "v1"])
@pytest.mark.parametrize("prefix", ["tvix", "snix"])
async def test_reflection_file_containing_symbol(any_daemon: Daemon, version: str, prefix: str) -> None:
    requests = [
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=f"{prefix}.castore.v1.DirectoryService"),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=f"{prefix}.castore.v1.BlobService"),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=f"{prefix}.castore.v1.Directory"),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=f"{prefix}.castore.v1.NoSuchThing"),
    ]
    async with grpc.aio.insecure_channel(any_daemon.target) as channel:
        dirs, blobs, castore, missing = await reflect(channel, version, requests)

    rpc_directory = f"{prefix}/castore/protos/rpc_directory.proto"
    castore_proto = f"{prefix}/castore/protos/castore.proto"
    files = file_descriptors(dirs)
    assert set(files) >= {rpc_directory, castore_proto}
    main = files[rpc_directory]
    assert main.package == f"{prefix}.castore.v1"
    assert castore_proto in main.dependency
    (service,) = main.service
    assert service.name == "DirectoryService"
    assert {m.name for m in service.method} == {"Get", "Put"}
    put = next(m for m in service.method if m.name == "Put")
    assert put.client_streaming and not put.server_streaming
    assert put.input_type == f".{prefix}.castore.v1.Directory"
    assert "Directory" in {m.name for m in files[castore_proto].message_type}

    files = file_descriptors(blobs)
    blob_file = f"{prefix}/castore/protos/" + ("rpc_blobstore.proto" if prefix == "tvix" else "rpc_blobservice.proto")
    assert blob_file in files
    (service,) = files[blob_file].service
    assert {m.name for m in service.method} == {"Stat", "Read", "Put"}

    assert castore_proto in file_descriptors(castore)

    assert missing.WhichOneof("message_response") == "error_response"
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


async def test_reflection_describes_itself_and_health(any_daemon: Daemon) -> None:
    """v1 has its own descriptor (package grpc.reflection.v1), so grpcurl's v1 client can resolve it."""
    async with grpc.aio.insecure_channel(any_daemon.target) as channel:
        health_response, v1_response = await reflect(
            channel,
            "v1",
            [
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=HEALTH),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=REFLECTION_V1),
            ],
        )
    (health_file,) = (f for f in file_descriptors(health_response).values() if f.package == "grpc.health.v1")
    assert health_file.service[0].name == "Health"
    v1_files = file_descriptors(v1_response)
    v1 = v1_files["grpc/reflection/v1/reflection.proto"]
    assert v1.package == "grpc.reflection.v1"
    (method,) = v1.service[0].method
    assert method.input_type == ".grpc.reflection.v1.ServerReflectionRequest"
    assert method.output_type == ".grpc.reflection.v1.ServerReflectionResponse"
    for message in v1.message_type:
        for f in message.field:
            assert "v1alpha" not in f.type_name, (message.name, f.name)


# -- graceful shutdown --------------------------------------------------------------------------


async def watch_health(channel: grpc.aio.Channel) -> AsyncGenerator[int, None]:
    stub = health_pb2_grpc.HealthStub(channel)
    async for response in stub.Watch(health_pb2.HealthCheckRequest(service="")):
        yield cast(health_pb2.HealthCheckResponse, response).status


async def test_sigterm_exits_cleanly_and_removes_the_socket(tmp_path: Path) -> None:
    with short_tmpdir() as sockets:
        sock = sockets / "d.sock"
        with running_daemon("-l", str(sock), store=tmp_path / "store", log=tmp_path / "stderr") as daemon:
            assert stat.S_ISSOCK(sock.lstat().st_mode)
            async with await blob_service_from_url(daemon.client_url()) as blobs:
                assert await blobs.put(b"before shutdown") == b3(b"before shutdown")
            started = time.monotonic()
            code = await asyncio.to_thread(daemon.stop, 10.0)
            assert time.monotonic() - started < 5
            assert_clean_exit(daemon, code)
            assert not sock.exists()
            assert daemon.temp_files() == []


async def test_sigint_exits_cleanly(tmp_path: Path) -> None:
    with running_daemon("-l", "127.0.0.1:0", store=tmp_path / "store", log=tmp_path / "stderr") as daemon:
        daemon.signal(signal.SIGINT)
        assert_clean_exit(daemon, await asyncio.to_thread(daemon.wait, 10.0))


async def test_put_in_flight_finishes_during_grace(tmp_path: Path) -> None:
    """SIGTERM: health turns NOT_SERVING, the running Put may finish, then the daemon exits 0; the blob stays."""
    store = tmp_path / "store"
    data = noise(b"in flight", 3 * SPILL)
    with short_tmpdir() as sockets:
        sock = sockets / "d.sock"
        with running_daemon("-l", str(sock), "--shutdown-grace", "20", store=store, log=tmp_path / "stderr") as daemon:
            blobs = await blob_service_from_url(daemon.client_url())
            try:
                writer = await blobs.open_write(len(data))
                await writer.write(data[:SPILL])
                await wait_until(daemon.temp_files, what="the daemon's temp file")  # the Put is running
                async with grpc.aio.insecure_channel(daemon.target) as health_channel:
                    watch = watch_health(health_channel)
                    assert await anext(watch) == health_pb2.HealthCheckResponse.SERVING
                    daemon.signal(signal.SIGTERM)
                    assert await asyncio.wait_for(anext(watch), 10) == health_pb2.HealthCheckResponse.NOT_SERVING
                    await watch.aclose()
                assert daemon.proc.poll() is None  # still in the grace period
                # no new calls are taken meanwhile (once the listener is closed, right after NOT_SERVING)
                async with await blob_service_from_url(daemon.url) as late:

                    async def refused() -> bool:
                        try:
                            await late.has(b3(data))
                        except StorageError:
                            return True
                        return False

                    deadline = time.monotonic() + 5
                    while not await refused():
                        assert time.monotonic() < deadline, "new calls are still accepted during the grace period"
                        await asyncio.sleep(0.05)
                await writer.write(data[SPILL:])
                assert await writer.close() == b3(data)
            finally:
                await blobs.close()
            started = time.monotonic()
            assert_clean_exit(daemon, await asyncio.to_thread(daemon.wait, 10.0))
            assert time.monotonic() - started < 5  # it did not wait out the 20 s grace
            assert not sock.exists()
        assert files_under(store / "blobs" / "tmp") == []
        with running_daemon("-l", str(sock), store=store, log=tmp_path / "stderr2") as daemon:
            async with await blob_service_from_url(daemon.client_url()) as blobs:
                assert await blobs.read(b3(data)) == data


async def test_put_still_open_after_grace_rolls_back(tmp_path: Path) -> None:
    store = tmp_path / "store"
    data = noise(b"too slow", 2 * SPILL)
    with running_daemon("-l", "127.0.0.1:0", "--shutdown-grace", "0.5", store=store, log=tmp_path / "stderr") as daemon:
        blobs = await blob_service_from_url(daemon.client_url())
        try:
            writer = await blobs.open_write()
            await writer.write(data[:SPILL])
            await wait_until(daemon.temp_files, what="the daemon's temp file")
            started = time.monotonic()
            daemon.signal(signal.SIGTERM)
            code = await asyncio.to_thread(daemon.wait, 10.0)
            assert time.monotonic() - started < 5
            assert code == 0, daemon.stderr()
            assert "Traceback" not in daemon.stderr()
            with pytest.raises(StorageError):  # the upload cannot complete any more
                await writer.close()
        finally:
            await blobs.close()
    assert files_under(store / "blobs" / "tmp") == []
    assert files_under(store / "blobs" / "blobs") == files_under(store / "blobs" / "chunks") == []
    with running_daemon("-l", "127.0.0.1:0", store=store, log=tmp_path / "stderr2") as daemon:
        async with await blob_service_from_url(daemon.client_url()) as blobs:
            assert not await blobs.has(b3(data))
            assert not await blobs.has(b3(data[:SPILL]))


# -- clients going away mid-Put -------------------------------------------------------------------


@pytest.fixture
def own_daemon(tmp_path: Path) -> Iterator[Daemon]:
    with running_daemon("-l", "127.0.0.1:0", store=tmp_path / "store", log=tmp_path / "stderr") as daemon:
        yield daemon
        assert_clean_exit(daemon, daemon.stop())


async def test_channel_closed_mid_put_leaves_nothing(own_daemon: Daemon) -> None:
    data = noise(b"closed channel", 2 * SPILL)
    blobs = await blob_service_from_url(own_daemon.client_url())
    writer = await blobs.open_write(len(data))
    await writer.write(data[:SPILL])
    await wait_until(own_daemon.temp_files, what="the daemon's temp file")
    await blobs.close()  # the channel goes away under the running call
    assert own_daemon.settled_temp_files() == [], own_daemon.stderr()
    async with await blob_service_from_url(own_daemon.client_url()) as fresh:
        assert not await fresh.has(b3(data))
        assert not await fresh.has(b3(data[:SPILL]))
        assert await fresh.chunks(b3(data[:SPILL])) is None
    store = own_daemon.store
    assert store is not None
    assert files_under(store / "blobs" / "blobs") == files_under(store / "blobs" / "chunks") == []


async def test_client_killed_mid_put_leaves_nothing(own_daemon: Daemon, tmp_path: Path) -> None:
    size = 2 * SPILL
    script = textwrap.dedent(
        f"""
        import asyncio, sys, time
        import blake3
        from nixcas.composition import blob_service_from_url

        async def main():
            blobs = await blob_service_from_url({own_daemon.client_url()!r})
            writer = await blobs.open_write({size})
            await writer.write(blake3.blake3(b"killed").digest(length={SPILL}))
            print("written", flush=True)
            await asyncio.sleep(60)

        asyncio.run(main())
        """
    )
    client = spawn_python(script)
    try:
        line = await asyncio.to_thread(read_line, client, STARTUP_TIMEOUT)
        assert line == b"written\n"
        await wait_until(own_daemon.temp_files, what="the daemon's temp file")
    finally:
        if client.poll() is None:
            os.kill(client.pid, signal.SIGKILL)
        client.wait()
        assert client.stdout is not None
        client.stdout.close()
    assert own_daemon.settled_temp_files() == [], own_daemon.stderr()
    async with await blob_service_from_url(own_daemon.client_url()) as blobs:
        assert not await blobs.has(b3(noise(b"killed", SPILL)))
        # the daemon is unharmed
        assert await blobs.put(b"still fine") == b3(b"still fine")


async def test_directory_put_cancelled_mid_stream_leaves_nothing(own_daemon: Daemon) -> None:
    async with grpc.aio.insecure_channel(own_daemon.target) as channel:
        put = channel.stream_unary("/tvix.castore.v1.DirectoryService/Put")
        call = put()
        await call.write(DIRECTORY_A.encode())
        await call.write(DIRECTORY_B.encode())
        await asyncio.sleep(0.2)
        call.cancel()
    await asyncio.sleep(0.2)
    async with await directory_service_from_url(own_daemon.client_url()) as dirs:
        assert await dirs.get(B3Digest(DIGEST_A)) is None
        assert await dirs.get(B3Digest(DIGEST_B)) is None


async def test_cancelled_puts_never_land(own_daemon: Daemon) -> None:
    """Many aborted uploads in a row: not one of their (partial) blobs may become visible."""
    async with await blob_service_from_url(own_daemon.client_url()) as blobs:
        landed = []
        for i in range(300):
            data = b"aborted %d" % i
            writer = await blobs.open_write()
            await writer.write(data)
            await writer.abort()
            if await blobs.has(b3(data)):
                landed.append(i)
        assert landed == []


# -- startup errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "fragment"),
    [
        ("nonsense", "expected host:port"),
        ("host:", "expected host:port"),
        (":80", "expected host:port"),
        ("1.2.3.4:99999", "port 99999 is out of range (0 to 65535)"),
        ("127.0.0.1:-1", "expected host:port"),
        ("::1:8000", "brackets"),
        ("[::1:8000", "brackets"),
    ],
)
def test_bad_listen_address(tmp_path: Path, address: str, fragment: str) -> None:
    result = run_nixcas("--store-dir", str(tmp_path / "store"), "daemon", "-l", address)
    line = assert_one_line_error(result, 2, fragment)
    assert repr(address) in line


def test_listen_address_is_a_directory(tmp_path: Path) -> None:
    result = run_nixcas("--store-dir", str(tmp_path / "store"), "daemon", "-l", f"{tmp_path}/")
    assert_one_line_error(result, 2, "not a directory")


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_nixcas("--store-dir", str(tmp_path / "store"), "daemon", "-l", f"127.0.0.1:{port}")
    assert_one_line_error(result, None, f"127.0.0.1:{port}", "in use")


def test_no_listening_line_unless_every_listener_is_up(tmp_path: Path) -> None:
    """With the bridge's port taken, ``daemon --nar-bridge`` prints no gRPC line before failing."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_nixcas(
            "--store-dir", str(tmp_path / "store"), "daemon", "-l", "127.0.0.1:0", "--nar-bridge", f"127.0.0.1:{port}"
        )
    assert_one_line_error(result, 2, f"127.0.0.1:{port}")  # and nothing on stdout


def test_port_taken_by_another_daemon(tcp_daemon: Daemon, tmp_path: Path) -> None:
    """grpc sets SO_REUSEPORT by default: a second daemon must not silently share the port."""
    address = tcp_daemon.url.removeprefix("grpc+http://")
    try:
        result = run_nixcas("--store-dir", str(tmp_path / "store"), "daemon", "-l", address, timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a second daemon started serving on {address}, taken by another daemon")
    assert_one_line_error(result, None, address, "in use")
    assert tcp_daemon.proc.poll() is None


async def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    with short_tmpdir() as sockets:
        sock = sockets / "d.sock"
        stale_socket(sock)
        with running_daemon("-l", str(sock), store=tmp_path / "store", log=tmp_path / "stderr") as daemon:
            assert daemon.url == f"grpc+unix://{sock}"
            async with await blob_service_from_url(daemon.client_url()) as blobs:
                assert await blobs.put(b"over a stale socket") == b3(b"over a stale socket")
                assert await blobs.read(b3(b"over a stale socket")) == b"over a stale socket"
            assert_clean_exit(daemon, await asyncio.to_thread(daemon.stop))
        assert not sock.exists()


async def test_relative_socket_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with short_tmpdir() as sockets:
        monkeypatch.chdir(sockets)
        with running_daemon("-l", "./rel.sock", store=tmp_path / "store", log=tmp_path / "stderr") as daemon:
            assert daemon.url == f"grpc+unix://{Path(sockets).resolve() / 'rel.sock'}"
            async with await blob_service_from_url(daemon.client_url()) as blobs:
                assert not await blobs.has(b3(b"relative"))
            assert_clean_exit(daemon, await asyncio.to_thread(daemon.stop))


async def test_live_socket_is_refused(unix_daemon: Daemon, tmp_path: Path) -> None:
    sock = unix_daemon.unix_path
    assert sock is not None
    result = run_nixcas("--store-dir", str(tmp_path / "store"), "daemon", "-l", str(sock))
    assert_one_line_error(result, 2, str(sock), "listening")
    # the running daemon keeps its socket and keeps serving
    assert stat.S_ISSOCK(sock.lstat().st_mode)
    assert unix_daemon.proc.poll() is None
    async with await blob_service_from_url(unix_daemon.client_url()) as blobs:
        assert not await blobs.has(b3(b"live socket check"))


def test_regular_file_is_refused_and_untouched(tmp_path: Path) -> None:
    with short_tmpdir() as sockets:
        path = sockets / "precious"
        path.write_bytes(b"do not delete me")
        result = run_nixcas("--store-dir", str(tmp_path / "store"), "daemon", "-l", str(path))
        assert_one_line_error(result, 2, str(path), "not a socket")
        assert path.read_bytes() == b"do not delete me"


@pytest.mark.parametrize(
    ("option", "url"),
    [
        ("--blob-service-addr", "nope://x"),
        ("--blob-service-addr", "grpc+unix://host/sock"),
        ("--directory-service-addr", "sqlite://relative/path"),
    ],
)
def test_bad_service_addr(tmp_path: Path, option: str, url: str) -> None:
    for args in ([option, url, "daemon"], ["daemon", option, url]):
        result = run_nixcas("--store-dir", str(tmp_path / "store"), *args, "-l", "127.0.0.1:0")
        assert_one_line_error(result, 2)


def test_unreachable_upstream(tmp_path: Path) -> None:
    url = "grpc+unix:///nonexistent.sock?wait-connect=1&connect-timeout=0.5"
    started = time.monotonic()
    result = run_nixcas(
        "--store-dir", str(tmp_path / "store"), "daemon", "-l", "127.0.0.1:0", "--blob-service-addr", url
    )
    assert time.monotonic() - started < 15
    assert_one_line_error(result, 1, url)


async def test_daemon_in_front_of_a_daemon(unix_daemon: Daemon, tmp_path: Path) -> None:
    """A daemon whose services are another daemon's: data and status codes pass through."""
    unix_daemon.reset()
    with running_daemon(
        "-l",
        "127.0.0.1:0",
        "--blob-service-addr",
        unix_daemon.client_url(),
        "--directory-service-addr",
        unix_daemon.client_url(protocol="snix"),
        store=None,
        log=tmp_path / "stderr",
    ) as front:
        async with (
            await blob_service_from_url(front.client_url()) as via_front,
            await blob_service_from_url(unix_daemon.client_url()) as direct,
            await directory_service_from_url(front.client_url()) as dirs_front,
        ):
            data = noise(b"proxied", 500_000)
            assert await via_front.put(data) == b3(data)
            assert await direct.read(b3(data)) == data
            assert not await via_front.has(b3(b"nowhere"))
            assert await dirs_front.put(DIRECTORY_WITH_KEEP) == DIGEST_WITH_KEEP
        async with grpc.aio.insecure_channel(front.target) as channel:
            get = channel.unary_stream("/tvix.castore.v1.DirectoryService/Get")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in get(b"\x0a\x03abc"):  # a 3-byte digest
                    pass
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert_clean_exit(front, await asyncio.to_thread(front.stop))


# -- the client side against nothing ------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_unreachable_server_fails_on_first_call(transport: str, tmp_path: Path) -> None:
    url = f"grpc+unix://{tmp_path}/nobody.sock" if transport == "unix" else f"grpc+http://127.0.0.1:{free_port()}"
    blobs = await blob_service_from_url(url)  # lazy: nothing happens yet
    dirs = await directory_service_from_url(url)
    try:
        started = time.monotonic()
        with pytest.raises(RemoteError) as info:
            await blobs.has(b3(b"x"))
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert url in str(info.value) and "unavailable" in str(info.value)
        with pytest.raises(StorageError):
            await blobs.put(b"x")
        with pytest.raises(StorageError):
            await dirs.get(B3Digest(DIGEST_A))
        assert time.monotonic() - started < 10
    finally:
        await blobs.close()
        await dirs.close()


@pytest.mark.parametrize("transport", ["unix", "tcp"])
@pytest.mark.parametrize("kind", ["blob", "directory"])
async def test_wait_connect_to_nothing_fails_at_construction(transport: str, kind: str, tmp_path: Path) -> None:
    base = f"grpc+unix://{tmp_path}/nobody.sock" if transport == "unix" else f"grpc+http://127.0.0.1:{free_port()}"
    url = f"{base}?wait-connect=1&connect-timeout=0.5"
    make = blob_service_from_url if kind == "blob" else directory_service_from_url
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        await make(url)
    elapsed = time.monotonic() - started
    assert 0.4 < elapsed < 5
    assert url in str(info.value) and "cannot connect" in str(info.value)


# -- the client when the daemon goes away -------------------------------------------------------------


async def test_write_after_the_daemon_died_is_a_storage_error(tmp_path: Path) -> None:
    with short_tmpdir() as sockets:
        sock = sockets / "d.sock"
        with running_daemon("-l", str(sock), store=tmp_path / "store", log=tmp_path / "stderr") as daemon:
            async with await blob_service_from_url(daemon.client_url()) as blobs:
                writer = await blobs.open_write()
                await writer.write(b"first part")
                daemon.kill()
                await asyncio.sleep(0.5)  # the client has seen the connection go
                with pytest.raises(StorageError):
                    await writer.write(b"second part")
                await writer.abort()


async def test_put_many_thousands_of_blobs_across_processes(any_daemon: Daemon) -> None:
    """A channel fails somewhere past a thousand simultaneous Put streams; put_many stays below."""
    async with await blob_service_from_url(any_daemon.client_url()) as blobs:
        data = [b"many %d" % i for i in range(3000)]
        assert await blobs.put_many(data) == [b3(d) for d in data]

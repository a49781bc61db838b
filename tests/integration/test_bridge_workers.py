"""nar-bridge speed-ups kept correct: worker processes, the rendered-narinfo cache, group-committed sync barriers."""

from __future__ import annotations

import asyncio
import http.client
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from nixcas.bridge.app import NarBridge
from nixcas.bridge.groupsync import GroupSync
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.sizerule import SizeRule
from nixcas.store.narindex import NarIndex
from nixcas.store.narinfo import NarInfo
from nixcas.store.pathinfo.memory import MemoryPathInfoService
from nixcas.store.signing import SigningKey
from nixcas.testing.daemon import clean_env, nixcas_command, running_daemon, short_tmpdir
from nixcas.testing.samples import Sample, make_sample

# -- worker processes -----------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry))
    return found


def _socket_inode(server_port: int, client_port: int) -> str | None:
    """The inode of the server side of the established loopback connection from ``client_port``."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if (
            fields[3] == "01"  # ESTABLISHED
            and int(local.split(":")[1], 16) == server_port
            and int(remote.split(":")[1], 16) == client_port
        ):
            return fields[9]
    return None


def _connect(port: int, pids: list[int]) -> tuple[http.client.HTTPConnection, int]:
    """A new connection, and which of ``pids`` accepted it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.connect()
    assert conn.sock is not None
    client_port = conn.sock.getsockname()[1]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the accepting worker may not have called accept() yet
        inode = _socket_inode(port, client_port)
        for pid in pids:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if inode is not None and os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                        return conn, pid
                except OSError:
                    continue
        time.sleep(0.01)
    conn.close()
    raise AssertionError("no worker accepted the connection")


def _request(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_workers_share_the_port_and_the_store_and_stop_cleanly(tmp_path: Path) -> None:
    sample = asyncio.run(make_sample(tmp_path, "two-workers", {"f": b"served by either worker\n"}))
    args = ("-l", "127.0.0.1:0", "--workers", "2", "--allow-writes")
    with running_daemon(*args, store=tmp_path / "s", log=tmp_path / "log", command="nar-bridge") as bridge:
        port = int(bridge.url.rsplit(":", 1)[1])
        workers = _children(bridge.pid)
        assert len(workers) == 2, workers

        conn, writer = _connect(port, workers)
        assert _request(conn, "PUT", f"/nar/{sample.nb32}.nar", sample.nar)[0] == 200
        # the narinfo goes to the other worker: its NAR index lookup must see the first one's upload
        for _ in range(200):
            conn, pid = _connect(port, workers)
            if pid != writer:
                status, body = _request(
                    conn, "PUT", f"/{sample.store_path.hash_part}.narinfo", sample.narinfo().encode()
                )
                assert status == 200, body
                break
            conn.close()
        else:
            pytest.fail("every connection went to the same worker")
        served_by = set()
        for _ in range(200):  # both workers answer the narinfo
            conn, pid = _connect(port, workers)
            status, body = _request(conn, "GET", f"/{sample.store_path.hash_part}.narinfo")
            assert status == 200 and f"NarHash: sha256:{sample.nb32}" in body.decode()
            served_by.add(pid)
            if len(served_by) == 2:
                break
        assert served_by == set(workers)
        bridge.signal(signal.SIGTERM)
        assert bridge.wait() == 0
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{w}").exists() for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(Path(f"/proc/{w}").exists() for w in workers)
    with socket.socket() as s:  # the port is free again
        s.bind(("127.0.0.1", port))
    assert "Traceback" not in bridge.stderr()


def test_workers_refuse_in_memory_services(tmp_path: Path) -> None:
    result = subprocess.run(
        nixcas_command("nar-bridge", "--workers", "2", "--blob-service-addr", "memory://", "-l", "127.0.0.1:0"),
        capture_output=True, env=clean_env(), timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert b"memory://" in result.stderr and result.stderr.count(b"\n") == 1


# -- the rendered-narinfo cache --------------------------------------------------------------


async def test_narinfo_cache_renders_once_and_shows_added_signatures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sample = await make_sample(tmp_path, "cached", {"f": b"cached narinfo\n"})
    pathinfos = MemoryPathInfoService()
    index = NarIndex(None)
    bridge = NarBridge(MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX), pathinfos, index, allow_writes=True)
    renders = 0
    real = NarInfo.from_path_info

    def counting(*args: object, **kwargs: object) -> NarInfo:
        nonlocal renders
        renders += 1
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(NarInfo, "from_path_info", counting)
    client = TestClient(TestServer(bridge.application()))
    await client.start_server()
    try:
        async with client.put(f"/nar/{sample.nb32}.nar", data=sample.nar) as r:
            assert r.status == 200
        async with client.put(f"/{sample.store_path.hash_part}.narinfo", data=sample.narinfo().encode()) as r:
            assert r.status == 200
        url = f"/{sample.store_path.hash_part}.narinfo"
        async with client.get(url) as r:
            first = await r.text()
        async with client.get(url) as r:
            assert await r.text() == first
        assert renders == 1  # the second GET reused the rendering
        assert "Sig:" not in first
        # a signature is added to the stored record behind the bridge's back (another process, say)
        key = SigningKey.generate("added-1")
        info = await pathinfos.get(sample.store_path.digest)
        assert info is not None
        await pathinfos.put(key.sign_path_info(info))
        async with client.get(url) as r:
            assert r.headers["Content-Type"] == "text/x-nix-narinfo"
            after = await r.text()
        assert "Sig: added-1:" in after
        assert renders == 2
        # and a record deleted behind its back is not served from the cache
        assert await pathinfos.delete(sample.store_path.digest)
        async with client.get(url) as r:
            assert r.status == 404
    finally:
        await client.close()
        await index.close()


# -- group commit ----------------------------------------------------------------------------


async def test_group_sync_shares_barriers_and_never_releases_early() -> None:
    started: list[asyncio.Event] = []
    release: list[asyncio.Event] = []

    async def barrier() -> None:
        started.append(asyncio.Event())
        release.append(asyncio.Event())
        started[-1].set()
        await release[-1].wait()

    group = GroupSync(barrier)
    first = asyncio.ensure_future(group.sync())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert group.barriers == 1
    # these arrive while barrier 1 runs: it may have missed their writes, so they wait for barrier 2
    late = [asyncio.ensure_future(group.sync()) for _ in range(5)]
    await asyncio.sleep(0.01)
    release[0].set()
    await first
    await asyncio.sleep(0.01)
    assert not any(t.done() for t in late)
    assert group.barriers == 2  # one barrier for all five
    release[1].set()
    await asyncio.gather(*late)
    assert group.barriers == 2


async def test_group_sync_failure_reaches_every_waiter_of_that_barrier() -> None:
    calls = 0

    async def barrier() -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        if calls == 1:
            raise OSError("disk on fire")

    group = GroupSync(barrier)
    results = await asyncio.gather(group.sync(), group.sync(), return_exceptions=True)
    assert all(isinstance(r, OSError) for r in results)
    await group.sync()  # the next barrier works
    assert calls == 2


class _RecordingBlobs(MemoryBlobService):
    """Memory blobs whose barrier is slow and recorded: (start, end) per sync, write time per blob content."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[tuple[float, float]] = []
        self.written: dict[bytes, float] = {}

    async def put_many(self, blobs: list[bytes]) -> list:  # type: ignore[override, type-arg]
        digests = await super().put_many(blobs)
        for b in blobs:
            self.written[b] = time.monotonic()
        return digests

    async def sync(self) -> None:
        start = time.monotonic()
        await asyncio.sleep(0.02)
        self.syncs.append((start, time.monotonic()))


async def test_concurrent_uploads_share_barriers_and_are_acknowledged_only_after_theirs(tmp_path: Path) -> None:
    samples = [await make_sample(tmp_path, f"group-{i}", {"f": f"file {i}\n".encode()}) for i in range(8)]
    blobs = _RecordingBlobs()
    index = NarIndex(str(tmp_path / "index.sqlite"))
    bridge = NarBridge(blobs, MemoryDirectoryService(SizeRule.TVIX), MemoryPathInfoService(), index, allow_writes=True)
    client = TestClient(TestServer(bridge.application()))
    await client.start_server()

    async def upload(sample: Sample) -> float:
        async with client.put(f"/nar/{sample.nb32}.nar", data=sample.nar) as r:
            assert r.status == 200, await r.text()
            return time.monotonic()

    try:
        acknowledged = await asyncio.gather(*(upload(s) for s in samples))
    finally:
        await client.close()
        await index.close()
    assert 1 <= len(blobs.syncs) < len(samples)  # shared, not one per upload
    for i, ack in enumerate(acknowledged):
        written = blobs.written[f"file {i}\n".encode()]
        covering = [(s, e) for s, e in blobs.syncs if s >= written and e <= ack]
        assert covering, f"upload {i} was acknowledged before a barrier that started after its blob was written"


def test_workers_on_a_unix_socket_and_a_store_that_cannot_open(tmp_path: Path) -> None:
    with short_tmpdir() as d:
        path = d / "bridge.sock"
        args = ("-l", str(path), "--workers", "2")
        with running_daemon(*args, store=tmp_path / "s", log=tmp_path / "log", command="nar-bridge") as bridge:
            assert bridge.url == f"unix://{path}"
            assert len(_children(bridge.pid)) == 2
            for _ in range(4):
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(path))
                    s.sendall(b"GET /nix-cache-info HTTP/1.0\r\n\r\n")
                    reply = b""
                    while data := s.recv(4096):
                        reply += data
                assert b"WantMassQuery: 1" in reply
            bridge.signal(signal.SIGTERM)
            assert bridge.wait() == 0
        assert not path.exists()
    (tmp_path / "broken" / "pathinfo.sqlite").mkdir(parents=True)  # the database cannot open
    result = subprocess.run(
        nixcas_command("--store-dir", str(tmp_path / "broken"), "nar-bridge", "--workers", "2", "-l", "127.0.0.1:0"),
        capture_output=True, env=clean_env(), timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith(b"nixcas: error: ") and result.stderr.count(b"\n") == 1, result.stderr
    assert result.stdout == b""


async def test_a_small_upload_is_durable_without_a_file_system_barrier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Into the embedded blob store, a NAR of small files is acknowledged after one ``fsync`` of the blob rows'
    write-ahead log, made with the put of its last batch, without any ``syncfs``; a NAR with a large file
    still waits for one before its 2xx."""
    from nixcas.castore.blob import packcompact
    from nixcas.castore.blob.packed import PackedBlobService
    from nixcas.castore.objectstore import disk

    barriers: list[float] = []
    logs: list[float] = []
    sync_wal = packcompact.sync_wal

    def syncfs(path: Path) -> None:
        barriers.append(time.monotonic())

    def wal(path: str, named: int) -> int:
        inode = sync_wal(path, named)
        logs.append(time.monotonic())
        return inode

    monkeypatch.setattr(disk, "_syncfs", syncfs)
    monkeypatch.setattr(packcompact, "sync_wal", wal)
    in_put: list[float] = []  # the log fsyncs made in the hand-off that stored the last batch
    sync_now = packcompact.LogBarrier.sync_now

    def recorded(self: packcompact.LogBarrier) -> None:
        in_put.append(time.monotonic())
        sync_now(self)

    monkeypatch.setattr(packcompact.LogBarrier, "sync_now", recorded)
    small = await make_sample(tmp_path, "small", {"a": b"small file\n", "b/c": b"another\n"})
    large = await make_sample(tmp_path, "large", {"big": os.urandom(3 << 20)})
    blobs = await asyncio.to_thread(PackedBlobService, tmp_path / "blobs")
    index = NarIndex(str(tmp_path / "index.sqlite"))
    bridge = NarBridge(blobs, MemoryDirectoryService(SizeRule.TVIX), MemoryPathInfoService(), index, allow_writes=True)
    client = TestClient(TestServer(bridge.application()))
    await client.start_server()
    try:
        for sample in (small, large):
            async with client.put(f"/nar/{sample.nb32}.nar", data=sample.nar) as r:
                assert r.status == 200, await r.text()
                acknowledged = time.monotonic()
            assert (await index.get(sample.sha256)) is not None
            if sample is small:
                assert barriers == [] and len(logs) == 1 and logs[0] <= acknowledged
                assert len(in_put) == 1  # with the blobs' put: the barrier found nothing left to do
        assert len(barriers) == 1 and barriers[0] <= acknowledged
    finally:
        await client.close()
        await index.close()
        await blobs.close()

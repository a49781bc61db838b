"""Issue 16, defect 1: deep trees are refused at every entry point, and memory stays linear in the depth.

Two kinds of test: small ones at the limit (:data:`MAX_DEPTH` accepted,
one more refused with a clear error, at each entry point), and 100,000-level
inputs run in a subprocess whose peak RSS (``VmHWM``) must stay under 256 MiB
(the address space is capped too, so a quadratic walk fails fast instead of
swapping the machine).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from nixcas._proto.tvix.castore.protos import castore_pb2 as castore_pb
from nixcas._proto.tvix.castore.protos import rpc_directory_pb2 as dir_pb
from nixcas.bridge.app import NarBridge, nar_url
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.ingest import ingest_path
from nixcas.castore.nodes import MAX_DEPTH, DirectoryNode
from nixcas.castore.proto import encode_node
from nixcas.castore.sizerule import SizeRule
from nixcas.castore.treepath import TreePath
from nixcas.composition import directory_service_from_url
from nixcas.errors import DepthError, NarError
from nixcas.server import RunningServer, start_server
from nixcas.store.nar.ingest import ingest_nar_bytes
from nixcas.store.nar.plan import fetch_closure, plan_size
from nixcas.store.nar.render import render_nar
from nixcas.store.nar.wire import ENTRY_PREFIX, NAR_MAGIC, NODE_DIRECTORY, TOK_CLOSE, TOK_NODE, encode_str
from nixcas.store.narindex import NarIndex
from nixcas.store.pathinfo.memory import MemoryPathInfoService
from nixcas.testing.daemon import raw_calculate_nar

SRC = str(Path(__file__).resolve().parents[2] / "src")


def chain_nar(depth: int) -> bytes:
    """The NAR of ``depth`` directories ``a/a/…/a`` nested below the root (the innermost empty)."""
    step = ENTRY_PREFIX + encode_str(b"a") + TOK_NODE + NODE_DIRECTORY
    return NAR_MAGIC + NODE_DIRECTORY + step * depth + TOK_CLOSE * (2 * depth + 1)


def chain_directories(depth: int) -> list[Directory]:
    """The Directories of that tree, leaves first (the root last)."""
    chain = [Directory()]
    for _ in range(depth):
        below = chain[-1]
        chain.append(Directory({b"a": below.node(SizeRule.TVIX)}))
    return chain


async def store_unchecked(dirs: MemoryDirectoryService, depth: int) -> DirectoryNode:
    """Store the chain without the upload's checks (as a store written before the limit existed)."""
    chain = chain_directories(depth)
    await dirs._put_raw([(d.digest, d.encode()) for d in chain])
    return chain[-1].node(SizeRule.TVIX)


# -- the limit at each entry point ----------------------------------------------------


async def test_nar_at_the_limit_round_trips_and_one_more_is_refused() -> None:
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX)
    nar = chain_nar(MAX_DEPTH)
    node, size, _ = await ingest_nar_bytes(nar, blobs, dirs)
    assert size == len(nar)
    assert b"".join([c async for c in render_nar(node, blobs, dirs)]) == nar
    deeper = MemoryDirectoryService(SizeRule.TVIX)
    with pytest.raises(NarError, match=f"nested deeper than {MAX_DEPTH} levels") as info:
        await ingest_nar_bytes(chain_nar(MAX_DEPTH + 1), blobs, deeper)
    assert len(str(info.value)) < 1000  # the path is abbreviated, not 2049 components long
    assert deeper._data == {}


async def test_bridge_put_of_a_too_deep_nar_is_400(tmp_path: Path) -> None:
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX)
    index = NarIndex(str(tmp_path / "index.sqlite"))
    bridge = NarBridge(blobs, dirs, MemoryPathInfoService(), index, allow_writes=True)
    async with TestClient(TestServer(bridge.application())) as client:
        import hashlib

        from nixcas.store import nixbase32

        nar = chain_nar(MAX_DEPTH + 1)
        name = nixbase32.encode(hashlib.sha256(nar).digest())
        async with client.put(f"/nar/{name}.nar", data=nar) as r:
            assert r.status == 400
            assert f"deeper than {MAX_DEPTH}" in await r.text()
    await index.close()
    assert dirs._data == {}


def _deep_tar(path: Path, depth: int) -> None:
    """A tar whose one file lies ``depth`` levels below its top-level directory ``top``."""
    info = tarfile.TarInfo("top/" + "a/" * (depth - 1) + "f")
    info.size = 1
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(b"x"))


def test_castore_ingest_of_a_too_deep_tar_is_one_line(tmp_path: Path) -> None:
    store = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": SRC, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data")}
    for var in ("BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR"):
        env.pop(var, None)

    def ingest(tar: Path) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "nixcas.cli.main", "--store-dir", str(store), "castore", "ingest", str(tar)]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)

    _deep_tar(tmp_path / "ok.tar", MAX_DEPTH)
    assert ingest(tmp_path / "ok.tar").returncode == 0
    _deep_tar(tmp_path / "deep.tar", MAX_DEPTH + 1)
    result = ingest(tmp_path / "deep.tar")
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"nested deeper than the {MAX_DEPTH} levels" in lines[0] and len(lines[0]) < 1000


async def test_filesystem_ingest_refuses_deeper_than_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real tree deeper than 2048 levels cannot even be created by full paths
    # (PATH_MAX): check the walker's limit with a small one.
    monkeypatch.setattr("nixcas.castore.ingest.MAX_DEPTH", 4)
    monkeypatch.setattr("nixcas.castore.walk.MAX_DEPTH", 4)
    (tmp_path / "t" / "1" / "2" / "3").mkdir(parents=True)
    (tmp_path / "t" / "1" / "2" / "3" / "4").write_bytes(b"at the limit")
    dirs = MemoryDirectoryService(SizeRule.TVIX)
    await ingest_path(tmp_path / "t", MemoryBlobService(), dirs)
    (tmp_path / "t" / "1" / "2" / "3" / "d").mkdir()
    (tmp_path / "t" / "1" / "2" / "3" / "d" / "5").write_bytes(b"one too deep")
    deeper = MemoryDirectoryService(SizeRule.TVIX)
    with pytest.raises(DepthError, match="t/1/2/3/d/5: nested deeper than the 4 levels"):
        await ingest_path(tmp_path / "t", MemoryBlobService(), deeper)
    assert deeper._data == {}


@pytest_asyncio.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[tuple[RunningServer, MemoryDirectoryService]]:
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX)
    running = await start_server(str(tmp_path / "d.sock"), blobs, dirs, pathinfos=MemoryPathInfoService())
    yield running, dirs
    await running.stop(0)


async def test_grpc_directory_put_refuses_deeper_than_the_limit(
    daemon: tuple[RunningServer, MemoryDirectoryService],
) -> None:
    running, backing = daemon
    # The client checks before sending ...
    async with await directory_service_from_url(running.url) as svc:
        async with svc.put_multiple_start() as putter:
            for d in chain_directories(MAX_DEPTH):
                await putter.put(d)
            await putter.close()
        stored = len(backing._data)
        putter = svc.put_multiple_start()
        *below, top = chain_directories(MAX_DEPTH + 1)
        for d in below:
            await putter.put(d)
        with pytest.raises(DepthError, match=f"more than the {MAX_DEPTH} a tree may have"):
            await putter.put(top)
        await putter.abort()
    # ... and so does the daemon, for any client (raw messages here).
    target = running.url.replace("grpc+unix://", "unix:")
    async with grpc.aio.insecure_channel(target) as channel:
        put = channel.stream_unary(
            "/tvix.castore.v1.DirectoryService/Put",
            request_serializer=lambda raw: raw,
            response_deserializer=dir_pb.PutDirectoryResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await put(iter([d.encode() for d in chain_directories(MAX_DEPTH + 1)]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"more than the {MAX_DEPTH} a tree may have" in (err.value.details() or "")
    assert len(backing._data) == stored  # nothing of the refused closure


async def test_rendering_a_too_deep_stored_tree_is_refused(
    daemon: tuple[RunningServer, MemoryDirectoryService], tmp_path: Path
) -> None:
    running, dirs = daemon
    blobs = MemoryBlobService()
    node = await store_unchecked(dirs, MAX_DEPTH + 1)
    closure = await fetch_closure(node, dirs)
    with pytest.raises(DepthError, match=f"exceed the {MAX_DEPTH} levels"):
        plan_size(node, closure)
    with pytest.raises(DepthError):
        async for _ in render_nar(node, blobs, dirs):
            pass
    # CalculateNAR on the daemon: INVALID_ARGUMENT, not INTERNAL.
    target = running.url.replace("grpc+unix://", "unix:")
    async with grpc.aio.insecure_channel(target) as channel:
        call = raw_calculate_nar(channel)
        request = castore_pb.Node.FromString(encode_node(b"", node))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"{MAX_DEPTH} levels" in (err.value.details() or "")
    # The bridge: a 4xx decided before any header of a NAR.
    index = NarIndex(None)
    bridge = NarBridge(blobs, dirs, MemoryPathInfoService(), index)
    async with TestClient(TestServer(bridge.application())) as client, client.get("/" + nar_url(node, 1)) as r:
        assert r.status == 400
        assert "Content-Length" not in r.headers or r.headers["Content-Type"].startswith("text/plain")
        assert f"{MAX_DEPTH} levels" in await r.text()
    await index.close()


def test_tree_path_is_shared_and_abbreviated() -> None:
    root = TreePath(None, b"r")
    path = root
    for i in range(3000):
        path = path.child(b"n%d" % i)
    assert path.depth == 3000 and path.parent is not None and path.parent.parent is not None
    assert path == TreePath.of(path.names()) and hash(path) == hash(TreePath.of(path.names()))
    assert path != path.parent and path.parent.child(b"other") != path
    shown = path.show()
    assert shown.startswith("r/n0/n1/") and shown.endswith("/n2998/n2999") and "more)" in shown
    assert len(shown) < 300


# -- 100,000 levels within 256 MiB ------------------------------------------------------

_SCRIPT = textwrap.dedent(
    """
    import asyncio, io, json, resource, sys, tarfile

    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # a quadratic walk fails fast
    DEPTH = 100_000
    scenario = sys.argv[1]

    from nixcas.castore.blob.memory import MemoryBlobService
    from nixcas.castore.directory import Directory
    from nixcas.castore.dirs.memory import MemoryDirectoryService
    from nixcas.castore.nodes import DirectoryNode
    from nixcas.castore.sizerule import SizeRule

    def chain():
        out = [Directory()]
        for _ in range(DEPTH):
            out.append(Directory({b"a": out[-1].node(SizeRule.TVIX)}))
        return out

    async def main():
        blobs, dirs = MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX)
        if scenario == "nar":
            from nixcas.store.nar.ingest import ingest_nar_bytes
            from nixcas.store.nar.wire import ENTRY_PREFIX, NAR_MAGIC, NODE_DIRECTORY, TOK_CLOSE, TOK_NODE, encode_str
            step = ENTRY_PREFIX + encode_str(b"a") + TOK_NODE + NODE_DIRECTORY
            nar = NAR_MAGIC + NODE_DIRECTORY + step * DEPTH + TOK_CLOSE * (2 * DEPTH + 1)
            await ingest_nar_bytes(nar, blobs, dirs)
        elif scenario == "tar":
            from nixcas.castore.archive import ingest_archive
            info = tarfile.TarInfo("top/" + "a/" * DEPTH + "f")
            info.size = 1
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
                tar.addfile(info, io.BytesIO(b"x"))
            buf.seek(0)
            await ingest_archive(buf, blobs, dirs)
        elif scenario == "directory-put":
            async with dirs.put_multiple_start() as putter:
                for d in chain():
                    await putter.put(d)
                await putter.close()
        elif scenario == "render":
            from nixcas.store.nar.plan import fetch_closure, plan_size
            from nixcas.store.nar.render import render_nar
            directories = chain()
            await dirs._put_raw([(d.digest, d.encode()) for d in directories])
            node = directories[-1].node(SizeRule.TVIX)
            del directories
            try:
                plan_size(node, await fetch_closure(node, dirs))
            except Exception as e:
                print("plan_size:", type(e).__name__, file=sys.stderr)
            async for _ in render_nar(node, blobs, dirs):
                pass

    try:
        asyncio.run(main())
        outcome = "accepted"
        error = ""
    except MemoryError:
        outcome, error = "MemoryError", ""
    except Exception as e:
        outcome, error = type(e).__name__, str(e)[:300]
    # The peak of this process's own memory map.  (getrusage's ru_maxrss would do on its own, but
    # Linux carries the parent's peak over exec: a child of a big pytest process starts "big".)
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"outcome": outcome, "error": error, "rss": rss}))
    """
)


@pytest.mark.parametrize("scenario", ["nar", "tar", "directory-put", "render"])
def test_hundred_thousand_levels_refused_within_256_mib(scenario: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": SRC, "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, scenario], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["outcome"] in {"NarError", "DepthError", "ClosureError"}, report
    assert f"{MAX_DEPTH}" in report["error"], report
    assert report["rss"] < 256 << 20, report


async def test_fsck_and_walk_report_a_too_deep_stored_tree() -> None:
    from nixcas.api import Store
    from nixcas.castore.fsck import CastoreChecker

    blobs, dirs = MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX)
    node = await store_unchecked(dirs, MAX_DEPTH + 1)
    problems = [p async for p in CastoreChecker(blobs, dirs).walk("deep", node)]
    assert len(problems) == 1 and f"exceed the {MAX_DEPTH} levels" in problems[0].message
    assert problems[0].path.startswith("deep/a/a/")
    fine = await store_unchecked(dirs, MAX_DEPTH)
    assert [p async for p in CastoreChecker(blobs, dirs).walk("fine", fine)] == []
    store = Store(blobs, dirs)
    assert len([p async for p in store.walk(fine)]) == MAX_DEPTH + 1
    with pytest.raises(DepthError):
        async for _ in store.walk(node):
            pass


def remove_chain(root: Path, levels: int) -> None:
    """Remove ``root/a/a/…/a`` (``levels`` deep) from the bottom up, by directory file descriptors."""
    fds = [os.open(root, os.O_RDONLY | os.O_DIRECTORY)]
    try:
        for _ in range(levels - 1):
            fds.append(os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
        while fds:
            fd = fds.pop()
            os.rmdir("a", dir_fd=fd)
            os.close(fd)
    finally:
        for fd in fds:
            os.close(fd)


def test_castore_ingest_of_a_too_deep_filesystem_tree_is_one_line(tmp_path: Path) -> None:
    """A real tree deeper than PATH_MAX allows (made with openat): one line, exit 1, nothing stored."""
    root = tmp_path / "deep"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(MAX_DEPTH + 10):
            os.mkdir("a", dir_fd=fd)
            child = os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)
    store = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": SRC, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data")}
    for var in ("BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "nixcas.cli.main", "--store-dir", str(store), "castore", "ingest", str(root)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    finally:
        remove_chain(root, MAX_DEPTH + 10)  # shutil.rmtree (pytest's cleanup) recurses once per level
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    # Linux refuses the full path before the depth limit is reached (that is why the limit is 2048).
    assert "File name too long" in lines[0] or f"{MAX_DEPTH} levels" in lines[0], lines[0]

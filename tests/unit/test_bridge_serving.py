"""nar-bridge's serving hot path: narinfo point reads without a thread hand-off, the optional uvloop."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import types
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from click.testing import CliRunner

from nixcas.bridge.app import NarBridge
from nixcas.bridge.loop import loop_factory
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.cli.app import cli
from nixcas.cli.common import run
from nixcas.errors import ConfigurationError, StorageError
from nixcas.store.narindex import NarIndex
from nixcas.store.narinfo import NarInfo
from nixcas.store.pathinfo.model import PathInfo
from nixcas.store.pathinfo.sqlite import SqlitePathInfoService
from nixcas.store.signing import SigningKey
from nixcas.testing.samples import Sample, make_sample


def _path_info(sample: Sample) -> PathInfo:
    return NarInfo.parse(sample.narinfo()).to_path_info(sample.node)


# -- SQLite point reads on the caller's thread -----------------------------------------------


async def test_read_now_sees_what_another_connection_commits(tmp_path: Path) -> None:
    sample = await make_sample(tmp_path, "now", {"f": b"read now\n"})
    db = str(tmp_path / "pathinfo.sqlite")
    reader, writer = SqlitePathInfoService(db), SqlitePathInfoService(db)  # two processes, as far as SQLite knows
    try:
        digest = sample.store_path.digest
        assert reader.get_encoded_now(digest) is None
        info = _path_info(sample)
        await writer.put(info)
        assert reader.get_encoded_now(digest) == info.encode()
        signed = SigningKey.generate("k-1").sign_path_info(info)
        await writer.put(signed)
        assert reader.get_encoded_now(digest) == signed.encode()
        assert await writer.delete(digest)
        assert reader.get_encoded_now(digest) is None
    finally:
        await reader.close()
        await writer.close()
    with pytest.raises(StorageError, match="closed"):
        reader.get_encoded_now(digest)


async def test_read_now_is_not_offered_in_memory_or_when_busy(tmp_path: Path) -> None:
    memory = SqlitePathInfoService(None)
    try:
        assert memory.get_encoded_now(b"\x01" * 20) is False  # its one connection lives in the database thread
    finally:
        await memory.close()
    on_disk = SqlitePathInfoService(str(tmp_path / "p.sqlite"))
    try:
        assert on_disk.get_encoded_now(b"\x01" * 20) is None

        def locked(conn: sqlite3.Connection) -> None:
            raise sqlite3.OperationalError("database is locked")

        from nixcas._sqlite import Busy

        with pytest.raises(Busy):
            on_disk._db.read_now(locked)

        def broken(conn: sqlite3.Connection) -> None:
            raise sqlite3.DatabaseError("database disk image is malformed")

        with pytest.raises(StorageError, match="malformed"):
            on_disk._db.read_now(broken)
    finally:
        await on_disk.close()


async def test_narinfo_get_reads_sqlite_without_the_database_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The narinfo route answers from a point read on the loop's thread, and never serves a stale record."""
    sample = await make_sample(tmp_path, "lean", {"f": b"lean narinfo\n"})
    db = str(tmp_path / "pathinfo.sqlite")
    pathinfos, other = SqlitePathInfoService(db), SqlitePathInfoService(db)
    await other.put(_path_info(sample))

    async def no_hand_off(digest: bytes) -> bytes | None:
        raise AssertionError("the narinfo GET went to the database thread")

    monkeypatch.setattr(pathinfos, "get_encoded", no_hand_off)
    bridge = NarBridge(MemoryBlobService(), MemoryDirectoryService(), pathinfos, NarIndex(None))
    client = TestClient(TestServer(bridge.application()))
    await client.start_server()
    url = f"/{sample.store_path.hash_part}.narinfo"
    try:
        async with client.get(url) as r:
            assert r.status == 200
            assert f"StorePath: {sample.store_path}\n" in await r.text()
        info = await other.get(sample.store_path.digest)
        assert info is not None
        await other.put(SigningKey.generate("other-1").sign_path_info(info))  # changed behind the bridge's back
        async with client.get(url) as r:
            assert "Sig: other-1:" in await r.text()
        await other.delete(sample.store_path.digest)
        async with client.get(url) as r:
            assert r.status == 404
    finally:
        await client.close()
        await bridge.index.close()
        await pathinfos.close()
        await other.close()


# -- the event loop ------------------------------------------------------------------------------


def test_auto_falls_back_to_asyncio_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # importing it raises ImportError
    assert loop_factory("auto") == ("asyncio", None)
    assert loop_factory("asyncio") == ("asyncio", None)
    with pytest.raises(ConfigurationError, match="uvloop is not installed"):
        loop_factory("uvloop")
    result = CliRunner().invoke(cli, ["nar-bridge", "--event-loop", "uvloop"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "nixcas: error: --event-loop uvloop: uvloop is not installed (the 'fast' extra)"
    ]


def test_auto_and_uvloop_pick_uvloop_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[asyncio.AbstractEventLoop] = []

    def new_event_loop() -> asyncio.AbstractEventLoop:
        made.append(asyncio.new_event_loop())
        return made[-1]

    fake = types.ModuleType("uvloop")
    fake.new_event_loop = new_event_loop  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "uvloop", fake)
    for choice in ("auto", "uvloop"):
        name, factory = loop_factory(choice)
        assert (name, factory) == ("uvloop", new_event_loop)
    assert loop_factory("asyncio") == ("asyncio", None)

    async def which() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    assert run(which, new_event_loop) is made[0]  # the command runs on the factory's loop
    assert made[0].is_closed()


# -- the lean narinfo route in front of the router -------------------------------------------------


async def test_lean_route_answers_like_the_router(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the server (start_bridge), narinfo GETs answer exactly as the routed handler does."""
    import aiohttp

    from nixcas.bridge.server import start_bridge

    sample = await make_sample(tmp_path, "front", {"f": b"front door\n"})
    pathinfos = SqlitePathInfoService(str(tmp_path / "pathinfo.sqlite"))
    await pathinfos.put(_path_info(sample))
    bridge = NarBridge(MemoryBlobService(), MemoryDirectoryService(), pathinfos, NarIndex(None))
    routed = 0
    real = NarBridge.get_narinfo

    async def counting(self: NarBridge, request: web.Request) -> web.Response:
        nonlocal routed
        routed += 1
        return await real(self, request)

    monkeypatch.setattr(NarBridge, "get_narinfo", counting)
    running = await start_bridge("127.0.0.1:0", bridge)
    hash_part = sample.store_path.hash_part
    try:
        async with aiohttp.ClientSession(running.url) as http:

            async def get(path: str, method: str = "GET") -> tuple[int, str, str | None]:
                async with http.request(method, path) as r:
                    return r.status, await r.text(), r.headers.get("Content-Type")

            lean = await get(f"/{hash_part}.narinfo")
            assert routed == 0  # answered in front of the router
            assert lean[0] == 200 and lean[2] == "text/x-nix-narinfo"
            assert f"StorePath: {sample.store_path}\n" in lean[1]
            assert await get(f"/{hash_part}.narinfo?x=1") == lean  # the router's answer, the same
            assert await get(f"/{hash_part}.narinfo", "HEAD") == (200, "", "text/x-nix-narinfo")
            assert routed == 2
            missing = "0" * 32
            assert (await get(f"/{missing}.narinfo"))[:2] == (404, f"{missing}.narinfo: no such path\n")
            bad = await get(f"/{'e' * 32}.narinfo")  # 'e' is not a nixbase32 character
            assert bad[0] == 400 and bad[1].count("\n") == 1
            assert routed == 4
            assert (await get("/nix-cache-info"))[0] == 200
    finally:
        await running.stop()
        await bridge.index.close()
        await pathinfos.close()


async def test_lean_route_steps_aside_for_other_middlewares(tmp_path: Path) -> None:
    """With a middleware besides the bridge's own (an access log, say), every request goes through the router."""
    pathinfos = SqlitePathInfoService(str(tmp_path / "pathinfo.sqlite"))
    bridge = NarBridge(MemoryBlobService(), MemoryDirectoryService(), pathinfos, NarIndex(None))
    try:

        async def router(request: web.BaseRequest) -> web.StreamResponse:
            return web.Response(text="routed")

        assert bridge.front(bridge.application(), router) is not router
        app = bridge.application()

        @web.middleware
        async def access_log(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            return await handler(request)

        app.middlewares.append(access_log)
        assert bridge.front(app, router) is router
    finally:
        await bridge.index.close()
        await pathinfos.close()


async def test_lean_route_keeps_private_caches_private_and_is_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A private bridge's narinfo needs a token on the lean route too; a lean answer is still metered."""
    import aiohttp
    from prometheus_client import REGISTRY

    from nixcas.bridge.auth import Token, Tokens
    from nixcas.bridge.server import start_bridge

    def answered(status: int) -> float:
        labels = {"route": "get_narinfo", "method": "GET", "status": str(status)}
        return REGISTRY.get_sample_value("nixcas_http_requests_total", labels) or 0.0

    sample = await make_sample(tmp_path, "private", {"f": b"private\n"})
    pathinfos = SqlitePathInfoService(str(tmp_path / "pathinfo.sqlite"))
    await pathinfos.put(_path_info(sample))
    tokens = Tokens([Token.make("s3cret", "read", "reader")])
    before = answered(401), answered(200)
    for private in (True, False):
        bridge = NarBridge(
            MemoryBlobService(), MemoryDirectoryService(), pathinfos, NarIndex(None), tokens=tokens, private=private
        )
        running = await start_bridge("127.0.0.1:0", bridge)
        try:
            async with aiohttp.ClientSession(running.url) as http:
                async with http.get(f"/{sample.store_path.hash_part}.narinfo") as r:
                    assert r.status == (401 if private else 200)
                headers = {"Authorization": "Bearer s3cret"}
                async with http.get(f"/{sample.store_path.hash_part}.narinfo", headers=headers) as r:
                    assert r.status == 200
        finally:
            await running.stop()
            await bridge.index.close()
    for _ in range(100):  # counted once the answer is sent
        if (answered(401), answered(200)) == (before[0] + 1, before[1] + 3):
            break
        await asyncio.sleep(0.01)
    assert (answered(401), answered(200)) == (before[0] + 1, before[1] + 3)
    await pathinfos.close()

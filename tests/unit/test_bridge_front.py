"""nar-bridge's front protocol: narinfo and nix-cache-info GETs answered on the transport, the rest by aiohttp."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from nixcas.bridge.app import NarBridge
from nixcas.bridge.front import MAX_HEAD, FrontProtocol, FrontServer
from nixcas.bridge.server import RunningBridge, start_bridge
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.store.narindex import NarIndex
from nixcas.store.narinfo import NarInfo
from nixcas.store.pathinfo.sqlite import SqlitePathInfoService
from nixcas.store.signing import SigningKey
from nixcas.testing.samples import Sample, make_sample


@dataclass
class Served:
    bridge: NarBridge
    running: RunningBridge
    pathinfos: SqlitePathInfoService
    sample: Sample
    handed: list[bytes]
    """What each connection handed to aiohttp started with (recorded by a wrapper of ``_hand_over``)."""

    @property
    def narinfo(self) -> str:
        return f"/{self.sample.store_path.hash_part}.narinfo"

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port = self.running.url.removeprefix("http://").rsplit(":", 1)
        return await asyncio.open_connection(host, int(port))


async def _serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, front: bool = True, **options: Any) -> Served:
    monkeypatch.setenv("NIXCAS_BRIDGE_FRONT", "1" if front else "0")
    sample = await make_sample(tmp_path, "front", {"f": b"front door\n"})
    pathinfos = SqlitePathInfoService(str(tmp_path / "pathinfo.sqlite"))
    await pathinfos.put(NarInfo.parse(sample.narinfo()).to_path_info(sample.node))
    bridge = NarBridge(MemoryBlobService(), MemoryDirectoryService(), pathinfos, NarIndex(None), **options)
    handed: list[bytes] = []
    real = FrontProtocol._hand_over

    def hand_over(self: FrontProtocol, unanswered: bytes) -> None:
        handed.append(unanswered[:60])
        real(self, unanswered)

    monkeypatch.setattr(FrontProtocol, "_hand_over", hand_over)
    running = await start_bridge("127.0.0.1:0", bridge)
    return Served(bridge, running, pathinfos, sample, handed)


@pytest.fixture
async def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Served]:
    s = await _serve(tmp_path, monkeypatch, allow_writes=True)
    try:
        yield s
    finally:
        await _stop(s)


async def _stop(s: Served) -> None:
    await s.running.stop()
    await s.bridge.index.close()
    await s.pathinfos.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bytes]:
    """(status, the head as sent, the body) of one response with a Content-Length."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status = int(head.split(b" ", 2)[1])
    length = re.search(rb"\r\nContent-Length: (\d+)\r\n", head, re.I)
    assert length is not None, head
    return status, head, await asyncio.wait_for(reader.readexactly(int(length.group(1))), 5)


def get(path: str, *headers: str, method: str = "GET") -> bytes:
    return "".join((f"{method} {path} HTTP/1.1\r\nHost: bridge\r\n", *(h + "\r\n" for h in headers), "\r\n")).encode()


async def _exchange(s: Served, request: bytes) -> tuple[int, bytes, bytes]:
    reader, writer = await s.connect()
    try:
        writer.write(request)
        return await read_response(reader)
    finally:
        writer.close()


def _no_date(head: bytes) -> bytes:
    return re.sub(rb"\r\nDate: [^\r]*", b"", head)


async def test_narinfo_bytes_are_the_aiohttp_routes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The front's answer is byte for byte aiohttp's for the same record (the Date aside), nix-cache-info too."""
    answers: dict[bool, list[tuple[int, bytes, bytes]]] = {}
    for front in (True, False):
        s = await _serve(tmp_path / str(front), monkeypatch, front=front)
        try:
            answers[front] = [await _exchange(s, get(path)) for path in (s.narinfo, "/nix-cache-info")]
            assert s.handed == []  # a connection with the front off never meets it
            assert isinstance(s.running.runner.server, FrontServer) is front
        finally:
            await _stop(s)
    for (status, head, body), (status_off, head_off, body_off) in zip(answers[True], answers[False], strict=True):
        assert (status, _no_date(head), body) == (status_off, _no_date(head_off), body_off)
        assert b"\r\nDate: " in head
    assert answers[True][0][1].startswith(b"HTTP/1.1 200 OK\r\nContent-Type: text/x-nix-narinfo\r\n")
    assert b"StorePath: /nix/store/" in answers[True][0][2]


async def test_pipelined_fast_and_slow_answered_in_order(served: Served) -> None:
    missing = "/" + "0" * 32 + ".narinfo"
    reader, writer = await served.connect()
    try:
        writer.write(get(served.narinfo) + get("/nix-cache-info") + get(missing) + get(served.narinfo))
        statuses = [(await read_response(reader))[0] for _ in range(4)]
        assert statuses == [200, 200, 404, 200]
        assert served.handed == [get(missing)[:60]]  # the front answered two, aiohttp the rest
        writer.write(get(served.narinfo))  # aiohttp owns the connection now
        status, _, body = await read_response(reader)
        assert status == 200 and b"StorePath: " in body
        assert len(served.handed) == 1
    finally:
        writer.close()


async def test_request_split_over_many_reads(served: Served) -> None:
    """Byte by byte (one data_received each), then a keep-alive of many requests: all answered by the front."""
    transport = _Transport()
    protocol = served.running.runner.server()  # type: ignore[misc]  # the listener's protocol factory
    assert isinstance(protocol, FrontProtocol)
    protocol.connection_made(transport)
    for byte in get(served.narinfo) + get("/nix-cache-info"):
        protocol.data_received(bytes([byte]))
    assert transport.sent.count(b"HTTP/1.1 200 OK\r\n") == 2
    assert b"StorePath: " in transport.sent and transport.sent.endswith(served.bridge._cache_info)
    reader, writer = await served.connect()
    try:
        for _ in range(50):
            writer.write(get(served.narinfo))
            assert (await read_response(reader))[0] == 200
    finally:
        writer.close()
    assert served.handed == []
    protocol.connection_lost(None)


class _Transport(asyncio.Transport):
    """What a front protocol writes, in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = b""
        self.closed = False

        self.reading = True
        self.full_after: int | None = None
        """Bytes after which the client stops reading (the protocol's writing is paused)."""
        self.protocol: asyncio.Protocol | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += bytes(data)
        if self.full_after is not None and len(self.sent) >= self.full_after and self.protocol is not None:
            self.full_after = None
            self.protocol.pause_writing()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


async def test_no_answer_while_the_client_does_not_read(served: Served) -> None:
    """Pipelined requests to a client that stopped reading: the front pauses, and answers the rest once it reads."""
    transport = _Transport()
    protocol = served.running.runner.server()  # type: ignore[misc]
    assert isinstance(protocol, FrontProtocol)
    protocol.connection_made(transport)
    transport.protocol, transport.full_after = protocol, 1
    protocol.data_received(get(served.narinfo) * 3)
    assert transport.sent.count(b"HTTP/1.1 200 OK") == 1 and not transport.reading
    protocol.data_received(get("/nix-cache-info"))  # what was in flight when reading paused
    assert transport.sent.count(b"HTTP/1.1 200 OK") == 1
    protocol.resume_writing()
    assert transport.sent.count(b"HTTP/1.1 200 OK") == 4 and transport.reading
    assert transport.sent.endswith(served.bridge._cache_info) and served.handed == []
    protocol.connection_lost(None)


async def test_hand_over_mid_buffer_with_a_body(served: Served) -> None:
    """A fast request, then a PUT with a body in the same packet: aiohttp gets every byte not answered."""
    listing = b'{"version":1,"root":{"type":"regular","size":3}}'
    put = get(f"/{served.sample.store_path.hash_part}.ls", f"Content-Length: {len(listing)}", method="PUT") + listing
    reader, writer = await served.connect()
    try:
        writer.write(get(served.narinfo) + put + get(served.narinfo))
        answers = [await read_response(reader) for _ in range(3)]
        assert [a[0] for a in answers] == [200, 200, 200]
        assert answers[0][2] == answers[2][2] and b"StorePath: " in answers[0][2]
        assert served.handed == [put[:60]]
    finally:
        writer.close()


async def test_credentials_private_and_draining_go_to_aiohttp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nixcas.bridge.auth import Token, Tokens

    tokens = Tokens([Token.make("s3cret", "read", "reader")])
    s = await _serve(tmp_path / "private", monkeypatch, tokens=tokens, private=True)
    try:
        assert (await _exchange(s, get(s.narinfo)))[0] == 401
        assert (await _exchange(s, get(s.narinfo, "Authorization: Bearer s3cret")))[0] == 200
        assert len(s.handed) == 2
    finally:
        await _stop(s)
    s = await _serve(tmp_path / "public", monkeypatch, tokens=tokens)
    try:
        assert (await _exchange(s, get(s.narinfo, "Authorization: Bearer wrong")))[0] == 200
        assert len(s.handed) == 1
        reader, writer = await s.connect()
        writer.write(get(s.narinfo))
        assert (await read_response(reader))[0] == 200  # the front's: this connection stays open
        s.running.draining.draining = True
        assert (await _exchange(s, get(s.narinfo)))[0] == 503
        writer.write(get(s.narinfo))  # on the kept-alive connection too
        assert (await read_response(reader))[0] == 503
        assert len(s.handed) == 3
        writer.close()
    finally:
        await _stop(s)


@pytest.mark.parametrize(
    ("name", "request_bytes", "warnings"),
    [
        ("over-long line", b"GET /" + b"a" * (MAX_HEAD + 10) + b".narinfo HTTP/1.1\r\n\r\n", 1),
        ("over-long head, unfinished", b"GET {narinfo} HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD + 10), 1),
        ("repeated Host", b"GET {narinfo} HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 1),
        ("control character", b"GET {narinfo} HTTP/1.1\r\nX: a\x01b\r\n\r\n", 1),
        ("bare line feeds", b"GET {narinfo} HTTP/1.1\nHost: a\n\n", 1),
        ("not HTTP", b"\x16\x03\x01 hello\r\n\r\n", 0),  # aiohttp logs a bad first method at DEBUG
    ],
)
async def test_malformed_requests_get_aiohttps_400(
    served: Served, caplog: pytest.LogCaptureFixture, name: str, request_bytes: bytes, warnings: int
) -> None:
    caplog.set_level(logging.INFO)
    status, head, _ = await _exchange(served, request_bytes.replace(b"{narinfo}", served.narinfo.encode()))
    assert status == 400 and head.startswith(b"HTTP/1.0 400 Bad Request\r\n"), name
    assert len(served.handed) == 1
    bad = [r for r in caplog.records if r.name == "nixcas.bridge.http" and r.levelno >= logging.WARNING]
    assert len(bad) == warnings and all(r.exc_info is None and "bad request" in r.getMessage() for r in bad)


async def test_changed_record_is_served_fresh(served: Served) -> None:
    reader, writer = await served.connect()
    try:
        writer.write(get(served.narinfo))
        assert b"Sig: " not in (await read_response(reader))[2]
        info = await served.pathinfos.get(served.sample.store_path.digest)
        assert info is not None
        await served.pathinfos.put(SigningKey.generate("fresh-1").sign_path_info(info))
        writer.write(get(served.narinfo))
        assert b"Sig: fresh-1:" in (await read_response(reader))[2]
        assert served.handed == []
        await served.pathinfos.delete(served.sample.store_path.digest)
        writer.write(get(served.narinfo))
        assert (await read_response(reader))[0] == 404  # gone: aiohttp says so
    finally:
        writer.close()


async def test_access_line_and_metrics(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    def counted() -> tuple[float, float]:
        requests = {"route": "get_narinfo", "method": "GET", "status": "200"}
        sent = REGISTRY.get_sample_value("nixcas_http_sent_bytes_total", {"route": "get_narinfo"})
        return REGISTRY.get_sample_value("nixcas_http_requests_total", requests) or 0.0, sent or 0.0

    before = counted()
    caplog.set_level(logging.INFO, logger="nixcas.access")
    status, head, body = await _exchange(served, get(served.narinfo))
    assert status == 200 and served.handed == []
    sent = len(head) + len(body)
    assert counted() == (before[0] + 1, before[1] + sent)
    lines = [r.getMessage() for r in caplog.records if r.name == "nixcas.access"]
    assert len(lines) == 1
    assert re.fullmatch(rf'127\.0\.0\.1 "GET {served.narinfo}" 200 {sent}B \d+\.\dms user=-', lines[0]), lines


async def test_shutdown_closes_the_fronts_connections(served: Served) -> None:
    reader, writer = await served.connect()
    writer.write(get(served.narinfo))
    assert (await read_response(reader))[0] == 200
    await served.running.stop()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
    writer.close()


async def test_an_unexpected_lookup_error_goes_to_aiohttp(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    """The front's lookup raising what it never should: aiohttp answers (here with its route's own lookup)."""

    def broken(hash_part: str) -> bytes | None:
        raise RuntimeError("unexpected")

    monkeypatch.setattr(served.bridge, "_narinfo_now", broken)
    reader, writer = await served.connect()
    try:
        writer.write(get(served.narinfo))
        status, _, body = await read_response(reader)
        assert status == 200 and b"StorePath: " in body
        assert len(served.handed) == 1
    finally:
        writer.close()

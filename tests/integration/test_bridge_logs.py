"""A malformed request costs the bridge's log one short line, never a traceback (issue 16, defect 6).

aiohttp logged every request it could not parse (a 100 KB request line, an over-long or invalid
header) as an ERROR with a full traceback quoting up to 8 KiB of what the client sent: any client
could flood the log.  Checked in-process (the logger records) and in a real ``nixcas nar-bridge``
(its stderr).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from nixcas.bridge.app import NarBridge
from nixcas.bridge.server import RunningBridge, start_bridge
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.sizerule import SizeRule
from nixcas.store.narindex import NarIndex
from nixcas.store.pathinfo.memory import MemoryPathInfoService
from nixcas.testing.daemon import running_daemon

BAD_REQUESTS = {
    "100 KB request line": b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "100 KB header": b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"b" * 100_000 + b"\r\n\r\n",
    "invalid header": b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    "header with a NUL": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "500 headers": b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(500)) + b"\r\n",
    "bad method": b"G\x01T / HTTP/1.1\r\nHost: x\r\n\r\n",
}
MAX_LINE = 400


def send(host: str, port: int, payload: bytes) -> bytes:
    """Send ``payload`` on a fresh connection; the answer's status line."""
    with socket.create_connection((host, port), timeout=10) as s:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # answered and closed before reading all
            s.sendall(payload)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while b"\r\n" not in answer and (data := s.recv(4096)):
                answer += data
    return answer.partition(b"\r\n")[0]


@pytest_asyncio.fixture
async def bridge() -> AsyncIterator[RunningBridge]:
    index = NarIndex(None)
    app = NarBridge(MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX), MemoryPathInfoService(), index)
    running = await start_bridge("127.0.0.1:0", app)
    yield running
    await running.stop()
    await index.close()


async def test_each_bad_request_logs_one_short_line(bridge: RunningBridge, caplog: pytest.LogCaptureFixture) -> None:
    host, _, port = bridge.url.removeprefix("http://").rpartition(":")
    caplog.set_level(logging.DEBUG)
    for what, payload in BAD_REQUESTS.items():
        caplog.clear()
        status = await asyncio.to_thread(send, host, int(port), payload)
        assert status.startswith(b"HTTP/1.") and b" 400 " in status + b" ", (what, status)
        await asyncio.sleep(0.05)  # the log record is written after the answer
        records = [r for r in caplog.records if r.name.startswith(("aiohttp", "nixcas.bridge"))]
        assert len(records) <= 1, (what, [r.getMessage()[:200] for r in records])
        for record in records:
            text = record.getMessage()
            assert record.exc_info is None and record.exc_text is None, what
            assert len(text) <= MAX_LINE and "\n" not in text, (what, text[:500])
            assert record.levelno <= logging.WARNING, what
            assert "127.0.0.1" in text, text
    assert await asyncio.to_thread(send, host, int(port), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == b"HTTP/1.1 200 OK"


def test_nar_bridge_stderr_stays_short(tmp_path: Path) -> None:
    """The same requests against the real command: its stderr grows by at most one short line each."""
    with running_daemon(store=tmp_path / "store", log=tmp_path / "log", command="nar-bridge") as d:
        host, _, port = d.url.removeprefix("http://").rpartition(":")
        before = len(d.stderr().splitlines())
        for payload in BAD_REQUESTS.values():
            send(host, int(port), payload)
        time.sleep(0.3)
        lines = d.stderr().splitlines()[before:]
    assert len(lines) <= len(BAD_REQUESTS), lines[:20]
    assert all(len(line) <= MAX_LINE for line in lines), [line[:200] for line in lines]
    assert not any("Traceback" in line or "ERROR" in line for line in lines), lines[:20]

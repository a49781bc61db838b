"""nar-bridge tokens: the token file, scopes, names, ``--private``, Basic and Bearer, SIGHUP reloads (workers too)."""

from __future__ import annotations

import base64
import hashlib
import logging
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from nixcas.bridge.app import USER, NarBridge
from nixcas.bridge.auth import Tokens, presented_secret, reload_tokens
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.errors import ConfigurationError
from nixcas.store.narindex import NarIndex
from nixcas.store.pathinfo.memory import MemoryPathInfoService
from nixcas.testing.daemon import clean_env, nixcas_command, running_daemon
from nixcas.testing.samples import Sample, make_sample

WRITER = "w-Secret-0123456789"
READER = "r-Secret-9876543210"
TOKEN_FILE = f"""# the bridge's tokens
write {WRITER} ci

read  {READER} alice
"""


def basic(secret: str, user: str = "anyone") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()}


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


# -- the token file ---------------------------------------------------------------------------


def test_token_file_format() -> None:
    tokens = Tokens.parse(TOKEN_FILE + f"read {READER}x\n")
    assert [(t.name, t.scope) for t in tokens.tokens] == [("ci", "write"), ("alice", "read"), ("line-5", "read")]
    assert tokens.can_write
    assert tokens.tokens[0].digest == hashlib.sha256(WRITER.encode()).digest()
    assert WRITER not in repr(tokens) and READER not in repr(tokens.tokens[1])
    legacy = Tokens.parse(f"  {WRITER}  \n")  # the original file: one token, which may write
    assert [(t.name, t.scope) for t in legacy.tokens] == [("line-1", "write")]
    assert not Tokens.parse(f"read {READER}\n").can_write


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "empty"),
        ("# only a comment\n\n", "empty"),
        (f"{WRITER} write\n", "line 1: the first field must be the scope"),  # swapped: the token is not shown
        (f"admin {WRITER}\n", "the first field must be the scope"),
        (f"write {WRITER} ci extra\n", "line 1: expected SCOPE TOKEN [NAME], got 4 fields"),
        (f"write {WRITER} ci\nread {READER} ci\n", "line 2: the name 'ci' is used twice"),
        (f"write {WRITER}\nread {WRITER}\n", "line 2: the same token appears twice"),
        (f"write {WRITER} bad/name\n", "line 1: a token name has"),
    ],
)
def test_bad_token_files_name_the_line_never_the_token(text: str, words: str) -> None:
    with pytest.raises(ConfigurationError) as e:
        Tokens.parse(text, "--token-file F")
    message = str(e.value)
    assert words in message and message.startswith("--token-file F: ")
    assert WRITER not in message and READER not in message and "\n" not in message


def test_token_file_unreadable_and_not_utf8(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="missing: No such file"):
        Tokens.load(tmp_path / "missing")
    (tmp_path / "bin").write_bytes(b"write \xff\xfe\n")
    with pytest.raises(ConfigurationError, match="not UTF-8"):
        Tokens.load(tmp_path / "bin")


def test_presented_secret() -> None:
    assert presented_secret(bearer(WRITER)["Authorization"]) == WRITER.encode()
    assert presented_secret(basic(WRITER, "ci")["Authorization"]) == WRITER.encode()
    assert presented_secret("basic " + base64.b64encode(b"u:p:w").decode()) == b"p:w"  # ':' in a password
    for bad in (None, "", "Bearer ", "Basic !!!", "Basic " + base64.b64encode(b"nopassword").decode(), "Digest x"):
        assert presented_secret(bad) is None
    # header bytes that are not UTF-8 (aiohttp hands them over surrogate-escaped): no match, not a 500
    assert presented_secret("Bearer \udcff\udcfe") == b"\xff\xfe"
    assert Tokens.parse(TOKEN_FILE).identify("Bearer \udcff\udcfe") is None
    tokens = Tokens.parse(TOKEN_FILE)
    assert tokens.identify(basic(READER, "alice")["Authorization"]) == tokens.tokens[1]
    assert tokens.identify(basic(READER, "someone-else")["Authorization"]) == tokens.tokens[1]  # any user name
    assert tokens.identify(bearer(WRITER[:-1])["Authorization"]) is None
    assert tokens.identify(bearer(WRITER + "x")["Authorization"]) is None


def test_reload_keeps_the_old_tokens_when_the_file_breaks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "tokens"
    path.write_text(TOKEN_FILE)
    old = Tokens.load(path)
    path.write_text(f"read {READER} alice\nwrite {WRITER} alice\n")  # a duplicate name
    with caplog.at_level(logging.INFO, "nixcas.bridge"):
        assert reload_tokens(old, path) is old
        path.write_text(f"read {WRITER}-2 bob\n")
        new = reload_tokens(old, path)
    assert [t.name for t in new.tokens] == ["bob"]
    assert "tokens not reloaded, 2 kept" in caplog.text and "used twice" in caplog.text
    assert "tokens reloaded" in caplog.text and "bob (read)" in caplog.text
    assert WRITER not in caplog.text and READER not in caplog.text


# -- the bridge ----------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def sample(tmp_path: Path) -> Sample:
    return await make_sample(tmp_path, "auth-1.0", {"a": b"hello\n"})


class Client:
    """A bridge in process, and the ``request.get(USER)`` of each request it answered."""

    def __init__(self, bridge: NarBridge) -> None:
        self.bridge = bridge
        self.users: list[str | None] = []

    async def __aenter__(self) -> Client:
        @web.middleware
        async def record(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            try:
                return await handler(request)
            finally:
                self.users.append(request.get(USER))

        app = self.bridge.application()
        app.middlewares.insert(0, record)  # outermost, as an access log is
        self.client = TestClient(TestServer(app))
        await self.client.start_server()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()
        await self.bridge.index.close()

    async def status(self, method: str, path: str, headers: dict[str, str] | None = None, data: bytes = b"") -> int:
        async with self.client.request(method, path, headers=headers, data=data or None) as r:
            await r.read()
            return r.status


def bridge(**options: object) -> NarBridge:
    index = NarIndex(None)
    return NarBridge(MemoryBlobService(), MemoryDirectoryService(), MemoryPathInfoService(), index, **options)  # type: ignore[arg-type]


@pytest_asyncio.fixture
async def private() -> AsyncIterator[Client]:
    async with Client(bridge(tokens=Tokens.parse(TOKEN_FILE), private=True)) as c:
        yield c


async def upload(c: Client, sample: Sample, headers: dict[str, str] | None) -> tuple[int, int]:
    """PUT the sample's NAR, then its narinfo: both statuses."""
    nar = await c.status("PUT", f"/nar/{sample.nb32}.nar", headers, sample.nar)
    return nar, await c.status("PUT", f"/{sample.store_path.hash_part}.narinfo", headers, sample.narinfo().encode())


async def test_private_bridge_reads_need_a_token(private: Client, sample: Sample) -> None:
    narinfo = f"/{sample.store_path.hash_part}.narinfo"
    assert await upload(private, sample, basic(WRITER, "ci")) == (200, 200)
    async with private.client.get("/nix-cache-info") as r:
        assert r.status == 401
        assert "Basic" in r.headers["WWW-Authenticate"]
        assert "private" in await r.text()
    for path in ("/nix-cache-info", narinfo, f"/nar/{sample.nb32}.nar", f"/{sample.store_path.hash_part}.ls"):
        assert await private.status("GET", path) == 401, path
        assert await private.status("HEAD", path, bearer("wrong")) == 401, path
        assert await private.status("GET", path, basic(READER)) == 200, path
        assert await private.status("GET", path, bearer(WRITER)) == 200, path  # write implies read
    assert await private.status("GET", "/") == 200  # nothing of the store in it


async def test_scopes_and_names(private: Client, sample: Sample) -> None:
    assert await upload(private, sample, None) == (401, 401)
    private.users.clear()
    async with private.client.put(f"/nar/{sample.nb32}.nar", data=sample.nar, headers=basic(READER, "x")) as r:
        assert r.status == 403
        assert "'alice' may only read" in await r.text()
    assert await private.bridge.pathinfos.get(sample.store_path.digest) is None
    assert await upload(private, sample, bearer(WRITER)) == (200, 200)
    assert await private.status("GET", f"/{sample.store_path.hash_part}.narinfo", basic(READER)) == 200
    assert await private.status("GET", "/nix-cache-info") == 401
    assert private.users == ["alice", "ci", "ci", "alice", None]


async def test_public_reads_with_tokens() -> None:
    """Without --private anyone reads; a valid token still names the request, an invalid one is ignored."""
    async with Client(bridge(tokens=Tokens.parse(TOKEN_FILE))) as c:
        assert c.bridge.auth_configured and c.bridge.allow_writes
        assert await c.status("GET", "/nix-cache-info") == 200
        assert await c.status("GET", "/nix-cache-info", bearer("wrong")) == 200
        assert await c.status("GET", "/nix-cache-info", basic(READER)) == 200
        assert await c.status("PUT", f"/{'0' * 32}.ls", bearer("wrong")) == 401
        assert c.users == [None, None, "alice", None]
    async with Client(bridge(allow_writes=True)) as c:
        assert not c.bridge.auth_configured
    with pytest.raises(ValueError, match="private"):
        bridge(private=True)


async def test_reloaded_tokens_apply_to_the_next_request(private: Client) -> None:
    assert await private.status("GET", "/nix-cache-info", basic(READER)) == 200
    private.bridge.tokens = Tokens.parse(f"read {READER}-new bob\n")
    assert await private.status("GET", "/nix-cache-info", basic(READER)) == 401
    assert await private.status("GET", "/nix-cache-info", basic(READER + "-new")) == 200
    assert private.users[-1] == "bob"


# -- the command line ----------------------------------------------------------------------------


def nixcas(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(nixcas_command(*args), capture_output=True, env=clean_env(), timeout=120, check=False)


def test_private_needs_a_token_file_and_bad_files_are_usage_errors(tmp_path: Path) -> None:
    store = ["--store-dir", str(tmp_path / "s")]
    result = nixcas(*store, "nar-bridge", "--private")
    assert result.returncode == 2 and b"--private needs --token-file" in result.stderr
    assert result.stderr.count(b"\n") == 1
    (tmp_path / "t").write_text(f"{WRITER} write\n")
    result = nixcas(*store, "nar-bridge", "--token-file", str(tmp_path / "t"))
    assert result.returncode == 2 and b"line 1" in result.stderr and WRITER.encode() not in result.stderr
    assert result.stderr.count(b"\n") == 1


def get(url: str, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url + "/nix-cache-info", headers=headers)  # noqa: S310 - loopback http://
    try:
        with urllib.request.urlopen(request, timeout=30) as r:  # noqa: S310 - a loopback http:// URL
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.parametrize("workers", [2])  # one worker reloads the same way (serving_bridge), minus the forwarding
def test_sighup_reloads_the_token_file_in_every_worker(tmp_path: Path, workers: int) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN_FILE)
    args = ["-l", "127.0.0.1:0", "--workers", str(workers), "--private", "--token-file", str(tokens)]
    log = tmp_path / "log"
    with running_daemon(*args, store=tmp_path / "s", log=log, command="nar-bridge") as b:
        assert get(b.url, basic(READER)) == 200
        tokens.write_text(f"read {READER}-2 bob\n")
        b.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while b.stderr().count("tokens reloaded") < workers and time.monotonic() < deadline:
            time.sleep(0.05)
        assert b.stderr().count("tokens reloaded") == workers, b.stderr()
        for _ in range(4 * workers):  # new connections: the kernel spreads them over the workers
            assert get(b.url, basic(READER)) == 401
            assert get(b.url, basic(READER + "-2")) == 200
        tokens.write_text("broken line with too many fields\n")
        b.proc.send_signal(signal.SIGHUP)
        while b.stderr().count("tokens not reloaded") < workers and time.monotonic() < deadline + 10:
            time.sleep(0.05)
        assert get(b.url, basic(READER + "-2")) == 200  # the old tokens stay
        assert b.proc.poll() is None
    assert READER not in b.stderr()

"""The Nix worker protocol in process: a hand-written client against ``serving_unix`` over memory services.

The client here is written from the protocol description (docs/nix-worker-protocol.md),
independently of the daemon's own serializer; the real Nix client is in test_nix_daemon.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from nixcas.castore.pins.base import Pin
from nixcas.composition import (
    blob_service_from_url,
    directory_service_from_url,
    pathinfo_service_from_url,
    pin_service_from_url,
)
from nixcas.store import nixbase32
from nixcas.store.daemon.ops import DaemonState
from nixcas.store.daemon.server import serving_unix
from nixcas.store.daemon.trust import TrustPolicy
from nixcas.store.narinfo import fingerprint
from nixcas.store.signing import SigningKey
from nixcas.store.store_path import StorePath, build_nar_path

# -- protocol facts, written out independently --------------------------------------------------------

MAGIC_1 = 0x6E697863
MAGIC_2 = 0x6478696F
NEXT, READ, LAST, ERROR = 0x6F6C6D67, 0x64617461, 0x616C7473, 0x63787470
IS_VALID_PATH, QUERY_REFERRERS, BUILD_PATHS, ENSURE_PATH, ADD_TEMP_ROOT = 1, 6, 9, 10, 11
SET_OPTIONS, QUERY_PATH_INFO, QUERY_PATH_FROM_HASH_PART, QUERY_VALID_PATHS = 19, 26, 29, 31
QUERY_VALID_DERIVERS, OPTIMISE_STORE, VERIFY_STORE, ADD_SIGNATURES, NAR_FROM_PATH = 33, 34, 35, 37, 38
ADD_TO_STORE_NAR, QUERY_MISSING, QUERY_DERIVATION_OUTPUT_MAP, QUERY_REALISATION = 39, 40, 41, 43
ADD_MULTIPLE_TO_STORE, BUILD_PATHS_WITH_RESULTS, ADD_PERM_ROOT = 44, 46, 47

KEY = SigningKey.generate("test-key-1")
OTHER_KEY = SigningKey.generate("other-key-1")


def u64(n: int) -> bytes:
    return struct.pack("<Q", n)


def s(data: bytes | str) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    return u64(len(raw)) + raw + bytes(-len(raw) & 7)


def strs(items: list[str]) -> bytes:
    return u64(len(items)) + b"".join(s(i) for i in items)


def nar_file(contents: bytes) -> bytes:
    return b"".join(s(t) for t in (b"nix-archive-1", b"(", b"type", b"regular", b"contents", contents, b")"))


def nar_dir(entries: list[tuple[bytes, bytes]]) -> bytes:
    """A directory NAR whose entries (name, file contents) are written in the order given."""
    out = [s(t) for t in (b"nix-archive-1", b"(", b"type", b"directory")]
    for name, contents in entries:
        out += [s(t) for t in (b"entry", b"(", b"name", name, b"node", b"(", b"type", b"regular", b"contents")]
        out += [s(contents), s(b")"), s(b")")]
    out.append(s(b")"))
    return b"".join(out)


@dataclass
class Item:
    """A path to upload: its NAR and metadata."""

    path: StorePath
    nar: bytes
    references: list[str]
    sigs: list[str]
    ca: str = ""
    nar_size: int | None = None
    nar_hash: str | None = None

    def info(self) -> bytes:
        return (
            s(str(self.path))
            + s("")
            + s(self.nar_hash or hashlib.sha256(self.nar).hexdigest())
            + strs(self.references)
            + u64(0)
            + u64(len(self.nar) if self.nar_size is None else self.nar_size)
            + u64(0)
            + strs(self.sigs)
            + s(self.ca)
        )


def signed(name: str, nar: bytes, references: list[str] = (), key: SigningKey | None = KEY) -> Item:  # type: ignore[assignment]
    path = StorePath(hashlib.sha256(name.encode() + nar).digest()[:20], name)
    refs = list(references)
    sha = hashlib.sha256(nar).digest()
    sigs = []
    if key is not None:
        fp = fingerprint(path, sha, len(nar), [StorePath.from_absolute_path(r) for r in refs])
        sigs = [str(key.sign(fp))]
    return Item(path, nar, refs, sigs)


def content_addressed(name: str, nar: bytes) -> Item:
    sha = hashlib.sha256(nar).digest()
    return Item(build_nar_path(name, sha), nar, [], [], ca=f"fixed:r:sha256:{nixbase32.encode(sha)}")


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.minor = 0
        self.logs: list[str] = []
        self.feed = b""  # what STDERR_READ requests are answered from

    async def u64(self) -> int:
        value: int = struct.unpack("<Q", await self.reader.readexactly(8))[0]
        return value

    async def string(self) -> bytes:
        n = await self.u64()
        data = await self.reader.readexactly(n + (-n & 7))
        return data[:n]

    async def strings(self) -> list[str]:
        return [(await self.string()).decode() for _ in range(await self.u64())]

    def send(self, *parts: bytes) -> None:
        self.writer.write(b"".join(parts))

    async def handshake(self, minor: int = 37) -> tuple[int, bytes, int | None]:
        self.send(u64(MAGIC_1))
        assert await self.u64() == MAGIC_2
        server = await self.u64()
        self.minor = min(minor, server & 0xFF)
        self.send(u64(1 << 8 | minor), u64(0), u64(0))
        version = await self.string() if self.minor >= 33 else b""
        trust = await self.u64() if self.minor >= 35 else None
        assert await self.result() is None
        return server, version, trust

    async def result(self) -> str | None:
        """Read log messages up to STDERR_LAST (None) or an error (its message)."""
        await self.writer.drain()
        while True:
            code = await self.u64()
            if code == LAST:
                return None
            if code == NEXT:
                self.logs.append((await self.string()).decode())
            elif code == READ:
                n = await self.u64()
                chunk, self.feed = self.feed[:n], self.feed[n:]
                self.send(s(chunk))
                await self.writer.drain()
            elif code == ERROR:
                if self.minor >= 26:
                    assert await self.string() == b"Error"
                    await self.u64()
                    await self.string()
                    message = (await self.string()).decode()
                    assert await self.u64() == 0
                    for _ in range(await self.u64()):
                        await self.u64()
                        await self.string()
                    return message
                message = (await self.string()).decode()
                await self.u64()
                return message
            else:
                raise AssertionError(f"unexpected stderr code {code:#x}")

    async def op(self, *parts: bytes) -> str | None:
        self.send(*parts)
        return await self.result()

    async def is_valid(self, path: StorePath | str) -> bool:
        assert await self.op(u64(IS_VALID_PATH), s(str(path))) is None
        return await self.u64() == 1

    async def add(self, item: Item, *, dont_check_sigs: bool = False) -> str | None:
        head = u64(ADD_TO_STORE_NAR) + item.info() + u64(0) + u64(1 if dont_check_sigs else 0)
        if self.minor >= 23:
            framed = b"".join(u64(len(c)) + c for c in (item.nar[:100], item.nar[100:]) if c) + u64(0)
            return await self.op(head, framed)
        if self.minor >= 21:
            self.feed = item.nar
            return await self.op(head)
        return await self.op(head, item.nar)

    async def add_multiple(self, items: list[Item]) -> str | None:
        body = u64(len(items)) + b"".join(i.info() + i.nar for i in items)
        framed = b"".join(u64(len(body[i : i + 64])) + body[i : i + 64] for i in range(0, len(body), 64)) + u64(0)
        return await self.op(u64(ADD_MULTIPLE_TO_STORE), u64(0), u64(0), framed)

    async def closed(self) -> bool:
        await self.writer.drain()
        return await asyncio.wait_for(self.reader.read(1), 5) == b""


@dataclass
class Daemon:
    socket: Path
    state: DaemonState

    @asynccontextmanager
    async def connect(self, minor: int | None = 37) -> AsyncIterator[Client]:
        reader, writer = await asyncio.open_unix_connection(str(self.socket))
        client = Client(reader, writer)
        try:
            if minor is not None:
                await client.handshake(minor)
            yield client
        finally:
            writer.close()


@asynccontextmanager
async def daemon(*, trusted: bool = True) -> AsyncIterator[Daemon]:
    state = DaemonState(
        await blob_service_from_url("memory://"),
        await directory_service_from_url("memory://"),
        await pathinfo_service_from_url("memory://"),
        await pin_service_from_url("memory://"),
        trusted_keys=(KEY.public,),
    )
    me = str(os.getuid())
    policy = TrustPolicy((me,) if trusted else (), ("*",))
    with tempfile.TemporaryDirectory(prefix="nixcas-nd-") as d:
        sock = Path(d) / "sock"
        async with serving_unix(sock, state, policy):
            yield Daemon(sock, state)


DEP = signed("dep", nar_file(b"I am the dependency\n"))


# -- tests ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("minor", [18, 21, 26, 33, 35, 37, 40])
async def test_handshake_every_minor(minor: int) -> None:
    """Every minor from 1.18 on: the session runs at min(client, 1.37), with the fields that minor has."""
    async with daemon() as d, d.connect(None) as c:
        server, version, trust = await c.handshake(minor)
        assert server == 1 << 8 | 37
        assert c.minor == min(minor, 37)
        assert (version != b"") == (c.minor >= 33)
        assert trust == (1 if c.minor >= 35 else None)
        assert await c.op(u64(SET_OPTIONS), *(u64(0) for _ in range(12)), u64(1), s("a"), s("b")) is None
        assert not await c.is_valid(DEP.path)


async def test_wrong_magic_and_versions_are_refused_while_others_are_served() -> None:
    async with daemon() as d:
        async with d.connect(None) as bad:
            bad.send(u64(0x12345678))
            assert await bad.closed()  # not even the server's magic
        async with d.connect(None) as major2:
            major2.send(u64(MAGIC_1))
            await major2.u64()
            await major2.u64()
            major2.send(u64(2 << 8 | 1))
            assert await major2.closed()
        async with d.connect(None) as old:
            old.send(u64(MAGIC_1))
            await old.u64()
            await old.u64()
            old.send(u64(1 << 8 | 17), u64(0), u64(0))
            old.minor = 17
            assert "too old" in (await old.result() or "")
            assert await old.closed()
        async with d.connect() as good:
            assert await good.add(DEP) is None
            assert await good.is_valid(DEP.path)


@pytest.mark.parametrize("minor", [20, 22, 37])
async def test_add_query_and_read_back_in_every_framing(minor: int) -> None:
    """Raw NAR (< 1.21), STDERR_READ tunnel (1.21, 1.22), framed (≥ 1.23): stored, described, rendered back."""
    top = signed("top", nar_dir([(b"a", str(DEP.path).encode()), (b"b", b"x" * 5000)]), [str(DEP.path)])
    async with daemon() as d, d.connect(minor) as c:
        assert await c.add(DEP) is None
        assert await c.add(top) is None
        assert await c.op(u64(QUERY_PATH_INFO), s(str(top.path))) is None
        assert await c.u64() == 1
        assert await c.string() == b""  # deriver
        assert await c.string() == hashlib.sha256(top.nar).hexdigest().encode()
        assert await c.strings() == [str(DEP.path)]
        await c.u64()  # registration time
        assert await c.u64() == len(top.nar)
        assert await c.u64() == 0  # ultimate
        assert await c.strings() == top.sigs
        assert await c.string() == b""
        assert await c.op(u64(NAR_FROM_PATH), s(str(top.path))) is None
        assert await c.reader.readexactly(len(top.nar)) == top.nar
        substitute = u64(0) if c.minor >= 27 else b""
        assert (
            await c.op(u64(QUERY_VALID_PATHS), strs([str(top.path), "/nix/store/" + "0" * 32 + "-x"]), substitute)
            is None
        )
        assert await c.strings() == [str(top.path)]
        assert await c.op(u64(QUERY_PATH_FROM_HASH_PART), s(top.path.hash_part)) is None
        assert (await c.string()).decode() == str(top.path)
        assert await c.op(u64(QUERY_REFERRERS), s(str(DEP.path))) is None
        assert await c.strings() == [str(top.path)]
        assert await c.op(u64(QUERY_PATH_INFO), s("/nix/store/" + "1" * 32 + "-absent")) is None
        assert await c.u64() == 0


async def test_add_multiple_build_and_empty_answers() -> None:
    top = signed("top", nar_file(str(DEP.path).encode()), [str(DEP.path)])
    ca = content_addressed("ca", nar_file(b"content addressed"))
    absent = "/nix/store/" + "2" * 32 + "-absent"
    async with daemon() as d, d.connect() as c:
        assert await c.add_multiple([DEP, top, ca]) is None
        assert all([await c.is_valid(i.path) for i in (DEP, top, ca)])
        assert await c.add_multiple([DEP, top, ca]) is None  # valid already: skipped, the stream stays in sync
        assert await c.add(top) is None
        assert await c.op(u64(QUERY_MISSING), strs([str(top.path), absent, absent + ".drv!out"])) is None
        assert [await c.u64(), await c.u64()] == [0, 0]
        assert await c.strings() == [absent, absent + ".drv"]
        assert [await c.u64(), await c.u64()] == [0, 0]
        assert await c.op(u64(ENSURE_PATH), s(str(top.path))) is None
        assert await c.u64() == 1
        error = await c.op(u64(BUILD_PATHS), strs([absent]), u64(0))
        assert error is not None and error.startswith("nixcas does not build")
        error = await c.op(u64(BUILD_PATHS_WITH_RESULTS), strs([absent + ".drv!out"]), u64(0))
        assert error is not None and error.startswith("nixcas does not build")
        assert await c.op(u64(BUILD_PATHS_WITH_RESULTS), strs([str(top.path)]), u64(0)) is None
        assert await c.u64() == 1
        assert (await c.string()).decode() == str(top.path)
        assert await c.u64() == 2  # AlreadyValid
        assert await c.string() == b""
        assert [await c.u64() for _ in range(4 + 2 + 1)] == [0] * 7  # times, cpu times, no outputs
        for op in (QUERY_VALID_DERIVERS, QUERY_DERIVATION_OUTPUT_MAP):
            assert await c.op(u64(op), s(str(top.path))) is None
            assert await c.u64() == 0
        assert await c.op(u64(QUERY_REALISATION), s("sha256:" + "0" * 64 + "!out")) is None
        assert await c.u64() == 0
        assert await c.op(u64(OPTIMISE_STORE)) is None
        assert await c.u64() == 1
        assert await c.op(u64(VERIFY_STORE), u64(1), u64(0)) is None
        assert await c.u64() == 0  # no errors


def _corrupt(item: Item, **changes: object) -> Item:
    """``item`` with its metadata changed, signed again (so what fails is the NAR check, not the signature)."""
    bad = Item(**{**item.__dict__, **changes})
    sha = bytes.fromhex(bad.nar_hash) if bad.nar_hash else hashlib.sha256(bad.nar).digest()
    size = len(bad.nar) if bad.nar_size is None else bad.nar_size
    refs = [StorePath.from_absolute_path(r) for r in bad.references]
    bad.sigs = [str(KEY.sign(fingerprint(bad.path, sha, size, refs)))]
    return bad


@pytest.mark.parametrize("minor", [22, 37])
async def test_bad_uploads_store_nothing_and_the_session_goes_on(minor: int) -> None:
    top = signed("top", nar_file(str(DEP.path).encode()), [str(DEP.path)])
    dotdot = signed("dotdot", nar_dir([(b"..", b"x")]))
    unsorted = signed("unsorted", nar_dir([(b"b", b"1"), (b"a", b"2")]))
    wrong_hash = _corrupt(DEP, nar_hash=hashlib.sha256(b"other").hexdigest())
    wrong_size = _corrupt(DEP, nar=DEP.nar + bytes(8), nar_size=len(DEP.nar) + 8)
    unsigned = signed("unsigned", nar_file(b"nobody signed me"), key=None)
    async with daemon(trusted=False) as d, d.connect(minor) as c:
        cases = [
            (wrong_hash, "sha256 mismatch"),
            (wrong_size, "invalid NAR"),
            (dotdot, "'..'"),
            (unsorted, "not sorted"),
            (top, "references are not valid"),
            (unsigned, "lacks a signature by a trusted key"),
            (signed("other", nar_file(b"x"), key=OTHER_KEY), "lacks a signature by a trusted key"),
        ]
        for item, expected in cases:
            error = await c.add(item)
            assert error is not None and expected in error, (item.path, error)
            assert not await c.is_valid(item.path)
        assert await c.add(unsigned, dont_check_sigs=True) is not None  # an untrusted client cannot skip checks
        assert await c.add(DEP) is None
        assert await c.add(content_addressed("ca", nar_file(b"ca"))) is None
        assert await c.add(top) is None
    assert [i async for i in d.state.pathinfos.list()] != []


async def test_trusted_client_may_skip_signature_checks() -> None:
    unsigned = signed("unsigned", nar_file(b"nobody signed me"), key=None)
    async with daemon() as d, d.connect() as c:
        assert "lacks a signature" in (await c.add(unsigned) or "")
        assert await c.add(unsigned, dont_check_sigs=True) is None
        assert await c.is_valid(unsigned.path)


async def test_add_multiple_stops_at_a_bad_path_and_keeps_the_good_ones() -> None:
    bad = _corrupt(signed("bad", nar_file(b"bad")), nar_hash=hashlib.sha256(b"x").hexdigest())
    after = signed("after", nar_file(b"after"))
    async with daemon() as d, d.connect() as c:
        error = await c.add_multiple([DEP, bad, after])
        assert error is not None and "mismatch" in error
        assert [await c.is_valid(i.path) for i in (DEP, bad, after)] == [True, False, False]


async def test_unknown_op_and_truncation_close_only_that_connection() -> None:
    async with daemon() as d:
        async with d.connect() as c:
            error = await c.op(u64(9999))
            assert error is not None and "not supported" in error
            assert await c.closed()
        async with d.connect() as c:
            c.send(u64(ADD_TO_STORE_NAR), DEP.info(), u64(0), u64(0), u64(len(DEP.nar)), DEP.nar[:50])
            await c.writer.drain()
            c.writer.write_eof()
            assert "truncated" in (await c.result() or "")
            assert await c.closed()
        async with d.connect() as c:
            c.send(u64(QUERY_PATH_INFO), u64(100))  # a string cut short
            c.writer.write_eof()
            assert "truncated" in (await c.result() or "")
            assert await c.closed()
        async with d.connect() as c:
            assert not await c.is_valid(DEP.path)
            assert await c.add(DEP) is None


async def test_roots_and_signatures() -> None:
    async with daemon() as d:
        assert d.state.pins is not None
        async with d.connect() as c:
            assert await c.add(DEP) is None
            assert await c.op(u64(ADD_TEMP_ROOT), s(str(DEP.path))) is None
            assert await c.u64() == 1
            assert [p.name async for p in _pins(d)] != []
            assert await c.op(u64(ADD_PERM_ROOT), s(str(DEP.path)), s("/tmp/result")) is None
            assert await c.string() == b"/tmp/result"
            sig = KEY.sign(b"something else")
            assert await c.op(u64(ADD_SIGNATURES), s(str(DEP.path)), strs([str(OTHER_KEY.sign(b"x"))])) is None
            assert await c.u64() == 1
            del sig
        await asyncio.sleep(0.05)
        names = [p.name async for p in _pins(d)]
        assert names == ["nix-perm:%2Ftmp%2Fresult"]  # the temporary root went with the session
    async with daemon(trusted=False) as d, d.connect() as c:
        assert await c.add(DEP) is None
        error = await c.op(u64(ADD_SIGNATURES), s(str(DEP.path)), strs([str(OTHER_KEY.sign(b"x"))]))
        assert error is not None and "not a valid signature by a trusted key" in error
        error = await c.op(u64(ADD_PERM_ROOT), s(str(DEP.path)), s("/tmp/result"))
        assert error is not None and "not privileged" in error


async def test_a_signature_name_with_a_line_break_is_refused() -> None:
    """Issue 16, defect 3 at this entry point: no narinfo line can be injected through a signature name."""
    bad = "cache.example.org-1\nSystem x86_64-linux:" + "A" * 86 + "=="  # the text form's name ends at a ':'
    injected = signed("injected", nar_file(b"x\n"))
    injected.sigs.append(bad)
    async with daemon() as d, d.connect() as c:
        error = await c.add(injected, dont_check_sigs=True)
        assert error is not None and "invalid signature" in error
        assert not await c.is_valid(injected.path)
        assert await c.add(DEP) is None
        error = await c.op(u64(ADD_SIGNATURES), s(str(DEP.path)), strs([bad]))
        assert error is not None and "invalid signature" in error
        info = await d.state.pathinfos.get(DEP.path.digest)
        assert info is not None and [str(sig) for sig in info.signatures] == DEP.sigs


async def test_a_nar_deeper_than_the_limit_is_refused_and_the_session_goes_on() -> None:
    """Issue 16, defect 1 at this entry point: nesting past MAX_DEPTH (2048) is refused while parsing."""
    step = [s(t) for t in (b"entry", b"(", b"name", b"a", b"node", b"(", b"type", b"directory")]
    deep = [s(b"nix-archive-1"), s(b"("), s(b"type"), s(b"directory"), *step * 2049, s(b")") * (2 * 2049 + 1)]
    item = signed("deep", b"".join(deep))
    async with daemon() as d, d.connect() as c:
        error = await c.add(item)
        assert error is not None and "deeper than" in error and "2048 levels" in error
        assert not await c.is_valid(item.path)
        assert await c.add(DEP) is None


async def _pins(d: Daemon) -> AsyncIterator[Pin]:
    assert d.state.pins is not None
    for pin in await d.state.pins.list():
        yield pin


async def test_socket_is_replaced_when_stale_refused_when_live_and_mode_0666() -> None:
    import socket as socket_module
    import stat

    from nixcas.errors import ConfigurationError
    from nixcas.store.daemon.server import prepare_socket_path

    with tempfile.TemporaryDirectory(prefix="nixcas-nd-") as d:
        path = Path(d) / "sock"
        stale = socket_module.socket(socket_module.AF_UNIX)
        stale.bind(str(path))
        stale.close()  # bound, never listening: what a killed daemon leaves
        async with daemon() as first:
            state = first.state
        async with serving_unix(path, state, TrustPolicy(("*",))):
            assert stat.S_IMODE(path.stat().st_mode) == 0o666
            with pytest.raises(ConfigurationError, match="another daemon is listening"):
                prepare_socket_path(path)
        assert not path.exists()  # removed on the way out
        path.write_text("not a socket")
        with pytest.raises(ConfigurationError, match="not a socket"):
            prepare_socket_path(path)
        assert path.read_text() == "not a socket"


async def test_users_not_allowed_are_told_so() -> None:
    async with daemon() as d:
        policy = TrustPolicy((), ("nobody-at-all",))
        other = Path(d.socket).with_name("other")
        async with serving_unix(other, d.state, policy):
            reader, writer = await asyncio.open_unix_connection(str(other))
            c = Client(reader, writer)
            c.send(u64(MAGIC_1))
            await c.u64()
            await c.u64()
            c.send(u64(1 << 8 | 37), u64(0), u64(0))
            c.minor = 37
            await c.string()
            assert await c.u64() == 2  # not trusted
            assert "not allowed to connect" in (await c.result() or "")
            assert await c.closed()
            writer.close()


def test_trust_policy_entries() -> None:
    from nixcas.store.daemon.trust import Peer

    me = Peer(1, os.getuid(), os.getgid())
    group = next(iter(me.groups()))
    assert TrustPolicy(("*",)).is_trusted(me)
    assert TrustPolicy((me.user,)).is_trusted(me)
    assert TrustPolicy((f"@{group}",)).is_trusted(me)
    assert not TrustPolicy(("@no-such-group-here", "no-such-user")).is_trusted(me)
    assert not TrustPolicy((), ("someone-else",)).is_allowed(me)
    assert TrustPolicy((me.user,), ()).is_allowed(me)  # trusted users may always connect


async def test_lists_are_bounded_in_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A list of paths whose strings exceed the byte budget ends the session instead of filling memory."""
    from nixcas.store.daemon import wire

    monkeypatch.setattr(wire, "MAX_LIST_BYTES", 1000)
    many = [str(DEP.path)] * 30  # 30 paths of 53 bytes
    async with daemon() as d, d.connect() as c:
        error = await c.op(u64(QUERY_VALID_PATHS), strs(many), u64(0))
        assert error is not None and "longer than the 1000 bytes accepted" in error
        assert await c.closed()


def flat(name: str, contents: bytes, claimed: bytes | None = None, kind: str = "fixed:sha256:") -> Item:
    """A flat (or text) content-addressed file: its store path from the hash of ``claimed`` (default: contents)."""
    from nixcas.store.hashes import CAHash
    from nixcas.store.store_path import build_ca_path

    ca = f"{kind}{nixbase32.encode(hashlib.sha256(contents if claimed is None else claimed).digest())}"
    return Item(build_ca_path(name, CAHash.parse(ca)), nar_file(contents), [], [], ca=ca)


async def test_flat_and_text_content_addresses_are_checked_against_the_file() -> None:
    """Unsigned flat/text CA paths (``nix store add-file``, .drv files) are accepted only if the file has that hash."""
    async with daemon(trusted=False) as d, d.connect() as c:
        for item in (flat("f", b"flat file\n"), flat("t.drv", b"Derive(...)", kind="text:sha256:")):
            assert await c.add(item) is None, item.ca
            assert await c.is_valid(item.path)
        liar = flat("liar", b"what is stored", claimed=b"what the hash says")
        error = await c.add(liar)
        assert error is not None and "does not have the hash of its content address" in error
        assert not await c.is_valid(liar.path)
        assert await c.add_multiple([liar]) is not None
        assert not await c.is_valid(liar.path)


async def test_add_to_store_by_content() -> None:
    """AddToStore (nix-store --add): a NAR and a name; the answer is the path info of the path it makes."""
    nar = nar_dir([(b"a", b"1"), (b"b", b"2")])
    framed = u64(len(nar)) + nar + u64(0)
    async with daemon(trusted=False) as d, d.connect() as c:
        assert await c.op(u64(7), s("added"), s("fixed:r:sha256"), strs([]), u64(0), framed) is None
        path = (await c.string()).decode()
        assert path == str(content_addressed("added", nar).path)
        assert await c.string() == b""  # deriver
        assert await c.string() == hashlib.sha256(nar).hexdigest().encode()
        assert await c.strings() == []
        assert [await c.u64(), await c.u64(), await c.u64()] == [0, len(nar), 0]
        assert await c.strings() == []
        assert (await c.string()).decode() == content_addressed("added", nar).ca
        error = await c.op(u64(7), s("flat"), s("fixed:sha256"), strs([]), u64(0), framed)
        assert error is not None and "not supported" in error
        assert await c.is_valid(path)  # the session went on


def test_socket_activation_and_notify(tmp_path: Path) -> None:
    """Under systemd: the passed socket is served (its file kept), READY=1 once it is, STOPPING=1 on SIGTERM."""
    import signal
    import socket
    import subprocess

    from nixcas.testing.daemon import as_systemd_starts, clean_env, nixcas_command

    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(tmp_path / "nix.sock"))
    listening.listen()
    notifications = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notifications.bind(str(tmp_path / "notify"))
    notifications.settimeout(30)
    env = {**clean_env(), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "nix-daemon", "NOTIFY_SOCKET": str(tmp_path / "notify")}
    command = nixcas_command("--store-dir", str(tmp_path / "store"), "nix-daemon", "-l", str(tmp_path / "unused"))
    argv, fds = as_systemd_starts(command, [listening])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, pass_fds=fds)
    for fd in fds:
        os.close(fd)
    listening.close()
    try:
        try:
            assert notifications.recv(100) == b"READY=1"
        except TimeoutError:
            proc.kill()
            raise AssertionError(f"no READY=1; the daemon said: {proc.communicate()[1].decode()}") from None
        assert proc.stdout is not None
        assert proc.stdout.readline().decode().strip() == f"listening on unix://{tmp_path / 'nix.sock'}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(30)
            client.connect(str(tmp_path / "nix.sock"))
            client.sendall(u64(MAGIC_1))
            assert struct.unpack("<QQ", client.recv(16, socket.MSG_WAITALL)) == (MAGIC_2, 1 << 8 | 37)
        proc.send_signal(signal.SIGTERM)
        assert notifications.recv(100) == b"STOPPING=1"
        assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
        assert (tmp_path / "nix.sock").exists() and not (tmp_path / "unused").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_backend_errors_reach_the_client_without_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """An error frame carries no configured secret; an unexpected error's details stay in the daemon's log."""
    from nixcas.errors import StorageError
    from nixcas.urls import remember_secrets

    remember_secrets("postgresql://nixcas:Sup3rSecretPassw0rd@db.example/x")
    async with daemon() as d, d.connect(None) as c:
        await c.handshake()

        async def failing(path: StorePath) -> None:
            raise StorageError("cannot reach postgresql://nixcas:Sup3rSecretPassw0rd@db.example/x")

        monkeypatch.setattr(d.state, "get", failing)
        error = await c.op(u64(IS_VALID_PATH), s(str(DEP.path)))
        assert error is not None and "cannot reach" in error and "Sup3rSecret" not in error

        async def broken(path: StorePath) -> None:
            raise RuntimeError("boom Sup3rSecretPassw0rd")

        monkeypatch.setattr(d.state, "get", broken)
        error = await c.op(u64(IS_VALID_PATH), s(str(DEP.path)))
        assert error is not None and "internal error" in error and "boom" not in error


async def test_a_bad_path_in_query_substitutable_path_infos_keeps_the_session_in_step() -> None:
    async with daemon() as d, d.connect(None) as c:
        await c.handshake()
        bad, good = "/nix/store/not-a-store-path", str(DEP.path)
        error = await c.op(u64(30), u64(2), s(bad), s(""), s(good), s(""))
        assert error is not None
        assert not await c.is_valid(DEP.path)  # the next operation is read as one: still in step

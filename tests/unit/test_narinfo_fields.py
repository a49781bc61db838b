"""No entry point stores or serves a narinfo field that would add lines of its own (issue 16, defect 3).

The attack: a signature *name* ``k-1\\nURL: http://evil…`` put over gRPC was stored, and the bridge
served it as two lines (signed with ``--sign-key``), which real Nix follows.  Every field is now
checked where its value is built (:func:`nixcas.store.pathinfo.model.check_path_info_fields`, the
:class:`Signature` and :class:`NarInfo` constructors), so each entry point below refuses it:
gRPC ``Put`` under the tvix and snix names, ``PUT /<hash>.narinfo``, a ``nix+http`` upstream,
``nixcas copy``, and a record that reaches a backend some other way is never served.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from nixcas._proto.tvix.store.protos import pathinfo_pb2 as pb
from nixcas.bridge.app import NarBridge
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.sizerule import SizeRule
from nixcas.errors import PathInfoError
from nixcas.server import RunningServer, start_server
from nixcas.store import nixbase32
from nixcas.store.narindex import NarIndex
from nixcas.store.narinfo import NarInfo
from nixcas.store.pathinfo.memory import MemoryPathInfoService
from nixcas.store.pathinfo.model import PathInfo, Signature
from nixcas.store.pathinfo.nixhttp import NixHttpPathInfoService
from nixcas.store.signing import SigningKey
from nixcas.store.store_path import StorePath
from nixcas.testing.daemon import clean_env, nixcas_command
from nixcas.testing.pathinfoservice import make_path_info

INJECTED = "cache.example.org-1\nURL: http://evil.example/nar/x.nar"
BAD_NAMES = [INJECTED, "k-1\rURL: x", "k 1", "k-1\x00", "", "k:1", "ké-1"]


def with_signature_name(name: str) -> pb.PathInfo:
    msg = make_path_info("victim", 2).to_proto()
    msg.narinfo.signatures.add(name=name, data=bytes(64))
    return msg


# -- the one check ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", BAD_NAMES)
def test_signature_names_are_key_names(name: str) -> None:
    with pytest.raises(PathInfoError, match="invalid signature name") as raised:
        Signature(name, bytes(64))
    assert "\n" not in str(raised.value) and "\r" not in str(raised.value)
    with pytest.raises(PathInfoError, match="invalid signature name"):
        PathInfo.from_proto(with_signature_name(name))


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("url", "nar/x.nar\nStorePath: /nix/store/evil", "URL"),
        ("url", "nar/x y.nar", "URL"),
        ("url", "", "URL"),
        ("compression", "xz\nURL: http://evil", "Compression"),
        ("system", "x86_64-linux\rURL: http://evil", "System"),
        ("file_size", -1, "FileSize"),
        ("nar_size", 1 << 64, "NAR size"),
    ],
)
def test_narinfo_fields_are_one_line_each(field: str, value: object, words: str) -> None:
    info = make_path_info("fields", 3)
    values: dict[str, object] = {
        "store_path": info.store_path,
        "url": "nar/x.nar",
        "nar_sha256": info.nar_sha256,
        "nar_size": info.nar_size,
        "system": "x86_64-linux",
        "file_size": 3,
        field: value,
    }
    with pytest.raises(PathInfoError, match=words):
        NarInfo(**values)  # type: ignore[arg-type]


def test_a_rendered_narinfo_parses_back_to_itself() -> None:
    """What the constructor accepts renders to exactly one line per field."""
    for seed in range(8):
        info = make_path_info(f"round-{seed}", seed)
        narinfo = NarInfo.from_path_info(info, "nar/tvix-castore/abc?narsize=1", file_size=info.nar_size)
        assert NarInfo.parse(narinfo.render()) == narinfo


# -- gRPC Put, under both service names -----------------------------------------------------------


@pytest_asyncio.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[RunningServer, MemoryPathInfoService]]:
    backing = MemoryPathInfoService()
    running = await start_server(
        str(tmp_path / "s.sock"), MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX), pathinfos=backing
    )
    yield running, backing
    await running.stop(0)


@pytest.mark.parametrize("protocol", ["tvix", "snix"])
@pytest.mark.parametrize("name", [INJECTED, "k-1\rx", "k 1"])
async def test_grpc_put_refuses_the_injection(
    served: tuple[RunningServer, MemoryPathInfoService], protocol: str, name: str
) -> None:
    running, backing = served
    async with grpc.aio.insecure_channel(running.url.removeprefix("grpc+")) as channel:
        put = channel.unary_unary(
            f"/{protocol}.store.v1.PathInfoService/Put",
            request_serializer=pb.PathInfo.SerializeToString,
            response_deserializer=pb.PathInfo.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await put(with_signature_name(name))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "invalid signature name" in (raised.value.details() or "")
        assert "\n" not in (raised.value.details() or "")
        assert backing._data == {}
        await put(with_signature_name("cache.example.org-2"))  # a good name is still accepted
        assert len(backing._data) == 1


# -- HTTP: PUT /<hash>.narinfo, and a record that got into a backend anyway ---------------------------


def narinfo_text(info: PathInfo, **override: str) -> str:
    fields = {
        "StorePath": str(info.store_path),
        "URL": "nar/" + "1" * 52 + ".nar",
        "Compression": "none",
        "NarHash": f"sha256:{nixbase32.encode(info.nar_sha256)}",
        "NarSize": str(info.nar_size),
        "References": "",
    }
    fields.update(override)
    return "".join(f"{k}: {v}\n" for k, v in fields.items())


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ({"URL": "nar/x.nar\rStorePath: /nix/store/evil"}, "URL"),
        ({"URL": "nar/x y.nar"}, "URL"),
        ({"System": "x86_64-linux\rURL: http://evil"}, "System"),
        ({"Compression": "none\x0bURL: http://evil"}, "Compression"),
        ({"Sig": "k\r1:" + "A" * 86 + "=="}, "Sig"),
        ({"Sig": "k 1:" + "A" * 86 + "=="}, "Sig"),
    ],
)
async def test_http_put_narinfo_refuses_bad_fields(override: dict[str, str], words: str) -> None:
    backing = MemoryPathInfoService()
    index = NarIndex(None)
    bridge = NarBridge(MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX), backing, index, allow_writes=True)
    info = make_path_info("put", 2)
    try:
        async with TestClient(TestServer(bridge.application())) as client:
            r = await client.put(f"/{info.store_path.hash_part}.narinfo", data=narinfo_text(info, **override))
            body = await r.text()
            assert r.status == 400, body
            assert body.startswith("invalid narinfo: ") and words in body and body.count("\n") == 1, body
        assert backing._data == {}
    finally:
        await index.close()


async def test_bridge_never_serves_an_injected_record() -> None:
    """A record with a bad signature name written straight into a backend (another writer, an old
    version) is refused when read: no narinfo with its lines is ever served, even signed."""
    backing = MemoryPathInfoService()
    info = make_path_info("victim", 2)
    backing._data[info.digest] = with_signature_name(INJECTED).SerializeToString()
    index = NarIndex(None)
    key = SigningKey.generate("bridge.test-1")
    bridge = NarBridge(MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX), backing, index, sign_key=key)
    try:
        async with TestClient(TestServer(bridge.application())) as client:
            r = await client.get(f"/{info.store_path.hash_part}.narinfo")
            body = await r.text()
        assert r.status >= 400
        assert not any(line.startswith("URL: http://evil") for line in body.splitlines()), body
    finally:
        await index.close()


# -- a nix+http upstream ------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def upstream() -> AsyncIterator[tuple[dict[str, bytes], str]]:
    files: dict[str, bytes] = {}

    async def handle(request: web.Request) -> web.Response:
        body = files.get(request.path.lstrip("/"))
        return web.Response(status=404) if body is None else web.Response(body=body)

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield files, f"http://127.0.0.1:{runner.addresses[0][1]}/"
    await runner.cleanup()


@pytest.mark.parametrize(
    "override",
    [
        {"System": "x86_64-linux\rURL: http://evil"},
        {"URL": "nar/x.nar\rURL: http://evil"},
        {"URL": "nar/a b.nar"},
        {"Sig": "k\r1:" + "A" * 86 + "=="},
    ],
)
async def test_upstream_narinfo_with_bad_fields_is_refused(
    upstream: tuple[dict[str, bytes], str], override: dict[str, str]
) -> None:
    files, url = upstream
    info = make_path_info("upstream", 2)
    files[f"{info.store_path.hash_part}.narinfo"] = narinfo_text(info, **override).encode()
    svc = NixHttpPathInfoService(url, MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX))
    try:
        with pytest.raises(PathInfoError, match="invalid narinfo"):
            await svc.get(info.digest)
    finally:
        await svc.close()


# -- nixcas copy ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("signature", [INJECTED.replace("\n", "\r") + ":" + "A" * 86 + "==", "k 1:" + "A" * 86 + "=="])
def test_copy_refuses_a_bad_signature(tmp_path: Path, signature: str) -> None:
    content = tmp_path / "nix" / "store"
    digest = hashlib.sha256(b"copy").digest()[:20]
    path = StorePath(digest, "copied")
    (content / path.basename).parent.mkdir(parents=True)
    (content / path.basename).write_text("x")
    export = [
        {
            "path": str(path),
            "narHash": "sha256-" + "A" * 43 + "=",
            "narSize": 1,
            "references": [],
            "signatures": [signature],
        }
    ]
    source = tmp_path / "paths.json"
    source.write_text(json.dumps(export))
    store = tmp_path / "store"
    cmd = nixcas_command("--store-dir", str(store), "copy", str(source), "--nix-store-dir", str(content))
    result = subprocess.run(cmd, capture_output=True, env=clean_env(), timeout=60, check=False)
    assert result.returncode == 2, result
    assert b"invalid signature" in result.stderr and result.stderr.count(b"\n") == 1
    assert not (store / "pathinfo.sqlite").exists() or b"copied" not in (store / "pathinfo.sqlite").read_bytes()

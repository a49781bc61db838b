"""Composition files and URL references: building, sharing, cycles, errors, entrypoints, Store.open.

Expected digests are computed with the ``blake3`` package; expected paths and
values come from the test's own inputs, never from the code under test.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import blake3
import pytest

from nixcas._aio import Closing
from nixcas.api import Store
from nixcas.castore.blob.base import BlobService
from nixcas.castore.blob.combined import CombinedBlobService, CombinedBlobServiceConfig
from nixcas.castore.blob.grpc import GrpcBlobService
from nixcas.castore.blob.local import LocalBlobService
from nixcas.castore.blob.memory import MemoryBlobService, MemoryBlobServiceConfig
from nixcas.castore.digest import B3Digest
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.dirs.cache import CacheDirectoryService, CacheDirectoryServiceConfig
from nixcas.castore.dirs.grpc import GrpcDirectoryService
from nixcas.castore.dirs.lru import LruDirectoryService, LruDirectoryServiceConfig
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.dirs.sqlite import SqliteDirectoryService
from nixcas.composition import Composition, blob_service_from_url, directory_service_from_url
from nixcas.config import Resolver, ServiceConfig
from nixcas.errors import ConfigurationError, NixcasError
from nixcas.registry import parse_service_url
from nixcas.testing.fixtures import DIRECTORY_B, DIRECTORY_WITH_KEEP

# -- helpers ---------------------------------------------------------------------------


def b3(data: bytes) -> B3Digest:
    return B3Digest(blake3.blake3(data).digest())


def q(text: str) -> str:
    """A TOML basic string (JSON string syntax is valid TOML for these values)."""
    return json.dumps(text)


def write(tmp_path: Path, text: str | bytes, name: str = "composition.toml") -> Path:
    path = tmp_path / name
    if isinstance(text, str):
        path.write_text(text)
    else:
        path.write_bytes(text)
    return path


async def build_everything(comp: Composition) -> None:
    """Build every entry of ``comp`` (some errors only appear when an entry is built)."""
    for kind, table in comp._configs.items():
        for name in table:
            await comp.get(kind, name)


async def load_and_build(path: Path) -> None:
    comp = Composition.from_toml(path)
    try:
        await build_everything(comp)
    finally:
        await comp.close()


async def config_error(path: Path) -> str:
    """The message of the ConfigurationError raised while loading or building ``path``."""
    with pytest.raises(ConfigurationError) as info:
        await load_and_build(path)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# -- every backend type from a file ---------------------------------------------------


async def test_each_backend_type(tmp_path: Path) -> None:
    objects = tmp_path / "objects"
    db = tmp_path / "dirs" / "d.sqlite"
    path = write(
        tmp_path,
        f"""
[blobservices.mem]
type = "memory"

[blobservices.obj]
type = "objectstore"
object_store_url = {q("file://" + str(objects))}
object_store_options = {{ zstd_level = "3" }}

[blobservices.remote]
type = "grpc"
url = "grpc+http://127.0.0.1:1"

[blobservices.both]
type = "combined"
near = "mem"
far = "obj"

[directoryservices.mem]
type = "memory"

[directoryservices.sqlmem]
type = "sqlite"

[directoryservices.sqlfile]
type = "sqlite"
path = {q(str(db))}

[directoryservices.lru]
type = "lru"
capacity = 7

[directoryservices.remote]
type = "grpc"
url = "grpc+http://127.0.0.1:2"

[directoryservices.cached]
type = "cache"
near = "lru"
far = "sqlfile"
""",
    )
    comp = Composition.from_toml(path)
    try:
        mem = await comp.blob_service("mem")
        assert type(mem) is MemoryBlobService
        obj = await comp.blob_service("obj")
        assert type(obj) is LocalBlobService
        assert obj.root == objects
        assert obj.zstd_level == 3
        remote = await comp.blob_service("remote")
        assert type(remote) is GrpcBlobService
        assert remote.url == "grpc+http://127.0.0.1:1"
        both = await comp.blob_service("both")
        assert type(both) is CombinedBlobService
        assert both.near is mem
        assert both.far is obj

        assert type(await comp.directory_service("mem")) is MemoryDirectoryService
        sqlmem = await comp.directory_service("sqlmem")
        assert type(sqlmem) is SqliteDirectoryService
        assert sqlmem.path is None
        sqlfile = await comp.directory_service("sqlfile")
        assert type(sqlfile) is SqliteDirectoryService
        assert sqlfile.path == str(db)
        lru = await comp.directory_service("lru")
        assert type(lru) is LruDirectoryService
        assert lru.capacity == 7
        rdirs = await comp.directory_service("remote")
        assert type(rdirs) is GrpcDirectoryService
        assert rdirs.url == "grpc+http://127.0.0.1:2"
        cached = await comp.directory_service("cached")
        assert type(cached) is CacheDirectoryService
        assert cached.near is lru
        assert cached.far is sqlfile

        # the wired services work: writes go near
        digest = await both.put(b"composed")
        assert digest == b3(b"composed")
        assert await mem.read(digest) == b"composed"
        assert not await obj.has(digest)
        assert await cached.put(DIRECTORY_WITH_KEEP) == b3(DIRECTORY_WITH_KEEP.encode())
        assert len(lru) == 1
        assert await sqlfile.get(b3(DIRECTORY_WITH_KEEP.encode())) is None
    finally:
        await comp.close()
    assert db.is_file()
    assert (objects / "tmp").is_dir()


async def test_from_dict_same_as_toml() -> None:
    comp = Composition.from_dict(
        {"directoryservices": {"root": {"type": "lru", "capacity": 3}}, "blobservices": {}}, source="inline"
    )
    try:
        svc = await comp.directory_service("root")
        assert isinstance(svc, LruDirectoryService)
        assert svc.capacity == 3
        assert comp.entrypoint("blobservices") is None
    finally:
        await comp.close()


async def test_objectstore_default_options(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
[blobservices.root]
type = "objectstore"
object_store_url = {q("file://" + str(tmp_path / "o"))}
""",
    )
    comp = Composition.from_toml(path)
    try:
        svc = await comp.blob_service("root")
        assert isinstance(svc, LocalBlobService)
        assert svc.root == tmp_path / "o"
        digest = await svc.put(b"x" * 100)
        assert await svc.read(digest) == b"x" * 100
    finally:
        await comp.close()


# -- shared instances ---------------------------------------------------------------


SHARED = """
[blobservices.shared]
type = "memory"

[blobservices.one]
type = "combined"
near = "shared"
far = "far1"

[blobservices.two]
type = "combined"
near = "far2"
far = "shared"

[blobservices.far1]
type = "memory"

[blobservices.far2]
type = "memory"

[directoryservices.shared]
type = "lru"
capacity = 10

[directoryservices.one]
type = "cache"
near = "shared"
far = "memory://"

[directoryservices.two]
type = "cache"
near = "shared"
far = "memory://"
"""


async def test_shared_instances(tmp_path: Path) -> None:
    comp = Composition.from_toml(write(tmp_path, SHARED))
    try:
        one = await comp.blob_service("one")
        two = await comp.blob_service("two")
        assert isinstance(one, CombinedBlobService)
        assert isinstance(two, CombinedBlobService)
        assert one.near is two.far
        assert one.near is await comp.blob_service("shared")
        assert one.far is not two.near
        assert await comp.blob_service("one") is one
        assert await comp.get("blobservices", "one") is one

        d1 = await comp.directory_service("one")
        d2 = await comp.directory_service("two")
        assert isinstance(d1, CacheDirectoryService)
        assert isinstance(d2, CacheDirectoryService)
        assert d1.near is d2.near is await comp.directory_service("shared")
        # the same URL reference is one instance too
        assert d1.far is d2.far is await comp.directory_service("memory://")
        # same name in the other kind is another instance
        assert await comp.get("blobservices", "shared") is not await comp.get("directoryservices", "shared")

        # sharing is visible through the services: a blob written via `one` is near for `two`'s far
        digest = await one.put(b"shared bytes")
        assert await two.read(digest) == b"shared bytes"
    finally:
        await comp.close()


def counting_memory_build(monkeypatch: pytest.MonkeyPatch, fail_first: bool = False) -> list[object]:
    """Replace the memory blob config's build by one that suspends and records every build."""
    builds: list[object] = []

    async def build(self: MemoryBlobServiceConfig, resolver: Resolver) -> BlobService:
        builds.append(self)
        for _ in range(3):
            await asyncio.sleep(0)  # let the other callers run while this build is under way
        if fail_first and len(builds) == 1:
            raise ConfigurationError("first build fails")
        return MemoryBlobService()

    monkeypatch.setattr(MemoryBlobServiceConfig, "build", build)
    return builds


async def test_concurrent_gets_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builds = counting_memory_build(monkeypatch)
    comp = Composition.from_toml(write(tmp_path, SHARED))
    try:
        got = await asyncio.gather(*(comp.blob_service("shared") for _ in range(5)))
        assert len(builds) == 1
        assert all(g is got[0] for g in got)
        # combinators asked concurrently share their children too
        one, two, shared = await asyncio.gather(
            comp.blob_service("one"), comp.blob_service("two"), comp.blob_service("shared")
        )
        assert isinstance(one, CombinedBlobService)
        assert isinstance(two, CombinedBlobService)
        assert one.near is two.far is shared is got[0]
        assert len(builds) == 3  # shared, far1, far2
    finally:
        await comp.close()


async def test_concurrent_gets_of_a_wrapper_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builds = counting_memory_build(monkeypatch)
    comp = Composition.from_toml(write(tmp_path, SHARED))
    try:
        got = await asyncio.gather(*(comp.blob_service("one") for _ in range(4)))
        assert all(g is got[0] for g in got)
        assert len(builds) == 2  # shared, far1
    finally:
        await comp.close()


async def test_concurrent_gets_share_a_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builds = counting_memory_build(monkeypatch, fail_first=True)
    comp = Composition.from_toml(write(tmp_path, SHARED))
    try:
        results = await asyncio.gather(*(comp.blob_service("shared") for _ in range(3)), return_exceptions=True)
        assert len(builds) == 1
        assert all(isinstance(r, ConfigurationError) for r in results)
        # a failed build is not remembered: the next get tries again
        again = await comp.blob_service("shared")
        assert isinstance(again, MemoryBlobService)
        assert len(builds) == 2
    finally:
        await comp.close()


# -- recursion --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "name", "chain"),
    [
        pytest.param(
            """
[blobservices.a]
type = "combined"
near = "b"
far = "memory://"

[blobservices.b]
type = "combined"
near = "memory://"
far = "a"
""",
            "blobservices",
            "a",
            "blobservices.a -> blobservices.b -> blobservices.a",
            id="a-b-a",
        ),
        pytest.param(
            """
[blobservices.a]
type = "combined"
near = "memory://"
far = "a"
""",
            "blobservices",
            "a",
            "blobservices.a -> blobservices.a",
            id="self",
        ),
        pytest.param(
            """
[directoryservices.root]
type = "cache"
near = "mid"
far = "memory://"

[directoryservices.mid]
type = "cache"
near = "memory://"
far = "leaf"

[directoryservices.leaf]
type = "cache"
near = "memory://"
far = "root"
""",
            "directoryservices",
            "root",
            "directoryservices.root -> directoryservices.mid -> directoryservices.leaf -> directoryservices.root",
            id="three",
        ),
        pytest.param(
            """
[directoryservices.root]
type = "cache"
near = "root"
far = "root"
""",
            "directoryservices",
            "root",
            "directoryservices.root -> directoryservices.root",
            id="self-dirs",
        ),
    ],
)
async def test_recursion(tmp_path: Path, text: str, kind: str, name: str, chain: str) -> None:
    path = write(tmp_path, text)

    async def load_and_get() -> None:
        comp = Composition.from_toml(path)
        try:
            await comp.get(kind, name)
        finally:
            await comp.close()

    with pytest.raises(ConfigurationError, match="recursion") as info:
        await load_and_get()
    assert chain in str(info.value)
    assert "\n" not in str(info.value)


async def test_recursion_at_build_time() -> None:
    """A composition assembled in code (no file checks) still refuses cycles when built."""
    configs: dict[str, dict[str, ServiceConfig[object]]] = {
        "blobservices": {
            "a": CombinedBlobServiceConfig("memory://", "b"),
            "b": CombinedBlobServiceConfig("a", "memory://"),
        },
        "directoryservices": {"x": CacheDirectoryServiceConfig("x", "memory://")},
    }
    comp = Composition(configs)
    try:
        with pytest.raises(ConfigurationError) as info:
            await comp.blob_service("a")
        assert "blobservices.a -> blobservices.b -> blobservices.a" in str(info.value)
        with pytest.raises(ConfigurationError) as info:
            await comp.blob_service("b")
        assert "blobservices.b -> blobservices.a -> blobservices.b" in str(info.value)
        with pytest.raises(ConfigurationError) as info:
            await comp.directory_service("x")
        assert "directoryservices.x -> directoryservices.x" in str(info.value)
    finally:
        await comp.close()


async def test_recursion_concurrent_does_not_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two callers entering a cycle from both ends must both fail, not wait on each other forever."""
    counting_memory_build(monkeypatch)  # memory builds suspend, so both builds are under way at once
    configs: dict[str, dict[str, ServiceConfig[object]]] = {
        "blobservices": {
            "m1": MemoryBlobServiceConfig(),
            "m2": MemoryBlobServiceConfig(),
            "a": CombinedBlobServiceConfig("m1", "b"),
            "b": CombinedBlobServiceConfig("m2", "a"),
        }
    }
    comp = Composition(configs)
    try:
        results = await asyncio.wait_for(
            asyncio.gather(comp.blob_service("a"), comp.blob_service("b"), return_exceptions=True), 5
        )
        assert all(isinstance(r, ConfigurationError) for r in results), results
        assert any("recursion" in str(r) for r in results)
    finally:
        await comp.close()


async def test_no_false_recursion_for_diamonds(tmp_path: Path) -> None:
    """Two paths to the same child (a diamond) are sharing, not a cycle."""
    path = write(
        tmp_path,
        """
[blobservices.root]
type = "combined"
near = "left"
far = "right"

[blobservices.left]
type = "combined"
near = "base"
far = "memory://"

[blobservices.right]
type = "combined"
near = "base"
far = "memory://"

[blobservices.base]
type = "memory"
""",
    )
    comp = Composition.from_toml(path)
    try:
        root = await comp.blob_service("root")
        assert isinstance(root, CombinedBlobService)
        assert isinstance(root.near, CombinedBlobService)
        assert isinstance(root.far, CombinedBlobService)
        assert root.near.near is root.far.near
    finally:
        await comp.close()


# -- configuration errors: one line, naming the file and the entry ----------------------


def objectstore(url: str, options: str = "") -> str:
    extra = f"\nobject_store_options = {options}" if options else ""
    return f'[blobservices.root]\ntype = "objectstore"\nobject_store_url = {q(url)}{extra}\n'


BAD_FILES = [
    # syntax and shape
    pytest.param('[blobservices.root\ntype = "memory"\n', ["invalid TOML"], id="invalid-toml"),
    pytest.param('[blobservices.root]\ntype = "memory"\ntype = "memory"\n', ["invalid TOML"], id="duplicate-key"),
    pytest.param(b'[blobservices.root]\ntype = "\xff"\n', [], id="not-utf8"),
    pytest.param('[blobservice.root]\ntype = "memory"\n', ["blobservice"], id="unknown-table"),
    pytest.param('[nodes.root]\ntype = "memory"\n', ["nodes"], id="unknown-table-2"),
    pytest.param("blobservices = 3\n", ["blobservices"], id="kind-not-a-table"),
    pytest.param('[[blobservices]]\ntype = "memory"\n', ["blobservices"], id="kind-array-of-tables"),
    pytest.param('[blobservices]\nroot = "memory://"\n', ["blobservices.root"], id="entry-not-a-table"),
    pytest.param("[blobservices]\nroot = 3\n", ["blobservices.root"], id="entry-integer"),
    pytest.param('[blobservices."memory://"]\ntype = "memory"\n', ["memory://"], id="name-looks-like-url"),
    # type
    pytest.param('[blobservices.root]\nnear = "x"\n', ["blobservices.root", "type"], id="missing-type"),
    pytest.param("[blobservices.root]\n", ["blobservices.root", "type"], id="empty-entry"),
    pytest.param("[blobservices.root]\ntype = 3\n", ["blobservices.root", "type"], id="type-not-a-string"),
    pytest.param('[blobservices.root]\ntype = "s3"\n', ["blobservices.root", "s3"], id="unknown-type"),
    pytest.param('[blobservices.root]\ntype = "sqlite"\n', ["blobservices.root", "sqlite"], id="dir-type-as-blob"),
    pytest.param('[blobservices.root]\ntype = "lru"\ncapacity = 3\n', ["blobservices.root", "lru"], id="lru-as-blob"),
    pytest.param(
        '[directoryservices.root]\ntype = "combined"\nnear = "a"\nfar = "b"\n',
        ["directoryservices.root", "combined"],
        id="combined-as-dirs",
    ),
    pytest.param(
        '[directoryservices.root]\ntype = "objectstore"\nobject_store_url = "file:///x"\n'
        'object_store_options = { max_closure_bytes = "1" }\n',
        ["directoryservices.root", "max_closure_bytes"],
        id="objectstore-dirs-bad-option",
    ),
    # fields
    pytest.param(
        '[blobservices.root]\ntype = "memory"\npath = "/x"\n', ["blobservices.root", "path"], id="unknown-field"
    ),
    pytest.param(
        '[directoryservices.root]\ntype = "lru"\ncapacity = 3\nsize = 4\n',
        ["directoryservices.root", "size"],
        id="unknown-field-lru",
    ),
    pytest.param(
        '[blobservices.root]\ntype = "combined"\nnear = "memory://"\nlocal = "memory://"\nfar = "memory://"\n',
        ["blobservices.root", "near"],
        id="alias-given-twice",
    ),
    pytest.param(
        '[directoryservices.root]\ntype = "cache"\nlocal = "memory://"\nfar = "memory://"\n',
        ["directoryservices.root", "local"],
        id="cache-has-no-alias",
    ),
    pytest.param(
        '[directoryservices.root]\ntype = "sqlite"\npath = 3\n', ["directoryservices.root", "path"], id="str-got-int"
    ),
    pytest.param(
        '[directoryservices.root]\ntype = "lru"\ncapacity = "3"\n',
        ["directoryservices.root", "capacity"],
        id="int-got-str",
    ),
    pytest.param(
        '[directoryservices.root]\ntype = "lru"\ncapacity = true\n',
        ["directoryservices.root", "capacity"],
        id="int-got-bool",
    ),
    pytest.param(
        '[directoryservices.root]\ntype = "lru"\ncapacity = 3.0\n',
        ["directoryservices.root", "capacity"],
        id="int-got-float",
    ),
    pytest.param(
        '[directoryservices.root]\ntype = "lru"\ncapacity = [3]\n',
        ["directoryservices.root", "capacity"],
        id="int-got-array",
    ),
    pytest.param(
        '[blobservices.root]\ntype = "combined"\nnear = 1\nfar = "memory://"\n',
        ["blobservices.root", "near"],
        id="reference-not-a-string",
    ),
    pytest.param(
        objectstore("file:///tmp/x", "{ zstd_level = 3 }"),
        ["blobservices.root", "object_store_options"],
        id="options-not-strings",
    ),
    pytest.param(
        objectstore("file:///tmp/x", '"zstd_level=3"'),
        ["blobservices.root", "object_store_options"],
        id="options-not-a-table",
    ),
    pytest.param(
        '[blobservices.root]\ntype = "objectstore"\nobject_store_url = 5\n',
        ["blobservices.root", "object_store_url"],
        id="url-not-a-string",
    ),
    # missing required fields
    pytest.param(
        '[directoryservices.root]\ntype = "lru"\n', ["directoryservices.root", "capacity"], id="missing-capacity"
    ),
    pytest.param(
        '[blobservices.root]\ntype = "combined"\nnear = "memory://"\n', ["blobservices.root", "far"], id="missing-far"
    ),
    pytest.param(
        '[directoryservices.root]\ntype = "cache"\nfar = "memory://"\n',
        ["directoryservices.root", "near"],
        id="missing-near",
    ),
    pytest.param('[blobservices.root]\ntype = "grpc"\n', ["blobservices.root", "url"], id="missing-url"),
    pytest.param(
        '[blobservices.root]\ntype = "objectstore"\n', ["blobservices.root", "object_store_url"], id="missing-osurl"
    ),
    # bad values
    pytest.param(
        '[directoryservices.root]\ntype = "lru"\ncapacity = 0\n',
        ["directoryservices.root", "capacity"],
        id="capacity-0",
    ),
    pytest.param(
        '[directoryservices.root]\ntype = "lru"\ncapacity = -5\n',
        ["directoryservices.root", "capacity"],
        id="capacity-negative",
    ),
    pytest.param(objectstore("file:relative/x"), ["blobservices.root", "absolute"], id="objectstore-relative"),
    pytest.param(objectstore("file://host/x"), ["blobservices.root", "host"], id="objectstore-host"),
    pytest.param(objectstore("file:///"), ["blobservices.root"], id="objectstore-root-dir"),
    pytest.param(objectstore("s3:///x"), ["blobservices.root", "bucket"], id="objectstore-s3-no-bucket"),
    pytest.param(objectstore("/abs/x"), ["blobservices.root"], id="objectstore-no-scheme"),
    pytest.param(objectstore("file:///tmp/x?zstd_level=3"), ["blobservices.root"], id="objectstore-query"),
    pytest.param(
        objectstore("file:///tmp/x", '{ bogus = "1" }'), ["blobservices.root", "bogus"], id="objectstore-unknown-option"
    ),
    pytest.param(
        objectstore("file:///tmp/x", '{ zstd_level = "abc" }'),
        ["blobservices.root", "zstd_level"],
        id="zstd-level-not-int",
    ),
    pytest.param(
        objectstore("file:///tmp/x", '{ zstd_level = "99" }'),
        ["blobservices.root", "zstd_level"],
        id="zstd-level-range",
    ),
    pytest.param(
        '[directoryservices.root]\ntype = "sqlite"\npath = "rel.sqlite"\n',
        ["directoryservices.root", "absolute"],
        id="sqlite-relative",
    ),
    pytest.param(
        '[directoryservices.root]\ntype = "sqlite"\npath = "/tmp/dir/"\n',
        ["directoryservices.root"],
        id="sqlite-dir",
    ),
    pytest.param(
        '[blobservices.root]\ntype = "grpc"\nurl = "http://host:1"\n', ["blobservices.root", "http"], id="grpc-url"
    ),
    pytest.param(
        '[directoryservices.root]\ntype = "grpc"\nurl = "grpc+unix://host/sock"\n',
        ["directoryservices.root"],
        id="grpc-unix-host",
    ),
    # references
    pytest.param(
        '[blobservices.root]\ntype = "combined"\nnear = "nope"\nfar = "memory://"\n',
        ["blobservices.root", "nope"],
        id="undefined-near",
    ),
    pytest.param(
        '[blobservices.m]\ntype = "memory"\n[blobservices.root]\ntype = "combined"\nlocal = "m"\nremote = "nope"\n',
        ["blobservices.root", "nope"],
        id="undefined-remote",
    ),
    pytest.param(
        '[directoryservices.root]\ntype = "cache"\nnear = "memory://"\nfar = "upstream"\n',
        ["directoryservices.root", "upstream"],
        id="undefined-far",
    ),
    pytest.param(
        '[directoryservices.x]\ntype = "memory"\n'
        '[blobservices.root]\ntype = "combined"\nnear = "x"\nfar = "memory://"\n',
        ["blobservices.root", "'x'"],
        id="defined-in-the-other-kind",
    ),
    pytest.param(
        '[blobservices.root]\ntype = "combined"\nnear = "bogus://"\nfar = "memory://"\n',
        ["blobservices.root", "bogus"],
        id="bad-url-reference",
    ),
    pytest.param(
        '[blobservices.root]\ntype = "combined"\nnear = "memory://"\nfar = "sqlite://"\n',
        ["blobservices.root", "sqlite"],
        id="dir-url-as-blob-reference",
    ),
    pytest.param(
        '[directoryservices.root]\ntype = "cache"\nnear = "lru://?capacity=0"\nfar = "memory://"\n',
        ["directoryservices.root", "capacity"],
        id="bad-lru-url-reference",
    ),
    pytest.param(
        '[blobservices.root]\ntype = "combined"\nnear = "memory://"\nfar = ""\n',
        ["blobservices.root", "far"],
        id="empty-reference",
    ),
]


@pytest.mark.parametrize(("text", "fragments"), BAD_FILES)
async def test_bad_file(tmp_path: Path, text: str | bytes, fragments: list[str]) -> None:
    path = write(tmp_path, text)
    message = await config_error(path)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


async def test_bad_entry_opens_nothing(tmp_path: Path) -> None:
    """A bad entry is found when the file is read, before any service is opened."""
    db = tmp_path / "d.sqlite"
    path = write(
        tmp_path,
        f"""
[directoryservices.root]
type = "cache"
near = "db"
far = "nope"

[directoryservices.db]
type = "sqlite"
path = {q(str(db))}
""",
    )
    with pytest.raises(ConfigurationError, match="nope"):
        Composition.from_toml(path)
    assert not db.exists()


@pytest.mark.parametrize("which", ["missing", "directory"])
async def test_unreadable_file(tmp_path: Path, which: str) -> None:
    path = tmp_path / "nothere.toml"
    if which == "directory":
        path.mkdir()
    with pytest.raises(ConfigurationError) as info:
        Composition.from_toml(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    with pytest.raises(ConfigurationError):
        await Store.open(tmp_path / "store", composition=path)


async def test_unknown_kind_in_code() -> None:
    with pytest.raises(ConfigurationError, match="nodes"):
        Composition({"nodes": {}})


async def test_undefined_name_at_get() -> None:
    comp = Composition.from_dict({"blobservices": {"root": {"type": "memory"}}})
    try:
        with pytest.raises(ConfigurationError) as info:
            await comp.blob_service("other")
        assert "'other'" in str(info.value)
        assert "root" in str(info.value)  # what is defined
        with pytest.raises(ConfigurationError):
            await comp.directory_service("root")  # defined only as a blob service
        with pytest.raises(ConfigurationError):
            await comp.blob_service("nonsense://")
    finally:
        await comp.close()


# -- entrypoints, URL references, aliases ------------------------------------------------


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["root"], "root"),
        (["default"], "default"),
        (["default", "root"], "root"),
        (["root", "default"], "root"),
        (["other"], None),
        ([], None),
    ],
)
def test_entrypoint(names: list[str], expected: str | None) -> None:
    comp = Composition.from_dict(
        {"blobservices": {n: {"type": "memory"} for n in names}, "directoryservices": {"x": {"type": "memory"}}}
    )
    assert comp.entrypoint("blobservices") == expected
    assert comp.entrypoint("directoryservices") is None


async def test_url_references(tmp_path: Path) -> None:
    objects = tmp_path / "o"
    far_url = f"objectstore+file://{objects}?zstd_level=5"
    path = write(
        tmp_path,
        f"""
[blobservices.root]
type = "combined"
near = "memory://"
far = {q(far_url)}

[directoryservices.root]
type = "cache"
near = "lru://?capacity=2"
far = "sqlite://"

[directoryservices.nested]
type = "cache"
near = {q("cache://?near=memory%3A%2F%2F&far=memory%3A%2F%2F")}
far = "memory://"
""",
    )
    comp = Composition.from_toml(path)
    try:
        root = await comp.blob_service("root")
        assert isinstance(root, CombinedBlobService)
        assert isinstance(root.near, MemoryBlobService)
        assert isinstance(root.far, LocalBlobService)
        assert root.far.root == objects
        assert root.far.zstd_level == 5
        assert root.near is await comp.blob_service("memory://")
        assert root.far is await comp.blob_service(far_url)

        dirs = await comp.directory_service("root")
        assert isinstance(dirs, CacheDirectoryService)
        assert isinstance(dirs.near, LruDirectoryService)
        assert dirs.near.capacity == 2
        assert isinstance(dirs.far, SqliteDirectoryService)
        assert dirs.far.path is None

        nested = await comp.directory_service("nested")
        assert isinstance(nested, CacheDirectoryService)
        assert isinstance(nested.near, CacheDirectoryService)
        assert isinstance(nested.near.near, MemoryDirectoryService)
    finally:
        await comp.close()


async def test_url_reference_may_name_entries(tmp_path: Path) -> None:
    """Inside a composition, a combinator URL's near/far may be entry names."""
    path = write(
        tmp_path,
        """
[blobservices.fast]
type = "memory"

[blobservices.slow]
type = "memory"

[blobservices.root]
type = "combined"
near = "combined://?near=fast&far=slow"
far = "memory://"
""",
    )
    comp = Composition.from_toml(path)
    try:
        root = await comp.blob_service("root")
        assert isinstance(root, CombinedBlobService)
        assert isinstance(root.near, CombinedBlobService)
        assert root.near.near is await comp.blob_service("fast")
        assert root.near.far is await comp.blob_service("slow")
        # the same string given at run time is the same instance
        assert await comp.blob_service("combined://?near=fast&far=slow") is root.near
    finally:
        await comp.close()


async def test_tvix_aliases(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[blobservices.default]
type = "combined"
local = "l"
remote = "r"

[blobservices.l]
type = "memory"

[blobservices.r]
type = "memory"
""",
    )
    comp = Composition.from_toml(path)
    try:
        assert comp.entrypoint("blobservices") == "default"
        svc = await comp.blob_service("default")
        assert isinstance(svc, CombinedBlobService)
        assert svc.near is await comp.blob_service("l")
        assert svc.far is await comp.blob_service("r")
    finally:
        await comp.close()


# -- Store.open ----------------------------------------------------------------------------

STORE_COMPOSITION = """
[blobservices.root]
type = "combined"
near = "near"
far = "far"

[blobservices.near]
type = "memory"

[blobservices.far]
type = "memory"

[blobservices.other]
type = "memory"

[directoryservices.root]
type = "cache"
near = "lru"
far = "db"

[directoryservices.lru]
type = "lru"
capacity = 100

[directoryservices.db]
type = "sqlite"
path = {db}

[directoryservices.other]
type = "memory"
"""


def store_composition(tmp_path: Path) -> Path:
    return write(tmp_path, STORE_COMPOSITION.format(db=q(str(tmp_path / "dirs.sqlite"))))


async def test_store_open_uses_root_entries(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(b"file content\n")
    store = await Store.open(tmp_path / "store", composition=store_composition(tmp_path))
    try:
        assert store.blobs is await store.composition.blob_service("root")
        assert store.directories is await store.composition.directory_service("root")
        assert isinstance(store.blobs, CombinedBlobService)
        assert isinstance(store.directories, CacheDirectoryService)
        root = await store.ingest(tree)
        near = await store.composition.blob_service("near")
        far = await store.composition.blob_service("far")
        assert await near.read(b3(b"file content\n")) == b"file content\n"
        assert not await far.has(b3(b"file content\n"))
        assert [p async for p, _ in store.walk(root)] == [b"", b"f"]
    finally:
        await store.close()
    assert not (tmp_path / "store").exists()  # the embedded store was not used


async def test_store_open_composition_object(tmp_path: Path) -> None:
    comp = Composition.from_toml(store_composition(tmp_path))
    async with await Store.open(composition=comp) as store:
        assert store.composition is comp
        assert store.blobs is await comp.blob_service("root")


async def test_store_open_explicit_overrides(tmp_path: Path) -> None:
    path = store_composition(tmp_path)
    store = await Store.open(
        tmp_path / "store", composition=path, blob_service_url="memory://", directory_service_url="other"
    )
    try:
        assert type(store.blobs) is MemoryBlobService
        assert store.blobs is not await store.composition.blob_service("root")
        assert store.blobs is await store.composition.blob_service("memory://")
        assert store.directories is await store.composition.directory_service("other")
    finally:
        await store.close()

    store = await Store.open(tmp_path / "store", composition=path, blob_service_url="other")
    try:
        assert store.blobs is await store.composition.blob_service("other")
        assert isinstance(store.directories, CacheDirectoryService)  # still root
    finally:
        await store.close()

    # a combinator URL given explicitly may name the composition's entries
    store = await Store.open(composition=path, blob_service_url="combined://?near=other&far=far")
    try:
        assert isinstance(store.blobs, CombinedBlobService)
        assert store.blobs.near is await store.composition.blob_service("other")
        assert store.blobs.far is await store.composition.blob_service("far")
    finally:
        await store.close()


async def test_store_open_falls_back_to_embedded(tmp_path: Path) -> None:
    path = write(tmp_path, '[blobservices.root]\ntype = "memory"\n')
    store = await Store.open(tmp_path / "store", composition=path)
    try:
        assert type(store.blobs) is MemoryBlobService
        assert isinstance(store.directories, SqliteDirectoryService)
        assert store.directories.path == str(tmp_path / "store" / "directories.sqlite")
    finally:
        await store.close()


async def test_store_open_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="nope"):
        await Store.open(tmp_path / "store", composition=store_composition(tmp_path), directory_service_url="nope")


def spy_on_close(monkeypatch: pytest.MonkeyPatch, *classes: type[Closing]) -> list[object]:
    """Record every instance of ``classes`` that is closed, in order (the real close still runs)."""
    closed: list[object] = []
    for cls in classes:
        original: Callable[[Any], Awaitable[None]] = cls.close

        def make(original: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
            async def close(self: Any) -> None:
                closed.append(self)
                await original(self)

            return close

        monkeypatch.setattr(cls, "close", make(original))
    return closed


async def test_store_close_closes_every_instance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    closed = spy_on_close(
        monkeypatch,
        MemoryBlobService,
        CombinedBlobService,
        LruDirectoryService,
        SqliteDirectoryService,
        CacheDirectoryService,
    )
    store = await Store.open(tmp_path / "store", composition=store_composition(tmp_path))
    comp = store.composition
    built = [
        await comp.blob_service("root"),
        await comp.blob_service("near"),
        await comp.blob_service("far"),
        await comp.directory_service("root"),
        await comp.directory_service("lru"),
        await comp.directory_service("db"),
    ]
    db = await comp.directory_service("db")
    await db.put(DIRECTORY_WITH_KEEP)
    await store.close()
    assert {id(x) for x in built} <= {id(x) for x in closed}
    with pytest.raises(NixcasError):
        await db.get(b3(DIRECTORY_WITH_KEEP.encode()))


async def test_composition_close_order_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    closed = spy_on_close(monkeypatch, MemoryBlobService, CombinedBlobService)
    comp = Composition.from_toml(store_composition(tmp_path))
    root = await comp.blob_service("root")
    assert isinstance(root, CombinedBlobService)
    await comp.close()
    assert closed[0] is root  # the wrapper first
    assert {id(x) for x in closed} == {id(root), id(root.near), id(root.far)}
    assert len(closed) == 3  # shared instances are closed by the composition only

    # one failing close does not stop the others; the first error is raised afterwards
    closed.clear()
    comp = Composition.from_toml(store_composition(tmp_path))
    near = await comp.blob_service("near")
    far = await comp.blob_service("far")

    async def failing_close() -> None:
        closed.append("boom")
        raise RuntimeError("close failed")

    monkeypatch.setattr(far, "close", failing_close)
    with pytest.raises(RuntimeError, match="close failed"):
        await comp.close()
    assert closed == ["boom", near]


async def test_store_open_failure_closes_what_was_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    closed = spy_on_close(monkeypatch, CombinedBlobService, MemoryBlobService)
    with pytest.raises(ConfigurationError):
        await Store.open(composition=store_composition(tmp_path), directory_service_url="nope")
    assert len([c for c in closed if isinstance(c, CombinedBlobService)]) == 1
    assert len([c for c in closed if type(c) is MemoryBlobService]) == 2


# -- URL forms of the combinators ------------------------------------------------------------


def enc(url: str) -> str:
    return quote(url, safe="")


async def test_combined_url(tmp_path: Path) -> None:
    near_url = f"objectstore+file://{tmp_path}/near"
    svc = await blob_service_from_url(f"combined://?near={enc(near_url)}&far={enc('memory://')}")
    try:
        assert isinstance(svc, CombinedBlobService)
        assert isinstance(svc.near, LocalBlobService)
        assert svc.near.root == tmp_path / "near"
        assert isinstance(svc.far, MemoryBlobService)
        digest = await svc.put(HELLO)
        assert digest == b3(HELLO)
        assert await svc.near.read(digest) == HELLO
    finally:
        await svc.close()


HELLO = b"hello, composition"


async def test_combined_url_private_children() -> None:
    """Two references to ``memory://`` in one URL are two stores (each URL is its own instance)."""
    svc = await blob_service_from_url("combined://?near=memory://&far=memory://")
    try:
        assert isinstance(svc, CombinedBlobService)
        assert isinstance(svc.near, MemoryBlobService)
        assert isinstance(svc.far, MemoryBlobService)
        assert svc.near is not svc.far
        digest = await svc.put(HELLO)
        assert await svc.near.has(digest)
        assert not await svc.far.has(digest)
    finally:
        await svc.close()


async def test_cache_and_lru_urls(tmp_path: Path) -> None:
    db = tmp_path / "far.sqlite"
    url = f"cache://?near={enc('lru://?capacity=3')}&far={enc(f'sqlite://{db}')}"
    svc = await directory_service_from_url(url)
    try:
        assert isinstance(svc, CacheDirectoryService)
        assert isinstance(svc.near, LruDirectoryService)
        assert svc.near.capacity == 3
        assert isinstance(svc.far, SqliteDirectoryService)
        assert svc.far.path == str(db)
        far = svc.far
        assert await svc.put(DIRECTORY_B) == b3(DIRECTORY_B.encode())
    finally:
        await svc.close()
    # a service built from one URL owns its children: closing it closed the far database
    with pytest.raises(NixcasError):
        await far.get(b3(DIRECTORY_B.encode()))

    lru = await directory_service_from_url("lru://?capacity=3")
    assert isinstance(lru, LruDirectoryService)
    assert lru.capacity == 3
    await lru.close()


def test_url_configs() -> None:
    assert parse_service_url("blobservices", "combined://?near=a&far=b") == CombinedBlobServiceConfig("a", "b")
    assert parse_service_url("blobservices", f"combined://?far={enc('memory://')}&near=x") == (
        CombinedBlobServiceConfig("x", "memory://")
    )
    assert parse_service_url("directoryservices", "cache://?near=a&far=b") == CacheDirectoryServiceConfig("a", "b")
    assert parse_service_url("directoryservices", "lru://?capacity=3") == LruDirectoryServiceConfig(3)
    assert parse_service_url("directoryservices", "lru://?capacity=100000") == LruDirectoryServiceConfig(100000)


BAD_BLOB_URLS = [
    "combined://",
    "combined://?near=memory%3A%2F%2F",
    "combined://?far=memory%3A%2F%2F",
    "combined://?near=&far=memory%3A%2F%2F",
    "combined://?near=memory%3A%2F%2F&far=",
    "combined://host?near=memory%3A%2F%2F&far=memory%3A%2F%2F",
    "combined:///path?near=memory%3A%2F%2F&far=memory%3A%2F%2F",
    "combined://?near=memory%3A%2F%2F&far=memory%3A%2F%2F#frag",
    "combined://?near=memory%3A%2F%2F&far=memory%3A%2F%2F&x=1",
    "combined://?near=memory%3A%2F%2F&near=memory%3A%2F%2F&far=memory%3A%2F%2F",
    "combined://?local=memory%3A%2F%2F&remote=memory%3A%2F%2F",
    "combined://?near=bogus%3A%2F%2F&far=memory%3A%2F%2F",
    "combined://?near=memory%3A%2F%2F&far=sqlite%3A%2F%2F",
    "combined://?near=undefined&far=memory%3A%2F%2F",
    "combined+x://?near=memory%3A%2F%2F&far=memory%3A%2F%2F",
    "cache://?near=memory%3A%2F%2F&far=memory%3A%2F%2F",
    "lru://?capacity=3",
    "memory+x://",
]

BAD_DIRECTORY_URLS = [
    "cache://",
    "cache://?near=memory%3A%2F%2F",
    "cache://?far=memory%3A%2F%2F",
    "cache://host?near=memory%3A%2F%2F&far=memory%3A%2F%2F",
    "cache:///p?near=memory%3A%2F%2F&far=memory%3A%2F%2F",
    "cache://?near=memory%3A%2F%2F&far=memory%3A%2F%2F&capacity=3",
    "cache://?near=memory%3A%2F%2F&far=bogus%3A%2F%2F",
    "cache://?near=lru%3A%2F%2F%3Fcapacity%3D0&far=memory%3A%2F%2F",
    "cache://?near=memory%3A%2F%2F&far=undefined",
    "combined://?near=memory%3A%2F%2F&far=memory%3A%2F%2F",
    "lru://",
    "lru://?capacity=",
    "lru://?capacity=abc",
    "lru://?capacity=3.5",
    "lru://?capacity=0",
    "lru://?capacity=-2",
    "lru://?capacity=1&capacity=2",
    "lru://?capacity=3&x=1",
    "lru://?size=3",
    "lru://host?capacity=3",
    "lru:///path?capacity=3",
    "lru://?capacity=3#frag",
    "lru+x://?capacity=3",
    "cache+x://?near=memory%3A%2F%2F&far=memory%3A%2F%2F",
    "memory+x://",
]


@pytest.mark.parametrize("url", BAD_BLOB_URLS)
async def test_bad_blob_urls(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        await blob_service_from_url(url)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("url", BAD_DIRECTORY_URLS)
async def test_bad_directory_urls(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        await directory_service_from_url(url)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("parse", id="nested-bad-url"),
        pytest.param("undefined", id="nested-undefined-name"),
    ],
)
async def test_bad_far_opens_no_near(tmp_path: Path, url: str) -> None:
    """A bad far reference is refused before near is opened (no files are created)."""
    far = "bogus://" if url == "parse" else "upstream"
    db = tmp_path / "near.sqlite"
    with pytest.raises(ConfigurationError):
        await directory_service_from_url(f"cache://?near={enc(f'sqlite://{db}')}&far={enc(far)}")
    objects = tmp_path / "objects"
    with pytest.raises(ConfigurationError):
        await blob_service_from_url(f"combined://?near={enc(f'objectstore+file://{objects}')}&far={enc(far)}")
    if url == "parse":  # a name can only be looked up when the service is built
        assert not db.exists()
        assert not objects.exists()


async def test_failed_far_closes_near(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Built from one URL: if far cannot be opened, near (already open) is closed again."""
    closed = spy_on_close(monkeypatch, SqliteDirectoryService)
    db = tmp_path / "near.sqlite"
    with pytest.raises(ConfigurationError):
        await directory_service_from_url(f"cache://?near={enc(f'sqlite://{db}')}&far=upstream")
    assert len(closed) == 1
    assert isinstance(closed[0], SqliteDirectoryService)
    assert closed[0].path == str(db)


@pytest.mark.parametrize(
    ("kind", "url"),
    [
        ("blobservices", "combined://?near=a&far=b"),
        ("directoryservices", "cache://?near=a&far=b"),
    ],
)
async def test_url_with_names_needs_a_composition(kind: str, url: str) -> None:
    comp = Composition.from_dict({kind: {"a": {"type": "memory"}, "b": {"type": "memory"}}})
    try:
        svc = await comp.get(kind, url)
        assert isinstance(svc, CombinedBlobService | CacheDirectoryService)
        assert svc.near is await comp.get(kind, "a")
        assert svc.far is await comp.get(kind, "b")
    finally:
        await comp.close()


async def test_directory_service_names_typed(tmp_path: Path) -> None:
    """``blob_service`` / ``directory_service`` hand out the right kinds."""
    comp = Composition.from_toml(store_composition(tmp_path))
    try:
        assert isinstance(await comp.blob_service("root"), BlobService)
        assert isinstance(await comp.directory_service("root"), DirectoryService)
    finally:
        await comp.close()

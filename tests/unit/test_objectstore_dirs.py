"""Directories in object storage (snix layout): the shared suite on obstore's memory store, a local
directory and a real S3 server (SeaweedFS), plus the layout, hand-made and damaged closure objects,
request counts and garbage collection."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import blake3
import pytest
import pytest_asyncio
import zstandard

from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.digest import EMPTY_DIGEST, B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.dirs.cache import CacheDirectoryService
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.dirs.objectstore import ObjectStoreDirectoryService, ObjectStoreDirectoryServiceConfig
from nixcas.castore.fsck import CastoreChecker, CastoreRepairer
from nixcas.castore.gc import FOREVER_NS, collect, mark
from nixcas.castore.nodes import DirectoryNode
from nixcas.castore.objectstore import ObjectMeta, ObjectStore
from nixcas.castore.sizerule import SizeRule
from nixcas.composition import Composition, directory_service_from_url
from nixcas.errors import ChecksumMismatch, ClosureError, ConfigurationError, StorageError, ValidationError
from nixcas.testing.directoryservice import DirectoryServiceSuite, RawStore, collect_into
from nixcas.testing.fixtures import (
    DIRECTORY_A,
    DIRECTORY_B,
    DIRECTORY_COMPLICATED,
    DIRECTORY_D,
    DIRECTORY_WITH_KEEP,
)

VECTORS = {
    d["name"].split(" ")[0]: d
    for d in json.loads((Path(__file__).parents[1] / "data" / "vectors.json").read_text())["directories"]
}


def canonical(name: str) -> bytes:
    """A directory's canonical bytes, from the reference vectors (not from the code under test)."""
    return bytes.fromhex(VECTORS[f"DIRECTORY_{name}"]["canonical_protobuf_hex"])


def digest_hex(name: str) -> str:
    return str(VECTORS[f"DIRECTORY_{name}"]["digest_hex"])


def key_of(hex_digest: str) -> str:
    return f"dirs/b3/{hex_digest[:4]}/{hex_digest}"


def closure_object(frames: Sequence[bytes]) -> bytes:
    """A closure object made by hand: big-endian u32 length + bytes per frame, zstd-compressed."""
    return zstandard.ZstdCompressor().compress(b"".join(struct.pack(">I", len(f)) + f for f in frames))


def read_frames(data: bytes) -> list[bytes]:
    """A closure object taken apart by hand."""
    plain = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    frames = []
    while plain:
        (length,) = struct.unpack(">I", plain[:4])
        frames.append(plain[4 : 4 + length])
        assert len(frames[-1]) == length
        plain = plain[4 + length :]
    return frames


def raw_store(svc: DirectoryService) -> RawStore:
    """Raw storage here is a closure object of exactly that one frame, written under the digest."""
    assert isinstance(svc, ObjectStoreDirectoryService)

    async def store(digest: B3Digest, raw: bytes) -> None:
        await svc.store.put(key_of(digest.hex()), closure_object([raw]))

    return store


async def upload(svc: DirectoryService, directories: Sequence[Directory]) -> B3Digest:
    async with svc.put_multiple_start() as putter:
        for d in directories:
            await putter.put(d)
        return await putter.close()


async def collect_all(svc: DirectoryService, root: B3Digest) -> list[Directory]:
    return [d async for d in svc.get_recursive(root)]


# -- the shared suite ------------------------------------------------------------------


class TestMemoryObjectStoreDirectoryService(DirectoryServiceSuite):
    covers = ("objectstore",)

    ROOTS_ONLY = True

    @pytest_asyncio.fixture
    async def directory_service(self) -> AsyncIterator[DirectoryService]:
        svc = await directory_service_from_url("objectstore+memory:///")
        assert isinstance(svc, ObjectStoreDirectoryService)
        yield svc
        await svc.close()

    @pytest.fixture
    def store_raw(self, directory_service: DirectoryService) -> RawStore:
        return raw_store(directory_service)


class TestFileObjectStoreDirectoryService(DirectoryServiceSuite):
    covers = ("objectstore",)

    ROOTS_ONLY = True

    @pytest_asyncio.fixture
    async def directory_service(self, tmp_path: Path) -> AsyncIterator[DirectoryService]:
        svc = await directory_service_from_url(f"objectstore+file://{tmp_path}/dirs")
        assert isinstance(svc, ObjectStoreDirectoryService)
        yield svc
        await svc.close()

    @pytest.fixture
    def store_raw(self, directory_service: DirectoryService) -> RawStore:
        return raw_store(directory_service)


class TestS3DirectoryService(DirectoryServiceSuite):
    covers = ("objectstore",)

    ROOTS_ONLY = True

    @pytest_asyncio.fixture
    async def directory_service(self, s3_url: str) -> AsyncIterator[DirectoryService]:
        svc = await directory_service_from_url(s3_url)
        assert isinstance(svc, ObjectStoreDirectoryService)
        yield svc
        await svc.close()

    @pytest.fixture
    def store_raw(self, directory_service: DirectoryService) -> RawStore:
        return raw_store(directory_service)


# -- fixtures for the specifics ----------------------------------------------------------


@pytest_asyncio.fixture
async def svc() -> AsyncIterator[ObjectStoreDirectoryService]:
    service = await directory_service_from_url("objectstore+memory:///")
    assert isinstance(service, ObjectStoreDirectoryService)
    service.store.requests.clear()  # opening read and recorded the store's size rule; tests count what follows
    yield service
    await service.close()


@pytest_asyncio.fixture(params=["memory", "s3"])
async def anywhere(request: pytest.FixtureRequest) -> AsyncIterator[ObjectStoreDirectoryService]:
    url = "objectstore+memory:///" if request.param == "memory" else request.getfixturevalue("s3_url")
    service = await directory_service_from_url(url)
    assert isinstance(service, ObjectStoreDirectoryService)
    service.store.requests.clear()  # opening read and recorded the store's size rule; tests count what follows
    yield service
    await service.close()


# -- layout and interoperability ---------------------------------------------------------


async def test_layout_of_complicated(anywhere: ObjectStoreDirectoryService) -> None:
    root = await upload(anywhere, [DIRECTORY_WITH_KEEP, DIRECTORY_COMPLICATED])
    assert root.hex() == digest_hex("COMPLICATED")
    key = "dirs/b3/424a/424a7f6ce08d805d15b428062faae96299a1675d708c3a39261afe38cdd04feb"
    assert key == key_of(digest_hex("COMPLICATED"))
    # one object for the closure, under its root
    keys = [m.key async for page in anywhere.store.list("dirs/") for m in page]
    assert keys == [key, "dirs/size-rule"]
    assert await anywhere.store.get("dirs/size-rule") == b"tvix\n"  # the store's rule, recorded when created
    data = await anywhere.store.get(key)
    assert data is not None
    assert read_frames(data) == [canonical("COMPLICATED"), canonical("WITH_KEEP")]
    # the sub-directory is not an object of its own
    assert await anywhere.get(B3Digest(bytes.fromhex(digest_hex("WITH_KEEP")))) is None


async def test_layout_breadth_first(svc: ObjectStoreDirectoryService) -> None:
    top = Directory({b"t": DIRECTORY_D.node(SizeRule.TVIX), b"u": DIRECTORY_WITH_KEEP.node(SizeRule.TVIX)})
    root = await upload(svc, [DIRECTORY_A, DIRECTORY_B, DIRECTORY_D, DIRECTORY_WITH_KEEP, top])
    data = await svc.store.get(key_of(root.hex()))
    assert data is not None
    frames = read_frames(data)
    # top; its children D, WITH_KEEP; then D's children A, B (each once)
    assert frames == [top.encode(), canonical("D"), canonical("WITH_KEEP"), canonical("A"), canonical("B")]


async def test_reads_a_snix_object(anywhere: ObjectStoreDirectoryService) -> None:
    """An object made by hand in the snix format (root, then breadth-first) reads back whole."""
    frames = [canonical("D"), canonical("A"), canonical("B")]
    await anywhere.store.put(key_of(digest_hex("D")), closure_object(frames))
    root = B3Digest(bytes.fromhex(digest_hex("D")))
    got = await anywhere.get(root)
    assert got is not None
    assert got.entries == DIRECTORY_D.entries
    raw = [item async for item in anywhere.get_recursive_raw(root)]
    assert [(d.hex(), r) for d, r in raw] == [
        (digest_hex("D"), canonical("D")),
        (digest_hex("A"), canonical("A")),
        (digest_hex("B"), canonical("B")),
    ]
    assert [d.digest.hex() for d in await collect_all(anywhere, root)] == [
        digest_hex("D"),
        digest_hex("A"),
        digest_hex("B"),
    ]


async def test_reads_a_multi_frame_zstd_stream(svc: ObjectStoreDirectoryService) -> None:
    """Several zstd frames, and a stream without recorded content size (as streaming writers make)."""
    plain = [struct.pack(">I", len(f)) + f for f in (canonical("COMPLICATED"), canonical("WITH_KEEP"))]
    cobj = zstandard.ZstdCompressor().compressobj()
    data = cobj.compress(plain[0]) + cobj.flush() + zstandard.ZstdCompressor().compress(plain[1])
    await svc.store.put(key_of(digest_hex("COMPLICATED")), data)
    got = await collect_all(svc, B3Digest(bytes.fromhex(digest_hex("COMPLICATED"))))
    assert [d.digest.hex() for d in got] == [digest_hex("COMPLICATED"), digest_hex("WITH_KEEP")]


# -- damaged objects ---------------------------------------------------------------------

WRONG_B = Directory({b"a": DirectoryNode(DIRECTORY_A.digest, 5)})
TOP = Directory({b"x": DIRECTORY_B.node(SizeRule.TVIX)})  # TOP -> B -> A


@pytest.mark.parametrize(
    ("root", "plain", "message"),
    [
        pytest.param(
            DIRECTORY_D.digest,
            [canonical("D"), canonical("A"), canonical("B")[:-1] + b"\x00"],
            "no earlier frame refers to",
            id="corrupt-frame",
        ),
        pytest.param(
            TOP.digest, [TOP.encode(), canonical("A"), canonical("B")], "no earlier frame refers to", id="child-first"
        ),
        pytest.param(
            DIRECTORY_WITH_KEEP.digest,
            [canonical("WITH_KEEP"), canonical("A")],
            "no earlier frame refers to",
            id="unreferenced-extra",
        ),
        pytest.param(
            DIRECTORY_D.digest,
            [canonical("D"), canonical("A"), canonical("B"), canonical("A")],
            "repeats",
            id="duplicate",
        ),
        pytest.param(DIRECTORY_D.digest, [canonical("D"), canonical("A")], "closure incomplete", id="missing-child"),
        pytest.param(TOP.digest, [TOP.encode(), canonical("B")], "closure incomplete", id="missing-grandchild"),
        pytest.param(WRONG_B.digest, [WRONG_B.encode(), canonical("A")], "size", id="wrong-size"),
        pytest.param(DIRECTORY_A.digest, [], "holds no directories", id="empty"),
    ],
)
async def test_damaged_closure(
    svc: ObjectStoreDirectoryService, root: B3Digest, plain: list[bytes], message: str
) -> None:
    await svc.store.put(key_of(root.hex()), closure_object(plain))
    seen: list[B3Digest] = []
    with pytest.raises(StorageError, match=message):
        await collect_into(svc, root, seen)
    # what came before the error: the object's first frames, each checked, in order
    assert seen == [B3Digest(blake3.blake3(f).digest()) for f in plain[: len(seen)]]
    with pytest.raises(StorageError, match=message):
        [item async for item in svc.get_recursive_raw(root)]


async def test_wrong_root(svc: ObjectStoreDirectoryService) -> None:
    """An object whose first frame is not its key's directory."""
    await svc.store.put(key_of(digest_hex("D")), closure_object([canonical("B"), canonical("A")]))
    with pytest.raises(ChecksumMismatch):
        await svc.get(DIRECTORY_D.digest)
    with pytest.raises(ChecksumMismatch):
        await collect_all(svc, DIRECTORY_D.digest)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(b"not zstd at all", "cannot decompress", id="garbage"),
        pytest.param(zstandard.ZstdCompressor().compress(b"\xff\xff\xff\xff"), "claims", id="huge-frame-length"),
        pytest.param(
            zstandard.ZstdCompressor().compress(struct.pack(">I", 1000) + b"\x12" * 10),
            "ends inside a frame",
            id="truncated-frame",
        ),
        pytest.param(zstandard.ZstdCompressor().compress(b"\x00\x00"), "ends inside a frame", id="truncated-length"),
    ],
)
async def test_undecodable_object(svc: ObjectStoreDirectoryService, data: bytes, message: str) -> None:
    await svc.store.put(key_of(digest_hex("D")), data)
    with pytest.raises(StorageError, match=message):
        await collect_all(svc, DIRECTORY_D.digest)
    if message in ("cannot decompress", "claims"):
        with pytest.raises(StorageError, match=message):
            await svc.get(DIRECTORY_D.digest)


async def test_frame_length_beyond_snix_limit(svc: ObjectStoreDirectoryService) -> None:
    big = ObjectStoreDirectoryService(svc.store, max_closure_bytes=1 << 40)
    await svc.store.put(
        key_of(digest_hex("D")),
        closure_object([]) + zstandard.ZstdCompressor().compress(struct.pack(">I", 1 * 1024 * 1024 * 1000 + 1)),
    )
    with pytest.raises(StorageError, match="claims"):
        await collect_all(big, DIRECTORY_D.digest)


async def test_zstd_bomb(svc: ObjectStoreDirectoryService) -> None:
    """64 MiB of zeros behind a frame header claiming 1 MiB: stopped at max_closure_bytes, never held whole."""
    small = ObjectStoreDirectoryService(svc.store, max_closure_bytes=1 << 20)
    compressor = zstandard.ZstdCompressor(level=19)
    bomb = compressor.compress(struct.pack(">I", 1 << 20) + bytes(64 << 20))
    assert len(bomb) < 64 << 10
    await svc.store.put(key_of(digest_hex("D")), bomb)
    with pytest.raises(StorageError, match="max_closure_bytes"):
        await collect_all(small, DIRECTORY_D.digest)


async def test_object_larger_than_allowed(svc: ObjectStoreDirectoryService) -> None:
    small = ObjectStoreDirectoryService(svc.store, max_closure_bytes=1024)
    await svc.store.put(key_of(digest_hex("D")), b"\x00" * 4096)
    with pytest.raises(StorageError, match="more than"):
        await collect_all(small, DIRECTORY_D.digest)


# -- writing ----------------------------------------------------------------------------


async def test_put_of_a_non_leaf_is_refused(svc: ObjectStoreDirectoryService) -> None:
    with pytest.raises(ValidationError, match="put_multiple"):
        await svc.put(DIRECTORY_B)
    assert svc.store.requests["PUT"] == 0
    assert await svc.get(DIRECTORY_B.digest) is None


async def test_put_raw_needs_a_whole_closure(svc: ObjectStoreDirectoryService) -> None:
    with pytest.raises(ValidationError, match="put_multiple"):
        await svc._put_raw([(DIRECTORY_D.digest, canonical("D")), (DIRECTORY_A.digest, canonical("A"))])
    with pytest.raises(ClosureError, match="one root"):
        await svc._put_raw([(DIRECTORY_A.digest, canonical("A")), (DIRECTORY_WITH_KEEP.digest, canonical("WITH_KEEP"))])
    with pytest.raises(ClosureError, match="no directories"):
        await svc._put_raw([])
    with pytest.raises(ValidationError, match="not a Directory"):
        await svc._put_raw([(B3Digest(blake3.blake3(b"\xff").digest()), b"\xff")])
    assert svc.store.requests["PUT"] == 0


async def test_second_put_costs_no_put(anywhere: ObjectStoreDirectoryService) -> None:
    await upload(anywhere, [DIRECTORY_A, DIRECTORY_B, DIRECTORY_D])
    assert anywhere.store.requests["PUT"] == 1
    await upload(anywhere, [DIRECTORY_A, DIRECTORY_B, DIRECTORY_D])
    await anywhere.put(DIRECTORY_A)
    await anywhere.put(DIRECTORY_A)
    assert anywhere.store.requests["PUT"] == 2  # D's closure once, A's (a closure of one) once
    # a second service (no cache) finds the object with one HEAD
    other = ObjectStoreDirectoryService(anywhere.store)
    before = dict(anywhere.store.requests)
    await upload(other, [DIRECTORY_A, DIRECTORY_B, DIRECTORY_D])
    assert anywhere.store.requests["PUT"] == before["PUT"]
    assert anywhere.store.requests["HEAD"] == before.get("HEAD", 0) + 1


async def test_overlapping_closures(svc: ObjectStoreDirectoryService) -> None:
    await upload(svc, [DIRECTORY_A, DIRECTORY_B])
    await upload(svc, [DIRECTORY_A, DIRECTORY_B, DIRECTORY_D])
    assert [d.digest for d in await collect_all(svc, DIRECTORY_B.digest)] == [DIRECTORY_B.digest, DIRECTORY_A.digest]
    assert len(await collect_all(svc, DIRECTORY_D.digest)) == 3
    assert svc.store.requests["PUT"] == 2


async def test_old_object_is_written_again(svc: ObjectStoreDirectoryService) -> None:
    """An object older than refresh_after is rewritten (so GC sees it young), a fresh one is not."""
    root = await upload(svc, [DIRECTORY_WITH_KEEP, DIRECTORY_COMPLICATED])
    key = key_of(root.hex())
    meta = await svc.store.head(key)
    assert meta is not None
    svc.presence.note(ObjectMeta(key, meta.size, time.time_ns() - svc.refresh_after_ns - 10**9))
    await upload(svc, [DIRECTORY_WITH_KEEP, DIRECTORY_COMPLICATED])
    assert svc.store.requests["PUT"] == 2
    await upload(svc, [DIRECTORY_WITH_KEEP, DIRECTORY_COMPLICATED])
    assert svc.store.requests["PUT"] == 2


async def test_non_root_get_costs_one_request(svc: ObjectStoreDirectoryService) -> None:
    await upload(svc, [DIRECTORY_A, DIRECTORY_B])
    gets = svc.store.requests["GET"]
    assert await svc.get(DIRECTORY_A.digest) is None
    assert await svc.get_many_raw([DIRECTORY_A.digest, DIRECTORY_B.digest]) == {DIRECTORY_B.digest: canonical("B")}
    assert svc.store.requests["GET"] == gets + 3


# -- garbage collection ------------------------------------------------------------------


async def test_gc_scan_and_delete(anywhere: ObjectStoreDirectoryService) -> None:
    before = time.time_ns() - 10**9
    d_root = await upload(anywhere, [DIRECTORY_A, DIRECTORY_B, DIRECTORY_D])
    c_root = await upload(anywhere, [DIRECTORY_WITH_KEEP, DIRECTORY_COMPLICATED])
    scanned = [o async for page in anywhere.scan_directories() for o in page]
    assert sorted(o.digest for o in scanned) == sorted([d_root, c_root])
    for obj in scanned:
        meta = await anywhere.store.head(key_of(obj.digest.hex()))
        assert meta is not None
        assert obj.size == meta.size
        assert obj.mtime_ns >= before
    # younger than the cutoff: kept
    done = await anywhere.delete_directories(scanned, before)
    assert sorted(o.digest for o in done.kept) == sorted([d_root, c_root])
    assert done.deleted == []
    assert await anywhere.get(d_root) is not None
    # older: deleted; already gone: neither list
    doomed = [o for o in scanned if o.digest == d_root]
    done = await anywhere.delete_directories(doomed, FOREVER_NS)
    assert done.deleted == doomed
    assert done.kept == []
    assert await anywhere.get(d_root) is None
    done = await anywhere.delete_directories(doomed, FOREVER_NS)
    assert done.deleted == done.kept == []
    # a deleted closure is written again by the next upload (the cache forgot it)
    await upload(anywhere, [DIRECTORY_A, DIRECTORY_B, DIRECTORY_D])
    assert await anywhere.get(d_root) is not None


async def test_gc_scan_ignores_foreign_keys(svc: ObjectStoreDirectoryService) -> None:
    await svc.store.put("dirs/b3/zzzz/notadigest", b"x")
    await svc.store.put(f"dirs/b3/0000/{digest_hex('D')}", b"x")  # wrong shard
    root = await upload(svc, [DIRECTORY_A])
    assert [o.digest async for page in svc.scan_directories() for o in page] == [root]


async def test_gc_mark_reads_closures(svc: ObjectStoreDirectoryService) -> None:
    c_root = await upload(svc, [DIRECTORY_WITH_KEEP, DIRECTORY_COMPLICATED])
    b_root = await upload(svc, [DIRECTORY_A, DIRECTORY_B])
    d_root = await upload(svc, [DIRECTORY_A, DIRECTORY_B, DIRECTORY_D])
    marked = await mark(svc, [c_root, d_root, b_root, DIRECTORY_C_DIGEST])
    assert marked.directories == {
        c_root,
        DIRECTORY_WITH_KEEP.digest,
        d_root,
        b_root,
        DIRECTORY_A.digest,
        DIRECTORY_C_DIGEST,
    }
    assert marked.blobs == {EMPTY_DIGEST}
    assert marked.missing_directories == {DIRECTORY_C_DIGEST}


DIRECTORY_C_DIGEST = B3Digest(bytes.fromhex("78eb200ae0cc95d4ea954655fbcf91e285013a261310e161927f2401d2bca803"))


async def test_gc_mark_stops_at_a_damaged_closure(svc: ObjectStoreDirectoryService) -> None:
    await svc.store.put(key_of(digest_hex("D")), closure_object([canonical("D"), canonical("A")]))
    with pytest.raises(StorageError, match="closure incomplete"):
        await mark(svc, [DIRECTORY_D.digest])


async def test_gc_collect(anywhere: ObjectStoreDirectoryService) -> None:
    blobs = MemoryBlobService()
    assert await blobs.put(b"") == EMPTY_DIGEST
    kept = await upload(anywhere, [DIRECTORY_WITH_KEEP, DIRECTORY_COMPLICATED])
    inner = await upload(anywhere, [DIRECTORY_A, DIRECTORY_B])  # inside the live closure below: kept too
    live = await upload(anywhere, [DIRECTORY_A, DIRECTORY_B, DIRECTORY_D])
    # young: nothing goes
    report = await collect(blobs, anywhere, [live], cutoff_ns=time.time_ns() - 3600 * 10**9)
    assert report.kinds["directory"].scanned == 3
    assert report.kinds["directory"].live == 2
    assert report.kinds["directory"].young == 1
    assert report.missing_directories == 0
    # old: the unreachable closure goes, with its object's size
    size = (await anywhere.store.head(key_of(kept.hex())) or ObjectMeta("", -1, 0)).size
    report = await collect(blobs, anywhere, [live], cutoff_ns=FOREVER_NS)
    assert report.kinds["directory"].freed == 1
    assert report.kinds["directory"].freed_bytes == size
    assert await anywhere.get(kept) is None
    assert len(await collect_all(anywhere, live)) == 3
    assert len(await collect_all(anywhere, inner)) == 2


# -- configuration -------------------------------------------------------------------------


async def test_file_url(tmp_path: Path) -> None:
    svc = await directory_service_from_url(f"objectstore+file://{tmp_path}/d?concurrency=4&zstd_level=3")
    assert isinstance(svc, ObjectStoreDirectoryService)
    root = await upload(svc, [DIRECTORY_WITH_KEEP, DIRECTORY_COMPLICATED])
    path = tmp_path / "d" / "dirs" / "b3" / root.hex()[:4] / root.hex()
    assert read_frames(path.read_bytes()) == [canonical("COMPLICATED"), canonical("WITH_KEEP")]
    await svc.close()


async def test_options(tmp_path: Path) -> None:
    svc = await directory_service_from_url(
        "objectstore+memory:///?zstd_level=9&refresh_after=60&max_closure_bytes=4096"
    )
    assert isinstance(svc, ObjectStoreDirectoryService)
    assert (svc.zstd_level, svc.refresh_after_ns, svc.max_closure_bytes) == (9, 60 * 10**9, 4096)
    assert svc.min_grace_ns == 2 * 60 * 10**9  # twice refresh_after
    await svc.close()


async def test_composition(tmp_path: Path) -> None:
    path = tmp_path / "composition.toml"
    path.write_text(
        f'[directoryservices.root]\ntype = "objectstore"\nobject_store_url = "file://{tmp_path}/c"\n'
        'object_store_options = { max_closure_bytes = "100000" }\n'
    )
    composition = Composition.from_toml(path)
    try:
        svc = await composition.get("directoryservices", "root")
        assert isinstance(svc, ObjectStoreDirectoryService)
        assert svc.max_closure_bytes == 100000
        assert await upload(svc, [DIRECTORY_A]) == DIRECTORY_A.digest
    finally:
        await composition.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("objectstore+file://host/x", "absolute path"),
        ("objectstore+file:relative/x", "absolute path"),
        ("objectstore+file:///", "absolute path"),
        ("objectstore+file://{tmp}/x?endpoint=y", "no options"),
        ("objectstore+memory:///?max_closure_bytes=1", "max_closure_bytes"),
        ("objectstore+memory:///?max_closure_bytes=abc", "max_closure_bytes"),
        ("objectstore+memory:///?refresh_after=0", "refresh_after"),
        ("objectstore+memory:///?zstd_level=99", "zstd_level"),
        ("objectstore+memory:///?region=x", "no options"),
        ("objectstore+memory://bucket/", "no bucket"),
        ("objectstore+s3:///x", "needs a bucket"),
        ("objectstore+ftp://x/y", "unsupported"),
        ("objectstore+memory:///?concurrency=0", "concurrency"),
    ],
)
async def test_bad_urls(tmp_path: Path, url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        await directory_service_from_url(url.format(tmp=tmp_path))
    assert not (tmp_path / "x").exists()


def test_config_table_names() -> None:
    config = ObjectStoreDirectoryServiceConfig("memory:///")
    assert config.object_store_options == {}
    assert ObjectStoreDirectoryServiceConfig.type_tag == "objectstore"


async def test_unreachable_store_is_unavailable() -> None:
    from nixcas.errors import UnavailableError

    store = ObjectStore(
        "s3://nixcas/x",
        {
            "endpoint": "http://127.0.0.1:9",
            "region": "us-east-1",
            "max_retries": "0",
            "connect_timeout": "1",
            "access_key_id": "a",
            "secret_access_key": "b",
        },
    )
    svc = ObjectStoreDirectoryService(store)
    with pytest.raises(UnavailableError):
        await svc.get(DIRECTORY_D.digest)


# -- fsck ------------------------------------------------------------------------------------


async def fsck_problems(svc: ObjectStoreDirectoryService, root: Directory) -> list[str]:
    blobs = MemoryBlobService()
    await blobs.put(b"")
    checker = CastoreChecker(blobs, svc)
    problems = [f"{p.path} {p.message}" async for p in checker.walk("root", root.node(SizeRule.TVIX))]
    stored = [f"{p.path} {p.message}" async for p in checker.stored_directories(svc)]
    return problems + stored


async def test_fsck_walks_closures(svc: ObjectStoreDirectoryService) -> None:
    top = Directory({b"c": DIRECTORY_COMPLICATED.node(SizeRule.TVIX), b"d": DIRECTORY_D.node(SizeRule.TVIX)})
    await upload(svc, [DIRECTORY_A, DIRECTORY_B, DIRECTORY_D, DIRECTORY_WITH_KEEP, DIRECTORY_COMPLICATED, top])
    await upload(svc, [DIRECTORY_A, DIRECTORY_B])  # an unreferenced closure, intact
    assert await fsck_problems(svc, top) == []
    assert svc.store.requests["GET"] == 2  # each closure object read once


async def test_fsck_reports_a_damaged_closure_and_repairs_it(svc: ObjectStoreDirectoryService) -> None:
    await svc.store.put(key_of(digest_hex("D")), closure_object([canonical("D"), canonical("A")]))
    problems = await fsck_problems(svc, DIRECTORY_D)
    assert len(problems) == 1
    assert "damaged closure object" in problems[0]
    assert "closure incomplete" in problems[0]
    # B is inside D's object only: missing as a root; the damaged object is reported once more
    problems = await fsck_problems(svc, DIRECTORY_B)
    assert problems[0] == "root is missing"
    assert len(problems) == 2
    assert problems[1].startswith("(unreferenced) has a damaged closure object")
    # repair from an intact source: the damaged object is replaced
    source = await directory_service_from_url("memory://")
    await upload(source, [DIRECTORY_A, DIRECTORY_B, DIRECTORY_D])
    repairer = CastoreRepairer(MemoryBlobService(), svc, MemoryBlobService(), source)
    assert await repairer.directory(DIRECTORY_D.digest)
    assert await fsck_problems(svc, DIRECTORY_D) == []


async def test_a_local_cache_in_front_answers_sub_directories() -> None:
    """Only roots are retrievable from closure objects; a `cache` with a near store, filled by reading the
    root, serves every directory below it (what mounts and `castore ls` of a sub-directory need)."""
    far = await directory_service_from_url("objectstore+memory:///")
    putter = far.put_multiple_start()
    for d in (DIRECTORY_A, DIRECTORY_B, DIRECTORY_D):
        await putter.put(d)
    await putter.close()
    assert await far.get(DIRECTORY_B.digest) is None  # snix semantics
    cached = CacheDirectoryService(MemoryDirectoryService(SizeRule.TVIX), far)
    assert await cached.get(DIRECTORY_D.digest) == DIRECTORY_D
    assert await cached.get(DIRECTORY_B.digest) == DIRECTORY_B
    below_b = [d.digest async for d in cached.get_recursive(DIRECTORY_B.digest)]
    assert below_b == [DIRECTORY_B.digest, DIRECTORY_A.digest]
    await far.close()

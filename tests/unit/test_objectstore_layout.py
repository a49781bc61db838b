"""The storage layer's shape: one layout package over two object-I/O adapters, public seams, the GC contract.

* the ``castore/objectstore`` package: the local-disk adapter (:class:`DiskIO`) and obstore's
  (:class:`ObjectStore`) answer the same :class:`ObjectIO` calls alike, and the shared scan
  reads either;
* wrappers reach other services only through public operations (``open_raw``,
  ``read_many_raw``, ``missing``, ``put_validated``), and a local blob is hashed once per read;
* backends import the GC contract (:mod:`nixcas.castore.sweep`), not the collector;
* size limits of the storage layer (modules ≤ 600 lines, functions ≤ 80).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import blake3
import pytest
import pytest_asyncio

from nixcas.castore.blob.base import BlobService, VerifyingReader
from nixcas.castore.blob.local import LocalBlobService
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.blob.objectstore import ObjectStoreBlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.objectstore import ObjectIO, ObjectStore
from nixcas.castore.objectstore.disk import DiskIO
from nixcas.castore.objectstore.layout import chunk_key
from nixcas.castore.objectstore.scan import scan_listing
from nixcas.errors import StorageError

SRC = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").exists()) / "src" / "nixcas"


def b3(data: bytes) -> B3Digest:
    return B3Digest(blake3.blake3(data).digest())


# -- the two object-I/O adapters -----------------------------------------------------


@pytest_asyncio.fixture(params=["disk", "obstore"])
async def objects(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ObjectIO]:
    if request.param == "disk":
        yield DiskIO(LocalBlobService(tmp_path / "store"))
    else:
        yield ObjectStore("memory:///")


async def test_object_io_round_trip(objects: ObjectIO) -> None:
    assert await objects.get("chunks/b3/abcd/x") is None
    assert await objects.head("chunks/b3/abcd/x") is None
    await objects.put("chunks/b3/abcd/x", b"hello")
    await objects.put("chunks/b3/abcd/y", b"")
    await objects.put("blobs/b3/0000/z", b"zz")
    assert await objects.get("chunks/b3/abcd/x") == b"hello"
    meta = await objects.head("chunks/b3/abcd/x")
    assert meta is not None and (meta.key, meta.size) == ("chunks/b3/abcd/x", 5) and meta.mtime_ns > 0
    with pytest.raises(StorageError, match="more than the 4"):
        await objects.get("chunks/b3/abcd/x", cap=4)
    listed = [m.key async for page in objects.list("chunks/") for m in page]
    assert sorted(listed) == ["chunks/b3/abcd/x", "chunks/b3/abcd/y"]
    after = [m.key async for page in objects.list("chunks/", after="chunks/b3/abcd/x") for m in page]
    assert after == ["chunks/b3/abcd/y"]
    await objects.delete("chunks/b3/abcd/x")
    await objects.delete("chunks/b3/abcd/x")  # absent already: done
    assert await objects.get("chunks/b3/abcd/x") is None


async def test_shared_scan_reads_the_disk_store_as_the_store_does(tmp_path: Path) -> None:
    """The listing scan (object storage's) over the disk adapter finds what the disk store's own scan finds."""
    svc = LocalBlobService(tmp_path / "store", avg_chunk_size=16 << 10)
    big = os.urandom(200 << 10)  # several chunks: a non-empty index
    await svc.put_many([b"a", b"bb", big])
    disk = DiskIO(svc)
    for kind, own in (("chunks", svc.scan_chunks()), ("blobs", svc.scan_blobs())):
        mine = {(o.digest, o.size, o.chunks) async for batch in own for o in batch}
        shared = {(o.digest, o.size, o.chunks) async for batch in scan_listing(disk, kind) for o in batch}
        assert shared == mine and mine
    [indexed] = [o async for batch in scan_listing(disk, "blobs") for o in batch if o.chunks]
    assert indexed.digest == b3(big) and len(indexed.chunks) >= 2


# -- public seams ------------------------------------------------------------------


class _CountingHasher:
    """``blake3.blake3`` that counts the bytes hashed (by every module: they call it through the module)."""

    hashed = 0
    real: Any = blake3.blake3

    def __init__(self, data: Any = b"", **kwargs: Any) -> None:
        self._h = _CountingHasher.real(data, **kwargs)
        _CountingHasher.hashed += len(memoryview(data).cast("B"))

    def update(self, data: Any) -> _CountingHasher:
        _CountingHasher.hashed += len(memoryview(data).cast("B"))
        self._h.update(data)
        return self

    def digest(self, *args: Any, **kwargs: Any) -> bytes:
        return bytes(self._h.digest(*args, **kwargs))


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> type[_CountingHasher]:
    _CountingHasher.hashed = 0
    monkeypatch.setattr(blake3, "blake3", _CountingHasher)
    return _CountingHasher


async def test_local_single_chunk_read_is_hashed_once(tmp_path: Path, counting: type[_CountingHasher]) -> None:
    svc = LocalBlobService(tmp_path / "store")
    data = os.urandom(100 << 10)
    digest = await svc.put(data)
    counting.hashed = 0
    reader = await svc.open_read(digest)
    assert reader is not None and not isinstance(reader, VerifyingReader)
    async with reader:
        assert await reader.read_all() == data
    assert counting.hashed == len(data)  # checked once, when opened (it was twice)


async def test_local_damaged_single_chunk_still_fails(tmp_path: Path) -> None:
    svc = LocalBlobService(tmp_path / "store")
    digest = await svc.put(b"right bytes")
    await DiskIO(svc).put(chunk_key(digest), __import__("zstandard").ZstdCompressor().compress(b"wrong bytes"))
    reader = await svc.open_read(digest)
    assert reader is not None
    with pytest.raises(StorageError):
        await reader.read_all()


@pytest_asyncio.fixture(params=["local", "memory", "objectstore"])
async def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobService]:
    if request.param == "local":
        yield LocalBlobService(tmp_path / "store")
    elif request.param == "memory":
        yield MemoryBlobService()
    else:
        yield ObjectStoreBlobService(ObjectStore("memory:///"))


async def test_missing(blobs: BlobService) -> None:
    present = await blobs.put_many([b"one", b"two", b"", os.urandom(3 << 20)])
    absent = [b3(b"three"), b3(b"four")]
    asked = [absent[0], *present, absent[1], absent[0]]
    assert await blobs.missing(asked) == [absent[0], absent[1], absent[0]]
    assert await blobs.missing([]) == []
    assert await blobs.missing(present) == []


async def test_objectstore_missing_is_batched() -> None:
    store = ObjectStore("memory:///")
    writer = ObjectStoreBlobService(store)
    digests = await writer.put_many([b"blob %d" % i for i in range(400)])
    reader = ObjectStoreBlobService(store)  # a new process: nothing cached
    store.requests.clear()
    absent = b3(b"not stored")
    assert await reader.missing([*digests, absent]) == [absent]
    assert sum(store.requests.values()) < 60  # listings of key ranges, not 401 HEADs
    assert store.requests["LIST"] > 0


async def test_open_raw_and_read_many_raw_are_unverified(blobs: BlobService) -> None:
    from nixcas.castore.blob.base import BlobChecker

    digest = await blobs.put(b"some bytes")
    raw = await blobs.open_raw(digest)
    assert raw is not None
    async with raw:
        assert await raw.read_all() == b"some bytes"
    assert await blobs.open_raw(b3(b"absent")) is None
    checker = BlobChecker()
    found = await blobs.read_many_raw({digest: 100, b3(b"absent"): 100}, checker)
    assert found == {digest: b"some bytes"}


async def test_put_validated_stores_a_closure() -> None:
    dirs = MemoryDirectoryService()
    leaf = Directory()
    await dirs.put_validated([(leaf.digest, leaf.encode())])
    assert await dirs.get(leaf.digest) == leaf


_PRIVATE_REACH = re.compile(r"\b(?!self\b|super\(\)|cls\b)[A-Za-z_][\w.]*\.(_open_read|_read_many|_put_raw)\(")


def test_no_service_reaches_into_another_ones_hooks() -> None:
    """``x._open_read(…)``, ``x._read_many(…)``, ``x._put_raw(…)`` only on ``self`` / ``super()``."""
    found = [
        f"{path.relative_to(SRC)}:{n}: {line.strip()}"
        for path in SRC.rglob("*.py")
        if "_proto" not in path.parts
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if _PRIVATE_REACH.search(line)
    ]
    assert found == []


# -- the GC contract, and sizes ------------------------------------------------------


def test_backends_import_the_contract_not_the_collector() -> None:
    code = (
        "import sys; import nixcas.castore.blob.local, nixcas.castore.blob.objectstore, nixcas.castore.dirs.sqlite;"
        "print('nixcas.castore.gc' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    assert out.stdout.strip() == "False"
    backends = [*(SRC / "castore" / "blob").glob("*.py"), *(SRC / "castore" / "dirs").glob("*.py")]
    assert not [p.name for p in backends if "from nixcas.castore.gc import" in p.read_text()]


_SIZED = [
    "castore/objectstore",
    "castore/blob/local.py",
    "castore/blob/objectstore.py",
    "castore/blob/base.py",
    "castore/dirs/objectstore.py",
    "castore/gc.py",
    "castore/sweep.py",
]


def _sized_files() -> list[Path]:
    out: list[Path] = []
    for part in _SIZED:
        path = SRC / part
        out.extend(sorted(path.glob("*.py")) if path.is_dir() else [path])
    return out


@pytest.mark.parametrize("path", _sized_files(), ids=lambda p: str(p.relative_to(SRC)))
def test_storage_layer_sizes(path: Path) -> None:
    text = path.read_text()
    assert len(text.splitlines()) <= 600
    long = [
        f"{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > 80
    ]
    assert long == []

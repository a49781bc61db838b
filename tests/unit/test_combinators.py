"""The caching combinators: ``combined`` (blobs), ``cache`` and ``lru`` (directories).

Each runs the shared contract suite, in some variants with writes sent to
*far* so that every read goes through the fill-from-far path; the rest checks
what lands near (looking at the near service directly), corruption and
broken closures from far, and LRU eviction.  Expected digests come from the
``blake3`` package or from the reference vectors, never from nixcas.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import blake3
import pytest
import pytest_asyncio
import zstandard

from nixcas.castore.blob.base import BlobReader, BlobService, BlobWriter
from nixcas.castore.blob.combined import CombinedBlobService
from nixcas.castore.blob.local import LocalBlobService
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.dirs.cache import CacheDirectoryService
from nixcas.castore.dirs.lru import LruDirectoryService
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.dirs.sqlite import SqliteDirectoryService
from nixcas.castore.nodes import DirectoryNode, FileNode
from nixcas.castore.sizerule import SizeRule
from nixcas.composition import directory_service_from_url
from nixcas.errors import ChecksumMismatch, ConfigurationError, NixcasError, StorageError
from nixcas.testing.blobservice import BlobCorrupter, BlobServiceSuite, TempFiles, read_exactly
from nixcas.testing.directoryservice import DIGEST_HEX, DirectoryServiceSuite, RawStore
from nixcas.testing.fixtures import (
    BLOB_A,
    BLOB_B,
    DIRECTORY_A,
    DIRECTORY_B,
    DIRECTORY_C,
    DIRECTORY_COMPLICATED,
    DIRECTORY_D,
    DIRECTORY_WITH_KEEP,
    EMPTY,
    EMPTY_DIGEST,
    HELLOWORLD,
)

# -- helpers ---------------------------------------------------------------------------


def b3(data: bytes) -> B3Digest:
    """Independent digest computation (the ``blake3`` package, not nixcas)."""
    return B3Digest(blake3.blake3(data).digest())


def ref(name: str) -> B3Digest:
    """A fixture Directory's digest, from the reference vectors."""
    return B3Digest(bytes.fromhex(DIGEST_HEX[name]))


def key_path(root: Path, kind: str, digest: bytes) -> Path:
    """``<root>/<kind>/b3/<4 hex>/<hex>`` (the snix object layout), computed independently."""
    h = digest.hex()
    return root / kind / "b3" / h[:4] / h


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.exists() else []


LARGE_SIZE = 5 * (1 << 20) + 4321
LARGE = blake3.blake3(b"nixcas combinators LARGE").digest(length=LARGE_SIZE)  # incompressible


class WritesFarBlobService(CombinedBlobService):
    """A combined service whose writes go to far, so that every read fills near from far."""

    async def open_write(self, expected_size: int | None = None) -> BlobWriter:
        return await self.far.open_write(expected_size)


class WritesFarDirectoryService(CacheDirectoryService):
    """A cache whose writes go to far, so that every read goes through the far closure path."""

    async def _put_raw(self, items: Sequence[tuple[B3Digest, bytes]]) -> None:
        await self.far._put_raw(items)


def memory_corrupter(*services: MemoryBlobService) -> BlobCorrupter:
    async def corrupt(digest: B3Digest, data: bytes) -> None:
        hit = [svc for svc in services if digest in svc._blobs]
        assert hit
        for svc in hit:
            svc._blobs[digest] = data

    return corrupt


def memory_raw_store(*services: MemoryDirectoryService | LruDirectoryService) -> RawStore:
    async def store(digest: B3Digest, raw: bytes) -> None:
        for svc in services:
            svc._data[digest] = raw

    return store


# -- the BlobService contract through combined -------------------------------------------


class TestCombinedMemory(BlobServiceSuite):
    """Writes and reads near (memory); far (memory) stays empty."""

    covers = ("combined",)

    @pytest_asyncio.fixture
    async def blob_service(self) -> AsyncIterator[BlobService]:
        svc = CombinedBlobService(MemoryBlobService(), MemoryBlobService())
        yield svc
        assert isinstance(svc.far, MemoryBlobService)
        assert svc.far._blobs == {}
        await svc.close()

    @pytest.fixture
    def corrupt_blob(self, blob_service: BlobService) -> BlobCorrupter:
        assert isinstance(blob_service, CombinedBlobService)
        assert isinstance(blob_service.near, MemoryBlobService)
        assert isinstance(blob_service.far, MemoryBlobService)
        return memory_corrupter(blob_service.near, blob_service.far)


class TestCombinedFillFromFar(BlobServiceSuite):
    """Every blob is written far, so every first read streams from far and fills near."""

    covers = ("combined",)

    @pytest_asyncio.fixture
    async def blob_service(self) -> AsyncIterator[BlobService]:
        svc = WritesFarBlobService(MemoryBlobService(), MemoryBlobService())
        yield svc
        # whatever reached near is exactly a blob far has
        assert isinstance(svc.near, MemoryBlobService)
        assert isinstance(svc.far, MemoryBlobService)
        for digest, data in svc.near._blobs.items():
            assert b3(data) == digest
            assert digest in svc.far._blobs
        await svc.close()

    @pytest.fixture
    def corrupt_blob(self, blob_service: BlobService) -> BlobCorrupter:
        assert isinstance(blob_service, CombinedBlobService)
        assert isinstance(blob_service.near, MemoryBlobService)
        assert isinstance(blob_service.far, MemoryBlobService)
        return memory_corrupter(blob_service.near, blob_service.far)


class TestCombinedObjectStoreNear(BlobServiceSuite):
    """Near is an object store on disk (its writer spills big blobs to temp files), far is memory."""

    covers = ("combined",)

    @pytest_asyncio.fixture
    async def blob_service(self, tmp_path: Path) -> AsyncIterator[BlobService]:
        svc = WritesFarBlobService(LocalBlobService(tmp_path / "near"), MemoryBlobService())
        yield svc
        await svc.close()
        assert files_under(tmp_path / "near" / "tmp") == []  # no copy left behind, finished or not

    @pytest.fixture
    def corrupt_blob(self, blob_service: BlobService, tmp_path: Path) -> BlobCorrupter:
        assert isinstance(blob_service, CombinedBlobService)
        assert isinstance(blob_service.far, MemoryBlobService)
        far = memory_corrupter(blob_service.far)

        async def corrupt(digest: B3Digest, data: bytes) -> None:
            assert not key_path(tmp_path / "near", "chunks", digest).exists()
            await far(digest, data)

        return corrupt

    @pytest.fixture
    def temp_files(self, tmp_path: Path) -> TempFiles:
        return lambda: files_under(tmp_path / "near" / "tmp")


# -- combined: what lands near ------------------------------------------------------------


@pytest.fixture
def near() -> MemoryBlobService:
    return MemoryBlobService()


@pytest.fixture
def far() -> MemoryBlobService:
    return MemoryBlobService()


@pytest.fixture
def combined(near: MemoryBlobService, far: MemoryBlobService) -> CombinedBlobService:
    return CombinedBlobService(near, far)


async def open_reader(svc: BlobService, digest: B3Digest) -> BlobReader:
    reader = await svc.open_read(digest)
    assert reader is not None
    return reader


BLOBS = [
    pytest.param(EMPTY, id="EMPTY"),
    pytest.param(BLOB_A, id="BLOB_A"),
    pytest.param(HELLOWORLD, id="HELLOWORLD"),
    pytest.param(BLOB_B, id="BLOB_B"),
]


@pytest.mark.parametrize("data", BLOBS)
@pytest.mark.parametrize("how", ["read_all", "read-1", "blocks", "exact-then-eof", "service-read"])
async def test_full_read_fills_near(
    combined: CombinedBlobService, near: MemoryBlobService, far: MemoryBlobService, data: bytes, how: str
) -> None:
    digest = b3(data)
    far._blobs[digest] = data  # far only
    assert not await near.has(digest)
    if how == "service-read":
        assert await combined.read(digest) == data
    else:
        async with await open_reader(combined, digest) as reader:
            if how == "read_all":
                got = await reader.read_all()
            elif how == "read-1":
                got = await reader.read()
            elif how == "blocks":
                got = b"".join([b async for b in reader.iter_blocks(7777)])
            else:
                got = await read_exactly(reader, len(data))
                assert await reader.read(1) == b""
            assert got == data
    assert near._blobs[digest] == data  # identical bytes, near
    assert await near.read(digest) == data
    # the next read is served near: far may go away
    del far._blobs[digest]
    assert await combined.read(digest) == data


async def test_near_is_read_first(
    combined: CombinedBlobService, near: MemoryBlobService, far: MemoryBlobService
) -> None:
    digest = b3(HELLOWORLD)
    near._blobs[digest] = HELLOWORLD
    far._blobs[digest] = b"far must not be read"
    assert await combined.read(digest) == HELLOWORLD


@pytest.mark.parametrize(
    "steps",
    [
        pytest.param(["close"], id="close-unread"),
        pytest.param(["read:5", "close"], id="partial"),
        pytest.param(["read:0", "close"], id="read-zero"),
        pytest.param(["read:5", "seek:700", "rest", "close"], id="seek-forward"),
        pytest.param(["seek:10", "rest", "close"], id="seek-first"),
        pytest.param(["seek:10", "rest", "seek:0", "rest", "close"], id="seek-away-then-restart"),
        pytest.param(["read:100", "seek:0", "rest", "close"], id="seek-back"),
        pytest.param(["seek-end:-10", "rest", "close"], id="tail"),
    ],
)
async def test_partial_or_seeking_read_leaves_near_empty(
    combined: CombinedBlobService, near: MemoryBlobService, far: MemoryBlobService, steps: list[str]
) -> None:
    data = BLOB_B
    digest = await far.put(data)
    reader = await open_reader(combined, digest)
    for step in steps:
        op, _, arg = step.partition(":")
        if op == "read":
            assert await read_exactly(reader, int(arg)) == data[reader.tell() - int(arg) : reader.tell()]
        elif op == "seek":
            assert await reader.seek(int(arg)) == int(arg)
        elif op == "seek-end":
            assert await reader.seek(int(arg), io.SEEK_END) == len(data) + int(arg)
        elif op == "rest":
            start = reader.tell()
            assert await reader.read_all() == data[start:]
        else:
            await reader.close()
    assert near._blobs == {}
    assert not await near.has(digest)


@pytest.mark.parametrize(
    "steps",
    [
        pytest.param(["seek:0"], id="seek-to-start"),
        pytest.param(["read:10", "seek:10"], id="seek-to-where-it-is"),
        pytest.param(["seek:500", "seek:0"], id="seek-away-and-back-unread"),
        pytest.param(["read:10", "read:0", "seek-cur:0"], id="no-op-moves"),
    ],
)
async def test_seeks_that_keep_the_copy(
    combined: CombinedBlobService, near: MemoryBlobService, far: MemoryBlobService, steps: list[str]
) -> None:
    """Moves that leave the reader where the copy stands do not abandon it."""
    data = BLOB_B
    digest = await far.put(data)
    async with await open_reader(combined, digest) as reader:
        for step in steps:
            op, _, arg = step.partition(":")
            if op == "read":
                await reader.read(int(arg))
            elif op == "seek":
                await reader.seek(int(arg))
            else:
                await reader.seek(int(arg), io.SEEK_CUR)
        start = reader.tell()
        assert await reader.read_all() == data[start:]
    assert near._blobs.get(digest) == data


async def test_full_read_then_seek_keeps_the_copy(
    combined: CombinedBlobService, near: MemoryBlobService, far: MemoryBlobService
) -> None:
    digest = await far.put(HELLOWORLD)
    async with await open_reader(combined, digest) as reader:
        assert await reader.read_all() == HELLOWORLD
        assert await reader.seek(6) == 6
        assert await reader.read(3) == HELLOWORLD[6:9]
    assert near._blobs[digest] == HELLOWORLD


@pytest.mark.parametrize(
    ("data", "bad"),
    [
        pytest.param(HELLOWORLD, b"Hello World?", id="same-length"),
        pytest.param(HELLOWORLD, b"Hello", id="shorter"),
        pytest.param(HELLOWORLD, HELLOWORLD + b"!", id="longer"),
        pytest.param(HELLOWORLD, b"", id="empty"),
        pytest.param(EMPTY, b"x", id="not-empty"),
        pytest.param(BLOB_B, BLOB_B[:-1] + b"\xff", id="BLOB_B-last-byte"),
    ],
)
@pytest.mark.parametrize("how", ["read_all", "blocks", "service-read"])
async def test_corrupt_far_never_lands_near(
    combined: CombinedBlobService, near: MemoryBlobService, far: MemoryBlobService, data: bytes, bad: bytes, how: str
) -> None:
    digest = b3(data)
    far._blobs[digest] = bad

    async def consume() -> None:
        if how == "service-read":
            await combined.read(digest)
        else:
            async with await open_reader(combined, digest) as reader:
                async for _ in reader.iter_blocks(1000):
                    pass

    with pytest.raises(ChecksumMismatch):
        await consume()
    assert near._blobs == {}  # neither under the digest nor under the hash of the bad bytes
    # asking again fails again (nothing was cached)
    with pytest.raises(ChecksumMismatch):
        await combined.read(digest)
    assert near._blobs == {}


async def test_combined_writes_go_near_only(
    combined: CombinedBlobService, near: MemoryBlobService, far: MemoryBlobService
) -> None:
    d1 = await combined.put(HELLOWORLD)
    async with await combined.open_write() as writer:
        await writer.write(BLOB_B[:1000])
        await writer.write(BLOB_B[1000:])
        d2 = await writer.close()
    d3, d4 = await combined.put_many([BLOB_A, EMPTY])
    assert [d1, d2, d3, d4] == [b3(HELLOWORLD), b3(BLOB_B), b3(BLOB_A), b3(EMPTY)]
    assert near._blobs == {d1: HELLOWORLD, d2: BLOB_B, d3: BLOB_A, d4: EMPTY}
    assert far._blobs == {}


async def test_has_and_chunks_fall_back_to_far(
    combined: CombinedBlobService, near: MemoryBlobService, far: MemoryBlobService
) -> None:
    only_far = await far.put(HELLOWORLD)
    only_near = await near.put(BLOB_A)
    missing = b3(b"nowhere")
    assert await combined.has(only_far)
    assert await combined.chunks(only_far) == []
    assert await combined.has(only_near)
    assert await combined.chunks(only_near) == []
    assert not await combined.has(missing)
    assert await combined.chunks(missing) is None
    assert await combined.open_read(missing) is None
    assert await combined.read(missing) is None
    assert not await near.has(only_far)  # asking is not reading: nothing was copied


async def test_concurrent_readers_of_one_far_blob(
    combined: CombinedBlobService, near: MemoryBlobService, far: MemoryBlobService
) -> None:
    digest = await far.put(BLOB_B)
    r1 = await open_reader(combined, digest)
    r2 = await open_reader(combined, digest)
    assert await read_exactly(r1, 1000) == BLOB_B[:1000]
    assert await r2.read_all() == BLOB_B
    assert near._blobs[digest] == BLOB_B
    assert await r1.read_all() == BLOB_B[1000:]
    await r1.close()
    await r2.close()
    assert near._blobs == {digest: BLOB_B}


class _FailingWriter(BlobWriter):
    def __init__(self, fail_on: str) -> None:
        self.fail_on = fail_on
        self.aborted = False

    async def write(self, data: bytes) -> None:
        if self.fail_on == "write":
            raise StorageError("near is full")

    async def close(self) -> B3Digest:
        raise StorageError("near cannot commit")

    async def abort(self) -> None:
        self.aborted = True


class _FailingNear(MemoryBlobService):
    def __init__(self, fail_on: str) -> None:
        super().__init__()
        self.fail_on = fail_on
        self.writers: list[_FailingWriter] = []

    async def open_write(self, expected_size: int | None = None) -> BlobWriter:
        writer = _FailingWriter(self.fail_on)
        self.writers.append(writer)
        return writer


@pytest.mark.parametrize("fail_on", ["write", "close"])
async def test_failing_near_does_not_fail_the_read(far: MemoryBlobService, fail_on: str) -> None:
    near = _FailingNear(fail_on)
    combined = CombinedBlobService(near, far)
    digest = await far.put(BLOB_B)
    assert await combined.read(digest) == BLOB_B
    assert near._blobs == {}
    assert len(near.writers) == 1
    if fail_on == "write":
        assert near.writers[0].aborted


async def test_far_missing(combined: CombinedBlobService, near: MemoryBlobService) -> None:
    assert await combined.open_read(b3(HELLOWORLD)) is None
    assert near._blobs == {}


class _ClosingSpy(MemoryBlobService):
    def __init__(self) -> None:
        super().__init__()
        self.closed = 0

    async def close(self) -> None:
        self.closed += 1


@pytest.mark.parametrize("close_inner", [True, False])
async def test_combined_close(close_inner: bool) -> None:
    near, far = _ClosingSpy(), _ClosingSpy()
    await CombinedBlobService(near, far, close_inner=close_inner).close()
    assert (near.closed, far.closed) == ((1, 1) if close_inner else (0, 0))


# -- combined: big blobs through the streaming writer of an object store ------------------


@pytest.fixture
def objects(tmp_path: Path) -> Path:
    return tmp_path / "near"


@pytest_asyncio.fixture
async def disk_combined(objects: Path) -> AsyncIterator[CombinedBlobService]:
    svc = CombinedBlobService(LocalBlobService(objects), MemoryBlobService())
    yield svc
    await svc.close()


async def test_large_blob_fills_object_store(disk_combined: CombinedBlobService, objects: Path) -> None:
    far = disk_combined.far
    digest = await far.put(LARGE)
    assert digest == b3(LARGE)
    async with await open_reader(disk_combined, digest) as reader:
        got = bytearray()
        async for block in reader.iter_blocks(300_000):
            got += block
            assert files_under(objects / "blobs") == files_under(objects / "chunks") == []  # nothing before the end
    assert bytes(got) == LARGE
    # on disk, in the snix layout: FastCDC chunks (zstd) that add up to the blob, and its index
    chunks = await disk_combined.near.chunks(digest)
    assert chunks is not None and len(chunks) >= 2
    dctx = zstandard.ZstdDecompressor()
    joined = b"".join(
        dctx.decompressobj().decompress(key_path(objects, "chunks", c.digest).read_bytes()) for c in chunks
    )
    assert joined == LARGE
    assert files_under(objects / "tmp") == []
    # and the near service serves it by itself
    assert await disk_combined.near.read(digest) == LARGE


@pytest.mark.parametrize("stop", ["partial", "seek", "corrupt"])
async def test_large_blob_abandoned_copy_leaves_nothing(
    disk_combined: CombinedBlobService, objects: Path, stop: str
) -> None:
    far = disk_combined.far
    assert isinstance(far, MemoryBlobService)
    digest = await far.put(LARGE)
    if stop == "corrupt":
        far._blobs[digest] = LARGE[:-1] + bytes([LARGE[-1] ^ 1])
        with pytest.raises(ChecksumMismatch):
            await disk_combined.read(digest)
    else:
        async with await open_reader(disk_combined, digest) as reader:
            assert await read_exactly(reader, 3 << 20) == LARGE[: 3 << 20]  # past the spill threshold
            if stop == "seek":
                await reader.seek(1)
                assert await reader.read_all() == LARGE[1:]
    assert files_under(objects / "chunks") == []
    assert files_under(objects / "blobs") == []
    assert files_under(objects / "tmp") == []
    assert not await disk_combined.near.has(digest)


async def test_large_blob_memory_near(
    combined: CombinedBlobService, near: MemoryBlobService, far: MemoryBlobService
) -> None:
    digest = await far.put(LARGE)
    async with await open_reader(combined, digest) as reader:
        assert b"".join([b async for b in reader.iter_blocks(1 << 16)]) == LARGE
    assert near._blobs[digest] == LARGE


# -- the DirectoryService contract through cache, and lru on its own ------------------------


class TestCacheMemory(DirectoryServiceSuite):
    covers = ("cache",)

    @pytest_asyncio.fixture
    async def directory_service(self) -> AsyncIterator[DirectoryService]:
        svc = CacheDirectoryService(MemoryDirectoryService(SizeRule.TVIX), MemoryDirectoryService(SizeRule.TVIX))
        yield svc
        assert isinstance(svc.far, MemoryDirectoryService)
        await svc.close()

    @pytest.fixture
    def store_raw(self, directory_service: DirectoryService) -> RawStore:
        assert isinstance(directory_service, CacheDirectoryService)
        assert isinstance(directory_service.near, MemoryDirectoryService)
        assert isinstance(directory_service.far, MemoryDirectoryService)
        return memory_raw_store(directory_service.near, directory_service.far)


class TestCacheLru(DirectoryServiceSuite):
    covers = ("cache",)

    @pytest_asyncio.fixture
    async def directory_service(self) -> AsyncIterator[DirectoryService]:
        svc = CacheDirectoryService(LruDirectoryService(1000, SizeRule.TVIX), MemoryDirectoryService(SizeRule.TVIX))
        yield svc
        await svc.close()

    @pytest.fixture
    def store_raw(self, directory_service: DirectoryService) -> RawStore:
        assert isinstance(directory_service, CacheDirectoryService)
        assert isinstance(directory_service.near, LruDirectoryService)
        assert isinstance(directory_service.far, MemoryDirectoryService)
        return memory_raw_store(directory_service.near, directory_service.far)


class TestCacheFillFromFar(DirectoryServiceSuite):
    """Writes go far, so every read fetches, validates and stores the closure near first."""

    covers = ("cache",)

    @pytest_asyncio.fixture
    async def directory_service(self) -> AsyncIterator[DirectoryService]:
        svc = WritesFarDirectoryService(MemoryDirectoryService(SizeRule.TVIX), MemoryDirectoryService(SizeRule.TVIX))
        yield svc
        # whatever reached near is exactly what far has
        assert isinstance(svc.near, MemoryDirectoryService)
        assert isinstance(svc.far, MemoryDirectoryService)
        for digest, raw in svc.near._data.items():
            assert b3(raw) == digest
            assert svc.far._data[digest] == raw
        await svc.close()

    @pytest.fixture
    def store_raw(self, directory_service: DirectoryService) -> RawStore:
        assert isinstance(directory_service, CacheDirectoryService)
        assert isinstance(directory_service.far, MemoryDirectoryService)
        return memory_raw_store(directory_service.far)


class TestCacheFromUrl(DirectoryServiceSuite):
    covers = ("cache",)

    @pytest_asyncio.fixture
    async def directory_service(self) -> AsyncIterator[DirectoryService]:
        svc = await directory_service_from_url("cache://?near=lru%3A%2F%2F%3Fcapacity%3D1000&far=sqlite%3A%2F%2F")
        assert isinstance(svc, CacheDirectoryService)
        yield svc
        await svc.close()

    @pytest.fixture
    def store_raw(self, directory_service: DirectoryService) -> RawStore:
        """The raw bytes land in near's LRU and in far's SQLite table (through far's own connection)."""
        assert isinstance(directory_service, CacheDirectoryService)
        near, far = directory_service.near, directory_service.far
        assert isinstance(near, LruDirectoryService)
        assert isinstance(far, SqliteDirectoryService)

        async def store(digest: B3Digest, raw: bytes) -> None:
            def write() -> None:
                far._db.conn.execute("INSERT OR REPLACE INTO directories (digest, data) VALUES (?, ?)", (digest, raw))

            await far._db.run(write)
            near._data[digest] = raw

        return store


class TestLru(DirectoryServiceSuite):
    covers = ("lru",)

    @pytest_asyncio.fixture
    async def directory_service(self) -> AsyncIterator[DirectoryService]:
        svc = LruDirectoryService(1000, SizeRule.TVIX)
        yield svc
        await svc.close()

    @pytest.fixture
    def store_raw(self, directory_service: DirectoryService) -> RawStore:
        assert isinstance(directory_service, LruDirectoryService)
        return memory_raw_store(directory_service)


# -- cache: closures from far ----------------------------------------------------------------


class CountingDirectoryService(MemoryDirectoryService):
    """Counts closure fetches (each fetch from far is one ``get_recursive`` or ``get``)."""

    def __init__(self) -> None:
        super().__init__(SizeRule.TVIX)
        self.recursive_calls = 0
        self.get_calls = 0

    async def get(self, digest: B3Digest) -> Directory | None:
        self.get_calls += 1
        return await super().get(digest)

    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        self.recursive_calls += 1
        async for d in super().get_recursive(root):
            yield d


@pytest.fixture
def dnear() -> MemoryDirectoryService:
    return MemoryDirectoryService(SizeRule.TVIX)


@pytest.fixture
def dfar() -> CountingDirectoryService:
    return CountingDirectoryService()


@pytest.fixture
def cache(dnear: MemoryDirectoryService, dfar: CountingDirectoryService) -> CacheDirectoryService:
    return CacheDirectoryService(dnear, dfar)


async def upload(svc: DirectoryService, directories: Sequence[Directory]) -> B3Digest:
    putter = svc.put_multiple_start()
    for d in directories:
        await putter.put(d)
    return await putter.close()


async def collect(svc: DirectoryService, root: B3Digest) -> list[B3Digest]:
    return [d.digest async for d in svc.get_recursive(root)]


def raw_insert(svc: MemoryDirectoryService, *directories: Directory) -> None:
    """Store directories bypassing every closure check."""
    for d in directories:
        svc._data[b3(d.encode())] = d.encode()


def assert_holds(svc: MemoryDirectoryService | LruDirectoryService, names: list[str]) -> None:
    """``svc`` holds exactly the reference directories ``names``, each as bytes hashing to its key."""
    assert set(svc._data) == {ref(n) for n in names}
    for digest, raw in svc._data.items():
        assert b3(raw) == digest


CLOSURES = [
    pytest.param([DIRECTORY_WITH_KEEP, DIRECTORY_COMPLICATED], ["COMPLICATED", "WITH_KEEP"], id="COMPLICATED"),
    pytest.param([DIRECTORY_A, DIRECTORY_C], ["C", "A"], id="C-same-child-twice"),
    # D -> A and D -> B -> A: A is reachable at two depths
    pytest.param([DIRECTORY_A, DIRECTORY_B, DIRECTORY_D], ["D", "A", "B"], id="D-diamond"),
    pytest.param([DIRECTORY_A], ["A"], id="A-single"),
]


@pytest.mark.parametrize(("directories", "names"), CLOSURES)
async def test_closure_from_far_fills_near(
    cache: CacheDirectoryService,
    dnear: MemoryDirectoryService,
    dfar: CountingDirectoryService,
    directories: list[Directory],
    names: list[str],
) -> None:
    root = ref(names[0])
    assert await upload(dfar, directories) == root
    got = await collect(cache, root)
    assert got[0] == root
    assert sorted(got) == sorted(ref(n) for n in names)
    assert_holds(dnear, names)
    # now served near, without asking far
    calls = dfar.recursive_calls
    assert await collect(cache, root) == got
    assert dfar.recursive_calls == calls
    # and near holds a complete closure of its own
    assert sorted(await collect(dnear, root)) == sorted(got)


@pytest.mark.parametrize(("directories", "names"), CLOSURES)
async def test_get_of_root_fills_the_closure(
    cache: CacheDirectoryService,
    dnear: MemoryDirectoryService,
    dfar: CountingDirectoryService,
    directories: list[Directory],
    names: list[str],
) -> None:
    root = ref(names[0])
    await upload(dfar, directories)
    got = await cache.get(root)
    assert got is not None
    assert b3(got.encode()) == root
    assert_holds(dnear, names)
    # a sub-directory is now near, too
    calls = dfar.recursive_calls
    for name in names:
        assert await cache.get(ref(name)) is not None
    assert dfar.recursive_calls == calls


async def test_far_lacks(cache: CacheDirectoryService, dnear: MemoryDirectoryService) -> None:
    assert await cache.get(ref("D")) is None
    assert await collect(cache, ref("D")) == []
    assert dnear._data == {}


async def test_near_complete_closure_skips_far(
    cache: CacheDirectoryService, dnear: MemoryDirectoryService, dfar: CountingDirectoryService
) -> None:
    await upload(dnear, [DIRECTORY_A, DIRECTORY_B, DIRECTORY_D])
    assert sorted(await collect(cache, ref("D"))) == sorted([ref("D"), ref("A"), ref("B")])
    assert await cache.get(ref("B")) is not None
    assert (dfar.recursive_calls, dfar.get_calls) == (0, 0)


async def test_near_partial_closure_is_refetched(
    cache: CacheDirectoryService, dnear: MemoryDirectoryService, dfar: CountingDirectoryService
) -> None:
    raw_insert(dnear, DIRECTORY_D, DIRECTORY_B)  # A is missing near
    await upload(dfar, [DIRECTORY_A, DIRECTORY_B, DIRECTORY_D])
    assert sorted(await collect(cache, ref("D"))) == sorted([ref("D"), ref("A"), ref("B")])
    assert dfar.recursive_calls == 1
    assert_holds(dnear, ["D", "A", "B"])


async def test_cache_writes_go_near_only(
    cache: CacheDirectoryService, dnear: MemoryDirectoryService, dfar: CountingDirectoryService
) -> None:
    assert await cache.put(DIRECTORY_WITH_KEEP) == ref("WITH_KEEP")
    assert await upload(cache, [DIRECTORY_A, DIRECTORY_B, DIRECTORY_D]) == ref("D")
    assert_holds(dnear, ["WITH_KEEP", "A", "B", "D"])
    assert dfar._data == {}


def _broken_far_cases() -> list[object]:
    wrong_size = Directory({b"x": DirectoryNode(ref("B"), DIRECTORY_B.size_under(SizeRule.TVIX) + 1)})
    top = Directory({b"x": DirectoryNode(ref("B"), DIRECTORY_B.size_under(SizeRule.TVIX))})
    return [
        pytest.param([DIRECTORY_D], ref("D"), StorageError, id="missing-children"),
        pytest.param([DIRECTORY_D, DIRECTORY_B], ref("D"), StorageError, id="missing-grandchild"),
        pytest.param([top], b3(top.encode()), StorageError, id="missing-child-of-new-root"),
        pytest.param([wrong_size, DIRECTORY_B, DIRECTORY_A], b3(wrong_size.encode()), NixcasError, id="wrong-size"),
    ]


@pytest.mark.parametrize(("stored", "root", "error"), _broken_far_cases())
@pytest.mark.parametrize("how", ["get_recursive", "get"])
async def test_broken_closure_from_far_is_refused(
    cache: CacheDirectoryService,
    dnear: MemoryDirectoryService,
    dfar: CountingDirectoryService,
    stored: list[Directory],
    root: B3Digest,
    error: type[Exception],
    how: str,
) -> None:
    raw_insert(dfar, *stored)

    async def fetch() -> None:
        if how == "get":
            await cache.get(root)
        else:
            await collect(cache, root)

    with pytest.raises(error):
        await fetch()
    assert dnear._data == {}


async def test_corrupt_far_is_refused(
    cache: CacheDirectoryService, dnear: MemoryDirectoryService, dfar: CountingDirectoryService
) -> None:
    await upload(dfar, [DIRECTORY_A, DIRECTORY_B, DIRECTORY_D])
    dfar._data[ref("B")] = DIRECTORY_WITH_KEEP.encode()  # valid Directory, wrong digest
    with pytest.raises(ChecksumMismatch):
        await collect(cache, ref("D"))
    with pytest.raises(ChecksumMismatch):
        await cache.get(ref("D"))
    assert dnear._data == {}


class _LyingFar(MemoryDirectoryService):
    """A far service whose ``get_recursive`` misbehaves in a way the base class would not."""

    def __init__(self, mode: str) -> None:
        super().__init__(SizeRule.TVIX)
        self.mode = mode

    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        n = 0
        async for d in super().get_recursive(root):
            n += 1
            if self.mode == "truncated" and n > 1:
                return
            yield d
            if self.mode == "extra" and n == 1:
                yield DIRECTORY_WITH_KEEP  # not announced by anything received


@pytest.mark.parametrize("mode", ["truncated", "extra"])
async def test_far_sending_a_wrong_closure(dnear: MemoryDirectoryService, mode: str) -> None:
    far = _LyingFar(mode)
    await upload(far, [DIRECTORY_A, DIRECTORY_B, DIRECTORY_D])
    cache = CacheDirectoryService(dnear, far)
    with pytest.raises(StorageError):
        await collect(cache, ref("D"))
    with pytest.raises(StorageError):
        await cache.get(ref("D"))
    assert dnear._data == {}


async def test_far_sending_another_root(dnear: MemoryDirectoryService) -> None:
    class OtherRoot(MemoryDirectoryService):
        async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
            yield DIRECTORY_WITH_KEEP

    cache = CacheDirectoryService(dnear, OtherRoot())
    with pytest.raises(StorageError):
        await collect(cache, ref("D"))
    assert dnear._data == {}


async def test_lru_near_evicting_part_of_a_closure(dfar: CountingDirectoryService) -> None:
    lru = LruDirectoryService(2, SizeRule.TVIX)
    cache = CacheDirectoryService(lru, dfar)
    await upload(dfar, [DIRECTORY_A, DIRECTORY_B, DIRECTORY_D])
    expected = sorted([ref("D"), ref("A"), ref("B")])
    for round_ in range(1, 4):
        got = await collect(cache, ref("D"))
        assert got[0] == ref("D")
        assert sorted(got) == expected
        assert len(lru) == 2  # never more than its capacity
        assert dfar.recursive_calls == round_  # near never holds it all: far every time
    for digest, raw in lru._data.items():
        assert b3(raw) == digest


async def test_lru_near_large_enough_keeps_the_closure(dfar: CountingDirectoryService) -> None:
    lru = LruDirectoryService(3, SizeRule.TVIX)
    cache = CacheDirectoryService(lru, dfar)
    await upload(dfar, [DIRECTORY_A, DIRECTORY_B, DIRECTORY_D])
    first = await collect(cache, ref("D"))
    assert await collect(cache, ref("D")) == first
    assert dfar.recursive_calls == 1
    # evict part of it by using other directories: the cache quietly goes to far again
    await cache.put(numbered(0))
    await cache.put(numbered(1))
    assert not {ref("D"), ref("A"), ref("B")} <= set(lru._data)
    assert sorted(await collect(cache, ref("D"))) == sorted(first)
    assert dfar.recursive_calls == 2


@pytest.mark.parametrize("close_inner", [True, False])
async def test_cache_close(close_inner: bool) -> None:
    closed: list[str] = []

    class Spy(MemoryDirectoryService):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        async def close(self) -> None:
            closed.append(self.name)

    await CacheDirectoryService(Spy("near"), Spy("far"), close_inner=close_inner).close()
    assert closed == (["near", "far"] if close_inner else [])


# -- lru on its own ------------------------------------------------------------------------------


def numbered(i: int) -> Directory:
    """Distinct directories: one file each, named by ``i``."""
    return Directory({f"f{i}".encode(): FileNode(EMPTY_DIGEST, 0, executable=False)})


async def test_lru_evicts_least_recently_used() -> None:
    lru = LruDirectoryService(3, SizeRule.TVIX)
    d = [numbered(i) for i in range(5)]
    keys = [b3(x.encode()) for x in d]
    for x in d[:3]:
        await lru.put(x)
    assert list(lru._data) == keys[:3]
    assert await lru.get(keys[0]) is not None  # refreshes d0
    await lru.put(d[3])  # evicts d1, the least recently used
    assert list(lru._data) == [keys[2], keys[0], keys[3]]
    assert await lru.get(keys[1]) is None
    await lru.put(d[2])  # putting again refreshes, too
    await lru.put(d[4])  # evicts d0
    assert list(lru._data) == [keys[3], keys[2], keys[4]]
    assert await lru.get(keys[0]) is None
    assert len(lru) == 3


async def test_lru_get_missing_changes_nothing() -> None:
    lru = LruDirectoryService(2, SizeRule.TVIX)
    await lru.put(numbered(0))
    await lru.put(numbered(1))
    before = list(lru._data)
    assert await lru.get(b3(b"missing")) is None
    assert list(lru._data) == before


async def test_lru_capacity_bound() -> None:
    lru = LruDirectoryService(4, SizeRule.TVIX)
    d = [numbered(i) for i in range(10)]
    for i, x in enumerate(d):
        await lru.put(x)
        assert len(lru) == min(i + 1, 4)
    assert set(lru._data) == {b3(x.encode()) for x in d[-4:]}
    for x in d[-4:]:
        got = await lru.get(b3(x.encode()))
        assert got is not None
        assert got.entries == x.entries


async def test_lru_capacity_one() -> None:
    lru = LruDirectoryService(1, SizeRule.TVIX)
    await lru.put(numbered(0))
    await lru.put(numbered(1))
    assert list(lru._data) == [b3(numbered(1).encode())]


async def test_lru_closure_larger_than_capacity() -> None:
    lru = LruDirectoryService(2, SizeRule.TVIX)
    assert await upload(lru, [DIRECTORY_A, DIRECTORY_B, DIRECTORY_D]) == ref("D")
    assert len(lru) == 2
    assert ref("D") in lru._data  # the root is committed last, so it stays
    with pytest.raises(StorageError):  # the closure is no longer complete
        await collect(lru, ref("D"))


async def test_lru_get_recursive_refreshes() -> None:
    lru = LruDirectoryService(3, SizeRule.TVIX)
    await upload(lru, [DIRECTORY_A, DIRECTORY_B])
    await lru.put(DIRECTORY_WITH_KEEP)
    assert sorted(await collect(lru, ref("B"))) == sorted([ref("B"), ref("A")])
    await lru.put(numbered(9))  # evicts WITH_KEEP, not A or B
    assert ref("WITH_KEEP") not in lru._data
    assert {ref("A"), ref("B")} <= set(lru._data)


@pytest.mark.parametrize("capacity", [0, -1])
def test_lru_capacity_must_be_positive(capacity: int) -> None:
    with pytest.raises(ConfigurationError):
        LruDirectoryService(capacity, SizeRule.TVIX)


async def test_combined_read_many_fills_near_with_verified_blobs() -> None:
    near, far = MemoryBlobService(), MemoryBlobService()
    svc = CombinedBlobService(near, far)
    in_near = await near.put(b"near one")
    in_far = [await far.put(b"far %d" % i) for i in range(5)]
    got = await svc.read_many({d: 100 for d in [in_near, *in_far]})
    assert got[in_near] == b"near one"
    assert [got[d] for d in in_far] == [b"far %d" % i for i in range(5)]
    assert all([await near.has(d) for d in in_far])  # kept near
    bad = await far.put(b"to be corrupted")
    far._blobs[bad] = b"corrupted!"
    with pytest.raises(ChecksumMismatch):
        await svc.read_many({bad: 100})
    assert not await near.has(bad)

"""The BlobService contract, as a pytest suite every backend reuses.

Usage in a backend's test module::

    class TestMyBlobService(BlobServiceSuite):
        @pytest_asyncio.fixture
        async def blob_service(self) -> AsyncIterator[BlobService]:
            svc = await blob_service_from_url("my://...")
            yield svc
            await svc.close()

        # optional raw hooks, see below
        @pytest.fixture
        def corrupt_blob(self, blob_service: BlobService) -> BlobCorrupter: ...

        @pytest.fixture
        def temp_files(self, blob_service: BlobService) -> TempFiles: ...

Expected values are computed with the ``blake3`` package directly, never
through the code under test.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Awaitable, Callable, Sequence
from typing import ClassVar

import blake3
import pytest

from nixcas.castore.blob.base import BlobReader, BlobService
from nixcas.castore.digest import B3Digest
from nixcas.errors import ChecksumMismatch, NixcasError, ValidationError
from nixcas.testing.fixtures import BLOB_A, BLOB_B, EMPTY, HELLOWORLD
from nixcas.testing.matrix import check_covers

__all__ = ["BlobCorrupter", "BlobServiceSuite", "Boom", "TempFiles", "read_exactly", "split", "write_parts"]

BlobCorrupter = Callable[[B3Digest, bytes], Awaitable[None]]
"""Replace the bytes stored for a digest with other content, bypassing the service."""

TempFiles = Callable[[], list[str]]
"""List the backend's leftover temporary files (``[]`` for backends without any)."""

# A blob large enough to leave any in-memory write buffer (the local backend
# spills to a temp file above 1 MiB) and to need several reads.
LARGE_SIZE = 3 * (1 << 20) + 12345
LARGE = blake3.blake3(b"nixcas LARGE").digest(length=LARGE_SIZE)  # deterministic, incompressible


def b3(data: bytes) -> B3Digest:
    """Independent digest computation (the ``blake3`` package, not nixcas)."""
    return B3Digest(blake3.blake3(data).digest())


def split(data: bytes, parts: int) -> list[bytes]:
    """``data`` in ``parts`` pieces of uneven sizes (some may be empty)."""
    if not data:
        return [b""] * parts
    cuts = sorted({0, len(data), *(len(data) * i * i // (parts * parts) for i in range(1, parts))})
    return [data[a:b] for a, b in itertools.pairwise(cuts)]


async def write_parts(svc: BlobService, expected_size: int | None, parts: Sequence[bytes]) -> B3Digest:
    """Write ``parts`` through one writer (aborted on failure) and close it."""
    async with await svc.open_write(expected_size) as writer:
        for part in parts:
            await writer.write(part)
        return await writer.close()


async def write_parts_raising(svc: BlobService, expected_size: int | None, parts: Sequence[bytes]) -> None:
    """Write ``parts`` through one writer, then raise :class:`Boom` inside ``async with``."""
    async with await svc.open_write(expected_size) as writer:
        for part in parts:
            await writer.write(part)
        raise Boom


class Boom(Exception):
    """Raised by tests to leave a context manager abnormally."""


async def read_exactly(reader: BlobReader, n: int) -> bytes:
    """Read until ``n`` bytes or EOF (readers may return short reads)."""
    out = bytearray()
    while len(out) < n:
        data = await reader.read(n - len(out))
        if not data:
            break
        out += data
    return bytes(out)


BLOBS = [
    pytest.param(EMPTY, id="EMPTY"),
    pytest.param(BLOB_A, id="BLOB_A"),
    pytest.param(HELLOWORLD, id="HELLOWORLD"),
    pytest.param(BLOB_B, id="BLOB_B"),
]


CORRUPTIONS = [
    pytest.param(HELLOWORLD, b"Hello World?", id="same-length"),
    pytest.param(HELLOWORLD, b"Hello", id="shorter"),
    pytest.param(BLOB_A, b"\x00\x01\x02", id="longer"),
    pytest.param(BLOB_B, BLOB_B[:-1] + b"\xff", id="BLOB_B-last-byte"),
]
"""(content, what the store holds instead) pairs for the verify-on-read tests."""


class BlobServiceSuite:
    """Contract tests; a subclass provides the ``blob_service`` fixture."""

    covers: ClassVar[tuple[str, ...]] = ()
    """The tags of :data:`nixcas.registry.BLOB_SERVICES` this subclass runs (checked before every test)."""

    @pytest.fixture(autouse=True)
    def _runs_the_covered_backends(self, blob_service: BlobService) -> None:
        check_covers("blobservices", self.covers, blob_service)

    corruption_error: ClassVar[type[NixcasError]] = ChecksumMismatch
    """What reading corrupted stored bytes raises (its message says "checksum mismatch").  Through a
    daemon either side may notice first: the client's own check, or the server's ``DATA_LOSS``."""

    chunks_large_blobs = True
    """Whether the backend may split blobs (``chunks()`` then lists ≥ 2 chunks adding up to the blob)."""

    def raises_corruption(self, also: str = "") -> pytest.RaisesExc[NixcasError]:
        """``pytest.raises`` for :attr:`corruption_error` (other than ChecksumMismatch: saying "checksum mismatch")."""
        if self.corruption_error is ChecksumMismatch:
            return pytest.raises(ChecksumMismatch, match=also or None)
        return pytest.raises(self.corruption_error, match=f"{also}.*checksum mismatch" if also else "checksum mismatch")

    # -- hooks ---------------------------------------------------------------------

    @pytest.fixture
    def corrupt_blob(self) -> BlobCorrupter:
        pytest.skip("this backend provides no raw corruption hook")

    @pytest.fixture
    def temp_files(self) -> TempFiles:
        return list

    # -- helpers -------------------------------------------------------------------

    async def check_content(self, svc: BlobService, digest: B3Digest, data: bytes) -> None:
        assert await svc.has(digest)
        chunks = await svc.chunks(digest)
        assert chunks is not None
        if self.chunks_large_blobs and chunks:
            assert len(chunks) >= 2
            assert sum(c.size for c in chunks) == len(data)
        else:
            assert chunks == []
        reader = await svc.open_read(digest)
        assert reader is not None
        async with reader:
            assert reader.tell() == 0
            assert await reader.read_all() == data
            assert await reader.read(1) == b""
            assert await reader.read() == b""
        assert await svc.read(digest) == data

    async def check_absent(self, svc: BlobService, digest: B3Digest) -> None:
        assert not await svc.has(digest)
        assert await svc.chunks(digest) is None
        assert await svc.open_read(digest) is None
        assert await svc.read(digest) is None

    # -- missing -------------------------------------------------------------------

    @pytest.mark.parametrize("data", BLOBS)
    async def test_missing(self, blob_service: BlobService, data: bytes) -> None:
        await self.check_absent(blob_service, b3(data))

    # -- writing and reading -----------------------------------------------------

    @pytest.mark.parametrize("data", BLOBS)
    @pytest.mark.parametrize("parts", [1, 4])
    @pytest.mark.parametrize("declare_size", [True, False])
    async def test_open_write(self, blob_service: BlobService, data: bytes, parts: int, declare_size: bool) -> None:
        expected = b3(data)
        writer = await blob_service.open_write(len(data) if declare_size else None)
        for part in split(data, parts):
            await writer.write(part)
        assert not await blob_service.has(expected)  # not visible before close
        digest = await writer.close()
        assert digest == expected
        assert isinstance(digest, B3Digest)
        await self.check_content(blob_service, digest, data)

    async def test_open_write_nothing_written(self, blob_service: BlobService) -> None:
        writer = await blob_service.open_write()
        digest = await writer.close()
        assert digest.hex() == blake3.blake3(b"").hexdigest()
        await self.check_content(blob_service, digest, b"")

    @pytest.mark.parametrize("data", BLOBS)
    async def test_put(self, blob_service: BlobService, data: bytes) -> None:
        digest = await blob_service.put(data)
        assert digest == b3(data)
        await self.check_content(blob_service, digest, data)
        # idempotent
        assert await blob_service.put(data) == digest
        await self.check_content(blob_service, digest, data)

    async def test_put_many(self, blob_service: BlobService) -> None:
        blobs = [BLOB_A, HELLOWORLD, EMPTY, BLOB_A, BLOB_B, b"x" * 1000]
        digests = await blob_service.put_many(blobs)
        assert digests == [b3(b) for b in blobs]
        for data, digest in zip(blobs, digests, strict=True):
            await self.check_content(blob_service, digest, data)
        assert await blob_service.put_many([]) == []

    async def test_sizes(self, blob_service: BlobService) -> None:
        """``size`` / ``sizes``: the stored length, ``None`` when missing (checked before serving a NAR)."""
        blobs = [BLOB_A, HELLOWORLD, EMPTY, b"x" * 100_000]
        digests = await blob_service.put_many(blobs)
        missing = b3(b"never stored")
        assert [await blob_service.size(d) for d in digests] == [len(b) for b in blobs]
        assert await blob_service.size(missing) is None
        assert await blob_service.sizes([*digests, missing]) == [*(len(b) for b in blobs), None]

    async def test_large_blob(self, blob_service: BlobService) -> None:
        writer = await blob_service.open_write(LARGE_SIZE)
        for i in range(0, LARGE_SIZE, 200_000):
            await writer.write(LARGE[i : i + 200_000])
        digest = await writer.close()
        assert digest == b3(LARGE)
        assert await blob_service.has(digest)
        reader = await blob_service.open_read(digest)
        assert reader is not None
        async with reader:
            assert await reader.read_all() == LARGE
            assert await reader.seek(-10, io.SEEK_END) == LARGE_SIZE - 10
            assert await read_exactly(reader, 100) == LARGE[-10:]
            assert await reader.seek(1_500_000) == 1_500_000
            assert await read_exactly(reader, 1000) == LARGE[1_500_000:1_501_000]
            assert await reader.seek(7) == 7
            assert await read_exactly(reader, 3) == LARGE[7:10]

    async def test_concurrent_writers_same_content(self, blob_service: BlobService) -> None:
        w1 = await blob_service.open_write()
        w2 = await blob_service.open_write()
        await w1.write(HELLOWORLD[:5])
        await w2.write(HELLOWORLD[:3])
        await w1.write(HELLOWORLD[5:])
        await w2.write(HELLOWORLD[3:])
        assert await w1.close() == await w2.close() == b3(HELLOWORLD)
        await self.check_content(blob_service, b3(HELLOWORLD), HELLOWORLD)

    # -- seeking -------------------------------------------------------------------

    async def test_seek(self, blob_service: BlobService) -> None:
        data = BLOB_B
        size = len(data)
        digest = await blob_service.put(data)
        reader = await blob_service.open_read(digest)
        assert reader is not None
        async with reader:
            assert await read_exactly(reader, 10) == data[:10]
            assert reader.tell() == 10
            # relative forward
            assert await reader.seek(100, io.SEEK_CUR) == 110
            assert reader.tell() == 110
            assert await read_exactly(reader, 300) == data[110:410]
            # absolute, far into the blob
            assert await reader.seek(700_000, io.SEEK_SET) == 700_000
            assert await read_exactly(reader, 4096) == data[700_000:704_096]
            # backwards, absolute and relative
            assert await reader.seek(5) == 5
            assert await read_exactly(reader, 3) == data[5:8]
            assert await reader.seek(-4, io.SEEK_CUR) == 4
            assert await read_exactly(reader, 2) == data[4:6]
            # relative to the end
            assert await reader.seek(0, io.SEEK_END) == size
            assert await reader.read(1) == b""
            assert await reader.read() == b""
            assert await reader.seek(-300, io.SEEK_END) == size - 300
            assert await read_exactly(reader, 100) == data[-300:-200]
            assert await reader.read() == data[-200:]
            assert reader.tell() == size
            assert await reader.read(10) == b""
            # back to the start: the whole blob again
            assert await reader.seek(0) == 0
            assert await reader.read_all() == data

    async def test_seek_negative_rejected(self, blob_service: BlobService) -> None:
        digest = await blob_service.put(HELLOWORLD)
        reader = await blob_service.open_read(digest)
        assert reader is not None
        async with reader:
            with pytest.raises(ValidationError):
                await reader.seek(-1)
            with pytest.raises(ValidationError):
                await reader.seek(-13, io.SEEK_END)

    async def test_read_zero(self, blob_service: BlobService) -> None:
        digest = await blob_service.put(BLOB_A)
        reader = await blob_service.open_read(digest)
        assert reader is not None
        async with reader:
            assert await reader.read(0) == b""
            assert await reader.read(1) == BLOB_A[:1]
            assert await reader.read(0) == b""
            assert await read_exactly(reader, 5) == BLOB_A[1:]

    # -- verify-on-read ----------------------------------------------------------

    @pytest.mark.parametrize(("data", "bad"), CORRUPTIONS)
    async def test_verify_on_read(
        self, blob_service: BlobService, corrupt_blob: BlobCorrupter, data: bytes, bad: bytes
    ) -> None:
        digest = await blob_service.put(data)
        await corrupt_blob(digest, bad)
        if self.corruption_error is ChecksumMismatch:  # a service checking its own bytes does so as they stream
            reader = await blob_service.open_read(digest)
            assert reader is not None
            async with reader:
                with self.raises_corruption():
                    await reader.read_all()
        else:  # a client's server may check before sending anything
            with self.raises_corruption():
                reader = await blob_service.open_read(digest)
                assert reader is not None
                async with reader:
                    await reader.read_all()
        with self.raises_corruption():
            await blob_service.read(digest)

    # -- read_many -------------------------------------------------------------------

    async def test_read_many(self, blob_service: BlobService) -> None:
        present = [EMPTY, BLOB_A, HELLOWORLD, BLOB_B, b"x" * 1000]
        await blob_service.put_many(present)
        missing = [b"not stored", b"also missing"]
        wanted = {b3(data): len(data) for data in present + missing}
        found = await blob_service.read_many(wanted)
        assert found == {b3(data): data for data in present}
        assert all(type(data) is bytes for data in found.values())
        # a roomier maximum changes nothing; parallel=1 reads one blob after another
        roomy = {digest: size + 100 for digest, size in wanted.items()}
        assert await blob_service.read_many(roomy, parallel=1) == found
        assert await blob_service.read_many({}) == {}

    async def test_read_many_empty_blob(self, blob_service: BlobService) -> None:
        digest = await blob_service.put(EMPTY)
        assert await blob_service.read_many({digest: 0}) == {digest: b""}
        assert await blob_service.read_many({digest: 5}) == {digest: b""}

    async def test_read_many_only_missing(self, blob_service: BlobService) -> None:
        assert await blob_service.read_many({b3(HELLOWORLD): 12, b3(EMPTY): 0}) == {}

    async def test_read_many_many_blobs(self, blob_service: BlobService) -> None:
        blobs = [b"blob %d " % i * (i % 7 + 1) for i in range(150)]
        await blob_service.put_many(blobs[::2])  # every other one is missing
        found = await blob_service.read_many({b3(b): len(b) for b in blobs}, parallel=3)
        assert found == {b3(b): b for b in blobs[::2]}

    @pytest.mark.parametrize("data", [pytest.param(HELLOWORLD, id="HELLOWORLD"), pytest.param(BLOB_B, id="BLOB_B")])
    async def test_read_many_max_size(self, blob_service: BlobService, data: bytes) -> None:
        """A blob larger than its maximum is left out (like a missing one), not an error."""
        digest = await blob_service.put(data)
        other = await blob_service.put(BLOB_A)
        size = len(data)
        assert await blob_service.read_many({digest: size}) == {digest: data}
        assert await blob_service.read_many({digest: size - 1, other: 2}) == {other: BLOB_A}
        assert await blob_service.read_many({digest: 0, other: 1}) == {}
        with pytest.raises(ValidationError):
            await blob_service.read_many({digest: -1})

    @pytest.mark.parametrize("declare_size", [True, False])
    async def test_read_many_large(self, blob_service: BlobService, declare_size: bool) -> None:
        digest = await write_parts(blob_service, LARGE_SIZE if declare_size else None, split(LARGE, 3))
        assert await blob_service.read_many({digest: LARGE_SIZE}) == {digest: LARGE}
        assert await blob_service.read_many({digest: LARGE_SIZE - 1}) == {}
        assert await blob_service.read_many({digest: 1000}) == {}

    @pytest.mark.parametrize(("data", "bad"), CORRUPTIONS)
    async def test_read_many_verifies(
        self, blob_service: BlobService, corrupt_blob: BlobCorrupter, data: bytes, bad: bytes
    ) -> None:
        digest = await blob_service.put(data)
        good = await blob_service.put(b"fine")
        await corrupt_blob(digest, bad)
        with self.raises_corruption(digest.hex()):
            await blob_service.read_many({good: 4, digest: max(len(data), len(bad))})
        with self.raises_corruption():
            await blob_service.read_many({digest: max(len(data), len(bad))}, parallel=1)
        if len(bad) > len(data) and self.corruption_error is ChecksumMismatch:
            # too large for the size asked for: left out, not read
            assert await blob_service.read_many({good: 4, digest: len(data)}) == {good: b"fine"}
        elif len(bad) > len(data):  # a client's server reads it, for its size, and finds it corrupt
            with self.raises_corruption(digest.hex()):
                await blob_service.read_many({good: 4, digest: len(data)})

    # -- writer lifecycle --------------------------------------------------------

    @pytest.mark.parametrize(
        ("data", "declared"),
        [
            pytest.param(HELLOWORLD, len(HELLOWORLD) + 1, id="shorter"),
            pytest.param(HELLOWORLD, len(HELLOWORLD) - 1, id="longer"),
            pytest.param(HELLOWORLD, 0, id="declared-empty"),
            pytest.param(b"", 1, id="empty-but-declared-1"),
            pytest.param(LARGE, LARGE_SIZE + 1, id="large-shorter"),
            pytest.param(LARGE, LARGE_SIZE - 1, id="large-longer"),
        ],
    )
    async def test_expected_size_mismatch(
        self, blob_service: BlobService, temp_files: TempFiles, data: bytes, declared: int
    ) -> None:
        writer = await blob_service.open_write(declared)

        async def write_and_close() -> None:
            for part in split(data, 5):
                await writer.write(part)
            await writer.close()

        with pytest.raises(ValidationError):
            await write_and_close()
        await writer.abort()  # must be allowed after a failure
        await self.check_absent(blob_service, b3(data))
        assert temp_files() == []

    @pytest.mark.parametrize("data", [pytest.param(HELLOWORLD, id="small"), pytest.param(LARGE, id="large")])
    async def test_expected_size_mismatch_async_with(
        self, blob_service: BlobService, temp_files: TempFiles, data: bytes
    ) -> None:
        with pytest.raises(ValidationError):
            await write_parts(blob_service, len(data) + 1, split(data, 3))
        await self.check_absent(blob_service, b3(data))
        assert temp_files() == []

    async def test_write_after_close(self, blob_service: BlobService) -> None:
        writer = await blob_service.open_write()
        await writer.write(BLOB_A)
        digest = await writer.close()
        with pytest.raises(NixcasError):
            await writer.write(b"more")
        assert await writer.close() == digest  # unchanged by the failed write
        assert await blob_service.read(digest) == BLOB_A

    async def test_close_twice(self, blob_service: BlobService) -> None:
        writer = await blob_service.open_write(len(HELLOWORLD))
        await writer.write(HELLOWORLD)
        first = await writer.close()
        second = await writer.close()
        assert first == second == b3(HELLOWORLD)
        await writer.abort()  # no effect after close
        await self.check_content(blob_service, first, HELLOWORLD)

    @pytest.mark.parametrize("data", [pytest.param(HELLOWORLD, id="small"), pytest.param(LARGE, id="large")])
    async def test_abort(self, blob_service: BlobService, temp_files: TempFiles, data: bytes) -> None:
        writer = await blob_service.open_write()
        for part in split(data, 4):
            await writer.write(part)
        await writer.abort()
        await writer.abort()  # idempotent
        await self.check_absent(blob_service, b3(data))
        assert temp_files() == []
        with pytest.raises(NixcasError):
            await writer.write(b"x")
        with pytest.raises(NixcasError):
            await writer.close()
        await self.check_absent(blob_service, b3(data))

    @pytest.mark.parametrize("data", [pytest.param(HELLOWORLD, id="small"), pytest.param(LARGE, id="large")])
    async def test_async_with_exception(self, blob_service: BlobService, temp_files: TempFiles, data: bytes) -> None:
        with pytest.raises(Boom):
            await write_parts_raising(blob_service, len(data), split(data, 4))
        await self.check_absent(blob_service, b3(data))
        assert temp_files() == []

    async def test_async_with_success(self, blob_service: BlobService) -> None:
        async with await blob_service.open_write(len(BLOB_A)) as writer:
            await writer.write(BLOB_A)
            digest = await writer.close()
        assert digest == b3(BLOB_A)
        await self.check_content(blob_service, digest, BLOB_A)

"""Reading a damaged single-chunk blob never hands out a wrong byte, and decompression stays bounded.

Objects are planted by hand (``zstandard`` and the layout computed
independently in ``test_blobservice``): a swapped object, a zstd bomb with
and without its size in the frame header, and big objects as stores written
before chunking hold them (one object for a multi-MiB blob).
"""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import blake3
import pytest
import pytest_asyncio
import zstandard
from test_blobservice import key_path, stat_blob_response, write_object

from nixcas.castore.blob.local import LocalBlobService
from nixcas.castore.digest import B3Digest
from nixcas.errors import ChecksumMismatch, StorageError

SMALL = b"hello\n"
LEGACY = blake3.blake3(b"legacy").digest(length=6 << 20)
"""A 6 MiB blob stored, as before chunking, as one object."""
BOMB_SIZE = 64 << 20


def b3(data: bytes) -> B3Digest:
    return B3Digest(blake3.blake3(data).digest())


def bomb(records_size: bool) -> bytes:
    """A small zstd frame of :data:`BOMB_SIZE` zero bytes; with or without the size in its header."""
    if records_size:
        return zstandard.ZstdCompressor().compress(bytes(BOMB_SIZE))
    out = io.BytesIO()
    with zstandard.ZstdCompressor().stream_writer(out, closefd=False) as w:
        for _ in range(BOMB_SIZE >> 20):
            w.write(bytes(1 << 20))
    return out.getvalue()


def plant(root: Path, data: bytes, obj: bytes) -> B3Digest:
    """Blob ``data`` stored as one object (empty index), whose object then holds ``obj``."""
    digest = b3(data)
    write_object(key_path(root, "blobs", digest), b"")
    write_object(key_path(root, "chunks", digest), obj)
    return digest


DAMAGE = {
    "swapped": lambda data: zstandard.ZstdCompressor().compress(b"EVIL!" + data[5:]),
    "bomb-sized": lambda data: bomb(True),
    "bomb-unsized": lambda data: bomb(False),
    "flipped": lambda data: zstandard.ZstdCompressor().compress(data[:-1] + bytes([data[-1] ^ 1])),
}


@pytest_asyncio.fixture
async def local(tmp_path: Path) -> AsyncIterator[LocalBlobService]:
    svc = LocalBlobService(tmp_path / "store" / "blobs")
    yield svc
    await svc.close()


@pytest.mark.parametrize("data", [SMALL, LEGACY], ids=["small", "legacy-big"])
async def test_intact_single_object_blobs_read_back(local: LocalBlobService, data: bytes) -> None:
    digest = plant(local.root, data, zstandard.ZstdCompressor().compress(data))
    assert await local.read(digest) == data
    reader = await local.open_read(digest)
    assert reader is not None
    async with reader:
        assert await reader.seek(0, io.SEEK_END) == len(data)
        await reader.seek(len(data) - 3)
        assert await reader.read() == data[-3:]
        await reader.seek(1)
        assert await reader.read(4) == data[1:5]
        assert await reader.read(len(data)) == data[5:]
        assert await reader.read(10) == b""


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("data", [SMALL, LEGACY], ids=["small", "legacy-big"])
async def test_damaged_single_object_blob_gives_no_byte(local: LocalBlobService, data: bytes, damage: str) -> None:
    digest = plant(local.root, data, DAMAGE[damage](data))
    reader = await local.open_read(digest)
    assert reader is not None
    async with reader:
        with pytest.raises(ChecksumMismatch):
            await reader.read(3)
        with pytest.raises(ChecksumMismatch):
            await reader.read(3)  # still nothing on a second try
    reader = await local.open_read(digest)
    assert reader is not None
    async with reader:
        with pytest.raises(ChecksumMismatch):
            await reader.seek(0, io.SEEK_END)
    with pytest.raises(ChecksumMismatch):
        await local.read(digest)


@pytest.mark.parametrize("damage", ["swapped", "bomb-unsized"])
@pytest.mark.parametrize("data", [SMALL, LEGACY], ids=["small", "legacy-big"])
def test_cat_of_damaged_blob_writes_nothing(tmp_path: Path, data: bytes, damage: str) -> None:
    store = tmp_path / "store"
    digest = plant(store / "blobs", data, DAMAGE[damage](data))
    result = subprocess.run(
        [sys.executable, "-m", "nixcas.cli.main", "--store-dir", str(store), "castore", "cat", digest.hex()],
        capture_output=True,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert result.stdout == b""
    assert b"checksum mismatch" in result.stderr and b"Traceback" not in result.stderr


async def test_legacy_object_expanding_past_the_limit_is_refused(
    local: LocalBlobService, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nixcas.castore.objectstore.readers as local_module

    monkeypatch.setattr(local_module, "LEGACY_MAX_SIZE", 8 << 20)
    digest = plant(local.root, LEGACY, bomb(False))
    reader = await local.open_read(digest)
    assert reader is not None
    async with reader:
        with pytest.raises(StorageError, match="expands past"):
            await reader.read(3)


async def test_streamed_chunk_list_not_adding_up_fails_at_eof(local: LocalBlobService) -> None:
    """Each chunk is verified before use; a wrong chunk list (each chunk fine) is caught at the end."""
    chunks = [blake3.blake3(b"%d" % i).digest(length=200_000) for i in range(3)]
    for c in chunks:
        write_object(key_path(local.root, "chunks", b3(c)), zstandard.ZstdCompressor().compress(c))
    claimed = b3(b"".join(chunks[::-1]))
    write_object(key_path(local.root, "blobs", claimed), stat_blob_response([(b3(c), len(c)) for c in chunks]))
    reader = await local.open_read(claimed)
    assert reader is not None
    async with reader:
        got = b""
        while len(got) < 600_000:
            got += await reader.read(1 << 16)
        assert got == b"".join(chunks)  # every byte handed out was a verified chunk's
        with pytest.raises(ChecksumMismatch):
            await reader.read(1 << 16)  # the end: the chunks are not the blob


# -- cached bao outboards ------------------------------------------------------------------------


def outboard_path(root: Path, digest: B3Digest) -> Path:
    return key_path(root, "bao", digest)


def flip(path: Path, pos: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[pos] ^= 0x01
    path.write_bytes(bytes(raw))


OUTBOARD_BLOB = blake3.blake3(b"outboard").digest(length=100_000)
"""Seven 16 KiB chunk groups: an outboard of 8 + 6·64 bytes."""


@pytest.mark.parametrize("pos", [0, 8, 8 + 31, 8 + 64 + 40, 8 + 5 * 64 + 63], ids=lambda p: f"byte{p}")
async def test_damaged_cached_outboard_is_replaced(local: LocalBlobService, pos: int) -> None:
    digest = await local.put(OUTBOARD_BLOB)
    good = await local.outboard(digest)
    assert good is not None and len(good) == 8 + 6 * 64
    assert int.from_bytes(good[:8], "little") == len(OUTBOARD_BLOB)
    path = outboard_path(local.root, digest)
    assert path.read_bytes() == good
    flip(path, pos)
    assert await local.outboard_problem(digest) is not None
    assert await local.outboard(digest) == good  # not the damaged cache
    assert path.read_bytes() == good  # replaced on disk
    assert await local.outboard_problem(digest) is None


@pytest.mark.parametrize("records_size", [True, False])
async def test_wrong_length_in_a_header_only_outboard(local: LocalBlobService, records_size: bool) -> None:
    """A blob of one chunk group has an 8-byte outboard: only its length, checked against the blob's size."""
    if records_size:
        digest = await local.put(SMALL)
    else:  # as snix writes objects: no content size in the frame header
        out = io.BytesIO()
        with zstandard.ZstdCompressor().stream_writer(out, closefd=False) as w:
            w.write(SMALL)
        digest = plant(local.root, SMALL, out.getvalue())
    assert await local.outboard(digest) == len(SMALL).to_bytes(8, "little")
    path = outboard_path(local.root, digest)
    path.write_bytes((len(SMALL) + 1).to_bytes(8, "little"))
    if records_size:
        assert await local.outboard_problem(digest) is not None
    assert await local.outboard(digest) == len(SMALL).to_bytes(8, "little")
    assert path.read_bytes() == len(SMALL).to_bytes(8, "little")


def test_cat_range_after_outboard_damage(tmp_path: Path) -> None:
    store = tmp_path / "store"
    digest = plant(store / "blobs", OUTBOARD_BLOB, zstandard.ZstdCompressor().compress(OUTBOARD_BLOB))

    def cat_range() -> subprocess.CompletedProcess[bytes]:
        cli = [sys.executable, "-m", "nixcas.cli.main", "--store-dir", str(store)]
        return subprocess.run(
            [*cli, "castore", "cat", "--range", "40000:40010", digest.hex()],
            capture_output=True,
            check=False,
        )

    first = cat_range()
    assert first.returncode == 0 and first.stdout == OUTBOARD_BLOB[40000:40010], first.stderr
    flip(outboard_path(store / "blobs", digest), 8 + 64 + 5)
    again = cat_range()
    assert again.returncode == 0 and again.stdout == OUTBOARD_BLOB[40000:40010], again.stderr

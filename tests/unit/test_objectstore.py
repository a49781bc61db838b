"""Blobs in object storage: the shared suite on obstore's memory store and on a real S3 server (SeaweedFS)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import blake3
import pytest
import pytest_asyncio
import zstandard

from nixcas._proto.tvix.castore.protos import rpc_blobstore_pb2
from nixcas.castore.blob.base import BlobService
from nixcas.castore.blob.objectstore import ObjectStoreBlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.gc import WriteLeases, collect
from nixcas.castore.nodes import FileNode
from nixcas.castore.objectstore import Presence
from nixcas.castore.sizerule import SizeRule
from nixcas.composition import blob_service_from_url
from nixcas.errors import ChecksumMismatch, ConfigurationError, StorageError, UnavailableError, ValidationError
from nixcas.registry import parse_service_url
from nixcas.store.gc import collect_garbage
from nixcas.testing.blobservice import BlobCorrupter, BlobServiceSuite, TempFiles
from nixcas.testing.seaweedfs import SECRET_KEY, SeaweedFS, free_port


def _corrupter(svc: BlobService) -> BlobCorrupter:
    """Replace a blob's bytes behind the service's back: now one chunk object named by the blob, no index."""
    assert isinstance(svc, ObjectStoreBlobService)

    async def corrupt(digest: B3Digest, data: bytes) -> None:
        h = digest.hex()
        index, chunk = f"blobs/b3/{h[:4]}/{h}", f"chunks/b3/{h[:4]}/{h}"
        assert await svc.store.head(index) is not None or await svc.store.head(chunk) is not None
        await svc.store.delete(index)
        await svc.store.put(f"chunks/b3/{h[:4]}/{h}", zstandard.ZstdCompressor().compress(data))

    return corrupt


class TestMemoryObjectStoreBlobService(BlobServiceSuite):
    covers = ("objectstore",)

    @pytest_asyncio.fixture
    async def blob_service(self) -> AsyncIterator[BlobService]:
        svc = await blob_service_from_url("objectstore+memory:///")
        assert isinstance(svc, ObjectStoreBlobService)
        yield svc
        await svc.close()

    @pytest.fixture
    def corrupt_blob(self, blob_service: BlobService) -> BlobCorrupter:
        return _corrupter(blob_service)

    @pytest.fixture
    def temp_files(self) -> TempFiles:
        return list


class TestS3BlobService(BlobServiceSuite):
    covers = ("objectstore",)

    @pytest_asyncio.fixture
    async def blob_service(self, s3_url: str) -> AsyncIterator[BlobService]:
        svc = await blob_service_from_url(s3_url)
        assert isinstance(svc, ObjectStoreBlobService)
        yield svc
        await svc.close()

    @pytest.fixture
    def corrupt_blob(self, blob_service: BlobService) -> BlobCorrupter:
        return _corrupter(blob_service)

    @pytest.fixture
    def temp_files(self) -> TempFiles:
        return list


# -- layout: the snix bucket format, checked by hand --------------------------------------------


def _b3(data: bytes) -> B3Digest:
    return B3Digest(blake3.blake3(data).digest())


def _key(kind: str, digest: B3Digest) -> str:
    h = digest.hex()
    return f"{kind}/b3/{h[:4]}/{h}"


@pytest_asyncio.fixture
async def mem() -> AsyncIterator[ObjectStoreBlobService]:
    svc = await blob_service_from_url("objectstore+memory:///")
    assert isinstance(svc, ObjectStoreBlobService)
    yield svc
    await svc.close()


async def test_layout_single_and_chunked(mem: ObjectStoreBlobService) -> None:
    hello = await mem.put(b"Hello World")
    assert hello.hex().startswith("41f83941")  # the reference's example key blobs/b3/41f8/41f83941…
    assert await mem.store.get(f"blobs/b3/41f8/{hello.hex()}") is None  # one chunk, the blob: no index needed
    chunk = await mem.store.get(f"chunks/b3/41f8/{hello.hex()}")
    assert chunk is not None and zstandard.ZstdDecompressor().decompress(chunk) == b"Hello World"

    big = blake3.blake3(b"big").digest(length=3 << 20)
    digest = await mem.put(big)
    raw = await mem.store.get(_key("blobs", digest))
    assert raw
    index = rpc_blobstore_pb2.StatBlobResponse.FromString(raw)
    assert len(index.chunks) > 1
    joined = b""
    for c in index.chunks:
        stored = await mem.store.get(_key("chunks", B3Digest(c.digest)))
        assert stored is not None
        part = zstandard.ZstdDecompressor().stream_reader(stored).read()
        assert len(part) == c.size and blake3.blake3(part).digest() == c.digest
        joined += part
    assert joined == big
    assert _b3(joined) == digest


async def test_reads_a_bucket_written_by_hand(mem: ObjectStoreBlobService) -> None:
    """A blob laid out the snix way (chunks at zstd level 3, index last) by someone else reads back."""
    parts = [b"first part " * 1000, b"second part " * 700, b"third"]
    metas = []
    for part in parts:
        d = _b3(part)
        await mem.store.put(_key("chunks", d), zstandard.ZstdCompressor(level=3).compress(part))
        metas.append(rpc_blobstore_pb2.StatBlobResponse.ChunkMeta(digest=d, size=len(part)))
    blob = b"".join(parts)
    index = rpc_blobstore_pb2.StatBlobResponse(chunks=metas).SerializeToString()
    await mem.store.put(_key("blobs", _b3(blob)), index)
    assert await mem.read(_b3(blob)) == blob
    listed = await mem.chunks(_b3(blob))
    assert listed is not None and [c.size for c in listed] == [len(p) for p in parts]


async def test_chunk_with_wrong_bytes_is_refused(mem: ObjectStoreBlobService) -> None:
    big = blake3.blake3(b"tamper").digest(length=2 << 20)
    digest = await mem.put(big)
    chunks = await mem.chunks(digest)
    assert chunks
    victim = chunks[1]
    await mem.store.put(_key("chunks", victim.digest), zstandard.ZstdCompressor().compress(b"x" * victim.size))
    with pytest.raises(ChecksumMismatch):
        await mem.read(digest)


async def test_a_zstd_bomb_chunk_is_refused_without_expanding_it(mem: ObjectStoreBlobService) -> None:
    digest = await mem.put(b"small blob")
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 << 20))
    await mem.store.put(_key("chunks", digest), bomb)
    with pytest.raises(StorageError):
        await mem.read(digest)


# -- requests: batched, cached existence checks ---------------------------------------------------


def _blobs(n: int, tag: bytes) -> list[bytes]:
    return [blake3.blake3(tag + str(i).encode()).digest(length=100 + i) for i in range(n)]


async def test_reimport_costs_almost_no_requests(s3_url: str) -> None:
    blobs = _blobs(400, b"reimport")
    first = await blob_service_from_url(s3_url)
    assert isinstance(first, ObjectStoreBlobService)
    digests = await first.put_many(blobs)
    assert first.store.requests["PUT"] == len(blobs)  # one chunk object each, no index
    await first.close()

    # A new process knows nothing: the batch's existence check lists key ranges instead of 400 HEADs.
    second = await blob_service_from_url(s3_url)
    assert isinstance(second, ObjectStoreBlobService)
    before = sum(second.store.requests.values())
    assert await second.put_many(blobs) == digests
    spent = sum(second.store.requests.values()) - before
    assert second.store.requests["PUT"] == 0
    assert spent <= 20, second.store.requests
    # ... and a third round, answered from the cache, costs nothing at all.
    before = sum(second.store.requests.values())
    assert await second.put_many(blobs) == digests
    assert sum(second.store.requests.values()) == before
    assert [await second.read(d) for d in digests[:3]] == blobs[:3]
    await second.close()


async def test_old_objects_are_written_again(mem: ObjectStoreBlobService) -> None:
    """An object older than refresh_after is not relied on: its index (and chunk) are rewritten, making it young."""
    digest = await mem.put(b"old blob")
    puts = mem.store.requests["PUT"]
    await mem.put(b"old blob")
    assert mem.store.requests["PUT"] == puts  # young: nothing written
    mem.refresh_after_ns = 0
    await asyncio.sleep(0.01)
    await mem.put(b"old blob")
    assert mem.store.requests["PUT"] == puts + 1  # the chunk object, which is the blob
    meta = await mem.store.head(_key("chunks", digest))
    assert meta is not None and meta.mtime_ns > time.time_ns() - 60 * 10**9


async def test_streaming_writer_bounds_uploads_and_skips_stored_chunks(mem: ObjectStoreBlobService) -> None:
    data = blake3.blake3(b"stream").digest(length=6 << 20)
    async with await mem.open_write(len(data)) as writer:
        for i in range(0, len(data), 100_000):
            await writer.write(data[i : i + 100_000])
        digest = await writer.close()
    assert digest == _b3(data)
    chunk_puts = mem.store.requests["PUT"] - 1
    assert chunk_puts > 10
    # The same bytes again: nothing is written.
    puts = mem.store.requests["PUT"]
    async with await mem.open_write() as writer:
        await writer.write(data)
        assert await writer.close() == digest
    assert mem.store.requests["PUT"] == puts  # chunks found, and the index known to be fresh
    assert await mem.read(digest) == data


# -- configuration -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("objectstore+ftp://bucket/x", "unsupported object store 'ftp'"),
        ("objectstore+s3:///nobucket", "needs a bucket"),
        ("objectstore+memory://host/", "take no bucket"),
        ("objectstore+s3://bucket/p?concurrency=0", "concurrency must be"),
        ("objectstore+s3://bucket/p?timeout=soon", "timeout must be"),
        ("objectstore+s3://bucket/p?zstd_level=99", "zstd_level"),
        ("objectstore+s3://bucket/p?refresh_after=-1", "refresh_after"),
        ("objectstore+s3://bucket/p?create_bucket=maybe", "create_bucket must be"),
        ("objectstore+s3://bucket/p?region=x&region=y", "given twice"),
        ("objectstore+s3://bucket/p?no_such_obstore_option=1", "no_such_obstore_option"),
    ],
)
async def test_bad_urls_are_refused(url: str, fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(fragment)):
        await blob_service_from_url(url)


async def test_secrets_stay_out_of_messages(seaweedfs: SeaweedFS) -> None:
    url = seaweedfs.url("nixcas", "secret-test").replace(SECRET_KEY, "wrong-secret-value")
    with pytest.raises(StorageError) as raised:
        await blob_service_from_url(url)
    assert "access denied" in str(raised.value)
    assert "wrong-secret-value" not in str(raised.value)


# -- faults against a real server ------------------------------------------------------------------------


async def test_unreachable_server_is_a_clear_error_at_start() -> None:
    port = free_port()
    url = f"objectstore+s3://nixcas/x?endpoint=http://127.0.0.1:{port}&region=us-east-1&access_key_id=a&secret_access_key=b"
    started = time.monotonic()
    with pytest.raises(UnavailableError, match="unreachable"):
        await blob_service_from_url(url)
    assert time.monotonic() - started < 30


async def test_missing_bucket_is_a_clear_error_or_created_when_asked(seaweedfs: SeaweedFS) -> None:
    with pytest.raises(StorageError, match="bucket does not exist"):
        await blob_service_from_url(seaweedfs.url("nixcas-missing"))
    svc = await blob_service_from_url(seaweedfs.url("nixcas-created", create_bucket="true"))
    digest = await svc.put(b"in a new bucket")
    assert await svc.read(digest) == b"in a new bucket"
    await svc.close()


async def test_server_killed_mid_import_leaves_nothing_visible_and_retry_succeeds(tmp_path: Path) -> None:
    server = SeaweedFS(tmp_path / "weed")
    server.start()
    try:
        server.create_bucket("killed")
        url = server.url("killed", "p", retry_timeout="3", max_retries="1", timeout="5")
        svc = await blob_service_from_url(url)
        data = blake3.blake3(b"killed").digest(length=24 << 20)
        digest = _b3(data)

        async def upload_while_the_server_dies() -> None:
            async with await svc.open_write(len(data)) as writer:
                for i in range(0, len(data), 1 << 20):
                    if i == 8 << 20:
                        server.kill()
                    await writer.write(data[i : i + (1 << 20)])
                await writer.close()

        with pytest.raises(StorageError):
            await upload_while_the_server_dies()
        await svc.close()

        server.start()
        # the retry may meet a restarted server still loading its volumes (slow on a busy machine): patient requests
        patient = server.url("killed", "p", retry_timeout="60", max_retries="5", timeout="30")
        again = await blob_service_from_url(patient)
        assert not await again.has(digest)  # no index: the blob is not visible
        assert await again.open_read(digest) is None
        async with await again.open_write(len(data)) as writer:
            await writer.write(data)
            assert await writer.close() == digest
        assert await again.read(digest) == data
        await again.close()
    finally:
        server.kill()


# -- garbage collection ---------------------------------------------------------------------------------


async def test_gc_over_object_storage(s3_url: str) -> None:
    blobs = await blob_service_from_url(s3_url)
    assert isinstance(blobs, ObjectStoreBlobService)
    dirs = MemoryDirectoryService(SizeRule.TVIX)
    shared = blake3.blake3(b"shared").digest(length=1 << 20)
    keep_big = blake3.blake3(b"keep").digest(length=1 << 20) + shared
    drop_big = blake3.blake3(b"drop").digest(length=1 << 20) + shared
    keep, drop = await blobs.put(keep_big), await blobs.put(drop_big)
    small_keep, small_drop = await blobs.put(b"keep me"), await blobs.put(b"drop me")
    tree = Directory([(b"big", FileNode(keep, len(keep_big))), (b"small", FileNode(small_keep, 7))])
    await dirs.put(tree)
    keep_chunks, drop_chunks = await blobs.chunks(keep), await blobs.chunks(drop)
    assert keep_chunks and drop_chunks
    only_drop = {c.digest for c in drop_chunks} - {c.digest for c in keep_chunks}
    assert only_drop  # the shared megabyte gives common chunks; the first differs

    # Nothing is older than a cutoff in the past: all is kept.
    report = await collect(blobs, dirs, [tree.digest], cutoff_ns=time.time_ns() - 3600 * 10**9)
    assert report.freed == 0
    report = await collect(blobs, dirs, [tree.digest], cutoff_ns=time.time_ns() + 10**9)
    # The chunked blob's index is a blob; "drop me" is one chunk object (single-chunk blobs have no index).
    assert report.kinds["blob"].freed == 1
    assert report.kinds["chunk"].freed == len(only_drop) + 1  # drop's own chunks, and "drop me"
    assert not await blobs.has(drop) and not await blobs.has(small_drop)
    for c in only_drop:
        assert await blobs.store.head(_key("chunks", c)) is None
    assert await blobs.read(keep) == keep_big and await blobs.read(small_keep) == b"keep me"
    await blobs.close()


async def test_gc_refuses_a_grace_shorter_than_refresh_after(mem: ObjectStoreBlobService, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="too short"):
        await collect_garbage(
            mem,
            MemoryDirectoryService(SizeRule.TVIX),
            None,
            None,
            WriteLeases(tmp_path / "leases"),
            grace_ns=60 * 10**9,
        )
    report, _ = await collect_garbage(
        mem, MemoryDirectoryService(SizeRule.TVIX), None, None, WriteLeases(tmp_path / "leases"), grace_ns=3600 * 10**9
    )
    assert report.freed == 0


# -- several processes on one bucket: what one writes or deletes, the others see -------------------------


async def test_has_sees_other_processes_writes_and_deletions(s3_url: str) -> None:
    a = await blob_service_from_url(s3_url)
    b = await blob_service_from_url(s3_url)
    assert isinstance(a, ObjectStoreBlobService) and isinstance(b, ObjectStoreBlobService)
    await a.put_many(_blobs(200, b"listed"))  # A has listed every key range (its "absent" answers are cached)
    x = await b.put(b"written by B after A listed")
    assert await a.has(x)  # not "absent" from A's listing
    assert await a.read(x) == b"written by B after A listed"
    # B (a gc elsewhere) deletes an old blob A has seen: A's remembered "present" is not trusted once old.
    old = await a.put(b"old blob")
    assert await a.has(old)
    for key in (_key("blobs", old), _key("chunks", old)):
        await b.store.delete(key)
    a.refresh_after_ns = 0  # what A saw is now older than refresh_after
    assert not await a.has(old)
    await a.close()
    await b.close()


async def test_evicted_keys_are_not_reported_absent(mem: ObjectStoreBlobService) -> None:
    blobs = _blobs(400, b"evict")  # ~25 per key range: enough to list the ranges
    digests = await mem.put_many(blobs)
    presence = Presence(mem.store, capacity=800)
    keys = [_key("chunks", d) for d in digests]
    found = await presence.check(keys)
    assert all(found.values())
    assert mem.store.requests["LIST"] and not mem.store.requests["HEAD"]
    for i in range(700):  # other objects seen since push most of those out of the cache
        presence.noted(f"bao/b3/0000/{i:064x}", 1)
    again = await presence.check(keys)  # their ranges must be asked again, not answered "absent"
    assert all(again.values())


async def test_a_slow_upload_does_not_publish_relying_on_chunks_grown_old(mem: ObjectStoreBlobService) -> None:
    base = blake3.blake3(b"base").digest(length=4 << 20)
    await mem.put(base)
    data = base + b"a different tail"  # another blob, reusing base's chunks
    writer = await mem.open_write(len(data))
    for i in range(0, len(data), 1 << 20):
        await writer.write(data[i : i + (1 << 20)])
    mem.refresh_after_ns = 1  # the upload "took" longer than refresh_after: what it relied on is old now
    with pytest.raises(StorageError, match="took so long"):
        await writer.close()
    assert not await mem.has(_b3(data))


async def test_credentials_stay_out_of_config_errors_and_reprs() -> None:
    url = "objectstore+s3://bucket/p?secret_access_key=TOPSECRET&region=a&region=b"
    with pytest.raises(ConfigurationError) as raised:
        await blob_service_from_url(url)
    assert "TOPSECRET" not in str(raised.value)
    config = parse_service_url("blobservices", "objectstore+s3://bucket/p?secret_access_key=TOPSECRET")
    assert "TOPSECRET" not in repr(config)


async def test_the_request_window_bounds_open_responses(
    mem: ObjectStoreBlobService, monkeypatch: pytest.MonkeyPatch
) -> None:
    import obstore

    digests = await mem.put_many(_blobs(300, b"window"))
    real_get = obstore.get_async
    open_now = peak = 0

    class Counted:
        def __init__(self, inner: Any) -> None:
            self.inner, self.meta = inner, inner.meta

        async def bytes_async(self) -> Any:
            nonlocal open_now
            await asyncio.sleep(0.001)
            data = await self.inner.bytes_async()
            open_now -= 1
            return data

    async def counted_get(store: Any, key: str) -> Counted:
        nonlocal open_now, peak
        result = await real_get(store, key)
        open_now += 1
        peak = max(peak, open_now)
        return Counted(result)

    monkeypatch.setattr(obstore, "get_async", counted_get)
    got = await mem.read_many({d: 1 << 20 for d in digests})
    assert len(got) == len(digests)
    assert peak <= 32  # the store's concurrency


@pytest.mark.parametrize(
    "url",
    [
        "objectstor+s3://bucket?aws_secret_access_key=TOPSECRET",  # a typo in the type
        "combined://?near=objectstore%2Bs3%3A%2F%2Fb%3Fsecret_access_key%3DTOPSECRET%26x%3D1&far=nowhere",
        "objectstore+file:///abs/p?aws_secret_access_key=TOPSECRET",
    ],
)
async def test_credentials_stay_out_of_every_url_error(url: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        await blob_service_from_url(url)
    assert "TOPSECRET" not in str(raised.value)


def test_seaweedfs_ports_are_distinct_and_clear_of_each_others_grpc_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    """A closed port is soon offered again: two of SeaweedFS's listeners once got the same port (weed exited)."""
    from nixcas.testing import seaweedfs

    offered = iter([20001, 20001, 20002, 30001, 20002, 20003, 20004, 20005])
    monkeypatch.setattr(seaweedfs, "free_port", lambda: next(offered))
    assert seaweedfs.free_ports(3) == [20002, 20003, 20004]  # 30001 is 20001's gRPC port: that pick starts over

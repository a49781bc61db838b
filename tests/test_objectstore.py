"""Blobs in object storage: the shared suite on obstore's memory store and on a real S3 server (SeaweedFS)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import zstandard

from nixcas.castore.blob.base import BlobService
from nixcas.castore.blob.objectstore import ObjectStoreBlobService
from nixcas.castore.digest import B3Digest
from nixcas.registry import blob_service_from_url
from nixcas.testing.blobservice import BlobCorrupter, BlobServiceSuite, TempFiles


def _corrupter(svc: BlobService) -> BlobCorrupter:
    """Replace a blob's bytes behind the service's back: an empty index, and the chunk object named by the blob."""
    assert isinstance(svc, ObjectStoreBlobService)

    async def corrupt(digest: B3Digest, data: bytes) -> None:
        h = digest.hex()
        assert await svc.store.head(f"blobs/b3/{h[:4]}/{h}") is not None
        await svc.store.put(f"blobs/b3/{h[:4]}/{h}", b"")
        await svc.store.put(f"chunks/b3/{h[:4]}/{h}", zstandard.ZstdCompressor().compress(data))

    return corrupt


class TestMemoryObjectStoreBlobService(BlobServiceSuite):
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

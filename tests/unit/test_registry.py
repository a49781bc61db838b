"""Service URLs: which are accepted, which are refused (when parsed, never later)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nixcas.castore.blob.local import LocalBlobService
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.dirs.sqlite import SqliteDirectoryService
from nixcas.composition import blob_service_from_url, directory_service_from_url
from nixcas.errors import ConfigurationError

# "{tmp}" is replaced by a per-test temporary directory, so that accepted URLs
# with absolute paths do not touch the real filesystem.


@pytest.mark.parametrize(
    ("url", "cls"),
    [
        ("memory://", MemoryBlobService),
        ("objectstore+file://{tmp}/x", LocalBlobService),
        ("objectstore+file://{tmp}/x/", LocalBlobService),
        ("objectstore+file://{tmp}/x?zstd_level=5", LocalBlobService),
    ],
)
async def test_blob_url_good(tmp_path: Path, url: str, cls: type) -> None:
    svc = await blob_service_from_url(url.format(tmp=tmp_path))
    try:
        assert type(svc) is cls
        digest = await svc.put(b"hello")
        assert await svc.read(digest) == b"hello"
    finally:
        await svc.close()


async def test_blob_url_path(tmp_path: Path) -> None:
    svc = await blob_service_from_url(f"objectstore+file://{tmp_path}/x")
    assert isinstance(svc, LocalBlobService)
    assert svc.root == tmp_path / "x"
    await svc.put(b"hello")
    assert (tmp_path / "x" / "blobs").is_dir()


@pytest.mark.parametrize(
    "url",
    [
        "memory:///",
        "memory://foo",
        "memory://?x=1",
        "memory://#frag",
        "objectstore+file://host/x",
        "objectstore+file:///",
        "objectstore+file://",
        "objectstore+file:relative/x",
        "objectstore+s3:///x",
        "objectstore+memory://bucket/",
        "objectstore://{tmp}/x",
        "objectstore+file://{tmp}/x?bogus=1",
        "objectstore+file:///x?bogus=1",
        "objectstore+file://{tmp}/x?zstd_level=abc",
        "objectstore+file://{tmp}/x?zstd_level=1&zstd_level=2",
        "sqlite://",
        "foo://",
        "nonsense",
        "",
        "://",
    ],
)
async def test_blob_url_bad(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigurationError):
        await blob_service_from_url(url.format(tmp=tmp_path))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("url", "cls"),
    [
        ("memory://", MemoryDirectoryService),
        ("sqlite://", SqliteDirectoryService),
        ("sqlite://{tmp}/x.sqlite", SqliteDirectoryService),
    ],
)
async def test_directory_url_good(tmp_path: Path, url: str, cls: type) -> None:
    svc = await directory_service_from_url(url.format(tmp=tmp_path))
    try:
        assert type(svc) is cls
        assert await svc.get(bytes(32)) is None  # type: ignore[arg-type]
    finally:
        await svc.close()


async def test_directory_url_sqlite_path(tmp_path: Path) -> None:
    svc = await directory_service_from_url(f"sqlite://{tmp_path}/x.sqlite")
    assert isinstance(svc, SqliteDirectoryService)
    assert svc.path == f"{tmp_path}/x.sqlite"
    await svc.close()
    assert (tmp_path / "x.sqlite").is_file()
    mem = await directory_service_from_url("sqlite://")
    assert isinstance(mem, SqliteDirectoryService)
    assert mem.path is None
    await mem.close()


@pytest.mark.parametrize(
    "url",
    [
        "memory:///",
        "memory://foo",
        "memory://?x=1",
        "sqlite://host/x",
        "sqlite://host",
        "sqlite:///",
        "sqlite://{tmp}/dir/",
        "sqlite:///tmp/dir/",
        "sqlite://{tmp}/x.sqlite?bogus=1",
        "sqlite://?x=1",
        "foo://",
        "nonsense",
        "",
    ],
)
async def test_directory_url_bad(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigurationError):
        await directory_service_from_url(url.format(tmp=tmp_path))
    assert not (tmp_path / "x.sqlite").exists()
    assert not (tmp_path / "dir").exists()


async def test_configuration_error_is_value_error() -> None:
    with pytest.raises(ValueError, match="memory"):
        await blob_service_from_url("memory://foo")

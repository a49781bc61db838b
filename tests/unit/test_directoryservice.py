"""DirectoryService backends built from URLs, bound to the shared contract suite,
plus SQLite-specific persistence and lifecycle checks."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import blake3
import pytest
import pytest_asyncio

from nixcas.castore.digest import B3Digest
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.dirs.sqlite import SqliteDirectoryService
from nixcas.composition import directory_service_from_url
from nixcas.errors import NixcasError, StorageError
from nixcas.testing.directoryservice import DirectoryServiceSuite, RawStore
from nixcas.testing.fixtures import DIRECTORY_COMPLICATED, DIRECTORY_WITH_KEEP

COMPLICATED_HEX = "424a7f6ce08d805d15b428062faae96299a1675d708c3a39261afe38cdd04feb"
WITH_KEEP_HEX = "8b5b5d642b646bb8ed504b0862c39413e87e57491497de7bd075953f7b83810e"


def sqlite_raw_store(svc: DirectoryService) -> RawStore:
    """Overwrite a row through the service's own connection and worker thread."""
    assert isinstance(svc, SqliteDirectoryService)

    async def store(digest: B3Digest, raw: bytes) -> None:
        def write() -> None:
            svc._db.conn.execute("INSERT OR REPLACE INTO directories (digest, data) VALUES (?, ?)", (digest, raw))

        await svc._db.run(write)

    return store


class TestMemoryDirectoryService(DirectoryServiceSuite):
    covers = ("memory",)

    @pytest_asyncio.fixture
    async def directory_service(self) -> AsyncIterator[DirectoryService]:
        svc = await directory_service_from_url("memory://")
        assert isinstance(svc, MemoryDirectoryService)
        yield svc
        await svc.close()

    @pytest.fixture
    def store_raw(self, directory_service: DirectoryService) -> RawStore:
        assert isinstance(directory_service, MemoryDirectoryService)
        data = directory_service._data

        async def store(digest: B3Digest, raw: bytes) -> None:
            data[digest] = raw

        return store


class TestSqliteMemoryDirectoryService(DirectoryServiceSuite):
    covers = ("sqlite",)

    @pytest_asyncio.fixture
    async def directory_service(self) -> AsyncIterator[DirectoryService]:
        svc = await directory_service_from_url("sqlite://")
        assert isinstance(svc, SqliteDirectoryService)
        assert svc.path is None
        yield svc
        await svc.close()

    @pytest.fixture
    def store_raw(self, directory_service: DirectoryService) -> RawStore:
        return sqlite_raw_store(directory_service)


class TestSqliteFileDirectoryService(DirectoryServiceSuite):
    covers = ("sqlite",)

    @pytest_asyncio.fixture
    async def directory_service(self, tmp_path: Path) -> AsyncIterator[DirectoryService]:
        svc = await directory_service_from_url(f"sqlite://{tmp_path}/d.sqlite")
        assert isinstance(svc, SqliteDirectoryService)
        yield svc
        await svc.close()

    @pytest.fixture
    def store_raw(self, directory_service: DirectoryService) -> RawStore:
        return sqlite_raw_store(directory_service)


# -- sqlite specifics ------------------------------------------------------------


async def upload_complicated(svc: DirectoryService) -> B3Digest:
    putter = svc.put_multiple_start()
    await putter.put(DIRECTORY_WITH_KEEP)
    await putter.put(DIRECTORY_COMPLICATED)
    return await putter.close()


async def test_sqlite_persistence_across_reopen(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/sub/dir/d.sqlite"  # parent directories are created
    first = await directory_service_from_url(url)
    root = await upload_complicated(first)
    assert root.hex() == COMPLICATED_HEX
    await first.close()
    assert (tmp_path / "sub" / "dir" / "d.sqlite").is_file()

    second = await directory_service_from_url(url)
    try:
        got = [d async for d in second.get_recursive(root)]
        assert [d.digest.hex() for d in got] == [COMPLICATED_HEX, WITH_KEEP_HEX]
        # idempotent re-upload into the existing database
        assert await upload_complicated(second) == root
    finally:
        await second.close()


async def test_sqlite_file_content(tmp_path: Path) -> None:
    """After close, the database holds digest -> canonical bytes, readable by anyone."""
    path = tmp_path / "d.sqlite"
    svc = await directory_service_from_url(f"sqlite://{path}")
    await upload_complicated(svc)
    await svc.close()
    conn = sqlite3.connect(path)
    try:
        rows = dict(conn.execute("SELECT digest, data FROM directories").fetchall())
    finally:
        conn.close()
    assert {bytes(k).hex() for k in rows} == {COMPLICATED_HEX, WITH_KEEP_HEX}
    for digest, data in rows.items():
        assert blake3.blake3(data).digest() == bytes(digest)


async def test_sqlite_memory_is_private() -> None:
    a = await directory_service_from_url("sqlite://")
    b = await directory_service_from_url("sqlite://")
    try:
        root = await upload_complicated(a)
        assert await a.get(root) is not None
        assert await b.get(root) is None
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize("where", ["memory", "file"])
async def test_sqlite_put_is_atomic(tmp_path: Path, where: str) -> None:
    """A batch that fails midway (a value SQLite cannot bind) leaves nothing behind."""
    url = "sqlite://" if where == "memory" else f"sqlite://{tmp_path}/d.sqlite"
    svc = await directory_service_from_url(url)
    try:
        good = B3Digest(bytes.fromhex(WITH_KEEP_HEX))
        items = [(good, DIRECTORY_WITH_KEEP.encode()), (B3Digest(bytes(32)), ["not", "bytes"])]
        with pytest.raises(StorageError):
            await svc._put_raw(items)  # type: ignore[arg-type]
        assert await svc.get(good) is None
        # the service remains usable
        assert await svc.put(DIRECTORY_WITH_KEEP) == good
        assert await svc.get(good) is not None
    finally:
        await svc.close()


@pytest.mark.parametrize("where", ["memory", "file"])
async def test_sqlite_close(tmp_path: Path, where: str) -> None:
    url = "sqlite://" if where == "memory" else f"sqlite://{tmp_path}/d.sqlite"
    svc = await directory_service_from_url(url)
    root = await upload_complicated(svc)
    await svc.close()
    await svc.close()  # closing twice is harmless
    with pytest.raises(NixcasError):
        await svc.get(root)


async def test_sqlite_async_with(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/d.sqlite"
    async with await directory_service_from_url(url) as svc:
        root = await upload_complicated(svc)
    async with await directory_service_from_url(url) as svc:
        got = await svc.get(root)
        assert got is not None
        assert got.digest.hex() == COMPLICATED_HEX

"""The PostgreSQL backends against a real server: contract suites, URLs, faults, GC, schema, CLI."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import blake3
import psycopg
import pytest
import pytest_asyncio

from nixcas._postgres import Connection, PostgresConfig
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.digest import EMPTY_DIGEST, B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.dirs.postgres import PostgresDirectoryService, PostgresDirectoryServiceConfig
from nixcas.castore.gc import StoredObject, collect
from nixcas.castore.nodes import FileNode
from nixcas.castore.sizerule import SizeRule
from nixcas.composition import directory_service_from_url, pathinfo_service_from_url
from nixcas.errors import ConfigurationError, StorageError, UnavailableError
from nixcas.registry import parse_service_url
from nixcas.store.gc import delete_paths
from nixcas.store.pathinfo.base import PathInfoService
from nixcas.store.pathinfo.postgres import PostgresPathInfoService, PostgresPathInfoServiceConfig
from nixcas.testing.daemon import free_port
from nixcas.testing.directoryservice import DirectoryServiceSuite, RawStore
from nixcas.testing.fixtures import DIRECTORY_COMPLICATED, DIRECTORY_WITH_KEEP
from nixcas.testing.pathinfoservice import PathInfoServiceSuite, RawPathInfoStore, make_path_info
from nixcas.testing.postgres import PASSWORD, PostgresServer, postgres_or_skip

T = TypeVar("T")


@pytest.fixture
def private_server() -> Iterator[PostgresServer]:
    """A server of the test's own, for tests that stop and restart it."""
    yield from postgres_or_skip()


def sql(url: str, statement: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Run one statement on the test database directly (not through nixcas)."""
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description is not None else []


async def upload_complicated(svc: DirectoryService) -> B3Digest:
    putter = svc.put_multiple_start()
    await putter.put(DIRECTORY_WITH_KEEP)
    await putter.put(DIRECTORY_COMPLICATED)
    return await putter.close()


# -- the shared contract suites --------------------------------------------------


class TestPostgresDirectoryService(DirectoryServiceSuite):
    covers = ("postgresql",)

    @pytest_asyncio.fixture
    async def directory_service(self, pg_url: str) -> AsyncIterator[DirectoryService]:
        svc = await directory_service_from_url(pg_url)
        assert isinstance(svc, PostgresDirectoryService)
        yield svc
        await svc.close()

    @pytest.fixture
    def store_raw(self, pg_url: str) -> RawStore:
        async def store(digest: B3Digest, raw: bytes) -> None:
            sql(
                pg_url,
                "INSERT INTO nixcas_directories (digest, data, mtime) VALUES (%s, %s, 0)"
                " ON CONFLICT (digest) DO UPDATE SET data = excluded.data",
                (bytes(digest), raw),
            )

        return store


class TestPostgresPathInfoService(PathInfoServiceSuite):
    covers = ("postgresql",)

    @pytest_asyncio.fixture
    async def pathinfo_service(self, pg_url: str) -> AsyncIterator[PathInfoService]:
        svc = await pathinfo_service_from_url(pg_url)
        assert isinstance(svc, PostgresPathInfoService)
        yield svc
        await svc.close()

    @pytest.fixture
    def store_raw(self, pg_url: str) -> RawPathInfoStore:
        async def store(digest: bytes, raw: bytes) -> None:
            sql(
                pg_url,
                "INSERT INTO nixcas_pathinfo (digest, data) VALUES (%s, %s)"
                " ON CONFLICT (digest) DO UPDATE SET data = excluded.data",
                (digest, raw),
            )

        return store


# -- URLs and composition tables -------------------------------------------------

SECRET = "hunter2-not-to-be-shown"  # noqa: S105 (must never appear in a message)


def test_url_options_are_split_between_nixcas_and_libpq() -> None:
    url = f"postgresql://me:{SECRET}@db.example:6543/cas?pool_max=3&pool_min=0&connect_timeout=4&sslmode=require"
    config = parse_service_url("directoryservices", url)
    assert isinstance(config, PostgresDirectoryServiceConfig)
    assert (config.pool_min, config.pool_max, config.connect_timeout) == (0, 3, 4)
    assert config.url == f"postgresql://me:{SECRET}@db.example:6543/cas?sslmode=require"
    assert config.target() == "db.example:6543/cas" and config.user() == "me"
    assert SECRET not in repr(config)
    info = parse_service_url("pathinfoservices", "postgres://h/db")  # the short scheme too
    assert isinstance(info, PostgresPathInfoServiceConfig) and info.type_tag == "postgres"
    assert (info.pool_min, info.pool_max, info.connect_timeout) == (1, 10, 10)


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("pool_maks=3", "unknown option 'pool_maks' (known: connect_timeout, pool_max, pool_min; libpq: "),
        ("pool_max=x", "option pool_max must be a whole number ≥ 1, got 'x'"),
        ("pool_max=0", "option pool_max must be a whole number ≥ 1"),
        ("pool_max=²", "must be a whole number"),
        ("connect_timeout=-1", "option connect_timeout must be a whole number ≥ 1"),
        ("connect_timeout=1.5", "option connect_timeout must be a whole number"),
        ("pool_min=5&pool_max=2", "need 0 ≤ pool_min ≤ pool_max"),
        ("pool_max=2&pool_max=3", "option 'pool_max' given twice"),
        ("sslmode=require&sslmode=disable", "option 'sslmode' given twice"),
        ("password=x", "unknown option 'password'"),
        ("dbname=other", "unknown option 'dbname'"),
        ("bad", "invalid options"),
    ],
)
def test_bad_url_options(query: str, fragment: str) -> None:
    with pytest.raises(ConfigurationError) as e:
        parse_service_url("directoryservices", f"postgresql://u:{SECRET}@h:5432/db?{query}")
    assert fragment in str(e.value)
    assert SECRET not in str(e.value) and "u:***@h:5432/db" in str(e.value)


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("postgresql+tcp://h/db", "unknown type 'postgresql+tcp'"),
        (f"postgresql://u:{SECRET}@h:notaport/db", "invalid PostgreSQL URL"),
        ("postgresql://h/db#frag", "takes no #fragment"),
    ],
)
def test_bad_urls(url: str, fragment: str) -> None:
    with pytest.raises(ConfigurationError) as e:
        parse_service_url("pathinfoservices", url)
    assert fragment in str(e.value) and SECRET not in str(e.value)


def test_composition_tables() -> None:
    config = PostgresDirectoryServiceConfig.from_table({"url": "postgresql://h/db?sslmode=disable", "pool_max": 4}, "d")
    assert config.pool_max == 4 and config.url == "postgresql://h/db?sslmode=disable"
    bad: list[tuple[dict[str, object], str]] = [
        ({"url": "postgresql://h/db?pool_max=3"}, "nixcas options are fields of the table"),
        ({"url": "postgresql://h/db", "pool_max": "3"}, "expected an integer"),
        ({"url": "postgresql://h/db", "pool_maks": 3}, "unknown field 'pool_maks'"),
        ({"url": "http://h/db"}, "url must start with postgresql://"),
        ({"url": "postgresql://h/db", "connect_timeout": 0}, "connect_timeout must be at least 1 second"),
        ({"url": "postgresql://h/db", "pool_min": 3, "pool_max": 2}, "need 0 ≤ pool_min ≤ pool_max"),
        ({}, "missing field 'url'"),
    ]
    for table, fragment in bad:
        with pytest.raises(ConfigurationError, match=fragment):
            PostgresPathInfoServiceConfig.from_table(table, "pathinfoservices.root")


# -- faults ----------------------------------------------------------------------


async def test_unreachable_server_at_start() -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql://nixcas:{SECRET}@127.0.0.1:{port}/db?connect_timeout=2"
    started = time.monotonic()
    with pytest.raises(UnavailableError) as e:
        await directory_service_from_url(url)
    assert time.monotonic() - started < 5
    assert f"127.0.0.1:{port}/db" in str(e.value) and "cannot connect" in str(e.value)
    assert SECRET not in str(e.value)


async def test_wrong_password(pg_server: PostgresServer, pg_url: str) -> None:
    dbname = pg_url.rsplit("/", 1)[1]
    for make in (directory_service_from_url, pathinfo_service_from_url):
        with pytest.raises(ConfigurationError) as e:
            await make(pg_server.url(dbname, password=SECRET))
        assert "authentication failed for user 'nixcas'" in str(e.value)
        assert SECRET not in str(e.value) and PASSWORD not in str(e.value)


async def test_missing_database(pg_server: PostgresServer) -> None:
    with pytest.raises(ConfigurationError) as e:
        await pathinfo_service_from_url(pg_server.url("no_such_db"))
    assert "no_such_db" in str(e.value) and "does not exist" in str(e.value) and PASSWORD not in str(e.value)


async def test_server_restart_during_a_session(private_server: PostgresServer) -> None:
    server = private_server
    url = server.url(server.create_database(), query="connect_timeout=2&pool_min=2")
    dirs = await directory_service_from_url(url)
    infos = await pathinfo_service_from_url(url)
    try:
        root = await upload_complicated(dirs)
        info = make_path_info("restarted", 1)
        await infos.put(info)

        server.restart()  # between two calls: invisible (dead connections are replaced, reads retried)
        assert [d.digest async for d in dirs.get_recursive(root)] == [root, DIRECTORY_WITH_KEEP.digest]
        assert await infos.get(info.store_path.digest) == info

        server.stop()  # during the outage: a clear error within the timeout, not a hang
        for call in (dirs.get(root), infos.get(info.store_path.digest), infos.put(info), dirs.put(DIRECTORY_A())):
            started = time.monotonic()
            with pytest.raises(UnavailableError) as e:
                await call
            assert time.monotonic() - started < 6
            assert f"127.0.0.1:{server.port}/" in str(e.value) and PASSWORD not in str(e.value)

        server.start()  # back: the pools reconnect (with backoff, so allow them a few seconds)
        back = time.monotonic()
        assert await eventually(lambda: infos.get(info.store_path.digest)) == info
        assert await eventually(lambda: dirs.get(root)) == DIRECTORY_COMPLICATED
        assert time.monotonic() - back < 10
        assert [i.store_path async for i in infos.list()] == [info.store_path]
    finally:
        await dirs.close()
        await infos.close()


async def eventually(call: Callable[[], Awaitable[T]], seconds: float = 15) -> T:
    """``call()``'s result once it stops raising :class:`UnavailableError`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return await call()
        except UnavailableError:
            assert time.monotonic() < deadline, "the pool did not recover"
            await asyncio.sleep(0.2)


def DIRECTORY_A() -> Directory:
    return Directory([(b"a", FileNode(EMPTY_DIGEST, 0))])


async def test_closed_service_refuses_calls(pg_url: str) -> None:
    svc = await directory_service_from_url(pg_url)
    await svc.close()
    await svc.close()  # twice is fine
    with pytest.raises(StorageError, match="is closed"):
        await svc.get(DIRECTORY_COMPLICATED.digest)


async def test_a_failing_closure_leaves_nothing(pg_url: str) -> None:
    """One statement per closure: a row failing the table's check aborts all of them."""
    svc = await directory_service_from_url(pg_url)
    try:
        items = [(DIRECTORY_WITH_KEEP.digest, DIRECTORY_WITH_KEEP.encode()), (B3Digest(bytes(32)), b"")]
        items.append((bytes(31), b"bad row"))  # type: ignore[arg-type]  # an impossible digest
        with pytest.raises(StorageError, match="directory database") as e:
            await svc._put_raw(items)
        assert not isinstance(e.value, UnavailableError)
        assert sql(pg_url, "SELECT count(*) FROM nixcas_directories") == [(0,)]
        assert await svc.get(DIRECTORY_WITH_KEEP.digest) is None
        # the rejected-upload path of the putter stores nothing either
        putter = svc.put_multiple_start()
        await putter.put(DIRECTORY_WITH_KEEP)
        await putter.abort()
        assert sql(pg_url, "SELECT count(*) FROM nixcas_directories") == [(0,)]
    finally:
        await svc.close()


async def test_bad_pathinfo_row_is_a_storage_error(pg_url: str) -> None:
    svc = await pathinfo_service_from_url(pg_url)
    try:
        with pytest.raises(StorageError, match="path info database"):
            await svc._put_raw(bytes(19), b"x")  # the table's length check
    finally:
        await svc.close()


async def test_list_streams_through_a_server_side_cursor(pg_url: str) -> None:
    count = 5000
    infos = [make_path_info(f"p{i}", i) for i in range(count)]
    svc = await pathinfo_service_from_url(pg_url)  # creates the table
    assert isinstance(svc, PostgresPathInfoService)
    try:
        sql(
            pg_url,
            "INSERT INTO nixcas_pathinfo (digest, data) SELECT * FROM unnest(%s::bytea[], %s::bytea[])",
            ([i.store_path.digest for i in infos], [i.encode() for i in infos]),
        )
        svc.fetch_size = 300
        seen: set[bytes] = set()
        fetches: list[str] = []
        async for info in svc.list():
            if not seen:  # mid-stream: the server holds the cursor and we fetch pages of it
                fetches = [
                    str(row[0])
                    for row in sql(pg_url, "SELECT query FROM pg_stat_activity WHERE query LIKE 'FETCH FORWARD%%'")
                ]
            seen.add(info.store_path.digest)
        assert len(seen) == count == len({i.store_path.digest for i in infos})
        assert fetches == ['FETCH FORWARD 300 FROM "nixcas_pathinfo_list"']
        # an abandoned listing gives its connection back
        async for _ in svc.list():
            break
        assert len([i async for i in svc.list()]) == count
    finally:
        await svc.close()


# -- schema ----------------------------------------------------------------------


async def test_schema_is_migrated_once_and_reopened_unchanged(pg_url: str) -> None:
    for _ in range(2):
        dirs = await directory_service_from_url(pg_url)
        root = await upload_complicated(dirs)
        await dirs.close()
        infos = await pathinfo_service_from_url(pg_url)
        await infos.close()
    assert sorted(sql(pg_url, "SELECT component, version FROM nixcas_schema")) == [("directories", 2), ("pathinfo", 1)]
    dirs = await directory_service_from_url(pg_url)
    try:
        assert [d.digest async for d in dirs.get_recursive(root)] == [root, DIRECTORY_WITH_KEEP.digest]
    finally:
        await dirs.close()


async def test_database_of_schema_1_with_directories_follows_tvix(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A database made before the size rule was recorded (schema 1) holds tvix-rule trees."""
    dirs = await directory_service_from_url(pg_url)
    await upload_complicated(dirs)
    await dirs.close()
    sql(pg_url, "DROP TABLE nixcas_directories_meta")
    sql(pg_url, "UPDATE nixcas_schema SET version = 1 WHERE component = 'directories'")
    monkeypatch.setenv("NIXCAS_DIRECTORY_SIZE_RULE", "snix")
    with pytest.raises(ConfigurationError, match="follows the tvix directory size rule, not the requested snix"):
        await directory_service_from_url(pg_url)
    monkeypatch.delenv("NIXCAS_DIRECTORY_SIZE_RULE")
    dirs = await directory_service_from_url(pg_url)
    try:
        assert dirs.size_rule is SizeRule.TVIX
    finally:
        await dirs.close()
    assert sql(pg_url, "SELECT key, value FROM nixcas_directories_meta") == [("directory_size_rule", "tvix")]


async def test_schema_newer_than_this_nixcas_is_refused(pg_url: str) -> None:
    await (await pathinfo_service_from_url(pg_url)).close()
    sql(pg_url, "UPDATE nixcas_schema SET version = 99 WHERE component = 'pathinfo'")
    with pytest.raises(StorageError, match="version 99, newer than this nixcas knows"):
        await pathinfo_service_from_url(pg_url)


async def test_concurrent_start_on_one_database(pg_url: str) -> None:
    """Daemons starting together queue on the advisory lock; none fails on a half-made schema."""
    opened = await asyncio.gather(
        *[directory_service_from_url(pg_url) for _ in range(6)],
        *[pathinfo_service_from_url(pg_url) for _ in range(6)],
    )
    try:
        assert sorted(sql(pg_url, "SELECT component, version FROM nixcas_schema")) == [
            ("directories", 2),
            ("pathinfo", 1),
        ]
        assert {svc.size_rule for svc in opened[:6]} == {SizeRule.TVIX}  # type: ignore[attr-defined]
        first, last = opened[0], opened[5]
        assert isinstance(first, DirectoryService) and isinstance(last, DirectoryService)
        root = await upload_complicated(first)
        assert await last.get(root) == DIRECTORY_COMPLICATED
    finally:
        for svc in opened:
            await svc.close()


# -- garbage collection ----------------------------------------------------------


async def scan_all(svc: PostgresDirectoryService) -> dict[B3Digest, StoredObject]:
    return {o.digest: o async for batch in svc.scan_directories() for o in batch}


async def test_sweepable_directory_contract(pg_url: str) -> None:
    dirs = await directory_service_from_url(pg_url)
    assert isinstance(dirs, PostgresDirectoryService)
    try:
        leaf = Directory([(b"f", FileNode(EMPTY_DIGEST, 0))])
        top = Directory([(b"leaf", leaf.node(SizeRule.TVIX))])
        before = time.time_ns()
        await dirs.put(leaf)
        await dirs.put(top)
        stored = await scan_all(dirs)
        assert set(stored) == {leaf.digest, top.digest}
        assert stored[leaf.digest].size == len(leaf.encode()) and stored[leaf.digest].mtime_ns >= before
        assert len((await dirs.delete_directories(list(stored.values()), before)).kept) == 2
        await asyncio.sleep(0.01)
        await dirs.put(leaf)  # a re-put makes it young again
        assert (await scan_all(dirs))[leaf.digest].mtime_ns > stored[leaf.digest].mtime_ns
        cutoff = time.time_ns() + 1
        done = await dirs.delete_directories([stored[top.digest]], cutoff)
        assert done.deleted == [stored[top.digest]] and done.kept == [] and await dirs.get(top.digest) is None
        assert await dirs.get(leaf.digest) == leaf
        again = await dirs.delete_directories([stored[top.digest]], cutoff)  # already gone: neither list
        assert again.deleted == [] and again.kept == []
    finally:
        await dirs.close()


async def test_scan_pages_through_many_directories(pg_url: str) -> None:
    dirs = await directory_service_from_url(pg_url)
    assert isinstance(dirs, PostgresDirectoryService)
    try:
        many = [Directory([(f"f{i}".encode(), FileNode(EMPTY_DIGEST, 0))]) for i in range(2500)]
        await dirs._put_raw([(d.digest, d.encode()) for d in many])  # one statement
        batches = [len(b) async for b in dirs.scan_directories()]
        assert batches == [1000, 1000, 500]
        assert set(await scan_all(dirs)) == {d.digest for d in many}
    finally:
        await dirs.close()


async def test_collect_over_postgres_directories(pg_url: str) -> None:
    blobs = MemoryBlobService()
    dirs = await directory_service_from_url(pg_url)
    try:
        keep = await blobs.put(b"keep")
        drop = await blobs.put(b"drop")
        tree = Directory([(b"k", FileNode(keep, 4))])
        doomed = Directory([(b"d", FileNode(drop, 4))])
        await dirs.put(tree)
        await dirs.put(doomed)
        assert (await collect(blobs, dirs, [], cutoff_ns=0)).freed == 0  # nothing is older than 0
        report = await collect(blobs, dirs, [tree.digest], cutoff_ns=time.time_ns())
        assert report.kinds["blob"].freed == 1 and report.kinds["directory"].freed == 1
        assert await dirs.get(tree.digest) == tree and await dirs.get(doomed.digest) is None
        assert await blobs.has(keep) and not await blobs.has(drop)
    finally:
        await dirs.close()


async def test_delete_paths_on_postgres(pg_url: str) -> None:
    infos = await pathinfo_service_from_url(pg_url)
    try:
        a = make_path_info("a", 2)
        b = make_path_info("b", 2, references=(a.store_path,))
        await infos.put(a)
        await infos.put(b)
        with pytest.raises(ValueError, match="still referenced"):
            await delete_paths(infos, [a.store_path])
        assert [i.store_path for i in await delete_paths(infos, [a.store_path, b.store_path])] == [
            a.store_path,
            b.store_path,
        ]
        assert await infos.get(a.store_path.digest) is None
        assert isinstance(infos, PostgresPathInfoService)
        assert await infos.delete(a.store_path.digest) is False
    finally:
        await infos.close()


# -- the command line ------------------------------------------------------------


def nixcas(store: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_SERVICE_ADDR")}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "nixcas.cli.main",
            "--store-dir",
            str(store),
            "--directory-service-addr",
            url,
            "--path-info-service-addr",
            url,
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


def test_cli_import_read_delete_gc(tmp_path: Path, pg_url: str) -> None:
    store = tmp_path / "store"
    tree = tmp_path / "hello"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "greeting").write_bytes(b"Hello World!\n")
    (tree / "top").write_bytes(b"top\n")
    imported = nixcas(store, pg_url, "import", str(tree))
    assert imported.returncode == 0, imported.stderr
    store_path = imported.stdout.split()[0]
    assert store_path.startswith("/nix/store/") and store_path.endswith("-hello")

    info = nixcas(store, pg_url, "path-info", "--json", store_path)
    assert info.returncode == 0, info.stderr
    root = json.loads(info.stdout)
    assert sql(pg_url, "SELECT count(*) FROM nixcas_directories") == [(2,)]  # the directories are in PostgreSQL
    assert sql(pg_url, "SELECT count(*) FROM nixcas_pathinfo") == [(1,)]
    listing = nixcas(store, pg_url, "castore", "ls", root["rootNode"]["digest"], "--json")
    assert listing.returncode == 0, listing.stderr
    assert {json.loads(line)["name"] for line in listing.stdout.splitlines()} == {"sub", "top"}

    kept = nixcas(store, pg_url, "gc", "--json", "--grace", "0s")
    assert kept.returncode == 0, kept.stderr
    assert json.loads(kept.stdout)["kinds"]["directory"]["freed"] == 0  # still reachable from its PathInfo

    deleted = nixcas(store, pg_url, "delete", store_path)
    assert deleted.returncode == 0 and deleted.stdout.strip() == f"deleted {store_path}", deleted.stderr
    collected = nixcas(store, pg_url, "gc", "--json", "--grace", "0s")
    assert collected.returncode == 0, collected.stderr
    assert json.loads(collected.stdout)["kinds"]["directory"]["freed"] == 2
    assert sql(pg_url, "SELECT count(*) FROM nixcas_directories") == [(0,)]
    gone = nixcas(store, pg_url, "path-info", store_path)
    assert gone.returncode == 1 and "not in the store" in gone.stderr


def test_cli_errors_are_one_line(tmp_path: Path, pg_server: PostgresServer) -> None:
    wrong = nixcas(tmp_path / "s", pg_server.url("postgres", password=SECRET), "castore", "ls", "0" * 64)
    assert wrong.returncode != 0 and len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr
    assert "authentication failed" in wrong.stderr and SECRET not in wrong.stderr
    down = nixcas(tmp_path / "s", f"postgresql://u:{SECRET}@127.0.0.1:{free_port()}/db", "castore", "ls", "0" * 64)
    assert down.returncode != 0 and len(down.stderr.strip().splitlines()) == 1, down.stderr
    assert "cannot connect" in down.stderr and SECRET not in down.stderr


def test_config_target_uses_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGHOST", "envhost")
    monkeypatch.setenv("PGPORT", "7777")
    monkeypatch.setenv("PGDATABASE", "envdb")
    config = PostgresConfig("postgresql://")
    assert config.target() == "envhost:7777/envdb"


async def test_a_read_whose_connection_died_is_retried_once(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    svc = await directory_service_from_url(pg_url)
    assert isinstance(svc, PostgresDirectoryService)
    try:
        root = await upload_complicated(svc)
        db = svc._db
        real = db._attempt
        failures = [psycopg.OperationalError("server closed the connection unexpectedly")]

        async def flaky(fn: Callable[[Connection], Awaitable[T]], transaction: bool) -> T:
            if failures:
                raise failures.pop()
            return await real(fn, transaction)

        monkeypatch.setattr(db, "_attempt", flaky)
        assert await svc.get(root) == DIRECTORY_COMPLICATED  # retried on a fresh connection
        failures.append(psycopg.OperationalError("server closed the connection unexpectedly"))
        stored = await scan_all(svc)
        failures.append(psycopg.OperationalError("server closed the connection unexpectedly"))
        with pytest.raises(UnavailableError, match="server closed the connection"):  # deletes are not retried
            await svc.delete_directories(list(stored.values()), 0)
        failures.extend([psycopg.OperationalError("still gone"), psycopg.OperationalError("gone")])
        with pytest.raises(UnavailableError, match="still gone"):  # only once
            await svc.get(root)
    finally:
        await svc.close()


async def test_a_listing_whose_connection_dies_fails_clearly(pg_url: str) -> None:
    svc = await pathinfo_service_from_url(pg_url)
    assert isinstance(svc, PostgresPathInfoService)
    try:
        for i in range(50):
            await svc.put(make_path_info(f"l{i}", i))
        svc.fetch_size = 10
        listed: list[object] = []

        async def consume() -> None:
            async for info in svc.list():
                listed.append(info)
                if len(listed) == 1:  # the server drops our cursor's connection mid-stream
                    sql(
                        pg_url,
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE query LIKE 'FETCH FORWARD%%' AND pid <> pg_backend_pid()",
                    )

        with pytest.raises(UnavailableError, match="path info database"):
            await consume()
        assert 1 <= len(listed) <= 10
        assert len([i async for i in svc.list()]) == 50  # the pool replaced the dead connection
    finally:
        await svc.close()


async def test_overlapping_closures_written_concurrently_do_not_deadlock(pg_url: str) -> None:
    """Two daemons storing closures that share directories, in opposite orders, at once."""
    a, b = await directory_service_from_url(pg_url), await directory_service_from_url(pg_url)
    assert isinstance(a, PostgresDirectoryService) and isinstance(b, PostgresDirectoryService)
    try:
        for round_ in range(20):
            items = [
                (B3Digest(blake3.blake3(f"{round_}/{i}".encode()).digest()), f"{round_}/{i}".encode())
                for i in range(300)
            ]
            await asyncio.gather(a._put_raw(items), b._put_raw(items[::-1]), a._put_raw(items[::2]))
    finally:
        await a.close()
        await b.close()


def test_only_lost_connections_count_as_unavailable() -> None:
    from nixcas._postgres import _connection_lost

    assert _connection_lost(psycopg.OperationalError("connection closed"))
    assert not _connection_lost(psycopg.errors.DeadlockDetected())
    assert not _connection_lost(psycopg.errors.QueryCanceled())
    assert _connection_lost(psycopg.errors.AdminShutdown())
    assert _connection_lost(psycopg.errors.lookup("57P05")())  # idle session timeout

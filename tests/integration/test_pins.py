"""Pin services: one contract over every backend, the registry and composition, the default, the gc refusal."""

from __future__ import annotations

import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import grpc.aio
import pytest

from nixcas._proto.nixcas.pin.v1 import pin_pb2
from nixcas.api import Store, default_pin_service, embedded_pin_service_url
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.gc import WriteLeases
from nixcas.castore.pins import Pin, PinService
from nixcas.castore.pins.grpc import GrpcPinService, GrpcPinServiceConfig
from nixcas.castore.pins.memory import MemoryPinService
from nixcas.castore.pins.postgres import PostgresPinService, PostgresPinServiceConfig
from nixcas.castore.pins.sqlite import SqlitePinService, SqlitePinServiceConfig
from nixcas.castore.sizerule import SizeRule
from nixcas.composition import Composition, pin_service_from_url
from nixcas.errors import ConfigurationError, StorageError, ValidationError
from nixcas.registry import parse_service_url
from nixcas.server import RunningServer, start_server
from nixcas.store.gc import collect_garbage
from nixcas.testing.daemon import clean_env, nixcas_command, short_tmpdir
from nixcas.testing.maintenance import one_line_error
from nixcas.testing.matrix import check_covers

D1 = B3Digest.of(b"one")
D2 = B3Digest.of(b"two")
D3 = B3Digest.of(b"three")

Opener = Callable[[], Awaitable[PinService]]


async def _served(pins: PinService, sock: Path) -> tuple[RunningServer, GrpcPinService]:
    running = await start_server(str(sock), MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX), pins=pins)
    client = await pin_service_from_url(running.url + "?wait-connect=1")
    assert isinstance(client, GrpcPinService)
    return running, client


PIN_BACKENDS = ("memory", "sqlite", "postgresql", "grpc")
"""The pin service tags the contract below runs (tests/unit/test_contract_matrix.py reads it)."""


@pytest.fixture(params=PIN_BACKENDS)
async def opener(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens the backend under test; every opening sees the same pins (except memory: one instance)."""
    kind = request.param
    opened: list[PinService] = []
    servers: list[RunningServer] = []
    shared_memory = MemoryPinService()
    with short_tmpdir() as sockets:

        async def open_one() -> PinService:
            if kind == "memory":
                check_covers("pinservices", [kind], shared_memory)
                return shared_memory
            if kind == "sqlite":
                service: PinService = await pin_service_from_url(f"sqlite://{tmp_path / 'pins.sqlite'}")
            elif kind == "postgresql":
                service = await pin_service_from_url(request.getfixturevalue("pg_url"))
            else:
                backing = await pin_service_from_url(f"sqlite://{tmp_path / 'served.sqlite'}")
                opened.append(backing)
                running, service = await _served(backing, sockets / f"s{len(servers)}.sock")
                servers.append(running)
            opened.append(service)
            check_covers("pinservices", [kind], service)
            return service

        yield open_one
        for service in opened:
            await service.close()
        for running in servers:
            await running.stop(0)


async def test_contract_pin_list_move_unpin(opener: Opener) -> None:
    pins = await opener()
    assert await pins.list() == []
    before = time.time_ns()
    assert await pins.pin("zeta", D1) is None
    assert await pins.pin("alpha", D2) is None
    listed = await pins.list()
    assert [(p.name, p.digest) for p in listed] == [("alpha", D2), ("zeta", D1)]
    assert all(isinstance(p.digest, B3Digest) for p in listed)
    # created is the time of pinning (a database clock may be a little behind ours)
    assert all(before - 5 * 10**9 <= p.created_ns <= time.time_ns() + 5 * 10**9 for p in listed)

    old = await pins.pin("zeta", D3)  # pinning a name again moves it
    assert isinstance(old, Pin) and (old.name, old.digest) == ("zeta", D1)
    assert [(p.name, p.digest) for p in await pins.list()] == [("alpha", D2), ("zeta", D3)]

    assert await pins.unpin("zeta") is True
    assert await pins.unpin("zeta") is False
    assert await pins.unpin("never") is False
    assert [(p.name, p.digest) for p in await pins.list()] == [("alpha", D2)]


async def test_contract_names_sort_by_code_point(opener: Opener) -> None:
    pins = await opener()
    names = ["b", "B", "a-1", "a", "ä", "Z9", "日本"]
    for name in names:
        await pins.pin(name, D1)
    assert [p.name for p in await pins.list()] == sorted(names)


@pytest.mark.parametrize(
    ("name", "digest", "fragment"),
    [
        ("", D1, "1 to 255"),
        ("x" * 256, D1, "1 to 255"),
        ("has space", D1, "whitespace"),
        ("a/b", D1, "'/'"),
        ("line\nbreak", D1, "whitespace"),
        ("ok", b"short", "digest length"),
    ],
)
async def test_contract_bad_pins_are_refused_and_store_nothing(
    opener: Opener, name: str, digest: bytes, fragment: str
) -> None:
    pins = await opener()
    with pytest.raises(ValidationError, match=fragment):
        await pins.pin(name, digest)  # type: ignore[arg-type]
    assert await pins.list() == []


async def test_contract_pins_are_seen_by_another_opening(opener: Opener) -> None:
    """What one client pins, another (a process restart, another host) sees."""
    first, second = await opener(), await opener()
    await first.pin("shared", D1)
    assert [(p.name, p.digest) for p in await second.list()] == [("shared", D1)]
    assert await second.unpin("shared")
    assert await first.list() == []


def test_per_host_is_what_only_this_host_sees() -> None:
    assert MemoryPinService.per_host and SqlitePinService.per_host
    assert not PostgresPinService.per_host and not GrpcPinService.per_host


# -- the wire --------------------------------------------------------------------------------------------


async def test_server_refuses_invalid_pins_with_invalid_argument(tmp_path: Path) -> None:
    backing = MemoryPinService()
    with short_tmpdir() as sockets:
        running, client = await _served(backing, sockets / "s.sock")
        try:
            async with grpc.aio.insecure_channel(f"unix:{sockets / 's.sock'}") as channel:
                call = channel.unary_unary(
                    "/nixcas.pin.v1.PinService/Pin",
                    request_serializer=pin_pb2.PinRequest.SerializeToString,
                    response_deserializer=pin_pb2.PinResponse.FromString,
                )
                for request in (pin_pb2.PinRequest(name="a b", digest=D1), pin_pb2.PinRequest(name="a", digest=b"x")):
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await call(request)
                    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert await backing.list() == []
        finally:
            await client.close()
            await running.stop(0)


async def test_a_daemon_without_pins_is_an_error_not_an_empty_list(tmp_path: Path) -> None:
    with short_tmpdir() as sockets:
        running = await start_server(
            str(sockets / "s.sock"), MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX)
        )
        client = await pin_service_from_url(running.url)
        try:
            with pytest.raises(StorageError, match="serves no pin service"):
                await client.list()
            with pytest.raises(StorageError, match="serves no pin service"):
                await client.pin("x", D1)
        finally:
            await client.close()
            await running.stop(0)


# -- registry, composition, default ----------------------------------------------------------------------


def test_urls_and_tables() -> None:
    assert isinstance(parse_service_url("pinservices", "sqlite:///x/pins.sqlite"), SqlitePinServiceConfig)
    assert isinstance(parse_service_url("pinservices", "postgres://u@h/db"), PostgresPinServiceConfig)
    assert parse_service_url("pinservices", "grpc+unix:///run/d.sock") == GrpcPinServiceConfig(
        "grpc+unix:///run/d.sock"
    )
    with pytest.raises(ConfigurationError, match="unknown type 'objectstore'"):
        parse_service_url("pinservices", "objectstore+s3://bucket/p")
    with pytest.raises(ConfigurationError, match=r"pinservices\.root: unknown type"):
        Composition.from_dict({"pinservices": {"root": {"type": "lru"}}})


async def test_composition_root_is_the_pin_service(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'[pinservices.root]\ntype = "sqlite"\npath = "{tmp_path / "composed.sqlite"}"\n')
    async with await Store.open(tmp_path / "store", composition=path, with_pins=True) as store:
        assert isinstance(store.pins, SqlitePinService) and store.pins.path == str(tmp_path / "composed.sqlite")


def _default(composition: Composition, directories: str, pathinfos: str, store_dir: Path) -> object:
    return default_pin_service(
        composition, [("directoryservices", directories), ("pathinfoservices", pathinfos)], store_dir
    )


def test_default_follows_the_store(tmp_path: Path) -> None:
    c = Composition()
    pg = "postgresql://u@db.example:5433/nix?pool_max=7&sslmode=require"
    local = f"sqlite://{tmp_path / 'd.sqlite'}"
    # PostgreSQL directories or path infos: the same database
    found = _default(c, pg, local, tmp_path)
    assert (
        isinstance(found, PostgresPinServiceConfig)
        and found.url == "postgresql://u@db.example:5433/nix?sslmode=require"
    )
    found = _default(c, "objectstore+s3://b/p", pg, tmp_path)
    assert isinstance(found, PostgresPinServiceConfig) and "db.example:5433/nix" in found.url
    # a daemon: its pin service
    daemon = "grpc+unix:///run/nixcas.sock?wait-connect=1"
    assert _default(c, daemon, daemon, tmp_path) == GrpcPinServiceConfig(daemon)
    # a near cache in front of a daemon: the daemon's pins, never the near cache
    cache = Composition.from_dict({"directoryservices": {"root": {"type": "cache", "near": local, "far": daemon}}})
    assert _default(cache, "root", local, tmp_path) == GrpcPinServiceConfig(daemon)
    # everything local: the embedded store's pins file
    assert _default(c, local, local, tmp_path) == SqlitePinServiceConfig(str(tmp_path.absolute() / "pins.sqlite"))
    assert embedded_pin_service_url(tmp_path) == f"sqlite://{tmp_path.absolute() / 'pins.sqlite'}"


async def test_embedded_store_keeps_its_pins_file(tmp_path: Path) -> None:
    """An existing store's DIR/pins.sqlite stays its pin service."""
    old = SqlitePinService(str(tmp_path / "pins.sqlite"))
    await old.pin("kept", D1)
    await old.close()
    async with await Store.open(tmp_path, with_pins=True) as store:
        assert store.pins is not None and store.shared == []
        assert [(p.name, p.digest) for p in await store.pins.list()] == [("kept", D1)]


async def test_store_open_reports_shared_services(tmp_path: Path, s3_url: str) -> None:
    async with await Store.open(tmp_path, blob_service_url=s3_url, with_pins=True) as store:
        assert store.shared == ["blobs (objectstore)"]
        assert isinstance(store.pins, SqlitePinService)  # nothing to put pins with: gc will refuse


# -- gc refuses per-host pins on a shared store ---------------------------------------------------------


async def test_collect_garbage_refuses_per_host_pins_on_a_shared_store(tmp_path: Path) -> None:
    blobs = MemoryBlobService()
    data = b"pinned only elsewhere"
    async with await blobs.open_write() as writer:
        await writer.write(data)
        digest = await writer.close()
    for pins in (MemoryPinService(), SqlitePinService(str(tmp_path / "p.sqlite")), None):
        with pytest.raises(ConfigurationError, match="refusing to collect a shared store"):
            await collect_garbage(
                blobs,
                MemoryDirectoryService(SizeRule.TVIX),
                None,
                pins,
                WriteLeases(tmp_path / "leases"),
                grace_ns=0,
                shared=["blobs (objectstore)"],
            )
        assert await blobs.has(digest)  # nothing was deleted
        if pins is not None:
            await pins.close()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(nixcas_command(*args), capture_output=True, text=True, env=clean_env(), check=False)


def test_gc_refuses_a_shared_store_with_local_pins(s3_url: str, pg_url: str, tmp_path: Path) -> None:
    shared = ["--store-dir", str(tmp_path / "store"), "--blob-service-addr", s3_url]
    shared += ["--directory-service-addr", pg_url, "--path-info-service-addr", pg_url]
    for pins in (f"sqlite://{tmp_path / 'local-pins.sqlite'}", "memory://"):
        refused = _cli(*shared, "--pin-service-addr", pins, "gc", "--grace", "1h")
        one_line_error(refused, 2, "refusing to collect a shared store")
        assert "seen on this host only" in refused.stderr
    # A pin service that cannot be reached: a clear error, nothing collected.
    with short_tmpdir() as sockets:
        gone = f"grpc+unix://{sockets / 'nobody.sock'}?wait-connect=1&connect-timeout=1"
        unreachable = _cli(*shared, "--pin-service-addr", gone, "gc", "--grace", "1h")
        assert unreachable.returncode == 1
        one_line_error(unreachable, 1, "cannot connect")
    # The default (pins in the same PostgreSQL database) is accepted.
    ok = _cli(*shared, "gc", "--grace", "1h")
    assert ok.returncode == 0, ok.stderr
    assert "roots: 0 path infos, 0 pins" in ok.stderr


def test_pin_service_addr_option_and_environment(tmp_path: Path) -> None:
    """`--pin-service-addr` / `PIN_SERVICE_ADDR` choose where `castore ingest --pin`, `pin` and `pins` go."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"pinned elsewhere\n")
    store = ["--store-dir", str(tmp_path / "store")]
    chosen = f"sqlite://{tmp_path / 'chosen.sqlite'}"
    env = {**clean_env(), "PIN_SERVICE_ADDR": chosen}
    ingest = subprocess.run(
        nixcas_command(*store, "castore", "ingest", "--pin", "by-env", str(tmp_path / "src")),
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert ingest.returncode == 0, ingest.stderr
    digest = ingest.stdout.split()[1]
    listed = _cli(*store, "--pin-service-addr", chosen, "castore", "pins")
    assert listed.stdout.split("\t")[:2] == ["by-env", digest]
    assert _cli(*store, "castore", "pins").stdout == ""  # not in the embedded DIR/pins.sqlite
    bad = _cli(*store, "--pin-service-addr", "objectstore+s3://b/p", "castore", "pins")
    one_line_error(bad, 2, "invalid pin service URL")

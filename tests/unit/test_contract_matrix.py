"""Every entry of the registry runs a contract suite, or is excluded here with a reason that is checked.

The contract suites (:mod:`nixcas.testing.blobservice`, :mod:`~nixcas.testing.directoryservice`,
:mod:`~nixcas.testing.pathinfoservice`) are subclassed per backend in the test modules; each subclass
names the registry tags it runs in ``covers``, and the suite checks that claim against the service its
fixture builds before every test (:func:`nixcas.testing.matrix.check_covers`).  Pin services share one
parametrized contract (``PIN_BACKENDS`` in tests/integration/test_pins.py).  A backend added to
:data:`nixcas.registry.KINDS` without a suite makes
:func:`test_every_registry_entry_runs_a_contract_suite_or_is_excluded` fail.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.dirs.sqlite import SqliteDirectoryService
from nixcas.registry import KINDS
from nixcas.testing.blobservice import BlobServiceSuite
from nixcas.testing.directoryservice import DirectoryServiceSuite
from nixcas.testing.matrix import check_covers, uncovered
from nixcas.testing.pathinfoservice import PathInfoServiceSuite

TESTS = Path(__file__).resolve().parents[1]

SUITES: dict[str, type] = {
    "blobservices": BlobServiceSuite,
    "directoryservices": DirectoryServiceSuite,
    "pathinfoservices": PathInfoServiceSuite,
}

ALIASES: dict[tuple[str, str], str] = {
    ("directoryservices", "postgres"): "postgresql",
    ("pathinfoservices", "postgres"): "postgresql",
    ("pinservices", "postgres"): "postgresql",
}
"""Tags that only rename another tag's backend (checked by :func:`test_aliases_only_rename`)."""

ALIAS_REASON = "the short scheme of postgresql://: the same backend under another tag (test_aliases_only_rename)"

EXCLUDED: dict[str, dict[str, str]] = {
    "blobservices": {},
    "directoryservices": {"postgres": ALIAS_REASON},
    "pathinfoservices": {
        "postgres": ALIAS_REASON,
        "nix": (
            "read-only substitution from a Nix binary cache: put is refused, so the write-then-read "
            "contract cannot run; tests/unit/test_upstream.py checks it against a static cache it writes"
        ),
    },
    "pinservices": {"postgres": ALIAS_REASON},
}
"""Registry tags without a contract-suite run, each with the reason."""


def suite_modules() -> Iterator[ModuleType]:
    """The test modules that subclass a contract suite (imported as pytest imports them: by name)."""
    for path in sorted([*TESTS.glob("test_*.py"), *TESTS.glob("*/test_*.py")]):
        if path.stem != Path(__file__).stem and "ServiceSuite" in path.read_text():
            yield importlib.import_module(path.stem)


def subclasses(cls: type) -> Iterator[type]:
    sub: type
    for sub in cls.__subclasses__():
        yield sub
        yield from subclasses(sub)


@pytest.fixture(scope="module")
def covered() -> dict[str, set[str]]:
    """Registry kind → the tags some test class (or the pin contract) runs."""
    modules = list(suite_modules())
    names = {m.__name__ for m in modules}
    found: dict[str, set[str]] = {kind: set() for kind in KINDS}
    for kind, suite in SUITES.items():
        for cls in subclasses(suite):
            if cls.__module__ in names and cls.__name__.startswith("Test"):
                found[kind].update(getattr(cls, "covers", ()))
    found["pinservices"].update(importlib.import_module("test_pins").PIN_BACKENDS)
    return found


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_registry_entry_runs_a_contract_suite_or_is_excluded(kind: str, covered: dict[str, set[str]]) -> None:
    assert uncovered(KINDS[kind], covered[kind], EXCLUDED[kind]) == []


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_exclusions_are_current(kind: str, covered: dict[str, set[str]]) -> None:
    """An exclusion names a registry tag that no suite runs, with a reason."""
    for tag, reason in EXCLUDED[kind].items():
        assert tag in KINDS[kind], f"{kind} {tag!r} is excluded but not in the registry"
        assert tag not in covered[kind], f"{kind} {tag!r} is excluded but a suite runs it: drop the exclusion"
        assert len(reason.split()) >= 5, f"{kind} {tag!r}: say why"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_covers_names_registry_tags(kind: str, covered: dict[str, set[str]]) -> None:
    assert covered[kind] <= set(KINDS[kind])


def test_aliases_only_rename() -> None:
    """An alias config is its target's config with another tag, and nothing else of its own."""
    for (kind, alias), target in ALIASES.items():
        assert EXCLUDED[kind][alias] == ALIAS_REASON
        alias_config, target_config = KINDS[kind][alias], KINDS[kind][target]
        assert alias_config.__bases__ == (target_config,)
        own = {name for name in vars(alias_config) if not name.startswith("_")} - {"type_tag"}
        assert own == set(), f"{alias_config.__qualname__} defines {sorted(own)}"
        assert [f.name for f in dataclasses.fields(alias_config)] == [f.name for f in dataclasses.fields(target_config)]


def test_a_new_backend_without_a_suite_is_reported() -> None:
    assert uncovered(["memory", "grpc", "new"], ["memory"], {"grpc": "served by another process here"}) == ["new"]
    assert uncovered(["memory", "new"], ["memory"], {"new": "  "}) == ["new"]  # a blank reason is no reason
    assert uncovered(["memory"], ["memory"], {}) == []


class _Sub(MemoryBlobService):
    """A test's own variant of a backend still is that backend."""


def test_check_covers_compares_the_claim_with_the_service() -> None:
    check_covers("blobservices", ("memory",), MemoryBlobService())
    check_covers("blobservices", ("memory",), _Sub())
    check_covers("blobservices", (), object())
    with pytest.raises(AssertionError, match="packed"):
        check_covers("blobservices", ("packed",), MemoryBlobService())
    with pytest.raises(AssertionError, match="memory"):
        check_covers("directoryservices", ("memory",), SqliteDirectoryService.__new__(SqliteDirectoryService))

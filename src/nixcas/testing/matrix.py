"""Which registry entries the contract suites run.

Each suite subclass names the registry tags it exercises in ``covers`` (say
``covers = ("cache",)`` for a ``cache://`` directory service).  The suite's
autouse fixture calls :func:`check_covers` before every test, so a class cannot
claim a backend its fixture does not build; ``tests/unit/test_contract_matrix.py``
then checks that every tag of :data:`nixcas.registry.KINDS` is claimed by some
suite or excluded with a reason.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterable, Mapping

from nixcas.registry import KINDS

__all__ = ["check_covers", "uncovered"]


def check_covers(kind: str, covers: Iterable[str], service: object) -> None:
    """Fail unless ``service`` is an instance of the backend each tag in ``covers`` names.

    One module (or package) per backend: the service (or a class it derives
    from) must be defined in the module of the tag's config class (below it,
    when that module is a package), or be the class that module exports under
    its name (a backend module keeping only its configuration).
    """
    classes = type(service).__mro__
    modules = {cls.__module__ for cls in classes}
    for tag in covers:
        config = KINDS[kind][tag]
        home = config.__module__
        exported = vars(sys.modules[home])  # a backend module may name a service the shared layout defines
        if not any(m == home or m.startswith(home + ".") for m in modules) and not any(
            exported.get(cls.__name__) is cls for cls in classes if not inspect.isabstract(cls)
        ):
            raise AssertionError(
                f"a suite claims {kind} {tag!r} ({config.__module__}) but runs {type(service).__qualname__}"
            )


def uncovered(table: Iterable[str], covered: Iterable[str], excluded: Mapping[str, str]) -> list[str]:
    """The tags of ``table`` neither covered by a suite nor excluded with a reason, sorted."""
    done = set(covered) | {tag for tag, reason in excluded.items() if reason.strip()}
    return sorted(set(table) - done)

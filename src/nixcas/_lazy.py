"""Package names loaded on first use: one module ``__getattr__``/``__dir__`` pair for every package that has them.

A package lists its public names with the module defining each (``_EXPORTS``)
and binds ``__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)``:
importing the package then loads none of those modules, and the first access
to a name imports its module and keeps the value in the package's globals, so
later lookups skip ``__getattr__``.  No import here beyond the builtins (the
package root uses it on every command line start).
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: `import typing` alone is a few ms of every start
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any


def lazy_exports(
    package: str, namespace: dict[str, Any], exports: Mapping[str, str], *, relative: bool = False
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` (``exports``: name → its module, relative to ``package``
    with ``relative``)."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        if relative:
            module = f"{package}.{module}"
        value = getattr(__import__(module, fromlist=[name]), name)  # the module itself, not its top package
        namespace[name] = value  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__

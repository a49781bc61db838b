"""Immutable value classes of the data model, without :mod:`dataclasses`.

Importing :mod:`dataclasses` loads :mod:`inspect` (with ``ast``, ``dis`` and ``tokenize``), and
each dataclass compiles its methods when its module is imported: about 10 ms of every command
that touches a node, a store path or a PathInfo (``dump-path``, ``path-info``, ``castore ls``;
measured in BENCHMARKS.md), a third of a one-file ``dump-path``.  :class:`Record` gives the same
behaviour from the list of fields a subclass declares as ``__match_args__`` (in its constructor's
order, which also makes positional class patterns work): equality with instances of the same
class, a hash, a ``repr``, pickling and :meth:`Record.replace`, and refuses assignment.  Each
subclass writes its own ``__init__`` (checking its values there) and sets its fields with
``object.__setattr__`` (or in ``__dict__``).
"""

from __future__ import annotations

from operator import attrgetter

TYPE_CHECKING = False  # not typing's: the command line's fast paths load nothing else of it
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, ClassVar, Self

__all__ = ["Record"]


class Record:
    """Base of an immutable value class whose fields are ``__match_args__``, in the constructor's order."""

    __slots__ = ()
    __match_args__: ClassVar[tuple[str, ...]] = ()
    _values: ClassVar[Callable[[Record], tuple[Any, ...]]]
    """The fields' values as a tuple (compared, hashed)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fields = cls.__match_args__
        if len(fields) == 1:  # an attrgetter of one name returns the value itself, not a tuple
            get = attrgetter(fields[0])
            cls._values = staticmethod(lambda record: (get(record),))
        else:
            cls._values = attrgetter(*fields)

    def __eq__(self, other: object) -> bool:
        cls = self.__class__
        if other.__class__ is cls:
            return bool(cls._values(self) == cls._values(other))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.__class__._values(self))

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__match_args__)
        return f"{type(self).__qualname__}({shown})"

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of an immutable {type(self).__name__}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of an immutable {type(self).__name__}")

    def __reduce__(self) -> tuple[type[Self], tuple[Any, ...]]:
        return type(self), tuple(getattr(self, name) for name in self.__match_args__)

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` (field name → value), checked by the constructor as any new value is."""
        unknown = changes.keys() - set(self.__match_args__)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {sorted(unknown)[0]!r}")
        values = {name: getattr(self, name) for name in self.__match_args__}
        values.update(changes)
        return type(self)(**values)

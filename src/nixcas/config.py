"""Typed backend configurations, loaded from a URL or from a composition table.

Every backend has a frozen dataclass ``<Backend>Config`` deriving from
:class:`ServiceConfig`.  The same config comes from two places:

* a service URL (``objectstore+file:///var/lib/nixcas/blobs``), via
  :meth:`ServiceConfig.from_url`;
* a table of a TOML composition file (``type = "objectstore"`` plus fields),
  via :meth:`ServiceConfig.from_table`, which checks every key and its type
  against the dataclass fields.

:meth:`ServiceConfig.build` turns a config into a running service; backends
that wrap other services (``combined``, ``cache``) ask the :class:`Resolver`
for them by name.  Every problem is a :class:`~nixcas.errors.ConfigurationError`
raised while parsing, before anything is opened.
"""

from __future__ import annotations

import dataclasses
import types
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Generic,
    Protocol,
    Self,
    TypeVar,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)
from urllib.parse import SplitResult

from nixcas.errors import ConfigurationError
from nixcas.urls import query_options, shown

if TYPE_CHECKING:
    from nixcas.castore.blob.base import BlobService
    from nixcas.castore.dirs.base import DirectoryService
    from nixcas.castore.sizerule import SizeRule

__all__ = ["NearFarConfig", "Resolver", "ServiceConfig", "SqlitePathConfig"]

S_co = TypeVar("S_co", covariant=True)


class Resolver(Protocol):
    """Hands out the services a combinator refers to (by composition name or URL)."""

    owns_instances: bool
    """``True`` when every instance is private to its user (built from one URL):
    a combinator then closes the services it wraps.  In a composition file,
    instances are shared and the composition closes them."""

    size_rule: SizeRule | None
    """The directory size rule asked for (``--directory-size-rule``), if any: a new
    store records it, an existing one must follow it, a gRPC client without
    ``size-rule=`` assumes its peer follows it."""

    async def blob_service(self, name: str) -> BlobService: ...

    async def directory_service(self, name: str) -> DirectoryService: ...

    async def get(self, kind: str, name: str) -> object: ...


def _type_name(tp: object) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def _check_value(value: object, tp: Any, where: str) -> object:
    """``value`` if it has type ``tp`` (str, int, bool, float, ``X | None``, ``dict[str, str]``, ``list[str]``)."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [t for t in get_args(tp) if t is not type(None)]
        return _check_value(value, options[0], where)
    if origin is dict:
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ConfigurationError(f"{where}: expected a table of strings, got {value!r}")
        return dict(value)
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigurationError(f"{where}: expected a list of strings, got {value!r}")
        return list(value)
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigurationError(f"{where}: expected an integer, got {value!r}")
    if tp is float and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ConfigurationError(f"{where}: expected a number, got {value!r}")
    if tp in (str, bool) and not isinstance(value, tp):
        raise ConfigurationError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class ServiceConfig(ABC, Generic[S_co]):
    """Base of every backend's configuration dataclass."""

    type_tag: ClassVar[str]
    """The ``type`` of composition tables and the URL tag (scheme up to ``+``)."""

    aliases: ClassVar[Mapping[str, str]] = {}
    """Alternative field names accepted in tables (e.g. tvix's ``local`` for ``near``)."""

    references: ClassVar[Mapping[str, str]] = {}
    """Fields naming another service (a composition name or a URL, or a list of them), each with that service's kind."""

    @classmethod
    def from_url(cls, url: SplitResult) -> Self:
        """The config a URL describes; backends without a URL form refuse."""
        raise ConfigurationError(f"{shown(url)!r}: type {cls.type_tag!r} has no URL form; use a composition file")

    @classmethod
    def from_table(cls, table: Mapping[str, object], where: str) -> Self:
        """The config a composition table describes (``type`` already removed)."""
        hints = get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, object] = {}
        for key, value in table.items():
            name = cls.aliases.get(key, key)
            if name not in fields:
                known = ", ".join(sorted([*fields, *cls.aliases])) or "none"
                raise ConfigurationError(f"{where}: unknown field {key!r} for type {cls.type_tag!r} (known: {known})")
            if name in values:
                raise ConfigurationError(f"{where}: field {name!r} given twice (as {key!r})")
            values[name] = _check_value(value, hints[name], f"{where}.{key}")
        for name, field in fields.items():
            required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
            if required and name not in values:
                raise ConfigurationError(f"{where}: missing field {name!r} for type {cls.type_tag!r}")
        config = cls(**values)
        try:
            config.validate(where)
        except ConfigurationError as e:  # some validators do not know where they are
            if str(e).startswith(where):
                raise
            raise ConfigurationError(f"{where}: {e}") from None
        return config

    def validate(self, where: str) -> None:
        """Check values beyond their types (hook; raise :class:`ConfigurationError`)."""

    def referenced(self) -> list[tuple[str, str, str]]:
        """``(field, kind, name)`` of every service this config refers to; a list field gives one per entry."""
        out = []
        for field, kind in self.references.items():
            value = getattr(self, field)
            for ref in value if isinstance(value, list) else [value]:
                out.append((field, kind, ref))
        return out

    @abstractmethod
    async def build(self, resolver: Resolver) -> S_co:
        """Open the service."""


@dataclasses.dataclass(frozen=True)
class NearFarConfig(ServiceConfig[S_co]):
    """A wrapper of two services of one kind: ``near`` and ``far`` (names or URLs).

    URL form ``<tag>://?near=URL&far=URL``; :meth:`open_pair` opens both, closing
    near again if far fails when nobody else owns it.
    """

    near: str
    far: str

    @classmethod
    def from_url(cls, url: SplitResult) -> Self:
        from nixcas.urls import near_far_from_url

        return cls(*near_far_from_url(url))

    async def open_pair(self, resolver: Resolver) -> tuple[Any, Any]:
        """The near and far services (of the kind named in :attr:`references`)."""
        kind = self.references["near"]
        near = await resolver.get(kind, self.near)
        try:
            far = await resolver.get(kind, self.far)
        except BaseException:
            if resolver.owns_instances:  # nobody else will close it
                await near.close()  # type: ignore[attr-defined]
            raise
        return near, far


@dataclasses.dataclass(frozen=True)
class SqlitePathConfig:
    """``sqlite:///abs/path`` (a file) or ``sqlite://`` (in memory); composition: ``path`` (optional).

    The fields of every SQLite backend's config (a mixin of its :class:`ServiceConfig`).
    """

    type_tag = "sqlite"  # a class variable (ServiceConfig.type_tag), not a field
    path: str | None = None

    @classmethod
    def from_url(cls, url: SplitResult) -> Self:
        from urllib.parse import unquote

        if url.netloc:
            raise ConfigurationError(f"{shown(url)!r}: sqlite URLs take no host (write sqlite:///abs/path)")
        query_options(url, set())
        config = cls(unquote(url.path) or None)
        config.validate(repr(shown(url)))
        return config

    def validate(self, where: str) -> None:
        if self.path is None:
            return
        if not self.path.startswith("/"):
            raise ConfigurationError(f"{where}: needs an absolute path")
        if self.path.rstrip("/") == "" or self.path.endswith("/"):
            raise ConfigurationError(f"{where}: needs a file path, not a directory")

"""Named service instances wired together: URL references and TOML composition files.

A composition file has one table per service kind, each mapping instance
names to a backend config (``type`` plus that backend's fields)::

    [blobservices.root]
    type = "combined"
    near = "local"
    far = "upstream"

    [blobservices.local]
    type = "objectstore"
    object_store_url = "file:///var/lib/nixcas/blobs"

    [blobservices.upstream]
    type = "grpc"
    url = "grpc+http://cache.example:8000"

    [directoryservices.root]
    type = "cache"
    near = "lru"
    far = "upstream"

    [directoryservices.lru]
    type = "lru"
    capacity = 100000

    [directoryservices.upstream]
    type = "grpc"
    url = "grpc+http://cache.example:8000"

Pins have a table too (``[pinservices.root]``, e.g. ``type = "postgresql"``);
without one, :meth:`Store.open <nixcas.api.Store.open>` picks the default
described in :func:`nixcas.api.default_pin_service`.

The entrypoint of each kind is ``root`` (snix; tvix's ``default`` is accepted
when there is no ``root``).  Wherever a name is expected, a service URL may
stand instead (``near = "memory://"``).  Instances are built on first use and
shared: one name is one object, even when asked for concurrently.  A cycle
(``a`` wraps ``b`` wraps ``a``) is a :class:`~nixcas.errors.ConfigurationError`
naming the whole chain.  Closing the composition closes every instance it
built, dependants first.

A single URL opens a private instance the same way (:func:`blob_service_from_url`,
:func:`directory_service_from_url`, :func:`pathinfo_service_from_url`,
:func:`pin_service_from_url`): a composition of that one URL whose instances
belong to their user.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, NoReturn, cast

from nixcas._aio import Closing
from nixcas.config import ServiceConfig
from nixcas.errors import ConfigurationError
from nixcas.registry import KINDS, check_references, parse_service_url
from nixcas.urls import remember_secrets

if TYPE_CHECKING:  # the service interfaces come with their backends, when one is built
    from nixcas.castore.blob.base import BlobService
    from nixcas.castore.dirs.base import DirectoryService
    from nixcas.castore.pins.base import PinService
    from nixcas.castore.sizerule import SizeRule
    from nixcas.store.pathinfo.base import PathInfoService

__all__ = [
    "ENTRYPOINT",
    "Composition",
    "blob_service_from_url",
    "directory_service_from_url",
    "pathinfo_service_from_url",
    "pin_service_from_url",
]

ENTRYPOINT: Final = "root"
LEGACY_ENTRYPOINT: Final = "default"

_Key = tuple[str, str]
_BUILDING: contextvars.ContextVar[tuple[_Key, ...]] = contextvars.ContextVar("nixcas_composition_building", default=())


def _describe(key: _Key) -> str:
    return f"{key[0]}.{key[1]}"


def _recursion(cycle: tuple[_Key, ...], where: str = "") -> NoReturn:
    path = " -> ".join(_describe(k) for k in cycle)
    raise ConfigurationError(f"{where}recursion not allowed in the composition: {path}")


def _check_references(configs: Mapping[str, Mapping[str, ServiceConfig[object]]], source: str) -> None:
    """Every name a service refers to is defined (in the same kind), and nothing refers to itself."""
    done: set[_Key] = set()

    def visit(key: _Key, config: ServiceConfig[object], path: tuple[_Key, ...]) -> None:
        path = (*path, key)
        for field, kind, ref in config.referenced():
            child = (kind, ref)
            if child in path:
                _recursion((*path[path.index(child) :], child), f"{source}: {_describe(path[0])}: ")
            if child in done:
                continue
            found = configs.get(kind, {}).get(ref)
            if found is None and "://" in ref:
                found = parse_service_url(kind, ref)  # already checked when its user was parsed
            if found is None:
                known = ", ".join(sorted(configs.get(kind, {}))) or "none defined"
                noun = kind.removesuffix("services") + " service"
                raise ConfigurationError(
                    f"{source}: {_describe(path[0])}: {field} = {ref!r}: no {noun} named {ref!r} (defined: {known})"
                )
            visit(child, found, path)
        done.add(key)

    for kind, table in configs.items():
        for name, config in table.items():
            if (kind, name) not in done:
                visit((kind, name), config, ())


class Composition(Closing):
    """Service configs by kind and name, built lazily into shared instances."""

    def __init__(
        self,
        configs: Mapping[str, Mapping[str, ServiceConfig[object]]] | None = None,
        *,
        owns_instances: bool = False,
        size_rule: SizeRule | None = None,
    ) -> None:
        self._configs: dict[str, dict[str, ServiceConfig[object]]] = {kind: {} for kind in KINDS}
        for kind, table in (configs or {}).items():
            if kind not in KINDS:
                raise ConfigurationError(f"unknown service kind {kind!r} (known: {', '.join(KINDS)})")
            self._configs[kind].update(table)
        self.owns_instances = owns_instances
        if size_rule is None:
            from nixcas.castore.sizerule import requested_size_rule

            size_rule = requested_size_rule()  # $NIXCAS_DIRECTORY_SIZE_RULE, if set
        self.size_rule = size_rule
        """The directory size rule asked for: new stores record it, existing ones must follow it."""
        self._instances: dict[_Key, object] = {}
        self._pending: dict[_Key, asyncio.Future[object]] = {}
        self._waiting: dict[_Key, _Key] = {}  # a key being built -> the key its build waits for
        self._order: list[object] = []

    # -- loading -----------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "composition") -> Composition:
        """Parse a decoded composition document; every entry is checked now."""
        configs: dict[str, dict[str, ServiceConfig[object]]] = {}
        for kind, table in data.items():
            if kind not in KINDS:
                raise ConfigurationError(
                    f"{source}: unknown table [{kind}] (expected {', '.join(f'[{k}]' for k in KINDS)})"
                )
            if not isinstance(table, Mapping):
                raise ConfigurationError(f"{source}: [{kind}] must be a table of named services")
            configs[kind] = {}
            for name, entry in table.items():
                where = f"{source}: {kind}.{name}"
                if "://" in name:
                    raise ConfigurationError(f"{where}: instance names cannot look like URLs")
                if not isinstance(entry, Mapping):
                    raise ConfigurationError(f"{where}: must be a table with a 'type' field")
                fields = dict(entry)
                remember_secrets("", {k: v for k, v in fields.items() if isinstance(v, str)})
                tag = fields.pop("type", None)
                if not isinstance(tag, str):
                    problem = "missing 'type'" if tag is None else f"'type' must be a string, got {tag!r}"
                    raise ConfigurationError(f"{where}: {problem} (known: {', '.join(sorted(KINDS[kind]))})")
                backend = KINDS[kind].get(tag)
                if backend is None:
                    raise ConfigurationError(f"{where}: unknown type {tag!r} (known: {', '.join(sorted(KINDS[kind]))})")
                configs[kind][name] = config = backend.from_table(fields, where)
                check_references(config, where)
        _check_references(configs, source)
        return cls(configs)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> Composition:
        """Read a TOML composition file."""
        import tomllib

        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigurationError(f"{os.fspath(path)}: invalid TOML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigurationError(f"{os.fspath(path)}: invalid TOML: not UTF-8 (at byte {e.start})") from None
        except OSError as e:
            raise ConfigurationError(f"{os.fspath(path)}: cannot read composition file: {e.strerror}") from None
        return cls.from_dict(data, os.fspath(path))

    # -- lookup ------------------------------------------------------------------

    def entrypoint(self, kind: str) -> str | None:
        """The name of ``kind``'s entrypoint (``root``, else ``default``), if the composition defines one."""
        for name in (ENTRYPOINT, LEGACY_ENTRYPOINT):
            if name in self._configs[kind]:
                return name
        return None

    async def blob_service(self, name: str) -> BlobService:
        """The blob service called ``name`` (or described by the URL ``name``)."""
        return cast("BlobService", await self.get("blobservices", name))

    async def directory_service(self, name: str) -> DirectoryService:
        """The directory service called ``name`` (or described by the URL ``name``)."""
        return cast("DirectoryService", await self.get("directoryservices", name))

    async def pathinfo_service(self, name: str) -> PathInfoService:
        """The path info service called ``name`` (or described by the URL ``name``)."""
        return cast("PathInfoService", await self.get("pathinfoservices", name))

    async def pin_service(self, name: str) -> PinService:
        """The pin service called ``name`` (or described by the URL ``name``)."""
        return cast("PinService", await self.get("pinservices", name))

    def config(self, kind: str, name: str) -> ServiceConfig[object]:
        """The config of ``kind``/``name`` (an entry, or a URL); :class:`ConfigurationError` if unknown."""
        return self._config(kind, name)

    def define(self, kind: str, name: str, config: ServiceConfig[object]) -> None:
        """Add ``config`` as ``kind``/``name`` unless the composition already defines that name."""
        self._configs[kind].setdefault(name, config)

    def provide(self, kind: str, name: str, instance: object) -> None:
        """Offer an already open ``instance`` as ``kind``/``name`` unless the composition defines that name.

        The composition does not close it (its opener does).  :meth:`Store.open <nixcas.api.Store.open>`
        offers the store's services as ``root``, so services that default to ``root`` (``nix``) use them.
        """
        if name not in self._configs[kind]:
            self._instances.setdefault((kind, name), instance)

    def _config(self, kind: str, name: str) -> ServiceConfig[object]:
        config = self._configs[kind].get(name)
        if config is not None:
            return config
        if "://" in name:
            return parse_service_url(kind, name)
        known = ", ".join(sorted(self._configs[kind])) or "none defined"
        noun = kind.removesuffix("services") + " service"
        raise ConfigurationError(f"no {noun} named {name!r} in the composition (defined: {known})")

    async def get(self, kind: str, name: str) -> object:
        """The instance ``kind``/``name``, built on first use and shared afterwards."""
        key = (kind, name)
        if key in self._instances:
            return self._instances[key]
        chain = _BUILDING.get()
        if key in chain:
            _recursion((*chain[chain.index(key) :], key))
        if self.owns_instances:  # every reference is a private instance of its user: build, do not share
            token = _BUILDING.set((*chain, key))
            try:
                return await self._config(kind, name).build(self)
            finally:
                _BUILDING.reset(token)
        if chain:  # the build of chain[-1] now waits for key
            self._waiting[chain[-1]] = key
        try:
            return await self._get_shared(key, chain)
        finally:
            if chain:
                self._waiting.pop(chain[-1], None)

    async def _get_shared(self, key: _Key, chain: tuple[_Key, ...]) -> object:
        pending = self._pending.get(key)
        if pending is not None:
            # Another task builds key.  If that build (transitively) waits for one of
            # ours, waiting for it would never end: that is a cycle too.
            path = [key]
            while (waited := self._waiting.get(path[-1])) is not None and len(path) <= len(self._waiting):
                path.append(waited)
                if waited in chain:
                    _recursion((*chain[chain.index(waited) :], *path))
            return await asyncio.shield(pending)
        kind, name = key
        config = self._config(kind, name)
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        token = _BUILDING.set((*chain, key))
        try:
            instance = await config.build(self)
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # retrieved: concurrent waiters re-raise it themselves
            raise
        finally:
            _BUILDING.reset(token)
            del self._pending[key]
        self._instances[key] = instance
        self._order.append(instance)
        future.set_result(instance)
        return instance

    async def close(self) -> None:
        """Close every instance built, most recently built (the wrappers) first."""
        first_error: BaseException | None = None
        while self._order:
            instance = self._order.pop()
            try:
                await cast(Closing, instance).close()
            except Exception as e:  # keep closing the others
                first_error = first_error or e
        self._instances.clear()
        if first_error is not None:
            raise first_error


async def blob_service_from_url(url: str) -> BlobService:
    """A :class:`BlobService` for ``url``; closing it closes whatever it wraps."""
    config = parse_service_url("blobservices", url)
    return cast("BlobService", await config.build(Composition(owns_instances=True)))


async def directory_service_from_url(url: str, *, size_rule: SizeRule | None = None) -> DirectoryService:
    """A :class:`DirectoryService` for ``url``; closing it closes whatever it wraps.

    ``size_rule``: the directory size rule asked for (a new store records it,
    an existing one must follow it; see :mod:`nixcas.castore.sizerule`).
    """
    config = parse_service_url("directoryservices", url)
    return cast("DirectoryService", await config.build(Composition(owns_instances=True, size_rule=size_rule)))


async def pathinfo_service_from_url(url: str) -> PathInfoService:
    """A :class:`PathInfoService` for ``url``; closing it closes whatever it wraps."""
    config = parse_service_url("pathinfoservices", url)
    return cast("PathInfoService", await config.build(Composition(owns_instances=True)))


async def pin_service_from_url(url: str) -> PinService:
    """A :class:`PinService` for ``url``; closing it closes whatever it wraps."""
    config = parse_service_url("pinservices", url)
    return cast("PinService", await config.build(Composition(owns_instances=True)))

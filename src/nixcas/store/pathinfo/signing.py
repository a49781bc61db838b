"""``keyfile-signing`` — signs every PathInfo put through it, then hands it to an inner service.

The signature is Nix's: ed25519 over the narinfo fingerprint (reference
§6.7), appended to the signatures already there.  ``get`` and ``list`` pass
through.  Composition only::

    [pathinfoservices.root]
    type = "keyfile-signing"
    inner = "local"
    keyfile = "/etc/nixcas/cache.example.org-1.sec"   # a Nix secret key file
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import ClassVar

from nixcas.config import Resolver, ServiceConfig
from nixcas.errors import ConfigurationError
from nixcas.store.nar.hashing import NarCalculationService
from nixcas.store.pathinfo.base import PathInfoService, PathInfoServiceWrapper
from nixcas.store.pathinfo.model import PathInfo
from nixcas.store.signing import SigningKey, SigningKeyError

__all__ = ["KeyfileSigningPathInfoService", "KeyfileSigningPathInfoServiceConfig"]


@dataclass(frozen=True)
class KeyfileSigningPathInfoServiceConfig(ServiceConfig[PathInfoService]):
    """``inner``: the path info service to sign for (name or URL); ``keyfile``: a Nix secret key file."""

    type_tag: ClassVar[str] = "keyfile-signing"
    references: ClassVar[dict[str, str]] = {"inner": "pathinfoservices"}
    inner: str
    keyfile: str

    def validate(self, where: str) -> None:
        if not self.keyfile.startswith("/"):
            raise ConfigurationError(f"{where}: keyfile must be an absolute path")

    async def build(self, resolver: Resolver) -> PathInfoService:
        try:
            key = SigningKey.load(self.keyfile)
        except SigningKeyError as e:
            raise ConfigurationError(f"keyfile-signing: {e}") from None
        inner = await resolver.get("pathinfoservices", self.inner)
        assert isinstance(inner, PathInfoService)
        return KeyfileSigningPathInfoService(inner, key, close_inner=resolver.owns_instances)


class KeyfileSigningPathInfoService(PathInfoServiceWrapper):
    """Adds ``key``'s signature on ``put``."""

    def __init__(self, inner: PathInfoService, key: SigningKey, *, close_inner: bool = False) -> None:
        self.inner = inner
        self.key = key
        self._close_inner = close_inner

    def __repr__(self) -> str:
        return f"KeyfileSigningPathInfoService({self.inner!r}, key={self.key.name!r})"

    async def get(self, digest: bytes) -> PathInfo | None:
        return await self.inner.get(digest)

    async def put(self, info: PathInfo) -> PathInfo:
        return await self.inner.put(self.key.sign_path_info(info))

    async def list(self) -> AsyncIterator[PathInfo]:
        async for info in self.inner.list():
            yield info

    def nar_calculation_service(self) -> NarCalculationService | None:
        return self.inner.nar_calculation_service()

    async def close(self) -> None:
        if self._close_inner:
            await self.inner.close()

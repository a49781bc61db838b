"""The PathInfoService interface and verify-on-read.

Backends store serialized ``PathInfo`` messages keyed by the 20-byte store
path digest and implement three primitives (``_get_raw``, ``_put_raw``,
``_list_raw``).  The base class decodes and validates everything it hands
out and checks that a record really is the one asked for, so a corrupt
backend raises :class:`~nixcas.errors.StorageError` instead of answering
with the wrong path.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Literal

from nixcas._aio import Closing
from nixcas.errors import StorageError, ValidationError
from nixcas.store.pathinfo.model import PathInfo, verified_record
from nixcas.store.store_path import DIGEST_SIZE

if TYPE_CHECKING:  # NAR rendering is loaded only by what computes NARs
    from nixcas.store.nar.hashing import NarCalculationService

__all__ = ["PathInfoService", "PathInfoServiceWrapper", "check_digest"]


def check_digest(digest: bytes) -> bytes:
    """``digest`` if it is a 20-byte store path digest, else :class:`ValidationError`."""
    if len(digest) != DIGEST_SIZE:
        raise ValidationError(f"invalid output digest length: {len(digest)} (want {DIGEST_SIZE})")
    return bytes(digest)


class PathInfoService(Closing, ABC):
    """Stores PathInfo records by store path digest.  Absence is ``None``."""

    # -- backend primitives ----------------------------------------------------

    @abstractmethod
    async def _get_raw(self, digest: bytes) -> bytes | None:
        """The stored message for ``digest``, or ``None``."""

    @abstractmethod
    async def _put_raw(self, digest: bytes, raw: bytes) -> None:
        """Store (or replace) the message for ``digest``."""

    @abstractmethod
    def _list_raw(self) -> AsyncIterator[tuple[bytes, bytes]]:
        """Every stored (digest, message) pair."""

    # -- public interface ------------------------------------------------------

    async def get(self, digest: bytes) -> PathInfo | None:
        """The PathInfo of the store path with this 20-byte digest, validated."""
        raw = await self._get_raw(check_digest(digest))
        return None if raw is None else verified_record(digest, raw, repr(self))

    async def get_encoded(self, digest: bytes) -> bytes | None:
        """The PathInfo message of ``digest`` as stored, not yet validated: decode it with :meth:`decode_stored`.

        For servers that keep what they derive from a record (a rendered
        narinfo) keyed by its exact bytes, so a changed record is never served stale.
        """
        return await self._get_raw(check_digest(digest))

    def get_encoded_now(self, digest: bytes) -> bytes | Literal[False] | None:
        """:meth:`get_encoded` without awaiting, where the backend can answer at once (a local point read).

        ``False`` means it cannot (the default; a busy or remote database):
        await :meth:`get_encoded` instead.  For a server's hot path.
        """
        return False

    def decode_stored(self, digest: bytes, raw: bytes) -> PathInfo:
        """``raw`` from :meth:`get_encoded`, decoded and validated as :meth:`get` does."""
        return verified_record(digest, raw, repr(self))

    async def put(self, info: PathInfo) -> PathInfo:
        """Store ``info`` (replacing an earlier record of the same path); return what was stored."""
        await self._put_raw(info.digest, info.encode())
        return info

    async def list(self) -> AsyncIterator[PathInfo]:
        """Every PathInfo, validated, in no particular order."""
        async for digest, raw in self._list_raw():
            yield verified_record(digest, raw, repr(self))

    async def list_checked(self) -> AsyncIterator[tuple[bytes, PathInfo | StorageError]]:
        """Every record as (digest, PathInfo), or (digest, the error) for one that is invalid (for fsck)."""
        async for digest, raw in self._list_raw():
            try:
                yield digest, verified_record(digest, raw, repr(self))
            except StorageError as e:
                yield digest, e

    def nar_calculation_service(self) -> NarCalculationService | None:
        """A service that computes NAR size/hash where the data lives (a remote daemon), if any."""
        return None


class PathInfoServiceWrapper(PathInfoService):
    """Base of services that override ``get``/``put``/``list`` (wrappers, combinators, remotes).

    Their raw primitives go through those methods, so both levels agree.
    """

    async def _get_raw(self, digest: bytes) -> bytes | None:
        found = await self.get(digest)
        return None if found is None else found.encode()

    async def _put_raw(self, digest: bytes, raw: bytes) -> None:
        await self.put(PathInfo.decode(raw))

    async def _list_raw(self) -> AsyncIterator[tuple[bytes, bytes]]:
        async for info in self.list():
            yield info.digest, info.encode()

"""``priority`` and ``race`` — one read-only path info service over several, first valid answer wins.

See :mod:`nixcas._members` for what both mean and what happens when no member
answers validly.  A member's record is decoded and validated here, and must
describe the store path asked for: a record of another path, or one that does
not decode, counts as that member's wrong answer.

``list`` lists every member in order, each path once (the first member's
record of it); ``put`` raises :class:`~nixcas.errors.ReadOnlyError`
(gRPC ``FAILED_PRECONDITION``).

Composition::

    [pathinfoservices.root]
    type = "race"            # or "priority"
    members = ["local", "nix+https://cache.nixos.org"]

URL form: ``race://?member=URL&member=URL`` (percent-encoded URLs or names).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import ClassVar

from nixcas._members import PRIORITY, RACE, MembersConfig, MembersService, Outcome, WrongAnswer, first_answer
from nixcas.config import Resolver
from nixcas.errors import StorageError
from nixcas.store import nixbase32
from nixcas.store.pathinfo.base import PathInfoService, PathInfoServiceWrapper, check_digest
from nixcas.store.pathinfo.model import PathInfo

__all__ = ["MembersPathInfoService", "PriorityPathInfoServiceConfig", "RacePathInfoServiceConfig"]


@dataclass(frozen=True)
class PriorityPathInfoServiceConfig(MembersConfig[PathInfoService]):
    """``members``: path info services asked one after another, in order."""

    type_tag: ClassVar[str] = PRIORITY
    references: ClassVar[dict[str, str]] = {"members": "pathinfoservices"}

    async def build(self, resolver: Resolver) -> PathInfoService:
        members = await self.open_members(resolver)
        return MembersPathInfoService(self.type_tag, members, close_inner=resolver.owns_instances)


@dataclass(frozen=True)
class RacePathInfoServiceConfig(PriorityPathInfoServiceConfig):
    """``members``: path info services asked all at once; the first valid answer wins."""

    type_tag: ClassVar[str] = RACE


class MembersPathInfoService(MembersService[PathInfoService], PathInfoServiceWrapper):
    """``priority`` or ``race`` over path info services (read-only)."""

    type_name: ClassVar[str] = "path info service"

    async def get(self, digest: bytes) -> PathInfo | None:
        check_digest(digest)

        async def ask(member: PathInfoService) -> PathInfo | None:
            raw = await member.get_encoded(digest)
            if raw is None:
                return None
            try:
                return member.decode_stored(digest, raw)
            except StorageError as e:
                raise WrongAnswer(e) from None

        return await first_answer(self.mode, self.members, ask, Outcome(f"path info {nixbase32.encode(digest)}"))

    async def put(self, info: PathInfo) -> PathInfo:
        raise self._read_only(f"store the path info of {info.store_path}")

    async def list(self) -> AsyncIterator[PathInfo]:
        seen: set[bytes] = set()
        for member in self.members:
            async for info in member.list():
                if info.digest not in seen:
                    seen.add(info.digest)
                    yield info

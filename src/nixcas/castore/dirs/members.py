"""``priority`` and ``race`` — one read-only directory service over several, first valid answer wins.

See :mod:`nixcas._members` for what both mean and what happens when no member
answers validly.  Every Directory handed out is one whose encoding hashes to
the digest it was asked by (a member's wrong answer counts as none).

Closures (:meth:`get_recursive`) stream: the member that first yields the
root (``priority``: in order; ``race``: all asked at once, the others'
streams are closed) serves the closure, each Directory checked to be
announced by one already received (so every one is the right content for
its place).  If that member fails part-way (a descendant missing, an error,
a wrong directory), the next members (configuration order) continue the
same closure, skipping what was already sent.  Memory: the digests of the
closure sent so far (as for any closure check).  A closure no member can
complete raises; one no member has at all yields nothing.

Writes (``put``, closure uploads) raise :class:`~nixcas.errors.ReadOnlyError`
(gRPC ``FAILED_PRECONDITION``).

Composition::

    [directoryservices.root]
    type = "priority"        # or "race"
    members = ["local", "grpc+http://cache-a:8000"]

URL form: ``priority://?member=URL&member=URL`` (percent-encoded URLs or names).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import blake3

from nixcas._members import PRIORITY, RACE, MembersConfig, MembersService, Outcome, WrongAnswer, ask_all, first_answer
from nixcas.castore.digest import B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.base import DirectoryPutter, DirectoryService
from nixcas.castore.graph import RootToLeavesValidator
from nixcas.config import Resolver
from nixcas.errors import ChecksumMismatch, StorageError

__all__ = ["MembersDirectoryService", "PriorityDirectoryServiceConfig", "RaceDirectoryServiceConfig"]

_Source = tuple[DirectoryService, Directory, AsyncIterator[Directory]]
"""A member, the root it yielded, and the rest of its closure stream."""


@dataclass(frozen=True)
class PriorityDirectoryServiceConfig(MembersConfig[DirectoryService]):
    """``members``: directory services asked one after another, in order."""

    type_tag: ClassVar[str] = PRIORITY
    references: ClassVar[dict[str, str]] = {"members": "directoryservices"}

    async def build(self, resolver: Resolver) -> DirectoryService:
        members = await self.open_members(resolver)
        return MembersDirectoryService(self.type_tag, members, close_inner=resolver.owns_instances)


@dataclass(frozen=True)
class RaceDirectoryServiceConfig(PriorityDirectoryServiceConfig):
    """``members``: directory services asked all at once; the first valid answer wins."""

    type_tag: ClassVar[str] = RACE


def _check(member: DirectoryService, digest: B3Digest, found: Directory) -> Directory:
    if found.digest != digest:
        raise WrongAnswer(ChecksumMismatch(f"{member!r}: directory {digest.hex()}", digest.hex(), found.digest.hex()))
    return found


def _decoded(member: DirectoryService, digest: B3Digest, raw: bytes) -> Directory:
    got = blake3.blake3(raw).digest()
    if got != digest:
        raise WrongAnswer(ChecksumMismatch(f"{member!r}: directory {digest.hex()}", digest.hex(), got.hex()))
    try:
        return Directory.decode(raw, digest=digest)
    except ValueError as e:
        raise WrongAnswer(
            StorageError(f"{member!r}: directory {digest.hex()} is stored in an invalid form: {e}")
        ) from None


class MembersDirectoryService(MembersService[DirectoryService], DirectoryService):
    """``priority`` or ``race`` over directory services (read-only)."""

    type_name: ClassVar[str] = "directory service"

    async def get(self, digest: B3Digest) -> Directory | None:
        async def ask(member: DirectoryService) -> Directory | None:
            raw = (await member.get_many_raw([digest])).get(digest)  # checked here: a bad value is a wrong answer
            return None if raw is None else _decoded(member, digest, raw)

        return await first_answer(self.mode, self.members, ask, Outcome(f"directory {digest.hex()}"))

    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        outcome = Outcome(f"closure of directory {root.hex()}")
        validator = RootToLeavesValidator(root)
        sent: set[B3Digest] = set()

        async def ask(member: DirectoryService) -> _Source | None:
            stream = aiter(member.get_recursive(root))
            try:
                first = await anext(stream, None)
                if first is None:
                    await _aclose(stream)
                    return None
                return member, _check(member, root, first), stream
            except BaseException:
                await _aclose(stream)
                raise

        async def discard(source: _Source) -> None:
            await _aclose(source[2])

        source = await first_answer(self.mode, self.members, ask, outcome, discard=discard)
        if source is None:
            return
        later = [m for m in self.members if m is not source[0]]
        while True:
            member, first, stream = source
            try:
                directory: Directory | None = first
                while directory is not None:
                    if directory.digest not in sent:
                        try:
                            validator.add(directory)
                        except StorageError as e:
                            raise WrongAnswer(StorageError(f"{member!r}: closure of {root.hex()}: {e}")) from None
                        sent.add(directory.digest)
                        yield directory
                    directory = await anext(stream, None)
                validator.finish()
                return
            except Exception as e:
                outcome.record(member, e)
            finally:
                await _aclose(stream)
            found = None
            while later and found is None:
                fallback = later.pop(0)
                try:
                    found = await ask(fallback)
                except Exception as e:
                    outcome.record(fallback, e)
            if found is None:
                outcome.absent = 0  # part of the closure was sent: it must be completed, or fail
                outcome.result()
                return  # pragma: no cover - result() raises without an absent member
            source = found

    async def _get_raw(self, digest: B3Digest) -> bytes | None:
        found = await self.get(digest)
        return None if found is None else found.encode()

    async def _get_many_raw(self, digests: Sequence[B3Digest]) -> dict[B3Digest, bytes]:
        """What the members hold of ``digests`` (raw, each hash-checked: a wrong value is left out)."""
        found: dict[B3Digest, bytes] = {}
        outcome = Outcome(f"{len(digests)} directories")

        async def ask(member: DirectoryService) -> None:
            rest = [d for d in digests if d not in found]
            try:
                got = await member.get_many_raw(rest)
            except Exception as e:
                outcome.record(member, e)
                return
            for digest, raw in got.items():
                if blake3.blake3(raw).digest() == digest:  # a wrong value is left out: absent, as far as this goes
                    found.setdefault(digest, raw)

        await ask_all(self.mode, self.members, ask, lambda: len(found) == len(set(digests)))
        if len(outcome.failed) == len(self.members) and len(found) < len(set(digests)):
            outcome.result()
        return found

    async def _put_raw(self, items: Sequence[tuple[B3Digest, bytes]]) -> None:
        raise self._read_only("store directories")

    def put_multiple_start(self) -> DirectoryPutter:
        raise self._read_only("upload a closure")


async def _aclose(stream: AsyncIterator[Directory]) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()

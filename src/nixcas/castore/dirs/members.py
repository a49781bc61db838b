"""``priority`` and ``race`` — one read-only directory service over several, first valid answer wins.

See :mod:`nixcas._members` for what both mean and what happens when no member
answers validly.  Every Directory handed out is one whose encoding hashes to
the digest it was asked by (a member's wrong answer counts as none).

Closures (:meth:`get_recursive`): a member's answer is its closure, checked
root-to-leaves as it arrives (each Directory announced by one already
received, so each is the right content for its place), read whole before any
Directory is handed out as long as it stays within :data:`CLOSURE_READ`
bytes (``race``: the first member with a whole valid closure wins, the
others are cancelled and their streams closed; a member that stalls or sends
a wrong directory never keeps a correct one from answering).  A larger
closure streams on from the member that filled the read-ahead first; if it
fails part-way (a descendant missing, an error, a wrong directory), the
next members (configuration order) continue the same closure, skipping what
was already sent.  Memory: the read-ahead per member asked at once, and the
digests of the closure sent so far.  A closure no member can complete
raises; one no member has at all yields nothing.

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
from typing import ClassVar, Final

import blake3

from nixcas._members import PRIORITY, RACE, MembersConfig, MembersService, Outcome, WrongAnswer, ask_all, first_answer
from nixcas.castore.digest import B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.base import DirectoryPutter, DirectoryService
from nixcas.castore.graph import RootToLeavesValidator
from nixcas.config import Resolver
from nixcas.errors import ChecksumMismatch, ConfigurationError, StorageError

__all__ = ["MembersDirectoryService", "PriorityDirectoryServiceConfig", "RaceDirectoryServiceConfig"]

CLOSURE_READ: Final = 4 << 20
"""Bytes of (encoded) directories of a closure read ahead from a member before any is handed out."""


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


@dataclass
class _Closure:
    """A member's answer for a closure: its first directories (checked root-to-leaves), and the rest of
    its stream when the closure is larger than :data:`CLOSURE_READ`."""

    member: DirectoryService
    head: list[Directory]
    seen: set[B3Digest]
    validator: RootToLeavesValidator
    rest: AsyncIterator[Directory] | None

    async def close(self) -> None:
        if self.rest is not None:
            await _aclose(self.rest)


def _accept(validator: RootToLeavesValidator, member: DirectoryService, root: B3Digest, directory: Directory) -> None:
    """``directory`` if it was announced (so its digest, computed from its encoding, is the one expected)."""
    try:
        validator.add(directory)
    except StorageError as e:
        raise WrongAnswer(StorageError(f"{member!r}: closure of {root.hex()}: {e}")) from None


async def _read_ahead(member: DirectoryService, root: B3Digest) -> _Closure | None:
    """``member``'s closure of ``root``: whole if it fits :data:`CLOSURE_READ`, else its start and the rest."""
    stream = aiter(member.get_recursive(root))
    validator = RootToLeavesValidator(root, member.size_rule)
    head: list[Directory] = []
    seen: set[B3Digest] = set()
    size = 0
    handed_off = False
    try:
        while size <= CLOSURE_READ:
            try:
                directory: Directory | None = await anext(stream, None)
                if directory is None:
                    if not head:
                        return None
                    validator.finish()
                    return _Closure(member, head, seen, validator, None)
            except Exception as e:
                if not head:
                    raise
                # It has the root but cannot deliver the closure: damage (or a lost connection), never absence.
                raise WrongAnswer(StorageError(f"{member!r}: closure of {root.hex()} incomplete: {e}")) from None
            if directory.digest in seen:
                continue
            _accept(validator, member, root, directory)
            seen.add(directory.digest)
            head.append(directory)
            size += len(directory.encode())
        handed_off = True
        return _Closure(member, head, seen, validator, stream)
    finally:
        if not handed_off:
            await _aclose(stream)


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
    rewritable: ClassVar[bool] = False

    def __init__(self, mode: str, members: Sequence[DirectoryService], *, close_inner: bool = False) -> None:
        super().__init__(mode, members, close_inner=close_inner)
        rules = {member.size_rule for member in self.members}
        if len(rules) > 1:
            named = ", ".join(sorted(str(rule) for rule in rules))
            raise ConfigurationError(
                f"{mode}: the members follow different directory size rules ({named}); "
                "their directories could not answer for one another"
            )
        self.size_rule = rules.pop()

    async def get(self, digest: B3Digest) -> Directory | None:
        async def ask(member: DirectoryService) -> Directory | None:
            raw = (await member.get_many_raw([digest])).get(digest)  # checked here: a bad value is a wrong answer
            return None if raw is None else _decoded(member, digest, raw)

        return await first_answer(self.mode, self.members, ask, Outcome(f"directory {digest.hex()}"))

    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        outcome = Outcome(f"closure of directory {root.hex()}")

        async def ask(member: DirectoryService) -> _Closure | None:
            return await _read_ahead(member, root)

        answer = await first_answer(self.mode, self.members, ask, outcome, discard=_Closure.close)
        if answer is None:
            return
        try:
            for checked in answer.head:
                yield checked
        except BaseException:  # the caller stopped early (aclose, cancel): the member's stream is not read on
            await answer.close()
            raise
        if answer.rest is None:
            return
        validator, sent = answer.validator, answer.seen
        later = [m for m in self.members if m is not answer.member]
        member, stream = answer.member, answer.rest
        while True:
            try:
                while True:
                    directory: Directory | None = await anext(stream, None)
                    if directory is None:
                        break
                    if directory.digest in sent:
                        continue
                    _accept(validator, member, root, directory)
                    sent.add(directory.digest)
                    yield directory
                validator.finish()
                return
            except Exception as e:
                outcome.record(member, e)
            finally:
                await _aclose(stream)
            if not later:  # part of the closure was sent: it must be completed, or fail
                outcome.absent = 0
                outcome.result()
                return  # pragma: no cover - result() raises without an absent member
            member = later.pop(0)
            stream = aiter(member.get_recursive(root))  # from its root on; what was sent is skipped

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

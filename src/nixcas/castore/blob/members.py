"""``priority`` and ``race`` — one read-only blob service over several, first valid answer wins.

See :mod:`nixcas._members` for what both mean and what happens when no member
answers validly.  How a blob read picks its member and stays verified:

* A member's answer is its blob's first :data:`WHOLE_READ` + 1 bytes
  (``priority``: asked in the configured order; ``race``: all at once, the
  first answer wins, the others are cancelled and their readers closed).  A
  blob of at most :data:`WHOLE_READ` bytes is thus read whole and hashed
  before a byte is handed out: a member with wrong bytes counts as no answer.
  Memory: that much per member asked at once.
* A larger blob streams from the member that answered: the bytes read ahead
  first, the rest on demand.  A member whose read fails part-way is replaced
  by the next one, which continues at the same offset (a blob's bytes are
  the same wherever it is stored): an unreachable member, and a wrong chunk,
  since a member that keeps the blob in chunks (``objectstore``, ``packed``'s
  large blobs, a gRPC peer whose ``Stat`` lists chunks) checks each chunk
  against its digest before any of its bytes pass.  The whole stream is hashed as it is handed out and checked
  at its end (the base class's verify-on-read): wrong bytes from an unchunked
  member, or a chunk list that does not add up, cannot be told apart before
  the end, so that read fails with :class:`~nixcas.errors.ChecksumMismatch`
  instead of ending cleanly.
* :meth:`~nixcas.castore.blob.base.BlobService.read_many` asks the members for
  the blobs still missing (``priority``: one member after another; ``race``:
  all at once, done when every blob is found); each blob is hashed, and a
  member whose batch holds a wrong blob is asked blob by blob, so only that
  blob counts as its wrong answer.
* Outboards are checked against the digest (:func:`~nixcas.castore.bao.check_outboard`);
  chunk lists (:meth:`chunks`) are the answering member's word: reads through
  this service never rely on them (``chunk_reads`` is off).

Writes raise :class:`~nixcas.errors.ReadOnlyError` (gRPC ``FAILED_PRECONDITION``).

Composition::

    [blobservices.root]
    type = "race"            # or "priority"
    members = ["near", "grpc+http://cache-a:8000", "grpc+http://cache-b:8000"]

URL form: ``race://?member=URL&member=URL`` (percent-encoded URLs or names).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Final, TypeVar

import blake3

from nixcas._members import (
    PRIORITY,
    RACE,
    Candidates,
    MembersConfig,
    MembersService,
    Outcome,
    WrongAnswer,
    ask_all,
    first_answer,
)
from nixcas.castore.blob.base import (
    BlobChecker,
    BlobReader,
    BlobService,
    BlobWriter,
    ChunkMeta,
    FailedReader,
    VerifiedBytesReader,
    resolve_seek,
    run_bounded,
)
from nixcas.castore.digest import B3Digest
from nixcas.config import Resolver
from nixcas.errors import ChecksumMismatch, StorageError, ValidationError

__all__ = ["WHOLE_READ", "MembersBlobService", "PriorityBlobServiceConfig", "RaceBlobServiceConfig"]

WHOLE_READ: Final = 2 << 20
"""Blobs up to this size (2 MiB) are read whole and verified before any byte is handed out."""

X = TypeVar("X")


@dataclass(frozen=True)
class PriorityBlobServiceConfig(MembersConfig[BlobService]):
    """``members``: blob services asked one after another, in order."""

    type_tag: ClassVar[str] = PRIORITY
    references: ClassVar[dict[str, str]] = {"members": "blobservices"}

    async def build(self, resolver: Resolver) -> BlobService:
        members = await self.open_members(resolver)
        return MembersBlobService(self.type_tag, members, close_inner=resolver.owns_instances)


@dataclass(frozen=True)
class RaceBlobServiceConfig(PriorityBlobServiceConfig):
    """``members``: blob services asked all at once; the first valid answer wins."""

    type_tag: ClassVar[str] = RACE


class MembersBlobService(MembersService[BlobService], BlobService):
    """``priority`` or ``race`` over blob services (read-only)."""

    type_name: ClassVar[str] = "blob service"
    chunk_reads: ClassVar[bool] = False  # every read goes through _open_read, which verifies and falls back

    async def has(self, digest: B3Digest) -> bool:
        async def ask(member: BlobService) -> bool | None:
            return True if await member.has(digest) else None

        return bool(await first_answer(self.mode, self.members, ask, Outcome(f"blob {digest.hex()}")))

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        async def ask(member: BlobService) -> list[ChunkMeta] | None:
            return await member.chunks(digest)

        return await first_answer(self.mode, self.members, ask, Outcome(f"blob {digest.hex()}"))

    async def _open_read(self, digest: B3Digest) -> BlobReader | None:
        outcome = Outcome(f"blob {digest.hex()}")
        candidates: Candidates[BlobService, _Opened] = Candidates(
            self.mode, self.members, lambda m: _open(m, digest), outcome, _Opened.close
        )
        handed_off = False
        try:
            found = await candidates.next()
            if found is None:
                try:
                    outcome.result()
                except ChecksumMismatch as e:  # found only wrong bytes: the reader fails, as a damaged blob's does
                    return FailedReader(e)
                return None
            member, opened = found
            if opened.rest is None:
                return VerifiedBytesReader(opened.head)
            await candidates.settle(release=True)  # the rest are fallbacks now: nothing of theirs stays open
            handed_off = True
            return _FallbackReader(digest, member, opened, candidates, outcome)
        finally:
            if not handed_off:
                await candidates.close()

    async def outboard(self, digest: B3Digest) -> bytes | None:
        from nixcas.castore.bao import check_outboard

        async def ask(member: BlobService) -> bytes | None:
            found = await member.outboard(digest)
            if found is not None:
                try:
                    check_outboard(digest, found, None)
                except StorageError as e:
                    raise WrongAnswer(e) from None
            return found

        return await first_answer(self.mode, self.members, ask, Outcome(f"outboard of blob {digest.hex()}"))

    async def _read_many(
        self, max_sizes: Mapping[B3Digest, int], checker: BlobChecker, parallel: int
    ) -> dict[B3Digest, bytes]:
        found: dict[B3Digest, bytes] = {}
        wrong: dict[B3Digest, list[tuple[BlobService, StorageError]]] = {}
        failed: list[tuple[BlobService, Exception]] = []

        async def ask(member: BlobService) -> None:
            rest = {d: cap for d, cap in max_sizes.items() if d not in found}
            if not rest:
                return
            got: dict[B3Digest, bytes] = {}

            async def one(item: tuple[B3Digest, int]) -> None:
                try:
                    got.update(await member.read_many(dict([item]), parallel=1))
                except ChecksumMismatch as e:
                    wrong.setdefault(item[0], []).append((member, e))

            try:
                try:
                    got = await member.read_many(rest, parallel=parallel)
                except ChecksumMismatch:  # one of them is wrong here: ask blob by blob, so the others still count
                    await run_bounded(list(rest.items()), one, parallel)
            except Exception as e:
                failed.append((member, e))
                return
            for digest, data in got.items():
                found.setdefault(digest, data)  # verified by the member's read_many

        await ask_all(self.mode, self.members, ask, lambda: len(found) == len(max_sizes))
        missing_wrong = {d: w for d, w in wrong.items() if d not in found}
        if missing_wrong or (failed and len(found) < len(max_sizes)):
            outcome = Outcome(f"read_many of {len(max_sizes)} blobs")
            for w in missing_wrong.values():
                outcome.wrong.extend(w)
            outcome.failed.extend(failed)
            outcome.absent = len(self.members) - len(failed)  # members that answered the batch
            outcome.result()  # raises, or logs the failures
        return found

    async def open_write(self, expected_size: int | None = None) -> BlobWriter:
        raise self._read_only("write a blob")


async def _read_up_to(reader: BlobReader, n: int) -> bytes:
    """Up to ``n`` bytes from ``reader`` (fewer only at its end)."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        data = await reader.read(n - got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


@dataclass
class _Opened:
    """A member's blob after its first bytes: whole and verified (``rest`` is ``None``), or the first
    :data:`WHOLE_READ` + 1 bytes and the reader standing after them."""

    head: bytes
    rest: BlobReader | None

    async def close(self) -> None:
        if self.rest is not None:
            await _close_quietly(self.rest)


async def _open(member: BlobService, digest: B3Digest) -> _Opened | None:
    """A member's answer for blob ``digest``: ``None`` if absent; :class:`WrongAnswer` if a small blob's
    bytes do not hash to the digest."""
    reader = await member.open_raw(digest)
    if reader is None:
        return None
    try:
        head = await _read_up_to(reader, WHOLE_READ + 1)
    except BaseException:
        await _close_quietly(reader)
        raise
    if len(head) > WHOLE_READ:
        return _Opened(head, reader)
    await _close_quietly(reader)
    got = blake3.blake3(head).digest()
    if got != digest:
        raise WrongAnswer(ChecksumMismatch(f"{member!r}: blob {digest.hex()}", digest.hex(), got.hex()))
    return _Opened(head, None)


async def _close_quietly(reader: BlobReader) -> None:
    with contextlib.suppress(Exception):  # a reader being dropped; its member's failure is recorded elsewhere
        await reader.close()


class _FallbackReader(BlobReader):
    """A large blob from one member, continued from the next candidate (same offset) if a read fails.

    The first bytes are held (``head``), the member's reader stands after them.
    The base class's :class:`~nixcas.castore.blob.base.VerifyingReader` hashes
    what this reader hands out.
    """

    def __init__(
        self,
        digest: B3Digest,
        member: BlobService,
        opened: _Opened,
        candidates: Candidates[BlobService, _Opened],
        outcome: Outcome,
    ) -> None:
        assert opened.rest is not None
        self._digest = digest
        self._member = member
        self._inner: BlobReader | None = opened.rest
        self._head = opened.head
        self._inner_pos = len(opened.head)
        self._pos = 0
        self._candidates = candidates
        self._outcome = outcome

    async def read(self, n: int = -1) -> bytes:
        if self._pos < len(self._head):
            end = len(self._head) if n < 0 else min(len(self._head), self._pos + n)
            data = self._head[self._pos : end]
            self._pos = end
            if n < 0:
                data += await self.read(-1)
            return data
        self._head = b""  # passed: later reads (and seeks back) go to the member
        data = await self._attempt(lambda r: r.read(n))
        self._pos += len(data)
        self._inner_pos = self._pos
        return data

    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END:
            self._pos = await self._attempt(lambda r: r.seek(offset, whence))
            self._inner_pos = self._pos
        else:
            self._pos = resolve_seek(self._pos, 0, offset, whence)
        return self._pos

    def tell(self) -> int:
        return self._pos

    async def _attempt(self, op: Callable[[BlobReader], Awaitable[X]]) -> X:
        """``op`` on the current member's reader (moved to this reader's position); on failure, the next member's."""
        while True:
            if self._inner is None:
                raise StorageError(f"blob {self._digest.hex()}: reader is closed")
            try:
                if self._inner_pos != self._pos:
                    self._inner_pos = await self._inner.seek(self._pos)
                return await op(self._inner)
            except ValidationError:  # the caller's mistake (a seek before 0): no member would do better
                raise
            except Exception as e:
                self._outcome.record(self._member, e)
                await self._switch()

    async def _switch(self) -> None:
        """Continue on the next member that has the blob, or raise every member's failure."""
        if self._inner is not None:
            await _close_quietly(self._inner)
            self._inner = None
        found = await self._candidates.next()
        if found is not None:
            self._member, opened = found
            if opened.rest is None:  # cannot be: a blob this large was verified short elsewhere  # pragma: no cover
                raise StorageError(f"{self._member!r}: blob {self._digest.hex()} is shorter than another member's")
            self._inner, self._inner_pos = opened.rest, len(opened.head)
            return
        self._outcome.absent = 0  # part of the blob was handed out: no member can be "absent" any more
        self._outcome.result()
        raise AssertionError("unreachable: result() raises without an absent member")  # pragma: no cover

    async def close(self) -> None:
        try:
            if self._inner is not None:
                await self._inner.close()
                self._inner = None
        finally:
            await self._candidates.close()

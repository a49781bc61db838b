"""The DirectoryService interface, closure uploads, and verify-on-read.

Backends store canonical Directory bytes by digest and implement three
primitives (``_get_raw``, ``_get_many_raw``, ``_put_raw``).  The base class
re-hashes every stored value it hands out (a corrupt backend raises
:class:`~nixcas.errors.ChecksumMismatch`), walks closures breadth-first, and
validates uploads leaves-to-root before a single byte is committed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from typing import ClassVar

from nixcas._aio import AbortOnError, Closing
from nixcas.castore.digest import B3Digest
from nixcas.castore.directory import Directory, check_stored, decode_stored
from nixcas.castore.graph import LeavesToRootValidator
from nixcas.castore.sizerule import DEFAULT_SIZE_RULE, LEGACY_SIZE_RULE, SizeRule
from nixcas.errors import ConfigurationError, StorageError

__all__ = ["DirectoryPutter", "DirectoryService", "settle_size_rule"]


def settle_size_rule(
    recorded: SizeRule | None, has_directories: bool, requested: SizeRule | None, where: str
) -> tuple[SizeRule, bool]:
    """The rule a store follows, and whether it must now be recorded.

    ``recorded``: what the store records (``None``: nothing); a store holding
    directories without a record was written by the tvix rule; an empty one
    takes ``requested`` or the default (snix).  A ``requested`` rule that
    contradicts the store's is a :class:`~nixcas.errors.ConfigurationError`
    naming both.
    """
    rule = recorded
    if rule is None:
        rule = LEGACY_SIZE_RULE if has_directories else (requested or DEFAULT_SIZE_RULE)
    if requested is not None and requested != rule:
        raise ConfigurationError(
            f"{where} follows the {rule} directory size rule, not the requested {requested} "
            f"(convert it with: nixcas castore rewrite-directories --to {requested})"
        )
    return rule, recorded is None


def _child_digests(digest: B3Digest, raw: bytes) -> list[B3Digest]:
    """The sub-directory digests in a stored Directory (hash already checked)."""
    from google.protobuf.message import DecodeError

    from nixcas._proto.tvix.castore.protos import castore_pb2 as pb

    try:
        return [B3Digest(entry.digest) for entry in pb.Directory.FromString(raw).directories]
    except (DecodeError, ValueError) as e:
        raise StorageError(f"directory {digest.hex()} is stored in an invalid form: {e}") from None


class DirectoryService(Closing, ABC):
    """Stores Directory messages by digest.  Absence is ``None`` / an empty stream."""

    size_rule: SizeRule = DEFAULT_SIZE_RULE
    """The rule the sizes recorded in stored directories follow (see :mod:`nixcas.castore.sizerule`).

    Persistent backends read it from their store (recorded when it was
    created); others take it from their configuration.  Uploads whose child
    sizes follow another rule are refused."""

    rule_recorded: ClassVar[bool] = False
    """The backend keeps its rule with its data (a wrapper or cache in front of it must agree)."""

    rewritable: ClassVar[bool] = True
    """``nixcas castore rewrite-directories`` may convert this service's store (not a daemon's or a cache's)."""

    async def record_size_rule(self, rule: SizeRule) -> None:
        """Make ``rule`` this store's rule (after its directories were rewritten to it)."""
        self.size_rule = rule

    closures_only: ClassVar[bool] = False
    """Only closure roots are retrievable (:meth:`get`, :meth:`get_many_raw`); their
    descendants come only through :meth:`get_recursive` / :meth:`get_recursive_raw`
    of a root (the object-store layout: one object per closure)."""

    # -- backend primitives ----------------------------------------------------

    @abstractmethod
    async def _get_raw(self, digest: B3Digest) -> bytes | None:
        """The stored canonical bytes for ``digest``, or ``None``."""

    async def _get_many_raw(self, digests: Sequence[B3Digest]) -> dict[B3Digest, bytes]:
        """Stored bytes for those of ``digests`` that exist (backends may batch)."""
        found: dict[B3Digest, bytes] = {}
        for d in digests:
            raw = await self._get_raw(d)
            if raw is not None:
                found[d] = raw
        return found

    @abstractmethod
    async def _put_raw(self, items: Sequence[tuple[B3Digest, bytes]]) -> None:
        """Store all ``items`` atomically (all or nothing); existing ones are kept."""

    # -- public interface ------------------------------------------------------

    async def get(self, digest: B3Digest) -> Directory | None:
        """One Directory, verified against ``digest``."""
        raw = await self._get_raw(digest)
        return None if raw is None else decode_stored(digest, raw)

    async def get_many_raw(self, digests: Sequence[B3Digest]) -> dict[B3Digest, bytes]:
        """Stored bytes of those of ``digests`` that exist, *unchecked* (GC and fsck check them themselves)."""
        return await self._get_many_raw(digests)

    async def put_validated(self, items: Sequence[tuple[B3Digest, bytes]]) -> None:
        """Store a closure a :class:`DirectoryPutter` already validated, leaves first, all or nothing.

        For a wrapper that forwards what its own putter checked (a cache filling its near
        store): the bytes are each digest's canonical encoding and every child is in
        ``items`` or already stored.  Everyone else uploads through :meth:`put_multiple_start`.
        """
        await self._put_raw(items)

    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        """The closure of ``root``: root first, then breadth-first, each Directory once.

        A missing root yields nothing; a missing descendant is a
        :class:`~nixcas.errors.StorageError` (the store lost part of a closure).
        """
        async for _, _, directory in self._walk(root, decode=True):
            assert directory is not None
            yield directory

    async def get_recursive_raw(self, root: B3Digest) -> AsyncIterator[tuple[B3Digest, bytes]]:
        """:meth:`get_recursive` as (digest, canonical bytes), for passing directories on unchanged.

        Every value is checked against its digest; the structure is not decoded
        again (it was validated when stored, and the hash proves it unchanged).
        Services that override :meth:`get_recursive` get this on top of it.
        """
        if type(self).get_recursive is not DirectoryService.get_recursive:
            async for directory in self.get_recursive(root):
                yield directory.digest, directory.encode()
            return
        async for digest, raw, _ in self._walk(root, decode=False):
            yield digest, raw

    async def _walk(self, root: B3Digest, *, decode: bool) -> AsyncIterator[tuple[B3Digest, bytes, Directory | None]]:
        """Breadth-first over stored values, each hash-checked.

        With ``decode`` each value is also decoded (and validated) and its
        children come from the Directory; without, only the child digests are
        read from the protobuf.
        """
        seen = {root}
        level = [root]
        while level:
            found = await self._get_many_raw(level)
            next_level: list[B3Digest] = []
            for digest in level:
                raw = found.get(digest)
                if raw is None:
                    if digest == root:
                        return
                    raise StorageError(f"directory {digest.hex()} is referenced but missing")
                directory = decode_stored(digest, raw) if decode else None
                if directory is not None:
                    children = [node.digest for _, node in directory.directories()]
                else:
                    check_stored(digest, raw)
                    children = _child_digests(digest, raw)
                yield digest, raw, directory
                for child in children:
                    if child not in seen:
                        seen.add(child)
                        next_level.append(child)
            level = next_level

    async def put(self, directory: Directory) -> B3Digest:
        """Store one Directory (its children are not checked); return its digest."""
        await self._put_raw([(directory.digest, directory.encode())])
        return directory.digest

    def put_multiple_start(self) -> DirectoryPutter:
        """Start uploading a closure, leaves first; see :class:`DirectoryPutter`."""
        return DirectoryPutter(self)


class DirectoryPutter(AbortOnError):
    """Collects a closure leaves-to-root and commits it atomically on :meth:`close`.

    Each :meth:`put` is checked at once (a child must have been put earlier in
    this putter, with its true size); :meth:`close` checks that the closure is
    non-empty with exactly one root, then stores everything in one step and
    returns the root digest.  Nothing is visible before that; :meth:`abort`
    (or leaving ``async with`` by an exception) drops it all.
    """

    def __init__(self, service: DirectoryService) -> None:
        self._service = service
        self._validator = LeavesToRootValidator(service.size_rule)
        self._root: B3Digest | None = None
        self._aborted = False

    async def put(self, directory: Directory) -> None:
        """Add one Directory; its sub-directories must already have been put."""
        if self._root is not None or self._aborted:
            raise StorageError("directory putter is already closed")
        self._validator.add(directory)

    async def close(self) -> B3Digest:
        """Validate and commit the closure; return the root digest."""
        if self._root is None:
            if self._aborted:
                raise StorageError("directory putter was aborted")
            root, directories = self._validator.finish()
            await self._service.put_validated([(d.digest, d.encode()) for d in directories])
            self._root = root
        return self._root

    async def abort(self) -> None:
        """Discard everything put so far."""
        if self._root is None:
            self._aborted = True
            self._validator = LeavesToRootValidator(self._service.size_rule)

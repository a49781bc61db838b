"""The BlobService interface, its reader/writer types, and verify-on-read.

A blob is named by the BLAKE3 of its bytes.  Backends implement a small
abstract core (``has``, ``chunks``, ``_open_read``, ``open_write``); the base
class wraps every reader a backend hands out in :class:`VerifyingReader`, so
a corrupt backend cannot pass wrong bytes through a full read unnoticed.
:meth:`BlobService.read_many` (many small blobs at once) verifies every blob
a backend's ``_read_many`` hook returns the same way, through
:class:`BlobChecker`.
"""

from __future__ import annotations

import asyncio
import io
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import blake3

from nixcas._aio import AbortOnError, Closing
from nixcas.castore.digest import B3Digest
from nixcas.errors import ChecksumMismatch, StorageError, ValidationError

T = TypeVar("T")

__all__ = [
    "READ_BLOCK",
    "READ_MANY_PARALLEL",
    "BlobChecker",
    "BlobReader",
    "BlobService",
    "BlobWriter",
    "BulkReads",
    "BytesReader",
    "ChunkMeta",
    "ChunkStore",
    "FailedReader",
    "VerifiedBytesReader",
    "VerifyingReader",
    "check_chunk",
]

READ_BLOCK = 1 << 20
"""Block size used when streaming blobs (1 MiB)."""

READ_MANY_PARALLEL = 8
"""Default bound on concurrent blob reads of one :meth:`BlobService.read_many` (blob-by-blob backends)."""


@dataclass(frozen=True, slots=True)
class ChunkMeta:
    """One chunk of a chunked blob: its digest and its (uncompressed) size."""

    digest: B3Digest
    size: int


def check_chunk(chunk: ChunkMeta, data: bytes, where: str) -> bytes:
    """``data`` if it is ``chunk`` (size and BLAKE3); otherwise a :class:`StorageError`."""
    if len(data) != chunk.size:
        raise StorageError(
            f"{where}: chunk {chunk.digest.hex()} has {len(data)} bytes, its index declares {chunk.size}"
        )
    got = blake3.blake3(data).digest()
    if got != chunk.digest:
        raise ChecksumMismatch(f"{where}: chunk {chunk.digest.hex()}", chunk.digest.hex(), got.hex())
    return data


class BlobReader(Closing, ABC):
    """An async, seekable reader over one blob's bytes."""

    verified: ClassVar[bool] = False
    """Every byte it returns was hashed against the digest already (``open_read`` does not hash again)."""

    @abstractmethod
    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all remaining for ``n < 0``); ``b""`` at EOF."""

    @abstractmethod
    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move to ``offset`` (relative to ``whence``); return the new position."""

    @abstractmethod
    def tell(self) -> int:
        """The current position."""

    async def iter_blocks(self, block: int = READ_BLOCK) -> AsyncIterator[bytes]:
        """The remaining bytes, in blocks of at most ``block`` bytes."""
        while data := await self.read(block):
            yield data

    async def read_all(self) -> bytes:
        """All remaining bytes (only for blobs known to be small)."""
        return b"".join([b async for b in self.iter_blocks()])


def resolve_seek(pos: int, size: int, offset: int, whence: int) -> int:
    """The absolute position a ``seek`` lands on; rejects negatives and bad ``whence``."""
    if whence == io.SEEK_SET:
        target = offset
    elif whence == io.SEEK_CUR:
        target = pos + offset
    elif whence == io.SEEK_END:
        target = size + offset
    else:
        raise ValidationError(f"invalid whence {whence}")
    if target < 0:
        raise ValidationError(f"cannot seek to negative position {target}")
    return target


class BytesReader(BlobReader):
    """A :class:`BlobReader` over bytes already in memory."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0

    async def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else min(len(self._data), self._pos + n)
        out = bytes(self._data[self._pos : end])
        self._pos = max(self._pos, end)
        return out

    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = resolve_seek(self._pos, len(self._data), offset, whence)
        return self._pos

    def tell(self) -> int:
        return self._pos


class VerifiedBytesReader(BytesReader):
    """A :class:`BytesReader` over a whole blob already hashed against its digest (by the backend that read it)."""

    verified: ClassVar[bool] = True


class FailedReader(BlobReader):
    """A blob found damaged when opened: every read (and ``SEEK_END``) raises the error, no byte is returned."""

    verified: ClassVar[bool] = True  # it returns no byte at all

    def __init__(self, error: StorageError) -> None:
        self._error = error
        self._pos = 0

    async def read(self, n: int = -1) -> bytes:
        raise self._error

    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END:
            raise self._error
        self._pos = resolve_seek(self._pos, 0, offset, whence)
        return self._pos

    def tell(self) -> int:
        return self._pos


class VerifyingReader(BlobReader):
    """Hashes what is read sequentially from the start and checks it at EOF.

    While reads are contiguous from position 0, every byte goes into a BLAKE3
    hasher; when the inner reader reports EOF the digest is compared and a
    mismatch raises :class:`ChecksumMismatch` instead of a clean EOF.  A
    seek elsewhere suspends verification until the reader is back at the
    hashed frontier (range reads are verified chunk-wise by chunked backends).
    """

    def __init__(self, inner: BlobReader, digest: B3Digest) -> None:
        self._inner = inner
        self._digest = digest
        self._hasher = blake3.blake3()
        self._hashed = 0
        self._verified = False

    async def read(self, n: int = -1) -> bytes:
        pos = self._inner.tell()
        data = await self._inner.read(n)
        if pos == self._hashed and not self._verified:
            if data:
                self._hasher.update(data)
                self._hashed += len(data)
            # An empty read, or a read of "everything remaining", ends the blob.
            if (not data and n != 0) or (data and n < 0):
                self._verify()
        return data

    def _verify(self) -> None:
        got = B3Digest(self._hasher.digest())
        if got != self._digest:
            raise ChecksumMismatch(f"blob {self._digest.hex()}", self._digest.hex(), got.hex())
        self._verified = True

    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return await self._inner.seek(offset, whence)

    def tell(self) -> int:
        return self._inner.tell()

    async def close(self) -> None:
        await self._inner.close()


class BlobChecker:
    """Verify-on-read for :meth:`BlobService.read_many`.

    A backend's ``_read_many`` hook may call :meth:`check` where hashing is
    cheapest (in the worker thread that read the bytes, say); it is
    thread-safe.  :meth:`BlobService.read_many` then hashes every returned
    blob that this checker has not seen, as that very object, so nothing
    reaches the caller unverified whatever the hook does.
    """

    __slots__ = ("_checked",)

    def __init__(self) -> None:
        self._checked: dict[B3Digest, bytes] = {}

    def check(self, digest: B3Digest, data: bytes) -> bytes:
        """``data`` if it hashes to ``digest``; else :class:`ChecksumMismatch`."""
        got = blake3.blake3(data).digest()
        if got != digest:
            raise ChecksumMismatch(f"blob {digest.hex()}", digest.hex(), got.hex())
        self._checked[digest] = data
        return data

    def checked(self, digest: B3Digest, data: bytes) -> bool:
        """Whether :meth:`check` passed for exactly this ``data`` object under ``digest``."""
        return self._checked.get(digest) is data


async def run_bounded(items: Sequence[T], fn: Callable[[T], Awaitable[None]], parallel: int) -> None:
    """``fn(item)`` for every item, at most ``parallel`` at a time; the first error cancels the rest."""
    it = iter(items)

    async def worker() -> None:
        for item in it:
            await fn(item)

    tasks = [asyncio.ensure_future(worker()) for _ in range(max(1, min(parallel, len(items))))]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class BlobWriter(AbortOnError, ABC):
    """Receives a blob's bytes; :meth:`close` makes it visible and returns its digest.

    Nothing becomes visible before :meth:`close` returns.  :meth:`abort` (or
    leaving ``async with`` by an exception) discards everything written.
    Calling :meth:`close` again returns the same digest; writing after close
    or abort is an error.
    """

    @abstractmethod
    async def write(self, data: bytes) -> None:
        """Append ``data``."""

    @abstractmethod
    async def close(self) -> B3Digest:
        """Finish the blob, make it visible, return its digest."""

    @abstractmethod
    async def abort(self) -> None:
        """Discard what was written; nothing becomes visible."""

    async def _admit(self, state: WriterState, size: int) -> None:
        """Account for ``size`` more bytes; a write the blob cannot take aborts the writer, then raises."""
        try:
            state.check_writable(size)
        except ValueError:
            await self.abort()
            raise


class WriterState:
    """Bookkeeping shared by writers: closed/aborted state, size, declared size."""

    def __init__(self, expected_size: int | None) -> None:
        self.expected_size = expected_size
        self.written = 0
        self.digest: B3Digest | None = None
        self.aborted = False

    def check_writable(self, data_len: int) -> None:
        if self.aborted:
            raise StorageError("blob writer was aborted")
        if self.digest is not None:
            raise StorageError("blob writer is already closed")
        self.written += data_len
        if self.expected_size is not None and self.written > self.expected_size:
            raise ValidationError(
                f"blob is larger than its declared size {self.expected_size} (got at least {self.written})"
            )

    def check_complete(self) -> None:
        if self.aborted:
            raise StorageError("blob writer was aborted")
        if self.expected_size is not None and self.written != self.expected_size:
            raise ValidationError(f"blob is shorter than its declared size {self.expected_size} (got {self.written})")


class BulkReads(ABC):
    """Synchronous, verified reads of many blobs, from worker threads (:meth:`BlobService.bulk_reads`).

    For backends that read their own storage without the event loop (``packed``, ``objectstore+file``):
    ``dump-path`` reads a tree's blobs in large batches.  Thread-safe; every byte returned is hashed
    against its digest.  A blob a method cannot serve (missing, of another size, damaged, in a form only
    the async API reads) makes the whole call ``None``: the async API then reports what is wrong.  Results
    may be views into ``buffer`` (if large enough), valid until the caller hands it out again.
    """

    run_max: int
    """The largest blob :meth:`read_run` takes."""

    whole_max: int
    """The largest blob :meth:`read_whole` takes."""

    @abstractmethod
    def read_run(self, wanted: Sequence[tuple[bytes, int]], buffer: memoryview) -> list[bytes | memoryview] | None:
        """The contents of each of ``wanted`` (raw digest, exact size; at most :attr:`run_max`), in order, verified."""

    @abstractmethod
    def read_whole(self, digest: bytes, size: int, buffer: memoryview) -> bytes | memoryview | None:
        """One blob of exactly ``size`` bytes (at most :attr:`whole_max`), verified whole before it is returned."""

    def will_read_chunks(self, digests: Sequence[bytes]) -> None:  # noqa: B027 - a hint: by default nothing
        """A hint: these chunks are read next (a file backend has the kernel read them all ahead; errors ignored)."""

    def read_chunk_into(self, digest: bytes, size: int, buffer: memoryview) -> bytes | memoryview | None:
        """One chunk of a chunked blob (raw digest, exact size), verified: by default :meth:`read_whole`."""
        return self.read_whole(digest, size, buffer)

    def read_chunks(self, digest: bytes, size: int) -> Iterator[bytes] | None:
        """A chunked blob of exactly ``size`` bytes, chunk by chunk (too big to hold whole), each chunk checked
        (digest, size) before it is yielded and the whole blob's BLAKE3 at the end (:class:`ChecksumMismatch`: publish
        only once it is exhausted); a damaged or missing chunk raises :class:`StorageError`; ``None`` (before anything
        is read) if missing, not chunked or of another size, and always by default (backends without chunk files)."""
        return None


class BlobService(Closing, ABC):
    """Stores blobs by BLAKE3 digest.  Absence is ``None``/``False``, never an exception."""

    chunk_reads: ClassVar[bool] = True
    """Whether a chunked blob may be read chunk by chunk (:meth:`chunks`, then :meth:`read_chunk` for each,
    the whole hashed by the caller) instead of through :meth:`open_read`, which a mount does to fetch
    chunks in parallel; ``False`` where :meth:`open_read` does more than read (``combined`` fills near)."""

    accepts_views: ClassVar[bool] = False
    """Whether :meth:`put_many` takes ``memoryview`` objects too (held only until it returns), not only bytes."""

    def bulk_reads(self) -> BulkReads | None:
        """Synchronous batched reads of this backend's storage, if it has them (see :class:`BulkReads`).

        ``None`` (the default): blobs are read only through the async API, as for every remote backend.
        """
        return None

    @abstractmethod
    async def has(self, digest: B3Digest) -> bool:
        """Whether the blob exists."""

    @abstractmethod
    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        """``None`` if missing; ``[]`` if stored without finer chunking; else the chunk list."""

    @abstractmethod
    async def _open_read(self, digest: B3Digest) -> BlobReader | None:
        """Backend hook: an unverified reader, or ``None`` if missing."""

    @abstractmethod
    async def open_write(self, expected_size: int | None = None) -> BlobWriter:
        """A writer for a new blob; ``expected_size`` (if given) is enforced at close."""

    async def size(self, digest: B3Digest) -> int | None:
        """The blob's size in bytes (``None``: missing), e.g. to check a file node before serving it.

        From the chunk list when there is one; otherwise the blob is read to its
        end (verified).  Backends that record sizes answer without reading.
        """
        chunks = await self.chunks(digest)
        if chunks is None:
            return None
        if chunks:
            return sum(c.size for c in chunks)
        reader = await self.open_read(digest)
        if reader is None:
            return None
        async with reader:
            size = 0
            while data := await reader.read(READ_BLOCK):
                size += len(data)
            return size

    async def sizes(self, digests: Sequence[B3Digest]) -> list[int | None]:
        """:meth:`size` of each of ``digests`` (backends may batch this)."""
        found: list[int | None] = []
        for i in range(0, len(digests), 256):
            found.extend(await asyncio.gather(*(self.size(d) for d in digests[i : i + 256])))
        return found

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        """A seekable reader whose sequential full read is verified against ``digest`` (once: see ``verified``)."""
        reader = await self._open_read(digest)
        if reader is None or reader.verified:
            return reader
        return VerifyingReader(reader, digest)

    async def open_raw(self, digest: B3Digest) -> BlobReader | None:
        """The backend's reader without verify-on-read (``None``: missing), for a caller that checks
        what it reads itself: a bao range reader, a wrapper whose own :meth:`open_read` verifies."""
        return await self._open_read(digest)

    async def read_many_raw(
        self, max_sizes: Mapping[B3Digest, int], checker: BlobChecker, *, parallel: int = READ_MANY_PARALLEL
    ) -> dict[B3Digest, bytes]:
        """:meth:`read_many` unverified, for a wrapper that checks the result: blobs the backend hashed
        are marked in ``checker``, the caller hashes the others (and drops those over their maximum)."""
        return await self._read_many(max_sizes, checker, max(1, parallel))

    async def missing(self, digests: Sequence[B3Digest]) -> list[B3Digest]:
        """Those of ``digests`` not stored, in order: :meth:`has` for many (backends batch it)."""
        out: list[B3Digest] = []
        for i in range(0, len(digests), 256):
            batch = digests[i : i + 256]
            present = await asyncio.gather(*(self.has(d) for d in batch))
            out.extend(d for d, here in zip(batch, present, strict=True) if not here)
        return out

    async def put(self, data: bytes) -> B3Digest:
        """Store a blob held in memory; return its digest."""
        writer = await self.open_write(len(data))
        async with writer:
            await writer.write(data)
            return await writer.close()

    async def put_many(self, blobs: Sequence[bytes]) -> list[B3Digest]:
        """Store several in-memory blobs; backends may batch this."""
        return list(await asyncio.gather(*(self.put(b) for b in blobs)))

    async def put_many_hashed(self, digests: Sequence[B3Digest], blobs: Sequence[bytes]) -> list[B3Digest]:
        """:meth:`put_many` of blobs whose digests this program computed from these very bytes (an import's walking
        process); here they are computed again.  Never for digests from outside."""
        if (stored := await self.put_many(blobs)) != list(digests):
            raise StorageError("blobs given with their digests were stored under others: a bug")
        return stored

    async def put_many_before_sync(self, blobs: Sequence[bytes]) -> list[B3Digest]:
        """:meth:`put_many` of a batch a :meth:`sync` follows at once (the last of an ingest): a backend may
        make it durable on the way, so that the sync has nothing left to do.  The caller still syncs."""
        return await self.put_many(blobs)

    async def read(self, digest: B3Digest) -> bytes | None:
        """The whole blob in memory (only for blobs known to be small), verified."""
        reader = await self.open_read(digest)
        if reader is None:
            return None
        async with reader:
            return await reader.read_all()

    async def read_many(
        self, max_sizes: Mapping[B3Digest, int], *, parallel: int = READ_MANY_PARALLEL
    ) -> dict[B3Digest, bytes]:
        """The whole contents of several small blobs, verified: for many small files at once.

        ``max_sizes`` maps each wanted digest to the largest size the caller accepts (usually the size
        it expects).  The result holds every blob that exists and fits; missing blobs and blobs over
        their maximum are *left out* (never read whole: backends look at the stored size or stop after
        ``max + 1`` bytes); to tell the two apart, ask :meth:`open_read`.  Every blob returned was hashed
        against its digest; a mismatch raises :class:`ChecksumMismatch` (for the whole call).  ``parallel``
        bounds concurrent reads where blobs are read one by one (``objectstore+file``, ``memory``: batches).
        """
        for digest, cap in max_sizes.items():
            if cap < 0:
                raise ValidationError(f"read_many: negative maximum size {cap} for blob {digest.hex()}")
        if not max_sizes:
            return {}
        checker = BlobChecker()
        found = await self._read_many(max_sizes, checker, max(1, parallel))
        out: dict[B3Digest, bytes] = {}
        for digest, data in found.items():
            limit = max_sizes.get(digest)
            if limit is None or len(data) > limit:
                continue  # not asked for, or too large: left out as documented
            if type(data) is not bytes:
                data = bytes(data)
            if not checker.checked(digest, data):
                checker.check(digest, data)
            out[digest] = data
        return out

    async def _read_many(
        self, max_sizes: Mapping[B3Digest, int], checker: BlobChecker, parallel: int
    ) -> dict[B3Digest, bytes]:
        """Backend hook of :meth:`read_many`: the blobs found that fit (may be verified with ``checker``).

        The default reads blob by blob through :meth:`_open_read`, at most
        ``parallel`` at a time; :meth:`read_many` verifies the result.
        """
        return await self._read_each(max_sizes, parallel)

    async def _read_each(self, max_sizes: Mapping[B3Digest, int], parallel: int) -> dict[B3Digest, bytes]:
        """Read blobs one by one through :meth:`_open_read` (unverified), at most ``parallel`` at a time."""
        found: dict[B3Digest, bytes] = {}

        async def one(item: tuple[B3Digest, int]) -> None:
            data = await self._read_capped(*item)
            if data is not None:
                found[item[0]] = data

        await run_bounded(list(max_sizes.items()), one, parallel)
        return found

    async def _read_capped(self, digest: B3Digest, cap: int) -> bytes | None:
        """A blob's raw bytes if it exists and has at most ``cap`` bytes (reading at most ``cap + 1``)."""
        reader = await self._open_read(digest)
        if reader is None:
            return None
        async with reader:
            parts: list[bytes] = []
            got = 0
            while got <= cap:
                data = await reader.read(cap + 1 - got)
                if not data:
                    return b"".join(parts)
                parts.append(data)
                got += len(data)
        return None  # larger than cap

    async def sync(self) -> None:
        """Make every blob written so far durable (a barrier before metadata refers to them)."""

    async def read_chunk(self, chunk: ChunkMeta) -> bytes | None:
        """One chunk of a chunked blob (a blob by itself too), whole and checked; ``None`` if missing.

        At most ``chunk.size + 1`` bytes are read; a chunk of another size or
        hash raises :class:`StorageError` / :class:`ChecksumMismatch`.
        """
        data = await self._read_capped(chunk.digest, chunk.size)
        if data is None:
            if await self.has(chunk.digest):
                raise StorageError(
                    f"{self!r}: chunk {chunk.digest.hex()} is larger than its declared {chunk.size} bytes"
                )
            return None
        return check_chunk(chunk, data, repr(self))

    async def outboard(self, digest: B3Digest) -> bytes | None:
        """The blob's bao outboard (16 KiB chunk groups, see :mod:`nixcas.castore.bao`); ``None`` if missing.

        The default computes it from a full, verified read (a blob that does
        not hash to its digest raises instead of yielding an outboard).
        """
        from nixcas.castore.bao import OutboardEncoder

        reader = await self.open_read(digest)
        if reader is None:
            return None
        encoder = OutboardEncoder()
        async with reader:
            while block := await reader.read(READ_BLOCK):
                await asyncio.to_thread(encoder.update, block)
        return await asyncio.to_thread(encoder.finish)


class ChunkStore(ABC):
    """What a blob service that keeps blobs as chunks plus an index offers beyond :class:`BlobService`.

    Implemented by backends of the object-store layout (``objectstore+file``,
    ``objectstore+s3`` …) and by a daemon reached through ``grpc+…?chunkstore=1``
    (snix's ChunkStoreService/BlobStoreService); the ``combined`` service uses
    it to fill near chunk by chunk while a blob streams: it puts each chunk it fetches (checked against its digest), and
    puts the index last, once the whole blob has passed and been verified.
    """

    @abstractmethod
    async def missing_chunks(self, chunks: Sequence[ChunkMeta]) -> list[ChunkMeta]:
        """Those of ``chunks`` not stored here (in the given order)."""

    @abstractmethod
    async def put_chunk(self, chunk: ChunkMeta, data: bytes) -> None:
        """Store one chunk if absent; ``data`` must hash to ``chunk.digest`` (checked)."""

    @abstractmethod
    async def put_index(self, digest: B3Digest, chunks: Sequence[ChunkMeta]) -> None:
        """Publish blob ``digest`` as the concatenation of ``chunks`` (which must all be stored).

        The caller vouches that the concatenation hashes to ``digest``: it has
        hashed it (a backend cannot without reading every chunk back).
        """

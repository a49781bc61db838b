"""``objectstore+file:///abs/path`` — the snix object layout on a local filesystem.

Blobs are cut into chunks by FastCDC 2020 (:mod:`.chunking`, the snix
parameters).  Blocking filesystem work runs in worker threads; every object
appears by an atomic ``rename`` of a finished temporary file (chunks first,
each only if absent, index last), so readers never see a partial object and
an interrupted write leaves only a file under ``tmp/`` (and, for a
multi-chunk blob, chunks no index refers to yet).  Durability is batched: :meth:`LocalBlobService.sync`
is a barrier (``syncfs``) that importers call once before they publish
metadata referring to the blobs, instead of an ``fsync`` per file.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import io
import itertools
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, ClassVar, Self, TypeVar
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

import blake3
import zstandard

from nixcas._aio import to_thread_uninterrupted
from nixcas.castore.blob.base import (
    BlobChecker,
    BlobReader,
    BlobService,
    BlobWriter,
    BulkReads,
    BytesReader,
    ChunkMeta,
    ChunkStore,
    FailedReader,
    VerifiedBytesReader,
    WriterState,
    check_chunk,
    resolve_seek,
)
from nixcas.castore.blob.chunked import ChunkedReader
from nixcas.castore.blob.chunking import (
    AVG_CHUNK_SIZE,
    Chunker,
    check_avg_chunk_size,
    check_chunk_list,
    compressed_bound,
    cut,
    decompress_at_most,
    decompress_chunk,
)
from nixcas.castore.blob.layout import ZSTD_LEVEL, bao_key, blob_index_key, chunk_key, decode_index, encode_index
from nixcas.castore.digest import DIGEST_LEN, EMPTY_DIGEST, B3Digest
from nixcas.castore.sweep import Deletion, StoredObject
from nixcas.config import Resolver, ServiceConfig
from nixcas.errors import ChecksumMismatch, ConfigurationError, StorageError, ValidationError
from nixcas.ops import stats
from nixcas.urls import query_options, shown

__all__ = ["LocalBlobService", "LocalBlobServiceConfig"]

T = TypeVar("T")

SPILL_THRESHOLD = 1 << 20
"""Writers keep up to this many bytes in memory before they start writing chunks."""

SINGLE_CHUNK_CAP = 4 << 20
"""A single-chunk blob of at most this many bytes (every chunk the writer makes, at any ``avg_chunk_size``)
is read, decompressed (bounded) and verified in one step before a byte is returned."""

LEGACY_MAX_SIZE = 64 << 30
"""The largest single-object blob (written before chunking) that is served; it is verified in a first pass."""

READ_WINDOW = 2 << 20
"""Bytes of chunks a sequential read of a chunked blob keeps in flight (decompressed in worker threads)."""

_CREATE_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
"""Flags for creating a file that must not exist yet."""
_READ_ONLY = os.O_RDONLY | os.O_CLOEXEC

WHOLE_MAX = 64 << 20
"""The largest blob :meth:`LocalBlobService.read_whole` reads whole (and hashes once) before returning it."""

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_FCS_BYTES = (0, 2, 4, 8)
_DICT_ID_BYTES = (0, 1, 2, 4)


def raw_blocks(data: memoryview, start: int, end: int) -> list[tuple[int, int]] | None:
    """Where the content of ``data[start:end]`` lies if it is one zstd frame of raw blocks: (offset, length) each.

    The default store writes chunk objects as such frames (``STORE_LEVEL``): their content is
    the blocks' payloads as they are, so reading one needs no decompressor and no copy.
    Anything else (compressed or RLE blocks, a dictionary, several frames, trailing bytes,
    a content size that disagrees with the blocks) gives ``None``: zstd decodes it.
    """
    if end - start < 6 or data[start : start + 4] != _ZSTD_MAGIC:
        return None
    descriptor = data[start + 4]
    if descriptor & 0x08 or descriptor & 0x03:  # reserved bit; a dictionary
        return None
    single_segment = descriptor & 0x20
    fcs_len = _FCS_BYTES[descriptor >> 6] or (1 if single_segment else 0)
    pos = start + 5 + (0 if single_segment else 1)
    declared = int.from_bytes(data[pos : pos + fcs_len], "little") + (256 if fcs_len == 2 else 0)
    pos += fcs_len
    blocks: list[tuple[int, int]] = []
    total = 0
    while True:
        if pos + 3 > end:
            return None
        header = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
        size = header >> 3
        pos += 3
        if header & 0x06 or pos + size > end:  # not a raw block, or cut short
            return None
        if size:
            blocks.append((pos, size))
        pos += size
        total += size
        if header & 1:
            break
    if descriptor & 0x04:  # content checksum (BLAKE3 is checked instead)
        pos += 4
    if pos != end or (fcs_len and declared != total):
        return None
    return blocks


class _Slow:
    """Marker: this blob needs the general (streaming, per-blob) read path."""


_SLOW = _Slow()


@functools.cache
def _libc() -> ctypes.CDLL:
    import ctypes.util  # runs ldconfig: only writers need libc, so readers do not pay for it

    return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def _syncfs(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if getattr(_libc(), "syncfs", None) is None or _libc().syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


_OPTIONS = {"zstd_level"}


@dataclass(frozen=True)
class LocalBlobServiceConfig(ServiceConfig[BlobService]):
    """``objectstore+file:///abs/path[?zstd_level=N]``.

    Composition: ``type = "objectstore"``, ``object_store_url = "file:///abs/path"``,
    ``object_store_options = { zstd_level = "3" }``, ``avg_chunk_size = 262144`` (the
    tvix/snix field names; as in snix, the URL form always uses the default chunk size).
    """

    type_tag: ClassVar[str] = "objectstore"
    object_store_url: str
    object_store_options: dict[str, str] = field(default_factory=dict)
    avg_chunk_size: int = AVG_CHUNK_SIZE

    @classmethod
    def from_url(cls, url: SplitResult) -> Self:
        inner = url.scheme.partition("+")[2]
        options = query_options(url, _OPTIONS if inner == "file" else set())
        if url.path and not url.path.startswith("/"):
            raise ConfigurationError(f"{shown(url)!r}: needs an absolute path (write objectstore+file:///abs/path)")
        bare = urlunsplit((inner, url.netloc, url.path, "", ""))
        config = cls(bare, options)
        config.validate(repr(shown(url)))
        return config

    def validate(self, where: str) -> None:
        url = urlsplit(self.object_store_url)
        if url.scheme != "file":
            raise ConfigurationError(
                f"{where}: unsupported object store {url.scheme or '(none)'!r} (supported: objectstore+file)"
            )
        if url.netloc:
            raise ConfigurationError(f"{where}: file URLs take no host (write file:///abs/path)")
        if url.query or url.fragment:
            raise ConfigurationError(f"{where}: options go into object_store_options, not the URL")
        path = unquote(url.path)
        if not path.startswith("/") or path.rstrip("/") == "":
            raise ConfigurationError(f"{where}: needs an absolute path other than /")
        unknown = set(self.object_store_options) - _OPTIONS
        if unknown:
            raise ConfigurationError(f"{where}: unknown option {min(unknown)!r} (known: {', '.join(sorted(_OPTIONS))})")
        if "zstd_level" in self.object_store_options:
            try:
                level = int(self.object_store_options["zstd_level"])
            except ValueError:
                raise ConfigurationError(f"{where}: zstd_level must be an integer") from None
            if not -7 <= level <= 22:
                raise ConfigurationError(f"{where}: zstd_level must be between -7 and 22")
        check_avg_chunk_size(self.avg_chunk_size, where)

    async def build(self, resolver: Resolver) -> BlobService:
        path = unquote(urlsplit(self.object_store_url).path)
        level = int(self.object_store_options.get("zstd_level", ZSTD_LEVEL))
        return await asyncio.to_thread(LocalBlobService, path, zstd_level=level, avg_chunk_size=self.avg_chunk_size)


class LocalBlobService(BlobService, ChunkStore, BulkReads):
    """Blobs as zstd-compressed chunk files plus index files under ``root``."""

    whole_max = WHOLE_MAX

    def __init__(
        self, root: str | os.PathLike[str], *, zstd_level: int = ZSTD_LEVEL, avg_chunk_size: int = AVG_CHUNK_SIZE
    ) -> None:
        self.root = Path(root)
        self.zstd_level = zstd_level
        self.avg_chunk_size = avg_chunk_size
        self._root = str(self.root)
        self._tmp = f"{self._root}/tmp"
        os.makedirs(self._tmp, exist_ok=True)
        self._made_dirs: set[str] = set()
        self._counter = itertools.count()
        self._temp_prefix = f"{os.getpid()}.{secrets.token_hex(6)}"
        self._links_dir = f"{self._root}/.links"
        self._link_path: str | None = None
        self._links_work = True
        self._link_lock = threading.Lock()
        self._local = threading.local()
        self._dirty = False
        self.run_max = avg_chunk_size // 2  # at most the smallest chunk: always a single chunk object

    def __repr__(self) -> str:
        return f"LocalBlobService({str(self.root)!r})"

    # -- paths -----------------------------------------------------------------

    def _index_path(self, digest: B3Digest) -> str:
        return f"{self._root}/{blob_index_key(digest)}"

    def _chunk_path(self, digest: B3Digest) -> str:
        return f"{self._root}/{chunk_key(digest)}"

    # -- synchronous primitives (run in worker threads) --------------------------
    #
    # These are the hot path of an import (tens of thousands of calls), so they
    # use plain os.* calls on str paths: no Path objects, no buffered file
    # objects, no existence check that the next call would repeat.

    def _dir_for(self, path: str) -> None:
        """Create the shard directory of ``path`` once per process (before, not after, a failure)."""
        parent = os.path.dirname(path)
        if parent not in self._made_dirs:
            try:
                os.mkdir(parent)
            except FileExistsError:
                pass
            except FileNotFoundError:
                os.makedirs(parent, exist_ok=True)
            self._made_dirs.add(parent)

    def _new_temp(self) -> tuple[str, int]:
        """A new, exclusively created temp file (path, fd) under ``tmp/``."""
        while True:
            path = f"{self._tmp}/{self._temp_prefix}.{next(self._counter)}"
            try:
                return path, os.open(path, _CREATE_NEW, 0o644)
            except FileExistsError:  # a forked sibling with the same prefix: take the next number
                continue

    def _publish(self, tmp_path: str, final: str) -> None:
        """Move a finished temp file into place; an existing final file has the same content."""
        self._dir_for(final)
        os.rename(tmp_path, final)

    def _write_index(self, path: str) -> None:
        """Publish an empty index at ``path`` (single chunk / empty blob); it is written last.

        All empty indexes are the same bytes, so, like ``nix-store --optimise``,
        they are hard links to one empty file under ``.links/`` (saving an inode
        per blob).  Indexes are never written in place, only created or
        replaced, so sharing is safe.  Past the link-count limit a new shared
        file is started; where hard links are unsupported, plain files are made.
        """
        self._dir_for(path)
        for _ in range(3):
            source = self._link_source()
            if source is None:
                break
            try:
                os.link(source, path)
                return
            except FileExistsError:
                return
            except OSError as e:
                self._link_failed(source, e)
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, _CREATE_NEW, 0o644))

    def _link_source(self) -> str | None:
        """The shared empty file to link indexes to (``None``: hard links do not work here)."""
        with self._link_lock:
            if self._link_path is None and self._links_work:
                os.makedirs(self._links_dir, exist_ok=True)
                path = f"{self._links_dir}/empty-index.{self._temp_prefix}.{next(self._counter)}"
                os.close(os.open(path, _CREATE_NEW, 0o644))
                self._link_path = path
            return self._link_path

    def _link_failed(self, source: str, error: OSError) -> None:
        with self._link_lock:
            if self._link_path != source:
                return  # another thread already moved on
            self._link_path = None  # EMLINK, or the shared file vanished: start a new one
            if error.errno in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES):
                self._links_work = False

    def _compressor(self) -> zstandard.ZstdCompressor:
        cctx: zstandard.ZstdCompressor | None = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = self._local.cctx = zstandard.ZstdCompressor(level=self.zstd_level)
        return cctx

    def _write_chunk_sync(self, digest: B3Digest, data: bytes | memoryview) -> None:
        """Compress ``data`` into chunk object ``digest`` (replacing any leftover: same bytes)."""
        self._put_object_sync(self._chunk_path(digest), self._compressor().compress(data))
        stats.count("nixcas_chunks_written", "local")

    def _put_chunks_sync(self, chunks: Sequence[bytes | memoryview]) -> list[ChunkMeta]:
        """Store each chunk unless present (a chunk of a multi-chunk blob); their metadata."""
        metas = []
        for data in chunks:
            digest = B3Digest(blake3.blake3(data).digest())
            if not self._refresh_chunk_sync(digest):  # present: refreshed, so a running GC keeps it
                self._write_chunk_sync(digest, data)
            metas.append(ChunkMeta(digest, len(data)))
        return metas

    def _put_index_sync(self, digest: B3Digest, chunks: Sequence[ChunkMeta]) -> None:
        """Publish the index of a multi-chunk blob (after its chunks); if present, refresh its age instead."""
        path = self._index_path(digest)
        if not self._refresh_sync(path):
            self._put_object_sync(path, encode_index(list(chunks)))

    def _put_object_sync(self, path: str, data: bytes) -> None:
        """Publish ``data`` at ``path`` (written to a temp file, then renamed into place)."""
        tmp_path, fd = self._new_temp()
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            self._publish(tmp_path, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_path)
            raise
        self._dirty = True

    def _store_sync(self, data: bytes | memoryview) -> B3Digest:
        digest = B3Digest(blake3.blake3(data).digest())
        index_path = self._index_path(digest)
        if os.path.exists(index_path) and self._touch_sync(digest):
            return digest
        pieces = cut(data, self.avg_chunk_size) if len(data) > self.avg_chunk_size // 2 else [data]
        if len(pieces) > 1:
            self._put_index_sync(digest, self._put_chunks_sync(pieces))
            return digest
        # No index: write the chunk even if a crash left one behind (same bytes).
        if len(data):
            self._write_chunk_sync(digest, data)
        self._write_index(index_path)
        self._dirty = True
        return digest

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        dctx: zstandard.ZstdDecompressor | None = getattr(self._local, "dctx", None)
        if dctx is None:
            dctx = self._local.dctx = zstandard.ZstdDecompressor()
        return dctx

    def _read_small_sync(self, dctx: zstandard.ZstdDecompressor, digest: B3Digest, cap: int) -> bytes | _Slow | None:
        """A single-chunk blob's bytes if it has at most ``cap`` of them; ``None`` if missing or larger.

        The fast path of :meth:`read_many`: one ``open``, one ``read``, one
        ``decompress`` (with a reused context) per blob.  The frame header's
        content size is checked against ``cap`` before anything is
        decompressed, and the output is bounded by it (a frame that does not
        record its size is decompressed to at most ``cap + 1`` bytes).
        Anything unusual (a multi-chunk blob, an index without its chunk, a
        header frame followed by more frames, a compressed file too big for
        ``cap``, a decompression error) gives :data:`_SLOW`: the per-blob
        path reads it (bounded) and reports errors exactly as
        :meth:`open_read` does.
        """
        try:
            fd = os.open(self._chunk_path(digest), _READ_ONLY)
        except FileNotFoundError:
            try:
                index_size = os.stat(self._index_path(digest)).st_size
            except FileNotFoundError:
                return None
            if index_size == 0 and digest == EMPTY_DIGEST:
                return b""
            return _SLOW  # chunk list, or an index without its chunk object
        try:
            size = os.fstat(fd).st_size
            if size > compressed_bound(cap):
                return _SLOW
            parts = []
            got = 0
            while got < size:
                part = os.read(fd, size - got)
                if not part:
                    break
                parts.append(part)
                got += len(part)
        finally:
            os.close(fd)
        compressed = parts[0] if len(parts) == 1 else b"".join(parts)
        try:
            return decompress_at_most(dctx, compressed, cap)
        except zstandard.ZstdError:
            return _SLOW

    def _read_many_sync(
        self, max_sizes: Mapping[B3Digest, int], checker: BlobChecker
    ) -> tuple[dict[B3Digest, bytes], list[B3Digest]]:
        """The blobs read (and verified) on the fast path, and those that need the per-blob path."""
        dctx = self._decompressor()
        found: dict[B3Digest, bytes] = {}
        slow: list[B3Digest] = []
        for digest, cap in max_sizes.items():
            data = self._read_small_sync(dctx, digest, cap)
            if isinstance(data, bytes):
                found[digest] = checker.check(digest, data)
            elif data is _SLOW:
                slow.append(digest)
        return found, slow

    # -- BulkReads (``nixcas dump-path``) -----------------------------------------

    def bulk_reads(self) -> BulkReads:
        return self

    def read_run(self, wanted: Sequence[tuple[bytes, int]], buffer: memoryview) -> list[bytes | memoryview] | None:
        dctx = self._decompressor()
        out: list[bytes | memoryview] = []
        try:
            for raw, size in wanted:
                data = self._read_small_sync(dctx, B3Digest(raw), size)
                if not isinstance(data, bytes) or len(data) != size or blake3.blake3(data).digest() != raw:
                    return None
                out.append(data)
        except (OSError, StorageError, zstandard.ZstdError):
            return None
        return out

    def read_whole(self, digest: bytes, size: int, buffer: memoryview) -> bytes | memoryview | None:
        if not 0 < size <= self.whole_max:
            return None
        try:
            chunks = LocalBlobService._chunks_sync(self, B3Digest(digest))
            if chunks is None:
                return None
            return self._read_whole_sync(digest, size, chunks or [ChunkMeta(B3Digest(digest), size)], buffer)
        except (OSError, StorageError, zstandard.ZstdError):
            return None

    def read_chunks(self, digest: bytes, size: int) -> Iterator[bytes] | None:
        try:
            chunks = self._chunks_sync(B3Digest(digest))
        except (OSError, StorageError):
            return None
        if not chunks or sum(c.size for c in chunks) != size:
            return None
        return self._iter_chunks(B3Digest(digest), chunks)

    def _iter_chunks(self, digest: B3Digest, chunks: Sequence[ChunkMeta]) -> Iterator[bytes]:
        """Each chunk read and checked (:meth:`_read_chunk_sync`), the whole blob's BLAKE3 checked at the end."""
        hasher = blake3.blake3()
        for chunk in chunks:
            try:
                data = self._read_chunk_sync(chunk)
            except ChecksumMismatch as e:  # named with its blob: the file it belongs to is found by that
                where = f"{self}: blob {digest.hex()}: chunk {chunk.digest.hex()}"
                raise ChecksumMismatch(where, e.expected, e.got) from None
            if data is None:
                raise StorageError(f"{self}: blob {digest.hex()}: chunk {chunk.digest.hex()} not found")
            hasher.update(data)
            yield data
        got = hasher.digest()
        if got != digest:
            raise ChecksumMismatch(f"{self}: blob {digest.hex()}", digest.hex(), got.hex())

    def _read_whole_sync(
        self, digest: bytes, size: int, chunks: Sequence[ChunkMeta], buffer: memoryview
    ) -> memoryview | None:
        """The chunk objects of a blob read one after another into ``buffer``, then hashed whole.

        Each object is read where its content belongs; a frame of raw blocks (the default store's)
        is turned into its content by moving the payloads down over the block headers, anything
        else is decompressed (bounded) into place; each is hashed right after (while in the CPU's
        cache) into one BLAKE3 of the whole blob, which checks every chunk and the chunk list at
        once, before a byte is returned.
        """
        if sum(c.size for c in chunks) != size:
            return None
        need = size + max(compressed_bound(c.size) - c.size for c in chunks)
        view = buffer if len(buffer) >= need else memoryview(bytearray(need))
        hasher = blake3.blake3()
        pos = 0
        for chunk in chunks:
            fd = os.open(self._chunk_path(chunk.digest), _READ_ONLY)
            try:
                stored = os.fstat(fd).st_size
                if stored > compressed_bound(chunk.size):
                    return None
                got = 0
                while got < stored:
                    n = os.preadv(fd, [view[pos + got : pos + stored]], got)
                    if not n:
                        return None
                    got += n
            finally:
                os.close(fd)
            blocks = raw_blocks(view, pos, pos + stored)
            if blocks is None:
                where = f"{self}: chunk {chunk.digest.hex()}"
                data = decompress_chunk(self._decompressor(), bytes(view[pos : pos + stored]), chunk.size, where)
                view[pos : pos + chunk.size] = data
            else:
                if sum(length for _, length in blocks) != chunk.size:
                    return None
                at = pos
                for offset, length in blocks:
                    view[at : at + length] = view[offset : offset + length]  # overlapping: memmove
                    at += length
            hasher.update(view[pos : pos + chunk.size])  # while it is in the cache
            pos += chunk.size
        if hasher.digest() != digest:
            return None
        return view[:size]

    def _chunks_sync(self, digest: B3Digest) -> list[ChunkMeta] | None:
        try:
            with open(self._index_path(digest), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return [] if os.path.exists(self._chunk_path(digest)) else None
        chunks = decode_index(digest, data)
        check_chunk_list(digest, chunks, str(self))
        return chunks

    def _read_chunk_sync(self, chunk: ChunkMeta) -> bytes | None:
        try:
            with open(self._chunk_path(chunk.digest), "rb") as f:
                compressed = f.read(compressed_bound(chunk.size) + 1)
        except FileNotFoundError:
            return None
        where = f"{self}: chunk {chunk.digest.hex()}"
        if len(compressed) > compressed_bound(chunk.size):
            raise StorageError(f"{where}: compressed object is larger than {chunk.size} bytes can compress to")
        data = decompress_chunk(self._decompressor(), compressed, chunk.size, where)
        return check_chunk(chunk, data, str(self))

    # -- BlobService -------------------------------------------------------------

    async def has(self, digest: B3Digest) -> bool:
        return await asyncio.to_thread(
            lambda: os.path.exists(self._index_path(digest)) or os.path.exists(self._chunk_path(digest))
        )

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        return await asyncio.to_thread(self._chunks_sync, digest)

    async def missing(self, digests: Sequence[B3Digest]) -> list[B3Digest]:
        def absent() -> list[B3Digest]:
            exists = os.path.exists
            return [d for d in digests if not exists(self._index_path(d)) and not exists(self._chunk_path(d))]

        return await asyncio.to_thread(absent)

    def _read_object_sync(self, digest: B3Digest) -> bytes | StorageError | _Slow | None:
        """A single-chunk blob's bytes, verified; ``None`` if absent; :data:`_SLOW`: a big legacy object.

        An object whose compressed size fits :data:`SINGLE_CHUNK_CAP` is
        decompressed bounded (to at most that many bytes) and hashed against
        ``digest`` before anything is returned: a tampered or swapped object
        gives the error every read then raises.  Larger objects (written
        before blobs were chunked), and objects that expand past the cap, go
        to :class:`_ZstdFileReader`, which verifies them in a first pass
        (as it does objects of several zstd frames).
        """
        try:
            fd = os.open(self._chunk_path(digest), _READ_ONLY)
        except FileNotFoundError:
            return None
        try:
            limit = compressed_bound(SINGLE_CHUNK_CAP)
            if os.fstat(fd).st_size > limit:
                return _SLOW
            parts = []
            while part := os.read(fd, limit + 1):
                parts.append(part)
        finally:
            os.close(fd)
        try:
            data = decompress_at_most(self._decompressor(), b"".join(parts), SINGLE_CHUNK_CAP)
        except zstandard.ZstdError:
            return _SLOW  # several frames, say: the verifying streaming reader takes it (or reports the error)
        if data is None:
            return _SLOW
        got = blake3.blake3(data).digest()
        if got != digest:
            return ChecksumMismatch(f"blob {digest.hex()}", digest.hex(), got.hex())
        return data

    async def _open_read(self, digest: B3Digest) -> BlobReader | None:
        found = await asyncio.to_thread(self._read_object_sync, digest)
        if isinstance(found, bytes):
            return VerifiedBytesReader(found)
        if isinstance(found, StorageError):
            return FailedReader(found)
        if found is _SLOW:
            return _ZstdFileReader(self._chunk_path(digest), digest)
        chunks = await self.chunks(digest)
        if chunks is None:
            return None
        if not chunks:
            if digest == EMPTY_DIGEST:
                return BytesReader(b"")
            raise StorageError(f"blob {digest.hex()}: index present but chunk object missing")
        return ChunkedReader(self._fetch_chunk, chunks, window_bytes=READ_WINDOW)

    async def size(self, digest: B3Digest) -> int | None:
        """From the index or the object's zstd frame header, without reading the blob."""
        size = await asyncio.to_thread(self._blob_size_sync, digest)
        return size if size is not None else await super().size(digest)

    async def sizes(self, digests: Sequence[B3Digest]) -> list[int | None]:
        """All in one worker-thread round trip; only blobs whose size is recorded nowhere are read."""
        found = await asyncio.to_thread(self._sizes_sync, digests)
        for i, size in enumerate(found):
            if size is None:
                found[i] = await super().size(digests[i])
        return found

    def _sizes_sync(self, digests: Sequence[B3Digest]) -> list[int | None]:
        return [self._blob_size_sync(d) for d in digests]

    def _blob_size_sync(self, digest: B3Digest) -> int | None:
        """The blob's size from its chunk list or its object's zstd frame header; ``None``: not recorded there."""
        try:
            with open(self._index_path(digest), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raw = b""
        if raw:
            return sum(c.size for c in decode_index(digest, raw))
        try:
            with open(self._chunk_path(digest), "rb") as f:
                size = zstandard.frame_content_size(f.read(18))
        except (FileNotFoundError, zstandard.ZstdError):
            return None
        return size if size >= 0 else None

    def _cached_outboard_sync(self, digest: B3Digest) -> tuple[bytes | None, str | None, int | None]:
        """The cached outboard (``None``: absent), what is wrong with it (``None``: nothing), the blob's size if known.

        The tree is checked to the root against ``digest`` (:func:`~nixcas.castore.bao.check_outboard`),
        the length header against the size the blob's index or frame header records.
        """
        from nixcas.castore.bao import check_outboard  # NumPy: loaded only when outboards are asked for

        try:
            with open(f"{self._root}/{bao_key(digest)}", "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, None, None
        size = self._blob_size_sync(digest)
        try:
            check_outboard(digest, data, size)
        except StorageError as e:
            return data, str(e), size
        return data, None, size

    async def outboard_problem(self, digest: B3Digest) -> str | None:
        """What is wrong with the cached outboard of ``digest`` (``None``: nothing found, or none cached)."""
        return (await asyncio.to_thread(self._cached_outboard_sync, digest))[1]

    async def outboard(self, digest: B3Digest) -> bytes | None:
        """Computed on first use from a verified read, then kept as ``bao/b3/<4 hex>/<hex>``.

        A cached outboard is checked whole against the digest each time it is
        loaded; a damaged one is computed anew and replaced (atomically).
        Where the blob's size is recorded nowhere but in its data (objects
        without a size in their zstd header), the outboard is computed and
        compared, and the cached file replaced only if it differs.
        """
        path = f"{self._root}/{bao_key(digest)}"
        cached, problem, size = await asyncio.to_thread(self._cached_outboard_sync, digest)
        if cached is not None and problem is None and size is not None:
            return cached
        computed = await super().outboard(digest)
        if computed is not None and computed != cached:
            await to_thread_uninterrupted(lambda: self._put_object_sync(path, computed))
        return computed

    async def _fetch_chunk(self, chunk: ChunkMeta, offset: int = 0) -> bytes:
        data = await self.read_chunk(chunk)
        if data is None:
            raise StorageError(f"{self}: chunk {chunk.digest.hex()} not found")
        return data

    # -- ChunkStore ----------------------------------------------------------------

    async def missing_chunks(self, chunks: Sequence[ChunkMeta]) -> list[ChunkMeta]:
        # The caller is about to reference the present ones: refresh them, so a running GC keeps them.
        return await asyncio.to_thread(lambda: [c for c in chunks if not self._refresh_chunk_sync(c.digest)])

    async def read_chunk(self, chunk: ChunkMeta) -> bytes | None:
        return await asyncio.to_thread(self._read_chunk_sync, chunk)

    async def put_chunk(self, chunk: ChunkMeta, data: bytes) -> None:
        check_chunk(chunk, data, "put_chunk")
        await to_thread_uninterrupted(lambda: self._put_chunks_sync([data]))

    async def put_index(self, digest: B3Digest, chunks: Sequence[ChunkMeta]) -> None:
        check_chunk_list(digest, chunks, "put_index")
        missing = await self.missing_chunks(chunks)
        if missing:
            raise StorageError(f"{self}: index of {digest.hex()} refers to missing chunk {missing[0].digest.hex()}")
        if len(chunks) < 2:
            raise ValidationError(f"put_index: blob {digest.hex()}: a chunk list needs at least two chunks")
        await to_thread_uninterrupted(lambda: self._put_index_sync(digest, chunks))

    async def _read_many(
        self, max_sizes: Mapping[B3Digest, int], checker: BlobChecker, parallel: int
    ) -> dict[B3Digest, bytes]:
        # One worker-thread round trip for the whole batch (reading, decompressing
        # and hashing); the rare blobs it cannot take go through the per-blob path.
        found, slow = await asyncio.to_thread(self._read_many_sync, max_sizes, checker)
        if slow:
            found.update(await self._read_each({d: max_sizes[d] for d in slow}, parallel))
        return found

    async def open_write(self, expected_size: int | None = None) -> BlobWriter:
        return _LocalBlobWriter(self, expected_size)

    async def put(self, data: bytes) -> B3Digest:
        digest = await asyncio.to_thread(self._store_sync, data)
        stats.written("local", [len(data)])
        return digest

    async def put_many(self, blobs: Sequence[bytes]) -> list[B3Digest]:
        digests = await asyncio.to_thread(lambda: [self._store_sync(b) for b in blobs])
        stats.written("local", map(len, blobs))
        return digests

    async def sync(self) -> None:
        if self._dirty:
            self._dirty = False
            await asyncio.to_thread(_syncfs, self.root)

    # -- garbage collection (nixcas.castore.sweep) ----------------------------------
    #
    # A blob's age is the mtime of its chunk object (single-chunk blobs; the
    # empty index is a hard link shared by many blobs, so its own mtime means
    # nothing) or of its index when the index lists chunks.  A put that finds
    # the blob present refreshes that age (_touch_sync); deletions move the
    # object aside first and look at the age again, so a refresh racing the
    # sweep either lands before (the object is put back) or fails (the put
    # writes the object anew).

    def _touch_sync(self, digest: B3Digest) -> bool:
        """A put found ``digest``'s index: refresh the blob's age; ``False`` if it must be written anew."""
        if digest == EMPTY_DIGEST:
            return True
        try:
            index_size = os.stat(self._index_path(digest)).st_size
        except FileNotFoundError:
            return False
        if index_size:
            if not self._refresh_sync(self._index_path(digest)):
                return False
        elif not self._refresh_chunk_sync(digest):
            return False  # the chunk is missing: the blob is damaged, the put repairs it
        return os.path.exists(self._index_path(digest))

    def _refresh_chunk_sync(self, digest: B3Digest) -> bool:
        """A writer found chunk ``digest`` stored: refresh its age so GC keeps it; ``False``: gone, write it.

        Every writer that skips writing a chunk because it exists must call this
        (a content-defined chunker deduplicating chunks included).
        """
        return self._refresh_sync(self._chunk_path(digest))

    @staticmethod
    def _refresh_sync(path: str) -> bool:
        """Set ``path``'s mtime to now (a writer found it stored); ``False`` if it is gone."""
        try:
            os.utime(path)
        except FileNotFoundError:
            return False
        return True

    def _mtime_sync(self, path: str) -> int:
        try:
            return os.stat(path).st_mtime_ns
        except FileNotFoundError:
            return -1

    def _shards(self, kind: str) -> list[str]:
        try:
            return sorted(e.path for e in os.scandir(f"{self._root}/{kind}/b3") if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []

    def _scan_sync(self, shards: Sequence[str], blobs: bool) -> list[StoredObject]:
        found: list[StoredObject] = []
        for shard in shards:
            try:
                entries = list(os.scandir(shard))
            except FileNotFoundError:
                continue
            for entry in entries:
                try:
                    raw = bytes.fromhex(entry.name)
                except ValueError:
                    continue
                if len(raw) != DIGEST_LEN:
                    continue
                digest = B3Digest(raw)
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not blobs:
                    found.append(StoredObject(digest, st.st_size, st.st_mtime_ns))
                    continue
                chunks: tuple[B3Digest, ...] = ()
                mtime = self._mtime_sync(self._chunk_path(digest))
                if st.st_size:
                    try:
                        with open(entry.path, "rb") as f:
                            chunks = tuple(c.digest for c in decode_index(digest, f.read()))
                    except FileNotFoundError:
                        continue
                    mtime = max(mtime, st.st_mtime_ns)
                found.append(StoredObject(digest, st.st_size, mtime, chunks))
        return found

    async def _scan(self, kind: str) -> AsyncIterator[list[StoredObject]]:
        shards = await asyncio.to_thread(self._shards, kind)
        for i in range(0, len(shards), 256):
            batch = await asyncio.to_thread(self._scan_sync, shards[i : i + 256], kind == "blobs")
            if batch:
                yield batch

    def scan_blobs(self) -> AsyncIterator[list[StoredObject]]:
        return self._scan("blobs")

    def scan_chunks(self) -> AsyncIterator[list[StoredObject]]:
        return self._scan("chunks")

    def scan_outboards(self) -> AsyncIterator[list[StoredObject]]:
        return self._scan("bao")

    def _trash_path(self, path: str) -> str:
        """Where a deletion moves ``path`` first; the name keeps its key, so an interrupted one can be undone."""
        kind, name = path[len(self._root) + 1 :].split("/", 1)[0], os.path.basename(path)
        return f"{self._tmp}/gc.{self._temp_prefix}.{next(self._counter)}.{kind}.{name}"

    def _delete_sync(self, path: str, age: Callable[[str], int], cutoff_ns: int) -> bool | None:
        """Move ``path`` aside, look at its age again, then drop it (``True``) or put it back (``False``).

        ``None``: it was already gone.  Putting back never replaces a file written meanwhile.
        """
        trash = self._trash_path(path)
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return None
        try:
            if age(trash) >= cutoff_ns:
                with contextlib.suppress(FileExistsError):
                    os.link(trash, path)
                return False
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(trash)

    def _delete_objects_sync(self, objects: Sequence[StoredObject], cutoff_ns: int, kind: str) -> Deletion:
        done = Deletion()
        for obj in objects:
            if kind == "blobs":
                if obj.digest == EMPTY_DIGEST:
                    done.kept.append(obj)
                    continue
                chunk = self._chunk_path(obj.digest)

                def age(moved: str, chunk: str = chunk) -> int:
                    own = os.stat(moved)
                    return max(self._mtime_sync(chunk), own.st_mtime_ns if own.st_size else -1)

                result = self._delete_sync(self._index_path(obj.digest), age, cutoff_ns)
            else:
                path = self._chunk_path(obj.digest) if kind == "chunks" else f"{self._root}/{bao_key(obj.digest)}"
                result = self._delete_sync(path, self._mtime_sync, cutoff_ns)
            if result is True:
                done.deleted.append(obj)
            elif result is False:
                done.kept.append(obj)
        return done

    async def delete_blobs(self, objects: Sequence[StoredObject], cutoff_ns: int) -> Deletion:
        return await asyncio.to_thread(self._delete_objects_sync, objects, cutoff_ns, "blobs")

    def _sweep_temporary_sync(self, cutoff_ns: int, dry_run: bool) -> list[StoredObject]:
        """Undo interrupted deletions (``gc.…`` names: moved back); remove other temp files older than the cutoff."""
        swept: list[StoredObject] = []
        for entry in list(os.scandir(self._tmp)):
            parts = entry.name.split(".")
            if entry.name.startswith("gc.") and len(parts) == 6 and parts[4] in ("blobs", "chunks"):
                try:
                    digest = B3Digest(bytes.fromhex(parts[5]))
                except ValueError:
                    digest = None
                if digest is not None and len(digest) == DIGEST_LEN:
                    if not dry_run:  # put it back: the next collection decides again
                        final = f"{self._root}/{blob_index_key(digest) if parts[4] == 'blobs' else chunk_key(digest)}"
                        self._dir_for(final)
                        with contextlib.suppress(FileExistsError, FileNotFoundError):
                            os.link(entry.path, final)
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.path)
                    continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if st.st_mtime_ns < cutoff_ns:  # left by a writer that died (live writers keep it fresh)
                if not dry_run:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                swept.append(StoredObject(EMPTY_DIGEST, st.st_size, st.st_mtime_ns))
        return swept

    async def sweep_temporary(self, cutoff_ns: int, dry_run: bool) -> list[StoredObject]:
        return await asyncio.to_thread(self._sweep_temporary_sync, cutoff_ns, dry_run)

    async def delete_chunks(self, objects: Sequence[StoredObject], cutoff_ns: int) -> Deletion:
        return await asyncio.to_thread(self._delete_objects_sync, objects, cutoff_ns, "chunks")

    async def delete_outboards(self, objects: Sequence[StoredObject], cutoff_ns: int) -> Deletion:
        return await asyncio.to_thread(self._delete_objects_sync, objects, cutoff_ns, "bao")


class _ZstdFileReader(BlobReader):
    """Streams a big single-object blob (written before chunking), verified in full before its first byte.

    Such an object has no index, so nothing declares its size.  The first
    read (or ``SEEK_END``) therefore decompresses the whole object once,
    discarding the output while hashing and counting it (at most
    :data:`LEGACY_MAX_SIZE` bytes: a zstd bomb stops there), and compares
    the hash with the blob's digest; only then is the same open file
    decompressed again and served, never past the size the first pass
    counted.  Two passes, for rare old objects; backward seeks restart the
    second stream.
    """

    def __init__(self, path: str, digest: B3Digest) -> None:
        self._path = path
        self._digest = digest
        self._file: BinaryIO | None = None
        self._stream: zstandard.ZstdDecompressionReader | None = None
        self._pos = 0  # position of the decompressed stream
        self._want = 0  # position the caller asked for
        self._size: int | None = None  # known once verified

    def _verify_sync(self) -> int:
        if self._size is None:
            self._close_sync()
            self._file = open(self._path, "rb")  # noqa: SIM115 - closed in _close_sync
            hasher = blake3.blake3()
            size = 0
            with zstandard.ZstdDecompressor().stream_reader(self._file, read_across_frames=True, closefd=False) as s:
                while block := s.read(1 << 20):
                    size += len(block)
                    if size > LEGACY_MAX_SIZE:
                        raise StorageError(
                            f"blob {self._digest.hex()}: object {self._path} expands past {LEGACY_MAX_SIZE} bytes"
                        )
                    hasher.update(block)
            got = hasher.digest()
            if got != self._digest:
                raise ChecksumMismatch(f"blob {self._digest.hex()}", self._digest.hex(), got.hex())
            self._size = size
        return self._size

    def _open_sync(self) -> None:
        assert self._file is not None
        if self._stream is not None:
            self._stream.close()  # type: ignore[no-untyped-call]
        self._file.seek(0)
        self._stream = zstandard.ZstdDecompressor().stream_reader(self._file, read_across_frames=True, closefd=False)
        self._pos = 0

    def _close_sync(self) -> None:
        if self._stream is not None:
            self._stream.close()  # type: ignore[no-untyped-call]
            self._stream = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def _read_sync(self, n: int) -> bytes:
        size = self._verify_sync()
        if self._stream is None or self._want < self._pos:
            self._open_sync()
        assert self._stream is not None
        while self._pos < min(self._want, size):  # forward seek: decompress and drop
            skipped = self._stream.read(min(self._want - self._pos, 1 << 20))
            if not skipped:
                break
            self._pos += len(skipped)
        left = size - self._pos
        if self._pos < self._want or left <= 0:
            return b""
        data = self._stream.read(left if n < 0 else min(n, left))
        if not data:
            raise StorageError(f"blob {self._digest.hex()}: object {self._path} changed while being read")
        self._pos += len(data)
        self._want = self._pos
        return data

    async def _run(self, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(fn)
        except zstandard.ZstdError as e:
            raise StorageError(f"blob {self._digest.hex()}: object {self._path}: cannot decompress: {e}") from None
        except FileNotFoundError:
            raise StorageError(f"blob {self._digest.hex()}: object {self._path} vanished") from None

    async def read(self, n: int = -1) -> bytes:
        if n == 0:
            return b""
        return await self._run(lambda: self._read_sync(n))

    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        size = await self._run(self._verify_sync) if whence == io.SEEK_END else 0
        self._want = resolve_seek(self._want, size, offset, whence)
        return self._want

    def tell(self) -> int:
        return self._want

    async def close(self) -> None:
        await asyncio.to_thread(self._close_sync)


KEEP_ALIVE_SECONDS = 10.0
"""How often a long upload refreshes the ages of the chunks it staged or reuses (see GC in README)."""


class _LocalBlobWriter(BlobWriter):
    """Buffers small blobs in memory; cuts larger ones into chunks staged as temp files.

    Up to :data:`SPILL_THRESHOLD` bytes stay in memory (a small blob is then
    stored in one step at close).  Past that, bytes go through a
    :class:`~nixcas.castore.blob.chunking.Chunker`; each final chunk that is
    not stored yet is compressed into a temp file under ``tmp/`` in a worker
    thread, so memory stays bounded by the chunker's buffer.  :meth:`close`
    renames the staged chunks into place and writes the index last;
    :meth:`abort` deletes them, so an abandoned upload leaves nothing.
    """

    def __init__(self, service: LocalBlobService, expected_size: int | None) -> None:
        self._service = service
        self._state = WriterState(expected_size)
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._hasher = blake3.blake3()
        self._chunker: Chunker | None = None
        self._chunks: list[ChunkMeta] = []
        self._staged: dict[B3Digest, str] = {}  # chunk digest -> its temp file
        self._reused: set[B3Digest] = set()  # chunks found stored: the index will refer to them
        self._kept_alive = time.monotonic()

    def _stage_sync(self, chunks: Sequence[bytes | memoryview]) -> None:
        service = self._service
        for data in chunks:
            digest = B3Digest(blake3.blake3(data).digest())
            self._chunks.append(ChunkMeta(digest, len(data)))
            if digest in self._staged or digest in self._reused:
                continue
            if service._refresh_chunk_sync(digest):  # stored already: refreshed so a running GC keeps it
                self._reused.add(digest)
                continue
            tmp_path, fd = service._new_temp()
            self._staged[digest] = tmp_path
            with contextlib.closing(os.fdopen(fd, "wb")) as f:
                f.write(service._compressor().compress(data))

    def _feed_sync(self, data: list[bytes]) -> None:
        if self._chunker is None:
            self._chunker = Chunker(self._service.avg_chunk_size)
        for block in data:
            self._hasher.update(block)
            self._stage_sync(self._chunker.feed(block))
        if time.monotonic() - self._kept_alive > KEEP_ALIVE_SECONDS:
            self._keep_alive_sync()

    def _keep_alive_sync(self) -> None:
        """Refresh what this upload has staged or reused, so GC finds it young however long the upload runs.

        GC deletes unreferenced objects (and stray temp files) older than its
        cutoff; until the index is written nothing refers to these chunks.
        """
        service = self._service
        for tmp_path in self._staged.values():
            if not service._refresh_sync(tmp_path):
                raise StorageError(f"{service}: a staged chunk of this upload was removed ({tmp_path}); retry")
        for digest in self._reused:
            if not service._refresh_chunk_sync(digest):
                raise StorageError(
                    f"{service}: chunk {digest.hex()} of this upload was deleted while it ran "
                    "(a gc with a grace period shorter than the upload?); nothing was written, retry"
                )
        self._kept_alive = time.monotonic()

    async def write(self, data: bytes) -> None:
        await self._admit(self._state, len(data))
        if not data:
            return
        if self._chunker is None and self._buffered + len(data) <= SPILL_THRESHOLD:
            self._buffer.append(bytes(data))
            self._buffered += len(data)
            return
        pending, self._buffer, self._buffered = [*self._buffer, bytes(data)], [], 0
        try:
            await to_thread_uninterrupted(lambda: self._feed_sync(pending))
        except BaseException:
            await self.abort()
            raise

    def _finish_sync(self) -> B3Digest:
        assert self._chunker is not None
        chunker, self._chunker = self._chunker, None
        self._stage_sync(chunker.finish())
        digest = B3Digest(self._hasher.digest())
        service = self._service
        self._keep_alive_sync()  # every chunk the index will list is present and young ...
        while self._staged:  # ... the new ones are published first ...
            chunk, tmp_path = self._staged.popitem()
            service._publish(tmp_path, service._chunk_path(chunk))
        service._dirty = True
        if len(self._chunks) == 1:  # ... then the index (one chunk: it is the blob; empty index)
            service._write_index(service._index_path(digest))
        else:
            service._put_index_sync(digest, self._chunks)
        return digest

    async def close(self) -> B3Digest:
        if self._state.digest is not None:
            return self._state.digest
        try:
            self._state.check_complete()
            if self._chunker is None:
                data, self._buffer = b"".join(self._buffer), []
                digest = await to_thread_uninterrupted(lambda: self._service._store_sync(data))
            else:
                digest = await to_thread_uninterrupted(self._finish_sync)
        except BaseException:
            await self.abort()
            raise
        self._state.digest = digest
        stats.written("local", [self._state.written])
        return digest

    def _discard_sync(self) -> None:
        while self._staged:
            _, tmp_path = self._staged.popitem()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_path)

    async def abort(self) -> None:
        if self._state.digest is None and not self._state.aborted:
            self._state.aborted = True
            self._buffer = []
            self._chunker = None
            await asyncio.to_thread(self._discard_sync)

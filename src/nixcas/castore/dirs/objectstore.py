"""``objectstore+<s3|gs|az|memory|file|http(s)>://…`` — directory closures in object storage, in the snix layout.

One object per uploaded closure, keyed by its root::

    dirs/b3/<hex of the root digest's first 2 bytes>/<hex of the root digest>

holding a zstd-compressed stream of frames, each a 4-byte big-endian length
followed by the canonical bytes of one Directory: the root first, then its
descendants breadth-first, each once.  A frame is at most
:data:`MAX_FRAME_LEN` bytes (snix's constant).  So a bucket written by snix
reads here and the other way round.

Consequences of the layout (snix semantics):

* only closure **roots** are retrievable: :meth:`get` of a directory that is
  only ever stored inside another closure answers ``None``, and
  :meth:`get_recursive` of it yields nothing;
* ``put`` of a single directory with sub-directories is refused
  (:class:`~nixcas.errors.ValidationError`, gRPC ``INVALID_ARGUMENT``):
  closures are uploaded with ``put_multiple_start``; a leaf is a closure of one;
* closures uploaded separately may overlap: each root object holds its whole
  closure.

Reading streams the object (one ``GET``), decompresses it with a bound (the
``max_closure_bytes`` option caps the decompressed size, default
:data:`MAX_CLOSURE_BYTES`; a frame longer than the limit is refused before it
is buffered) and checks the frames root-to-leaves as they arrive: the first
must hash to the root asked for, every later one to a directory an earlier
one refers to (with the size that one records: under the store's size rule,
or consistently under the other, so garbage left by ``rewrite-directories``
or an object written by a peer of the other rule reads as the closure it is;
the users of a tree check its rule), none twice, and at the end
every referenced directory must have come.  Anything else is a
:class:`~nixcas.errors.StorageError` (:class:`~nixcas.errors.ChecksumMismatch`
for a first frame that is not the root).

Writing: one ``PUT`` per closure, skipped when the root object exists and was
written within ``refresh_after`` seconds (an older one is written again, so
garbage collection, which ages objects by their modification time, sees it
young; see :mod:`nixcas.castore.blob.objectstore`).

The store's directory size rule is recorded in the object ``dirs/size-rule``
(``snix`` or ``tvix`` and a newline), written when the store is first opened
by this code; a bucket without it that holds closures follows the tvix rule.
Object stores offer no create-if-absent here, so two writers creating a
bucket at the same moment with different rules could race (the later one
wins the record); create a shared bucket once, then share it.

Garbage collection sweeps closure objects: one is live iff its root is
reachable from a GC root (:func:`nixcas.castore.gc.mark` reads closures
whole through :meth:`get_recursive_raw`, see :attr:`closures_only`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, ClassVar, Self, cast
from urllib.parse import SplitResult

import blake3
import zstandard
from google.protobuf.message import DecodeError

from nixcas._proto.tvix.castore.protos import castore_pb2 as pb
from nixcas.castore.blob.chunking import compressed_bound
from nixcas.castore.digest import B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.base import DirectoryService, settle_size_rule
from nixcas.castore.objectstore import (
    REFRESH_AFTER,
    ObjectStore,
    ObjectStoreBacked,
    check_client_options,
    open_object_store,
    parse_objectstore_url,
    refresh_after_option,
    zstd_level_option,
)
from nixcas.castore.objectstore.layout import ZSTD_LEVEL, object_key
from nixcas.castore.objectstore.scan import scan_listing
from nixcas.castore.sizerule import SizeRule
from nixcas.castore.sweep import Deletion, StoredObject
from nixcas.config import Resolver, ServiceConfig
from nixcas.errors import ChecksumMismatch, ClosureError, ConfigurationError, StorageError, ValidationError
from nixcas.urls import is_decimal, shown

__all__ = [
    "MAX_CLOSURE_BYTES",
    "MAX_DIRECTORY_BYTES",
    "MAX_FRAME_LEN",
    "ObjectStoreDirectoryService",
    "ObjectStoreDirectoryServiceConfig",
    "decode_closure",
    "directory_key",
    "encode_closure",
]

MAX_FRAME_LEN = 1 * 1024 * 1024 * 1000
"""The longest frame (one Directory's canonical bytes) of a closure object: snix's limit."""

MAX_DIRECTORY_BYTES = 16 << 20
"""The longest frame read or written here (about 200,000 entries; no real directory comes close).

A frame is buffered whole before it is hashed, so snix's limit would let a
small, hostile object make every reader allocate a gibibyte."""

MAX_CLOSURE_BYTES = 1 << 30
"""Default ``max_closure_bytes``: the most decompressed bytes one closure object may hold."""

_WRITE_SIZE = 64 << 10
"""Decompressed bytes handed to the frame parser at a time."""

_THREAD_MIN = 64 << 10
"""Compressed blocks at least this long are decompressed and checked in a worker thread."""

_CLOSURES_AT_ONCE = 16
"""Closure objects :meth:`ObjectStoreDirectoryService._get_many_raw` reads at once."""

_DIR_OPTIONS = {"zstd_level", "refresh_after", "max_closure_bytes"}


SIZE_RULE_KEY = "dirs/size-rule"
"""Where the store's directory size rule is recorded (outside ``dirs/b3/``, so GC never sees it)."""


def directory_key(digest: B3Digest) -> str:
    """The object key of the closure whose root is ``digest``."""
    return object_key("dirs", digest)


def _max_closure_bytes(options: Mapping[str, str], where: str) -> int:
    raw = options.get("max_closure_bytes", str(MAX_CLOSURE_BYTES))
    if not is_decimal(raw) or not 1024 <= int(raw) <= 1 << 40:
        raise ConfigurationError(f"{where}: max_closure_bytes must be an integer from 1024 to 2^40, not {raw!r}")
    return int(raw)


@dataclass(frozen=True)
class ObjectStoreDirectoryServiceConfig(ServiceConfig[DirectoryService]):
    """``objectstore+<url>``: any obstore URL, ``file:///abs/path`` included.

    Composition: ``type = "objectstore"``, ``object_store_url = "s3://bucket/prefix"``,
    ``object_store_options = { endpoint = "…", region = "…", … }`` (the tvix/snix field
    names).  Options of our own: ``zstd_level``, ``refresh_after``, ``max_closure_bytes``
    and :data:`~nixcas.castore.objectstore.CLIENT_OPTIONS`; all others are obstore's.
    """

    type_tag: ClassVar[str] = "objectstore"
    object_store_url: str
    object_store_options: dict[str, str] = field(default_factory=dict, repr=False)  # may hold credentials

    @classmethod
    def from_url(cls, url: SplitResult) -> Self:
        bare, options = parse_objectstore_url(url, allow_file=True)
        config = cls(bare, options)
        config.validate(repr(shown(url)))
        return config

    def _client_options(self) -> dict[str, str]:
        return {k: v for k, v in self.object_store_options.items() if k not in _DIR_OPTIONS}

    def validate(self, where: str) -> None:
        zstd_level_option(self.object_store_options, where)
        refresh_after_option(self.object_store_options, where)
        _max_closure_bytes(self.object_store_options, where)
        check_client_options(self.object_store_url, self._client_options(), where)

    async def build(self, resolver: Resolver) -> DirectoryService:
        where = repr(shown(self.object_store_url))
        options = self.object_store_options
        store = await open_object_store(self.object_store_url, self._client_options())
        service = ObjectStoreDirectoryService(
            store,
            zstd_level=zstd_level_option(options, where),
            refresh_after=refresh_after_option(options, where),
            max_closure_bytes=_max_closure_bytes(options, where),
        )
        try:
            await service.open_size_rule(resolver.size_rule)
        except BaseException:
            await service.close()
            raise
        return service


# -- the closure object format ----------------------------------------------------


def _children(digest: B3Digest, raw: bytes) -> list[B3Digest]:
    try:
        return [B3Digest(entry.digest) for entry in pb.Directory.FromString(raw).directories]
    except (DecodeError, ValueError) as e:
        raise ValidationError(f"directory {digest.hex()} is not a Directory message: {e}") from None


def _root_to_leaves(items: Sequence[tuple[B3Digest, bytes]]) -> list[bytes]:
    """The canonical bytes of a closure (given in any order) root first, then breadth-first, each once.

    The closure must have exactly one root and hold every directory it refers to.
    """
    raws = dict(items)
    if not raws:
        raise ClosureError("got no directories (empty closure)")
    children = {digest: _children(digest, raw) for digest, raw in raws.items()}
    referenced = {child for kids in children.values() for child in kids}
    roots = [d for d in raws if d not in referenced]
    if len(roots) != 1:
        raise ClosureError(f"a closure needs exactly one root, this one has {len(roots)}")
    missing = referenced - raws.keys()
    if missing:
        raise ValidationError(
            f"directory closure of {roots[0].hex()} lacks {len(missing)} of the sub-directories it refers to "
            f"(e.g. {min(missing).hex()}); this store keeps whole closures: upload them with put_multiple"
        )
    order: list[bytes] = []
    seen = {roots[0]}
    level = [roots[0]]
    while level:
        next_level: list[B3Digest] = []
        for digest in level:
            raw = raws[digest]
            if len(raw) > MAX_DIRECTORY_BYTES:
                raise ValidationError(
                    f"directory {digest.hex()} is {len(raw)} bytes, more than the {MAX_DIRECTORY_BYTES} a closure "
                    "object takes here"
                )
            order.append(raw)
            for child in children[digest]:
                if child not in seen:
                    seen.add(child)
                    next_level.append(child)
        level = next_level
    return order


def encode_closure(frames: Sequence[bytes], level: int = ZSTD_LEVEL) -> bytes:
    """The object holding ``frames`` (canonical Directory bytes, root first): zstd of length-prefixed frames."""
    compressor = zstandard.ZstdCompressor(level=level).compressobj()
    out: list[bytes] = []
    for raw in frames:
        out.append(compressor.compress(len(raw).to_bytes(4, "big")))
        out.append(compressor.compress(raw))
    out.append(compressor.flush())
    return b"".join(out)


class _Enough(Exception):
    """The reader has what it came for (the first frame); stop decompressing."""


class _ClosureReader:
    """Takes a closure object's decompressed bytes as they come; parses and checks its frames.

    The sink of a zstd stream writer: :meth:`write` is called with blocks of
    decompressed bytes, parses complete frames and checks each as it is
    complete (see the module docstring); :attr:`ready` collects
    ``(digest, canonical bytes, Directory)`` for the caller to take.  With
    ``first_only`` it takes the first frame unchecked (as a backend's raw
    value) and stops.
    """

    def __init__(self, root: B3Digest, where: str, max_bytes: int, rule: SizeRule, *, first_only: bool = False) -> None:
        self._root = root
        self._rules = [rule, rule.other]
        """The rules every size checked so far follows (the store's first)."""
        self._where = where
        self._max_bytes = max_bytes
        self._first_only = first_only
        self._buffer = bytearray()
        self._total = 0
        self._frames = 0
        self._expected: dict[B3Digest, int | None] = {root: None}
        """Directories referenced so far, with the size their parent records (the root: unknown)."""
        self._received: set[B3Digest] = set()
        self.ready: list[tuple[B3Digest, bytes, Directory | None]] = []

    def write(self, data: bytes) -> int:
        self._total += len(data)
        if self._total > self._max_bytes:
            raise StorageError(f"{self._where}: decompresses to more than {self._max_bytes} bytes (max_closure_bytes)")
        self._buffer += data
        buf = self._buffer
        pos = 0
        while len(buf) - pos >= 4:
            length = int.from_bytes(buf[pos : pos + 4], "big")
            if length > MAX_DIRECTORY_BYTES or length > self._max_bytes:
                raise StorageError(
                    f"{self._where}: frame {self._frames} claims {length} bytes, more than the {MAX_DIRECTORY_BYTES} "
                    f"a directory may take here (or than max_closure_bytes)"
                )
            if len(buf) - pos - 4 < length:
                break
            raw = bytes(buf[pos + 4 : pos + 4 + length])
            pos += 4 + length
            self._accept(raw)
        del buf[:pos]
        return len(data)

    def _accept(self, raw: bytes) -> None:
        index = self._frames
        self._frames += 1
        if self._first_only:
            self.ready.append((self._root, raw, None))
            raise _Enough
        digest = B3Digest(blake3.blake3(raw).digest())
        if index == 0 and digest != self._root:
            what = f"directory {self._root.hex()} (first frame of {self._where})"
            raise ChecksumMismatch(what, self._root.hex(), digest.hex())
        if digest in self._received:
            raise StorageError(f"{self._where}: frame {index} repeats directory {digest.hex()}")
        if digest not in self._expected:
            raise StorageError(
                f"{self._where}: frame {index} holds directory {digest.hex()}, which no earlier frame refers to "
                "(out of order or foreign)"
            )
        try:
            directory = Directory.decode(raw)
        except ValueError as e:
            raise StorageError(f"directory {digest.hex()} is stored in an invalid form: {e}") from None
        recorded = self._expected[digest]
        if recorded is not None:
            rules = [r for r in self._rules if directory.size_mismatch(r, recorded, "") is None]
            if not rules:
                wrong = directory.size_mismatch(self._rules[0], recorded, f"{self._where}: a parent")
                raise StorageError(f"{wrong} (and the closure follows no other rule)")
            self._rules = rules
        self._received.add(digest)
        for name, child in directory.directories():
            known = self._expected.get(child.digest)
            if child.digest in self._expected and known != child.size:
                raise StorageError(
                    f"{self._where}: directory {digest.hex()}: {name[:300]!r} records size {child.size} "
                    f"for {child.digest.hex()}, another parent {known}"
                )
            self._expected[child.digest] = child.size
        self.ready.append((digest, raw, directory))

    def finish(self) -> None:
        """The object ended: fail unless it held whole frames and the whole closure."""
        if self._buffer:
            raise StorageError(f"{self._where}: ends inside a frame ({len(self._buffer)} bytes left over)")
        if not self._frames:
            raise StorageError(f"{self._where}: holds no directories")
        missing = self._expected.keys() - self._received
        if missing:
            raise StorageError(
                f"{self._where}: closure incomplete: {len(missing)} referenced directories missing "
                f"(e.g. {min(missing).hex()})"
            )


def _decompressing_into(reader: _ClosureReader) -> zstandard.ZstdDecompressionWriter:
    """A zstd stream writer whose decompressed output goes to ``reader`` (in blocks of at most 64 KiB)."""
    # zstandard types its sink as a file; it only ever calls write().
    sink = cast(IO[bytes], reader)
    return zstandard.ZstdDecompressor().stream_writer(sink, write_size=_WRITE_SIZE, closefd=False)


def decode_closure(
    root: B3Digest, data: bytes, rule: SizeRule, *, max_bytes: int = MAX_CLOSURE_BYTES, where: str = "closure object"
) -> list[Directory]:
    """Every Directory of a whole closure object in memory, checked as :meth:`get_recursive` does (by ``rule``)."""
    reader = _ClosureReader(root, where, max_bytes, rule)
    writer = _decompressing_into(reader)
    try:
        writer.write(data)
    except zstandard.ZstdError as e:
        raise StorageError(f"{where}: cannot decompress: {e}") from None
    reader.finish()
    return [d for _, _, d in reader.ready if d is not None]


# -- the service --------------------------------------------------------------------


class ObjectStoreDirectoryService(ObjectStoreBacked, DirectoryService):
    """Directory closures in an object store (see the module docstring)."""

    closures_only: ClassVar[bool] = True

    def __init__(
        self,
        store: ObjectStore,
        *,
        zstd_level: int = ZSTD_LEVEL,
        refresh_after: float = REFRESH_AFTER,
        max_closure_bytes: int = MAX_CLOSURE_BYTES,
    ) -> None:
        super().__init__(store, refresh_after)
        self.zstd_level = zstd_level
        self.max_closure_bytes = max_closure_bytes

    rule_recorded = True

    def __repr__(self) -> str:
        return f"ObjectStoreDirectoryService({self.store.where!r})"

    async def open_size_rule(self, requested: SizeRule | None) -> None:
        """Read the recorded rule (recording it if absent) and check ``requested`` against it."""
        where = f"directory store {self.store.where}"
        raw = await self.store.get(SIZE_RULE_KEY, cap=64)
        recorded = None if raw is None else SizeRule.parse(raw.decode("ascii", "replace"), where)
        has_directories = False
        if recorded is None:
            async for page in self.store.list("dirs/b3/", page=1):
                has_directories = bool(page)
                break
        rule, record = settle_size_rule(recorded, has_directories, requested, where)
        if record:
            await self.store.put(SIZE_RULE_KEY, f"{rule.value}\n".encode())
        self.size_rule = rule

    async def record_size_rule(self, rule: SizeRule) -> None:
        await self.store.put(SIZE_RULE_KEY, f"{rule.value}\n".encode())
        self.size_rule = rule

    # -- reading -----------------------------------------------------------------------

    async def _frames(
        self, root: B3Digest, *, first_only: bool = False
    ) -> AsyncGenerator[tuple[B3Digest, bytes, Directory | None]]:
        """The frames of ``root``'s closure object as they are read and checked (nothing if absent)."""
        key = directory_key(root)
        blocks = await self.store.get_stream(key, cap=compressed_bound(self.max_closure_bytes))
        if blocks is None:
            self.presence.forget(key)
            return
        where = f"{self.store.where}: {key}"
        reader = _ClosureReader(root, where, self.max_closure_bytes, self.size_rule, first_only=first_only)
        writer = _decompressing_into(reader)
        async with contextlib.aclosing(blocks):
            async for block in blocks:
                try:
                    if len(block) >= _THREAD_MIN:
                        await asyncio.to_thread(writer.write, block)
                    else:
                        writer.write(block)
                except _Enough:
                    yield reader.ready[0]
                    return
                except zstandard.ZstdError as e:
                    raise StorageError(f"{where}: cannot decompress: {e}") from None
                ready, reader.ready = reader.ready, []
                for item in ready:
                    yield item
        reader.finish()

    async def _get_raw(self, digest: B3Digest) -> bytes | None:
        # The first frame, unchecked: the base class's get() hashes and decodes it.
        async with contextlib.aclosing(self._frames(digest, first_only=True)) as frames:
            async for _, raw, _ in frames:
                return raw
        return None

    async def _get_many_raw(self, digests: Sequence[B3Digest]) -> dict[B3Digest, bytes]:
        found: dict[B3Digest, bytes] = {}
        wanted = list(dict.fromkeys(digests))
        for i in range(0, len(wanted), _CLOSURES_AT_ONCE):
            batch = wanted[i : i + _CLOSURES_AT_ONCE]
            for digest, raw in zip(batch, await asyncio.gather(*(self._get_raw(d) for d in batch)), strict=True):
                if raw is not None:
                    found[digest] = raw
        return found

    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        async with contextlib.aclosing(self._frames(root)) as frames:
            async for _, _, directory in frames:
                assert directory is not None
                yield directory

    async def get_recursive_raw(self, root: B3Digest) -> AsyncIterator[tuple[B3Digest, bytes]]:
        async with contextlib.aclosing(self._frames(root)) as frames:
            async for digest, raw, _ in frames:
                yield digest, raw

    # -- writing -----------------------------------------------------------------------

    async def put(self, directory: Directory) -> B3Digest:
        """Store a leaf directory (a closure of one); one with sub-directories is a :class:`ValidationError`."""
        if any(True for _ in directory.directories()):
            raise ValidationError(
                f"directory {directory.digest.hex()} has sub-directories: this store keeps whole closures, "
                "upload it with put_multiple (its sub-directories first)"
            )
        return await super().put(directory)

    async def _put_raw(self, items: Sequence[tuple[B3Digest, bytes]]) -> None:
        frames = _root_to_leaves(items)
        root = B3Digest(blake3.blake3(frames[0]).digest())
        key = directory_key(root)
        state = await self.presence.check([key])
        if self._fresh(state[key]):
            return
        data = await asyncio.to_thread(encode_closure, frames, self.zstd_level)
        await self.store.put(key, data)
        self.presence.noted(key, len(data))

    # -- garbage collection (nixcas.castore.sweep) ----------------------------------
    #
    # A closure object's age is its modification time (a writer relying on an old one
    # writes it again).  Deletion looks at the age again first (HEAD); see the blob
    # backend for the window between that HEAD and the DELETE.

    def scan_directories(self) -> AsyncIterator[list[StoredObject]]:
        return scan_listing(self.store, "dirs")

    async def delete_directories(self, objects: Sequence[StoredObject], cutoff_ns: int) -> Deletion:
        return await self._delete_old(objects, cutoff_ns, directory_key)

"""Store verification for the castore: walk trees and stored objects, report every problem with its path.

:class:`CastoreChecker` checks what a root node reaches (directories present,
hashing to their digest, decodable, with the sizes their parents record;
blobs present with all their chunks, and with ``check_contents`` read back
whole, hashed and measured) and, for backends that can enumerate
(:class:`~nixcas.castore.gc.SweepableDirectories` /
:class:`~nixcas.castore.gc.SweepableBlobs`), every stored object whether
reachable or not.  :class:`CastoreRepairer` replaces damaged objects with
verified copies from another store.  Nothing here knows about Nix.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import blake3

from nixcas.castore.blob.base import BlobService, ChunkMeta
from nixcas.castore.digest import B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.graph import leaves_first
from nixcas.castore.nodes import MAX_DEPTH, DirectoryNode, FileNode, Node
from nixcas.castore.sweep import FOREVER_NS, HasOutboards, StoredObject, SweepableBlobs, SweepableDirectories
from nixcas.errors import ChecksumMismatch, NixcasError, StorageError

__all__ = ["CastoreChecker", "CastoreRepairer", "CheckableOutboards", "Problem"]

UNREFERENCED = "(unreferenced)"
"""The path of a problem found in a stored object no root reaches."""
CACHE = "(cache)"
"""The path of a problem found in a derived object a backend caches (a bao outboard)."""


@runtime_checkable
class CheckableOutboards(HasOutboards, Protocol):
    """A blob backend whose cached outboards can be checked without the blobs' data."""

    async def outboard_problem(self, digest: B3Digest) -> str | None:
        """What is wrong with the cached outboard of ``digest`` (``None``: nothing, or none cached)."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong: where (a path below a root, or :data:`UNREFERENCED`), which object, what."""

    path: str
    kind: str
    """``directory``, ``blob``, ``chunk``, ``outboard`` or (Nix layer) ``pathinfo``."""
    name: str
    """The object's digest in hex (or a store path)."""
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.kind} {self.name} {self.message}"

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "kind": self.kind, "object": self.name, "problem": self.message}


def _join(prefix: str, name: bytes) -> str:
    return f"{prefix}/{name.decode(errors='backslashreplace')}"


class CastoreChecker:
    """Checks trees and stored objects; each object is examined once however often it is reached."""

    def __init__(self, blobs: BlobService, directories: DirectoryService, *, check_contents: bool = False) -> None:
        self.blobs = blobs
        self.directories = directories
        self.check_contents = check_contents
        self._dirs: dict[B3Digest, Directory | str] = {}
        self._blob_results: dict[B3Digest, tuple[str | None, int | None]] = {}
        self._bad_chunk: dict[B3Digest, B3Digest] = {}  # blob -> the chunk its problem is about
        self._chunks_seen: set[B3Digest] = set()  # chunks of multi-chunk blobs already examined as such
        self._closures_read: set[B3Digest] = set()  # closure objects read whole (services keeping closures)
        self.on_object: Callable[[], None] | None = None

    # -- single objects ------------------------------------------------------------

    def _decode(self, digest: B3Digest, raw: bytes | None) -> Directory | str:
        if raw is None:
            return "is missing"
        got = blake3.blake3(raw).digest()
        if got != digest:
            return f"is corrupt (its stored bytes hash to {got.hex()})"
        try:
            return Directory.decode(raw)
        except ValueError as e:
            return f"is stored in an invalid form: {e}"

    async def _load(self, digests: list[B3Digest]) -> None:
        wanted = [d for d in dict.fromkeys(digests) if d not in self._dirs]
        if wanted and self.directories.closures_only:
            for digest in wanted:
                if digest not in self._dirs:  # an earlier closure may have brought it
                    await self._load_closure(digest)
            return
        if wanted:
            found = await self.directories.get_many_raw(wanted)
            for d in wanted:
                self._dirs[d] = self._decode(d, found.get(d))
                if self.on_object is not None:
                    self.on_object()

    async def _load_closure(self, root: B3Digest) -> str | None:
        """A service keeping whole closures: load ``root``'s closure in one read (its members come with it).

        Returns what is wrong with the closure object (``None``: nothing).
        """
        self._closures_read.add(root)
        closure: dict[B3Digest, bytes] = {}
        problem: str | None = None
        try:
            async for digest, raw in self.directories.get_recursive_raw(root):
                closure[digest] = raw
        except StorageError as e:
            problem = f"has a damaged closure object: {e}"
        if problem is not None or not closure:
            self._dirs.setdefault(root, problem or "is missing")
            if self.on_object is not None:
                self.on_object()
            return problem
        for digest, raw in closure.items():
            if digest not in self._dirs:
                self._dirs[digest] = self._decode(digest, raw)
            if self.on_object is not None:
                self.on_object()
        return None

    async def directory(self, digest: B3Digest) -> Directory | str:
        """The decoded Directory, or what is wrong with it."""
        await self._load([digest])
        return self._dirs[digest]

    async def blob(self, digest: B3Digest) -> tuple[str | None, int | None]:
        """What is wrong with a blob (``None``: nothing found) and its size if it was read."""
        if digest not in self._blob_results:
            self._blob_results[digest] = await self._check_blob(digest)
            if self.on_object is not None:
                self.on_object()
        return self._blob_results[digest]

    async def _check_blob(self, digest: B3Digest) -> tuple[str | None, int | None]:
        try:
            chunks = await self.blobs.chunks(digest)
            if chunks is None:
                return "is missing", None
            absent = await self.blobs.missing([c.digest for c in chunks])
            if absent:
                return f"is missing its chunk {absent[0].hex()}", None
            if chunks:
                return await self._check_chunked(digest, chunks)
            reader = await self.blobs.open_read(digest)
            if reader is None:
                return "is missing", None
            async with reader:
                if not self.check_contents:
                    return None, None
                size = 0
                async for block in reader.iter_blocks():
                    size += len(block)
                return None, size
        except ChecksumMismatch as e:
            return f"is corrupt (its bytes hash to {e.got})", None
        except NixcasError as e:
            return f"cannot be read: {e}", None

    async def _check_chunked(self, digest: B3Digest, chunks: list[ChunkMeta]) -> tuple[str | None, int | None]:
        """A multi-chunk blob: each chunk read (bounded) and checked, then the whole blob's hash."""
        size = sum(c.size for c in chunks)
        if not self.check_contents:
            return None, size
        hasher = blake3.blake3()
        for chunk in chunks:
            self._chunks_seen.add(chunk.digest)
            try:
                data = await self.blobs.read_chunk(chunk)
            except ChecksumMismatch as e:
                self._bad_chunk[digest] = chunk.digest
                return f"is corrupt (its bytes hash to {e.got})", None
            except NixcasError as e:
                self._bad_chunk[digest] = chunk.digest
                return f"cannot be read: {e}", None
            if data is None:
                return f"is missing its chunk {chunk.digest.hex()}", None
            hasher.update(data)
        got = hasher.hexdigest()
        if got != digest.hex():
            return f"is corrupt (its chunks together hash to {got})", None
        return None, size

    def blob_problem(self, path: str, digest: B3Digest, problem: str) -> Problem:
        """The problem :meth:`blob` found, attributed to the chunk it is about (``<path>: blob X: chunk Y …``)."""
        chunk = self._bad_chunk.get(digest)
        if chunk is not None:
            return Problem(f"{path}: blob {digest.hex()}", "chunk", chunk.hex(), problem)
        return Problem(path, "blob", digest.hex(), problem)

    async def chunk(self, digest: B3Digest) -> str | None:
        """What is wrong with a chunk object (read whole and hashed)."""
        return (await self._check_blob(digest))[0] if self.check_contents else None

    # -- trees ---------------------------------------------------------------------

    async def walk(self, label: str, node: Node) -> AsyncIterator[Problem]:
        """Every problem below ``node``, whose path is ``label``; breadth-first, directories fetched per level.

        A directory whose entries would lie deeper than :data:`~nixcas.castore.nodes.MAX_DEPTH`
        (stored before the limit existed, or bypassing it) is a problem, and is not descended into.
        """
        level: list[tuple[str, Node]] = [(label, node)]
        depth = 0
        while level:
            await self._load([n.digest for _, n in level if isinstance(n, DirectoryNode)])
            next_level: list[tuple[str, Node]] = []
            for path, n in level:
                if isinstance(n, DirectoryNode):
                    found = self._dirs[n.digest]
                    if isinstance(found, str):
                        yield Problem(path, "directory", n.digest.hex(), found)
                        continue
                    wrong = found.size_mismatch(self.directories.size_rule, n.size, "its parent")
                    if wrong is not None:
                        yield Problem(path, "directory", n.digest.hex(), wrong)
                    if depth >= MAX_DEPTH and len(found):
                        yield Problem(
                            path,
                            "directory",
                            n.digest.hex(),
                            f"is nested {depth} levels deep: its entries exceed the {MAX_DEPTH} levels a tree may have",
                        )
                        continue
                    next_level.extend((_join(path, name), child) for name, child in found)
                elif isinstance(n, FileNode):
                    problem, size = await self.blob(n.digest)
                    if problem is not None:
                        yield self.blob_problem(path, n.digest, problem)
                    elif size is not None and size != n.size:
                        yield Problem(path, "blob", n.digest.hex(), f"has {size} bytes, its directory records {n.size}")
            level = next_level
            depth += 1

    # -- everything stored -----------------------------------------------------------

    async def stored_directories(self, sweepable: SweepableDirectories) -> AsyncIterator[Problem]:
        """Every stored directory no walk reached: re-hashed, decoded, its sub-directories present."""
        async for batch in sweepable.scan_directories():
            if self.directories.closures_only:
                # Each object is a whole closure, checked whole when read (once).
                for obj in batch:
                    if obj.digest not in self._closures_read:
                        problem = await self._load_closure(obj.digest)
                        if problem is not None:
                            yield Problem(UNREFERENCED, "directory", obj.digest.hex(), problem)
                continue
            fresh = [o.digest for o in batch if o.digest not in self._dirs]
            await self._load(fresh)
            children: list[tuple[B3Digest, bytes, DirectoryNode]] = []
            for digest in fresh:
                found = self._dirs[digest]
                if isinstance(found, str):
                    yield Problem(UNREFERENCED, "directory", digest.hex(), found)
                else:
                    children.extend((digest, name, n) for name, n in found.directories())
            await self._load([n.digest for _, _, n in children])
            for parent, name, n in children:
                found = self._dirs[n.digest]
                if isinstance(found, str):
                    where = f"{UNREFERENCED} {parent.hex()}/{name.decode(errors='backslashreplace')}"
                    yield Problem(where, "directory", n.digest.hex(), found)

    async def stored_blobs(self, sweepable: SweepableBlobs) -> AsyncIterator[Problem]:
        """Every stored blob and chunk object no walk reached (read back with ``check_contents``)."""
        async for batch in sweepable.scan_blobs():
            for obj in batch:
                if obj.digest not in self._blob_results:
                    problem, _ = await self.blob(obj.digest)
                    if problem is not None:
                        yield self.blob_problem(UNREFERENCED, obj.digest, problem)
        if not self.check_contents:
            return
        async for batch in sweepable.scan_chunks():
            for obj in batch:
                if obj.digest in self._blob_results or obj.digest in self._chunks_seen:
                    continue  # a single-chunk blob's chunk, read as that blob, or a chunk of a blob examined
                problem = await self.chunk(obj.digest)
                if self.on_object is not None:
                    self.on_object()
                if problem is not None:
                    yield Problem(UNREFERENCED, "chunk", obj.digest.hex(), problem)

    async def stored_outboards(self, cached: CheckableOutboards) -> AsyncIterator[Problem]:
        """Every cached bao outboard, its tree checked against the blob digest (no blob data read)."""
        async for batch in cached.scan_outboards():
            for obj in batch:
                problem = await cached.outboard_problem(obj.digest)
                if self.on_object is not None:
                    self.on_object()
                if problem is not None:
                    yield Problem(CACHE, "outboard", obj.digest.hex(), f"is corrupt ({problem})")


class CastoreRepairer:
    """Replaces damaged or missing objects of ``blobs``/``directories`` by verified copies from a source."""

    def __init__(
        self,
        blobs: BlobService,
        directories: DirectoryService,
        source_blobs: BlobService,
        source_directories: DirectoryService,
    ) -> None:
        self.blobs = blobs
        self.directories = directories
        self.source_blobs = source_blobs
        self.source_directories = source_directories

    async def _drop_blob(self, digest: B3Digest) -> None:
        """Remove a damaged blob (its index and its own chunk object) so a put writes it anew."""
        if isinstance(self.blobs, SweepableBlobs):
            obj = StoredObject(digest, 0, 0)
            await self.blobs.delete_blobs([obj], FOREVER_NS)
            await self.blobs.delete_chunks([obj], FOREVER_NS)

    async def blob(self, digest: B3Digest) -> bool:
        """Refetch one blob (streamed, verified on both ends); ``False`` if the source lacks it."""
        reader = await self.source_blobs.open_read(digest)
        if reader is None:
            return False
        async with reader:
            await self._drop_blob(digest)
            writer = await self.blobs.open_write()
            async with writer:
                async for block in reader.iter_blocks():
                    await writer.write(block)
                got = await writer.close()
        if got != digest:
            raise StorageError(f"repair of blob {digest.hex()}: the source sent a blob hashing to {got.hex()}")
        return True

    async def chunk(self, digest: B3Digest) -> bool:
        """A damaged chunk object: drop it (the blobs listing it are refetched, which rewrites their data)."""
        if isinstance(self.blobs, SweepableBlobs):
            await self.blobs.delete_chunks([StoredObject(digest, 0, 0)], FOREVER_NS)
        return False

    async def outboard(self, digest: B3Digest) -> bool:
        """A damaged cached outboard: drop it (it is computed anew from the blob when next asked for)."""
        if isinstance(self.blobs, HasOutboards):
            await self.blobs.delete_outboards([StoredObject(digest, 0, 0)], FOREVER_NS)
            return True
        return False

    async def directory(self, digest: B3Digest) -> bool:
        """Refetch a directory's closure from the source (damaged local copies dropped first)."""
        closure = [d async for d in self.source_directories.get_recursive(digest)]
        if not closure:
            return False
        if isinstance(self.directories, SweepableDirectories) and self.directories.closures_only:
            # One object holds the whole closure and a put skips an existing one: drop it first.
            await self.directories.delete_directories([StoredObject(digest, 0, 0)], FOREVER_NS)
        elif isinstance(self.directories, SweepableDirectories):
            local = await self.directories.get_many_raw([d.digest for d in closure])
            damaged = [
                StoredObject(d.digest, 0, 0)
                for d in closure
                if d.digest in local and blake3.blake3(local[d.digest]).digest() != d.digest
            ]
            await self.directories.delete_directories(damaged, FOREVER_NS)
        async with self.directories.put_multiple_start() as putter:
            for d in leaves_first(closure):
                await putter.put(d)
            await putter.close()
        return True

    async def tree(self, node: Node) -> None:
        """Make everything ``node`` reaches present and intact locally, fetching what is not."""
        if isinstance(node, DirectoryNode):
            closure = [d async for d in self.source_directories.get_recursive(node.digest)]
            if closure:
                await self.directory(node.digest)
            files = [n for d in closure for _, n in d if isinstance(n, FileNode)]
        else:
            files = [node] if isinstance(node, FileNode) else []
        checker = CastoreChecker(self.blobs, self.directories, check_contents=True)
        for f in files:
            problem, _ = await checker.blob(f.digest)
            if problem is not None:
                await self.blob(f.digest)

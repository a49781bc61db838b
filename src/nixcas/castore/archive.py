"""Importing a tar archive (plain, gzip, bzip2, xz or zstd) into castore.

The archive is read front to back in a worker thread with :mod:`tarfile` in
streaming mode; the compression is recognised by its magic bytes.  File
contents are uploaded while reading (small members in batches, large ones
streamed in blocks), and only the metadata of the tree is kept in memory.
Entries may come in any order: parents are created implicitly, a later entry
replaces an earlier one at the same path unless both are directories (those
merge; an implicit parent replaces a file), but a member below a symlink
(``link`` then ``link/x``) is refused: tar would write through the link, and
silently turning the link into a directory would change what it means.  The
archive must hold exactly one top-level directory, which becomes the root;
members nested deeper than :data:`~nixcas.castore.nodes.MAX_DEPTH` below it
are refused.  Directories are stored by :func:`~nixcas.castore.ingest.ingest_entries`
once the whole archive has been read, so on error none are stored.
"""

from __future__ import annotations

import asyncio
import bz2
import contextlib
import gzip
import io
import lzma
import os
import tarfile
import threading
import zlib
from collections.abc import Awaitable, Callable, Generator, Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, BinaryIO, Self, TypeAlias

import zstandard

from nixcas.castore.blob.base import BlobService
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.ingest import IngestEntry, ingest_entries
from nixcas.castore.nodes import MAX_DEPTH, FileNode, Node, SymlinkNode, validate_name
from nixcas.castore.treepath import TreePath
from nixcas.castore.upload import BATCH_BYTES, BATCH_FILES, SMALL_BLOB, PendingFile, Progress, Uploader
from nixcas.errors import DepthError, IngestError, NixcasError, ValidationError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = ["ingest_archive"]

SOURCE_BUFFER = 1 << 16

_GZIP_MAGIC = b"\x1f\x8b"
_BZIP2_MAGIC = b"BZh"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_MAGIC_LEN = 6

# What reading a broken archive can raise (besides our own errors).
_READ_ERRORS: tuple[type[Exception], ...] = (
    tarfile.TarError,
    EOFError,
    OSError,
    ValueError,
    zlib.error,
    lzma.LZMAError,
    zstandard.ZstdError,
)

_TYPE_NAMES = {
    tarfile.LNKTYPE: "hard link",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "FIFO",
}


def _show(path: bytes) -> str:
    return os.fsdecode(path)


def _zstd_skippable(magic: bytes) -> bool:
    return len(magic) >= 4 and magic[0] & 0xF0 == 0x50 and magic[1:4] == b"\x2a\x4d\x18"


class _ZstdFrames:
    """Follows the frame and block structure of a zstd stream, to tell a complete one from a truncated one.

    The decompressor of :mod:`zstandard` ends quietly when its input stops in
    the middle of a frame; this walks the same bytes (headers only) and knows
    whether the input stopped on a frame boundary.
    """

    def __init__(self) -> None:
        self._state = "magic"
        self._need = 4  # header bytes wanted for the current state
        self._header = bytearray()
        self._skip = 0  # payload bytes to pass over before the next header
        self._checksum = False
        self.frames = 0
        self.invalid = False

    def feed(self, data: bytes) -> None:
        """Account for the next bytes of the compressed stream."""
        pos, end = 0, len(data)
        while pos < end and not self.invalid:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            step = min(self._need - len(self._header), end - pos)
            self._header += data[pos : pos + step]
            pos += step
            if len(self._header) == self._need:
                header = bytes(self._header)
                self._header.clear()
                self._advance(header)

    def _advance(self, header: bytes) -> None:
        state = self._state
        if state == "magic":
            if header == _ZSTD_MAGIC:
                self.frames += 1
                self._state, self._need = "descriptor", 1
            elif _zstd_skippable(header):
                self._state, self._need = "skippable", 4
            else:
                self.invalid = True
        elif state == "skippable":
            self._skip = int.from_bytes(header, "little")
            self._state, self._need = "magic", 4
        elif state == "descriptor":
            fhd = header[0]
            self._checksum = bool(fhd & 0x04)
            single_segment = bool(fhd & 0x20)
            rest = (0 if single_segment else 1) + (0, 1, 2, 4)[fhd & 0x03]
            rest += (1 if single_segment else 0, 2, 4, 8)[fhd >> 6]
            if fhd & 0x08:  # reserved bit
                self.invalid = True
            elif rest:
                self._state, self._need = "frame header", rest
            else:
                self._state, self._need = "block", 3
        elif state == "frame header":
            self._state, self._need = "block", 3
        elif state == "block":
            value = int.from_bytes(header, "little")
            kind, size = (value >> 1) & 0x03, value >> 3
            if kind == 3:
                self.invalid = True
                return
            self._skip = 1 if kind == 1 else size
            if value & 0x01:  # last block of the frame
                self._state, self._need = ("checksum", 4) if self._checksum else ("magic", 4)
        else:  # checksum
            self._state, self._need = "magic", 4

    def complete(self) -> bool:
        """Whether the bytes so far are whole frames, at least one of them a zstd frame."""
        return not self.invalid and self.frames > 0 and self._state == "magic" and not self._header and not self._skip


class _Source(io.RawIOBase):
    """The raw archive bytes: the sniffed magic first, then the rest of the input."""

    def __init__(self, head: bytes, rest: BinaryIO, observe: Callable[[bytes], None] | None) -> None:
        super().__init__()
        self._head = head
        self._rest = rest
        self._observe = observe
        self.at_eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        with memoryview(buffer) as view, view.cast("B") as out:
            if self._head:
                data, self._head = self._head[: len(out)], self._head[len(out) :]
            else:
                data = self._rest.read(len(out))
                if not data:
                    self.at_eof = True
            if self._observe is not None:
                self._observe(data)
            out[: len(data)] = data
            return len(data)


# Not in typeshed, but part of tarfile since Python 3.2.
_BAD_HEADER: tuple[type[Exception], ...] = (
    tarfile.TruncatedHeaderError,  # type: ignore[attr-defined]
    tarfile.InvalidHeaderError,  # type: ignore[attr-defined]
)


class _StrictTarInfo(tarfile.TarInfo):
    """Reports a truncated or corrupt header as an error.

    :mod:`tarfile` takes either for the end of the archive once past the first
    member; an archive may still end without its end-of-archive blocks.
    """

    @classmethod
    def fromtarfile(cls, archive: tarfile.TarFile) -> Self:
        try:
            return super().fromtarfile(archive)
        except _BAD_HEADER as e:
            raise tarfile.ReadError(f"{e} at offset {archive.offset}") from None


@dataclass(slots=True, eq=False)
class _File:
    """A regular member: its contents (small), or a reader for them (large), until uploaded."""

    path: tuple[bytes, ...]
    name: str
    size: int
    executable: bool
    data: bytes | None = None
    read: Callable[[int], bytes] | None = None
    node: FileNode | PendingFile | None = None


@dataclass(slots=True, eq=False)
class _Other:
    """A directory (``node`` is ``None``) or symlink member."""

    path: tuple[bytes, ...]
    node: SymlinkNode | None


_Item: TypeAlias = _File | _Other


class _Dir:
    __slots__ = ("children",)

    def __init__(self) -> None:
        self.children: dict[bytes, _Dir | _File | SymlinkNode] = {}


def _canonical(name: bytes, where: str, label: str) -> tuple[bytes, ...]:
    """The path components of a member name, with ``.``, ``..`` and empty components resolved.

    At most :data:`~nixcas.castore.nodes.MAX_DEPTH` below the top-level directory.
    """
    if name.startswith(b"/"):
        raise IngestError(f"{where}: absolute path")
    parts: list[bytes] = []
    for component in name.split(b"/"):
        if component in (b"", b"."):
            continue
        if component == b"..":
            if not parts:
                raise IngestError(f"{where}: escapes the archive root")
            parts.pop()
            continue
        try:
            parts.append(validate_name(component))
        except ValidationError as e:
            raise IngestError(f"{where}: {e}") from None
        if len(parts) > MAX_DEPTH + 1:
            shown = TreePath.of(parts).show()
            raise DepthError(f"{label}: {shown}: nested deeper than the {MAX_DEPTH} levels a tree may have")
    return tuple(parts)


class _Reader:
    """Reads an archive in batches of members, from one thread at a time.

    A batch ends with a large member, if any; its ``read`` is valid until the
    next batch is asked for.
    """

    def __init__(self, source: str | os.PathLike[str] | BinaryIO, label: str) -> None:
        self._source = source
        self._label = label
        self._kind = "tar"
        self._lock = threading.Lock()
        self._batches: Generator[list[_Item], None, None] = self._read()

    def next_batch(self) -> list[_Item] | None:
        """The next members, or ``None`` at the end (blocking)."""
        with self._lock:
            return next(self._batches, None)

    def close(self) -> None:
        """Stop reading and close what was opened (blocking)."""
        with self._lock:
            self._batches.close()

    def _error(self, e: Exception, member: str | None = None) -> IngestError:
        where = self._label if member is None else f"{self._label}: {member}"
        detail = str(e) or type(e).__name__
        return IngestError(f"{where}: invalid or truncated {self._kind} archive: {detail}")

    def _read(self) -> Generator[list[_Item], None, None]:
        try:
            yield from self._read_archive()
        except _READ_ERRORS as e:
            if isinstance(e, NixcasError):
                raise
            raise self._error(e) from None

    def _open(self, stack: contextlib.ExitStack) -> BinaryIO:
        source = self._source
        if not isinstance(source, (str, os.PathLike)):
            return source
        try:
            return stack.enter_context(open(source, "rb"))
        except OSError as e:
            raise IngestError(f"{self._label}: cannot open: {e.strerror}") from None

    def _read_archive(self) -> Iterator[list[_Item]]:
        with contextlib.ExitStack() as stack:
            raw = self._open(stack)
            head = b""
            while len(head) < _MAGIC_LEN and (more := raw.read(_MAGIC_LEN - len(head))):
                head += more
            frames = _ZstdFrames() if head.startswith(_ZSTD_MAGIC) or _zstd_skippable(head) else None
            source = _Source(head, raw, None if frames is None else frames.feed)
            buffered = stack.enter_context(io.BufferedReader(source, SOURCE_BUFFER))
            stream: io.BufferedIOBase | BinaryIO
            if head.startswith(_GZIP_MAGIC):
                self._kind = "gzip-compressed tar"
                stream = stack.enter_context(gzip.GzipFile(fileobj=buffered, mode="rb"))
            elif head.startswith(_XZ_MAGIC):
                self._kind = "xz-compressed tar"
                stream = stack.enter_context(lzma.LZMAFile(buffered))
            elif head.startswith(_BZIP2_MAGIC):
                self._kind = "bzip2-compressed tar"
                stream = stack.enter_context(bz2.BZ2File(buffered))
            elif frames is not None:
                self._kind = "zstd-compressed tar"
                reader = zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True, closefd=False)
                stream = stack.enter_context(reader)
            else:
                stream = buffered
            archive = stack.enter_context(
                tarfile.open(
                    fileobj=stream, mode="r|", tarinfo=_StrictTarInfo, encoding="utf-8", errors="surrogateescape"
                )
            )
            yield from self._members(archive)
            if stream is not buffered:
                # Decompress to the end, so a damaged or truncated tail is noticed.
                while stream.read(SOURCE_BUFFER):
                    pass
            if frames is not None and not (frames.complete() and source.at_eof):
                raise IngestError(f"{self._label}: invalid or truncated {self._kind} archive: incomplete zstd frame")

    def _members(self, archive: tarfile.TarFile) -> Iterator[list[_Item]]:
        batch: list[_Item] = []
        batch_bytes = 0
        while (info := archive.next()) is not None:
            archive.members.clear()  # type: ignore[attr-defined]  # streaming: no need to remember them
            item = self._item(archive, info)
            if item is None:
                continue
            batch.append(item)
            if isinstance(item, _File):
                if item.read is not None:
                    yield batch  # the consumer streams the member before asking for more
                    batch, batch_bytes = [], 0
                    continue
                batch_bytes += item.size
            if len(batch) >= BATCH_FILES or batch_bytes >= BATCH_BYTES:
                yield batch
                batch, batch_bytes = [], 0
        if batch:
            yield batch

    def _item(self, archive: tarfile.TarFile, info: tarfile.TarInfo) -> _Item | None:
        raw_name = info.name.encode("utf-8", "surrogateescape")
        name = _show(raw_name)
        where = f"{self._label}: {name}"
        if not (info.isreg() or info.issym() or info.isdir()):
            kind = _TYPE_NAMES.get(info.type, f"member of type {info.type!r}")
            raise IngestError(f"{where}: cannot import a {kind}")
        path = _canonical(raw_name, where, self._label)
        if not path:
            if info.isdir():
                return None  # the archive root itself, e.g. "./"
            raise IngestError(f"{where}: names the archive root, but is not a directory")
        if info.isdir():
            return _Other(path, None)
        if info.issym():
            target = info.linkname.encode("utf-8", "surrogateescape")
            try:
                return _Other(path, SymlinkNode(target))
            except ValidationError as e:
                raise IngestError(f"{where}: {e}") from None
        item = _File(path, name, info.size, bool(info.mode & 0o100))
        contents = archive.extractfile(info)
        if contents is None:  # not reached: regular members always have contents
            raise IngestError(f"{where}: no contents")
        if info.size <= SMALL_BLOB:
            item.data = self._read_member(contents, info.size, name)
            if len(item.data) != info.size:
                raise self._error(EOFError(f"ended after {len(item.data)} of {info.size} bytes"), name)
        else:

            def read(n: int) -> bytes:
                with self._lock:
                    return self._read_member(contents, n, name)

            item.read = read
        return item

    def _read_member(self, contents: IO[bytes], n: int, name: str) -> bytes:
        try:
            return contents.read(n)
        except _READ_ERRORS as e:
            if isinstance(e, NixcasError):
                raise
            raise self._error(e, name) from None


def _label(source: str | os.PathLike[str] | BinaryIO) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fsdecode(source)
    name = getattr(source, "name", None)
    return name if isinstance(name, str) else "<archive>"


def _insert(root: _Dir, item: _Item, label: str) -> None:
    """Put ``item`` into the tree; parents become directories, a later entry replaces an earlier one.

    A member below a symlink is refused (extracting it would write through the symlink).
    """
    parent = root
    for i, name in enumerate(item.path[:-1]):
        child = parent.children.get(name)
        if isinstance(child, SymlinkNode):
            above = TreePath.of(item.path[: i + 1]).show()
            raise IngestError(
                f"{label}: {TreePath.of(item.path).show()}: is below {above}, which is a symlink "
                "(members below a symlink are refused)"
            )
        if not isinstance(child, _Dir):
            child = parent.children[name] = _Dir()
        parent = child
    name = item.path[-1]
    if isinstance(item, _File):
        parent.children[name] = item
    elif item.node is not None:
        parent.children[name] = item.node
    elif not isinstance(parent.children.get(name), _Dir):
        parent.children[name] = _Dir()


def _entries(top: bytes, root: _Dir) -> Iterator[IngestEntry]:
    """The tree below ``root`` in post-order, ``root`` (named ``top``) last."""
    stack: list[tuple[TreePath, Iterator[tuple[bytes, _Dir | _File | SymlinkNode]]]] = [
        (TreePath(None, top), iter(root.children.items()))
    ]
    while stack:
        path, children = stack[-1]
        for name, child in children:
            child_path = TreePath(path, name)
            if isinstance(child, _Dir):
                stack.append((child_path, iter(child.children.items())))
                break
            if isinstance(child, _File):
                if child.node is None:
                    raise AssertionError(f"{child_path.show()}: file was not uploaded")
                yield IngestEntry(child_path, child.node)
            else:
                yield IngestEntry(child_path, child)
        else:
            stack.pop()
            yield IngestEntry(path, None)


def _top_level(root: _Dir, label: str) -> tuple[bytes, _Dir]:
    children = root.children
    if len(children) == 1:
        name, child = next(iter(children.items()))
        if isinstance(child, _Dir):
            return name, child
        kind = "file" if isinstance(child, _File) else "symlink"
        got = f"a {kind} {_show(name)!r}"
    elif not children:
        got = "nothing"
    else:
        names = sorted(children)
        shown = ", ".join(repr(_show(n)) for n in names[:3]) + (", ..." if len(names) > 3 else "")
        got = f"{len(names)} entries ({shown})"
    raise IngestError(f"{label}: expected exactly one top-level directory, got {got}")


async def _upload(uploader: Uploader, item: _File, label: str) -> None:
    """Hand a member's contents to the uploader; a large one is streamed before the archive is read on."""
    if item.data is not None:
        item.node, item.data = uploader.small(item.data, item.executable), None
    elif item.read is not None:
        read = item.read

        def read_off_loop(n: int) -> Awaitable[bytes]:
            return asyncio.to_thread(read, n)

        what = f"{label}: {item.name}"
        digest = await uploader.stream(item.size, read_off_loop, what, check_end=True)
        item.node, item.read = FileNode(digest, item.size, item.executable), None


async def ingest_archive(
    source: str | os.PathLike[str] | BinaryIO,
    blobs: BlobService,
    directories: DirectoryService,
    *,
    progress: Progress | None = None,
) -> Node:
    """Import a tar archive (a path, or a binary file object read from its current position); return the root.

    The root is the archive's single top-level directory.  Hard links, devices
    and FIFOs, absolute paths, paths escaping the archive and invalid names
    raise :class:`~nixcas.errors.IngestError`, as do damaged archives; then no
    Directory is stored (blobs already uploaded stay, unreferenced).
    """
    label = _label(source)
    reader = _Reader(source, label)
    tree = _Dir()
    async with Uploader(blobs, progress) as uploader:
        try:
            while (batch := await asyncio.to_thread(reader.next_batch)) is not None:
                for item in batch:
                    if isinstance(item, _File):
                        await _upload(uploader, item, label)
                    _insert(tree, item, label)
                await uploader.room()
            await uploader.finish()
        finally:
            await asyncio.to_thread(reader.close)
    top, root = _top_level(tree, label)
    return await ingest_entries(_entries(top, root), directories, before_commit=blobs.sync)

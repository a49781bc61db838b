"""A NAR planned from stored Directory bytes: its framing, and the files whose contents go between.

:func:`plan_steps` turns the directory closure of a node (the stored bytes of
each Directory, by digest: hash-checked, not decoded into node objects) into a
:class:`Plan`: the bytes of the NAR before each file's contents, and each
file's digest, size and path.  It checks what
:func:`~nixcas.store.nar.plan.iter_plan` with Directory decoding checks, and
raises the same errors.  The hot loop builds each file's framing inline.

The plan is made step by step, so that a reader may start on the files planned
so far: :func:`~nixcas.store.nar.dump.write_planned` (``nixcas dump-path``) and
:func:`~nixcas.store.nar.bulk.bulk_stream` (the bridge) read and write the
files' contents.

This module imports neither asyncio, protobuf nor typing: the command line's
fast path (:mod:`nixcas.cli.fast`) plans with it without loading them
(protobuf only decodes a Directory that is not canonical, or once it is loaded).
"""

from __future__ import annotations

import itertools
import operator
import struct
import sys
from collections.abc import Iterator

from nixcas.castore.canonical import canonical_fields
from nixcas.castore.digest import DIGEST_LEN, EMPTY_DIGEST, B3Digest
from nixcas.castore.nodes import (
    MAX_DEPTH,
    MAX_NAME_LEN,
    DirectoryNode,
    FileNode,
    SymlinkNode,
    validate_name,
    validate_symlink_target,
)
from nixcas.castore.treepath import TreePath
from nixcas.errors import DirectoryError, InvalidSymlinkTargetError
from nixcas.store.nar.wire import (
    ENTRY_PREFIX,
    NAR_MAGIC,
    NODE_DIRECTORY,
    NODE_EXECUTABLE,
    NODE_REGULAR,
    NODE_SYMLINK,
    TOK_CLOSE,
    TOK_NODE,
    encode_str,
    padding,
    u64_le,
)

TYPE_CHECKING = False  # not typing's: the command line's fast path imports this module, and needs nothing of it
if TYPE_CHECKING:
    from typing import Any, Protocol

    from nixcas.castore.canonical import Fields
    from nixcas.castore.nodes import Node
    from nixcas.store.nar.plan import Hole

    class DirectoryBytes(Protocol):
        """Stored Directory bytes by raw digest (a ``dict``, or the fast path's reader of the database, which also
        has ``prefetch(digests)``: the planner announces the subdirectories it will ask for, a directory's at once)."""

        def get(self, digest: bytes, /) -> bytes | None:
            """The stored bytes of ``digest`` (checked against it), or ``None`` if there are none."""


__all__ = [
    "RUN_FILES",
    "Plan",
    "plan_nar",
    "plan_steps",
]

RUN_FILES = 1024
"""Most files in one run (one ``read_run``; its pieces are two ``writev`` calls of at most IOV_MAX); each step of
:func:`plan_steps` plans at least this many more files."""
_CLOSE_ENTRY = TOK_CLOSE + TOK_CLOSE
_FILE_REGULAR = TOK_NODE + NODE_REGULAR
_FILE_EXECUTABLE = TOK_NODE + NODE_EXECUTABLE
_PAD_CLOSE = [bytes(-n & 7) + _CLOSE_ENTRY for n in range(8)]
"""The padding after contents of a size ``n`` (mod 8), and the end of the file and of its entry."""
_U64 = struct.Struct("<Q")
_ENTRY_HEADS = [ENTRY_PREFIX + _U64.pack(n) for n in range(MAX_NAME_LEN + 1)]
"""The start of an entry, up to its name, by the name's length."""
_ZEROS = bytes(8)
_NAME = operator.itemgetter(0)


class Plan:
    """A NAR as framing and holes: ``frames[i]`` comes before file ``i`` (``digests[i]``, ``sizes[i]``,
    at ``paths[i]``: parent and name), and ``frames[-1]`` after the last file."""

    __slots__ = ("digests", "frames", "paths", "sizes")

    def __init__(
        self,
        frames: list[bytes],
        digests: list[bytes],
        sizes: list[int],
        paths: list[tuple[TreePath, bytes] | None],
    ) -> None:
        self.frames = frames
        self.digests = digests
        self.sizes = sizes
        self.paths = paths

    def hole(self, i: int) -> Hole:
        from nixcas.store.nar.plan import ROOT, Hole

        where = self.paths[i]
        path = ROOT if where is None else TreePath(*where)
        return Hole(B3Digest(self.digests[i]), self.sizes[i], path)

    @property
    def nar_size(self) -> int:
        return sum(map(len, self.frames)) + sum(self.sizes)

    def offset(self, i: int) -> int:
        """Where ``frames[i]`` starts in the NAR."""
        return sum(map(len, self.frames[:i])) + sum(self.sizes[:i])


def _entries(raw: bytes, path: TreePath) -> list[Fields]:
    """A stored Directory's entries in name order: (name, kind (0 directory, 1 file, 2 symlink), digest or target,
    size, executable).

    Checked as :meth:`~nixcas.castore.directory.Directory.decode` does: each list sorted, names
    unique across the lists and valid (all names of the directory at once; one by one only to name
    the bad one).  Canonical bytes are read without protobuf while it is not loaded
    (:func:`~nixcas.castore.canonical.canonical_fields`); anything else, or anything once protobuf
    is loaded, goes through protobuf, which reports the precise error.
    """
    entries = None if _protobuf_loaded() else canonical_fields(raw)
    if entries is None:
        entries, names = _message_entries(raw, path)
    else:
        names = [entry[0] for entry in entries]
    if names:
        _check_names(names)
        if entries[0][1] != entries[-1][1]:  # more than one list: merge them (names must stay unique)
            if len(set(names)) != len(names):
                _name_order(sorted(names), path)
            entries.sort(key=_NAME)
    return entries


def _protobuf_loaded() -> bool:
    return "google.protobuf" in sys.modules


def _message_entries(raw: bytes, path: TreePath) -> tuple[list[Fields], list[bytes]]:
    """The entries of any Directory message through protobuf, in the lists' order (each list checked sorted), and
    their names."""
    from google.protobuf.message import DecodeError

    from nixcas.castore.proto import pb

    try:
        msg = pb.Directory.FromString(raw)
    except DecodeError as e:
        raise DirectoryError(f"directory {path.show_below_root()}: cannot decode Directory message: {e}") from None
    entries: list[Fields] = []
    names: list[bytes] = []
    for kind in (0, 1, 2):
        items: Any = (msg.directories, msg.files, msg.symlinks)[kind]
        if not items:
            continue
        if kind == 1:
            part: list[Fields] = [(e.name, 1, e.digest, e.size, e.executable) for e in items]
        elif kind == 0:
            part = [(e.name, 0, e.digest, e.size, False) for e in items]
        else:
            part = [(e.name, 2, e.target, 0, False) for e in items]
        listed = [entry[0] for entry in part]
        if listed != sorted(set(listed)):
            _name_order(listed, path)
        entries += part
        names += listed
    return entries, names


def _check_names(names: list[bytes]) -> None:
    """Every name valid (:func:`~nixcas.castore.nodes.validate_name`), checked at once; one by one to name a bad one."""
    joined = b"/".join(names)
    if (
        joined.count(b"/") != len(names) - 1
        or b"\0" in joined
        or max(map(len, names)) > MAX_NAME_LEN
        or b"" in names
        or b"." in names
        or b".." in names
    ):
        for name in names:
            validate_name(name)


def _name_order(names: list[bytes], path: TreePath) -> None:
    """Raise for the first name that is not sorted after the one before (or repeats it)."""
    for previous, name in itertools.pairwise(names):
        if name == previous:
            raise DirectoryError(f"directory {path.show_below_root()}: duplicate name {name[:300]!r}")
        if name < previous:
            raise DirectoryError(
                f"directory {path.show_below_root()}: {name[:300]!r} is not sorted after {previous[:300]!r}"
            )


def plan_nar(root: Node, closure: DirectoryBytes) -> Plan:
    """The NAR of ``root`` as a :class:`Plan`; directories from ``closure`` (stored bytes by digest).

    The same checks as :func:`~nixcas.store.nar.plan.iter_plan` with Directory decoding: names
    valid, sorted and unique, digests of 32 bytes, sizes that agree with the empty blob, symlink
    targets valid, depth at most :data:`~nixcas.castore.nodes.MAX_DEPTH`, every directory present.
    """
    plan, steps = plan_steps(root, closure)
    for _ in steps:
        pass
    return plan


def plan_steps(root: Node, closure: DirectoryBytes) -> tuple[Plan, Iterator[None]]:
    """:func:`plan_nar` step by step: the :class:`Plan` is complete once the steps are done.

    Each step plans at least :data:`RUN_FILES` more files (a whole directory at a time), so a
    reader may start on the files planned so far (:func:`~nixcas.store.nar.dump.write_planned`).
    """
    plan = Plan([], [], [], [])
    if isinstance(root, DirectoryNode):
        return plan, _plan_tree(root, closure, plan)
    _plan_leaf(root, plan)
    return plan, iter(())


def _plan_leaf(root: Node, plan: Plan) -> None:
    """The NAR of a file or a symlink."""
    buf = bytearray(NAR_MAGIC)
    frames, digests, sizes, paths = plan.frames, plan.digests, plan.sizes, plan.paths
    if isinstance(root, FileNode):
        buf += NODE_EXECUTABLE if root.executable else NODE_REGULAR
        buf += u64_le(root.size)
        if _has_contents(root.digest, root.size, None, b""):
            frames.append(bytes(buf))
            buf.clear()
            digests.append(bytes(root.digest))
            sizes.append(root.size)
            paths.append(None)
            buf += padding(root.size)
    else:
        assert isinstance(root, SymlinkNode)
        buf += NODE_SYMLINK
        buf += encode_str(root.target)
    buf += TOK_CLOSE
    frames.append(bytes(buf))


def _plan_tree(root: DirectoryNode, closure: DirectoryBytes, plan: Plan) -> Iterator[None]:
    """:func:`plan_steps` of a directory: depth first, each file's framing inline (the hot loop), the rest in
    helpers; a step ends with a directory once :data:`RUN_FILES` more files are planned."""
    frames, digests, sizes, paths = plan.frames, plan.digests, plan.sizes, plan.paths
    step_end = RUN_FILES
    buf = bytearray(NAR_MAGIC)
    buf += NODE_DIRECTORY
    top = closure.get(root.digest)
    if top is None:
        raise _missing_directory(root.digest, None, b"")
    # Each frame: a directory's entries, the next one's index, its path.
    stack: list[tuple[list[Fields], int, TreePath]] = [(_entries_from(closure, top, _ROOT), 0, _ROOT)]
    seen = _Seen()
    append_frame, append_digest, append_size, append_path = frames.append, digests.append, sizes.append, paths.append
    pack, join, zeros, empty, heads = _U64.pack, b"".join, _ZEROS, EMPTY_DIGEST, _ENTRY_HEADS
    regular, exe = _FILE_REGULAR, _FILE_EXECUTABLE
    while stack:
        if len(sizes) >= step_end:
            step_end = len(sizes) + RUN_FILES
            yield
        entries, i, path = stack.pop()
        if not i and entries and path.depth >= MAX_DEPTH:
            raise _too_deep(path)
        descend = None
        n = len(entries)
        while i < n:
            name, kind, digest, size, executable = entries[i]
            i += 1
            if kind == 1:
                length = len(name)  # at most MAX_NAME_LEN: the names were checked
                entry = (buf, heads[length], name, zeros[: -length & 7], exe if executable else regular, pack(size))
                if (size and digest != empty and len(digest) == DIGEST_LEN) or _has_contents(digest, size, path, name):
                    append_frame(join(entry))
                    buf.clear()
                    append_digest(digest)
                    append_size(size)
                    append_path((path, name))
                    buf += _PAD_CLOSE[size & 7]
                else:
                    buf[:] = join(entry)
                    buf += _CLOSE_ENTRY
            elif kind == 2:
                buf += _symlink_entry(name, digest)
            else:
                descend = _enter(closure, path, name, digest, seen)
                buf += join((ENTRY_PREFIX, encode_str(name), TOK_NODE, NODE_DIRECTORY))
                break
        if descend is not None:
            stack.append((entries, i, path))
            stack.append(descend)
            continue
        buf += TOK_CLOSE if path.parent is None else _CLOSE_ENTRY
    frames.append(bytes(buf))


_ROOT = TreePath(None, b"")
"""The NAR's root (:data:`nixcas.store.nar.plan.ROOT`)."""


def _has_contents(digest: bytes, size: int, parent: TreePath | None, name: bytes) -> bool:
    """Whether a file has contents (a hole in the plan): ``False`` for the empty file; a contradiction raises."""
    if len(digest) != DIGEST_LEN:
        raise DirectoryError(f"invalid node {name[:300]!r}: invalid digest length {len(digest)}")
    if size and digest != EMPTY_DIGEST:
        return True
    if not size and digest == EMPTY_DIGEST:
        return False
    from nixcas.store.nar.plan import ROOT, _check_file

    _check_file(FileNode(B3Digest(digest), size), ROOT if parent is None else TreePath(parent, name))
    raise AssertionError("unreachable: _check_file raises for a size that contradicts the digest")


def _symlink_entry(name: bytes, target: bytes) -> bytes:
    """The whole entry of a symlink, its target checked."""
    try:
        validate_symlink_target(target)
    except InvalidSymlinkTargetError as e:
        raise DirectoryError(f"invalid node {name[:300]!r}: {e}") from None
    return b"".join((ENTRY_PREFIX, encode_str(name), TOK_NODE, NODE_SYMLINK, encode_str(target), _CLOSE_ENTRY))


class _Seen(dict[bytes, list["Fields"]]):
    """The entries of the directories planned so far, by digest, at most :data:`SEEN_ENTRIES` of them: a tree may
    hold the same directory many times (``/usr/include`` here: 825 directories, 476 distinct)."""

    __slots__ = ("room",)

    def __init__(self) -> None:
        super().__init__()
        self.room = SEEN_ENTRIES


SEEN_ENTRIES = 1 << 17
"""Most entries of directories :func:`_plan_tree` keeps, to plan another copy of one without reading and checking
its bytes again."""


def _enter(
    closure: DirectoryBytes, parent: TreePath, name: bytes, digest: bytes, seen: _Seen
) -> tuple[list[Fields], int, TreePath]:
    """The stack frame of a subdirectory: its entries (from ``seen``, else from ``closure``), from the first, and its
    path."""
    child = TreePath(parent, name)
    entries = seen.get(digest)
    if entries is not None:
        return entries, 0, child
    raw = closure.get(digest)
    if raw is None:
        if len(digest) != DIGEST_LEN:
            raise DirectoryError(f"invalid node {name[:300]!r}: invalid digest length {len(digest)}")
        raise _missing_directory(digest, parent, name)
    entries = _entries_from(closure, raw, child)
    if len(entries) <= seen.room:
        seen[digest] = entries
        seen.room -= len(entries)
    return entries, 0, child


def _entries_from(closure: DirectoryBytes, raw: bytes, path: TreePath) -> list[Fields]:
    """:func:`_entries`, and the subdirectories announced to a ``closure`` that reads ahead (``prefetch``)."""
    entries = _entries(raw, path)
    prefetch = getattr(closure, "prefetch", None)
    if prefetch is not None:
        below = [entry[2] for entry in entries if not entry[1]]
        if len(below) > 1:
            prefetch(below)
    return entries


def _missing_directory(digest: bytes, parent: TreePath | None, name: bytes) -> Exception:
    from nixcas.store.nar.plan import ROOT, NarContentNotFound

    return NarContentNotFound("directory", B3Digest(digest), ROOT if parent is None else TreePath(parent, name))


def _too_deep(path: TreePath) -> Exception:
    from nixcas.store.nar.plan import too_deep

    return too_deep(path)

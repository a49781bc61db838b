"""Nix's NAR listing (the ``<hash>.ls`` JSON of a binary cache), computed from castore alone.

The listing describes a NAR's tree::

    {"root": NODE, "version": 1}
    NODE = {"entries": {NAME: NODE, ...}, "type": "directory"}
         | {"executable": true, "narOffset": N, "size": S, "type": "regular"}   ("executable" only when set)
         | {"target": T, "type": "symlink"}

``narOffset`` is where the file's contents start in the NAR.  No blob is read
and the NAR is not rendered: the offsets follow from the NAR framing (every
token is a length-prefixed string padded to 8 bytes, see
:mod:`nixcas.store.nar.wire`), the names and symlink targets in the directory
closure and the file sizes the file nodes declare.  The walk is depth first in
entry order, which is both the NAR's order and the order of the listing's
keys (sorted by name), so one running byte counter gives every offset.  Keys
of an object are sorted as Nix's JSON library writes them.  The text is
produced in chunks of about :data:`LISTING_CHUNK` bytes; besides the closure
it holds only the entries still to visit of the directories on the current
path.

JSON strings are Unicode: a name or symlink target that is not UTF-8 cannot
be listed (Nix cannot write such a listing either).  :func:`check_listable`
finds that before anything is produced.
"""

from __future__ import annotations

from collections.abc import Iterator
from json.encoder import encode_basestring

from nixcas.castore.nodes import MAX_DEPTH, FileNode, Node, SymlinkNode
from nixcas.castore.treepath import TreePath
from nixcas.errors import ValidationError
from nixcas.store.nar.plan import ROOT, Closure, NarContentNotFound, too_deep
from nixcas.store.nar.wire import (
    ENTRY_PREFIX,
    NAR_MAGIC,
    NODE_DIRECTORY,
    NODE_EXECUTABLE,
    NODE_REGULAR,
    NODE_SYMLINK,
    TOK_CLOSE,
    TOK_NODE,
    pad_len,
)

__all__ = ["LISTING_CHUNK", "UnlistableName", "check_listable", "nar_listing"]

LISTING_CHUNK = 64 << 10
"""The listing is produced in pieces of about this many bytes."""

_CLOSE = len(TOK_CLOSE)
_ENTRY_FRAMING = len(ENTRY_PREFIX) + 8 + len(TOK_NODE)
"""An entry's framing before its node, besides its name's bytes and padding."""


class UnlistableName(ValidationError):
    """A name or symlink target that is not UTF-8: a JSON listing cannot hold it."""


def _str_size(data: bytes) -> int:
    """The NAR size of ``str(data)``: length field, bytes, padding."""
    return 8 + len(data) + pad_len(len(data))


def _json(raw: bytes) -> str:
    """``raw`` (UTF-8) as a JSON string: only ``"``, ``\\`` and control characters escaped, as Nix writes it."""
    return encode_basestring(raw.decode("utf-8"))


def _texts(root: Node, closure: Closure) -> Iterator[tuple[str, bytes]]:
    """Every name and symlink target below ``root``, each with what it is."""
    if isinstance(root, SymlinkNode):
        yield "a symlink target", root.target
    for directory in closure.values():
        for name, node in directory.entries:
            yield "a name", name
            if isinstance(node, SymlinkNode):
                yield "a symlink target", node.target


def check_listable(root: Node, closure: Closure) -> None:
    """Raise :class:`UnlistableName` if a name or symlink target below ``root`` is not UTF-8."""
    for what, raw in _texts(root, closure):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            shown = raw.decode("utf-8", "backslashreplace")[:100]
            message = f"{what} in this NAR is not UTF-8 ({shown!r}): a JSON listing cannot hold it"
            raise UnlistableName(message) from None


def nar_listing(root: Node, closure: Closure) -> Iterator[bytes]:
    """The listing of ``root``'s NAR as UTF-8 JSON, in chunks of about :data:`LISTING_CHUNK` bytes.

    ``closure`` holds every directory below ``root`` (see
    :func:`~nixcas.store.nar.plan.fetch_closure`); a missing one raises
    :class:`~nixcas.store.nar.plan.NarContentNotFound`, a name that is not
    UTF-8 :class:`UnicodeDecodeError` (call :func:`check_listable` first), a
    tree nested deeper than the NAR renderer allows
    :class:`~nixcas.errors.DepthError`.
    """
    parts: list[str] = ['{"root":']
    held = 0
    pos = len(NAR_MAGIC)
    # One frame per open directory: its entries still to visit (reversed), its path, and
    # whether an entry was listed yet.  Below the root a node closes twice (node, entry).
    stack: list[tuple[list[tuple[bytes, Node]], TreePath, list[bool]]] = []
    node: Node = root
    parent: TreePath | None = None  # the directory holding ``node`` (None: node is the root)
    name = b""
    while True:
        close = _CLOSE if parent is None else 2 * _CLOSE
        if isinstance(node, FileNode):
            pos += len(NODE_EXECUTABLE if node.executable else NODE_REGULAR) + 8
            executable = '"executable":true,' if node.executable else ""
            text = f'{{{executable}"narOffset":{pos},"size":{node.size},"type":"regular"}}'
            pos += node.size + pad_len(node.size) + close
        elif isinstance(node, SymlinkNode):
            pos += len(NODE_SYMLINK) + _str_size(node.target) + close
            text = f'{{"target":{_json(node.target)},"type":"symlink"}}'
        else:
            path = ROOT if parent is None else TreePath(parent, name)
            directory = closure.get(node.digest)
            if directory is None:
                raise NarContentNotFound("directory", node.digest, path)
            if path.depth >= MAX_DEPTH and directory.entries:
                raise too_deep(path)
            pos += len(NODE_DIRECTORY)
            text = '{"entries":{'
            stack.append((list(directory.entries)[::-1], path, [False]))
        parts.append(text)
        held += len(text)
        # The next entry, closing the directories finished on the way.
        while stack:
            entries, parent, started = stack[-1]
            if entries:
                name, node = entries.pop()
                text = ("," if started[0] else "") + _json(name) + ":"
                started[0] = True
                parts.append(text)
                held += len(text)
                pos += _ENTRY_FRAMING + len(name) + pad_len(len(name))
                break
            stack.pop()
            parts.append('},"type":"directory"}')
            held += 21
            pos += _CLOSE if parent.parent is None else 2 * _CLOSE
        else:
            break
        if held >= LISTING_CHUNK:
            yield "".join(parts).encode()
            parts.clear()
            held = 0
    parts.append(',"version":1}')
    yield "".join(parts).encode()

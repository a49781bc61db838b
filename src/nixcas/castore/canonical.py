"""Canonical ``Directory`` bytes read and written without protobuf: what a command listing one directory needs.

A stored Directory is the deterministic protobuf encoding of a valid
Directory (that is what its digest is computed over).  Reading such bytes
needs no general protobuf decoder, and loading one (google.protobuf and the
generated module) costs more than a ``castore ls`` does otherwise.

:func:`decode_canonical` accepts exactly the bytes :meth:`Directory.encode`
produces for a valid Directory: the three lists in field order, each sorted
by name with no repeats; each entry's fields in field-number order, each at
most once, zero values left out; every varint in its shortest form; no
unknown fields; every name, digest, size and target valid.  For anything
else it returns ``None`` and the caller decodes with protobuf, which gives
the same result or the precise error.  So accepted bytes are their own
canonical encoding (re-encoding them gives them back).

:func:`encode_canonical` writes those bytes for a valid Directory's entries
(what protobuf's deterministic serialization gives, which the tests check):
an import stores every Directory it makes without loading protobuf.
"""

from __future__ import annotations

from collections.abc import Iterable

from nixcas.castore.digest import DIGEST_LEN, B3Digest
from nixcas.castore.nodes import U64_MAX, DirectoryNode, FileNode, Node, SymlinkNode, validate_name
from nixcas.errors import ValidationError

__all__ = [
    "Fields",
    "canonical_fields",
    "decode_canonical",
    "encode_canonical",
    "encode_entry",
    "read_varint",
    "varint",
]

# Wire tags (field number << 3 | wire type) of castore.proto's messages.
_LIST_TAGS = {0x0A: 0, 0x12: 1, 0x1A: 2}
"""Directory: directories = 1, files = 2, symlinks = 3 (length-delimited)."""
_NAME, _DIGEST_OR_TARGET, _SIZE, _EXECUTABLE = 0x0A, 0x12, 0x18, 0x20
"""name = 1 and digest (or target) = 2 (length-delimited); size = 3 and executable = 4 (varint)."""


def varint(value: int) -> bytes:
    """``value`` (0 to 2**64 - 1) as a protobuf varint, in its shortest form."""
    if value < 0x80:
        return bytes((value,))
    if value < 0x200000:  # two or three bytes: most file sizes
        low = value & 0x7F | 0x80
        return bytes((low, value >> 7)) if value < 0x4000 else bytes((low, value >> 7 & 0x7F | 0x80, value >> 14))
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def delimited(tag: int, value: bytes) -> bytes:
    """A length-delimited field: its one-byte ``tag``, the value's length as a varint, the value."""
    n = len(value)
    return bytes((tag, n)) + value if n < 0x80 else bytes((tag,)) + varint(n) + value


def encode_entry(name: bytes, node: Node) -> tuple[int, bytes]:
    """A Directory entry (or a ``Node`` message's one field): its list's tag, and its message bytes."""
    if isinstance(node, SymlinkNode):
        return 0x1A, delimited(_NAME, name) + delimited(_DIGEST_OR_TARGET, node.target)
    entry = delimited(_NAME, name) + delimited(_DIGEST_OR_TARGET, node.digest)
    if node.size:
        entry += bytes((_SIZE,)) + varint(node.size)
    if isinstance(node, FileNode):
        if node.executable:
            entry += b"\x20\x01"
        return 0x12, entry
    return 0x0A, entry


_BYTE = tuple(bytes((i,)) for i in range(0x80))
"""Each one-byte varint (0 to 127): names, entries and most small sizes are shorter than 128."""
_DIGEST_FIELD = bytes((_DIGEST_OR_TARGET, DIGEST_LEN))


def _named(name: bytes, digest: bytes, size: int) -> bytes:
    """A file's or directory's name, digest and size fields (a name shorter than 128 bytes)."""
    fields = b"\x0a" + _BYTE[len(name)] + name + _DIGEST_FIELD + digest
    return fields + b"\x18" + (_BYTE[size] if size < 0x80 else varint(size)) if size else fields


def encode_canonical(entries: Iterable[tuple[bytes, Node]]) -> bytes:
    """The canonical encoding of a valid Directory's entries (sorted by name): directories, files, symlinks.

    Every Directory an import makes is encoded here (its digest is taken over these bytes), so
    the usual entry (a name and an entry shorter than 128 bytes, a file or directory node) is
    written with table lookups and concatenation only; anything else by :func:`encode_entry`.
    """
    directories: list[bytes] = []
    files: list[bytes] = []
    symlinks: list[bytes] = []
    byte = _BYTE
    for name, node in entries:
        if len(name) < 0x80:
            if type(node) is FileNode:
                entry = _named(name, node.digest, node.size) + (b"\x20\x01" if node.executable else b"")
                files.append(b"\x12" + byte[len(entry)] + entry if len(entry) < 0x80 else delimited(0x12, entry))
                continue
            if type(node) is DirectoryNode:
                entry = _named(name, node.digest, node.size)
                directories.append(b"\x0a" + byte[len(entry)] + entry if len(entry) < 0x80 else delimited(0x0A, entry))
                continue
        tag, entry = encode_entry(name, node)
        (directories if tag == 0x0A else files if tag == 0x12 else symlinks).append(delimited(tag, entry))
    return b"".join(directories + files + symlinks)


def read_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """The shortest-form varint at ``pos`` and the position after it; ``(-1, pos)`` if there is none."""
    result = shift = 0
    while pos < end and shift < 64:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            if byte == 0 and shift:  # a longer form than needed: not canonical
                return -1, pos
            return (result, pos) if result <= U64_MAX else (-1, pos)
        shift += 7
    return -1, pos


def decode_canonical(data: bytes) -> list[tuple[bytes, Node]] | None:
    """The entries of canonical Directory bytes (directories, files, symlinks); ``None`` if not canonical."""
    fields = canonical_fields(data)
    if fields is None:
        return None
    entries: list[tuple[bytes, Node]] = []
    append = entries.append
    try:
        for name, kind, value, size, executable in fields:
            validate_name(name)
            if kind == 2:
                append((name, SymlinkNode(value)))
            else:
                append(
                    (
                        name,
                        DirectoryNode(B3Digest(value), size)
                        if kind == 0
                        else FileNode(B3Digest(value), size, executable),
                    )
                )
    except ValidationError:  # an invalid name or target: protobuf's path reports it
        return None
    return entries


Fields = tuple[bytes, int, bytes, int, bool]
"""An entry of canonical Directory bytes as it is stored: name, kind (0 directory, 1 file, 2 symlink),
digest (or target), size, executable."""


def canonical_fields(data: bytes) -> list[Fields] | None:
    """:func:`decode_canonical`'s entries as stored fields, in the lists' order; ``None`` if not canonical.

    Each list sorted with no repeats, every field as the deterministic encoding writes it,
    digests of 32 bytes, targets and names not empty; the names (and targets) are *not*
    validated here (a caller validating a whole directory's names at once is faster).
    """
    entries: list[Fields] = []
    append = entries.append
    end = len(data)
    pos = kind = 0
    tag, previous = 0x0A, b""  # the list's tag, the name before
    while pos < end:
        if data[pos] != tag:
            list_kind = _LIST_TAGS.get(data[pos], -1)
            if list_kind < kind:  # unknown field, or the lists out of order
                return None
            kind, tag, previous = list_kind, data[pos], b""
        length = data[pos + 1] if pos + 1 < end else 0x80
        if length < 0x80:
            pos += 2
        else:
            length, pos = read_varint(data, pos + 1, end)
            if length < 0:
                return None
        stop = pos + length
        if stop > end:
            return None
        # name = 1 comes first, never empty
        n = data[pos + 1] if pos + 2 <= stop else 0  # a name of 128 bytes or more (a two-byte length): protobuf's path
        if not 0 < n < 0x80 or data[pos] != _NAME:
            return None
        name = data[pos + 2 : pos + 2 + n]
        pos += 2 + n
        if name <= previous or pos > stop:  # sorted, no repeats
            return None
        previous = name
        if kind != 2:  # digest = 2: 32 bytes
            if pos + 2 + DIGEST_LEN > stop or data[pos] != _DIGEST_OR_TARGET or data[pos + 1] != DIGEST_LEN:
                return None
            value = data[pos + 2 : pos + 2 + DIGEST_LEN]
            pos += 2 + DIGEST_LEN
        else:  # target = 2, never empty
            if pos + 2 > stop or data[pos] != _DIGEST_OR_TARGET:
                return None
            n = data[pos + 1]
            if n >= 0x80:
                n, pos = read_varint(data, pos + 1, stop)
                if n < 0:
                    return None
            else:
                pos += 2
            value = data[pos : pos + n]
            pos += n
            if not value or pos != stop:
                return None
            append((name, 2, value, 0, False))
            continue
        size = 0
        executable = False
        if pos < stop and data[pos] == _SIZE:
            size = data[pos + 1] if pos + 2 <= stop else 0
            if 0 < size < 0x80:  # one byte (the common sizes in one or two bytes read here)
                pos += 2
            elif size >= 0x80 and pos + 3 <= stop and 0 < data[pos + 2] < 0x80:
                size = size & 0x7F | data[pos + 2] << 7
                pos += 3
            else:
                size, pos = read_varint(data, pos + 1, stop)
                if size <= 0:  # zero is left out, not written
                    return None
        if kind == 1 and pos < stop and data[pos] == _EXECUTABLE:
            if pos + 2 > stop or data[pos + 1] != 1:
                return None
            executable = True
            pos += 2
        if pos != stop:
            return None
        append((name, kind, value, size, executable))
    return entries

"""The NAR wire format: the ``str`` primitive, token constants and limits.

A NAR is a sequence of ``str`` values.  ``str(b)`` is the length of ``b`` as
an unsigned 64-bit little-endian integer, then ``b``, then zero bytes up to
the next multiple of 8.  Grammar::

    archive   = str("nix-archive-1") node
    node      = str("(") str("type") body str(")")
    body      = str("regular") [str("executable") str("")] str("contents") u64(size) data pad
              | str("symlink") str("target") str(target)
              | str("directory") entry*
    entry     = str("entry") str("(") str("name") str(name) str("node") node str(")")

File contents are the one place where the length and the bytes are not a
single ``str``: the length comes first, the contents follow unpadded-by-token
and are then padded like any other ``str``.  Entries are sorted strictly by
their raw name bytes.  The constants below are the encoded tokens, and a few
frequently used concatenations of them.
"""

from __future__ import annotations

import struct

__all__ = [
    "ENTRY_PREFIX",
    "MAX_FILE_SIZE",
    "MAX_TOKEN_LEN",
    "NAR_MAGIC",
    "NODE_DIRECTORY",
    "NODE_EXECUTABLE",
    "NODE_REGULAR",
    "NODE_SYMLINK",
    "OPEN_TYPE",
    "TOK_CLOSE",
    "TOK_CONTENTS",
    "TOK_DIRECTORY",
    "TOK_EMPTY",
    "TOK_ENTRY",
    "TOK_EXECUTABLE",
    "TOK_NAME",
    "TOK_NODE",
    "TOK_OPEN",
    "TOK_REGULAR",
    "TOK_SYMLINK",
    "TOK_TARGET",
    "TOK_TYPE",
    "MAGIC",
    "encode_str",
    "pad_len",
    "padding",
    "u64_le",
]

_U64 = struct.Struct("<Q")

MAX_TOKEN_LEN = 4096
"""Upper bound a reader accepts for the length of any ``str`` that is not file contents."""

MAX_FILE_SIZE = 2**63 - 1
"""Largest file size a reader accepts (anything above is treated as corrupt input)."""

_ZEROS = bytes(8)


def pad_len(n: int) -> int:
    """The number of zero bytes that follow ``n`` bytes of payload (0..7)."""
    return -n & 7


def padding(n: int) -> bytes:
    """The zero padding that follows ``n`` bytes of payload."""
    return _ZEROS[: -n & 7]


def u64_le(n: int) -> bytes:
    """``n`` as an unsigned 64-bit little-endian integer."""
    return _U64.pack(n)


def encode_str(data: bytes) -> bytes:
    """``str(data)``: length, bytes, zero padding to a multiple of 8."""
    return _U64.pack(len(data)) + data + _ZEROS[: -len(data) & 7]


MAGIC = b"nix-archive-1"
"""The archive's version string (not encoded)."""

NAR_MAGIC = encode_str(MAGIC)
TOK_OPEN = encode_str(b"(")
TOK_CLOSE = encode_str(b")")
TOK_TYPE = encode_str(b"type")
TOK_REGULAR = encode_str(b"regular")
TOK_EXECUTABLE = encode_str(b"executable")
TOK_EMPTY = encode_str(b"")
TOK_CONTENTS = encode_str(b"contents")
TOK_SYMLINK = encode_str(b"symlink")
TOK_TARGET = encode_str(b"target")
TOK_DIRECTORY = encode_str(b"directory")
TOK_ENTRY = encode_str(b"entry")
TOK_NAME = encode_str(b"name")
TOK_NODE = encode_str(b"node")

OPEN_TYPE = TOK_OPEN + TOK_TYPE
"""``(`` ``type``: how every node starts."""
NODE_REGULAR = OPEN_TYPE + TOK_REGULAR + TOK_CONTENTS
"""A non-executable file up to (not including) its size field."""
NODE_EXECUTABLE = OPEN_TYPE + TOK_REGULAR + TOK_EXECUTABLE + TOK_EMPTY + TOK_CONTENTS
"""An executable file up to (not including) its size field."""
NODE_SYMLINK = OPEN_TYPE + TOK_SYMLINK + TOK_TARGET
"""A symlink up to (not including) its target."""
NODE_DIRECTORY = OPEN_TYPE + TOK_DIRECTORY
"""A directory up to its first entry."""
ENTRY_PREFIX = TOK_ENTRY + TOK_OPEN + TOK_NAME
"""A directory entry up to (not including) its name."""

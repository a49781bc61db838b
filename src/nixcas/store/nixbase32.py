"""nixbase32: the base-32 text encoding Nix uses for hashes and store paths.

The alphabet drops ``e``, ``o``, ``u`` and ``t`` (to avoid accidental words).
Unlike RFC 4648 base32, the input is read as one *little-endian* number and the
text lists its 5-bit groups from the most significant one down, padded with
``0`` on the left to ``ceil(8n / 5)`` characters.  So ``encode(b"\\x1f") ==
"0z"``, a 20-byte digest is 32 characters and a 32-byte digest is 52.

Both directions run at C speed: encoding shifts the number into an RFC 4648
base32 frame and translates the alphabet; decoding translates into the digits
``int(_, 32)`` understands.
"""

from __future__ import annotations

import base64
import re

from nixcas.errors import NixbaseError

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
"""The 32 nixbase32 digits, in value order (also ASCII order)."""

# RFC 4648 base32 digits in value order, and the digits int(_, 32) reads.
_RFC4648 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_INT32 = "0123456789abcdefghijklmnopqrstuv"
_FROM_RFC4648 = str.maketrans(_RFC4648, ALPHABET)
_TO_INT32 = str.maketrans(ALPHABET, _INT32)
_VALID = re.compile(r"[0-9a-df-np-sv-z]*")
_ALPHABET_SET = frozenset(ALPHABET)


def encoded_len(n: int) -> int:
    """Number of nixbase32 characters for ``n`` bytes: ``ceil(8n / 5)``."""
    if n < 0:
        raise ValueError(f"negative length {n}")
    return (8 * n + 4) // 5


def decoded_len(n: int) -> int:
    """Number of bytes held by ``n`` nixbase32 characters (``floor(5n / 8)``).

    Only lengths with ``encoded_len(decoded_len(n)) == n`` are valid encodings.
    """
    if n < 0:
        raise ValueError(f"negative length {n}")
    return (5 * n) // 8


def encode(data: bytes) -> str:
    """Encode bytes as nixbase32 text (``encoded_len(len(data))`` characters)."""
    n = len(data)
    if n == 0:
        return ""
    length = encoded_len(n)
    bits = 5 * length
    # Big-endian frame of whole bytes whose first `bits` bits are the number.
    frame_bytes = (bits + 7) // 8
    shift = 8 * frame_bytes - bits
    value = int.from_bytes(data, "little")
    frame = (value << shift).to_bytes(frame_bytes, "big")
    rfc = base64.b32encode(frame).decode("ascii")
    return rfc[:length].translate(_FROM_RFC4648)


def _first_invalid(text: str) -> tuple[int, str]:
    for i, c in enumerate(text):
        if c not in _ALPHABET_SET:
            return i, c
    raise AssertionError("unreachable: no invalid character")  # pragma: no cover


def decode(text: str | bytes) -> bytes:
    """Decode nixbase32 text.

    Raises :class:`~nixcas.errors.NixbaseError` on a character outside
    :data:`ALPHABET`, a length no byte count encodes to, or set bits beyond the
    last byte (e.g. ``"zz"``, ``"c0"``, ``"0"``, ``"0zz"`` are all invalid).
    """
    if not isinstance(text, str):
        raw = bytes(text)
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError as e:
            raise NixbaseError(f"invalid nixbase32 {raw[:120]!r}: non-ASCII byte at position {e.start}") from None
    length = len(text)
    n = decoded_len(length)
    if encoded_len(n) != length:
        raise NixbaseError(f"invalid nixbase32 {text[:120]!r}: length {length} is not the encoding of any byte count")
    if _VALID.fullmatch(text) is None:
        pos, char = _first_invalid(text)
        raise NixbaseError(
            f"invalid nixbase32 {text[:120]!r}: character {char!r} at position {pos} is not in the alphabet {ALPHABET}"
        )
    if n == 0:
        return b""
    value = int(text.translate(_TO_INT32), 32)
    if value >> (8 * n):
        raise NixbaseError(f"invalid nixbase32 {text[:120]!r}: non-zero bits beyond the last of {n} bytes")
    return value.to_bytes(n, "little")


def is_valid(text: str | bytes) -> bool:
    """True if :func:`decode` would accept ``text``."""
    try:
        decode(text)
    except NixbaseError:
        return False
    return True


__all__ = ["ALPHABET", "decode", "decoded_len", "encode", "encoded_len", "is_valid"]

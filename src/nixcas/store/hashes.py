"""Nix hashes (``sha256:<nixbase32>``, SRI ``sha256-<base64>``, hex) and content addresses.

:class:`NixHash` is an algorithm plus a raw digest; it parses every textual
form Nix accepts and renders the canonical ones.  :class:`CAHash` is a
content address (``fixed:r:…``, ``fixed:…``, ``text:sha256:…``), the ``CA``
field of a narinfo / PathInfo.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re

from nixcas._record import Record
from nixcas.errors import NixbaseError
from nixcas.store import nixbase32

TYPE_CHECKING = False  # not typing's: `path-info` loads nothing else of it
if TYPE_CHECKING:
    from hashlib import _Hash


_set = object.__setattr__


class HashAlgo(enum.StrEnum):
    """A hash algorithm Nix knows, named as in Nix hash strings."""

    MD5 = "md5"
    SHA1 = "sha1"
    SHA256 = "sha256"
    SHA512 = "sha512"

    @property
    def digest_size(self) -> int:
        """Digest length in bytes (16, 20, 32, 64)."""
        return _DIGEST_SIZES[self]

    def new(self) -> _Hash:
        """A fresh :mod:`hashlib` object for this algorithm."""
        import hashlib  # loaded by what hashes, not by what only reads hashes

        return hashlib.new(self.value, usedforsecurity=False)

    @classmethod
    def parse(cls, name: str) -> HashAlgo:
        """The algorithm called ``name`` (case-sensitive, like Nix); :class:`NixbaseError` otherwise."""
        try:
            return cls(name)
        except ValueError:
            raise NixbaseError(
                f"unknown hash algorithm {name[:60]!r} (expected one of md5, sha1, sha256, sha512)"
            ) from None


_DIGEST_SIZES: dict[HashAlgo, int] = {
    HashAlgo.MD5: 16,
    HashAlgo.SHA1: 20,
    HashAlgo.SHA256: 32,
    HashAlgo.SHA512: 64,
}

_HEX = re.compile(r"[0-9a-fA-F]*")


def _base64_len(n: int) -> int:
    return (n + 2) // 3 * 4


def _decode_base64(text: str, algo: HashAlgo, what: str) -> bytes:
    size = algo.digest_size
    if len(text) != _base64_len(size):
        raise NixbaseError(
            f"invalid {what} {text[:150]!r}: a {algo} base64 digest is {_base64_len(size)} characters, got {len(text)}"
        )
    try:
        digest = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise NixbaseError(f"invalid {what} {text[:150]!r}: bad base64 ({e})") from None
    if len(digest) != size:  # pragma: no cover - a 4-aligned string of the right length decodes to size
        raise NixbaseError(f"invalid {what} {text[:150]!r}: base64 decodes to {len(digest)} bytes, not {size}")
    return digest


def _decode_any(text: str, algo: HashAlgo, what: str = "hash") -> bytes:
    """Decode a bare digest (hex, nixbase32 or padded base64), recognised by its length."""
    size = algo.digest_size
    length = len(text)
    if length == 2 * size:
        if _HEX.fullmatch(text) is None:
            raise NixbaseError(f"invalid {what} {text[:150]!r}: not hexadecimal")
        return bytes.fromhex(text)
    if length == nixbase32.encoded_len(size):
        try:
            return nixbase32.decode(text)
        except NixbaseError as e:
            raise NixbaseError(f"invalid {what}: {e}") from None
    if length == _base64_len(size):
        return _decode_base64(text, algo, what)
    raise NixbaseError(
        f"invalid {what} {text[:150]!r}: length {length} fits no encoding of a {algo} digest "
        f"(hex {2 * size}, nixbase32 {nixbase32.encoded_len(size)}, base64 {_base64_len(size)})"
    )


class NixHash(Record):
    """A digest together with its algorithm, as in Nix's ``Hash``."""

    __slots__ = ("algo", "digest")
    __match_args__ = ("algo", "digest")
    algo: HashAlgo
    digest: bytes

    def __init__(self, algo: HashAlgo | str, digest: bytes) -> None:
        if not isinstance(algo, HashAlgo):
            algo = HashAlgo.parse(algo)
        if not isinstance(digest, bytes):
            digest = bytes(digest)
        if len(digest) != algo.digest_size:
            raise NixbaseError(f"a {algo} digest is {algo.digest_size} bytes, got {len(digest)}")
        _set(self, "algo", algo)
        _set(self, "digest", digest)

    @classmethod
    def of(cls, algo: HashAlgo, data: bytes) -> NixHash:
        """Hash ``data`` with ``algo``."""
        h = algo.new()
        h.update(data)
        return cls(algo, h.digest())

    @classmethod
    def parse(cls, text: str, algo: HashAlgo | None = None) -> NixHash:
        """Parse any textual form Nix accepts.

        * ``<algo>:<digest>`` where the digest is hex (either case), nixbase32
          or padded base64, told apart by length;
        * SRI ``<algo>-<base64>``;
        * a bare digest in one of the three encodings, only when ``algo`` is given.

        If ``algo`` is given, a prefixed/SRI hash must name that algorithm.
        Raises :class:`~nixcas.errors.NixbaseError`.
        """
        if not isinstance(text, str):
            raise NixbaseError(f"a hash must be text, got {type(text).__name__}")
        colon = text.find(":")
        dash = text.find("-")
        if colon >= 0:
            found = HashAlgo.parse(text[:colon])
            _check_algo(text, found, algo)
            return cls(found, _decode_any(text[colon + 1 :], found))
        if dash >= 0:
            found = HashAlgo.parse(text[:dash])
            _check_algo(text, found, algo)
            return cls(found, _decode_base64(text[dash + 1 :], found, "SRI hash"))
        if algo is None:
            raise NixbaseError(
                f"invalid hash {text[:150]!r}: no algorithm given (expected '<algo>:<digest>' or '<algo>-<base64>')"
            )
        algo = HashAlgo.parse(algo)
        return cls(algo, _decode_any(text, algo))

    def nix32(self) -> str:
        """The digest in nixbase32, without the algorithm."""
        return nixbase32.encode(self.digest)

    def hex(self) -> str:
        """The digest in lower-case hex, without the algorithm."""
        return self.digest.hex()

    def base64(self) -> str:
        """The digest in padded standard base64, without the algorithm."""
        return base64.b64encode(self.digest).decode("ascii")

    def to_nix32(self) -> str:
        """``<algo>:<nixbase32>``, e.g. ``sha256:0h40zg…`` (Nix's default rendering)."""
        return f"{self.algo}:{self.nix32()}"

    def to_base16(self) -> str:
        """``<algo>:<hex>``."""
        return f"{self.algo}:{self.hex()}"

    def to_sri(self) -> str:
        """SRI form ``<algo>-<base64>``."""
        return f"{self.algo}-{self.base64()}"

    def __str__(self) -> str:
        return self.to_nix32()

    def __repr__(self) -> str:
        return f"NixHash({self.to_nix32()!r})"


def _check_algo(text: str, found: HashAlgo, expected: HashAlgo | None) -> None:
    if expected is not None and found != expected:
        raise NixbaseError(f"invalid hash {text[:150]!r}: expected a {expected} hash, got {found}")


class CAKind(enum.Enum):
    """How content was addressed; the value is the prefix of the textual CA form."""

    NAR = "fixed:r:"
    """Fixed-output, recursive: the hash is over the NAR serialisation."""
    FLAT = "fixed:"
    """Fixed-output, flat: the hash is over the contents of a single regular file."""
    TEXT = "text:"
    """Text (``builtins.toFile``, ``.drv`` files): sha256 of the file contents."""


# NARInfo.CA.Hash enum of the tvix/snix store protocol.
_PROTO_TYPES: dict[tuple[CAKind, HashAlgo], int] = {
    (CAKind.NAR, HashAlgo.SHA256): 0,
    (CAKind.NAR, HashAlgo.SHA1): 1,
    (CAKind.NAR, HashAlgo.SHA512): 2,
    (CAKind.NAR, HashAlgo.MD5): 3,
    (CAKind.TEXT, HashAlgo.SHA256): 4,
    (CAKind.FLAT, HashAlgo.SHA1): 5,
    (CAKind.FLAT, HashAlgo.MD5): 6,
    (CAKind.FLAT, HashAlgo.SHA256): 7,
    (CAKind.FLAT, HashAlgo.SHA512): 8,
}
_FROM_PROTO_TYPES: dict[int, tuple[CAKind, HashAlgo]] = {v: k for k, v in _PROTO_TYPES.items()}


class CAHash(Record):
    """A content address: a :class:`CAKind` and the hash it was computed with.

    ``TEXT`` only allows sha256 (checked on construction).
    """

    __slots__ = ("hash", "kind")
    __match_args__ = ("kind", "hash")
    kind: CAKind
    hash: NixHash

    def __init__(self, kind: CAKind, hash: NixHash) -> None:
        if kind is CAKind.TEXT and hash.algo is not HashAlgo.SHA256:
            raise NixbaseError(f"a text content address must use sha256, not {hash.algo}")
        _set(self, "kind", kind)
        _set(self, "hash", hash)

    @classmethod
    def nar(cls, algo: HashAlgo, digest: bytes) -> CAHash:
        """``fixed:r:<algo>:…`` from a raw NAR digest."""
        return cls(CAKind.NAR, NixHash(algo, digest))

    @classmethod
    def flat(cls, algo: HashAlgo, digest: bytes) -> CAHash:
        """``fixed:<algo>:…`` from a raw flat-file digest."""
        return cls(CAKind.FLAT, NixHash(algo, digest))

    @classmethod
    def text(cls, sha256: bytes) -> CAHash:
        """``text:sha256:…`` from the raw sha256 of the contents."""
        return cls(CAKind.TEXT, NixHash(HashAlgo.SHA256, sha256))

    @classmethod
    def parse(cls, text: str) -> CAHash:
        """Parse ``fixed:r:<algo>:<digest>``, ``fixed:<algo>:<digest>`` or ``text:sha256:<digest>``.

        The digest may be nixbase32 (canonical), hex or padded base64, like Nix
        accepts; SRI is not accepted inside a content address (neither does Nix).
        Raises :class:`~nixcas.errors.NixbaseError`.
        """
        if not isinstance(text, str):
            raise NixbaseError(f"a content address must be text, got {type(text).__name__}")
        for kind in (CAKind.NAR, CAKind.FLAT, CAKind.TEXT):
            if text.startswith(kind.value):
                rest = text[len(kind.value) :]
                break
        else:
            raise NixbaseError(
                f"invalid content address {text[:150]!r}: expected 'fixed:r:<algo>:<hash>', "
                "'fixed:<algo>:<hash>' or 'text:sha256:<hash>'"
            )
        algo_name, colon, encoded = rest.partition(":")
        if not colon:
            raise NixbaseError(f"invalid content address {text[:150]!r}: expected '<algo>:<hash>' after {kind.value!r}")
        algo = HashAlgo.parse(algo_name)
        if kind is CAKind.TEXT and algo is not HashAlgo.SHA256:
            raise NixbaseError(f"invalid content address {text[:150]!r}: a text content address must use sha256")
        try:
            digest = _decode_any(encoded, algo)
        except NixbaseError as e:
            raise NixbaseError(f"invalid content address {text[:150]!r}: {e}") from None
        return cls(kind, NixHash(algo, digest))

    @property
    def proto_type(self) -> int:
        """The ``NARInfo.CA.Hash`` enum value of the tvix/snix store protocol."""
        return _PROTO_TYPES[(self.kind, self.hash.algo)]

    @classmethod
    def from_proto(cls, proto_type: int, digest: bytes) -> CAHash:
        """Build from a ``NARInfo.CA`` message's ``type`` and raw ``digest``."""
        try:
            kind, algo = _FROM_PROTO_TYPES[proto_type]
        except KeyError:
            raise NixbaseError(f"unknown NARInfo.CA hash type {proto_type}") from None
        return cls(kind, NixHash(algo, digest))

    def __str__(self) -> str:
        return f"{self.kind.value}{self.hash.to_nix32()}"

    def __repr__(self) -> str:
        return f"CAHash({str(self)!r})"


__all__ = ["CAHash", "CAKind", "HashAlgo", "NixHash"]

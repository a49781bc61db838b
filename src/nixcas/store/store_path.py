"""Store paths (``/nix/store/<nixbase32 digest>-<name>``) and how Nix computes them.

A store path is a 20-byte digest and a name.  For content-addressed paths the
digest is derived from a *fingerprint*::

    <type>:sha256:<hex inner digest>:/nix/store:<name>

hashed with sha256 and XOR-folded to 20 bytes (:func:`compress_hash`).  The
``type`` and inner digest depend on the content address
(:func:`build_ca_path`):

==========================  ===============================  =========================================
content address             type                             inner digest
==========================  ===============================  =========================================
``text:sha256:H``           ``text[:<ref>…]``                H (sha256 of the contents)
``fixed:r:sha256:H``        ``source[:<ref>…][:self]``       H (sha256 of the NAR)
any other ``fixed:…``       ``output:out`` (no references)   sha256(``fixed:out:[r:]<algo>:<hex>:``)
==========================  ===============================  =========================================

References are listed as absolute paths in sorted order, without duplicates.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

from nixcas._record import Record
from nixcas.errors import NixbaseError, StorePathError
from nixcas.store import nixbase32
from nixcas.store.hashes import CAHash, CAKind, HashAlgo, NixHash

STORE_DIR = "/nix/store"
"""The (hard-coded) store directory."""
STORE_DIR_PREFIX = STORE_DIR + "/"
DIGEST_SIZE = 20
"""Bytes in a store path digest."""
ENCODED_DIGEST_LEN = nixbase32.encoded_len(DIGEST_SIZE)
"""Characters in the nixbase32 hash part of a basename (32)."""
MAX_NAME_LEN = 211
"""Longest allowed name, in bytes."""
MIN_BASENAME_LEN = ENCODED_DIGEST_LEN + 2
"""Shortest basename: hash part, ``-`` and a one-byte name (34)."""

_ALLOWED_DESCRIPTION = "A-Z a-z 0-9 + - _ ? = ."
_NAME_RE = re.compile(rb"[A-Za-z0-9+\-_?=.]+")
_BAD_NAME_CHAR = re.compile(rb"[^A-Za-z0-9+\-_?=.]")
_STORE_DIR_PREFIX_B = STORE_DIR_PREFIX.encode()


def _show(value: str | bytes) -> str:
    text = value if isinstance(value, str) else value.decode("utf-8", "backslashreplace")
    if len(text) > 300:
        text = text[:300] + "…"
    return repr(text)


def validate_name(name: str | bytes) -> str:
    """Check a store path name and return it as ``str``.

    A name is 1 to 211 bytes, each one of ``A-Z a-z 0-9 + - _ ? = .`` (a leading
    ``.`` is fine).  Raises :class:`~nixcas.errors.StorePathError` naming the
    rule that was broken.
    """
    if isinstance(name, str):
        try:
            raw = name.encode("ascii")
        except UnicodeEncodeError as e:
            raise StorePathError(
                f"invalid store path name {_show(name)}: character {name[e.start]!r} at position {e.start} "
                f"is not allowed (allowed: {_ALLOWED_DESCRIPTION})"
            ) from None
    elif isinstance(name, bytes | bytearray | memoryview):
        raw = bytes(name)
    else:
        raise StorePathError(f"a store path name must be str or bytes, got {type(name).__name__}")
    if not raw:
        raise StorePathError("invalid store path name '': a name must not be empty")
    if len(raw) > MAX_NAME_LEN:
        raise StorePathError(
            f"invalid store path name {_show(name)}: it is {len(raw)} bytes long, at most {MAX_NAME_LEN} are allowed"
        )
    if _NAME_RE.fullmatch(raw) is None:
        match = _BAD_NAME_CHAR.search(raw)
        assert match is not None
        pos = match.start()
        if isinstance(name, str):
            what = f"character {name[pos]!r}"
        elif raw[pos] < 0x80:
            what = f"character {chr(raw[pos])!r}"
        else:
            what = f"byte 0x{raw[pos]:02x}"
        raise StorePathError(
            f"invalid store path name {_show(name)}: {what} at position {pos} is not allowed "
            f"(allowed: {_ALLOWED_DESCRIPTION})"
        )
    return name if isinstance(name, str) else raw.decode("ascii")


@functools.total_ordering
class StorePath(Record):
    """A store path: 20-byte digest plus name.

    Ordering matches the order of the basenames (digest compared as its
    nixbase32 text, i.e. as reversed bytes, then the name), which is also the
    order of the absolute paths.
    """

    __match_args__ = ("digest", "name")
    digest: bytes
    name: str

    def __init__(self, digest: bytes, name: str | bytes) -> None:
        if not isinstance(digest, bytes):
            if not isinstance(digest, bytearray | memoryview):
                raise StorePathError(f"a store path digest must be bytes, got {type(digest).__name__}")
            digest = bytes(digest)
        if len(digest) != DIGEST_SIZE:
            raise StorePathError(f"a store path digest is {DIGEST_SIZE} bytes, got {len(digest)}")
        fields = self.__dict__
        fields["digest"] = digest
        fields["name"] = validate_name(name)

    @classmethod
    def from_basename(cls, s: str | bytes) -> StorePath:
        """Parse ``<32 nixbase32 chars>-<name>``; raises :class:`~nixcas.errors.StorePathError`."""
        raw = s.encode("utf-8", "surrogatepass") if isinstance(s, str) else bytes(s)
        if len(raw) < MIN_BASENAME_LEN:
            raise StorePathError(
                f"invalid store path basename {_show(s)}: too short ({len(raw)} bytes), a basename is "
                f"{ENCODED_DIGEST_LEN} hash characters, '-' and a name of at least one byte"
            )
        hash_part = raw[:ENCODED_DIGEST_LEN]
        try:
            digest = nixbase32.decode(hash_part)
        except NixbaseError as e:
            raise StorePathError(f"invalid store path basename {_show(s)}: bad hash part: {e}") from None
        if raw[ENCODED_DIGEST_LEN] != 0x2D:  # "-"
            raise StorePathError(
                f"invalid store path basename {_show(s)}: expected '-' at position {ENCODED_DIGEST_LEN} "
                "after the hash part"
            )
        name: str | bytes = s[ENCODED_DIGEST_LEN + 1 :] if isinstance(s, str) else raw[ENCODED_DIGEST_LEN + 1 :]
        path = cls(digest, validate_name(name))
        # Seed the cached nixbase32 text: it is the (validated) hash part we just read.
        path.__dict__["hash_part"] = hash_part.decode("ascii")
        return path

    @classmethod
    def from_absolute_path(cls, s: str | bytes) -> StorePath:
        """Parse ``/nix/store/<basename>`` (nothing may follow the basename)."""
        raw = s.encode("utf-8", "surrogatepass") if isinstance(s, str) else bytes(s)
        if not raw.startswith(_STORE_DIR_PREFIX_B):
            raise StorePathError(f"invalid store path {_show(s)}: it does not start with {STORE_DIR_PREFIX!r}")
        rest = raw[len(_STORE_DIR_PREFIX_B) :]
        slash = rest.find(b"/")
        if slash >= 0:
            raise StorePathError(
                f"invalid store path {_show(s)}: extra path components after the store path "
                f"{_show(rest[:slash])} (a store path is exactly {STORE_DIR_PREFIX}<hash>-<name>)"
            )
        basename: str | bytes = s[len(STORE_DIR_PREFIX) :] if isinstance(s, str) else rest
        return cls.from_basename(basename)

    @classmethod
    def parse(cls, s: str | bytes) -> StorePath:
        """Parse either an absolute path (starting with ``/``) or a basename."""
        if s.startswith("/") if isinstance(s, str) else bytes(s).startswith(b"/"):
            return cls.from_absolute_path(s)
        return cls.from_basename(s)

    @functools.cached_property
    def hash_part(self) -> str:
        """The digest in nixbase32 (32 characters)."""
        return nixbase32.encode(self.digest)

    @property
    def basename(self) -> str:
        """``<nixbase32 digest>-<name>``."""
        return f"{self.hash_part}-{self.name}"

    @property
    def absolute_path(self) -> str:
        """``/nix/store/<nixbase32 digest>-<name>``."""
        return f"{STORE_DIR_PREFIX}{self.hash_part}-{self.name}"

    def _key(self) -> tuple[bytes, str]:
        return self.digest[::-1], self.name

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, StorePath):
            return NotImplemented
        return self._key() < other._key()

    def __str__(self) -> str:
        return self.absolute_path

    def __repr__(self) -> str:
        return f"StorePath({self.absolute_path!r})"


def compress_hash(data: bytes, size: int = DIGEST_SIZE) -> bytes:
    """XOR-fold ``data`` into ``size`` bytes: ``out[i % size] ^= data[i]``."""
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    out = bytearray(size)
    for i, b in enumerate(data):
        out[i % size] ^= b
    return bytes(out)


def make_store_path(path_type: str, inner_digest: bytes, name: str) -> StorePath:
    """The store path of fingerprint ``<path_type>:sha256:<hex inner>:/nix/store:<name>``.

    ``inner_digest`` is a raw sha256 digest.  This is the primitive under
    :func:`build_ca_path`.
    """
    name = validate_name(name)
    if len(inner_digest) != HashAlgo.SHA256.digest_size:
        raise StorePathError(f"the inner digest of a store path fingerprint is 32 bytes, got {len(inner_digest)}")
    fingerprint = f"{path_type}:sha256:{inner_digest.hex()}:{STORE_DIR}:{name}"
    import hashlib  # loaded by what computes store paths, not by what only reads them

    return StorePath(compress_hash(hashlib.sha256(fingerprint.encode()).digest()), name)


def _reference_suffix(references: Iterable[StorePath]) -> str:
    refs = set()
    for ref in references:
        if not isinstance(ref, StorePath):
            raise StorePathError(f"a reference must be a StorePath, got {type(ref).__name__}")
        refs.add(ref.absolute_path)
    return "".join(f":{p}" for p in sorted(refs))


def build_ca_path(
    name: str,
    ca: CAHash,
    references: Iterable[StorePath] = (),
    self_reference: bool = False,
) -> StorePath:
    """The store path Nix gives content with content address ``ca``.

    * ``text:sha256:H`` → type ``text:<refs>`` (a self reference is an error);
    * ``fixed:r:sha256:H`` → type ``source:<refs>[:self]``;
    * every other fixed hash → type ``output:out`` over
      ``sha256("fixed:out:[r:]<algo>:<hex>:")``; references are an error.

    References are given as absolute paths, sorted, duplicates dropped.
    Raises :class:`~nixcas.errors.StorePathError` for a bad name or a
    disallowed reference.
    """
    name = validate_name(name)
    if ca.kind is CAKind.TEXT:
        if self_reference:
            raise StorePathError(f"text path {name!r} cannot refer to itself")
        return make_store_path("text" + _reference_suffix(references), ca.hash.digest, name)
    if ca.kind is CAKind.NAR and ca.hash.algo is HashAlgo.SHA256:
        path_type = "source" + _reference_suffix(references)
        if self_reference:
            path_type += ":self"
        return make_store_path(path_type, ca.hash.digest, name)
    refs = list(references)
    if refs or self_reference:
        raise StorePathError(
            f"fixed-output path {name!r} with content address {ca.kind.value}{ca.hash.algo} cannot have references "
            "(only text and fixed:r:sha256 paths can)"
        )
    method = "r:" if ca.kind is CAKind.NAR else ""
    import hashlib

    inner = hashlib.sha256(f"fixed:out:{method}{ca.hash.to_base16()}:".encode()).digest()
    return make_store_path("output:out", inner, name)


def build_text_path(name: str, content: bytes, references: Iterable[StorePath] = ()) -> StorePath:
    """The path of a text file (``builtins.toFile``, ``.drv``) with these contents and references."""
    return build_ca_path(name, CAHash(CAKind.TEXT, NixHash.of(HashAlgo.SHA256, content)), references)


def build_nar_path(name: str, nar_sha256: bytes, references: Iterable[StorePath] = ()) -> StorePath:
    """The path ``nix-store --add`` gives a tree whose NAR has sha256 ``nar_sha256``."""
    return build_ca_path(name, CAHash(CAKind.NAR, NixHash(HashAlgo.SHA256, nar_sha256)), references)


__all__ = [
    "DIGEST_SIZE",
    "ENCODED_DIGEST_LEN",
    "MAX_NAME_LEN",
    "MIN_BASENAME_LEN",
    "STORE_DIR",
    "STORE_DIR_PREFIX",
    "StorePath",
    "build_ca_path",
    "build_nar_path",
    "build_text_path",
    "compress_hash",
    "make_store_path",
    "validate_name",
]

"""The ``.narinfo`` text format of Nix binary caches, and the fingerprint Nix signs.

A narinfo is a list of ``Key: value`` lines (reference §6.7)::

    StorePath: /nix/store/<hash>-<name>
    URL: nar/<file hash>.nar.xz
    Compression: xz
    FileHash: sha256:<nixbase32>
    FileSize: 1234
    NarHash: sha256:<nixbase32>
    NarSize: 5678
    References: <basename> <basename>
    Deriver: <basename>.drv
    Sig: <key name>:<base64>
    CA: fixed:r:sha256:<nixbase32>

:meth:`NarInfo.parse` is strict about what it understands (duplicate fields,
bad hashes, store paths, sizes and signatures are
:class:`~nixcas.errors.PathInfoError`) and tolerant of keys it does not know.
:meth:`NarInfo.render` writes Nix's field order.  The *fingerprint*
``1;<store path>;sha256:<nixbase32 NAR hash>;<NAR size>;<references>`` is what
ed25519 signatures are computed over (:mod:`nixcas.store.signing`); Nix joins
the references in the order of its sorted path sets, so
:func:`fingerprint` sorts them too.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from nixcas.castore.nodes import Node
from nixcas.errors import NixbaseError, PathInfoError, StorePathError
from nixcas.store import nixbase32
from nixcas.store.compression import COMPRESSIONS, UnsupportedCompression
from nixcas.store.hashes import CAHash, HashAlgo, NixHash
from nixcas.store.pathinfo.model import PathInfo, Signature, check_path_info_fields
from nixcas.store.store_path import ENCODED_DIGEST_LEN, StorePath
from nixcas.urls import is_decimal

__all__ = [
    "COMPRESSIONS",
    "MAX_NARINFO_SIZE",
    "NarInfo",
    "fingerprint",
    "parse_nar_file_name",
    "parse_narinfo_name",
]

MAX_NARINFO_SIZE: Final = 2 << 20
"""Largest narinfo accepted (bytes); tvix's nar-bridge uses the same limit for uploads."""

DEFAULT_COMPRESSION: Final = "bzip2"
"""What a narinfo without a ``Compression`` line means (Nix's historical default)."""

_DRV = ".drv"
_UNKNOWN_DERIVER = "unknown-deriver"
_NAR_HASH_LEN = nixbase32.encoded_len(32)
_URL = re.compile(r"[!-~]+")
"""A ``URL`` value: printable ASCII without spaces (anything else is percent-encoded)."""
_WORD = re.compile(r"[A-Za-z0-9._+-]+")
"""A ``Compression`` or ``System`` value (``xz``, ``x86_64-linux``)."""


def fingerprint(store_path: StorePath, nar_sha256: bytes, nar_size: int, references: Iterable[StorePath]) -> bytes:
    """``1;<path>;sha256:<nixbase32>;<size>;<comma-joined sorted reference paths>`` — what Nix signs."""
    refs = ",".join(sorted(str(r) for r in references))
    return f"1;{store_path};sha256:{nixbase32.encode(nar_sha256)};{nar_size};{refs}".encode()


def parse_narinfo_name(name: str) -> bytes:
    """``<32 nixbase32 chars>.narinfo`` → the 20-byte store path digest; :class:`PathInfoError` otherwise."""
    return parse_hashed_name(name, "narinfo", PathInfoError)


def parse_hashed_name(name: str, ext: str, error: type[Exception]) -> bytes:
    """``<32 nixbase32 chars>.<ext>`` (a narinfo, a listing) → the 20-byte store path digest; ``error`` otherwise."""
    hash_part, dot, got = name.partition(".")
    if got != ext or not dot or len(hash_part) != ENCODED_DIGEST_LEN:
        raise error(f"invalid {_KIND.get(ext, ext)} name {name[:100]!r}: expected <32 nixbase32 characters>.{ext}")
    try:
        return nixbase32.decode(hash_part)
    except NixbaseError as e:
        raise error(f"invalid {_KIND.get(ext, ext)} name {name[:100]!r}: {e}") from None


_KIND = {"ls": "listing"}


def parse_nar_file_name(name: str) -> tuple[bytes, str]:
    """``<52 nixbase32 chars>.nar[.xz|.bz2|.zst|.gz]`` → (32-byte SHA-256, compression name).

    The hash is that of the file (the compressed bytes; for ``.nar`` the NAR
    itself), as Nix names the files it uploads.  An unknown suffix is a
    :class:`~nixcas.store.compression.UnsupportedCompression`.
    """
    hash_part, dot, ext = name.partition(".")
    if not dot or len(hash_part) != _NAR_HASH_LEN or not (ext == "nar" or ext.startswith("nar.")):
        raise PathInfoError(f"invalid NAR file name {name[:100]!r}: expected <52 nixbase32 characters>.nar[.xz|…]")
    try:
        digest = nixbase32.decode(hash_part)
    except NixbaseError as e:
        raise PathInfoError(f"invalid NAR file name {name[:100]!r}: {e}") from None
    suffix = ext.removeprefix("nar")
    for compression, known in COMPRESSIONS.items():
        if suffix == known:
            return digest, compression
    known_suffixes = ", ".join(s or ".nar" for s in COMPRESSIONS.values())
    raise UnsupportedCompression(f"unknown compression {suffix[:20]!r} in NAR file name (known: {known_suffixes})")


def _int(key: str, value: str) -> int:
    if not is_decimal(value) or len(value) > 20 or int(value) >= 1 << 64:
        raise PathInfoError(f"invalid narinfo: {key}: {value[:40]!r} is not a size")
    return int(value)


def _check_size(key: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 64:
        raise PathInfoError(f"invalid narinfo: {key}: {str(value)[:40]!r} is not a size")


def _shown(value: object) -> str:
    """A field value for a message: at most 100 characters, control characters escaped."""
    return repr(value[:100] if isinstance(value, str) else value)


def _sha256(key: str, value: str) -> NixHash:
    try:
        return NixHash.parse(value, HashAlgo.SHA256)
    except NixbaseError as e:
        raise PathInfoError(f"invalid narinfo: {key}: {e}") from None


def _store_path(key: str, value: str, *, absolute: bool) -> StorePath:
    try:
        return StorePath.from_absolute_path(value) if absolute else StorePath.from_basename(value)
    except StorePathError as e:
        raise PathInfoError(f"invalid narinfo: {key}: {e}") from None


@dataclass(frozen=True)
class NarInfo:
    """One narinfo.  ``compression`` is ``None`` when the line was absent (meaning bzip2)."""

    store_path: StorePath
    url: str
    nar_sha256: bytes
    nar_size: int
    references: tuple[StorePath, ...] = ()
    compression: str | None = "none"
    file_hash: NixHash | None = None
    file_size: int | None = None
    deriver: StorePath | None = None
    """The deriver, named without ``.drv`` (as :class:`PathInfo` keeps it)."""
    system: str | None = None
    signatures: tuple[Signature, ...] = ()
    ca: CAHash | None = None

    def __post_init__(self) -> None:
        """Every field is one narinfo line's worth: no value can start a line of its own."""
        object.__setattr__(self, "references", tuple(self.references))
        object.__setattr__(self, "signatures", tuple(self.signatures))
        try:
            check_path_info_fields(
                self.store_path, self.references, self.nar_size, self.nar_sha256, self.signatures, self.deriver, self.ca
            )
        except PathInfoError as e:
            raise PathInfoError(f"invalid narinfo: {e}") from None
        if not isinstance(self.url, str) or not _URL.fullmatch(self.url):
            raise PathInfoError(f"invalid narinfo: URL {_shown(self.url)} is not printable ASCII without spaces")
        for key, value in (("Compression", self.compression), ("System", self.system)):
            if value is not None and not (isinstance(value, str) and _WORD.fullmatch(value)):
                raise PathInfoError(f"invalid narinfo: {key} {_shown(value)} is not a word of A-Z a-z 0-9 . _ + -")
        if self.file_size is not None:
            _check_size("FileSize", self.file_size)
        if self.file_hash is not None and not isinstance(self.file_hash, NixHash):
            raise PathInfoError(f"invalid narinfo: FileHash is a {type(self.file_hash).__name__}, not a NixHash")

    @property
    def nar_hash(self) -> NixHash:
        return NixHash(HashAlgo.SHA256, self.nar_sha256)

    @property
    def effective_compression(self) -> str:
        """The compression of the NAR file: the field, or bzip2 when it was absent."""
        return DEFAULT_COMPRESSION if self.compression is None else self.compression

    def fingerprint(self) -> bytes:
        """The text its signatures are computed over."""
        return fingerprint(self.store_path, self.nar_sha256, self.nar_size, self.references)

    # -- text ---------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str) -> NarInfo:
        """Parse a narinfo; :class:`~nixcas.errors.PathInfoError` names the first problem."""
        if len(text) > MAX_NARINFO_SIZE:
            raise PathInfoError(f"invalid narinfo: larger than {MAX_NARINFO_SIZE} bytes")
        fields: dict[str, str] = {}
        sigs: list[Signature] = []
        for number, line in enumerate(text.split("\n"), 1):
            if not line:
                continue
            key, colon, value = line.partition(":")
            if not colon or not key or (value and not value.startswith(" ")):
                raise PathInfoError(f"invalid narinfo: line {number} {line[:80]!r} is not 'Key: value'")
            value = value[1:]
            if key == "Sig":
                try:
                    sigs.append(Signature.parse(value))
                except PathInfoError as e:
                    raise PathInfoError(f"invalid narinfo: Sig: {e}") from None
                continue
            if key in fields:
                raise PathInfoError(f"invalid narinfo: field {key} given twice")
            fields[key] = value
        for required in ("StorePath", "URL", "NarHash", "NarSize"):
            if not fields.get(required):
                raise PathInfoError(f"invalid narinfo: missing {required}")
        nar_hash = _sha256("NarHash", fields["NarHash"])
        compression = fields.get("Compression")
        if compression == "":
            raise PathInfoError("invalid narinfo: empty Compression")
        refs = fields.get("References", "")
        deriver_text = fields.get("Deriver")
        deriver: StorePath | None = None
        if deriver_text and deriver_text != _UNKNOWN_DERIVER:
            if not deriver_text.endswith(_DRV):
                raise PathInfoError(f"invalid narinfo: Deriver {deriver_text[:100]!r} does not end in .drv")
            deriver = _store_path("Deriver", deriver_text.removesuffix(_DRV), absolute=False)
        ca: CAHash | None = None
        if fields.get("CA"):
            try:
                ca = CAHash.parse(fields["CA"])
            except NixbaseError as e:
                raise PathInfoError(f"invalid narinfo: CA: {e}") from None
        return cls(
            store_path=_store_path("StorePath", fields["StorePath"], absolute=True),
            url=fields["URL"],
            nar_sha256=nar_hash.digest,
            nar_size=_int("NarSize", fields["NarSize"]),
            references=tuple(_store_path("References", r, absolute=False) for r in refs.split(" ") if r),
            compression=compression,
            file_hash=_sha256("FileHash", fields["FileHash"]) if fields.get("FileHash") else None,
            file_size=_int("FileSize", fields["FileSize"]) if fields.get("FileSize") else None,
            deriver=deriver,
            system=fields.get("System") or None,
            signatures=tuple(sigs),
            ca=ca,
        )

    def render(self) -> str:
        """The narinfo text, fields in Nix's order, each line ending in ``\\n``."""
        lines = [f"StorePath: {self.store_path}", f"URL: {self.url}"]
        if self.compression is not None:
            lines.append(f"Compression: {self.compression}")
        if self.file_hash is not None:
            lines.append(f"FileHash: {self.file_hash.to_nix32()}")
        if self.file_size is not None:
            lines.append(f"FileSize: {self.file_size}")
        lines.append(f"NarHash: sha256:{nixbase32.encode(self.nar_sha256)}")
        lines.append(f"NarSize: {self.nar_size}")
        lines.append("References: " + " ".join(r.basename for r in self.references))
        if self.deriver is not None:
            lines.append(f"Deriver: {self.deriver.basename}{_DRV}")
        if self.system is not None:
            lines.append(f"System: {self.system}")
        lines.extend(f"Sig: {s}" for s in self.signatures)
        if self.ca is not None:
            lines.append(f"CA: {self.ca}")
        return "".join(line + "\n" for line in lines)

    # -- PathInfo -----------------------------------------------------------------

    @classmethod
    def from_path_info(cls, info: PathInfo, url: str, *, file_size: int | None = None) -> NarInfo:
        """The narinfo of ``info`` with its NAR at ``url``, uncompressed."""
        return cls(
            store_path=info.store_path,
            url=url,
            nar_sha256=info.nar_sha256,
            nar_size=info.nar_size,
            references=info.references,
            compression="none",
            file_size=file_size,
            deriver=info.deriver,
            signatures=info.signatures,
            ca=info.ca,
        )

    def to_path_info(self, node: Node) -> PathInfo:
        """The PathInfo tying this narinfo's metadata to ``node`` (the ingested NAR)."""
        return PathInfo(
            store_path=self.store_path,
            node=node,
            references=self.references,
            nar_size=self.nar_size,
            nar_sha256=self.nar_sha256,
            signatures=self.signatures,
            deriver=self.deriver,
            ca=self.ca,
        )

    def with_signatures(self, signatures: Iterable[Signature]) -> NarInfo:
        """A copy with ``signatures`` appended (duplicates dropped)."""
        merged = list(self.signatures)
        merged.extend(s for s in signatures if s not in merged)
        return dataclasses.replace(self, signatures=tuple(merged))

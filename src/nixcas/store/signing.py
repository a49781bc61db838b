"""Nix's ed25519 narinfo signatures: key files, signing and verification.

* A **secret key** is written ``name:base64(32-byte seed ‖ 32-byte public key)``
  (``nix-store --generate-binary-cache-key`` writes one per file);
* a **public key** ``name:base64(32 bytes)`` (``trusted-public-keys``);
* a **signature** ``name:base64(64 bytes)`` over the fingerprint
  (:func:`nixcas.store.narinfo.fingerprint`).

A signature is valid for a key when the names are equal and ed25519
verification succeeds.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from nixcas.errors import ValidationError
from nixcas.store.narinfo import fingerprint
from nixcas.store.pathinfo.model import KEY_NAME, PathInfo, Signature, split_named_base64

__all__ = [
    "SigningKeyError",
    "SigningKey",
    "VerifyingKey",
    "has_valid_signature",
    "parse_public_keys",
    "path_info_fingerprint",
]


class SigningKeyError(ValidationError):
    """A key (file) is malformed."""


def _split(text: str, size: int, what: str) -> tuple[str, bytes]:
    name, raw = split_named_base64(text, what, SigningKeyError)
    if len(raw) != size:
        raise SigningKeyError(f"invalid {what} {name!r}: {len(raw)} bytes, want {size}")
    return name, raw


def path_info_fingerprint(info: PathInfo) -> bytes:
    """The fingerprint of a PathInfo (what a narinfo signature for it signs)."""
    return fingerprint(info.store_path, info.nar_sha256, info.nar_size, info.references)


@dataclass(frozen=True)
class VerifyingKey:
    """A public key: ``name:base64(32 bytes)``."""

    name: str
    key: bytes

    @classmethod
    def parse(cls, text: str) -> VerifyingKey:
        name, raw = _split(text, 32, "public key")
        return cls(name, raw)

    def verify(self, message: bytes, signature: Signature) -> bool:
        """Whether ``signature`` is this key's signature of ``message``."""
        if signature.name != self.name:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(self.key).verify(signature.data, message)
        except InvalidSignature:
            return False
        return True

    def __str__(self) -> str:
        return f"{self.name}:{base64.b64encode(self.key).decode()}"


@dataclass(frozen=True, repr=False)
class SigningKey:
    """A secret key: ``name:base64(seed ‖ public key)``; ``repr`` hides the seed."""

    name: str
    seed: bytes

    @classmethod
    def generate(cls, name: str) -> SigningKey:
        if not KEY_NAME.fullmatch(name):
            raise SigningKeyError(f"invalid key name {name[:100]!r}: use A-Z a-z 0-9 . - (e.g. cache.example.org-1)")
        return cls(name, Ed25519PrivateKey.generate().private_bytes_raw())

    @classmethod
    def parse(cls, text: str) -> SigningKey:
        name, raw = _split(text, 64, "secret key")
        key = cls(name, raw[:32])
        if key.public.key != raw[32:]:
            raise SigningKeyError(f"invalid secret key {name!r}: its public half does not belong to its seed")
        return key

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SigningKey:
        """Read a secret key file; errors name the file (never its contents)."""
        try:
            text = Path(path).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or e
            raise SigningKeyError(f"{os.fspath(path)}: cannot read secret key: {reason}") from None
        try:
            return cls.parse(text)
        except SigningKeyError as e:
            raise SigningKeyError(f"{os.fspath(path)}: {e}") from None

    @property
    def public(self) -> VerifyingKey:
        raw = Ed25519PrivateKey.from_private_bytes(self.seed).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return VerifyingKey(self.name, raw)

    def sign(self, message: bytes) -> Signature:
        return Signature(self.name, Ed25519PrivateKey.from_private_bytes(self.seed).sign(message))

    def sign_path_info(self, info: PathInfo) -> PathInfo:
        """``info`` with this key's signature appended (unless already there)."""
        return info.with_signatures([self.sign(path_info_fingerprint(info))])

    def __str__(self) -> str:
        return f"{self.name}:{base64.b64encode(self.seed + self.public.key).decode()}"

    def __repr__(self) -> str:
        return f"SigningKey({self.name!r})"


def parse_public_keys(text: str | Iterable[str]) -> tuple[VerifyingKey, ...]:
    """Public keys separated by whitespace (``trusted-public-keys``), or a list of them."""
    items = text.split() if isinstance(text, str) else [t for item in text for t in item.split()]
    return tuple(VerifyingKey.parse(item) for item in items)


def has_valid_signature(message: bytes, signatures: Iterable[Signature], keys: Iterable[VerifyingKey]) -> bool:
    """Whether any of ``signatures`` is valid for any of ``keys``."""
    keys = tuple(keys)
    return any(key.verify(message, sig) for sig in signatures for key in keys)

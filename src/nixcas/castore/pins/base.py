"""The PinService interface: named GC roots for castore-only users.

A pin keeps a directory (with its whole closure) or a blob alive through
garbage collection.  Pinning a name again moves it.  Pins must live with the
store they protect: a collection on any host has to see every pin, so a
store whose data is shared (S3, PostgreSQL, a daemon) keeps its pins in a
shared pin service too (:attr:`PinService.per_host` is ``False`` there).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from nixcas._aio import Closing
from nixcas.castore.digest import B3Digest
from nixcas.errors import ValidationError

__all__ = ["Pin", "PinService", "validate_pin_name"]


@dataclass(frozen=True, slots=True)
class Pin:
    name: str
    digest: B3Digest
    created_ns: int


def validate_pin_name(name: str) -> str:
    """``name`` if it is 1 to 255 printable characters without whitespace or ``/``."""
    if not 1 <= len(name) <= 255:
        raise ValidationError(f"pin name must be 1 to 255 characters (got {len(name)})")
    bad = [c for c in name if not c.isprintable() or c.isspace() or c == "/"]
    if bad:
        raise ValidationError(f"pin name {name!r} contains {bad[0]!r} (no whitespace, control characters or '/')")
    return name


class PinService(Closing, ABC):
    """Pins by name.  Every backend validates names and digests the same way."""

    per_host: ClassVar[bool] = True
    """Whether the pins are seen only on this host (a local file, process memory).
    ``nixcas gc`` refuses to collect a shared store with such a pin service."""

    @abstractmethod
    async def pin(self, name: str, digest: B3Digest) -> Pin | None:
        """Pin ``digest`` as ``name``; returns the pin it replaced, if any."""

    @abstractmethod
    async def unpin(self, name: str) -> bool:
        """Remove pin ``name``; whether it existed."""

    @abstractmethod
    async def list(self) -> list[Pin]:
        """Every pin, by name."""


def check_pin(name: str, digest: bytes) -> B3Digest:
    """Validate a pin request (name and a 32-byte digest) before any backend stores it."""
    validate_pin_name(name)
    return B3Digest(digest)

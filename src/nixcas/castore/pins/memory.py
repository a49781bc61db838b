"""``memory://`` — pins in a dict of this process (tests, throw-away stores)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from nixcas.castore.digest import B3Digest
from nixcas.castore.pins.base import Pin, PinService, check_pin
from nixcas.config import Resolver, ServiceConfig
from nixcas.urls import MemoryUrlConfig

__all__ = ["MemoryPinService", "MemoryPinServiceConfig"]


@dataclass(frozen=True)
class MemoryPinServiceConfig(MemoryUrlConfig, ServiceConfig[PinService]):
    """``memory://`` (no host, path or options); composition: ``type = "memory"``."""

    async def build(self, resolver: Resolver) -> PinService:
        return MemoryPinService()


class MemoryPinService(PinService):
    """Pins in process memory."""

    def __init__(self) -> None:
        self._pins: dict[str, Pin] = {}

    def __repr__(self) -> str:
        return "MemoryPinService()"

    async def pin(self, name: str, digest: B3Digest) -> Pin | None:
        digest = check_pin(name, digest)
        old = self._pins.get(name)
        self._pins[name] = Pin(name, digest, time.time_ns())
        return old

    async def unpin(self, name: str) -> bool:
        return self._pins.pop(name, None) is not None

    async def list(self) -> list[Pin]:
        return [self._pins[name] for name in sorted(self._pins)]

"""Pin services: named GC roots (``NAME -> digest``) kept with the store they protect.

The interface is :class:`~nixcas.castore.pins.base.PinService`; backends
(``memory``, ``sqlite``, ``postgresql``, ``grpc``) are chosen by URL or
composition entry like every other service (:mod:`nixcas.registry`).
"""

from nixcas.castore.pins.base import Pin, PinService, validate_pin_name

__all__ = ["Pin", "PinService", "validate_pin_name"]

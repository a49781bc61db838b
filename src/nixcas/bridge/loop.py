"""The event loop a bridge runs on: uvloop when it is installed (the ``fast`` extra), else asyncio's own.

uvloop's transports and loop are written in C: every request costs the
bridge less CPU (measured in BENCHMARKS.md, nar-bridge run E).  It is
optional; without it the bridge runs unchanged on asyncio's loop.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, cast

from nixcas.errors import ConfigurationError

if TYPE_CHECKING:
    import asyncio

__all__ = ["EVENT_LOOPS", "LoopFactory", "loop_factory"]

EVENT_LOOPS: Final = ("auto", "uvloop", "asyncio")
"""``--event-loop`` choices: ``auto`` is uvloop if installed, else asyncio."""

LoopFactory = Callable[[], "asyncio.AbstractEventLoop"]


def loop_factory(choice: str) -> tuple[str, LoopFactory | None]:
    """The name of the loop ``choice`` selects and its factory (``None``: asyncio's default loop).

    ``uvloop`` when it is not installed is a :class:`~nixcas.errors.ConfigurationError`;
    ``auto`` then falls back to asyncio.
    """
    if choice not in EVENT_LOOPS:
        raise ConfigurationError(f"unknown event loop {choice!r} (one of: {', '.join(EVENT_LOOPS)})")
    if choice == "asyncio":
        return "asyncio", None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if choice == "uvloop":
            raise ConfigurationError("--event-loop uvloop: uvloop is not installed (the 'fast' extra)") from None
        return "asyncio", None
    return "uvloop", cast("LoopFactory", uvloop.new_event_loop)

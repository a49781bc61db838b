"""nar-bridge: a Nix HTTP binary cache over the store (the HTTP edge; the Nix logic lives in :mod:`nixcas.store`).

:class:`~nixcas.bridge.app.NarBridge` is the aiohttp application (its routes:
:mod:`~nixcas.bridge.narinfo`, :mod:`~nixcas.bridge.download` and
:mod:`~nixcas.bridge.upload`, over the shared state, errors and access of
:mod:`~nixcas.bridge.base`); :func:`~nixcas.bridge.server.start_bridge` puts it on a socket.  This package
module itself stays light (no aiohttp), so the command line starts fast.
"""

from __future__ import annotations

from typing import Final

__all__ = ["DEFAULT_BRIDGE_LISTEN", "DEFAULT_PRIORITY"]

DEFAULT_BRIDGE_LISTEN: Final = "127.0.0.1:9000"
DEFAULT_PRIORITY: Final = 39
"""The Priority announced in ``/nix-cache-info`` (tvix's default)."""

"""nar-bridge: a Nix HTTP binary cache over the store (the HTTP edge; the Nix logic lives in :mod:`nixcas.store`)."""

from __future__ import annotations

from nixcas.bridge.app import DEFAULT_PRIORITY, NarBridge, nar_url
from nixcas.bridge.server import DEFAULT_BRIDGE_LISTEN, RunningBridge, start_bridge

__all__ = ["DEFAULT_BRIDGE_LISTEN", "DEFAULT_PRIORITY", "NarBridge", "RunningBridge", "nar_url", "start_bridge"]

"""What every worker-protocol session shares (:class:`DaemonState`) and the limits of its arguments."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nixcas.castore.nodes import DirectoryNode, FileNode, Node
from nixcas.store.daemon.session import DaemonError
from nixcas.store.pathinfo.model import PathInfo
from nixcas.store.store_path import StorePath

if TYPE_CHECKING:
    from nixcas.castore.blob.base import BlobService
    from nixcas.castore.digest import B3Digest
    from nixcas.castore.dirs.base import DirectoryService
    from nixcas.castore.pins.base import PinService
    from nixcas.store.pathinfo.base import PathInfoService
    from nixcas.store.signing import VerifyingKey


log = logging.getLogger("nixcas.nix-daemon")

MAX_PATH = 4096
"""Longest store path string accepted."""
MAX_SIG = 1024
NO_BUILD = "nixcas does not build"
GET_CONCURRENCY = 16
"""Path info lookups in flight for one list query."""


def _host() -> str:
    """This host's name as pin names may hold it (no whitespace or '/')."""
    return "".join(c if c.isprintable() and not c.isspace() and c != "/" else "_" for c in socket.gethostname())[:64]


TEMP_ROOT_PREFIX = f"nix-temp-{_host()}-"
"""Temporary roots are pins named ``nix-temp-HOST-PID-SESSION-HASH``: another host's are never touched."""


@dataclass
class DaemonState:
    """What every session shares: the services, the signature policy, the GC-root naming."""

    blobs: BlobService
    directories: DirectoryService
    pathinfos: PathInfoService
    pins: PinService | None = None
    trusted_keys: tuple[VerifyingKey, ...] = ()
    require_sigs: bool = True
    """Whether a trusted client's 'check signatures' request is honoured (untrusted clients are always checked)."""
    root_prefix: str = field(default_factory=lambda: f"{TEMP_ROOT_PREFIX}{os.getpid()}-")
    """Names of this process's temporary-root pins start with this (host name and PID)."""

    def __post_init__(self) -> None:
        from nixcas.bridge.groupsync import GroupSync

        self.blob_sync = GroupSync(self.blobs.sync)
        """The durability barrier before directories commit, shared by every upload waiting for one."""

    async def get(self, path: StorePath) -> PathInfo | None:
        return await self.pathinfos.get(path.digest)

    async def get_many(self, paths: list[StorePath]) -> list[PathInfo | None]:
        """The path infos of ``paths`` (``None`` for invalid ones), looked up a few at a time."""
        found: list[PathInfo | None] = []
        for i in range(0, len(paths), GET_CONCURRENCY):
            found += await asyncio.gather(*(self.get(p) for p in paths[i : i + GET_CONCURRENCY]))
        return found

    async def require(self, path: StorePath) -> PathInfo:
        info = await self.get(path)
        if info is None:
            raise DaemonError(f"path '{path}' is not valid")
        return info

    async def referrers(self, path: StorePath) -> list[StorePath]:
        """Every valid path whose references include ``path`` (one pass over the path infos)."""
        found = []
        async for info in self.pathinfos.list():
            if any(ref.digest == path.digest for ref in info.references):
                found.append(info.store_path)
        return found

    async def pin(self, name: str, node: Node) -> bool:
        """Pin ``node``'s data as ``name`` (nothing to pin for a symlink); whether a pin was made."""
        digest = _node_digest(node)
        if self.pins is None or digest is None:
            return False
        await self.pins.pin(name, digest)
        return True

    async def unpin(self, names: Iterable[str]) -> None:
        if self.pins is None:
            return
        for name in names:
            with contextlib.suppress(Exception):
                await self.pins.unpin(name)

    async def release_stale_temp_roots(self) -> int:
        """Unpin the temporary roots a daemon process left behind when it was killed; how many."""
        if self.pins is None:
            return 0
        stale = []
        for pin in await self.pins.list():
            if not pin.name.startswith(TEMP_ROOT_PREFIX) or pin.name.startswith(self.root_prefix):
                continue
            pid_text = pin.name.removeprefix(TEMP_ROOT_PREFIX).split("-", 1)[0]
            if pid_text.isdigit() and not _alive(int(pid_text)):
                stale.append(pin.name)
        await self.unpin(stale)
        return len(stale)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _node_digest(node: Node) -> B3Digest | None:
    if isinstance(node, DirectoryNode | FileNode):
        return node.digest
    return None

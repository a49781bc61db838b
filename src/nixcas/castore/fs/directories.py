"""Directory fetches for a mount: a small subtree comes in one recursive request.

Walking a tree through a mount touches every directory in it, one request
each; against a remote service that is one round trip per directory.  When a
directory is first needed and its ``size`` says its subtree is small
(:data:`CLOSURE_MAX_SIZE`), :class:`DirectoryFetcher` asks for the whole
closure at once (``get_recursive``) and keeps the directories below it until
they are needed, in a bounded cache (:data:`KEEP_ENTRIES` entries, oldest
dropped first; a directory taken from it leaves it).  If the closure cannot
be had whole (a descendant is missing), the directory itself is fetched
alone, so a hole deep in a tree fails only where it is.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from nixcas.castore.digest import B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.nodes import DirectoryNode
from nixcas.errors import NixcasError

__all__ = ["CLOSURE_MAX_SIZE", "KEEP_ENTRIES", "DirectoryFetcher"]

log = logging.getLogger("nixcas.fs")

CLOSURE_MAX_SIZE = 50_000
"""Largest ``size`` (tvix rule: about twice the entries below; snix: about the entries plus the directories) of a
directory fetched with its whole closure."""

KEEP_ENTRIES = 50_000
"""At most this many entries (summed over directories) are kept fetched ahead of use."""


class DirectoryFetcher:
    """``get`` for a mount's directories, fetching small subtrees whole."""

    def __init__(
        self,
        service: DirectoryService,
        *,
        closure_max_size: int = CLOSURE_MAX_SIZE,
        keep_entries: int = KEEP_ENTRIES,
    ) -> None:
        self.service = service
        self.closure_max_size = closure_max_size
        self.keep_entries = keep_entries
        self._ahead: OrderedDict[B3Digest, Directory] = OrderedDict()
        self._ahead_entries = 0

    def __len__(self) -> int:
        """How many directories are held, fetched ahead of use."""
        return len(self._ahead)

    async def get(self, node: DirectoryNode) -> Directory | None:
        """The Directory ``node`` refers to, or ``None`` if the service does not have it."""
        ahead = self._ahead.pop(node.digest, None)
        if ahead is not None:
            self._ahead_entries -= len(ahead)
            return ahead
        if 0 < node.size <= self.closure_max_size:
            try:
                return await self._get_closure(node.digest)
            except (NixcasError, OSError) as e:
                log.warning("directory %s: cannot fetch its closure whole (%s); fetching it alone", node.digest, e)
        return await self.service.get(node.digest)

    async def _get_closure(self, digest: B3Digest) -> Directory | None:
        root: Directory | None = None
        async for directory in self.service.get_recursive(digest):
            if root is None:
                root = directory
            else:
                self._keep(directory)
        return root

    def _keep(self, directory: Directory) -> None:
        digest = directory.digest
        if digest in self._ahead or len(directory) > self.keep_entries:
            return
        self._ahead[digest] = directory
        self._ahead_entries += len(directory)
        while self._ahead_entries > self.keep_entries:
            _, dropped = self._ahead.popitem(last=False)
            self._ahead_entries -= len(dropped)

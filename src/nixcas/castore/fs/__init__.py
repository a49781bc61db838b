"""A lazy, read-only filesystem over castore nodes (no Nix here).

- :mod:`.roots` — :class:`RootNodes`, what the root of a mount holds, and a Directory as one;
- :mod:`.inodes` — inode numbers, sharing of identical content, eviction;
- :mod:`.directories` — directory fetches, small subtrees in one request;
- :mod:`.reader` — positional reads with read-ahead over a blob reader;
- :mod:`.ops` — the filesystem's operations, whatever the transport (:class:`~.ops.FsCore`);
- :mod:`.fuse` — the pyfuse3 operations and the mount loop (imports pyfuse3);
- :mod:`.virtiofs` — the same filesystem for VMs: a vhost-user-fs back-end (no pyfuse3).
"""

from nixcas.castore.fs.roots import DirectoryRootNodes, RootNodes

__all__ = ["DirectoryRootNodes", "RootNodes"]

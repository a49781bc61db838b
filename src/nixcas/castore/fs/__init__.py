"""A lazy, read-only filesystem over castore nodes (no Nix here).

- :mod:`.roots` — :class:`RootNodes`, what the root of a mount holds, and a Directory as one;
- :mod:`.inodes` — inode numbers, sharing of identical content, eviction;
- :mod:`.directories` — directory fetches, small subtrees in one request;
- :mod:`.reader` — positional reads with read-ahead over a blob reader;
- :mod:`.ops` — the filesystem's operations, whatever the transport (:class:`~.ops.FsCore`);
- :mod:`.fuseproto` — the FUSE wire protocol, answered by :class:`~.ops.FsCore` (for both transports);
- :mod:`.fuse` — the kernel's transport: a mount by ``fusermount3``, requests read from ``/dev/fuse``;
- :mod:`.virtiofs` — the VMs' transport: a vhost-user-fs back-end.
"""

from nixcas.castore.fs.roots import DirectoryRootNodes, RootNodes

__all__ = ["DirectoryRootNodes", "RootNodes"]

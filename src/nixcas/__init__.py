"""nixcas: a content-addressed store for Nix-style artifacts, wire-compatible with tvix/snix.

The async library entry point is :func:`open_store`; :mod:`nixcas.sync` has a
blocking twin.  The data model and services live in :mod:`nixcas.castore`.

The names below are loaded on first use (module ``__getattr__``), so
``import nixcas`` — and every command-line start — costs nothing until a
name is needed: ``nixcas --version`` loads neither asyncio nor protobuf, and
``import nixcas.castore`` loads nothing of the Nix layer.
"""

from __future__ import annotations

from nixcas._lazy import lazy_exports

TYPE_CHECKING = False  # not typing's: `import typing` alone is a few ms of every start
if TYPE_CHECKING:
    from nixcas.api import Store, default_store_dir, open_store
    from nixcas.castore import (
        EMPTY_DIGEST,
        B3Digest,
        BlobService,
        Directory,
        DirectoryNode,
        DirectoryService,
        FileNode,
        Node,
        SymlinkNode,
    )
    from nixcas.errors import NixcasError

__version__ = "0.1.0"

_EXPORTS = {
    "EMPTY_DIGEST": "nixcas.castore.digest",
    "B3Digest": "nixcas.castore.digest",
    "BlobService": "nixcas.castore.blob.base",
    "Directory": "nixcas.castore.directory",
    "DirectoryNode": "nixcas.castore.nodes",
    "DirectoryService": "nixcas.castore.dirs.base",
    "FileNode": "nixcas.castore.nodes",
    "NixcasError": "nixcas.errors",
    "Node": "nixcas.castore.nodes",
    "Store": "nixcas.api",
    "SymlinkNode": "nixcas.castore.nodes",
    "default_store_dir": "nixcas.api",
    "open_store": "nixcas.api",
}

__all__ = [
    "EMPTY_DIGEST",
    "B3Digest",
    "BlobService",
    "Directory",
    "DirectoryNode",
    "DirectoryService",
    "FileNode",
    "NixcasError",
    "Node",
    "Store",
    "SymlinkNode",
    "__version__",
    "default_store_dir",
    "open_store",
]


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

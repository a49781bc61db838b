"""nixcas: a content-addressed store for Nix-style artifacts, wire-compatible with tvix/snix.

The async library entry point is :func:`open_store`; :mod:`nixcas.sync` has a
blocking twin.  The data model and services live in :mod:`nixcas.castore`.
"""

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

"""castore: content-addressed blobs and a Merkle DAG of Directories (knows nothing of Nix).

The names below are loaded on first use (module ``__getattr__``): importing one
submodule (say :mod:`nixcas.castore.digest`) does not load the others.
"""

from __future__ import annotations

from nixcas._lazy import lazy_exports

TYPE_CHECKING = False  # not typing's: `import typing` is a few ms of a start that needs nothing else of it

if TYPE_CHECKING:
    from nixcas.castore.blob.base import BlobReader, BlobService, BlobWriter, ChunkMeta
    from nixcas.castore.digest import EMPTY_DIGEST, B3Digest
    from nixcas.castore.directory import Directory
    from nixcas.castore.dirs.base import DirectoryPutter, DirectoryService
    from nixcas.castore.ingest import IngestEntry, ingest_entries, ingest_path
    from nixcas.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode, node_kind

_EXPORTS = {
    "EMPTY_DIGEST": "nixcas.castore.digest",
    "B3Digest": "nixcas.castore.digest",
    "BlobReader": "nixcas.castore.blob.base",
    "BlobService": "nixcas.castore.blob.base",
    "BlobWriter": "nixcas.castore.blob.base",
    "ChunkMeta": "nixcas.castore.blob.base",
    "Directory": "nixcas.castore.directory",
    "DirectoryNode": "nixcas.castore.nodes",
    "DirectoryPutter": "nixcas.castore.dirs.base",
    "DirectoryService": "nixcas.castore.dirs.base",
    "FileNode": "nixcas.castore.nodes",
    "IngestEntry": "nixcas.castore.ingest",
    "Node": "nixcas.castore.nodes",
    "SymlinkNode": "nixcas.castore.nodes",
    "ingest_entries": "nixcas.castore.ingest",
    "ingest_path": "nixcas.castore.ingest",
    "node_kind": "nixcas.castore.nodes",
}

__all__ = [
    "EMPTY_DIGEST",
    "B3Digest",
    "BlobReader",
    "BlobService",
    "BlobWriter",
    "ChunkMeta",
    "Directory",
    "DirectoryNode",
    "DirectoryPutter",
    "DirectoryService",
    "FileNode",
    "IngestEntry",
    "Node",
    "SymlinkNode",
    "ingest_entries",
    "ingest_path",
    "node_kind",
]


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

"""castore: content-addressed blobs and a Merkle DAG of Directories (knows nothing of Nix)."""

from nixcas.castore.blob.base import BlobReader, BlobService, BlobWriter, ChunkMeta
from nixcas.castore.digest import EMPTY_DIGEST, B3Digest
from nixcas.castore.directory import Directory
from nixcas.castore.dirs.base import DirectoryPutter, DirectoryService
from nixcas.castore.ingest import IngestEntry, ingest_entries, ingest_path
from nixcas.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode, node_kind

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

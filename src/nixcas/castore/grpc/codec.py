"""Hand-made codecs for the hot messages (no message object per ``BlobChunk``), and chunk lists as ``BlobMeta``."""

from __future__ import annotations

from collections.abc import Sequence

from nixcas._proto.snix.castore.protos import blobstore_pb2 as meta_pb
from nixcas._proto.tvix.castore.protos import rpc_blobstore_pb2 as blob_pb
from nixcas.castore.blob.base import ChunkMeta

__all__ = ["blob_meta", "decode_blob_chunk", "encode_blob_chunk", "identity"]


def identity(data: bytes) -> bytes:
    """Bytes that already are a serialized message."""
    return data


def encode_blob_chunk(data: bytes) -> bytes:
    """``BlobChunk{data}`` serialized: tag 1 (length-delimited), varint length, the bytes."""
    n = len(data)
    if not n:
        return b""
    header = bytearray(b"\x0a")
    while n > 0x7F:
        header.append((n & 0x7F) | 0x80)
        n >>= 7
    header.append(n)
    return bytes(header) + data


def decode_blob_chunk(message: bytes) -> bytes:
    """The ``data`` of a serialized ``BlobChunk``."""
    return blob_pb.BlobChunk.FromString(message).data


def blob_meta(chunks: Sequence[ChunkMeta]) -> meta_pb.BlobMeta:
    """A chunk list as snix's ``BlobMeta`` message."""
    return meta_pb.BlobMeta(chunks=[meta_pb.BlobMeta.ChunkMeta(digest=c.digest, size=c.size) for c in chunks])

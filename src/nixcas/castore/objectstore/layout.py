"""The snix object layout: keys, the blob index, and how a blob becomes objects.

Under a base path:

* ``blobs/b3/<hex[0:4]>/<hex>`` — the blob index: a serialized
  ``StatBlobResponse`` listing the blob's chunks; an empty list (zero bytes)
  means "one chunk, which is the blob itself".  Written last.
* ``chunks/b3/<hex[0:4]>/<hex>`` — one chunk's bytes, zstd-compressed as a
  single frame.  The empty blob has no chunk object, only its index.
* ``bao/b3/<hex[0:4]>/<hex>`` — nixcas only: the blob's bao outboard (16 KiB
  chunk groups), kept once computed.  Derived data: deleting it is harmless.
"""

from __future__ import annotations

from collections.abc import Sequence

from nixcas.castore.blob.base import ChunkMeta
from nixcas.castore.blob.chunking import cut
from nixcas.castore.digest import DIGEST_LEN, B3Digest
from nixcas.errors import StorageError

__all__ = [
    "SINGLE_CHUNK_CAP",
    "SPILL_THRESHOLD",
    "ZSTD_LEVEL",
    "bao_key",
    "blob_index_key",
    "blob_object_key",
    "chunk_key",
    "decode_index",
    "encode_index",
    "key_digest",
    "object_key",
    "split_blob",
]

ZSTD_LEVEL = 1
"""Default zstd level for new chunks: fast, and any level decodes the same."""

SPILL_THRESHOLD = 1 << 20
"""A writer keeps a blob of up to this many bytes in memory and stores it in one step at close."""

SINGLE_CHUNK_CAP = 4 << 20
"""A single-chunk blob of at most this many bytes (every chunk a writer makes, at any ``avg_chunk_size``)
is read, decompressed (bounded) and verified in one step before a byte is returned."""


def object_key(kind: str, digest: B3Digest) -> str:
    """``<kind>/b3/<hex[0:4]>/<hex>``: where an object of ``kind`` (``blobs``, ``chunks``, ``bao``, ``dirs``) lives."""
    h = digest.hex()
    return f"{kind}/b3/{h[:4]}/{h}"


def key_digest(key: str) -> B3Digest | None:
    """The digest an object key of that form names; ``None`` for any other key (foreign or misplaced)."""
    try:
        raw = bytes.fromhex(key.rpartition("/")[2])
    except ValueError:
        return None
    if len(raw) != DIGEST_LEN:
        return None
    digest = B3Digest(raw)
    return digest if key == object_key(key.partition("/")[0], digest) else None


def blob_index_key(digest: B3Digest) -> str:
    """Object key of a blob's index."""
    return object_key("blobs", digest)


def chunk_key(digest: B3Digest) -> str:
    """Object key of a chunk's compressed bytes."""
    return object_key("chunks", digest)


def bao_key(digest: B3Digest) -> str:
    """Object key of a blob's cached bao outboard."""
    return object_key("bao", digest)


def encode_index(chunks: list[ChunkMeta]) -> bytes:
    """Serialize a chunk list as a ``StatBlobResponse`` (empty for < 2 chunks)."""
    if len(chunks) < 2:
        return b""
    from nixcas._proto.tvix.castore.protos import rpc_blobstore_pb2 as pb  # loaded by the first chunked blob

    msg = pb.StatBlobResponse(chunks=[pb.StatBlobResponse.ChunkMeta(digest=c.digest, size=c.size) for c in chunks])
    return msg.SerializeToString(deterministic=True)


def decode_index(digest: B3Digest, data: bytes) -> list[ChunkMeta]:
    """Parse a blob index; a malformed one is a storage error."""
    from google.protobuf.message import DecodeError

    from nixcas._proto.tvix.castore.protos import rpc_blobstore_pb2 as pb  # loaded by the first chunked blob

    msg = pb.StatBlobResponse()
    try:
        msg.ParseFromString(data)
    except DecodeError as e:
        raise StorageError(f"blob index of {digest.hex()} is corrupt: {e}") from None
    chunks = []
    for i, c in enumerate(msg.chunks):
        if len(c.digest) != DIGEST_LEN:
            raise StorageError(f"blob index of {digest.hex()}: chunk {i} has digest length {len(c.digest)}")
        chunks.append(ChunkMeta(B3Digest(c.digest), c.size))
    return chunks


def split_blob(data: bytes | memoryview, avg_chunk_size: int) -> Sequence[bytes | memoryview]:
    """The chunks a whole blob is stored as: FastCDC pieces, or the blob itself if it is at most the smallest chunk."""
    return cut(data, avg_chunk_size) if len(data) > avg_chunk_size // 2 else [data]


def blob_object_key(digest: B3Digest, pieces: Sequence[bytes | memoryview]) -> str:
    """The object whose presence says a blob cut into ``pieces`` is stored in object storage.

    A blob of one chunk is its chunk object alone: snix also writes an empty
    index beside it, but its readers (``has``, ``open_read``, ``Stat``) all fall
    back to the chunk object, so leaving the index out halves the requests for
    small files at no cost in compatibility (the local-disk store keeps the
    empty index: a hard link, no request).  Blobs of several chunks are their
    index (written last), the empty blob its empty index.
    """
    return chunk_key(digest) if len(pieces) == 1 and pieces[0] else blob_index_key(digest)

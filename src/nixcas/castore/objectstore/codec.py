"""Chunk encoding of the snix layout: each chunk object is one zstd frame of the chunk's bytes.

Any zstd level decodes the same; a frame of raw (stored) blocks can be read
without a decompressor (:func:`raw_blocks`).  Every decode is bounded by the
size the reader expects, and checked against the BLAKE3 digest it names.
"""

from __future__ import annotations

import zstandard

from nixcas.castore.blob.base import ChunkMeta, check_chunk
from nixcas.castore.blob.chunking import compressed_bound, decompress_chunk
from nixcas.castore.blob.wholeread import raw_blocks
from nixcas.castore.digest import B3Digest
from nixcas.errors import ChecksumMismatch, StorageError

__all__ = ["blob_mismatch", "decode_chunk", "raw_blocks"]


def blob_mismatch(digest: B3Digest, data: bytes) -> ChecksumMismatch | None:
    """The error for a whole blob's bytes that do not hash to ``digest`` (``None``: they do)."""
    import blake3

    got = blake3.blake3(data).digest()
    return None if got == digest else ChecksumMismatch(f"blob {digest.hex()}", digest.hex(), got.hex())


def decode_chunk(dctx: zstandard.ZstdDecompressor, chunk: ChunkMeta, compressed: bytes, where: str) -> bytes:
    """A chunk object's content, decompressed (bounded by ``chunk.size``) and checked against ``chunk``.

    ``where`` names the store in errors: an object larger than ``chunk.size``
    can compress to, a frame that does not decode or has another size, bytes
    of another hash.
    """
    at = f"{where}: chunk {chunk.digest.hex()}"
    if len(compressed) > compressed_bound(chunk.size):
        raise StorageError(f"{at}: compressed object is larger than {chunk.size} bytes can compress to")
    data = decompress_chunk(dctx, compressed, chunk.size, at)
    return check_chunk(chunk, data, where)

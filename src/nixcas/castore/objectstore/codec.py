"""Chunk encoding of the snix layout: each chunk object is one zstd frame of the chunk's bytes.

Any zstd level decodes the same; a frame of raw (stored) blocks can be read
without a decompressor (:func:`raw_blocks`).  Every decode is bounded by the
size the reader expects, and checked against the BLAKE3 digest it names.
"""

from __future__ import annotations

import zstandard

from nixcas.castore.blob.base import ChunkMeta, check_chunk
from nixcas.castore.blob.chunking import compressed_bound, decompress_chunk
from nixcas.castore.digest import B3Digest
from nixcas.errors import ChecksumMismatch, StorageError

__all__ = ["blob_mismatch", "decode_chunk", "raw_blocks"]

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_FCS_BYTES = (0, 2, 4, 8)
_DICT_ID_BYTES = (0, 1, 2, 4)


def raw_blocks(data: memoryview, start: int, end: int) -> list[tuple[int, int]] | None:
    """Where the content of ``data[start:end]`` lies if it is one zstd frame of raw blocks: (offset, length) each.

    The default store writes chunk objects as such frames (``STORE_LEVEL``): their content is
    the blocks' payloads as they are, so reading one needs no decompressor and no copy.
    Anything else (compressed or RLE blocks, a dictionary, several frames, trailing bytes,
    a content size that disagrees with the blocks) gives ``None``: zstd decodes it.
    """
    if end - start < 6 or data[start : start + 4] != _ZSTD_MAGIC:
        return None
    descriptor = data[start + 4]
    if descriptor & 0x08 or descriptor & 0x03:  # reserved bit; a dictionary
        return None
    single_segment = descriptor & 0x20
    fcs_len = _FCS_BYTES[descriptor >> 6] or (1 if single_segment else 0)
    pos = start + 5 + (0 if single_segment else 1)
    declared = int.from_bytes(data[pos : pos + fcs_len], "little") + (256 if fcs_len == 2 else 0)
    pos += fcs_len
    blocks: list[tuple[int, int]] = []
    total = 0
    while True:
        if pos + 3 > end:
            return None
        header = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
        size = header >> 3
        pos += 3
        if header & 0x06 or pos + size > end:  # not a raw block, or cut short
            return None
        if size:
            blocks.append((pos, size))
        pos += size
        total += size
        if header & 1:
            break
    if descriptor & 0x04:  # content checksum (BLAKE3 is checked instead)
        pos += 4
    if pos != end or (fcs_len and declared != total):
        return None
    return blocks


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

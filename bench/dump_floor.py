#!/usr/bin/env python3
"""The floor of ``bench/dump_path.py``: every stored blob of a store read once and BLAKE3-checked (one thread, or two).

Run as its own process (``python bench/dump_floor.py STORE_DIR``), so its start-up is counted as
the tools' is; it imports only what that work needs (``sqlite3``, ``blake3``, and ``zstandard``
only for a chunk object that is not raw blocks), not the benchmark's harness: run from
``dump_path.py`` itself, the floor had also paid for importing ``argparse``, ``subprocess``,
``typing``, ``import_tree`` and the rest (~40 ms here).

Small blobs with one ``pread`` each from the packs (in pack order), chunk objects of large ones
whole, all into one reused buffer (fresh memory costs a page fault per 4 KiB here); a chunk
object of raw zstd blocks is hashed in place, any other is decompressed.  No framing, no
directory walk, no asyncio, no output: the least work a verifying renderer of this store must
do for these bytes.
"""

from __future__ import annotations

import os
import sqlite3
import sys

import blake3

from nixcas.castore.blob.wholeread import raw_blocks


def floor(store: str, threads: int = 1) -> None:
    """Read and check every blob of the embedded store at ``store``; exit with an error if one is damaged.

    With ``threads`` 2 (``floor-2t`` in ``bench/dump_path.py``: the two-core floor), the pack rows and the
    chunk shards are split between two threads, each with its own buffer (BLAKE3, the reads and the
    decompression release the GIL).
    """
    blobs = os.path.join(store, "blobs")
    db = sqlite3.connect(os.path.join(blobs, "packs.sqlite"))
    packs = {
        pid: os.open(os.path.join(blobs, "packs", f"{name}.pack"), os.O_RDONLY)
        for pid, name in db.execute("SELECT id, name FROM packs")
    }
    rows = db.execute("SELECT digest, pack, offset, length FROM blobs ORDER BY pack, offset").fetchall()
    chunks = os.path.join(blobs, "chunks", "b3")
    shards = [e.path for e in os.scandir(chunks) if e.is_dir()] if os.path.isdir(chunks) else []
    if threads == 1:
        sound = _check(packs, rows, shards)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            parts = [(rows[k::threads], shards[k::threads]) for k in range(threads)]
            sound = all(pool.map(lambda part: _check(packs, *part), parts))
    if not sound:
        raise SystemExit("corrupt")


def _check(packs: dict[int, int], rows: list[tuple[bytes, int, int, int]], shards: list[str]) -> bool:
    """These pack rows, then the chunk objects of these shards, read into one reused buffer: all sound?"""
    buffer = memoryview(bytearray(8 << 20))
    for digest, pack, offset, length in rows:
        data = buffer[:length]
        if os.preadv(packs[pack], [data], offset) != length or blake3.blake3(data).digest() != digest:
            return False
    for shard in shards:
        for entry in os.scandir(shard):
            fd = os.open(entry.path, os.O_RDONLY)
            size = os.fstat(fd).st_size
            stored = buffer[:size]
            got = os.preadv(fd, [stored], 0)
            os.close(fd)
            hasher = blake3.blake3()
            blocks = raw_blocks(stored, 0, got)
            pieces: list[bytes | memoryview]
            if blocks is None:
                import zstandard

                pieces = [zstandard.ZstdDecompressor().decompress(stored[:got])]
            else:
                pieces = [stored[o : o + n] for o, n in blocks]
            for piece in pieces:
                hasher.update(piece)
            if hasher.hexdigest() != entry.name:
                return False
    return True


if __name__ == "__main__":
    floor(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1)

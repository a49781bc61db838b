"""The floor of an import: the least work any correct, durable importer of a tree must do.

Run as ``python bench/import_floor.py TREE STORE_DIR`` (``bench/ingest_ab.py tree --floor`` runs it
as a peer in the same rounds as ``nixcas import`` and ``nix-store --add``).  On one thread, with
nothing but the standard library, ``blake3`` and ``nixcas.store.nixbase32`` (to print the hash):

* walk the tree in NAR order (names sorted as bytes), ``lstat`` every entry;
* read every regular file once (1 MiB blocks), BLAKE3 its bytes (the blob's digest) and feed
  them, framed as the NAR (the tokens of ``nixcas.store.nar.wire``), to one SHA-256 (the store
  path's NAR hash, printed so the caller can check it equals Nix's);
* append every file's bytes to one pack file, and record digest, size and offset per file in
  one SQLite transaction;
* make it durable: ``fsync`` of the pack, the commit's sync, then ``syncfs`` of the file system
  (what nixcas's importer does before it publishes a store path; ``nix-store --add`` syncs
  nothing of the file contents).

No chunking, no Directory messages, no PathInfo, no store path, no checks: anything an
importer does beyond this is not in the floor.  Prints ``NARHASH`` (nixbase32 SHA-256).

``--chunk`` (``floor-2t-cdc`` with two threads): the floor of the chunked layout nixcas keeps large
blobs in (what verified ranges, the mount's reads and dedup stand on).  A file above
``SMALL_BLOB`` (256 KiB, nixcas's limit) is also cut by FastCDC (``pyfastcdc``, the average nixcas
uses) and each chunk hashed with BLAKE3; the chunks are appended to the pack as they come, raw
(nixcas would also try zstd on them), one digest row per chunk.

``--threads 2`` (the two-core floor, ``floor-2t`` in ``bench/ingest_ab.py``): the NAR's SHA-256
runs on a second thread, fed the framing and contents in pieces of about 1 MiB (small files'
bytes joined), while the first reads, hashes BLAKE3 and appends to the pack; and the pack's
writeback is started every 8 MiB (``sync_file_range``) so that the final ``fsync`` finds little
left to write.  Both hashes release the GIL, so the two run in parallel on two cores.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import queue
import sqlite3
import stat
import sys
import threading

import blake3

from nixcas.store import nixbase32
from nixcas.store.nar.wire import (
    ENTRY_PREFIX,
    NAR_MAGIC,
    NODE_DIRECTORY,
    NODE_EXECUTABLE,
    NODE_REGULAR,
    NODE_SYMLINK,
    TOK_CLOSE,
    TOK_NODE,
    encode_str,
    padding,
    u64_le,
)

BLOCK = 1 << 20
# nixcas.castore.upload.SMALL_BLOB and nixcas.castore.blob.chunking.AVG_CHUNK_SIZE, written out: importing
# either module loads asyncio, whose start-up this floor would then time as its own.
SMALL_BLOB = 256 << 10
AVG_CHUNK = 256 << 10
WRITEBACK = 8 << 20
SYNC_FILE_RANGE_WRITE = 2


class _ShaThread:
    """SHA-256 on a thread of its own, fed pieces of about :data:`BLOCK` bytes (small ones joined first)."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.pending = bytearray()
        self.pieces: queue.Queue[bytes | bytearray | None] = queue.Queue(16)
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        while (piece := self.pieces.get()) is not None:
            self.sha.update(piece)

    def update(self, data: bytes) -> None:
        if len(data) >= BLOCK // 4:
            self._flush()
            self.pieces.put(data)
            return
        self.pending += data
        if len(self.pending) >= BLOCK:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.pieces.put(self.pending)
            self.pending = bytearray()

    def digest(self) -> bytes:
        self._flush()
        self.pieces.put(None)
        self.thread.join()
        return self.sha.digest()


class Floor:
    def __init__(self, store: str, threads: int = 1, chunk: bool = False) -> None:
        os.makedirs(store, exist_ok=True)
        self.pack = os.open(f"{store}/floor.pack", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.offset = 0
        self.rows: list[tuple[bytes, int, int]] = []
        self.db = sqlite3.connect(f"{store}/floor.sqlite", isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS blobs (digest BLOB PRIMARY KEY, size INT, offset INT)")
        self.sha: hashlib._Hash | _ShaThread = hashlib.sha256() if threads == 1 else _ShaThread()
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.writeback = threads > 1
        self.started = 0
        self.cdc = None
        if chunk:
            from pyfastcdc.cy import FastCDC

            self.cdc = FastCDC(
                AVG_CHUNK, min_size=AVG_CHUNK // 2, max_size=AVG_CHUNK * 2, normalized_chunking=1, seed=0
            )

    def file(self, path: bytes, size: int, executable: bool) -> None:
        sha = self.sha
        sha.update((NODE_EXECUTABLE if executable else NODE_REGULAR) + u64_le(size))
        start = self.offset
        if self.cdc is not None and size > SMALL_BLOB:  # read once, whole: hashed, cut, each chunk hashed and appended
            with open(path, "rb", buffering=0) as f:
                data = f.read()
            sha.update(data)
            blob = blake3.blake3(data).digest()
            for c in self.cdc.cut_buf(data):
                self.rows.append((blake3.blake3(c.data).digest(), len(c.data), self.offset))
                self.offset += os.write(self.pack, c.data)
        else:
            digest = blake3.blake3()
            with open(path, "rb", buffering=0) as f:
                while block := f.read(BLOCK):
                    digest.update(block)
                    sha.update(block)
                    self.offset += os.write(self.pack, block)
            blob = digest.digest()
        sha.update(padding(size) + TOK_CLOSE)
        if self.writeback and self.offset - self.started >= WRITEBACK:
            self.libc.sync_file_range(self.pack, self.started, self.offset - self.started, SYNC_FILE_RANGE_WRITE)
            self.started = self.offset
        self.rows.append((blob, size, start))

    def node(self, path: bytes) -> None:
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode):
            self.file(path, st.st_size, bool(st.st_mode & 0o100))
        elif stat.S_ISLNK(st.st_mode):
            self.sha.update(NODE_SYMLINK + encode_str(os.readlink(path)) + TOK_CLOSE)
        else:
            self.sha.update(NODE_DIRECTORY)
            for name in sorted(os.listdir(path)):
                self.sha.update(ENTRY_PREFIX + encode_str(name) + TOK_NODE)
                self.node(os.path.join(path, name))
                self.sha.update(TOK_CLOSE)
            self.sha.update(TOK_CLOSE)

    def finish(self) -> str:
        os.fsync(self.pack)
        self.db.execute("BEGIN")
        self.db.executemany("INSERT OR IGNORE INTO blobs VALUES (?, ?, ?)", self.rows)
        self.db.execute("COMMIT")
        if self.libc.syncfs(self.pack) != 0:
            raise OSError(ctypes.get_errno(), "syncfs")
        os.close(self.pack)
        self.db.close()
        return nixbase32.encode(self.sha.digest())


def main() -> None:
    args = sys.argv[1:]
    threads, chunk = 1, False
    while args[:1] in (["--threads"], ["--chunk"]):
        if args[0] == "--chunk":
            chunk, args = True, args[1:]
        else:
            threads, args = int(args[1]), args[2:]
    tree, store = os.fsencode(args[0]), args[1]
    floor = Floor(store, threads, chunk)
    floor.sha.update(NAR_MAGIC)
    floor.node(tree)
    print(floor.finish())


if __name__ == "__main__":
    main()

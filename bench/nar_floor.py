"""The floor of serving one chunked file's NAR over HTTP with every byte verified before it is sent.

A peer for ``bench/bridge.py``: the least work any server must do to send the
NAR of a big file kept as zstd-framed chunk objects (the embedded store's
layout) while checking each byte before it leaves, with nothing else — no
store API, no asyncio, no HTTP library, no request parsing beyond the blank
line, no access line, no metrics::

    python bench/nar_floor.py PORT NAR_FILE BLOB_HEX CHUNK_LIST
    python bench/nar_floor.py --verify BLOB_HEX CHUNK_LIST

``--verify`` reads and checks the blob the same way and sends it nowhere: the
floor of a verifying reader of this layout (``bench/fuse.py``'s floor).

``CHUNK_LIST`` names the blob's chunk objects in order, one path a line; the
NAR file (the ``file://`` cache's copy) gives only the NAR framing before and
after the contents (a few dozen bytes, read once at start).  For every GET the
server answers ``200`` with the NAR: each chunk object is read and decompressed
on one of two threads (into buffers reused from chunk to chunk) and checked
against the BLAKE3 it is named by, before it is sent, 16 chunks ahead; the
chunks also go, in order, into one BLAKE3 of the whole blob on a third thread,
compared with the blob's digest before the last chunk is sent (what ties the
chunk list to the blob, as in the bridge).
A mismatch closes the connection without the rest of the body.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import blake3
import zstandard

AHEAD = 16
SLOTS = AHEAD + 4
_local = threading.local()


def _chunk(path: str, out: bytearray) -> memoryview:
    """One chunk object read and decompressed into ``out`` (reused memory), checked against its name."""
    frame = getattr(_local, "frame", None)
    size = os.stat(path).st_size
    if frame is None or len(frame) < size:
        frame = _local.frame = bytearray(size)
    fd = os.open(path, os.O_RDONLY)
    try:
        got = os.readv(fd, [memoryview(frame)[:size]])
    finally:
        os.close(fd)
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()  # one per thread: a context is not shared
    reader = dctx.stream_reader(memoryview(frame)[:got])
    view, at = memoryview(out), 0
    while n := reader.readinto(view[at:]):
        at += n
    data = view[:at]
    if blake3.blake3(data, max_threads=1).hexdigest() != path.rsplit("/", 1)[1]:
        raise ValueError(f"{path}: BLAKE3 mismatch")
    return data


def verified_chunks(blob: bytes, chunks: list[tuple[str, int]]) -> Iterator[memoryview]:
    """The blob's chunks in order, each verified before it is yielded; the last one only once the whole blob's
    BLAKE3 (on a thread of its own) matches ``blob``.  A view is valid until the next one is asked for."""
    biggest = max(size for _, size in chunks)
    slots = [bytearray(biggest) for _ in range(SLOTS)]
    hashed: list[Future[blake3.blake3] | None] = [None] * SLOTS
    whole = blake3.blake3(max_threads=1)
    with ThreadPoolExecutor(2) as readers, ThreadPoolExecutor(1) as hasher:

        def submit(k: int) -> Future[memoryview]:
            slot = hashed[k % SLOTS]
            if slot is not None:
                slot.result()  # the blob hash is past this slot's last chunk (used already)
            return readers.submit(_chunk, chunks[k][0], slots[k % SLOTS])

        pending: deque[Future[memoryview]] = deque(submit(k) for k in range(min(AHEAD, len(chunks))))
        for k in range(len(chunks)):
            data = pending.popleft().result()
            hashed[k % SLOTS] = done = hasher.submit(whole.update, data)
            if k + AHEAD < len(chunks):
                pending.append(submit(k + AHEAD))
            if k == len(chunks) - 1:
                done.result()
                if whole.digest() != blob:
                    raise ValueError("blob: BLAKE3 mismatch")
            yield data


def serve_one(conn: socket.socket, head: bytes, tail: bytes, blob: bytes, chunks: list[tuple[str, int]],
              total: int) -> None:  # fmt: skip
    """Answer one GET on ``conn`` with the NAR of ``total`` bytes, each chunk verified before it is sent."""
    request = b""
    while b"\r\n\r\n" not in request:
        got = conn.recv(65536)
        if not got:
            return
        request += got
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-nix-nar\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n" % total + head
    )
    for data in verified_chunks(blob, chunks):
        conn.sendall(data)
    conn.sendall(tail)


def main() -> None:
    if sys.argv[1] == "--verify":  # the floor of reading the blob in order, verified (bench/fuse.py): no socket
        blob, chunks = bytes.fromhex(sys.argv[2]), _sizes(Path(sys.argv[3]).read_text().split())
        for _ in verified_chunks(blob, chunks):
            pass
        return
    port, nar_file, blob_hex, chunk_list = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    chunks = _sizes(chunk_list.read_text().split())
    contents = sum(size for _, size in chunks)
    nar_size = nar_file.stat().st_size
    head_len = nar_size - contents - (-contents % 8) - 16  # the padding, then the ")" token close the NAR
    with open(nar_file, "rb") as f:
        head = f.read(head_len)
        f.seek(head_len + contents)
        tail = f.read()
    listener = socket.create_server(("127.0.0.1", port))
    print("listening", flush=True)
    while True:
        conn, _ = listener.accept()
        with conn:
            try:
                serve_one(conn, head, tail, bytes.fromhex(blob_hex), chunks, nar_size)
            except (OSError, ValueError) as e:
                print(f"floor: {e}", file=sys.stderr, flush=True)


def _sizes(chunks: list[str]) -> list[tuple[str, int]]:
    """Each chunk object with its decompressed size (from its zstd frame header)."""
    sized = []
    for path in chunks:
        with open(path, "rb") as f:
            size = zstandard.frame_content_size(f.read(18))
        if size < 0:
            raise SystemExit(f"{path}: the zstd frame does not record its size")
        sized.append((path, size))
    return sized


if __name__ == "__main__":
    main()

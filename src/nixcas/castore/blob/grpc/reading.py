"""Reading blobs over gRPC: one ``Read`` stream per blob; chunked blobs cut from one stream or fetched by chunk."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, TypeAlias, cast

import grpc
import grpc.aio

from nixcas._proto.tvix.castore.protos import rpc_blobstore_pb2 as blob_pb
from nixcas.castore.blob.base import BlobReader, ChunkMeta, check_chunk, resolve_seek
from nixcas.castore.blob.chunked import ChunkedReader
from nixcas.castore.digest import B3Digest
from nixcas.castore.grpc.status import client_errors
from nixcas.errors import StorageError

if TYPE_CHECKING:
    from nixcas.castore.blob.grpc.client import GrpcBlobService


READ_WINDOW: Final = 8 << 20
"""Bytes of chunks a sequential read of a chunked blob fetches ahead, in parallel ``Read`` calls."""

ReadCall: TypeAlias = "grpc.aio.UnaryStreamCall[blob_pb.ReadBlobRequest, bytes]"


async def next_data(call: ReadCall) -> bytes:
    """The next non-empty data of a Read stream; ``b""`` at its end."""
    while True:
        data = await call.read()
        if data is grpc.aio.EOF:
            return b""
        if data:
            return cast(bytes, data)


class GrpcBlobReader(BlobReader):
    """Streams one Read call; seeking forward skips, seeking backward restarts the call."""

    def __init__(self, service: GrpcBlobService, digest: B3Digest, call: ReadCall, first: bytes) -> None:
        self._service = service
        self._digest = digest
        self._call: ReadCall | None = None
        self._start(call, first)
        self._size: int | None = None

    def _start(self, call: ReadCall, first: bytes) -> None:
        if self._call is not None:
            self._call.cancel()
        self._call = call
        self._buffer = memoryview(first)
        self._stream_pos = 0  # blob offset of the start of _buffer
        self._pos = 0
        self._eof = not first

    def _where(self) -> str:
        return f"{self._service.url}: Read {self._digest.hex()}"

    async def _next_message(self) -> bool:
        """Move to the next message; ``False`` at the end of the stream."""
        self._stream_pos += len(self._buffer)
        self._buffer = memoryview(b"")
        if self._eof or self._call is None:
            return False
        async with client_errors(self._where()):
            data = await next_data(self._call)
        if not data:
            self._eof = True
            self._size = self._stream_pos
            return False
        self._buffer = memoryview(data)
        return True

    async def read(self, n: int = -1) -> bytes:
        parts: list[bytes] = []
        remaining = n
        while remaining != 0:
            offset = self._pos - self._stream_pos
            if offset >= len(self._buffer):  # also skips what a forward seek jumped over
                if (parts and n >= 0) or not await self._next_message():
                    break
                continue
            take = len(self._buffer) - offset if n < 0 else min(len(self._buffer) - offset, remaining)
            if offset == 0 and take == len(self._buffer):
                parts.append(cast(bytes, self._buffer.obj))  # a whole message: its bytes, no copy
            else:
                parts.append(bytes(self._buffer[offset : offset + take]))
            self._pos += take
            remaining -= take if n >= 0 else 0
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _blob_size(self) -> int:
        if self._size is None:
            chunks = await self._service.chunks(self._digest)
            if chunks:
                self._size = sum(c.size for c in chunks)
            else:  # no chunk list: count a second stream through
                started = await self._service._start_read(self._digest)
                if started is None:
                    raise StorageError(f"{self._where()}: blob disappeared")
                call, data = started
                size = 0
                async with client_errors(self._where()):
                    while data:
                        size += len(data)
                        data = await next_data(call)
                self._size = size
        return self._size

    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        size = await self._blob_size() if whence == io.SEEK_END else 0
        target = resolve_seek(self._pos, size, offset, whence)
        if target < self._stream_pos:
            started = await self._service._start_read(self._digest)
            if started is None:
                raise StorageError(f"{self._where()}: blob disappeared")
            self._start(*started)
        self._pos = target
        return target

    def tell(self) -> int:
        return self._pos

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None


class ChunkStream:
    """Chunks of one blob in order from a single ``Read`` stream; any other chunk by its own ``Read``.

    :meth:`fetch` queues a chunk on the stream when it follows the last
    chunk queued (requests take their turn on a lock, in the order the
    reader made them); the first request, at offset 0, starts the stream.
    A chunk elsewhere, or any chunk once the stream is given up (a queued
    fetch cancelled, a chunk that failed), goes through
    :meth:`GrpcBlobService._fetch_chunk`.
    """

    def __init__(self, service: GrpcBlobService, digest: B3Digest) -> None:
        self._service = service
        self._digest = digest
        self._lock = asyncio.Lock()
        self._call: ReadCall | None = None
        self._pending = memoryview(b"")
        self._position = 0  # blob offset of the next byte the stream gives
        self._claimed = 0  # blob offset after the last chunk queued on the stream
        self._usable = True

    def _where(self) -> str:
        return f"{self._service.url}: Read {self._digest.hex()}"

    async def fetch(self, chunk: ChunkMeta, offset: int) -> bytes:
        if self._usable and offset == self._claimed:  # the chunk after the last one queued on the stream
            self._claimed += chunk.size
            try:
                async with self._lock:
                    if self._usable and offset == self._position:
                        return check_chunk(chunk, await self._take(chunk.size), self._where())
            except BaseException:
                self.close()
                raise
            self.close()  # a chunk queued before this one was given up: the stream is out of step
        return await self._service._fetch_chunk(chunk)

    async def _take(self, n: int) -> bytes:
        parts: list[bytes] = []
        need = n
        while need:
            if not self._pending:
                if self._call is None:
                    started = await self._service._start_read(self._digest)
                    if started is None:
                        raise StorageError(f"{self._where()}: blob disappeared")
                    self._call, data = started
                else:
                    async with client_errors(self._where()):
                        data = await next_data(self._call)
                if not data:
                    raise StorageError(f"{self._where()}: the stream ended before the chunks its list declares")
                self._pending = memoryview(data)
            part = self._pending[:need]
            parts.append(bytes(part))
            self._pending = self._pending[len(part) :]
            need -= len(part)
        self._position += n
        return b"".join(parts)

    def close(self) -> None:
        self._usable = False
        self._pending = memoryview(b"")
        if self._call is not None:
            self._call.cancel()
            self._call = None


class StreamedChunkedReader(ChunkedReader):
    """A :class:`ChunkedReader` fed by a :class:`ChunkStream` (which it closes)."""

    def __init__(self, stream: ChunkStream, chunks: Sequence[ChunkMeta]) -> None:
        super().__init__(stream.fetch, chunks, window_bytes=READ_WINDOW)
        self._stream = stream

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            self._stream.close()

"""The NAR and blob downloads of nar-bridge.

``GET|HEAD /nar/<prefix>-castore/<node>?narsize=N`` serves the NAR of a castore
node (ranges, zstd/gzip content encoding), ``GET|HEAD /nar/<file hash>.nar[.…]``
an uploaded NAR file by name, and ``GET /blob/<hex>?start=N&length=M`` a bao
slice of a blob, verifiable by the client.  Every NAR comes from a
:class:`~nixcas.store.nar.source.NarSource`; whatever can fail is checked
before the headers.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncGenerator
from typing import Final

from aiohttp import web

from nixcas.bridge.base import NAR_PREFIXES, BridgeBase, fail
from nixcas.bridge.http import ByteRange, Unsatisfiable, choose_encoding, encode_stream, parse_range
from nixcas.castore.digest import B3Digest
from nixcas.castore.nodes import Node
from nixcas.errors import NixcasError, NotFoundError, StorageError, ValidationError
from nixcas.store.nar.source import NarSource
from nixcas.store.narinfo import parse_nar_file_name
from nixcas.store.narurl import decode_root_node
from nixcas.urls import is_decimal

__all__ = ["IMMUTABLE", "MAX_SLICE_LENGTH", "NAR_TYPE", "NarDownloadRoutes"]

log = logging.getLogger("nixcas.bridge")

NAR_TYPE: Final = "application/x-nix-nar"
IMMUTABLE: Final = "max-age=31536000, immutable"
MAX_SLICE_LENGTH: Final = 4 << 20
"""The longest range ``GET /blob/<hex>`` serves as one bao slice (it is built in memory)."""
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


class NarDownloadRoutes(BridgeBase):
    """``GET|HEAD /nar/…`` (a castore node's NAR, an uploaded NAR file) and ``GET /blob/<hex>`` (a bao slice)."""

    @staticmethod
    def _query_int(request: web.Request, key: str, what: str) -> int:
        """The one ``?key=N`` of ``request`` (a non-negative decimal); else a :class:`ValidationError`."""
        values = request.query.getall(key, [])
        if len(values) != 1 or not is_decimal(values[0]) or len(values[0]) > 20:
            raise ValidationError(f"{what} URL needs exactly one ?{key}=N (a non-negative integer)")
        return int(values[0])

    @classmethod
    def _parse_narsize(cls, request: web.Request) -> int:
        return cls._query_int(request, "narsize", "NAR")

    async def get_nar(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["prefix"] not in NAR_PREFIXES:
            raise fail(web.HTTPNotFound, f"unknown NAR URL prefix {request.match_info['prefix']!r}")
        node = decode_root_node(request.match_info["node"])
        return await self._serve_nar(request, node, self._parse_narsize(request))

    async def _serve_nar(
        self, request: web.Request, node: Node, expected_size: int, *, compression: str = "none"
    ) -> web.StreamResponse:
        """The NAR of ``node`` (ranges, content encoding), or the whole NAR file compressed with ``compression``."""
        nar = self._nar(node)
        size = await nar.size()
        await nar.check()  # before any header: a 200 would promise the bytes
        if size != expected_size:
            raise ValidationError(f"wrong narsize: the NAR of this node is {size} bytes, not {expected_size}")
        if compression != "none":
            response = web.StreamResponse(headers={"Cache-Control": IMMUTABLE})
            return await self._send(request, response, nar, None, compression)
        headers = {"Cache-Control": IMMUTABLE, "Accept-Ranges": "bytes", "Vary": "Accept-Encoding"}
        try:
            byte_range = parse_range(request.headers.get("Range"), size)
        except Unsatisfiable:
            content_range = {"Content-Range": f"bytes */{size}"}
            raise fail(web.HTTPRequestRangeNotSatisfiable, "range not satisfiable", **content_range) from None
        head = request.method == "HEAD"
        encoding = None if byte_range is not None or head else choose_encoding(request.headers.get("Accept-Encoding"))
        response = web.StreamResponse(status=200 if byte_range is None else 206, headers=headers)
        if byte_range is not None:
            response.headers["Content-Range"] = f"bytes {byte_range.start}-{byte_range.end - 1}/{size}"
        if encoding is not None:
            response.headers["Content-Encoding"] = encoding
        else:
            response.content_length = size if byte_range is None else byte_range.length
        return await self._send(request, response, nar, byte_range, encoding)

    async def _send(
        self,
        request: web.Request,
        response: web.StreamResponse,
        nar: NarSource,
        byte_range: ByteRange | None,
        encoding: str | None,
    ) -> web.StreamResponse:
        response.content_type = NAR_TYPE
        await response.prepare(request)
        if request.method == "HEAD":
            await response.write_eof()
            return response
        source = nar.stream() if byte_range is None else nar.range(byte_range.start, byte_range.length)
        chunks: AsyncGenerator[bytes | memoryview, None] = source
        if encoding is not None:
            chunks = encode_stream(source, encoding)
        try:
            async for chunk in chunks:
                await response.write(chunk)
        except NixcasError as e:  # the headers are out: all that is left is to cut the body short
            log.error("GET %s: NAR rendering failed after the headers were sent: %s", request.path, e)
            if request.transport is not None:
                request.transport.abort()
            return response
        finally:  # reads ahead stop at once when the client went away
            await chunks.aclose()
            await source.aclose()
        await response.write_eof()
        return response

    async def get_nar_file(self, request: web.Request) -> web.StreamResponse:
        """An uploaded NAR file by the name it was uploaded under.

        Only its NAR is kept, so a compressed name is served recompressed (fast
        presets): Nix checks the NAR hash, not the file hash, and a client that
        cached the narinfo from its own upload still finds the file.
        """
        name = request.match_info["name"]
        file_sha256, compression = parse_nar_file_name(name)
        nar = await self.index.find_file(file_sha256, compression)
        if nar is None:
            raise fail(web.HTTPNotFound, f"{name}: no such NAR file")
        try:  # checks, before any header, that the NAR's directories and blobs are all still stored
            return await self._serve_nar(request, nar.node, nar.nar_size, compression=compression)
        except NotFoundError:  # collected before its narinfo came (see upload._still_stored): Nix uploads it again
            raise fail(web.HTTPNotFound, f"{name}: no such NAR file") from None

    # -- verified blob slices -----------------------------------------------------------

    async def get_blob_slice(self, request: web.Request) -> web.Response:
        """``GET /blob/<hex>?start=N&length=M``: a bao slice of the blob (16 KiB groups), verifiable by the client.

        The body is the 8-byte little-endian blob size, then pre-order the
        parent nodes and chunk groups on the paths to the range: what a bao
        decoder checks against the blob's BLAKE3 before using a byte.  The
        server checks it too before sending (a damaged store gives a 500).
        """
        from nixcas.castore import bao  # NumPy: loaded only when slices are asked for

        name = request.match_info["name"]
        if not _HEX_DIGEST.fullmatch(name):
            raise ValidationError("a blob URL names the blob by 64 lowercase hex digits")
        digest = B3Digest(bytes.fromhex(name))
        start, length = (
            self._query_int(request, "start", "blob slice"),
            self._query_int(request, "length", "blob slice"),
        )
        if not 0 < length <= MAX_SLICE_LENGTH:
            raise ValidationError(f"length must be 1..{MAX_SLICE_LENGTH}")
        outboard = await self.blobs.outboard(digest)
        if outboard is None:
            raise NotFoundError(f"blob {name} not found")
        size = bao.outboard_size(outboard)
        if start + length > size:
            raise fail(web.HTTPRequestRangeNotSatisfiable, f"range past the end of the {size}-byte blob")
        lo, hi = bao.slice_span(size, start, length)
        async with self._slices:  # each slice is built in memory: a few at a time
            reader = await self.blobs.open_read(digest)
            if reader is None:
                raise NotFoundError(f"blob {name} not found")
            parts: list[bytes] = []
            async with reader:
                await reader.seek(lo)
                remaining = hi - lo
                while remaining and (block := await reader.read(min(remaining, 1 << 20))):
                    parts.append(block)
                    remaining -= len(block)
            if remaining:
                raise StorageError(f"blob {name} ended {remaining} bytes early")
            data = b"".join(parts)
            slice_ = await asyncio.to_thread(bao.extract_slice, data, outboard, start, length, data_offset=lo)
            await asyncio.to_thread(bao.verify_slice, digest, slice_, start, length)
            return web.Response(
                body=slice_,
                content_type="application/octet-stream",
                headers={"Cache-Control": IMMUTABLE, "X-Blob-Size": str(size)},
            )

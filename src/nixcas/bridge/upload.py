"""The uploads of nar-bridge: ``PUT /nar/<file hash>.nar[.…]``, ``PUT /<hash>.narinfo``, ``PUT /<hash>.ls``.

A NAR is decompressed, verified against its file hash and ingested; its
directories are committed only after it verified, and its NarHash is indexed
after that.  A narinfo then registers a PathInfo for an uploaded NAR (checked
against it, its references and its content address), last, so nothing an
invalid upload sent becomes visible.  Writes need ``allow_writes`` or a
``write`` token (:meth:`~nixcas.bridge.base.BridgeBase._check_write`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from aiohttp import web

from nixcas.bridge.base import BridgeBase, RequestBody
from nixcas.bridge.narinfo import parse_listing_name
from nixcas.errors import NotFoundError, ValidationError
from nixcas.store import nixbase32
from nixcas.store.compression import FileHashing, decompressing
from nixcas.store.importer import check_content_address
from nixcas.store.nar.ingest import ingest_nar
from nixcas.store.narindex import UploadedNar
from nixcas.store.narinfo import MAX_NARINFO_SIZE, NarInfo, parse_nar_file_name, parse_narinfo_name
from nixcas.store.pathinfo.model import PathInfo
from nixcas.store.store_path import StorePath

__all__ = ["UPLOADS_REMEMBERED", "UploadRoutes"]

log = logging.getLogger("nixcas.bridge")

UPLOADS_REMEMBERED: Final = 1024
"""NARs this process ingested whose index entries it keeps at hand for their narinfo PUT."""


class UploadRoutes(BridgeBase):
    """``PUT`` of a NAR file, a narinfo and a listing."""

    async def put_nar(self, request: web.Request) -> web.Response:
        self._check_write(request)
        name = request.match_info["name"]
        file_sha256, compression = parse_nar_file_name(name)
        body = RequestBody(request)
        if compression == "none":  # the file is the NAR: ingest checks its hash before committing
            node, size, sha256 = await ingest_nar(
                body, self.blobs, self.directories, expected_sha256=file_sha256, sync=self.blob_sync.sync
            )
        else:  # the file's hash is checked at its end, before the NAR's end lets ingest commit
            raw = FileHashing(body, expected_digest=file_sha256, what=f"uploaded file {name}")
            source = decompressing(raw, compression)
            try:
                node, size, sha256 = await ingest_nar(source, self.blobs, self.directories, sync=self.blob_sync.sync)
            finally:
                source.close()
        nar = UploadedNar(sha256, size, node)
        await self.index.add(nar, file_sha256, compression)
        self._uploaded[sha256] = nar
        if len(self._uploaded) > UPLOADS_REMEMBERED:
            self._uploaded.popitem(last=False)
        log.debug("stored NAR %s (%d bytes)", name, size)  # the access line has the request (a line a path costs)
        return web.Response(text="")

    async def put_listing(self, request: web.Request) -> web.Response:
        """Nix uploads a listing with each path when ``write-nar-listing`` is set: read and dropped (it is computed)."""
        self._check_write(request)
        parse_listing_name(request.match_info["name"])
        body = RequestBody(request)
        while await body.read(64 << 10):
            pass
        return web.Response(text="")

    async def _read_limited(self, request: web.Request, limit: int) -> bytes:
        def too_large(size: int) -> web.HTTPException:
            message = f"narinfo larger than {limit} bytes\n"
            return web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size, text=message)

        if request.content_length is not None and request.content_length > limit:
            raise too_large(request.content_length)
        body = RequestBody(request)
        parts: list[bytes] = []
        size = 0
        while data := await body.read(64 << 10):
            size += len(data)
            if size > limit:
                raise too_large(size)
            parts.append(data)
        return b"".join(parts)

    async def put_narinfo(self, request: web.Request) -> web.Response:
        self._check_write(request)
        name = request.match_info["name"]
        digest = parse_narinfo_name(name)
        raw = await self._read_limited(request, MAX_NARINFO_SIZE)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValidationError(f"narinfo is not UTF-8 (byte {e.start})") from None
        narinfo = NarInfo.parse(text)
        if narinfo.store_path.digest != digest:
            raise ValidationError(f"narinfo for {narinfo.store_path} uploaded as {name}")
        nar = self._uploaded.get(narinfo.nar_sha256) or await self.index.get(narinfo.nar_sha256)
        if nar is None:
            raise ValidationError(
                f"{narinfo.store_path}: unknown NarHash sha256:{nixbase32.encode(narinfo.nar_sha256)}; "
                "upload the NAR first"
            )
        if not await self._still_stored(nar):
            raise ValidationError(
                f"{narinfo.store_path}: the NAR with NarHash sha256:{nixbase32.encode(narinfo.nar_sha256)} is no "
                "longer complete in the store (garbage-collected before its narinfo came); upload the NAR again"
            )
        if nar.nar_size != narinfo.nar_size:
            raise ValidationError(
                f"{narinfo.store_path}: NarSize {narinfo.nar_size} differs from the uploaded NAR's {nar.nar_size} bytes"
            )
        info = narinfo.to_path_info(nar.node)
        check_content_address(info)
        await self._check_references(info.store_path, info.references)
        await self.pathinfos.put(info)
        log.debug("registered %s", info.store_path)
        return web.Response(text="")

    async def _still_stored(self, nar: UploadedNar) -> bool:
        """Whether every directory and blob of an uploaded NAR is still in the store.

        The NAR index outlives what it points at when ``nixcas gc`` collects an
        upload whose narinfo never came (nothing roots it until then); such an
        entry must neither make Nix skip the upload nor become a PathInfo.
        """
        try:
            digests = await self._nar(nar.node).blob_digests()
        except NotFoundError:  # a directory is gone
            return False
        return not await self.blobs.missing(digests)  # all at once (the embedded store: one query)

    async def _check_references(self, path: StorePath, references: tuple[StorePath, ...]) -> None:
        """Every reference but the path itself must be registered (under its own name).

        Each is a point read at once where the backend offers one (a local
        database: no hand-off to its thread per reference); the others are
        asked concurrently.
        """
        others = [r for r in references if r != path]
        found: dict[StorePath, PathInfo | None] = {}
        later: list[StorePath] = []
        for r in others:
            raw = self.pathinfos.get_encoded_now(r.digest)
            if raw is False:
                later.append(r)
            else:
                found[r] = None if raw is None else self.pathinfos.decode_stored(r.digest, raw)
        if later:
            found.update(zip(later, await asyncio.gather(*(self.pathinfos.get(r.digest) for r in later)), strict=True))
        missing = [str(r) for r in others if (info := found[r]) is None or info.store_path != r]
        if missing:
            raise ValidationError(f"{path}: references not in the store (upload them first): {', '.join(missing[:5])}")

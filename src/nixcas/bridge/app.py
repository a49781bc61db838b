"""The Nix HTTP binary cache protocol over a blob, a directory and a path info service.

Routes (reference §7, with the differences listed in the README):

=========================================  ==================================================
``GET /nix-cache-info``                    StoreDir, WantMassQuery, Priority
``GET|HEAD /<hash>.narinfo``               the PathInfo as a narinfo (signed on the fly with a key)
``PUT /<hash>.narinfo``                    register a PathInfo for an uploaded NAR
``GET|HEAD /<hash>.ls``                    Nix's NAR listing (JSON, ``narOffset`` per file), from castore
``PUT /<hash>.ls``                         accepted and dropped (Nix uploads it with write-nar-listing)
``GET|HEAD /nar/tvix-castore/<node>?narsize=N``  the NAR of a castore node (also ``snix-castore``);
                                           ranges, zstd/gzip content encoding
``PUT /nar/<file hash>.nar[.xz|.zst|.bz2|.gz]``  upload a NAR (decompressed, verified, ingested)
``GET|HEAD /nar/<file hash>.nar[.…]``      an uploaded NAR file by name (HEAD: does it exist)
=========================================  ==================================================

Access: reads are open unless the bridge is ``private``; writes need ``allow_writes``
or, with tokens (:mod:`nixcas.bridge.auth`), a ``write`` token.  The name of the
token a request authenticated with is ``request.get(USER)`` (for access logs).

Every problem with a request is a 4xx with a one-line reason as the body;
nothing an invalid upload sent becomes visible (directories are committed only
after the NAR verified, the NarHash mapping after that, the PathInfo last).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from nixcas.bridge import DEFAULT_PRIORITY
from nixcas.bridge.auth import Token, Tokens
from nixcas.bridge.groupsync import GroupSync
from nixcas.bridge.http import ByteRange, Unsatisfiable, choose_encoding, encode_stream, parse_range
from nixcas.castore.blob.base import BlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.nodes import Node
from nixcas.castore.proto import encode_node
from nixcas.errors import NixbaseError, NixcasError, NotFoundError, StorageError, ValidationError
from nixcas.ops.web import USER
from nixcas.store import nixbase32
from nixcas.store.compression import FileHashing, UnsupportedCompression, decompressing
from nixcas.store.importer import check_content_address
from nixcas.store.nar.ingest import ingest_nar
from nixcas.store.nar.listing import UnlistableName, check_listable, nar_listing
from nixcas.store.nar.plan import BlobSizeMismatch, fetch_closure
from nixcas.store.nar.source import NarSource
from nixcas.store.narindex import NarIndex, UploadedNar
from nixcas.store.narinfo import MAX_NARINFO_SIZE, NarInfo, parse_nar_file_name, parse_narinfo_name
from nixcas.store.narurl import CASTORE_NAR_PREFIXES, decode_root_node
from nixcas.store.pathinfo.base import PathInfoService
from nixcas.store.signing import SigningKey
from nixcas.store.store_path import ENCODED_DIGEST_LEN, STORE_DIR, StorePath
from nixcas.urls import is_decimal

__all__ = ["NAR_PREFIXES", "PUBLIC_PATHS", "USER", "NarBridge", "nar_url"]

log = logging.getLogger("nixcas.bridge")

NAR_PREFIXES: Final = CASTORE_NAR_PREFIXES
NAR_TYPE: Final = "application/x-nix-nar"
NARINFO_TYPE: Final = "text/x-nix-narinfo"
LISTING_TYPE: Final = "application/json"
IMMUTABLE: Final = "max-age=31536000, immutable"
MAX_SLICE_LENGTH: Final = 4 << 20
"""The longest range ``GET /blob/<hex>`` serves as one bao slice (it is built in memory)."""
MAX_SLICES_AT_ONCE: Final = 4
"""Slices built concurrently; more requests wait (so slices hold at most ~16 MiB of blob data, times a few copies)."""
NARINFO_CACHE: Final = 8192
"""Rendered narinfos kept per process (each a few hundred bytes, with the record it was rendered from)."""
UPLOADS_REMEMBERED: Final = 1024
"""NARs this process ingested whose index entries it keeps at hand for their narinfo PUT."""
_NARINFO_HEADERS: Final = {"Content-Type": NARINFO_TYPE}
_NARINFO_PATH_LEN: Final = 1 + ENCODED_DIGEST_LEN + len(".narinfo")
Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_TOKEN: Final = web.RequestKey("nixcas.token", Token)
# USER (from nixcas.ops.web): ``request.get(USER)`` is the name of the token the request authenticated with.
PUBLIC_PATHS: Final = frozenset({"/", "/healthz"})
"""Paths a ``private`` bridge serves without a token (nothing of the store is in them)."""
_CHALLENGE: Final = {"WWW-Authenticate": 'Basic realm="nar-bridge", Bearer realm="nar-bridge"'}


def nar_url(node: Node, nar_size: int, prefix: str = NAR_PREFIXES[0]) -> str:
    """``nar/<prefix>/<base64url root node>?narsize=N``: a NAR URL that names its content completely."""
    encoded = base64.urlsafe_b64encode(encode_node(b"", node)).rstrip(b"=").decode()
    return f"nar/{prefix}/{encoded}?narsize={nar_size}"


def parse_listing_name(name: str) -> bytes:
    """``<32 nixbase32 chars>.ls`` → the 20-byte store path digest; :class:`ValidationError` otherwise."""
    hash_part, dot, ext = name.partition(".")
    if ext != "ls" or not dot or len(hash_part) != ENCODED_DIGEST_LEN:
        raise ValidationError(f"invalid listing name {name[:100]!r}: expected <32 nixbase32 characters>.ls")
    try:
        return nixbase32.decode(hash_part)
    except NixbaseError as e:
        raise ValidationError(f"invalid listing name {name[:100]!r}: {e}") from None


async def _chunks(source: Iterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in source:
        yield chunk


def _fail(status: type[web.HTTPException], message: str, **headers: str) -> web.HTTPException:
    return status(text=message + "\n", headers=headers or None)


class TruncatedUpload(ValidationError):
    """The request body ended before its announced length, or the client went away."""


class _Body:
    """A request body as a byte source; a broken connection is a :class:`TruncatedUpload`."""

    def __init__(self, request: web.Request) -> None:
        self._content = request.content

    async def read(self, n: int, /) -> bytes:
        try:
            return await self._content.read(n)
        except (HttpProcessingError, ConnectionError, asyncio.IncompleteReadError) as e:
            raise TruncatedUpload(f"upload truncated: {getattr(e, 'message', None) or e}") from None


class NarBridge:
    """The HTTP binary cache over a store; :meth:`application` builds the aiohttp app."""

    def __init__(
        self,
        blobs: BlobService,
        directories: DirectoryService,
        pathinfos: PathInfoService,
        index: NarIndex,
        *,
        priority: int = DEFAULT_PRIORITY,
        allow_writes: bool = False,
        token: str | None = None,
        tokens: Tokens | None = None,
        private: bool = False,
        sign_key: SigningKey | None = None,
        nar_prefix: str = NAR_PREFIXES[0],
    ) -> None:
        self.blobs = blobs
        self.directories = directories
        self.pathinfos = pathinfos
        self.index = index
        self._slices = asyncio.Semaphore(MAX_SLICES_AT_ONCE)
        self.priority = priority
        if token is not None:
            tokens = Tokens.single(token)
        if private and tokens is None:
            raise ValueError("a private bridge needs tokens")
        self.tokens = tokens
        """Who may read (``private``) and write; replaced as a whole when the token file is reloaded."""
        self.private = private
        self.allow_writes = allow_writes or tokens is not None
        self.sign_key = sign_key
        self.nar_prefix = nar_prefix
        self.blob_sync = GroupSync(blobs.sync)
        """Concurrent uploads share their blob durability barriers (group commit)."""
        self._narinfos: OrderedDict[bytes, tuple[bytes, bytes]] = OrderedDict()
        """digest -> (the stored PathInfo message, the narinfo rendered from exactly it)."""
        self._digests: dict[str, bytes] = {}
        """Store path hash parts (nixbase32) the lean narinfo route decoded -> their digests."""
        self._uploaded: OrderedDict[bytes, UploadedNar] = OrderedDict()
        """NarHash -> the NAR index entry this process added (entries never change for a NarHash)."""
        self._cache_info = f"StoreDir: {STORE_DIR}\nWantMassQuery: 1\nPriority: {priority}\n".encode()

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._authenticate])
        r = app.router
        r.add_get("/", self.hello)
        r.add_get("/nix-cache-info", self.cache_info)
        r.add_get(r"/{name:[^/]+\.narinfo}", self.get_narinfo)
        r.add_put(r"/{name:[^/]+\.narinfo}", self.put_narinfo)
        r.add_get(r"/{name:[^/]+\.ls}", self.get_listing)
        r.add_put(r"/{name:[^/]+\.ls}", self.put_listing)
        r.add_get(r"/nar/{prefix:[a-z]+-castore}/{node}", self.get_nar)
        r.add_get(r"/nar/{name:[^/]+}", self.get_nar_file)
        r.add_get(r"/blob/{name}", self.get_blob_slice)
        r.add_put(r"/nar/{name:[^/]+}", self.put_nar)
        return app

    # -- errors and access ---------------------------------------------------------

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except UnsupportedCompression as e:
            raise _fail(web.HTTPUnsupportedMediaType, str(e)) from None
        except NotFoundError as e:
            raise _fail(web.HTTPNotFound, str(e)) from None
        except ValidationError as e:
            log.info("%s %s: %s", request.method, request.path, e)
            raise _fail(web.HTTPBadRequest, str(e)) from None
        except BlobSizeMismatch as e:  # the node asked for contradicts the stored blob
            log.info("%s %s: %s", request.method, request.path, e)
            raise _fail(web.HTTPConflict, str(e)) from None
        except StorageError as e:
            log.error("%s %s: %s", request.method, request.path, e)
            raise _fail(web.HTTPInternalServerError, f"storage error: {e}") from None

    @property
    def auth_configured(self) -> bool:
        """Whether requests are checked against tokens (writes then need a ``write`` token)."""
        return self.tokens is not None

    @web.middleware
    async def _authenticate(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Note the token a request carries (``request[USER]``); a private bridge's reads need one."""
        tokens = self.tokens
        if tokens is not None:
            token = tokens.identify(request.headers.get("Authorization"))
            if token is not None:
                request[_TOKEN] = token
                request[USER] = token.name
            elif self.private and request.method in ("GET", "HEAD") and request.path not in PUBLIC_PATHS:
                raise _fail(
                    web.HTTPUnauthorized,
                    "this cache is private: reading needs a token (Authorization: Bearer TOKEN, or Basic with "
                    "TOKEN as password, e.g. from Nix's netrc-file)",
                    **_CHALLENGE,
                )
        return await handler(request)

    def _check_write(self, request: web.Request) -> None:
        if not self.allow_writes:
            raise _fail(web.HTTPForbidden, "writes are disabled (start nar-bridge with --allow-writes or --token-file)")
        if self.tokens is None:
            return
        token = request.get(_TOKEN)
        if token is None:
            raise _fail(
                web.HTTPUnauthorized,
                "writing needs a write token (Authorization: Bearer TOKEN, or Basic with TOKEN as password)",
                **_CHALLENGE,
            )
        if not token.can_write:
            raise _fail(web.HTTPForbidden, f"token {token.name!r} may only read")

    # -- small routes -----------------------------------------------------------------

    async def hello(self, request: web.Request) -> web.Response:
        return web.Response(text="Hello from nar-bridge (nixcas)\n")

    async def cache_info(self, request: web.Request) -> web.Response:
        return web.Response(body=self._cache_info, headers={"Content-Type": "text/x-nix-cache-info"})

    # -- narinfo ------------------------------------------------------------------------

    def front(
        self,
        app: web.Application,
        handler: Handler,
        serving: Callable[[], bool] = lambda: True,
        *,
        known: Sequence[object] = (),
    ) -> Handler:
        """The server's request handler: the lean narinfo route in front of ``handler`` (``app``'s router).

        ``GET /<32 nixbase32 chars>.narinfo`` of a stored path whose record the
        path info service reads at once (a local SQLite point read) is
        answered here, without routing or middlewares; every other request,
        and every narinfo this cannot answer at once (absent, damaged, busy
        database, a malformed name), goes to ``handler``, which answers it as
        before.  What the middlewares would do to such a request is done here:
        the route is named for the access line and the metrics (written by the
        runner's access logger); a private bridge, a request carrying
        credentials, a server no longer ``serving`` (draining) and traced
        requests take the full route.  Only taken while ``app`` has no
        middleware but the bridge's own and the ``known`` ones (the runner's
        observation and draining), so any other middleware sees every request.
        """
        own = (self._errors, self._authenticate, *known)
        if any(middleware not in own for middleware in app.middlewares):
            return handler
        from nixcas.ops import tracing
        from nixcas.ops.web import ROUTE

        headers = _NARINFO_HEADERS
        answer = self._narinfo_now

        async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
            path = request.raw_path
            lean = len(path) == _NARINFO_PATH_LEN and path[0] == "/" and path.endswith(".narinfo")
            if (
                lean
                and request.method == "GET"
                and not self.private
                and "Authorization" not in request.headers
                and serving()
                and not tracing.enabled()
            ):
                body = answer(path[1 : 1 + ENCODED_DIGEST_LEN])
                if body is not None:
                    request[ROUTE] = "get_narinfo"
                    return web.Response(body=body, headers=headers)
            return await handler(request)

        return dispatch

    def _narinfo_now(self, hash_part: str) -> bytes | None:
        """The narinfo of ``hash_part`` if the store answers at once and has a valid record; else ``None``."""
        try:
            digest = self._digests.get(hash_part)
            if digest is None:
                digest = nixbase32.decode(hash_part)
                if len(self._digests) >= NARINFO_CACHE:
                    self._digests.clear()
                self._digests[hash_part] = digest
            raw = self.pathinfos.get_encoded_now(digest)
            if not raw:  # False (not at once) or None (absent): the route answers it
                return None
            return self._rendered(digest, raw)
        except (NixcasError, ValueError):  # malformed, damaged, unreadable: the route answers (and logs) it
            return None

    async def get_narinfo(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        digest = parse_narinfo_name(name)
        try:
            raw = self.pathinfos.get_encoded_now(digest)  # a local point read, no thread hand-off
            if raw is False:
                raw = await self.pathinfos.get_encoded(digest)
        except ValidationError as e:  # an upstream record that failed verification: not available here
            log.warning("GET %s: %s", name, e)
            raise _fail(web.HTTPNotFound, f"{name}: {e}") from None
        if raw is None:
            raise _fail(web.HTTPNotFound, f"{name}: no such path")
        return web.Response(body=self._rendered(digest, raw), headers=_NARINFO_HEADERS)

    def _rendered(self, digest: bytes, raw: bytes) -> bytes:
        """The narinfo of the stored record ``raw``: rendered once per distinct record, then reused.

        The cache is keyed by the record's exact bytes, so a record that
        changed since (a signature added, another worker's or process's
        write) is rendered anew; a deleted one is never looked up here.
        """
        cached = self._narinfos.get(digest)
        if cached is not None and cached[0] == raw:
            self._narinfos.move_to_end(digest)
            return cached[1]
        info = self.pathinfos.decode_stored(digest, raw)
        if self.sign_key is not None:
            info = self.sign_key.sign_path_info(info)
        url = nar_url(info.node, info.nar_size, self.nar_prefix)
        body = NarInfo.from_path_info(info, url, file_size=info.nar_size).render().encode()
        self._narinfos[digest] = (raw, body)
        self._narinfos.move_to_end(digest)
        if len(self._narinfos) > NARINFO_CACHE:
            self._narinfos.popitem(last=False)
        return body

    # -- NAR listings ---------------------------------------------------------------------

    async def get_listing(self, request: web.Request) -> web.StreamResponse:
        """Nix's listing of the path's NAR, computed from its directories (no blob is read).

        Everything that can fail is checked before the headers: the path, its
        directory closure, and that every name and symlink target is UTF-8
        (else 422: JSON cannot hold it).  The body streams in chunks.
        """
        name = request.match_info["name"]
        digest = parse_listing_name(name)
        try:
            info = await self.pathinfos.get(digest)
        except ValidationError as e:  # an upstream record that failed verification: not available here
            log.warning("GET %s: %s", name, e)
            raise _fail(web.HTTPNotFound, f"{name}: {e}") from None
        if info is None:
            raise _fail(web.HTTPNotFound, f"{name}: no such path")
        closure = await fetch_closure(info.node, self.directories)
        try:
            check_listable(info.node, closure)
        except UnlistableName as e:
            raise _fail(web.HTTPUnprocessableEntity, f"{info.store_path}: {e}") from None
        head = request.method == "HEAD"
        encoding = None if head else choose_encoding(request.headers.get("Accept-Encoding"))
        response = web.StreamResponse(headers={"Vary": "Accept-Encoding"})
        response.content_type = LISTING_TYPE
        if encoding is not None:
            response.headers["Content-Encoding"] = encoding
        await response.prepare(request)
        if head:
            await response.write_eof()
            return response
        chunks = _chunks(nar_listing(info.node, closure))
        if encoding is not None:
            chunks = encode_stream(chunks, encoding)
        try:
            async for chunk in chunks:
                await response.write(chunk)
        except NixcasError as e:  # e.g. a tree too deep for a NAR: the headers are out, cut the body short
            log.error("GET %s: listing failed after the headers were sent: %s", request.path, e)
            if request.transport is not None:
                request.transport.abort()
            return response
        await response.write_eof()
        return response

    async def put_listing(self, request: web.Request) -> web.Response:
        """Nix uploads a listing with each path when ``write-nar-listing`` is set: read and dropped (it is computed)."""
        self._check_write(request)
        parse_listing_name(request.match_info["name"])
        body = _Body(request)
        while await body.read(64 << 10):
            pass
        return web.Response(text="")

    async def _read_limited(self, request: web.Request, limit: int) -> bytes:
        def too_large(size: int) -> web.HTTPException:
            message = f"narinfo larger than {limit} bytes\n"
            return web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size, text=message)

        if request.content_length is not None and request.content_length > limit:
            raise too_large(request.content_length)
        body = _Body(request)
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
        log.info("registered %s", info.store_path)
        return web.Response(text="")

    async def _still_stored(self, nar: UploadedNar) -> bool:
        """Whether every directory and blob of an uploaded NAR is still in the store.

        The NAR index outlives what it points at when ``nixcas gc`` collects an
        upload whose narinfo never came (nothing roots it until then); such an
        entry must neither make Nix skip the upload nor become a PathInfo.
        """
        return await self._nar(nar.node).present()

    def _nar(self, node: Node) -> NarSource:
        return NarSource(node, self.blobs, self.directories)

    async def _check_references(self, path: StorePath, references: tuple[StorePath, ...]) -> None:
        others = [r for r in references if r != path]
        found = await asyncio.gather(*(self.pathinfos.get(r.digest) for r in others))
        missing = [str(r) for r, info in zip(others, found, strict=True) if info is None or info.store_path != r]
        if missing:
            raise ValidationError(f"{path}: references not in the store (upload them first): {', '.join(missing[:5])}")

    # -- NAR downloads ------------------------------------------------------------------

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
            raise _fail(web.HTTPNotFound, f"unknown NAR URL prefix {request.match_info['prefix']!r}")
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
            raise _fail(web.HTTPRequestRangeNotSatisfiable, "range not satisfiable", **content_range) from None
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
            raise _fail(web.HTTPNotFound, f"{name}: no such NAR file")
        try:  # checks, before any header, that the NAR's directories and blobs are all still stored
            return await self._serve_nar(request, nar.node, nar.nar_size, compression=compression)
        except NotFoundError:  # collected before its narinfo came (see _still_stored): Nix uploads it again
            raise _fail(web.HTTPNotFound, f"{name}: no such NAR file") from None

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
            raise _fail(web.HTTPRequestRangeNotSatisfiable, f"range past the end of the {size}-byte blob")
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

    # -- NAR uploads --------------------------------------------------------------------

    async def put_nar(self, request: web.Request) -> web.Response:
        self._check_write(request)
        name = request.match_info["name"]
        file_sha256, compression = parse_nar_file_name(name)
        body = _Body(request)
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
        log.info("stored NAR %s (%d bytes)", name, size)
        return web.Response(text="")

"""The narinfo and listing routes of nar-bridge: ``GET|HEAD /<hash>.narinfo`` and ``GET|HEAD /<hash>.ls``.

A narinfo is rendered from the stored PathInfo record (signed on the fly with
a key) once per distinct record, then reused; :meth:`NarinfoRoutes.front` answers
the common ``GET`` of a stored path's narinfo in front of the router (and
:mod:`nixcas.bridge.front` before aiohttp, for plain requests).  The
listing is computed from the path's directories (no blob is read).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Final

from aiohttp import web

from nixcas.bridge.base import NAR_PREFIXES, BridgeBase, fail
from nixcas.bridge.http import choose_encoding, encode_stream
from nixcas.castore.nodes import Node
from nixcas.castore.proto import encode_node
from nixcas.errors import NixcasError, ValidationError
from nixcas.ops import tracing
from nixcas.store import nixbase32
from nixcas.store.nar.listing import UnlistableName, check_listable, nar_listing
from nixcas.store.nar.plan import fetch_closure
from nixcas.store.narinfo import NarInfo, parse_hashed_name, parse_narinfo_name
from nixcas.store.store_path import ENCODED_DIGEST_LEN

__all__ = ["LISTING_TYPE", "NARINFO_CACHE", "NARINFO_TYPE", "Handler", "NarinfoRoutes", "nar_url", "parse_listing_name"]

log = logging.getLogger("nixcas.bridge")

NARINFO_TYPE: Final = "text/x-nix-narinfo"
LISTING_TYPE: Final = "application/json"
NARINFO_CACHE: Final = 8192
"""Rendered narinfos kept per process (each a few hundred bytes, with the record it was rendered from)."""
_NARINFO_HEADERS: Final = {"Content-Type": NARINFO_TYPE}
_NARINFO_PATH_LEN: Final = 1 + ENCODED_DIGEST_LEN + len(".narinfo")
Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def nar_url(node: Node, nar_size: int, prefix: str = NAR_PREFIXES[0]) -> str:
    """``nar/<prefix>/<base64url root node>?narsize=N``: a NAR URL that names its content completely."""
    encoded = base64.urlsafe_b64encode(encode_node(b"", node)).rstrip(b"=").decode()
    return f"nar/{prefix}/{encoded}?narsize={nar_size}"


def parse_listing_name(name: str) -> bytes:
    """``<32 nixbase32 chars>.ls`` → the 20-byte store path digest; :class:`ValidationError` otherwise."""
    return parse_hashed_name(name, "ls", ValidationError)


async def _chunks(source: Iterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in source:
        yield chunk


class NarinfoRoutes(BridgeBase):
    """``GET|HEAD /<hash>.narinfo`` (and its lean route in front of the router), ``GET|HEAD /<hash>.ls``."""

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
        if not self.lean(app, known):
            return handler
        from nixcas.ops.web import ROUTE

        headers = _NARINFO_HEADERS
        answer = self._narinfo_now

        async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
            path = request.raw_path
            lean = len(path) == _NARINFO_PATH_LEN and path[0] == "/" and path.endswith(".narinfo")
            if (
                lean
                and request.method == "GET"
                and "Authorization" not in request.headers
                and self.answers_early(serving)
            ):
                body = answer(path[1 : 1 + ENCODED_DIGEST_LEN])
                if body is not None:
                    request[ROUTE] = "get_narinfo"
                    return web.Response(body=body, headers=headers)
            return await handler(request)

        return dispatch

    def lean(self, app: web.Application, known: Sequence[object] = ()) -> bool:
        """Whether requests may be answered before ``app``'s router: it has no middleware but the bridge's
        own and the ``known`` ones (any other middleware must see every request)."""
        own = (self._errors, self._authenticate, *known)
        return all(middleware in own for middleware in app.middlewares)

    def answers_early(self, serving: Callable[[], bool]) -> bool:
        """Whether a plain GET may be answered before aiohttp's middlewares now: the bridge is public,
        ``serving`` (not draining) and not tracing (a private, draining or traced request takes the full route)."""
        return not self.private and serving() and not tracing.enabled()

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
            raise fail(web.HTTPNotFound, f"{name}: {e}") from None
        if raw is None:
            raise fail(web.HTTPNotFound, f"{name}: no such path")
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
            raise fail(web.HTTPNotFound, f"{name}: {e}") from None
        if info is None:
            raise fail(web.HTTPNotFound, f"{name}: no such path")
        closure = await fetch_closure(info.node, self.directories)
        try:
            check_listable(info.node, closure)
        except UnlistableName as e:
            raise fail(web.HTTPUnprocessableEntity, f"{info.store_path}: {e}") from None
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

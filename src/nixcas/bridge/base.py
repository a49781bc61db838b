"""What every route of nar-bridge shares: the services and settings, error answers, and access.

:class:`BridgeBase` holds the store's services, the caches the routes keep and
the bridge's settings; its two middlewares turn errors into one-line 4xx/5xx
answers (:meth:`~BridgeBase._errors`) and note the token a request carries,
refusing a private bridge's reads without one (:meth:`~BridgeBase._authenticate`);
:meth:`~BridgeBase._check_write` is what every write route asks first.  The
routes are in :mod:`nixcas.bridge.narinfo`, :mod:`nixcas.bridge.download` and
:mod:`nixcas.bridge.upload`; :class:`~nixcas.bridge.app.NarBridge` puts them together.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from nixcas.bridge import DEFAULT_PRIORITY
from nixcas.bridge.auth import Token, Tokens
from nixcas.bridge.groupsync import GroupSync
from nixcas.castore.blob.base import BlobService
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.nodes import Node
from nixcas.errors import NotFoundError, StorageError, ValidationError
from nixcas.ops.web import USER
from nixcas.store.compression import UnsupportedCompression
from nixcas.store.nar.plan import BlobSizeMismatch
from nixcas.store.nar.source import NarSource
from nixcas.store.narindex import NarIndex, UploadedNar
from nixcas.store.narurl import CASTORE_NAR_PREFIXES
from nixcas.store.pathinfo.base import PathInfoService
from nixcas.store.signing import SigningKey
from nixcas.store.store_path import STORE_DIR

__all__ = ["NAR_PREFIXES", "PUBLIC_PATHS", "BridgeBase", "RequestBody", "TruncatedUpload", "fail"]

log = logging.getLogger("nixcas.bridge")

NAR_PREFIXES: Final = CASTORE_NAR_PREFIXES
MAX_SLICES_AT_ONCE: Final = 4
"""Slices built concurrently; more requests wait (so slices hold at most ~16 MiB of blob data, times a few copies)."""
_TOKEN: Final = web.RequestKey("nixcas.token", Token)
# USER (from nixcas.ops.web): ``request.get(USER)`` is the name of the token the request authenticated with.
PUBLIC_PATHS: Final = frozenset({"/", "/healthz"})
"""Paths a ``private`` bridge serves without a token (nothing of the store is in them)."""
_CHALLENGE: Final = {"WWW-Authenticate": 'Basic realm="nar-bridge", Bearer realm="nar-bridge"'}


def fail(status: type[web.HTTPException], message: str, **headers: str) -> web.HTTPException:
    """An HTTP error whose body is ``message`` on one line."""
    return status(text=message + "\n", headers=headers or None)


class TruncatedUpload(ValidationError):
    """The request body ended before its announced length, or the client went away."""


class RequestBody:
    """A request body as a byte source; a broken connection is a :class:`TruncatedUpload`."""

    def __init__(self, request: web.Request) -> None:
        self._content = request.content

    async def read(self, n: int, /) -> bytes:
        try:
            return await self._content.read(n)
        except (HttpProcessingError, ConnectionError, asyncio.IncompleteReadError) as e:
            raise TruncatedUpload(f"upload truncated: {getattr(e, 'message', None) or e}") from None


class BridgeBase:
    """The state the routes share (services, caches, settings) and the error and access middlewares."""

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
            raise fail(web.HTTPUnsupportedMediaType, str(e)) from None
        except NotFoundError as e:
            raise fail(web.HTTPNotFound, str(e)) from None
        except ValidationError as e:
            log.info("%s %s: %s", request.method, request.path, e)
            raise fail(web.HTTPBadRequest, str(e)) from None
        except BlobSizeMismatch as e:  # the node asked for contradicts the stored blob
            log.info("%s %s: %s", request.method, request.path, e)
            raise fail(web.HTTPConflict, str(e)) from None
        except StorageError as e:
            log.error("%s %s: %s", request.method, request.path, e)
            raise fail(web.HTTPInternalServerError, f"storage error: {e}") from None

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
                raise fail(
                    web.HTTPUnauthorized,
                    "this cache is private: reading needs a token (Authorization: Bearer TOKEN, or Basic with "
                    "TOKEN as password, e.g. from Nix's netrc-file)",
                    **_CHALLENGE,
                )
        return await handler(request)

    def _check_write(self, request: web.Request) -> None:
        if not self.allow_writes:
            raise fail(web.HTTPForbidden, "writes are disabled (start nar-bridge with --allow-writes or --token-file)")
        if self.tokens is None:
            return
        token = request.get(_TOKEN)
        if token is None:
            raise fail(
                web.HTTPUnauthorized,
                "writing needs a write token (Authorization: Bearer TOKEN, or Basic with TOKEN as password)",
                **_CHALLENGE,
            )
        if not token.can_write:
            raise fail(web.HTTPForbidden, f"token {token.name!r} may only read")

    def _nar(self, node: Node) -> NarSource:
        return NarSource(node, self.blobs, self.directories)

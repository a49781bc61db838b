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

from aiohttp import web

from nixcas.bridge.base import NAR_PREFIXES, PUBLIC_PATHS
from nixcas.bridge.download import MAX_SLICE_LENGTH, NarDownloadRoutes
from nixcas.bridge.narinfo import NarinfoRoutes, nar_url
from nixcas.bridge.upload import UploadRoutes
from nixcas.ops.web import USER

__all__ = ["MAX_SLICE_LENGTH", "NAR_PREFIXES", "PUBLIC_PATHS", "USER", "NarBridge", "nar_url"]


class NarBridge(NarinfoRoutes, NarDownloadRoutes, UploadRoutes):
    """The HTTP binary cache over a store; :meth:`application` builds the aiohttp app."""

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

    # -- small routes -----------------------------------------------------------------

    async def hello(self, request: web.Request) -> web.Response:
        return web.Response(text="Hello from nar-bridge (nixcas)\n")

    async def cache_info(self, request: web.Request) -> web.Response:
        return web.Response(body=self._cache_info, headers={"Content-Type": "text/x-nix-cache-info"})

"""``nix+http(s)://host/prefix`` — path infos (and their contents) substituted from a Nix binary cache.

``get(digest)`` fetches ``<base>/<hash>.narinfo`` (404 or 403: absent), checks
that it describes the path asked for and, when public keys are configured,
that one of its signatures is valid for one of them; then it checks the
content address against the store path, downloads the NAR file the narinfo
names, decompresses it as a stream (none, xz, zstd, bzip2, gzip), and ingests
it into the configured blob and directory services while verifying its file
hash and size (when given), NarHash, NarSize, and the CA's hash where the CA
says something about the NAR.  Only a NAR that passed every check is committed;
the PathInfo is returned, never stored: wrap this service in ``cache`` (with an
``lru`` or ``sqlite`` near side) so the second lookup is local.

URL form (reference §3.6)::

    nix+https://cache.nixos.org?trusted-public-keys=cache.nixos.org-1:6NCHdD59…%20other-1:…
    nix+http://127.0.0.1:8080/prefix?blob_service=NAME&directory_service=NAME

Composition: ``type = "nix"``, ``base_url``, ``blob_service`` / ``directory_service``
(names or URLs; default ``root``: the store's own services), ``public_keys`` (list),
``castore_blob_service`` / ``castore_directory_service`` (see below).
``put`` and ``list`` are refused: a binary cache reached this way is read-only
and cannot be enumerated.

**Castore-infused narinfos.**  A nixcas, tvix or snix nar-bridge names each
NAR by its castore root (``nar/snix-castore/<root>?narsize=N``, see
:mod:`nixcas.store.narurl`).  When the service is given the castore behind
such a bridge (``castore_blob_service`` and ``castore_directory_service``, both
names or URLs, e.g. ``grpc+http://bridge-host:8000``; URL options of the same
names, percent-encoded), it reads the root from the (signature-checked)
narinfo and fetches only what the local services lack: the directory closure
when any of it is missing (one ``get_recursive``), then each blob the local
blob service does not have, as the NAR is rendered from the local services in
front of the castore (:class:`~nixcas.castore.dirs.cache.CacheDirectoryService`,
:class:`~nixcas.castore.blob.combined.CombinedBlobService`).  The NAR size
follows from the directories alone and is compared first (no blob is fetched
for a root of the wrong size); the rendered NAR's SHA-256 (and a NAR content
address's own hash) must then equal the narinfo's, and every blob must now be
in the local blob service.  Only then is the root used.  Any mismatch or
failure (absent root, unreachable castore, a blob that does not hash to its
digest) is logged and the NAR is downloaded as for any other narinfo, so a
wrong root is never recorded; what was fetched stays in the local castore as
unreferenced, verified content for ``gc``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Final, Self
from urllib.parse import SplitResult, unquote, urljoin

from nixcas import __version__
from nixcas.castore.blob.base import BlobService
from nixcas.castore.dirs.base import DirectoryService
from nixcas.castore.nodes import FileNode, Node
from nixcas.config import Resolver, ServiceConfig
from nixcas.errors import ConfigurationError, NixcasError, PathInfoError, StorageError, ValidationError
from nixcas.store import nixbase32
from nixcas.store.compression import FileHashing, decompressing
from nixcas.store.hashes import CAKind, HashAlgo
from nixcas.store.importer import check_content_address
from nixcas.store.nar.ingest import ingest_nar
from nixcas.store.nar.parser import AsyncByteSource
from nixcas.store.narinfo import MAX_NARINFO_SIZE, NarInfo
from nixcas.store.narurl import castore_nar_root
from nixcas.store.pathinfo.base import PathInfoServiceWrapper, check_digest
from nixcas.store.pathinfo.model import PathInfo
from nixcas.store.signing import SigningKeyError, VerifyingKey, has_valid_signature, parse_public_keys
from nixcas.urls import query_options, scrubbed, shown, url_text

if TYPE_CHECKING:
    import aiohttp

    from nixcas.store.pathinfo.base import PathInfoService

__all__ = ["NixHttpPathInfoService", "NixHttpPathInfoServiceConfig", "UntrustedPathInfo"]

log = logging.getLogger(__name__)

DEFAULT_SERVICE: Final = "root"
READ_BLOCK: Final = 1 << 20
_SERVICE_FIELDS: Final = (
    ("blob_service", "blobservices"),
    ("directory_service", "directoryservices"),
    ("castore_blob_service", "blobservices"),
    ("castore_directory_service", "directoryservices"),
)


class UntrustedPathInfo(PathInfoError):
    """An upstream narinfo without a valid signature from a trusted key."""


@dataclass(frozen=True)
class NixHttpPathInfoServiceConfig(ServiceConfig["PathInfoService"]):
    """``base_url`` (http/https), the services NARs are ingested into, and the trusted public keys."""

    type_tag: ClassVar[str] = "nix"
    base_url: str
    blob_service: str = DEFAULT_SERVICE
    directory_service: str = DEFAULT_SERVICE
    public_keys: list[str] | None = None
    castore_blob_service: str | None = None
    castore_directory_service: str | None = None

    @classmethod
    def from_url(cls, url: SplitResult) -> Self:
        if url.scheme not in ("nix+http", "nix+https"):
            raise ConfigurationError(f"{shown(url)!r}: write nix+http://host[/prefix] or nix+https://…")
        if not url.netloc or url.fragment:
            raise ConfigurationError(f"{shown(url)!r}: needs a host (nix+https://cache.example.org[/prefix])")
        options = query_options(
            url,
            {"trusted-public-keys", *(field for field, _ in _SERVICE_FIELDS)},
        )
        keys = options.get("trusted-public-keys")
        if keys is not None:  # base64 has '+': read the raw value, where only %20 separates keys
            raw = next(v for k, _, v in (p.partition("=") for p in url.query.split("&")) if k == "trusted-public-keys")
            keys = unquote(raw)
        base = url_text(url._replace(scheme=url.scheme.removeprefix("nix+"), query=""))
        config = cls(
            base,
            options.get("blob_service", DEFAULT_SERVICE),
            options.get("directory_service", DEFAULT_SERVICE),
            None if keys is None else keys.split(),
            options.get("castore_blob_service"),
            options.get("castore_directory_service"),
        )
        config.validate(repr(shown(url)))
        return config

    def __repr__(self) -> str:  # base_url may hold user:password
        return f"{type(self).__name__}({shown(self.base_url)!r}, keys={len(self.public_keys or [])})"

    def validate(self, where: str) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigurationError(f"{where}: base_url must be an http:// or https:// URL")
        try:
            parse_public_keys(self.public_keys or [])
        except SigningKeyError as e:
            raise ConfigurationError(f"{where}: {e}") from None
        if self.public_keys is not None and not self.public_keys:
            raise ConfigurationError(f"{where}: public_keys is empty (omit it to accept unsigned narinfos)")
        from nixcas.registry import parse_service_url

        if (self.castore_blob_service is None) != (self.castore_directory_service is None):
            raise ConfigurationError(
                f"{where}: castore_blob_service and castore_directory_service go together (the castore behind "
                "the cache's castore NAR URLs)"
            )
        for field, kind in _SERVICE_FIELDS:
            ref = getattr(self, field)
            if ref is not None and "://" in ref:
                try:
                    parse_service_url(kind, unquote(ref))
                except ConfigurationError as e:
                    raise ConfigurationError(f"{where}: {field}: {e}") from None

    async def build(self, resolver: Resolver) -> PathInfoService:
        blobs = await resolver.blob_service(unquote(self.blob_service))
        directories = await resolver.directory_service(unquote(self.directory_service))
        keys = parse_public_keys(self.public_keys) if self.public_keys is not None else None
        castore = None
        if self.castore_blob_service is not None and self.castore_directory_service is not None:
            castore = (
                await resolver.blob_service(unquote(self.castore_blob_service)),
                await resolver.directory_service(unquote(self.castore_directory_service)),
            )
        return NixHttpPathInfoService(self.base_url, blobs, directories, keys, castore=castore)


class _Body:
    def __init__(self, response: aiohttp.ClientResponse, url: str, base_url: str) -> None:
        self._content = response.content
        self._url = url
        self._base_url = base_url

    async def read(self, n: int, /) -> bytes:
        import aiohttp

        try:
            return await self._content.read(n)
        except (aiohttp.ClientError, ConnectionError) as e:
            raise StorageError(f"{self._url}: download failed: {scrubbed(str(e), self._base_url)}") from None


class NixHttpPathInfoService(PathInfoServiceWrapper):
    """Fetches, verifies and ingests paths of a Nix binary cache on demand (read-only)."""

    def __init__(
        self,
        base_url: str,
        blobs: BlobService,
        directories: DirectoryService,
        public_keys: tuple[VerifyingKey, ...] | None = None,
        *,
        castore: tuple[BlobService, DirectoryService] | None = None,
    ) -> None:
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        """Where requests go: may hold ``user:password@`` (sent as basic auth); never shown."""
        self.blobs = blobs
        self.directories = directories
        self.public_keys = public_keys
        if castore is not None and castore[1].size_rule != directories.size_rule:
            raise ConfigurationError(
                f"castore_directory_service {castore[1]!r} follows the {castore[1].size_rule} directory size rule, "
                f"the local {directories!r} the {directories.size_rule} rule: its roots could not be kept here"
            )
        self.castore = castore
        """The castore behind the cache's castore NAR URLs (blobs, directories), if any."""
        self._session: aiohttp.ClientSession | None = None
        self._running: dict[bytes, asyncio.Task[PathInfo | None]] = {}

    def __repr__(self) -> str:
        return f"NixHttpPathInfoService({shown(self.base_url)!r})"

    def _error(self, e: BaseException) -> str:
        """An HTTP client error's text, without the credentials of :attr:`base_url`."""
        return scrubbed(str(e) or type(e).__name__, self.base_url)

    def _client(self) -> aiohttp.ClientSession:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300),
                headers={"User-Agent": f"nixcas/{__version__}"},
                auto_decompress=True,
            )
        return self._session

    async def _fetch_narinfo(self, digest: bytes) -> tuple[str, NarInfo] | None:
        import aiohttp

        target = urljoin(self.base_url, f"{nixbase32.encode(digest)}.narinfo")
        url = shown(target)
        try:
            async with self._client().get(target) as response:
                if response.status in (403, 404):
                    return None
                if response.status != 200:
                    raise StorageError(f"{url}: HTTP {response.status} {response.reason}")
                parts: list[bytes] = []
                size = 0
                while chunk := await response.content.read(64 << 10):
                    size += len(chunk)
                    if size > MAX_NARINFO_SIZE:
                        raise PathInfoError(f"{url}: narinfo larger than {MAX_NARINFO_SIZE} bytes")
                    parts.append(chunk)
                raw = b"".join(parts)
        except (aiohttp.ClientError, ConnectionError, TimeoutError) as e:
            raise StorageError(f"{url}: {self._error(e)}") from None
        try:
            return url, NarInfo.parse(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise PathInfoError(f"{url}: narinfo is not UTF-8") from None
        except PathInfoError as e:
            raise PathInfoError(f"{url}: {e}") from None

    async def get(self, digest: bytes) -> PathInfo | None:
        """Concurrent lookups of one path share one download."""
        task = self._running.get(check_digest(digest))
        if task is None:
            task = asyncio.ensure_future(self._substitute(digest))
            self._running[digest] = task
            task.add_done_callback(lambda t: self._finished(digest, t))
        return await asyncio.shield(task)  # one caller giving up does not cancel the others' download

    def _finished(self, digest: bytes, task: asyncio.Task[PathInfo | None]) -> None:
        if self._running.get(digest) is task:
            del self._running[digest]
        if not task.cancelled():
            task.exception()  # retrieved here: callers that gave up do not leave it unobserved

    async def _substitute(self, digest: bytes) -> PathInfo | None:
        found = await self._fetch_narinfo(digest)
        if found is None:
            return None
        url, narinfo = found
        if narinfo.store_path.digest != digest:
            raise PathInfoError(f"{url} describes {narinfo.store_path}")
        if self.public_keys is not None and not has_valid_signature(
            narinfo.fingerprint(), narinfo.signatures, self.public_keys
        ):
            trusted = ", ".join(k.name for k in self.public_keys)
            raise UntrustedPathInfo(f"{url}: no valid signature by a trusted key ({trusted})")
        try:
            check_content_address(narinfo)
        except ValidationError as e:
            raise PathInfoError(f"{url}: {e}") from None
        node = await self._from_castore(url, narinfo) if self.castore is not None else None
        if node is None:
            node = await self._ingest(narinfo)
        info = narinfo.to_path_info(node)
        await self._check_flat_content(info)
        return info

    async def _from_castore(self, url: str, narinfo: NarInfo) -> Node | None:
        """The root named by a castore NAR URL, once the NAR rendered from it matched the narinfo; else ``None``."""
        assert self.castore is not None
        try:
            found = castore_nar_root(narinfo.url)
        except ValidationError as e:
            log.warning("%s: %s; downloading the NAR instead", url, e)
            return None
        if found is None:
            return None
        node, url_size = found
        if url_size is not None and url_size != narinfo.nar_size:
            log.warning(
                "%s: the NAR URL says %d bytes, NarSize %d; downloading the NAR", url, url_size, narinfo.nar_size
            )
            return None
        from nixcas.castore.blob.combined import CombinedBlobService
        from nixcas.castore.dirs.cache import CacheDirectoryService
        from nixcas.store.nar.source import NarSource

        blobs = CombinedBlobService(self.blobs, self.castore[0])
        directories = CacheDirectoryService(self.directories, self.castore[1])
        ca = narinfo.ca
        ca_hash, ca_digest = None, b""  # a NAR content address with its own hash algorithm: checked as well
        if ca is not None and ca.kind is CAKind.NAR and ca.hash.algo is not HashAlgo.SHA256:
            ca_hash, ca_digest = hashlib.new(ca.hash.algo), ca.hash.digest
        try:
            nar = NarSource(node, blobs, directories)
            size = await nar.size()
            if size != narinfo.nar_size:
                log.warning(
                    "%s: the castore root's NAR has %d bytes, not %d; downloading the NAR", url, size, narinfo.nar_size
                )
                return None
            sha256 = hashlib.sha256()
            async for chunk in nar.stream():
                sha256.update(chunk)
                if ca_hash is not None:
                    ca_hash.update(chunk)
        except (NixcasError, OSError) as e:
            log.warning("%s: rendering the NAR from castore failed (%s); downloading the NAR", url, self._error(e))
            return None
        if sha256.digest() != narinfo.nar_sha256 or (ca_hash is not None and ca_hash.digest() != ca_digest):
            log.warning("%s: the castore root's NAR does not have the narinfo's hash; downloading the NAR", url)
            return None
        # The far blobs were kept locally as they streamed; a local write that failed is only logged
        # there, so check: the root must be complete in the local services before it is used.
        # (An empty file is framing alone: its blob is never stored or read.)
        digests = await nar.blob_digests()
        try:
            missing = sum(size is None for size in await self.blobs.sizes(digests))
        except (NixcasError, OSError) as e:
            missing, reason = len(digests), self._error(e)
        else:
            reason = f"{missing} blobs were not kept"
        if missing:
            log.warning("%s: the castore root is not complete locally (%s); downloading the NAR", url, reason)
            return None
        return node

    async def _ingest(self, narinfo: NarInfo) -> Node:
        import aiohttp

        target = urljoin(self.base_url, narinfo.url)
        url = shown(target)
        compression = narinfo.effective_compression
        file_hash = narinfo.file_hash
        try:
            async with self._client().get(target, headers={"Accept-Encoding": "identity"}) as response:
                if response.status != 200:
                    raise StorageError(f"{url}: HTTP {response.status} {response.reason}")
                raw = FileHashing(
                    _Body(response, url, self.base_url),
                    expected_digest=file_hash.digest if file_hash is not None else None,
                    expected_size=narinfo.file_size if compression != "none" else None,
                    what=url,
                )
                source = decompressing(raw, compression)
                nar_source: AsyncByteSource = source
                ca = narinfo.ca
                if ca is not None and ca.kind is CAKind.NAR and ca.hash.algo is not HashAlgo.SHA256:
                    what = f"{url} (NAR hashed for its content address)"
                    nar_source = FileHashing(source, expected_digest=ca.hash.digest, algo=ca.hash.algo, what=what)
                try:
                    node, _, _ = await ingest_nar(
                        nar_source,
                        self.blobs,
                        self.directories,
                        expected_size=narinfo.nar_size,
                        expected_sha256=narinfo.nar_sha256,
                    )
                finally:
                    source.close()
        except (aiohttp.ClientError, ConnectionError, TimeoutError) as e:
            raise StorageError(f"{url}: {self._error(e)}") from None
        except ValidationError as e:
            raise PathInfoError(f"{narinfo.store_path}: {url}: {e}") from None
        return node

    async def _check_flat_content(self, info: PathInfo) -> None:
        """A flat content address names the hash of the single file the path is."""
        ca = info.ca
        if ca is None or ca.kind is not CAKind.FLAT:
            return
        if not isinstance(info.node, FileNode):
            raise PathInfoError(f"{info.store_path}: content address {ca} needs a single regular file")
        h = hashlib.new(ca.hash.algo)
        reader = await self.blobs.open_read(info.node.digest)
        if reader is None:
            raise StorageError(f"{info.store_path}: blob {info.node.digest.hex()} vanished after ingesting")
        async with reader:
            async for block in reader.iter_blocks(READ_BLOCK):
                h.update(block)
        if h.digest() != ca.hash.digest:
            raise PathInfoError(f"{info.store_path}: file contents do not have the hash of its content address {ca}")

    async def put(self, info: PathInfo) -> PathInfo:
        raise StorageError(f"{self!r} is read-only: a Nix binary cache cannot be written through it")

    async def list(self) -> AsyncIterator[PathInfo]:
        raise StorageError(f"{self!r} cannot list: a Nix binary cache has no index of its paths")
        yield  # pragma: no cover - makes this an async generator

    async def close(self) -> None:
        for task in list(self._running.values()):
            task.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

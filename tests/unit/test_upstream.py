"""Path info wrappers (lru, cache, keyfile-signing) and substitution from a Nix binary cache (nix+http).

The binary cache here is a static file server on loopback holding narinfos and
NAR files written by the test (real Nix writes one in test_bridge_nix).
"""

from __future__ import annotations

import asyncio
import bz2
import gzip
import hashlib
import lzma
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

import blake3
import pytest
import pytest_asyncio
import zstandard
from aiohttp import web

from nixcas._aio import close_all
from nixcas.bridge.app import NarBridge, nar_url
from nixcas.castore.blob.base import BlobChecker, BlobReader
from nixcas.castore.blob.memory import MemoryBlobService
from nixcas.castore.digest import B3Digest
from nixcas.castore.dirs.memory import MemoryDirectoryService
from nixcas.castore.ingest import ingest_path
from nixcas.castore.nodes import DirectoryNode, SymlinkNode
from nixcas.castore.sizerule import SizeRule
from nixcas.composition import Composition, blob_service_from_url, directory_service_from_url, pathinfo_service_from_url
from nixcas.errors import ConfigurationError, PathInfoError, StorageError, ValidationError
from nixcas.registry import parse_service_url
from nixcas.server import start_server
from nixcas.store import nixbase32
from nixcas.store.hashes import CAHash, HashAlgo
from nixcas.store.nar.ingest import ingest_nar_bytes
from nixcas.store.nar.render import render_nar
from nixcas.store.narindex import NarIndex
from nixcas.store.narinfo import NarInfo
from nixcas.store.narurl import castore_nar_root
from nixcas.store.pathinfo.base import PathInfoService
from nixcas.store.pathinfo.cache import CachePathInfoService
from nixcas.store.pathinfo.lru import LruPathInfoService
from nixcas.store.pathinfo.memory import MemoryPathInfoService
from nixcas.store.pathinfo.nixhttp import NixHttpPathInfoService, NixHttpPathInfoServiceConfig, UntrustedPathInfo
from nixcas.store.pathinfo.signing import KeyfileSigningPathInfoService
from nixcas.store.signing import SigningKey, has_valid_signature, path_info_fingerprint
from nixcas.store.store_path import build_ca_path
from nixcas.testing.pathinfoservice import PathInfoServiceSuite, RawPathInfoStore, make_path_info
from nixcas.testing.samples import Sample, make_sample

KEY = SigningKey.generate("upstream.test-1")
OTHER = SigningKey.generate("upstream.test-1")  # same name, another key


# -- the wrappers run the contract suite -------------------------------------------------------


class TestLru(PathInfoServiceSuite):
    covers = ("lru",)

    @pytest_asyncio.fixture
    async def pathinfo_service(self) -> AsyncIterator[PathInfoService]:
        svc = await pathinfo_service_from_url("lru://?capacity=1000")
        yield svc
        await svc.close()

    @pytest.fixture
    def store_raw(self, pathinfo_service: PathInfoService) -> RawPathInfoStore:
        assert isinstance(pathinfo_service, LruPathInfoService)
        data = pathinfo_service._data

        async def store(digest: bytes, raw: bytes) -> None:
            data.remember(digest, raw)

        return store


class TestCache(PathInfoServiceSuite):
    covers = ("cache",)

    @pytest_asyncio.fixture
    async def pathinfo_service(self) -> AsyncIterator[PathInfoService]:
        svc = await pathinfo_service_from_url("cache://?near=lru%3A%2F%2F%3Fcapacity%3D100&far=memory%3A%2F%2F")
        yield svc
        await svc.close()

    @pytest.fixture
    def store_raw(self, pathinfo_service: PathInfoService) -> RawPathInfoStore:
        """The raw bytes land in near's LRU and in far's dict (a record put through the cache is near only)."""
        assert isinstance(pathinfo_service, CachePathInfoService)
        near, far = pathinfo_service.near, pathinfo_service.far
        assert isinstance(near, LruPathInfoService)
        assert isinstance(far, MemoryPathInfoService)

        async def store(digest: bytes, raw: bytes) -> None:
            near._data.remember(digest, raw)
            far._data[digest] = raw

        return store

    async def test_corrupt_far_record_is_refused_and_not_kept(self, pathinfo_service: PathInfoService) -> None:
        """A record far holds under the wrong key is an error on the miss, and never reaches near."""
        assert isinstance(pathinfo_service, CachePathInfoService)
        near, far = pathinfo_service.near, pathinfo_service.far
        assert isinstance(near, LruPathInfoService)
        assert isinstance(far, MemoryPathInfoService)
        a, b = make_path_info("a", 1), make_path_info("b", 2)
        far._data[a.store_path.digest] = b.encode()
        with pytest.raises(StorageError):
            await pathinfo_service.get(a.store_path.digest)
        assert len(near) == 0


class TestSigning(PathInfoServiceSuite):
    covers = ("keyfile-signing",)

    @pytest_asyncio.fixture
    async def pathinfo_service(self, tmp_path: Path) -> AsyncIterator[PathInfoService]:
        (tmp_path / "key").write_text(str(KEY))
        composition = Composition.from_dict(
            {
                "pathinfoservices": {
                    "root": {"type": "keyfile-signing", "inner": "mem", "keyfile": str(tmp_path / "key")},
                    "mem": {"type": "memory"},
                }
            }
        )
        yield await composition.pathinfo_service("root")
        await composition.close()

    @pytest.fixture
    def store_raw(self, pathinfo_service: PathInfoService) -> RawPathInfoStore:
        assert isinstance(pathinfo_service, KeyfileSigningPathInfoService)
        inner = pathinfo_service.inner
        assert isinstance(inner, MemoryPathInfoService)

        async def store(digest: bytes, raw: bytes) -> None:
            inner._data[digest] = raw

        return store


async def test_lru_evicts() -> None:
    lru = LruPathInfoService(2)
    a, b, c = (make_path_info(n, 1) for n in "abc")
    for info in (a, b):
        await lru.put(info)
    assert await lru.get(a.digest) == a  # a is now the most recent
    await lru.put(c)
    assert await lru.get(b.digest) is None
    assert await lru.get(a.digest) == a and await lru.get(c.digest) == c


async def test_cache_keeps_what_far_had() -> None:
    near, far = MemoryPathInfoService(), MemoryPathInfoService()
    info = make_path_info("far-only", 2)
    await far.put(info)
    cache = CachePathInfoService(near, far)
    assert await cache.get(info.digest) == info
    assert await near.get(info.digest) == info
    assert await cache.get(make_path_info("nowhere").digest) is None


async def test_signing_wrapper_signs_on_put() -> None:
    inner = MemoryPathInfoService()
    svc = KeyfileSigningPathInfoService(inner, KEY)
    info = make_path_info("to-sign", 1)
    await svc.put(info)
    stored = await inner.get(info.digest)
    assert stored is not None
    assert set(info.signatures) < set(stored.signatures)  # appended
    assert has_valid_signature(path_info_fingerprint(stored), stored.signatures, [KEY.public])


def test_urls_and_tables(tmp_path: Path) -> None:
    config = parse_service_url(
        "pathinfoservices", f"nix+https://cache.example.org/sub?trusted-public-keys={KEY.public}%20{OTHER.public}"
    )
    assert isinstance(config, NixHttpPathInfoServiceConfig)
    assert config.base_url == "https://cache.example.org/sub"
    assert config.public_keys == [str(KEY.public), str(OTHER.public)]
    for bad, words in [
        ("nix+https://h?trusted-public-keys=bad", "invalid public key"),
        ("nix+https://h?trusted-public-keys=", "empty"),
        ("nix+ftp://h", "write nix"),
        ("nix+https:///path", "needs a host"),
        ("nix+https://h?compression=xz", "unknown option"),
        ("nix+https://h?blob_service=nope%3A%2F%2F", "blob_service"),
        ("lru://?capacity=0", "at least 1"),
        ("lru://", "missing capacity"),
    ]:
        with pytest.raises(ConfigurationError, match=words):
            parse_service_url("pathinfoservices", bad)
    with pytest.raises(ConfigurationError, match="no URL form"):
        parse_service_url("pathinfoservices", "keyfile-signing://")
    with pytest.raises(ConfigurationError, match="absolute"):
        Composition.from_dict({"pathinfoservices": {"s": {"type": "keyfile-signing", "inner": "m", "keyfile": "k"}}})


async def test_signing_wrapper_with_a_bad_key_file(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("not a key")
    composition = Composition.from_dict(
        {"pathinfoservices": {"s": {"type": "keyfile-signing", "inner": "memory://", "keyfile": str(tmp_path / "key")}}}
    )
    with pytest.raises(ConfigurationError, match="invalid secret key"):
        await composition.pathinfo_service("s")
    await composition.close()


# -- nix+http against a static binary cache on loopback ------------------------------------------

COMPRESS: dict[str, tuple[str, Callable[[bytes], bytes]]] = {
    "none": ("", lambda b: b),
    "xz": (".xz", lzma.compress),
    "zstd": (".zst", lambda b: zstandard.ZstdCompressor().compress(b)),
    "bzip2": (".bz2", bz2.compress),
    "gzip": (".gz", gzip.compress),
}


class StaticCache:
    """Files served by path; counts requests."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.status: dict[str, int] = {}
        self.requests: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        path = request.path.lstrip("/")
        self.requests.append(path)
        if path in self.status:
            return web.Response(status=self.status[path])
        if path not in self.files:
            return web.Response(status=404)
        return web.Response(body=self.files[path])

    def publish(
        self, sample: Sample, *, compression: str = "xz", sign: SigningKey | None = KEY, **override: str
    ) -> str:
        """Write the sample's NAR file and narinfo; return the narinfo's path."""
        suffix, compress = COMPRESS[compression]
        packed = compress(sample.nar)
        file_hash = nixbase32.encode(hashlib.sha256(packed).digest())
        url = f"nar/{file_hash}.nar{suffix}"
        self.files[url] = packed
        fields = {
            "StorePath": str(sample.store_path),
            "URL": url,
            "Compression": compression,
            "FileHash": f"sha256:{file_hash}",
            "FileSize": str(len(packed)),
            "NarHash": f"sha256:{sample.nb32}",
            "NarSize": str(len(sample.nar)),
            "References": "",
            "CA": f"fixed:r:sha256:{sample.nb32}",
        }
        fields.update(override)
        text = "".join(f"{k}: {v}\n" for k, v in fields.items())
        if sign is not None:
            fp = f"1;{sample.store_path};sha256:{sample.nb32};{len(sample.nar)};".encode()
            text += f"Sig: {sign.sign(fp)}\n"
        name = f"{sample.store_path.hash_part}.narinfo"
        self.files[name] = text.encode()
        return name


@pytest_asyncio.fixture
async def upstream() -> AsyncIterator[tuple[StaticCache, str]]:
    cache = StaticCache()
    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", cache.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield cache, f"http://127.0.0.1:{port}/"
    await runner.cleanup()


@pytest_asyncio.fixture
async def sample(tmp_path: Path) -> Sample:
    return await make_sample(tmp_path, "up-1.0", {"a": b"A" * 100, "d/b": hashlib.sha256(b"b").digest() * 40_000})


def service(url: str, *, keys: bool = True) -> NixHttpPathInfoService:
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX)
    return NixHttpPathInfoService(url, blobs, dirs, (KEY.public,) if keys else None)


async def nothing_stored(svc: NixHttpPathInfoService, sample: Sample) -> None:
    assert isinstance(sample.node, DirectoryNode)
    assert await svc.directories.get(sample.node.digest) is None


@pytest.mark.parametrize("compression", sorted(COMPRESS))
async def test_substitutes_and_caches(upstream: tuple[StaticCache, str], sample: Sample, compression: str) -> None:
    cache, url = upstream
    cache.publish(sample, compression=compression)
    far = service(url)
    near = MemoryPathInfoService()
    svc = CachePathInfoService(near, far)
    try:
        info = await svc.get(sample.store_path.digest)
        assert info is not None
        assert info.node == sample.node and info.nar_sha256 == sample.sha256
        rendered = b"".join([c async for c in render_nar(info.node, far.blobs, far.directories)])
        assert rendered == sample.nar
        fetched = len(cache.requests)
        assert await svc.get(sample.store_path.digest) == info  # the second lookup is local
        assert len(cache.requests) == fetched
    finally:
        await far.close()


async def test_concurrent_lookups_share_one_download(upstream: tuple[StaticCache, str], sample: Sample) -> None:
    cache, url = upstream
    cache.publish(sample)
    svc = service(url)
    try:
        infos = await asyncio.gather(*(svc.get(sample.store_path.digest) for _ in range(5)))
        assert all(i is not None and i.node == sample.node for i in infos)
        assert len(cache.requests) == 2  # one narinfo, one NAR
    finally:
        await svc.close()


async def test_absent_and_forbidden_are_none(upstream: tuple[StaticCache, str], sample: Sample) -> None:
    cache, url = upstream
    svc = service(url)
    try:
        assert await svc.get(sample.store_path.digest) is None
        cache.status[cache.publish(sample)] = 403
        assert await svc.get(sample.store_path.digest) is None
        cache.status[cache.publish(sample)] = 500
        with pytest.raises(StorageError, match="500"):
            await svc.get(sample.store_path.digest)
        with pytest.raises(StorageError, match="read-only"):
            await svc.put(make_path_info("x"))
        with pytest.raises(StorageError, match="cannot list"):
            [i async for i in svc.list()]
    finally:
        await svc.close()


@pytest.mark.parametrize(
    ("publish", "error", "words"),
    [
        ({"sign": None}, UntrustedPathInfo, "no valid signature"),
        ({"sign": None, "Sig": "cache.example.org-1:AAAA\u00e9AA="}, PathInfoError, "Sig"),  # issue 16: was ValueError
        ({"sign": OTHER}, UntrustedPathInfo, "no valid signature"),
        ({"NarSize": "12"}, UntrustedPathInfo, "no valid signature"),  # the signature covers NarSize
        ({"NarHash": "sha256:" + "1" * 52}, UntrustedPathInfo, "no valid signature"),
        ({"Compression": "lz4"}, PathInfoError, "unsupported compression"),
        ({"FileHash": "sha256:" + "1" * 52}, PathInfoError, "hash mismatch"),
        ({"FileSize": "3"}, PathInfoError, "size"),
        ({"CA": "fixed:r:sha256:" + "1" * 52}, PathInfoError, "content address"),
        ({"StorePath": "/nix/store/" + "1" * 32 + "-other"}, PathInfoError, "describes"),
        ({"Extra": "x" * (3 << 20)}, PathInfoError, "larger than"),
    ],
)
async def test_bad_upstream_narinfo_stores_nothing(
    upstream: tuple[StaticCache, str], sample: Sample, publish: dict[str, object], error: type[Exception], words: str
) -> None:
    cache, url = upstream
    cache.publish(sample, **publish)  # type: ignore[arg-type]
    svc = service(url)
    near = MemoryPathInfoService()
    try:
        with pytest.raises(error, match=words):
            await CachePathInfoService(near, svc).get(sample.store_path.digest)
        await nothing_stored(svc, sample)
        assert await near.get(sample.store_path.digest) is None
    finally:
        await svc.close()


async def test_unsigned_is_fine_without_keys(upstream: tuple[StaticCache, str], sample: Sample) -> None:
    cache, url = upstream
    cache.publish(sample, sign=None)
    svc = service(url, keys=False)
    try:
        assert await svc.get(sample.store_path.digest) is not None
    finally:
        await svc.close()


async def test_nar_hash_mismatch_without_keys(upstream: tuple[StaticCache, str], sample: Sample) -> None:
    cache, url = upstream
    cache.publish(sample, sign=None, NarHash="sha256:" + "1" * 52, CA="")
    svc = service(url, keys=False)
    try:
        with pytest.raises(PathInfoError, match="sha256 mismatch"):
            await svc.get(sample.store_path.digest)
        await nothing_stored(svc, sample)
    finally:
        await svc.close()


@pytest.mark.parametrize("signer", ["other key", "unsigned"])
async def test_bridge_answers_404_for_untrusted_upstream(
    upstream: tuple[StaticCache, str], sample: Sample, tmp_path: Path, signer: str
) -> None:
    """A bridge in front of nix+http: a badly signed or unsigned upstream narinfo is not served, nothing is kept."""
    from aiohttp.test_utils import TestClient, TestServer

    cache, url = upstream
    cache.publish(sample, sign=OTHER if signer == "other key" else None)
    far = service(url)
    near = MemoryPathInfoService()
    index = NarIndex(None)
    bridge = NarBridge(far.blobs, far.directories, CachePathInfoService(near, far), index)
    try:
        async with TestClient(TestServer(bridge.application())) as client:
            async with client.get(f"/{sample.store_path.hash_part}.narinfo") as r:
                assert r.status == 404
                assert "no valid signature" in await r.text()
            assert await near.get(sample.store_path.digest) is None
            cache.publish(sample, sign=KEY)
            async with client.get(f"/{sample.store_path.hash_part}.narinfo") as r:
                assert r.status == 200
        assert await near.get(sample.store_path.digest) is not None
    finally:
        await far.close()
        await index.close()


async def test_bridge_answers_404_for_a_non_ascii_upstream_sig(
    upstream: tuple[StaticCache, str], sample: Sample
) -> None:
    """Issue 16, defect 4: a non-ASCII character in an upstream narinfo's Sig was a bare ValueError (500)."""
    from aiohttp.test_utils import TestClient, TestServer

    cache, url = upstream
    cache.publish(sample, sign=None, Sig="cache.example.org-1:\u0663\u0663AA")
    far = service(url)
    index = NarIndex(None)
    bridge = NarBridge(far.blobs, far.directories, CachePathInfoService(MemoryPathInfoService(), far), index)
    try:
        path = f"/{sample.store_path.hash_part}.narinfo"
        async with TestClient(TestServer(bridge.application())) as client, client.get(path) as r:
            assert r.status == 404
            assert "Sig" in await r.text()
    finally:
        await far.close()
        await index.close()


async def single_file_sample(tmp_path: Path, content: bytes, ca: CAHash) -> Sample:
    """A store path that is one file, named by ``ca`` (which need not match the content)."""
    path = tmp_path / "single"
    path.write_bytes(content)
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX)
    node = await ingest_path(path, blobs, dirs)
    nar = b"".join([c async for c in render_nar(node, blobs, dirs)])
    return Sample("single", nar, node, build_ca_path("single", ca))


def publish_with_ca(cache: StaticCache, sample: Sample, ca: CAHash) -> None:
    cache.publish(sample, CA=str(ca))


@pytest.mark.parametrize("matches", [True, False])
async def test_flat_content_address_is_checked_on_the_file(
    upstream: tuple[StaticCache, str], tmp_path: Path, matches: bool
) -> None:
    cache, url = upstream
    content = b"flat file contents\n"
    named = content if matches else b"something else"
    ca = CAHash.flat(HashAlgo.SHA256, hashlib.sha256(named).digest())
    sample = await single_file_sample(tmp_path, content, ca)
    publish_with_ca(cache, sample, ca)
    svc = service(url)
    try:
        if matches:
            info = await svc.get(sample.store_path.digest)
            assert info is not None and info.ca == ca
        else:
            with pytest.raises(PathInfoError, match="do not have the hash of its content address"):
                await svc.get(sample.store_path.digest)
    finally:
        await svc.close()


@pytest.mark.parametrize("matches", [True, False])
async def test_recursive_sha1_content_address_is_checked_on_the_nar(
    upstream: tuple[StaticCache, str], tmp_path: Path, sample: Sample, matches: bool
) -> None:
    cache, url = upstream
    nar_sha1 = hashlib.sha1(sample.nar if matches else b"other").digest()  # noqa: S324 - Nix's sha1 CA
    ca = CAHash.nar(HashAlgo.SHA1, nar_sha1)
    sample = Sample(sample.name, sample.nar, sample.node, build_ca_path(sample.name, ca))
    publish_with_ca(cache, sample, ca)
    svc = service(url)
    try:
        if matches:
            assert (await svc.get(sample.store_path.digest)) is not None
        else:
            with pytest.raises(PathInfoError, match="content address"):
                await svc.get(sample.store_path.digest)
            await nothing_stored(svc, sample)
    finally:
        await svc.close()


# -- castore-infused narinfos: the root in a bridge's NAR URL, fetched from its castore ----------------


class CountingBlobs(MemoryBlobService):
    """A far castore's blobs that records which digests were read."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: set[B3Digest] = set()

    async def _open_read(self, digest: B3Digest) -> BlobReader | None:
        self.reads.add(digest)
        return await super()._open_read(digest)

    async def _read_many(
        self, max_sizes: Mapping[B3Digest, int], checker: BlobChecker, parallel: int
    ) -> dict[B3Digest, bytes]:
        self.reads.update(max_sizes)
        return await super()._read_many(max_sizes, checker, parallel)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("nar/0000000000000000000000000000000000000000000000000000.nar.xz", None),
        ("nar/snix-castore", None),
        ("nar/other-castore/AAAA?narsize=1", None),
        ("nar/snix-castore/{node}?narsize=7", 7),
        ("https://h/p/nar/tvix-castore/{node}", "no size"),
        ("nar/snix-castore/AAAA?narsize=1", "not a Node"),
        ("nar/snix-castore/{node}?narsize=x", "narsize"),
        ("nar/snix-castore/{node}?narsize=1&narsize=2", "narsize"),
        ("nar/snix-castore/{node}=?narsize=1", "base64url"),
    ],
)
def test_castore_nar_urls(url: str, expected: int | str | None) -> None:
    node = SymlinkNode(b"/nix/store/x")
    encoded = nar_url(node, 1).split("/")[2].partition("?")[0]
    url = url.replace("{node}", encoded)
    if expected is None:
        assert castore_nar_root(url) is None
    elif isinstance(expected, int):
        assert castore_nar_root(url) == (node, expected)
    elif expected == "no size":
        assert castore_nar_root(url) == (node, None)
    else:
        with pytest.raises(ValidationError):
            castore_nar_root(url)


async def test_castore_options(tmp_path: Path) -> None:
    grpc = quote("grpc+http://far:8000", safe="")
    config = parse_service_url(
        "pathinfoservices", f"nix+http://h?castore_blob_service={grpc}&castore_directory_service={grpc}"
    )
    assert isinstance(config, NixHttpPathInfoServiceConfig)
    assert config.castore_blob_service == config.castore_directory_service == "grpc+http://far:8000"
    for bad, words in [
        (f"nix+http://h?castore_blob_service={grpc}", "go together"),
        ("nix+http://h?castore_directory_service=x", "go together"),
        ("nix+http://h?castore_blob_service=nope%3A%2F%2F&castore_directory_service=x", "castore_blob_service"),
    ]:
        with pytest.raises(ConfigurationError, match=words):
            parse_service_url("pathinfoservices", bad)
    memory = quote("memory://", safe="")
    local = f"blob_service={memory}&directory_service={memory}"
    svc = await pathinfo_service_from_url(
        f"nix+http://h?{local}&castore_blob_service={memory}&castore_directory_service={memory}"
    )
    try:
        assert isinstance(svc, NixHttpPathInfoService) and svc.castore is not None
        assert isinstance(svc.castore[0], MemoryBlobService) and isinstance(svc.castore[1], MemoryDirectoryService)
    finally:
        await svc.close()
    plain = await pathinfo_service_from_url(f"nix+http://h?{local}")
    assert isinstance(plain, NixHttpPathInfoService) and plain.castore is None
    await plain.close()
    with pytest.raises(ConfigurationError, match=r"snix directory size rule, the local .* tvix rule"):
        NixHttpPathInfoService(
            "http://h",
            MemoryBlobService(),
            MemoryDirectoryService(SizeRule.TVIX),
            castore=(MemoryBlobService(), MemoryDirectoryService(SizeRule.SNIX)),
        )


async def test_infused_narinfo_is_substituted_from_castore_without_a_nar_download(tmp_path: Path) -> None:
    """A bridge's narinfo + its castore over gRPC: only the missing blob is fetched, no NAR is downloaded."""
    big = hashlib.sha256(b"b").digest() * 40_000
    sample = await make_sample(tmp_path, "up-1.0", {"a": b"A" * 100, "d/b": big, "d/empty": b""})
    far_blobs, far_dirs, far_paths = CountingBlobs(), MemoryDirectoryService(SizeRule.TVIX), MemoryPathInfoService()
    node, _, _ = await ingest_nar_bytes(sample.nar, far_blobs, far_dirs)
    await far_paths.put(NarInfo.parse(sample.narinfo()).to_path_info(node))
    bridge = NarBridge(far_blobs, far_dirs, far_paths, NarIndex(None), sign_key=KEY, nar_prefix="snix-castore")
    app = bridge.application()
    requests: list[str] = []

    async def record(request: web.Request, response: web.StreamResponse) -> None:
        requests.append(request.path)

    app.on_response_prepare.append(record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    grpc = await start_server("127.0.0.1:0", far_blobs, far_dirs)
    castore = (await blob_service_from_url(grpc.url), await directory_service_from_url(grpc.url))
    local_blobs, local_dirs = MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX)
    already = await local_blobs.put(b"A" * 100)  # the sample's file "a": not fetched again
    svc = NixHttpPathInfoService(
        f"http://127.0.0.1:{runner.addresses[0][1]}", local_blobs, local_dirs, (KEY.public,), castore=castore
    )
    try:
        info = await svc.get(sample.store_path.digest)
        assert info is not None and info.node == sample.node and info.nar_sha256 == sample.sha256
        assert requests == [f"/{sample.store_path.hash_part}.narinfo"]  # no NAR GET
        assert far_blobs.reads == {B3Digest(blake3.blake3(big).digest())} and already not in far_blobs.reads
        assert b"".join([c async for c in render_nar(info.node, local_blobs, local_dirs)]) == sample.nar
    finally:
        await svc.close()
        await close_all(*castore)
        await grpc.stop(0)
        await runner.cleanup()
        await bridge.index.close()


@pytest.mark.parametrize("case", ["other hash", "other size", "absent", "malformed"])
async def test_infused_root_that_does_not_match_falls_back_to_the_nar(
    upstream: tuple[StaticCache, str], sample: Sample, tmp_path: Path, case: str
) -> None:
    """A signed narinfo whose castore root renders to another NAR: the NAR is downloaded, the root never used."""
    cache, url = upstream
    b = hashlib.sha256(b"b").digest() * 40_000
    other = await make_sample(tmp_path, "other-1.0", {"a": b"B" * (109 if case == "other size" else 100), "d/b": b})
    assert (len(other.nar) == len(sample.nar)) is (case != "other size")
    far_blobs, far_dirs = CountingBlobs(), MemoryDirectoryService(SizeRule.TVIX)
    if case != "absent":
        await ingest_nar_bytes(other.nar, far_blobs, far_dirs)
    infused = nar_url(other.node, len(sample.nar), "snix-castore")  # claims the sample's NarSize
    if case == "malformed":
        infused = f"nar/snix-castore/AAAA?narsize={len(sample.nar)}"  # three zero bytes: not a Node
    cache.publish(sample, compression="none", URL=infused)
    cache.files[infused.partition("?")[0]] = sample.nar  # what the bridge would render for the NAR URL
    local_blobs, local_dirs = MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX)
    svc = NixHttpPathInfoService(url, local_blobs, local_dirs, (KEY.public,), castore=(far_blobs, far_dirs))
    try:
        info = await svc.get(sample.store_path.digest)
        assert info is not None and info.node == sample.node != other.node
        assert infused.partition("?")[0] in cache.requests  # fell back to the NAR
        # Rendered (and so fetched) only when the root's directories give the NarSize claimed.
        assert (B3Digest(blake3.blake3(b"B" * 100).digest()) in far_blobs.reads) is (case == "other hash")
        if case != "other hash":
            assert not far_blobs.reads
    finally:
        await svc.close()


class FailingOncePutMany(MemoryBlobService):
    """A local blob service whose first batch write fails (combined only logs that while reading through)."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    async def put_many(self, blobs: Sequence[bytes]) -> list[B3Digest]:
        if not self.failed:
            self.failed = True
            raise StorageError("disk full")
        return await super().put_many(blobs)


async def test_infused_root_not_kept_locally_falls_back_to_the_nar(
    upstream: tuple[StaticCache, str], sample: Sample
) -> None:
    """The castore root verified, but a blob fetched through it was not kept locally: the NAR is downloaded."""
    cache, url = upstream
    far_blobs, far_dirs = MemoryBlobService(), MemoryDirectoryService(SizeRule.TVIX)
    await ingest_nar_bytes(sample.nar, far_blobs, far_dirs)
    infused = nar_url(sample.node, len(sample.nar), "snix-castore")
    cache.publish(sample, compression="none", URL=infused)
    cache.files[infused.partition("?")[0]] = sample.nar
    local_blobs, local_dirs = FailingOncePutMany(), MemoryDirectoryService(SizeRule.TVIX)
    svc = NixHttpPathInfoService(url, local_blobs, local_dirs, (KEY.public,), castore=(far_blobs, far_dirs))
    try:
        info = await svc.get(sample.store_path.digest)
        assert info is not None and info.node == sample.node and local_blobs.failed
        assert infused.partition("?")[0] in cache.requests
        assert b"".join([c async for c in render_nar(info.node, local_blobs, local_dirs)]) == sample.nar
    finally:
        await svc.close()

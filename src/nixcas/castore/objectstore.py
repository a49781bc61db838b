"""Object storage (S3 and compatibles, GCS, Azure, memory) through ``obstore``.

Shared by the object-store blob and directory backends:

* :func:`parse_objectstore_url` / :func:`split_options` turn
  ``objectstore+s3://bucket/prefix?endpoint=…&region=…`` into an obstore URL
  plus options, the tvix/snix way (query parameters become object store
  options; the URL path is the base path inside the bucket).
* :class:`ObjectStore` wraps one obstore store: every request goes through one
  semaphore (a bounded window of requests in flight), is counted per method
  (the benchmarks report requests per imported file), is a CLIENT span when
  tracing is on (``objectstore GET`` …, with the store and key), and has its errors
  mapped to nixcas errors: unreachable → :class:`~nixcas.errors.UnavailableError`,
  refused credentials and missing buckets → a one-line
  :class:`~nixcas.errors.StorageError` saying so.
* :class:`Presence` answers "which of these keys exist?" for many keys at once
  with as few requests as it can (cached answers, listings of a key range
  instead of one ``HEAD`` per key when that is cheaper).

Credentials come from the URL options (``access_key_id``,
``secret_access_key``, ``session_token``, …) or the usual environment
variables (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ``GOOGLE_…``,
``AZURE_…``), which obstore reads itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import SplitResult, parse_qsl, urlsplit, urlunsplit

from nixcas._extras import missing_extra
from nixcas.castore.blob.layout import ZSTD_LEVEL
from nixcas.castore.digest import B3Digest
from nixcas.castore.sweep import Deletion, StoredObject
from nixcas.errors import ConfigurationError, StorageError, UnavailableError
from nixcas.ops import tracing
from nixcas.urls import is_decimal, scrubbed, shown

__all__ = [
    "CLIENT_OPTIONS",
    "SCHEMES",
    "ObjectMeta",
    "REFRESH_AFTER",
    "ObjectStore",
    "ObjectStoreBacked",
    "Presence",
    "create_bucket",
    "create_bucket_sync",
    "open_object_store",
    "parse_objectstore_url",
    "refresh_after_option",
    "zstd_level_option",
]

SCHEMES: Final = ("s3", "s3a", "gs", "az", "azure", "abfs", "abfss", "adl", "memory", "http", "https")
"""Object store URL schemes handled through obstore (``file`` has its own backend, :mod:`.blob.local`)."""

LOCAL_SCHEME: Final = "file"
"""obstore's local-disk store: taken by the directory backend (blobs route ``file`` to :mod:`.blob.local`)."""

CLIENT_OPTIONS: Final = {
    "concurrency": "requests in flight at once (default 32)",
    "create_bucket": "create a missing S3 bucket at start (true/false, default false)",
    "timeout": "seconds a request may take (default 60)",
    "connect_timeout": "seconds to connect (default 5)",
    "max_retries": "retries of a failed request (default 3)",
    "retry_timeout": "seconds of retrying before giving up (default 20)",
}
"""nixcas's own options on an object store URL; every other option goes to obstore."""

STREAM_BLOCK = 256 << 10
"""Bytes per block of a streamed ``GET`` (:meth:`ObjectStore.get_stream`)."""


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    """What a listing or ``HEAD`` says about one object."""

    key: str
    size: int
    mtime_ns: int


def parse_objectstore_url(url: SplitResult, *, allow_file: bool = False) -> tuple[str, dict[str, str]]:
    """``objectstore+s3://b/p?x=y`` → (``s3://b/p``, ``{"x": "y"}``), checked for shape.

    ``allow_file`` also takes ``objectstore+file:///abs/path`` (obstore's local store).
    """
    inner = url.scheme.partition("+")[2]
    where = repr(shown(url))  # the query may hold credentials
    if inner not in SCHEMES and not (allow_file and inner == LOCAL_SCHEME):
        raise ConfigurationError(
            f"{where}: unsupported object store {inner or '(none)'!r} (supported: file, {', '.join(SCHEMES)})"
        )
    if inner == LOCAL_SCHEME and (url.netloc or not url.path.startswith("/")):
        raise ConfigurationError(f"{where}: needs an absolute path (write objectstore+file:///abs/path)")
    options: dict[str, str] = {}
    for key, value in parse_qsl(url.query, keep_blank_values=True, strict_parsing=False):
        if key in options:
            raise ConfigurationError(f"{where}: option {key!r} given twice")
        options[key] = value
    if url.fragment:
        raise ConfigurationError(f"{where}: URLs take no #fragment")
    return urlunsplit((inner, url.netloc, url.path, "", "")), options


def _seconds(options: Mapping[str, str], name: str, default: float, where: str) -> float:
    raw = options.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 86400:
        raise ConfigurationError(f"{where}: {name} must be a number of seconds between 0 and 86400, not {raw!r}")
    return value


def _count(options: Mapping[str, str], name: str, default: int, low: int, high: int, where: str) -> int:
    raw = options.get(name)
    if raw is None:
        return default
    if not is_decimal(raw) or not low <= int(raw) <= high:
        raise ConfigurationError(f"{where}: {name} must be an integer from {low} to {high}, not {raw!r}")
    return int(raw)


def _flag(options: Mapping[str, str], name: str, where: str) -> bool:
    raw = options.get(name, "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise ConfigurationError(f"{where}: {name} must be true or false, not {options[name]!r}")
    return raw in ("true", "1")


def check_client_options(url: str, options: Mapping[str, str], where: str) -> None:
    """Reject malformed nixcas options and a URL obstore cannot take, before anything is opened."""
    _seconds(options, "timeout", 60, where)
    _seconds(options, "connect_timeout", 5, where)
    _seconds(options, "retry_timeout", 20, where)
    _count(options, "concurrency", 32, 1, 1024, where)
    _count(options, "max_retries", 3, 0, 100, where)
    _flag(options, "create_bucket", where)
    scheme = urlsplit(url).scheme
    if scheme == LOCAL_SCHEME:
        path = urlsplit(url).path
        if urlsplit(url).netloc or not path.startswith("/") or path.strip("/") == "":
            raise ConfigurationError(
                f"{where}: needs an absolute path other than / (write objectstore+file:///abs/path)"
            )
        return
    if scheme not in SCHEMES:
        raise ConfigurationError(f"{where}: unsupported object store {scheme or '(none)'!r}")
    if scheme == "memory" and (urlsplit(url).netloc or urlsplit(url).path.strip("/")):
        raise ConfigurationError(f"{where}: memory object stores take no bucket or path (write objectstore+memory:///)")
    if scheme != "memory" and not urlsplit(url).netloc:
        raise ConfigurationError(f"{where}: needs a bucket (write objectstore+{scheme}://bucket[/prefix])")


def _describe(e: BaseException) -> str:
    """The first line of an obstore error, without the debug dump that follows it."""
    text = str(e).strip().splitlines()
    return text[0][:500] if text else type(e).__name__


def _is_unreachable(text: str) -> bool:
    lowered = text.lower()
    return any(
        marker in lowered
        for marker in (
            "connection refused",
            "error sending request",
            "tcp connect error",
            "dns error",
            "timed out",
            "timeout",
            "connection reset",
            "broken pipe",
            "connection closed",
        )
    )


class ObjectStore:
    """One obstore store with a request window, request counters and nixcas errors.

    obstore (and its Rust runtime) is imported by the methods, so a store on the
    local disk, which never makes one of these, does not load it.
    """

    def __init__(self, url: str, options: Mapping[str, str] | None = None) -> None:
        where = repr(shown(url))
        try:
            import obstore.exceptions as obe
            from obstore.store import LocalStore, MemoryStore
        except ImportError as e:
            missing = missing_extra(e, where)
            if missing is None:
                raise
            raise missing from None

        options = dict(options or {})
        check_client_options(url, options, where)
        self.url = url
        self.where = shown(url)
        self._given = dict(options)  # what library messages are scrubbed of (credentials)
        own = {k: options.pop(k) for k in list(options) if k in CLIENT_OPTIONS}
        self.create_bucket_at_start = _flag(own, "create_bucket", where)
        self.requests: Counter[str] = Counter()
        """Requests sent, by method (``GET``, ``HEAD``, ``PUT``, ``LIST``, ``DELETE``)."""
        self._window = asyncio.Semaphore(_count(own, "concurrency", 32, 1, 1024, where))
        scheme = urlsplit(url).scheme
        self.is_s3 = scheme in ("s3", "s3a")
        self.sorted_listings = scheme != "file"
        """Listings come in key order (object stores do; a local directory walk does not)."""
        if scheme == "memory":
            if options:
                raise ConfigurationError(f"{where}: memory object stores take no options ({min(options)!r} given)")
            self._store: Any = MemoryStore()
            return
        if scheme == LOCAL_SCHEME:
            if options:
                raise ConfigurationError(f"{where}: local object stores take no options ({min(options)!r} given)")
            try:
                self._store = LocalStore(urlsplit(url).path, mkdir=True)
            except (obe.BaseError, OSError, ValueError) as e:
                raise ConfigurationError(f"{where}: {self._describe(e)}") from None
            return
        client: dict[str, Any] = {
            "timeout": datetime.timedelta(seconds=_seconds(own, "timeout", 60, where)),
            "connect_timeout": datetime.timedelta(seconds=_seconds(own, "connect_timeout", 5, where)),
            "user_agent": "nixcas",
        }
        if options.pop("allow_http", "").lower() in ("true", "1") or options.get("endpoint", "").startswith("http://"):
            client["allow_http"] = True
        retry: Any = {
            "max_retries": _count(own, "max_retries", 3, 0, 100, where),
            "retry_timeout": datetime.timedelta(seconds=_seconds(own, "retry_timeout", 20, where)),
            "backoff": {
                "init_backoff": datetime.timedelta(milliseconds=100),
                "max_backoff": datetime.timedelta(seconds=5),
                "base": 2,
            },
        }
        try:
            self._store = _open(url, options, client, retry)
        except (obe.BaseError, ValueError, TypeError) as e:
            raise ConfigurationError(f"{where}: {self._describe(e)}") from None

    def __repr__(self) -> str:
        return f"ObjectStore({self.where!r})"

    def _describe(self, e: BaseException) -> str:
        """:func:`_describe`, without any credential this store was given."""
        return scrubbed(_describe(e), self.url, self._given)

    # -- errors ------------------------------------------------------------------------

    def _error(self, e: BaseException, what: str) -> StorageError:
        import obstore.exceptions as obe

        text = self._describe(e)
        full = str(e)
        where = f"{self.where}: {what}"
        if "169.254.169.254" in full or "169.254.170.2" in full:
            return StorageError(
                f"{where}: no credentials given (set access_key_id and secret_access_key, or the AWS_* "
                f"environment variables), and the cloud's instance metadata service did not answer: {text}"
            )
        if isinstance(e, obe.PermissionDeniedError | obe.UnauthenticatedError) or " 403 " in full:
            return StorageError(f"{where}: access denied (wrong credentials, or no permission): {text}")
        if "NoSuchBucket" in full:
            return StorageError(f"{where}: the bucket does not exist (create it, or add create_bucket=true): {text}")
        if _is_unreachable(full):
            return UnavailableError(f"{where}: object store unreachable: {text}")
        return StorageError(f"{where}: {text}")

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        import obstore.exceptions as obe

        try:
            yield
        except FileNotFoundError:
            raise
        except (obe.BaseError, OSError, RuntimeError, ValueError) as e:
            if isinstance(e, StorageError):
                raise
            raise self._error(e, what) from None

    @contextlib.contextmanager
    def _request(self, method: str, key: str, size: int | None = None) -> Iterator[None]:
        """One request: counted, traced (the store as shown, never its options) and its errors mapped."""
        self.requests[method] += 1
        if not tracing.enabled():
            with self._errors(f"{method} {key}"):
                yield
            return
        attributes: dict[str, str | int] = {
            "nixcas.objectstore.method": method,
            "nixcas.objectstore.store": self.where,
            "nixcas.objectstore.prefix" if method == "LIST" else "nixcas.objectstore.key": key,
        }
        if size is not None:
            attributes["nixcas.objectstore.size"] = size
        with tracing.backend_span(f"objectstore {method}", attributes), self._errors(f"{method} {key}"):
            yield

    # -- requests ----------------------------------------------------------------------

    async def _get(self, key: str, cap: int | None, *, windowed: bool = True) -> Any:
        """The started GET (obstore's result, body not read yet); ``None`` if absent; over ``cap`` bytes raises.

        ``windowed``: take a place in the window for the request (``False``: the caller holds one).
        """
        import obstore

        async with self._window if windowed else contextlib.nullcontext():
            with self._request("GET", key):
                try:
                    result = await obstore.get_async(self._store, key)
                except FileNotFoundError:
                    return None
        size = int(result.meta["size"])
        if cap is not None and size > cap:
            raise StorageError(f"{self.where}: {key} holds {size} bytes, more than the {cap} it may")
        return result

    async def get(self, key: str, cap: int | None = None) -> bytes | None:
        """The object's bytes; ``None`` if absent; a :class:`StorageError` if it holds more than ``cap``.

        The request and the body read hold one place in the window together, so
        the window bounds the responses open at once (and the memory they hold).
        """
        async with self._window:
            result = await self._get(key, cap, windowed=False)
            if result is None:
                return None
            with self._errors(f"GET {key}"):
                return bytes(await result.bytes_async())

    async def get_stream(self, key: str, cap: int | None = None) -> AsyncGenerator[bytes] | None:
        """The object's bytes as a stream of blocks; ``None`` if absent.

        Only the request itself takes a place in the request window; the
        blocks are read as the caller asks for them (and a stream closed early
        reads no further).  More than ``cap`` bytes is a :class:`StorageError`.
        """
        result = await self._get(key, cap)
        return None if result is None else self._blocks(result, key)

    async def _blocks(self, result: Any, key: str) -> AsyncGenerator[bytes]:
        stream = result.stream(min_chunk_size=STREAM_BLOCK)
        while True:
            with self._errors(f"GET {key}"):
                try:
                    block = await stream.__anext__()
                except StopAsyncIteration:
                    return
            yield bytes(block)

    async def head(self, key: str) -> ObjectMeta | None:
        import obstore

        async with self._window:
            with self._request("HEAD", key):
                try:
                    meta = await obstore.head_async(self._store, key)
                except FileNotFoundError:
                    return None
        return _meta(meta)

    async def put(self, key: str, data: bytes) -> None:
        """Write ``data`` at ``key`` in one request (a reader sees the old object or the whole new one)."""
        import obstore

        async with self._window:
            with self._request("PUT", key, len(data)):
                await obstore.put_async(self._store, key, data, use_multipart=False)

    async def delete(self, key: str) -> None:
        """Delete ``key`` (absent already: done)."""
        import obstore

        async with self._window:
            with self._request("DELETE", key), contextlib.suppress(FileNotFoundError):
                await obstore.delete_async(self._store, key)

    async def list(self, prefix: str, page: int = 1000, after: str | None = None) -> AsyncIterator[list[ObjectMeta]]:
        """Every object under ``prefix`` (a whole path segment), a page at a time (one LIST request per page).

        With ``after``, only keys sorting after it (S3's ``start-after``), in key order.
        """
        import obstore

        stream = obstore.list(self._store, prefix=prefix, offset=after, chunk_size=page)
        while True:
            async with self._window:
                with self._request("LIST", prefix):
                    try:
                        batch = await stream.__anext__()
                    except StopAsyncIteration:
                        return
            yield [_meta(m) for m in batch]

    async def probe(self) -> None:
        """Fail now, with a clear error, if the store cannot be used (unreachable, credentials, bucket)."""
        if self.create_bucket_at_start and self.is_s3:
            await create_bucket(self)
        async for _ in self.list("nixcas-probe/", page=1):
            break


def _open(url: str, config: dict[str, str], client: Any, retry: Any) -> Any:
    """obstore's ``from_url`` (its overloads are per store kind; the options here are checked by obstore)."""
    from obstore.store import from_url

    opener: Any = from_url
    return opener(url, config=config or None, client_options=client, retry_config=retry)


def _meta(meta: Mapping[str, Any]) -> ObjectMeta:
    modified = meta["last_modified"]
    return ObjectMeta(str(meta["path"]), int(meta["size"]), int(modified.timestamp() * 1e9))


def create_bucket_sync(store: ObjectStore | str) -> None:
    """Create the S3 bucket of ``store`` (a no-op if it exists and is ours); blocking.

    obstore has no bucket API; a bucket is created by ``PUT /<bucket>/`` signed
    with the store's own credentials (a pre-signed URL for the empty key).
    """
    import urllib.error
    import urllib.request

    import obstore

    if isinstance(store, str):
        store = ObjectStore(*parse_objectstore_url(urlsplit(store)))
    signed = obstore.sign(store._store, "PUT", "", datetime.timedelta(minutes=5))
    request = urllib.request.Request(str(signed), method="PUT")  # noqa: S310 - the store's own endpoint
    try:
        urllib.request.urlopen(request, timeout=30).close()  # noqa: S310
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")
        if e.code == 409 and ("BucketAlreadyOwnedByYou" in body or "BucketAlreadyExists" in body):
            return
        raise StorageError(f"{store.where}: cannot create the bucket: HTTP {e.code}: {body[:300]}") from None
    except OSError as e:
        raise UnavailableError(f"{store.where}: cannot create the bucket: {e}") from None


async def create_bucket(store: ObjectStore) -> None:
    """:func:`create_bucket_sync` in a worker thread."""
    await asyncio.to_thread(create_bucket_sync, store)


async def open_object_store(url: str, options: Mapping[str, str]) -> ObjectStore:
    """An :class:`ObjectStore`, probed (so an unusable store fails at start, not at first use)."""
    store = ObjectStore(url, options)
    await store.probe()
    return store


REFRESH_AFTER = 1200.0
"""Default ``refresh_after`` (seconds): an object older than this is written again rather than relied on."""


def zstd_level_option(options: Mapping[str, str], where: str) -> int:
    """The ``zstd_level`` option (default :data:`ZSTD_LEVEL`), checked."""
    raw = options.get("zstd_level", str(ZSTD_LEVEL))
    try:
        level = int(raw)
    except ValueError:
        raise ConfigurationError(f"{where}: zstd_level must be an integer") from None
    if not -7 <= level <= 22:
        raise ConfigurationError(f"{where}: zstd_level must be between -7 and 22")
    return level


def refresh_after_option(options: Mapping[str, str], where: str) -> float:
    """The ``refresh_after`` option in seconds (default :data:`REFRESH_AFTER`), checked."""
    raw = options.get("refresh_after", str(int(REFRESH_AFTER)))
    if not is_decimal(raw) or not 1 <= int(raw) <= 7 * 86400:
        raise ConfigurationError(f"{where}: refresh_after must be a number of seconds from 1 to 604800, not {raw!r}")
    return float(raw)


class ObjectStoreBacked:
    """What services over an :class:`ObjectStore` share: the existence cache and the refresh rule.

    Object stores cannot refresh an object's age in place, so a writer relies
    on an existing object only if it was written within ``refresh_after``
    (:meth:`_fresh`) and writes an older one again; a garbage collection must
    therefore keep at least that much (:attr:`min_grace_ns`).
    """

    def __init__(self, store: ObjectStore, refresh_after: float) -> None:
        self.store = store
        self.presence = Presence(store)
        self.refresh_after_ns = int(refresh_after * 1e9)

    @property
    def min_grace_ns(self) -> int:
        """The shortest GC grace period that is safe for this store: twice ``refresh_after``.

        A writer relies on objects up to ``refresh_after`` old and checks, before
        it publishes, that none it relied on has grown older than 1.5 times that
        (:meth:`_still_safe`); a collection with this grace period deletes
        nothing younger than twice that.
        """
        return 2 * self.refresh_after_ns

    def _fresh(self, meta: ObjectMeta | None) -> bool:
        """``meta`` is an object a writer may rely on without writing it again."""
        return meta is not None and meta.mtime_ns >= time.time_ns() - self.refresh_after_ns

    def _still_safe(self, meta: ObjectMeta) -> bool:
        """An object relied on when it was fresh is still far from any collection's cutoff (before publishing)."""
        return meta.mtime_ns >= time.time_ns() - self.refresh_after_ns * 3 // 2

    async def _delete_old(
        self, objects: Sequence[StoredObject], cutoff_ns: int, key_of: Callable[[B3Digest], str]
    ) -> Deletion:
        """Delete the objects (at ``key_of(digest)``) still older than ``cutoff_ns`` when looked at again (``HEAD``).

        Object stores have no conditional delete: a rewrite landing between the
        ``HEAD`` and the ``DELETE`` is lost (see ``refresh_after``).  Objects
        already gone are in neither list.
        """
        done = Deletion()

        async def one(obj: StoredObject) -> None:
            key = key_of(obj.digest)
            meta = await self.store.head(key)
            if meta is not None and meta.mtime_ns >= cutoff_ns:
                done.kept.append(obj)
                return
            self.presence.forget(key)
            if meta is not None:
                await self.store.delete(key)
                done.deleted.append(obj)

        await asyncio.gather(*(one(o) for o in objects))
        return done

    async def _exists(self, key: str) -> bool:
        """For readers (``has``): an object written or seen within ``refresh_after``, or one a ``HEAD`` finds."""
        return await self.presence.exists(key, time.time_ns() - self.refresh_after_ns) is not None


LIST_MIN_KEYS = 8
"""Keys of one key range that make listing the range worth trying instead of one ``HEAD`` each."""

KEYS_PER_WANTED = 125
"""A listing may read this many keys per key asked about (a 1,000-key page must answer 8) before it gives up."""

LISTED_TTL = 600.0
"""Seconds a complete listing of a range answers "absent" for keys not in it (a stale "absent" costs one upload)."""


def key_range(key: str) -> str:
    """The listing range of ``<kind>/b3/<hex…>``: the kind plus the first hex digit (1/16 of the kind's keys)."""
    cut = key.index("/b3/") + 5
    return key[:cut]


def _range_listing(prefix: str) -> tuple[str, str]:
    """(the directory to list, the key to start after) for a key range: listings match whole path segments."""
    parent = prefix[: prefix.rindex("/") + 1]
    return parent, prefix


class Presence:
    """Which keys exist, answered for many keys at once with few requests.

    Answers come from, in order: a bounded cache of keys seen to exist (by
    any request, or written by this process); complete listings of a key
    range made recently (:data:`LISTED_TTL`); a listing of a range made now
    when enough keys fall into it and the range turns out small
    (:data:`LIST_MIN_KEYS`, :data:`KEYS_PER_WANTED` — a range found too big
    is not listed again); and otherwise one ``HEAD`` per key, concurrently.

    "Present" answers carry the object's modification time, so callers can
    tell an object a garbage collection might be about to delete (old) from
    one it cannot (young); see ``refresh_after`` of the blob backend.
    """

    def __init__(self, store: ObjectStore, capacity: int = 1 << 18) -> None:
        self.store = store
        self.capacity = capacity
        self._known: OrderedDict[str, ObjectMeta] = OrderedDict()
        self._listed: dict[str, float] = {}
        self._too_big: set[str] = set()
        self._listing: dict[str, asyncio.Lock] = {}

    def note(self, meta: ObjectMeta) -> None:
        """``meta.key`` exists (written or seen just now)."""
        self._known[meta.key] = meta
        self._known.move_to_end(meta.key)
        while len(self._known) > self.capacity:
            evicted, _ = self._known.popitem(last=False)
            # The range's listing no longer answers for all its keys: forget that it was listed.
            self._listed.pop(key_range(evicted), None)

    def noted(self, key: str, size: int) -> None:
        """This process wrote ``key`` (``size`` bytes) just now."""
        self.note(ObjectMeta(key, size, time.time_ns()))

    def forget(self, key: str) -> None:
        """``key`` was deleted (or found missing)."""
        self._known.pop(key, None)

    def cached(self, key: str) -> ObjectMeta | None:
        return self._known.get(key)

    async def exists(self, key: str, fresh_after_ns: int) -> ObjectMeta | None:
        """Whether ``key`` exists, for a reader: answered from memory only by an object seen since
        ``fresh_after_ns`` (one no collection can have deleted since), otherwise by asking (``HEAD``).

        Unlike :meth:`check`, never answers "absent" from a listing: another
        process may have written the object since.
        """
        meta = self._known.get(key)
        if meta is not None and meta.mtime_ns >= fresh_after_ns:
            return meta
        meta = await self.store.head(key)
        if meta is None:
            self.forget(key)
        else:
            self.note(meta)
        return meta

    async def check(self, keys: Sequence[str]) -> dict[str, ObjectMeta | None]:
        """For each key, its metadata if it exists, else ``None`` — for a writer deciding what to upload.

        A cached "present" may be old (callers look at ``mtime_ns``); an
        "absent" may be stale by up to :data:`LISTED_TTL` (the upload it
        causes is harmless: objects are content-addressed).
        """
        found: dict[str, ObjectMeta | None] = {}
        unknown: dict[str, list[str]] = {}
        for key in keys:
            meta = self._known.get(key)
            if meta is not None:
                self._known.move_to_end(key)
                found[key] = meta
            elif self._listed_recently(key_range(key)):
                found[key] = None
            else:
                unknown.setdefault(key_range(key), []).append(key)
        listable = [r for r, ks in unknown.items() if len(ks) >= LIST_MIN_KEYS and r not in self._too_big]
        listed = await asyncio.gather(*(self._list_range(r, len(unknown[r]) * KEYS_PER_WANTED) for r in listable))
        for prefix, listing in zip(listable, listed, strict=True):
            if isinstance(listing, dict):  # listed by this call: its own answers (the cache may not hold them all)
                for key in unknown.pop(prefix):
                    found[key] = listing.get(key)
            elif listing:  # listed by a concurrent call: what the cache still holds, if the listing still counts
                keys_here = unknown.pop(prefix)
                for key in keys_here:
                    meta = self._known.get(key)
                    if meta is not None or self._listed_recently(prefix):
                        found[key] = meta
                    else:
                        unknown.setdefault(prefix, []).append(key)
        rest = [key for ks in unknown.values() for key in ks]
        heads = await asyncio.gather(*(self.store.head(key) for key in rest))
        for key, meta in zip(rest, heads, strict=True):
            found[key] = meta
            if meta is not None:
                self.note(meta)
        return found

    def _listed_recently(self, prefix: str) -> bool:
        return self._listed.get(prefix, -LISTED_TTL) > time.monotonic() - LISTED_TTL

    async def prime(self, kind: str, wanted: int) -> None:
        """Before asking about ``wanted`` keys of ``kind`` one at a time: list the kind's ranges if that is cheaper.

        A streaming writer asks about its chunks as they are cut, one by
        one; listing the chunk ranges first (when the store is small enough
        for that to cost fewer requests than ``wanted`` ``HEAD``s) answers
        them all from memory.
        """
        ranges = [f"{kind}/b3/{h}" for h in "0123456789abcdef"]
        budget = max(1, wanted * KEYS_PER_WANTED // len(ranges))
        todo = [r for r in ranges if r not in self._too_big and not self._listed_recently(r)]
        await asyncio.gather(*(self._list_range(r, budget) for r in todo))

    async def _list_range(self, prefix: str, budget: int) -> dict[str, ObjectMeta] | bool:
        """List ``prefix`` whole if it holds at most ``budget`` keys: what exists there (also noted in the cache).

        ``False``: the range is too big to list; ``True``: a concurrent call
        listed it just now (one listing per range at a time).
        """
        lock = self._listing.setdefault(prefix, asyncio.Lock())
        async with lock:
            if self._listed_recently(prefix):
                return True
            if prefix in self._too_big:
                return False
            return await self._list_range_now(prefix, budget)

    async def _list_range_now(self, prefix: str, budget: int) -> dict[str, ObjectMeta] | bool:
        # A listing the cache cannot hold saves nothing later: no more than a 16th of it per range.
        budget = min(budget, self.capacity // 16)
        started = time.monotonic()
        listing: dict[str, ObjectMeta] = {}
        parent, after = _range_listing(prefix)
        async for page in self.store.list(parent, after=after):
            for meta in page:
                if not meta.key.startswith(prefix):
                    if self.store.sorted_listings:  # past the range: keys come in order
                        break
                    continue
                listing[meta.key] = meta
            else:
                if len(listing) > budget:
                    self._too_big.add(prefix)
                    return False
                continue
            break
        for meta in listing.values():
            self.note(meta)
        if all(key in self._known for key in listing):  # else the cache cannot answer for the whole range
            self._listed[prefix] = started
        return listing

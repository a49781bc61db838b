"""obstore's adapter: one obstore store with a request window, request counters and nixcas errors.

:class:`ObjectStore` implements :class:`~.io.ObjectIO` over obstore (S3 and
compatibles, GCS, Azure, memory, obstore's local store): every request goes
through one semaphore (a bounded window of requests in flight), is counted
per method (the benchmarks report requests per imported file), is a CLIENT
span when tracing is on (``objectstore GET`` …, with the store and key), and
has its errors mapped to nixcas errors: unreachable →
:class:`~nixcas.errors.UnavailableError`, refused credentials and missing
buckets → a one-line :class:`~nixcas.errors.StorageError` saying so.

Credentials come from the URL options (``access_key_id``,
``secret_access_key``, ``session_token``, …) or the usual environment
variables (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ``GOOGLE_…``,
``AZURE_…``), which obstore reads itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

from nixcas._extras import missing_extra
from nixcas.castore.objectstore.io import ObjectMeta
from nixcas.castore.objectstore.options import (
    CLIENT_OPTIONS,
    LOCAL_SCHEME,
    check_client_options,
    option_count,
    option_flag,
    option_seconds,
    parse_objectstore_url,
)
from nixcas.errors import ConfigurationError, StorageError, UnavailableError
from nixcas.ops import tracing
from nixcas.urls import scrubbed, shown

__all__ = ["ObjectStore", "create_bucket", "create_bucket_sync", "open_object_store"]

STREAM_BLOCK = 256 << 10
"""Bytes per block of a streamed ``GET`` (:meth:`ObjectStore.get_stream`)."""


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
        self.create_bucket_at_start = option_flag(own, "create_bucket", where)
        self.requests: Counter[str] = Counter()
        """Requests sent, by method (``GET``, ``HEAD``, ``PUT``, ``LIST``, ``DELETE``)."""
        self._window = asyncio.Semaphore(option_count(own, "concurrency", 32, 1, 1024, where))
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
            "timeout": datetime.timedelta(seconds=option_seconds(own, "timeout", 60, where)),
            "connect_timeout": datetime.timedelta(seconds=option_seconds(own, "connect_timeout", 5, where)),
            "user_agent": "nixcas",
        }
        if options.pop("allow_http", "").lower() in ("true", "1") or options.get("endpoint", "").startswith("http://"):
            client["allow_http"] = True
        retry: Any = {
            "max_retries": option_count(own, "max_retries", 3, 0, 100, where),
            "retry_timeout": datetime.timedelta(seconds=option_seconds(own, "retry_timeout", 20, where)),
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

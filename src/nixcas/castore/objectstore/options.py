"""Object store URLs and options: ``objectstore+s3://bucket/prefix?endpoint=…&region=…``.

:func:`parse_objectstore_url` turns such a URL into an obstore URL plus
options, the tvix/snix way (query parameters become object store options; the
URL path is the base path inside the bucket); the checks here reject a
malformed option before anything is opened.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final
from urllib.parse import SplitResult, parse_qsl, urlsplit, urlunsplit

from nixcas.castore.objectstore.layout import ZSTD_LEVEL
from nixcas.errors import ConfigurationError
from nixcas.urls import is_decimal, shown

__all__ = [
    "CLIENT_OPTIONS",
    "LOCAL_SCHEME",
    "REFRESH_AFTER",
    "SCHEMES",
    "check_client_options",
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


def option_seconds(options: Mapping[str, str], name: str, default: float, where: str) -> float:
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


def option_count(options: Mapping[str, str], name: str, default: int, low: int, high: int, where: str) -> int:
    raw = options.get(name)
    if raw is None:
        return default
    if not is_decimal(raw) or not low <= int(raw) <= high:
        raise ConfigurationError(f"{where}: {name} must be an integer from {low} to {high}, not {raw!r}")
    return int(raw)


def option_flag(options: Mapping[str, str], name: str, where: str) -> bool:
    raw = options.get(name, "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise ConfigurationError(f"{where}: {name} must be true or false, not {options[name]!r}")
    return raw in ("true", "1")


def check_client_options(url: str, options: Mapping[str, str], where: str) -> None:
    """Reject malformed nixcas options and a URL obstore cannot take, before anything is opened."""
    option_seconds(options, "timeout", 60, where)
    option_seconds(options, "connect_timeout", 5, where)
    option_seconds(options, "retry_timeout", 20, where)
    option_count(options, "concurrency", 32, 1, 1024, where)
    option_count(options, "max_retries", 3, 0, 100, where)
    option_flag(options, "create_bucket", where)
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

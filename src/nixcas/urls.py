"""Small helpers for turning service URLs into backend configurations."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Self
from urllib.parse import SplitResult, parse_qsl, quote, unquote, urlsplit, urlunsplit

from nixcas.errors import ConfigurationError

__all__ = [
    "MemoryUrlConfig",
    "is_decimal",
    "is_secret_name",
    "near_far_from_url",
    "query_pairs",
    "scrubbed",
    "shown",
    "query_options",
    "redacted",
    "remember_secrets",
    "require_bare_url",
    "require_plain_scheme",
    "url_tag",
    "url_text",
]


def is_decimal(text: str) -> bool:
    """Whether ``text`` is a non-empty run of ASCII digits (``isdigit`` alone accepts ``²``, which ``int`` refuses)."""
    return text.isascii() and text.isdigit()


_SECRET_WORDS = ("secret", "password", "passwd", "token", "key", "sas", "credential", "signature")


def shown(url: str | SplitResult) -> str:
    """``url`` as every message, log line, ``repr`` and error body shows it: the values of options that
    look like credentials (and the password of ``user:password@``) replaced by ``***``, also inside URLs
    nested as option values.  The one redaction of the code base: nothing else prints a service URL."""
    try:
        parts = urlsplit(url) if isinstance(url, str) else url
    except ValueError:  # e.g. an unbalanced '[' in the host
        return "<unparsable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}{':***' if colon else ''}@{host}"
    query = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if _is_secret(key):
            value = "***"
        elif "://" in value:
            value = shown(value)
        query.append(f"{key}={quote(value, safe='/:@*+')}")
    text = f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else urlunsplit(("", netloc, parts.path, "", ""))
    if query:
        text += "?" + "&".join(query)
    return text + (f"#{parts.fragment}" if parts.fragment else "")


def scrubbed(text: str, url: str, options: Mapping[str, str] | None = None) -> str:
    """``text`` (a library's message about ``url``) with each credential ``url`` (or its ``options``,
    given apart from it) holds replaced by ``***``: the credentials :func:`shown` hides."""
    for secret in sorted(set(_secrets(url, options)), key=len, reverse=True):
        for form in (secret, unquote(secret), quote(secret, safe="")):
            text = text.replace(form, "***")
    return text


MIN_REMEMBERED = 4
"""Shorter credentials are not looked for in free text (every ``abc`` of every log line would go)."""
_remembered: dict[str, None] = {}
"""Every credential of every service URL this process was configured with (and its quoted forms), longest first."""


def remember_secrets(url: str, options: Mapping[str, str] | None = None) -> None:
    """Note the credentials ``url`` holds: :func:`redacted` hides them wherever they turn up later."""
    found = False
    for secret in _secrets(url, options):
        for form in (secret, unquote(secret), quote(secret, safe="")):
            if len(form) >= MIN_REMEMBERED and form not in _remembered:
                _remembered[form] = None
                found = True
    if found:
        ordered = sorted(_remembered, key=len, reverse=True)
        _remembered.clear()
        _remembered.update(dict.fromkeys(ordered))


def redacted(text: str) -> str:
    """``text`` with every remembered credential (:func:`remember_secrets`) replaced by ``***``: applied to
    every log line and every HTTP/gRPC error body, whatever library wrote the message."""
    for secret in _remembered:
        if secret in text:
            text = text.replace(secret, "***")
    return text


def _secrets(url: str, options: Mapping[str, str] | None = None) -> list[str]:
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found = [parts.password] if parts.password else []
    for key, value in [*parse_qsl(parts.query, keep_blank_values=True), *(options or {}).items()]:
        if _is_secret(key) and value:
            found.append(value)
        elif "://" in value:
            found += _secrets(value)
    return found


def is_secret_name(key: str) -> bool:
    """Whether an option or query parameter named ``key`` holds a credential (its value is never shown)."""
    return any(word in key.lower() for word in _SECRET_WORDS)


_is_secret = is_secret_name


def url_tag(url: SplitResult) -> str:
    """The backend tag: the scheme up to the first ``+`` (``grpc+unix`` → ``grpc``)."""
    return url.scheme.split("+", 1)[0]


def require_plain_scheme(url: SplitResult) -> None:
    """Reject a ``+suffix`` on schemes that take none (``combined+x://`` is not ``combined://``)."""
    if "+" in url.scheme:
        raise ConfigurationError(f"{shown(url)!r}: unknown type {url.scheme!r} (write {url_tag(url)}://)")


def require_bare_url(url: SplitResult) -> None:
    """Reject host, path and query on URLs like ``memory://``."""
    require_plain_scheme(url)
    if url.netloc or url.path or url.query or url.fragment:
        raise ConfigurationError(
            f"{shown(url)!r}: {url.scheme}:// takes no host, path or options (write {url.scheme}://)"
        )


class MemoryUrlConfig:
    """``memory://`` (no host, path or options); composition: ``type = "memory"``.

    The config every in-memory backend shares; each adds ``build`` for its service.
    """

    type_tag: ClassVar[str] = "memory"

    @classmethod
    def from_url(cls, url: SplitResult) -> Self:
        require_bare_url(url)
        return cls()


def query_pairs(url: SplitResult) -> list[tuple[str, str]]:
    """The ``key=value`` pairs of the query, in order; a malformed query is a :class:`ConfigurationError`."""
    try:
        return parse_qsl(url.query, keep_blank_values=True, strict_parsing=bool(url.query))
    except ValueError as e:
        raise ConfigurationError(f"{shown(url)!r}: invalid options: {e}") from None


def query_options(url: SplitResult, allowed: set[str]) -> dict[str, str]:
    """URL query parameters, rejecting any not in ``allowed`` or given twice."""
    options: dict[str, str] = {}
    for key, value in query_pairs(url):
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise ConfigurationError(f"{shown(url)!r}: unknown option {key!r} (known: {known})")
        if key in options:
            raise ConfigurationError(f"{shown(url)!r}: option {key!r} given twice")
        options[key] = value
    return options


def near_far_from_url(url: SplitResult) -> tuple[str, str]:
    """``combined://?near=A&far=B`` / ``cache://?near=A&far=B`` → ``(A, B)``; both required."""
    require_plain_scheme(url)
    if url.netloc or url.path or url.fragment:
        raise ConfigurationError(f"{shown(url)!r}: {url.scheme}:// takes only ?near=…&far=… (no host or path)")
    options = query_options(url, {"near", "far"})
    missing = [key for key in ("near", "far") if not options.get(key)]
    if missing:
        raise ConfigurationError(
            f"{shown(url)!r}: missing {' and '.join(missing)} (write {url.scheme}://?near=…&far=…)"
        )
    return options["near"], options["far"]


def url_text(url: SplitResult) -> str:
    """``url`` as text, always with ``//`` after the scheme (``geturl()`` drops it when there is no host)."""
    text = f"{url.scheme}://{url.netloc}{url.path}"
    if url.query:
        text += f"?{url.query}"
    if url.fragment:
        text += f"#{url.fragment}"
    return text

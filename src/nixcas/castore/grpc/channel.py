"""``grpc+unix:///abs/socket``, ``grpc+http://host:port``, ``grpc+https://host:port`` → a channel.

Options (URL query): ``wait-connect=1`` connects while the service is built
and fails then if nobody answers (default: connect lazily on the first
call); ``connect-timeout=SECONDS`` bounds that wait (default 10);
``protocol=tvix|snix`` picks the service names spoken (default ``tvix``;
nixcas daemons answer both); ``chunkstore=1`` makes a blob service speak
snix's ``ChunkStoreService``/``BlobStoreService`` (always under the ``snix``
names) to move only the chunks a side lacks (default ``0``; other service
kinds ignore it; see :mod:`nixcas.castore.blob.grpc`); ``size-rule=snix|tvix``
declares the directory size rule the peer's store follows (directory services;
default: the rule asked for with ``--directory-size-rule``, else ``snix``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import ClassVar, Final, Self
from urllib.parse import SplitResult, unquote, urlsplit

import grpc
import grpc.aio

from nixcas.castore.sizerule import SIZE_RULE_NAMES
from nixcas.errors import ConfigurationError, StorageError
from nixcas.urls import query_options, shown, url_text

__all__ = ["CHANNEL_OPTIONS", "MAX_MESSAGE_SIZE", "GrpcClient", "GrpcConnection", "GrpcEndpoint", "GrpcUrlConfig"]

MAX_MESSAGE_SIZE: Final = 256 << 20
"""Largest message sent or accepted (256 MiB).

A Directory has no entry limit, and at ~300 bytes per entry the gRPC default
of 4 MiB would cap it near 14,000 entries; both ends raise the limit."""

CHANNEL_OPTIONS: Final = (
    ("grpc.max_send_message_length", MAX_MESSAGE_SIZE),
    ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE),
)

_BOOLEANS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
_PROTOCOLS = ("tvix", "snix")


@dataclass(frozen=True)
class GrpcEndpoint:
    """Where a gRPC client connects and how."""

    url: str
    target: str
    tls: bool
    wait_connect: bool = False
    connect_timeout: float = 10.0
    protocol: str = "tvix"
    chunkstore: bool = False
    size_rule: str | None = None

    @classmethod
    def parse(cls, url: str | SplitResult) -> GrpcEndpoint:
        parts = urlsplit(url) if isinstance(url, str) else url
        text = url if isinstance(url, str) else url_text(parts)
        where = repr(shown(parts))  # what messages show: never the credentials refused below
        options = query_options(parts, {"wait-connect", "connect-timeout", "protocol", "chunkstore", "size-rule"})
        transport = parts.scheme.partition("+")[2]
        if parts.fragment:
            raise ConfigurationError(f"{where}: fragments are not allowed")
        if transport == "unix":
            if parts.netloc:
                raise ConfigurationError(f"{where}: unix socket URLs take no host (write grpc+unix:///abs/socket)")
            path = unquote(parts.path)
            if not path.startswith("/") or path.endswith("/"):
                raise ConfigurationError(f"{where}: needs the absolute path of a socket")
            target, tls = f"unix:{path}", False
        elif transport in ("http", "https"):
            if parts.path not in ("", "/"):
                raise ConfigurationError(
                    f"{where}: grpc+{transport} URLs take no path (write grpc+{transport}://host:port)"
                )
            try:
                host, port = parts.hostname, parts.port
            except ValueError as e:
                raise ConfigurationError(f"{where}: {e}") from None
            if not host:
                raise ConfigurationError(f"{where}: needs a host")
            if parts.username or parts.password:
                raise ConfigurationError(f"{where}: credentials in the URL are not supported")
            tls = transport == "https"
            port = port or (443 if tls else 80)
            target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        else:
            raise ConfigurationError(f"{where}: unknown gRPC transport (use grpc+unix, grpc+http or grpc+https)")
        wait = options.get("wait-connect", "0").lower()
        if wait not in _BOOLEANS:
            raise ConfigurationError(f"{where}: wait-connect must be 0 or 1")
        try:
            timeout = float(options.get("connect-timeout", "10"))
        except ValueError:
            raise ConfigurationError(f"{where}: connect-timeout must be a number of seconds") from None
        if not timeout > 0:
            raise ConfigurationError(f"{where}: connect-timeout must be positive")
        protocol = options.get("protocol", "tvix")
        if protocol not in _PROTOCOLS:
            raise ConfigurationError(f"{where}: protocol must be one of {', '.join(_PROTOCOLS)}")
        chunkstore = options.get("chunkstore", "0").lower()
        if chunkstore not in _BOOLEANS:
            raise ConfigurationError(f"{where}: chunkstore must be 0 or 1")
        size_rule = options.get("size-rule")
        if size_rule is not None and size_rule not in SIZE_RULE_NAMES:
            raise ConfigurationError(f"{where}: size-rule must be snix or tvix")
        return cls(text, target, tls, _BOOLEANS[wait], timeout, protocol, _BOOLEANS[chunkstore], size_rule)


class GrpcConnection:
    """One channel to a nixcas/tvix/snix daemon, shared by a client's calls."""

    def __init__(self, endpoint: GrpcEndpoint) -> None:
        from nixcas.ops.tracing import enabled

        self.endpoint = endpoint
        interceptors = None
        if enabled():  # traceparent in each call's metadata (only then: interceptors slow every call down)
            from nixcas.ops.rpc import client_interceptors

            interceptors = client_interceptors()
        if endpoint.tls:
            self.channel = grpc.aio.secure_channel(
                endpoint.target, grpc.ssl_channel_credentials(), options=CHANNEL_OPTIONS, interceptors=interceptors
            )
        else:
            self.channel = grpc.aio.insecure_channel(
                endpoint.target, options=CHANNEL_OPTIONS, interceptors=interceptors
            )
        self._closed = False

    def method(self, package: str, service: str, name: str) -> str:
        """The full method path, e.g. ``/tvix.castore.v1.BlobService/Read``."""
        return f"/{self.endpoint.protocol}.{package}.{service}/{name}"

    async def connect(self) -> None:
        """Wait until the channel is ready (``wait-connect=1``); fail with a clear error if not."""
        try:
            await asyncio.wait_for(self.channel.channel_ready(), self.endpoint.connect_timeout)
        except TimeoutError:
            await self.close()
            raise StorageError(
                f"{self.endpoint.url}: cannot connect within {self.endpoint.connect_timeout:g} s"
            ) from None

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self.channel.close()

    @classmethod
    async def open(cls, endpoint: GrpcEndpoint) -> GrpcConnection:
        connection = cls(endpoint)
        if endpoint.wait_connect:
            await connection.connect()
        return connection


@dataclass(frozen=True)
class GrpcUrlConfig:
    """``grpc+unix:///abs/socket`` or ``grpc+http(s)://host[:port]``; composition: ``url``.

    The config every gRPC client backend shares; each adds ``build`` for its service.
    """

    type_tag: ClassVar[str] = "grpc"
    url: str

    @classmethod
    def from_url(cls, url: SplitResult) -> Self:
        GrpcEndpoint.parse(url)
        return cls(url_text(url))

    def validate(self, where: str) -> None:
        GrpcEndpoint.parse(self.url)

    async def connect(self) -> GrpcConnection:
        return await GrpcConnection.open(GrpcEndpoint.parse(self.url))


class GrpcClient:
    """What every gRPC client backend keeps of its connection: ``url``, ``target``, and closing it."""

    def __init__(self, connection: GrpcConnection) -> None:
        self._connection = connection
        self.url = connection.endpoint.url
        self.target = connection.endpoint.target

    def __repr__(self) -> str:
        return f"{type(self).__name__}({shown(self.url)!r})"

    async def close(self) -> None:
        await self._connection.close()

"""Listen addresses, shared by every server (the gRPC daemon, the bridge and its workers).

An address is ``host:port`` (``[::1]:8000`` for IPv6; port ``0`` picks a free
one) or a unix socket path (anything containing ``/``).  A stale socket file
left by a dead server is replaced; a live one is an error.  Servers that would
accept writes from anyone on a non-loopback address refuse to start unless the
operator says so (:func:`check_exposure`).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import stat
from dataclasses import dataclass

from nixcas.errors import ConfigurationError
from nixcas.urls import is_decimal

__all__ = [
    "PUBLIC_FLAG",
    "ListenAddress",
    "check_bindable",
    "check_exposure",
    "clear_stale_socket",
    "is_loopback_host",
    "parse_listen_address",
    "socket_is_loopback",
]

MAX_PORT = 65535
PUBLIC_FLAG = "--i-know-this-is-public"


@dataclass(frozen=True)
class ListenAddress:
    """A parsed listen address: ``host`` and ``port`` for TCP (host without brackets), or ``unix_path``."""

    text: str
    host: str = ""
    port: int = 0
    unix_path: str | None = None

    @property
    def bind(self) -> str:
        """The address in grpc's syntax (``unix:/path`` or ``host:port``)."""
        return f"unix:{self.unix_path}" if self.unix_path is not None else self.text

    @property
    def url_host(self) -> str:
        """The host as written in URLs (IPv6 in brackets)."""
        return f"[{self.host}]" if ":" in self.host else self.host

    def url(self, port: int | None = None) -> str:
        """The gRPC client URL (``grpc+http://host:port`` / ``grpc+unix:///path``) with the port actually bound."""
        if self.unix_path is not None:
            return f"grpc+unix://{self.unix_path}"
        return f"grpc+http://{self.url_host}:{self.port if port is None else port}"

    @property
    def is_loopback(self) -> bool:
        """Whether only this machine can connect (a unix socket, or a loopback host)."""
        return self.unix_path is not None or is_loopback_host(self.host)


def parse_listen_address(text: str) -> ListenAddress:
    """``host:port``, ``[v6]:port`` or a socket path (``/abs`` or ``./rel``); a :class:`ConfigurationError` else."""
    if "/" in text:
        path = os.path.abspath(text)
        if path.endswith("/") or os.path.isdir(path):
            raise ConfigurationError(f"listen address {text!r}: a socket path, not a directory")
        return ListenAddress(text, unix_path=path)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not is_decimal(port):
        raise ConfigurationError(f"listen address {text!r}: expected host:port or a socket path")
    if len(port) > 5 or int(port) > MAX_PORT:
        raise ConfigurationError(f"listen address {text!r}: port {port[:12]} is out of range (0 to {MAX_PORT})")
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        raise ConfigurationError(f"listen address {text!r}: write IPv6 hosts in brackets, e.g. [::1]:8000")
    return ListenAddress(text, host.strip("[]"), int(port))


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (an IP address or ``localhost``) is a loopback address; any other name counts as public."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.partition("%")[0]).is_loopback
    except ValueError:
        return False


def socket_is_loopback(sock: socket.socket) -> bool:
    """Whether a listening socket (systemd's, say) is reachable only from this machine."""
    if sock.family == socket.AF_UNIX:
        return True
    host = sock.getsockname()[0]
    return isinstance(host, str) and is_loopback_host(host)


def check_exposure(where: str, loopback: bool, *, open_writes: str | None, i_know: bool) -> None:
    """Refuse to listen beyond this machine while ``open_writes`` (why anyone could write) holds.

    ``open_writes`` is ``None`` when writing needs a credential (or is off);
    ``i_know`` is the operator's :data:`PUBLIC_FLAG`.
    """
    if loopback or open_writes is None or i_know:
        return
    raise ConfigurationError(
        f"refusing to listen on {where}: {open_writes} and the address is reachable from other machines "
        f"(configure a credential, listen on 127.0.0.1, or pass {PUBLIC_FLAG})"
    )


def clear_stale_socket(path: str) -> None:
    """Remove a socket file nobody listens on; refuse to touch anything else."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigurationError(f"listen address {path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # stale: nobody accepts connections on it
    else:
        raise ConfigurationError(f"listen address {path}: another server is listening there")
    finally:
        probe.close()


def check_bindable(address: ListenAddress) -> None:
    """Fail with the system's reason if the TCP ``address`` cannot be listened on.

    grpc's own error says only "Failed to bind" and logs the reason to stderr
    itself, which breaks the one-line error of the CLI.
    """
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigurationError(f"cannot listen on {address.text}: {e.strerror}") from None
    errors: list[OSError] = []
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as e:
                errors.append(e)
    in_use = [e for e in errors if e.errno == errno.EADDRINUSE]
    if in_use or (errors and len(errors) == len(infos)):
        raise ConfigurationError(f"cannot listen on {address.text}: {(in_use or errors)[0].strerror}")

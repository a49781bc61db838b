"""Server-side TLS for the bridge (an :class:`ssl.SSLContext`) and the gRPC daemon (grpc server credentials)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nixcas.errors import ConfigurationError

if TYPE_CHECKING:
    import ssl

    import grpc

__all__ = ["ServerTls"]


def _read(option: str, path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigurationError(f"{option} {path}: {e.strerror or e}") from None
    if b"-----BEGIN " not in data:
        raise ConfigurationError(f"{option} {path}: not a PEM file")
    return data


@dataclass(frozen=True)
class ServerTls:
    """A certificate chain and its key (PEM files), and optionally the CA that client certificates must chain to."""

    cert: str
    key: str
    client_ca: str | None = None

    @classmethod
    def from_options(cls, cert: str | None, key: str | None, client_ca: str | None = None) -> ServerTls | None:
        """``--tls-cert``/``--tls-key``/``--tls-client-ca`` as given: both or neither of the first two."""
        if cert is None and key is None:
            if client_ca is not None:
                raise ConfigurationError("--tls-client-ca needs --tls-cert and --tls-key")
            return None
        if cert is None or key is None:
            raise ConfigurationError("give both --tls-cert and --tls-key")
        return cls(cert, key, client_ca)

    def ssl_context(self) -> ssl.SSLContext:
        """A server context (TLS 1.2 or later) with the certificate; client certificates required with a client CA."""
        import ssl

        _read("--tls-cert", self.cert)
        _read("--tls-key", self.key)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)
            if self.client_ca is not None:
                _read("--tls-client-ca", self.client_ca)
                context.load_verify_locations(self.client_ca)
                context.verify_mode = ssl.CERT_REQUIRED
        except ssl.SSLError as e:
            raise ConfigurationError(f"--tls-cert/--tls-key: {e.reason or e}") from None
        return context

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """The same for grpc (its own TLS stack); the files are checked here as well."""
        import grpc

        self.ssl_context()  # one check, one error message, for both servers
        ca = _read("--tls-client-ca", self.client_ca) if self.client_ca is not None else None
        return grpc.ssl_server_credentials(
            [(_read("--tls-key", self.key), _read("--tls-cert", self.cert))],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )

"""What every serving command shares: TLS and exposure options, systemd notification, a bounded shutdown.

``daemon``, ``nar-bridge`` (and ``nix-daemon``) use these: :func:`deployment_options`
adds ``--tls-cert``/``--tls-key``/``--tls-client-ca`` and ``--i-know-this-is-public``;
:func:`activated_sockets` takes systemd's sockets; :func:`ready` and :func:`stopping`
tell systemd; :func:`shutdown_deadline` ends a process whose stop overran its grace.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import click

from nixcas.errors import ConfigurationError
from nixcas.listen import PUBLIC_FLAG, check_exposure, parse_listen_address, socket_is_loopback
from nixcas.systemd import ActivatedSockets, notify
from nixcas.tls import ServerTls

__all__ = [
    "DeploymentOptions",
    "activated_sockets",
    "deployment_options",
    "ready",
    "shutdown_deadline",
    "stopping",
]

log = logging.getLogger("nixcas.serving")

OVERRUN_MARGIN = 0.9
"""Seconds past the grace period after which a stopping process exits regardless (grace + 1 s promised)."""
EXIT_OVERRUN = 1


@dataclass(frozen=True)
class DeploymentOptions:
    """The options of :func:`deployment_options`, as given."""

    tls_cert: str | None
    tls_key: str | None
    tls_client_ca: str | None
    i_know_this_is_public: bool

    @classmethod
    def take(cls, options: dict[str, Any]) -> DeploymentOptions:
        """Remove this class's fields from a command's keyword arguments."""
        return cls(*(options.pop(f.name) for f in fields(cls)))

    def tls(self) -> ServerTls | None:
        return ServerTls.from_options(self.tls_cert, self.tls_key, self.tls_client_ca)

    def check_exposure(self, listen: str, sock: socket.socket | None, open_writes: str | None) -> None:
        """Refuse (before anything is bound) to accept writes from anyone beyond this machine.

        ``open_writes`` says why anyone could write (``None``: writing needs a
        credential); TLS client certificates count as a credential.
        """
        if self.tls_client_ca is not None:
            open_writes = None
        loopback = socket_is_loopback(sock) if sock is not None else parse_listen_address(listen).is_loopback
        where = "the socket systemd passed" if sock is not None else listen
        check_exposure(where, loopback, open_writes=open_writes, i_know=self.i_know_this_is_public)


def deployment_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--tls-cert``, ``--tls-key``, ``--tls-client-ca`` and ``--i-know-this-is-public``."""
    for option in reversed(
        [
            click.option(
                "--tls-cert", type=click.Path(dir_okay=False), help="Serve TLS with this PEM certificate (chain)."
            ),
            click.option("--tls-key", type=click.Path(dir_okay=False), help="The PEM private key of --tls-cert."),
            click.option(
                "--tls-client-ca",
                type=click.Path(dir_okay=False),
                help="Require client certificates issued by this PEM CA (counts as authentication).",
            ),
            click.option(
                PUBLIC_FLAG,
                "i_know_this_is_public",
                is_flag=True,
                help="Allow listening beyond loopback while anyone could write.",
            ),
        ]
    ):
        f = option(f)
    return f


def activated_sockets() -> ActivatedSockets:
    """The sockets systemd passed (none when not socket-activated); a bad environment is a usage error."""
    return ActivatedSockets.from_environment()


def _notify(state: str) -> None:
    try:
        notify(state)
    except (OSError, ConfigurationError) as e:
        log.warning("cannot notify systemd (%s): %s", state, e)


def ready() -> None:
    """Tell systemd (``Type=notify``) that every listener is up."""
    _notify("READY=1")


def stopping() -> None:
    """Tell systemd that the shutdown has begun."""
    _notify("STOPPING=1")


def shutdown_deadline(grace: float) -> threading.Timer:
    """End the process if its stop takes more than ``grace`` + :data:`OVERRUN_MARGIN` seconds.

    The servers cancel what still runs once the grace period is over; this is
    the backstop for what cannot be cancelled (a backend call stuck in a
    native thread), so that a stop never takes longer than promised.
    """

    def overrun() -> None:
        sys.stderr.write(f"nixcas: error: shutdown took longer than {grace:g} s + {OVERRUN_MARGIN:g} s; exiting\n")
        sys.stderr.flush()
        os._exit(EXIT_OVERRUN)

    timer = threading.Timer(grace + OVERRUN_MARGIN, overrun)
    timer.daemon = True
    timer.start()
    return timer

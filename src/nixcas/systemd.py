"""systemd integration for servers: socket activation and readiness notification.

Both are plain protocols, done here without libsystemd:

* socket activation: systemd passes listening sockets as file descriptors
  3, 4, … and sets ``LISTEN_PID`` (this process), ``LISTEN_FDS`` (how many)
  and optionally ``LISTEN_FDNAMES`` (colon-separated ``FileDescriptorName=``s);
* notification: one datagram per state change (``READY=1``, ``STOPPING=1``)
  to the unix socket named by ``NOTIFY_SOCKET`` (a leading ``@`` names an
  abstract socket).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field

from nixcas.errors import ConfigurationError

__all__ = ["FIRST_FD", "ActivatedSockets", "notify"]

FIRST_FD = 3
"""``SD_LISTEN_FDS_START``: the first file descriptor systemd passes."""
_ACTIVATION_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (``READY=1``, ``STOPPING=1``, ``STATUS=…``) to systemd; whether there was a socket to send to.

    Without ``NOTIFY_SOCKET`` (not run by systemd with ``Type=notify``) this does
    nothing; a socket that cannot be reached is reported as an ``OSError``.
    """
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        raise ConfigurationError(f"NOTIFY_SOCKET {address[:100]!r}: not a unix socket path")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(state.encode(), address)
    return True


@dataclass
class ActivatedSockets:
    """The listening sockets systemd passed to this process, each taken by the server that serves it."""

    sockets: list[tuple[str, socket.socket]] = field(default_factory=list)

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> ActivatedSockets:
        """The sockets passed to this process (none if ``LISTEN_PID`` names another); the variables are removed.

        They are removed so that a process this one starts does not take the
        sockets for its own; the descriptors are made close-on-exec.
        """
        env = os.environ if environ is None else environ
        pid, count, names = (env.pop(name, None) for name in _ACTIVATION_VARIABLES)
        if pid is None or count is None or pid.strip() != str(os.getpid()):
            return cls()
        if not count.isascii() or not count.isdigit() or int(count) > 1024:
            raise ConfigurationError(f"LISTEN_FDS={count[:20]!r}: not a count of file descriptors")
        labels = names.split(":") if names else []
        found: list[tuple[str, socket.socket]] = []
        for i in range(int(count)):
            fd = FIRST_FD + i
            try:
                sock = socket.socket(fileno=fd)
            except OSError as e:
                raise ConfigurationError(f"LISTEN_FDS: file descriptor {fd} is not a socket ({e.strerror})") from None
            sock.set_inheritable(False)
            found.append((labels[i] if i < len(labels) else "", sock))
        return cls(found)

    def take(self, name: str, position: int) -> socket.socket | None:
        """The socket named ``name`` if systemd named any, else the one at ``position``; ``None`` if there is none."""
        if not self.sockets:
            return None
        named = [s for label, s in self.sockets if label == name]
        if named:
            return named[0]
        if any(label and label != "unknown" for label, _ in self.sockets):
            return None  # sockets are named, none of them this one
        return self.sockets[position][1] if position < len(self.sockets) else None

    def __bool__(self) -> bool:
        return bool(self.sockets)

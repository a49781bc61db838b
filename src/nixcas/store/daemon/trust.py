"""Who may connect and who is trusted: Nix's ``allowed-users`` / ``trusted-users`` over ``SO_PEERCRED``.

An entry is a user name, ``@group`` (the user's primary or a supplementary
group) or ``*`` (everyone).  A trusted client may skip signature checks and
repair; an untrusted one may add only paths signed by a trusted key (or
content-addressed by their NAR hash).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Peer", "TrustPolicy", "peer_of"]

_UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a unix socket."""

    pid: int
    uid: int
    gid: int

    @property
    def user(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return str(self.uid)

    def groups(self) -> set[str]:
        """The names of the user's primary and supplementary groups."""
        gids = {self.gid}
        with contextlib.suppress(KeyError):
            gids.update(os.getgrouplist(pwd.getpwuid(self.uid).pw_name, self.gid))
        names = set()
        for gid in gids:
            try:
                names.add(grp.getgrgid(gid).gr_name)
            except KeyError:
                names.add(str(gid))
        return names

    def __str__(self) -> str:
        return f"{self.user} (uid {self.uid}, pid {self.pid})"


def peer_of(sock: socket.socket) -> Peer:
    """The credentials of ``sock``'s peer (Linux ``SO_PEERCRED``)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return Peer(pid, uid, gid)


def this_process() -> Peer:
    """This process as a peer (the user of a ``--stdio`` session, e.g. the one ssh logged in)."""
    return Peer(os.getpid(), os.getuid(), os.getgid())


@dataclass(frozen=True)
class TrustPolicy:
    trusted_users: tuple[str, ...]
    allowed_users: tuple[str, ...] = ("*",)

    @staticmethod
    def _matches(entries: Sequence[str], peer: Peer) -> bool:
        if "*" in entries:
            return True
        if peer.user in entries or str(peer.uid) in entries:
            return True
        wanted = {e[1:] for e in entries if e.startswith("@")}
        return bool(wanted) and bool(wanted & peer.groups())

    def is_trusted(self, peer: Peer) -> bool:
        return self._matches(self.trusted_users, peer)

    def is_allowed(self, peer: Peer) -> bool:
        """Trusted users are always allowed (as with Nix)."""
        return self.is_trusted(peer) or self._matches(self.allowed_users, peer)

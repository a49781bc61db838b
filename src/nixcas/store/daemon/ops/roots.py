"""Handlers of GC roots: temporary, indirect and permanent roots become pins."""

from __future__ import annotations

import os
import urllib.parse

from nixcas.store.daemon.ops.args import parse_path, read_path
from nixcas.store.daemon.ops.state import MAX_PATH
from nixcas.store.daemon.session import DaemonError, Session


def _root_name(kind: str, location: str) -> str:
    name = f"nix-{kind}:" + urllib.parse.quote(location, safe="")
    if len(name) > 255:
        raise DaemonError(f"GC root location '{location[:100]}' is too long to name a pin")
    return name


MAX_TEMP_ROOTS = 100_000
"""Temporary roots one session may hold (each is kept until the client disconnects)."""


async def add_temp_root(s: Session) -> None:
    path = parse_path(await read_path(s))
    if path.digest not in s.temp_roots and len(s.temp_roots) >= MAX_TEMP_ROOTS:
        raise DaemonError(f"this session already holds {MAX_TEMP_ROOTS} temporary roots")
    if path.digest not in s.temp_roots:
        s.temp_roots[path.digest] = ""
        info = await s.state.get(path)
        if info is not None:
            name = s.state.root_prefix + f"{s.id}-{path.hash_part}"
            if await s.state.pin(name, info.node):
                s.temp_roots[path.digest] = name
    s.last().u64(1)


async def add_indirect_root(s: Session) -> None:
    location = await s.wire.text(MAX_PATH, "GC root location")
    if not s.trusted:
        raise DaemonError("you are not privileged to create indirect roots")
    try:
        target = os.readlink(location)
    except OSError as e:
        raise DaemonError(f"cannot read the GC root symlink '{location}': {e.strerror}") from None
    info = await s.state.require(parse_path(target))
    await s.state.pin(_root_name("indirect", os.path.abspath(location)), info.node)
    s.last().u64(1)


async def add_perm_root(s: Session) -> None:
    path = parse_path(await read_path(s))
    location = await s.wire.text(MAX_PATH, "GC root location")
    if not s.trusted:
        raise DaemonError("you are not privileged to create perm roots")
    info = await s.state.require(path)
    location = os.path.abspath(location)
    await s.state.pin(_root_name("perm", location), info.node)
    s.last().text(location)


async def sync_with_gc(s: Session) -> None:
    s.last().u64(1)

"""Argument parsing and path-info encoding shared by the handlers.

Arguments are parsed after every one was read: a bad one ends the operation
with an error frame and keeps the session in sync.
"""

from __future__ import annotations

from nixcas.errors import StorePathError
from nixcas.store.daemon.ops.state import MAX_PATH
from nixcas.store.daemon.session import DaemonError, Session
from nixcas.store.pathinfo.model import PathInfo
from nixcas.store.store_path import STORE_DIR_PREFIX, StorePath


def parse_path(text: str) -> StorePath:
    try:
        return StorePath.from_absolute_path(text)
    except StorePathError as e:
        raise DaemonError(str(e)) from None


def parse_deriver(text: str) -> StorePath | None:
    if text == "":
        return None
    path = parse_path(text)
    if not path.name.endswith(".drv"):
        raise DaemonError(f"deriver '{text}' is not a .drv path")
    return StorePath(path.digest, path.name.removesuffix(".drv"))


def show_deriver(deriver: StorePath | None) -> str:
    return "" if deriver is None else f"{STORE_DIR_PREFIX}{deriver.basename}.drv"


async def read_path(s: Session) -> str:
    return await s.wire.text(MAX_PATH, "store path")


async def read_paths(s: Session) -> list[str]:
    return await s.wire.texts(MAX_PATH, "store path")


def write_path_info(s: Session, info: PathInfo) -> None:
    """The path info without its path (``UnkeyedValidPathInfo``), as the session's minor has it."""
    s.out.text(show_deriver(info.deriver))
    s.out.text(info.nar_sha256.hex())
    s.out.texts(sorted(str(r) for r in info.references))
    s.out.u64(0)  # registration time: not recorded
    s.out.u64(info.nar_size)
    if s.minor >= 16:
        s.out.flag(False)  # ultimate: nixcas built nothing
        s.out.texts(str(sig) for sig in info.signatures)
        s.out.text("" if info.ca is None else str(info.ca))

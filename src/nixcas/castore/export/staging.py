"""The destination: checked before, staged beside it, published in one step, removed on failure."""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat

from nixcas.castore.export.base import ROOT, ExportError
from nixcas.castore.nodes import DirectoryNode, Node


def check_dest(dest: str, node: Node) -> None:
    """Refuse a ``dest`` that exists, unless it is an empty directory and ``node`` a directory."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode) and isinstance(node, DirectoryNode):
        with os.scandir(dest) as entries:
            if next(entries, None) is None:
                return
        raise ExportError(f"{dest}: exists and is not empty (export writes a new path, or into an empty directory)")
    raise ExportError(f"{dest}: exists (export writes a new path)")


def publish(parent_fd: int, staging: str, staging_fd: int, base: str, dest: str, is_dir: bool) -> None:
    """Move the finished root from the staging directory to ``dest``; never replaces anything but an empty dir."""
    try:
        if is_dir:
            os.rename(ROOT, base, src_dir_fd=staging_fd, dst_dir_fd=parent_fd)
        else:
            os.link(ROOT, base, src_dir_fd=staging_fd, dst_dir_fd=parent_fd, follow_symlinks=False)
            os.unlink(ROOT, dir_fd=staging_fd)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise ExportError(f"{dest}: appeared while exporting (export writes a new path)") from None
        raise
    os.rmdir(staging, dir_fd=parent_fd)


def remove_staging(parent_fd: int, staging: str, parent: str) -> str | None:
    """Remove the staging directory (without following any symlink); what went wrong, if anything."""
    try:
        shutil.rmtree(staging, dir_fd=parent_fd)
    except FileNotFoundError:
        pass
    except OSError as e:
        return f"the partial export {os.path.join(parent, staging)} could not be removed: {e}"
    return None


def make_staging(parent_fd: int, base: str) -> str:
    """A new directory (mode 0700) beside the destination, named after it."""
    tail = os.fsencode(base)[:160]
    while True:
        name = os.fsdecode(b".nixcas-export-" + secrets.token_hex(6).encode() + b"-" + tail)
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        except FileExistsError:
            continue
        return name

"""Keeping a test run away from the user's own store: a private HOME and XDG directories for the
test process and everything it starts, and a snapshot of the real data directory to compare at
the end (``tests/conftest.py`` wires both in)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "HOME_VARIABLES",
    "STORE_VARIABLES",
    "Snapshot",
    "changes",
    "private_environment",
    "real_data_dir",
    "snapshot",
]

HOME_VARIABLES = ("HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME")
"""Where programs put per-user data: each points into the run's temporary directory."""

STORE_VARIABLES = (
    "NIXCAS_STORE_DIR",
    "NIXCAS_COMPOSITION",
    "BLOB_SERVICE_ADDR",
    "DIRECTORY_SERVICE_ADDR",
    "PATH_INFO_SERVICE_ADDR",
)
"""What picks a store besides the data directory: unset for the run."""

Snapshot = dict[str, tuple[int, int, int]]
"""Every entry under a directory: relative path → (mode, size, mtime in ns)."""


def real_data_dir(environ: Mapping[str, str]) -> Path:
    """The store a ``nixcas`` command without options would use, under ``environ``."""
    explicit = environ.get("NIXCAS_STORE_DIR")
    if explicit:
        return Path(explicit)
    home = environ.get("HOME") or os.path.expanduser("~")
    return Path(environ.get("XDG_DATA_HOME") or os.path.join(home, ".local", "share")) / "nixcas"


def private_environment(root: Path) -> dict[str, str | None]:
    """The variables to set (``None``: unset) so that per-user data goes under ``root``."""
    values: dict[str, str | None] = {"HOME": str(root / "home")}
    for name, sub in (
        ("XDG_DATA_HOME", "share"),
        ("XDG_CONFIG_HOME", "config"),
        ("XDG_CACHE_HOME", "cache"),
        ("XDG_STATE_HOME", "state"),
    ):
        values[name] = str(root / "home" / sub)
    values.update(dict.fromkeys(STORE_VARIABLES))
    return values


def snapshot(root: Path) -> Snapshot:
    """What is under ``root`` now (empty if it does not exist); symlinks are not followed."""
    found: Snapshot = {}
    if not os.path.lexists(root):
        return found
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        st = directory.lstat()
        found[str(directory.relative_to(root))] = (st.st_mode, 0, st.st_mtime_ns)
        for entry in entries:
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                stack.append(path)
            else:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                found[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return found


def changes(before: Snapshot, after: Snapshot) -> list[str]:
    """Paths created, deleted or modified between two snapshots, sorted."""
    created = [f"created {p}" for p in after.keys() - before.keys()]
    deleted = [f"deleted {p}" for p in before.keys() - after.keys()]
    modified = [f"modified {p}" for p in before.keys() & after.keys() if before[p] != after[p]]
    return sorted(created + deleted + modified, key=lambda line: line.partition(" ")[2])

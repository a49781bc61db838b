"""Where the embedded store lives, in plain strings: importable without asyncio, pathlib or any service.

:mod:`nixcas.api` builds the embedded store's service URLs from these
(:func:`nixcas.api.service_urls`), and the command line's read-only fast
path (:mod:`nixcas.cli.fast`) opens the same files without loading the services.
"""

from __future__ import annotations

import os

__all__ = [
    "BLOBS",
    "DIRECTORIES_DB",
    "PATHINFO_DB",
    "PINS_DB",
    "STORE_DIR_ENV",
    "default_store_path",
    "store_base",
]

STORE_DIR_ENV = "NIXCAS_STORE_DIR"
"""The environment variable naming the embedded store's directory."""
BLOBS = "blobs"
"""The blob service's directory (``packed://DIR/blobs``), in the store's directory."""
DIRECTORIES_DB = "directories.sqlite"
PATHINFO_DB = "pathinfo.sqlite"
PINS_DB = "pins.sqlite"


def default_store_path() -> str:
    """``$NIXCAS_STORE_DIR``, else ``$XDG_DATA_HOME/nixcas``, else ``~/.local/share/nixcas``."""
    explicit = os.environ.get(STORE_DIR_ENV)
    if explicit:
        return explicit
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data_home, "nixcas")


def store_base(store_dir: str | os.PathLike[str] | None) -> str:
    """The embedded store's directory, absolute (``store_dir``, else :func:`default_store_path`), ``~`` expanded."""
    path = os.path.expanduser(os.fspath(store_dir) if store_dir is not None else default_store_path())
    return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)

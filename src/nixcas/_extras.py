"""Optional drivers: which extra installs each, and the one-line error when one is missing.

``pip install nixcas`` brings what the embedded store, gRPC, the bridge and
``nix+http`` need.  Object storage (S3, GCS, Azure: obstore) and PostgreSQL
(psycopg) are extras; a URL that needs a missing one fails as it is parsed or
opened, with a :class:`MissingExtra` saying what to install.
"""

from __future__ import annotations

from typing import Final

from nixcas.errors import ConfigurationError

__all__ = ["DRIVERS", "MissingExtra", "missing_extra"]

DRIVERS: Final = {
    "obstore": ("s3", "the S3/GCS/Azure object storage driver (obstore)"),
    "psycopg": ("postgres", "the PostgreSQL driver (psycopg)"),
    "psycopg_pool": ("postgres", "the PostgreSQL connection pool (psycopg-pool)"),
}
"""Top-level module → (the extra that installs it, what it is)."""


class MissingExtra(ConfigurationError):
    """A backend was asked for whose driver is not installed."""


def missing_extra(error: ImportError, what: str) -> MissingExtra | None:
    """The error to raise for ``error`` if it is a missing optional driver (``what`` needed it); else None."""
    module = (error.name or "").partition(".")[0]
    found = DRIVERS.get(module)
    if found is None:
        return None
    extra, driver = found
    return MissingExtra(f"{what} needs {driver}, which is not installed: pip install 'nixcas[{extra}]'")

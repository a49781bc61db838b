"""Every error nixcas raises, in one hierarchy.

::

    NixcasError
    ├── ValidationError (ValueError)          bad input: the caller can fix it
    │   ├── InvalidDigestError                wrong length / unparsable digest text
    │   ├── InvalidNameError                  a path component breaks the name rules
    │   ├── InvalidSymlinkTargetError         a symlink target breaks the target rules
    │   ├── DirectoryError                    a Directory breaks sorting/uniqueness/size rules
    │   ├── ClosureError                      an uploaded closure is dangling/disconnected/empty
    │   ├── IngestError                       a path or archive cannot be imported
    │   ├── DepthError                        a tree is nested deeper than MAX_DEPTH
    │   ├── NixbaseError                      text is not valid nixbase32 / a Nix hash
    │   ├── StorePathError                    a store path (or its name) breaks the rules
    │   ├── NarError                          a NAR stream is malformed
    │   └── PathInfoError                     a PathInfo (or narinfo) is inconsistent
    ├── ConfigurationError (ValueError)       a service URL or composition is unusable
    │   └── ReadOnlyError                     a write reached a read-only service (``priority``, ``race``)
    ├── StorageError (OSError)                a backend failed or returned bad data
    │   ├── ChecksumMismatch                  data did not hash to the digest it was read by
    │   └── UnavailableError                  a backend server cannot be reached (retry later)
    └── NotFoundError (FileNotFoundError)     something named explicitly does not exist

Services report a plain absence as ``None`` (or an empty stream), not as an
exception; :class:`NotFoundError` is for callers that asked for something that
must exist (the CLI, the library facade).
"""

from __future__ import annotations


class NixcasError(Exception):
    """Root of all nixcas errors."""


class ValidationError(NixcasError, ValueError):
    """Input violates a rule of the data model or the protocol."""


class InvalidDigestError(ValidationError):
    """A digest has the wrong length or cannot be parsed."""


class InvalidNameError(ValidationError):
    """A name (path component) is empty, ``.``, ``..``, too long, or holds NUL or ``/``."""

    def __init__(self, name: bytes, reason: str) -> None:
        super().__init__(f"invalid name {name[:300]!r}: {reason}")
        self.name = name
        self.reason = reason


class InvalidSymlinkTargetError(ValidationError):
    """A symlink target is empty, too long, or holds NUL."""

    def __init__(self, target: bytes, reason: str) -> None:
        super().__init__(f"invalid symlink target {target[:300]!r}: {reason}")
        self.target = target
        self.reason = reason


class DirectoryError(ValidationError):
    """A Directory is not canonical or not consistent."""


class ClosureError(ValidationError):
    """A set of directories uploaded together is not a valid closure."""


class IngestError(ValidationError):
    """A filesystem path or archive cannot be imported."""


class DepthError(ValidationError):
    """A tree is nested deeper than :data:`~nixcas.castore.nodes.MAX_DEPTH` path components."""


class NixbaseError(ValidationError):
    """Text is not valid nixbase32, or not a valid Nix hash / CA string."""


class StorePathError(ValidationError):
    """A store path or store path name breaks the rules of the Nix store."""


class NarError(ValidationError):
    """A NAR byte stream is malformed (bad token, padding, name, order, size, ...)."""


class PathInfoError(ValidationError):
    """A PathInfo (or narinfo) is inconsistent: references, names, digests, signatures, CA."""


class ConfigurationError(NixcasError, ValueError):
    """A service URL or composition cannot be turned into a service."""


class ReadOnlyError(ConfigurationError):
    """A write reached a service composed read-only (``priority``, ``race``): the configuration forbids it.

    The gRPC daemon answers it with ``FAILED_PRECONDITION``, the CLI with one line and exit code 2.
    """


class StorageError(NixcasError, OSError):
    """A backend failed, or handed out data that is not what was stored."""


class ChecksumMismatch(StorageError):
    """Data read for a digest hashes to something else."""

    def __init__(self, what: str, expected: object, got: object) -> None:
        super().__init__(f"{what}: checksum mismatch, expected {expected}, got {got}")
        self.expected = expected
        self.got = got


class UnavailableError(StorageError):
    """A backend server (object storage, database) cannot be reached or refused the connection.

    Nothing was changed by the failed call; retrying later may succeed.  The
    gRPC daemon answers it with ``UNAVAILABLE``.
    """


class NotFoundError(NixcasError, FileNotFoundError):
    """A blob, directory or path that was asked for by name does not exist."""


__all__ = [
    "ChecksumMismatch",
    "ClosureError",
    "ConfigurationError",
    "DepthError",
    "DirectoryError",
    "IngestError",
    "InvalidDigestError",
    "InvalidNameError",
    "InvalidSymlinkTargetError",
    "NarError",
    "NixbaseError",
    "NixcasError",
    "NotFoundError",
    "PathInfoError",
    "ReadOnlyError",
    "StorageError",
    "StorePathError",
    "UnavailableError",
    "ValidationError",
]

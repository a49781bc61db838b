"""Constants of the Nix worker protocol (see ``docs/nix-worker-protocol.md``)."""

from __future__ import annotations

import enum

__all__ = [
    "CLIENT_MAGIC",
    "MAX_MINOR",
    "MIN_MINOR",
    "PROTOCOL_MAJOR",
    "SERVER_MAGIC",
    "BuildStatus",
    "Op",
    "Stderr",
    "minor_of",
    "version_text",
]

CLIENT_MAGIC = 0x6E697863
"""The first word a client sends (``"cxin"`` read little-endian)."""
SERVER_MAGIC = 0x6478696F
"""The daemon's answer to :data:`CLIENT_MAGIC`."""

PROTOCOL_MAJOR = 1
MIN_MINOR = 18
"""The oldest client protocol accepted (1.18; Nix 2.3 speaks 1.21)."""
MAX_MINOR = 37
"""What the daemon offers; a session runs at ``min(client, MAX_MINOR)``."""


def minor_of(version: int) -> int:
    return version & 0xFF


def version_text(version: int) -> str:
    return f"{version >> 8}.{version & 0xFF}"


class Stderr(enum.IntEnum):
    """Message codes the daemon sends while an operation runs."""

    NEXT = 0x6F6C6D67
    READ = 0x64617461
    WRITE = 0x64617416
    LAST = 0x616C7473
    ERROR = 0x63787470
    START_ACTIVITY = 0x53545254
    STOP_ACTIVITY = 0x53544F50
    RESULT = 0x52534C54


class Op(enum.IntEnum):
    """Operation numbers (every one Nix has defined; :mod:`~nixcas.store.daemon.ops` says which are served)."""

    IS_VALID_PATH = 1
    HAS_SUBSTITUTES = 3
    QUERY_PATH_HASH = 4
    QUERY_REFERENCES = 5
    QUERY_REFERRERS = 6
    ADD_TO_STORE = 7
    ADD_TEXT_TO_STORE = 8
    BUILD_PATHS = 9
    ENSURE_PATH = 10
    ADD_TEMP_ROOT = 11
    ADD_INDIRECT_ROOT = 12
    SYNC_WITH_GC = 13
    FIND_ROOTS = 14
    EXPORT_PATH = 16
    QUERY_DERIVER = 18
    SET_OPTIONS = 19
    COLLECT_GARBAGE = 20
    QUERY_SUBSTITUTABLE_PATH_INFO = 21
    QUERY_DERIVATION_OUTPUTS = 22
    QUERY_ALL_VALID_PATHS = 23
    QUERY_FAILED_PATHS = 24
    CLEAR_FAILED_PATHS = 25
    QUERY_PATH_INFO = 26
    IMPORT_PATHS = 27
    QUERY_DERIVATION_OUTPUT_NAMES = 28
    QUERY_PATH_FROM_HASH_PART = 29
    QUERY_SUBSTITUTABLE_PATH_INFOS = 30
    QUERY_VALID_PATHS = 31
    QUERY_SUBSTITUTABLE_PATHS = 32
    QUERY_VALID_DERIVERS = 33
    OPTIMISE_STORE = 34
    VERIFY_STORE = 35
    BUILD_DERIVATION = 36
    ADD_SIGNATURES = 37
    NAR_FROM_PATH = 38
    ADD_TO_STORE_NAR = 39
    QUERY_MISSING = 40
    QUERY_DERIVATION_OUTPUT_MAP = 41
    REGISTER_DRV_OUTPUT = 42
    QUERY_REALISATION = 43
    ADD_MULTIPLE_TO_STORE = 44
    ADD_BUILD_LOG = 45
    BUILD_PATHS_WITH_RESULTS = 46
    ADD_PERM_ROOT = 47


class BuildStatus(enum.IntEnum):
    """``BuildResult`` status numbers on the wire (the ones this daemon reports)."""

    SUBSTITUTED = 1
    ALREADY_VALID = 2

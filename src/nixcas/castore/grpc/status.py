"""nixcas errors ↔ gRPC status codes, in both directions, in one place.

Server side, :func:`rpc_errors` wraps a handler body (also across the
``yield`` of a streaming handler) and aborts the call with the status that
fits the exception.  Client side, :func:`client_errors` wraps a call and its
stream iteration and turns an :class:`grpc.aio.AioRpcError` into a nixcas
error that keeps the status code (:class:`RemoteError`), so a daemon that
proxies another daemon passes codes through unchanged.

=========================================  =====================
exception                                  status
=========================================  =====================
:class:`~nixcas.errors.NotFoundError`      ``NOT_FOUND``
:class:`~nixcas.errors.ChecksumMismatch`   ``DATA_LOSS``
:class:`~nixcas.errors.ValidationError`    ``INVALID_ARGUMENT``
:class:`~nixcas.errors.ConfigurationError` ``FAILED_PRECONDITION``
:class:`RemoteError`                       its own code
other :class:`OSError`                     by errno (see ``_ERRNO_CODES``), else ``INTERNAL``
anything else                              ``INTERNAL`` (logged with traceback)
=========================================  =====================
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import AsyncIterator

import grpc
import grpc.aio

from nixcas.errors import (
    ChecksumMismatch,
    ConfigurationError,
    NixcasError,
    NotFoundError,
    StorageError,
    UnavailableError,
    ValidationError,
)
from nixcas.urls import redacted

__all__ = ["RemoteError", "client_errors", "rpc_errors", "status_of"]

log = logging.getLogger(__name__)

_ERRNO_CODES = {
    errno.EACCES: grpc.StatusCode.PERMISSION_DENIED,
    errno.EPERM: grpc.StatusCode.PERMISSION_DENIED,
    errno.EEXIST: grpc.StatusCode.ALREADY_EXISTS,
    errno.ENOSPC: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.EDQUOT: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.ETIMEDOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    errno.ECONNREFUSED: grpc.StatusCode.UNAVAILABLE,
    errno.ECONNRESET: grpc.StatusCode.UNAVAILABLE,
}


class RemoteError(StorageError):
    """A remote service answered with a gRPC error status."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


class RemoteValidationError(RemoteError, ValidationError):
    """The remote service refused the request as invalid (``INVALID_ARGUMENT``)."""


class RemoteNotFoundError(RemoteError, NotFoundError):
    """The remote service does not have what was asked for (``NOT_FOUND``)."""


def status_of(e: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a server answers ``e`` with (no configured credential in it)."""
    code, message = _status_of(e)
    return code, redacted(message)


def _status_of(e: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(e, RemoteError):
        return e.code, str(e)
    if isinstance(e, NotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(e)
    if isinstance(e, ChecksumMismatch):
        return grpc.StatusCode.DATA_LOSS, str(e)
    if isinstance(e, UnavailableError):
        return grpc.StatusCode.UNAVAILABLE, str(e)
    if isinstance(e, ValidationError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    if isinstance(e, ConfigurationError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(e)
    if isinstance(e, OSError) and not isinstance(e, NixcasError):
        code = _ERRNO_CODES.get(e.errno or 0, grpc.StatusCode.INTERNAL)
        text = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
        return code, f"storage error: {text}"
    if isinstance(e, StorageError):
        return grpc.StatusCode.INTERNAL, str(e)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}"


@contextlib.asynccontextmanager
async def rpc_errors(context: grpc.aio.ServicerContext[object, object], what: str) -> AsyncIterator[None]:
    """Abort the call with the status of any nixcas/OS/unexpected error raised inside."""
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except Exception as e:
        code, message = status_of(e)
        if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNKNOWN):
            log.error("%s failed: %s", what, message, exc_info=not isinstance(e, NixcasError | OSError))
        else:
            log.debug("%s: %s: %s", what, code.name, message)
        await context.abort(code, message)


def error_from_status(code: grpc.StatusCode, details: str | None, where: str) -> RemoteError:
    """The nixcas error for a status a remote returned."""
    message = f"{where}: {details or code.name.lower()}"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return RemoteValidationError(message, code)
    if code == grpc.StatusCode.NOT_FOUND:
        return RemoteNotFoundError(message, code)
    if code == grpc.StatusCode.UNAVAILABLE:
        return RemoteError(f"{where}: server unavailable: {details}", code)
    if code == grpc.StatusCode.DATA_LOSS:
        return RemoteError(f"{where}: remote data loss: {details}", code)
    if code == grpc.StatusCode.UNIMPLEMENTED:
        hint = "a snix daemon needs ?protocol=snix in the URL, a tvix one ?protocol=tvix"
        return RemoteError(f"{where}: UNIMPLEMENTED: {details} ({hint})", code)
    return RemoteError(f"{where}: {code.name}: {details}", code)


@contextlib.asynccontextmanager
async def client_errors(where: str) -> AsyncIterator[None]:
    """Translate gRPC failures of the calls (and stream reads) inside into nixcas errors."""
    try:
        yield
    except grpc.aio.AioRpcError as e:
        raise error_from_status(e.code(), e.details(), where) from None
    except grpc.aio.BaseError as e:  # usage or internal errors of grpc itself
        raise StorageError(f"{where}: {type(e).__name__}: {e}") from None

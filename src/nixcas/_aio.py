"""Async context-manager behaviour shared by services, readers, writers and putters."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from types import TracebackType
from typing import Generic, Self, TypeVar

__all__ = ["AbortOnError", "Closing", "NearFar", "close_all", "to_thread_uninterrupted", "uninterrupted"]

T = TypeVar("T")
S = TypeVar("S", bound="Closing")


class Closing:
    """``async with x:`` closes ``x`` on the way out, whatever happened."""

    async def close(self) -> None:
        """Release resources; the object must not be used afterwards."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class AbortOnError:
    """``async with x:`` calls ``x.abort()`` if the block raised (also on cancellation).

    Success is explicit: the block must call the object's own finishing method
    (``close()``), so an early exit can never publish half a result.
    """

    async def abort(self) -> None:
        """Discard everything so far."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if et is not None:
            await asyncio.shield(self.abort())


async def close_all(*objects: Closing) -> None:
    """Close every one of ``objects``, even when an earlier close fails (the first error is raised)."""
    first: BaseException | None = None
    for obj in objects:
        try:
            await obj.close()
        except BaseException as e:
            first = first or e
    if first is not None:
        raise first


class NearFar(Generic[S]):
    """Mixin of the services in front of two others (``cache``, ``combined``): the pair, its repr, closing."""

    def __init__(self, near: S, far: S, *, close_inner: bool = False) -> None:
        self.near = near
        self.far = far
        self._close_inner = close_inner

    def __repr__(self) -> str:
        return f"{type(self).__name__}(near={self.near!r}, far={self.far!r})"

    async def close(self) -> None:
        if self._close_inner:
            await close_all(self.near, self.far)


async def uninterrupted(fut: asyncio.Future[T]) -> T:
    """``fut``'s result; if the caller is cancelled meanwhile, ``fut`` still runs to its end before that re-raises.

    For work that cannot be stopped (a worker thread): cleanup that undoes it
    (removing a temp file or a staging directory) must not start while it still writes.
    """
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        while not fut.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(fut)
        raise


async def to_thread_uninterrupted(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a worker thread, as :func:`uninterrupted`: a cancelled caller waits for the thread first."""
    return await uninterrupted(asyncio.ensure_future(asyncio.to_thread(fn)))

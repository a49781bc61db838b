"""Group commit of durability barriers: one ``sync`` shared by every upload waiting at that moment.

An upload may be acknowledged only after its blobs are durable, and the
blob service's barrier (``syncfs`` for local blobs) makes *everything*
written so far durable.  So concurrent uploads need not each pay for one:
:class:`GroupSync` runs at most one barrier at a time, and every caller that
arrives while one runs waits for the *next* one, which starts when the
running one ends and is shared by all of them.  A caller is never released
by a barrier that started before it called (that one may have missed its
writes), so each caller's writes are covered before it returns.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

__all__ = ["GroupSync"]


class GroupSync:
    """Calls of :meth:`sync` share runs of ``barrier``; :attr:`barriers` counts the runs started."""

    def __init__(self, barrier: Callable[[], Awaitable[None]]) -> None:
        self._barrier = barrier
        self._waiting: asyncio.Future[None] | None = None
        """The barrier the next caller joins: not started yet."""
        self._last: asyncio.Task[None] | None = None
        """The task running (or about to run) the newest barrier."""
        self.barriers = 0

    async def sync(self) -> None:
        """Return once a barrier that started after this call has completed (its error is raised)."""
        joined = self._waiting
        if joined is None:
            joined = self._waiting = asyncio.get_running_loop().create_future()
            joined.add_done_callback(_retrieve)
            self._last = asyncio.ensure_future(self._run(self._last, joined))
        await asyncio.shield(joined)

    async def _run(self, previous: asyncio.Task[None] | None, done: asyncio.Future[None]) -> None:
        try:
            if previous is not None:
                await asyncio.wait([previous])
            self._waiting = None  # callers from now on wait for the barrier after this one
            self.barriers += 1
            await self._barrier()
        except BaseException as e:  # every caller of this barrier sees its failure
            if self._waiting is done:
                self._waiting = None
            failure = e if isinstance(e, Exception) else RuntimeError(f"sync barrier interrupted: {e!r}")
            done.set_exception(failure)
            if not isinstance(e, Exception):
                raise
        else:
            done.set_result(None)


def _retrieve(future: asyncio.Future[None]) -> None:
    """Mark a barrier's failure as seen even when every waiter went away."""
    if not future.cancelled():
        future.exception()

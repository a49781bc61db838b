"""What ``priority`` and ``race`` share: one answer from several member services, and their config.

Both combinators hold an ordered list of member services of one kind and are
read-only (every write raises :class:`~nixcas.errors.ReadOnlyError`).

* ``priority`` asks the members one after another, in the configured order;
  the first valid answer is the result and later members are not asked.
* ``race`` asks every member at once; the first valid answer to arrive is the
  result and the lookups still running are cancelled (and awaited, so no task
  outlives the call).  Among answers that arrive together, configuration order
  decides.

An answer is *valid* when it passed verification: a blob whose bytes hash to
its digest, a directory whose encoding does, a PathInfo of the store path
asked for.  A member that raises (unreachable, failing) or answers wrongly
counts as no answer, so the others still answer.  When no member gives a
valid answer, the lookup

1. raises if some member gave a *wrong* answer: corruption is never passed
   off as absence (:class:`~nixcas.errors.ChecksumMismatch` /
   :class:`~nixcas.errors.StorageError`, naming every member that failed);
2. else raises if *every* member failed, with their errors;
3. else reports absence (``None``); the failures of the other members are
   logged as warnings (a substituter that is down does not stop the rest).

URL form: ``priority://?member=URL&member=URL…`` and ``race://?member=…``
(percent-encoded URLs or composition names, in order).  Composition:
``type = "priority"`` (or ``"race"``), ``members = ["a", "b", …]``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar, Final, Generic, Self, TypeVar
from urllib.parse import SplitResult

from nixcas._aio import Closing, close_all
from nixcas.config import Resolver, ServiceConfig
from nixcas.errors import ChecksumMismatch, ConfigurationError, ReadOnlyError, StorageError, UnavailableError
from nixcas.urls import query_pairs, require_plain_scheme, shown

__all__ = [
    "PRIORITY",
    "RACE",
    "Candidates",
    "MembersConfig",
    "MembersService",
    "Outcome",
    "WrongAnswer",
    "ask_all",
    "first_answer",
]

log = logging.getLogger(__name__)

PRIORITY: Final = "priority"
RACE: Final = "race"

S = TypeVar("S", bound=Closing)
T = TypeVar("T")
R = TypeVar("R")
S_co = TypeVar("S_co", covariant=True)


class WrongAnswer(Exception):
    """A member answered, but the answer failed verification; ``error`` says how."""

    def __init__(self, error: StorageError) -> None:
        super().__init__(str(error))
        self.error = error


class _WrongAnswers(ChecksumMismatch):
    """Several members answered wrongly (each failure in the message)."""

    def __init__(self, message: str) -> None:
        StorageError.__init__(self, message)
        self.expected = None
        self.got = None


class Outcome:
    """What the members said so far, and what the lookup comes to when none answered validly."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.absent = 0
        self.wrong: list[tuple[object, StorageError]] = []
        self.failed: list[tuple[object, Exception]] = []

    def record(self, member: object, e: Exception) -> None:
        """``member`` raised ``e``: a :class:`WrongAnswer`, its own verify-on-read (:class:`ChecksumMismatch`:
        its data is wrong too), or a failure."""
        if isinstance(e, WrongAnswer):
            self.wrong.append((member, e.error))
        elif isinstance(e, ChecksumMismatch):
            self.wrong.append((member, e))
        else:
            self.failed.append((member, e))

    def result(self) -> None:
        """``None`` (absent) or the error of the lookup, when no member gave a valid answer."""
        if self.wrong:
            surfaced: list[tuple[object, Exception]] = [*self.wrong, *self.failed]
        elif self.failed and not self.absent:
            surfaced = list(self.failed)
        else:
            for member, e in self.failed:
                log.warning("%s: member %r failed (others said absent): %s", self.what, member, e)
            return None
        if len(surfaced) == 1:
            raise surfaced[0][1]
        message = f"{self.what}: no member gave a valid answer: " + "; ".join(f"{m!r}: {e}" for m, e in surfaced)
        if self.wrong:
            raise _WrongAnswers(message)
        if all(isinstance(e, UnavailableError) for _, e in surfaced):
            raise UnavailableError(message)
        raise StorageError(message)


async def first_answer(
    mode: str,
    members: Sequence[S],
    ask: Callable[[S], Awaitable[T | None]],
    outcome: Outcome,
    *,
    discard: Callable[[T], Awaitable[None]] | None = None,
) -> T | None:
    """The first valid answer of ``ask(member)`` (``None`` = absent; raise :class:`WrongAnswer` = wrong).

    ``priority`` asks in order; ``race`` asks all at once and cancels the rest
    once one answered.  ``discard`` releases answers that arrived but lost (an
    open reader, say).  No valid answer: :meth:`Outcome.result`.
    """
    if mode == PRIORITY:
        for member in members:
            try:
                value = await ask(member)
            except Exception as e:
                outcome.record(member, e)
                continue
            if value is not None:
                return value
            outcome.absent += 1
        outcome.result()
        return None
    order = {id(member): i for i, member in enumerate(members)}
    tasks: dict[asyncio.Future[T | None], S] = {asyncio.ensure_future(ask(member)): member for member in members}
    winner: T | None = None
    taken: set[asyncio.Future[T | None]] = set()
    try:
        pending: set[asyncio.Future[T | None]] = set(tasks)
        while pending and winner is None:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=lambda t: order[id(tasks[t])]):
                taken.add(task)
                try:
                    value = task.result()
                except Exception as e:
                    outcome.record(tasks[task], e)
                    continue
                if value is None:
                    outcome.absent += 1
                elif winner is None:
                    winner = value
                elif discard is not None:
                    await discard(value)
    finally:
        await _cancel_all(tasks, taken, discard)
    if winner is None:
        outcome.result()
    return winner


async def _cancel_all(
    tasks: dict[asyncio.Future[T | None], Any],
    taken: set[asyncio.Future[T | None]],
    discard: Callable[[T], Awaitable[None]] | None,
) -> None:
    """Cancel the lookups still running, wait for them, and release answers nobody took."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if task in taken or task.cancelled():
            continue
        if task.exception() is None:
            late = task.result()
            if late is not None and discard is not None:
                await discard(late)


async def ask_all(
    mode: str, members: Sequence[S], ask: Callable[[S], Awaitable[None]], done: Callable[[], bool]
) -> None:
    """Batch lookups: ``ask(member)`` for each member — one after another (``priority``), or all at once
    (``race``) — until ``done()``; the lookups still running then are cancelled and awaited."""
    if mode == PRIORITY:
        for member in members:
            if done():
                return
            await ask(member)
        return
    tasks = [asyncio.ensure_future(ask(member)) for member in members]
    try:
        pending = set(tasks)
        while pending and not done():
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:  # ask records its members' failures itself; anything else is a bug
        if isinstance(result, Exception):
            raise result


class Candidates(Generic[S, R]):
    """Members with their (not yet verified) answer to ``probe``, one after another, for a caller that
    verifies each answer itself and wants the next member's when one fails.

    ``priority``: each member is probed when its turn comes, in configuration order.  ``race``: all are
    probed at once and come in the order their answers arrive (ties: configuration order).  ``None``
    counts as absent in ``outcome``, a raising probe as a failure.  :meth:`settle` stops the probes
    still running (their members are probed again, one by one, if the caller gets that far), so no task
    outlives the choice of a member; :meth:`close` also releases (``discard``) the answers never taken.
    """

    def __init__(
        self,
        mode: str,
        members: Sequence[S],
        probe: Callable[[S], Awaitable[R | None]],
        outcome: Outcome,
        discard: Callable[[R], Awaitable[None]],
    ) -> None:
        self._members = list(members)
        self._order = {id(m): i for i, m in enumerate(self._members)}
        self._probe = probe
        self._outcome = outcome
        self._discard = discard
        self._race = mode == RACE
        self._queue: list[S] = [] if self._race else list(self._members)  # probed one by one, in turn
        self._tasks: dict[asyncio.Future[R | None], S] = {}
        self._unseen: set[asyncio.Future[R | None]] = set()
        self._ready: list[tuple[S, R]] = []

    def _in_order(self, tasks: set[asyncio.Future[R | None]]) -> list[asyncio.Future[R | None]]:
        return sorted(tasks, key=lambda t: self._order[id(self._tasks[t])])

    def _take(self, member: S, task: asyncio.Future[R | None]) -> None:
        try:
            found = task.result()
        except Exception as e:
            self._outcome.record(member, e)
            return
        if found is None:
            self._outcome.absent += 1
        else:
            self._ready.append((member, found))

    async def next(self) -> tuple[S, R] | None:
        """The next member and its answer; ``None`` when no member is left."""
        if self._race:
            self._race = False
            self._tasks = {asyncio.ensure_future(self._probe(m)): m for m in self._members}
            self._unseen = set(self._tasks)
        while not self._ready:
            if self._unseen:
                done = {t for t in self._unseen if t.done()}
                if not done:
                    done, _ = await asyncio.wait(self._unseen, return_when=asyncio.FIRST_COMPLETED)
                self._unseen -= done
                for task in self._in_order(done):
                    self._take(self._tasks[task], task)
            elif self._queue:
                member = self._queue.pop(0)
                try:
                    found = await self._probe(member)
                except Exception as e:
                    self._outcome.record(member, e)
                    continue
                if found is None:
                    self._outcome.absent += 1
                else:
                    return member, found
            else:
                return None
        return self._ready.pop(0)

    async def settle(self, *, release: bool = False) -> None:
        """Cancel the probes still running; their members are probed again, one by one, when reached.

        With ``release`` the answers not yet taken are released too (their members, which did answer,
        come first when probed again): for a caller that may need a fallback only much later.
        """
        if self._unseen:
            for task in self._unseen:
                task.cancel()
            await asyncio.gather(*self._unseen, return_exceptions=True)
            cancelled = []
            for task in self._in_order(self._unseen):
                if task.cancelled():
                    cancelled.append(self._tasks[task])
                else:  # it finished meanwhile
                    self._take(self._tasks[task], task)
            self._unseen = set()
            self._queue = [*cancelled, *self._queue]
        if release:
            ready, self._ready = self._ready, []
            self._queue = [member for member, _ in ready] + self._queue
            for _, found in ready:
                await self._discard(found)

    async def close(self) -> None:
        """:meth:`settle`, and release the answers nobody took."""
        await self.settle(release=True)


class MembersService(Generic[S]):
    """Mixin of the combinators: the members, the mode, read-only refusal and closing."""

    type_name: ClassVar[str]
    """The interface's name in messages (``blob service``)."""

    def __init__(self, mode: str, members: Sequence[S], *, close_inner: bool = False) -> None:
        if mode not in (PRIORITY, RACE):
            raise ConfigurationError(f"unknown combinator mode {mode!r} (known: {PRIORITY}, {RACE})")
        if not members:
            raise ConfigurationError(f"{mode}: needs at least one member")
        self.mode = mode
        self.members = list(members)
        self._close_inner = close_inner

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.mode}: {', '.join(repr(m) for m in self.members)})"

    def _read_only(self, action: str) -> ReadOnlyError:
        return ReadOnlyError(
            f"{self.mode} {self.type_name} is read-only: cannot {action} (write to one of its members instead)"
        )

    async def close(self) -> None:
        if self._close_inner:
            await close_all(*self.members)


@dataclasses.dataclass(frozen=True)
class MembersConfig(ServiceConfig[S_co]):
    """``members``: names (or URLs) of services of one kind, in order; at least one."""

    members: list[str]

    @classmethod
    def from_url(cls, url: SplitResult) -> Self:
        require_plain_scheme(url)
        if url.netloc or url.path or url.fragment:
            raise ConfigurationError(f"{shown(url)!r}: {url.scheme}:// takes only ?member=…&member=… (no host or path)")
        members: list[str] = []
        for key, value in query_pairs(url):
            if key != "member":
                raise ConfigurationError(f"{shown(url)!r}: unknown option {key!r} (known: member)")
            members.append(value)
        config = cls(members)
        config.validate(repr(shown(url)))
        return config

    def validate(self, where: str) -> None:
        if not self.members:
            raise ConfigurationError(
                f"{where}: {self.type_tag} needs at least one member (write {self.type_tag}://?member=…&member=…)"
            )

    async def open_members(self, resolver: Resolver) -> list[Any]:
        """Every member, in order; those already opened are closed again if a later one fails to open
        (when nobody else owns them)."""
        kind = self.references["members"]
        opened: list[Any] = []
        try:
            for name in self.members:
                opened.append(await resolver.get(kind, name))
        except BaseException:
            if resolver.owns_instances:
                await close_all(*opened)
            raise
        return opened

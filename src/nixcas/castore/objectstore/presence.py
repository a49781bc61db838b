"""Which objects exist, for many keys at once, and the freshness rule of stores that cannot ``touch``.

:class:`Presence` answers "which of these keys exist?" with as few requests
as it can (cached answers, listings of a key range instead of one ``HEAD``
per key when that is cheaper); :class:`ObjectStoreBacked` is what services
over an :class:`~.client.ObjectStore` share: that cache and the
``refresh_after`` rule garbage collection relies on.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from nixcas.castore.digest import B3Digest
from nixcas.castore.objectstore.client import ObjectStore
from nixcas.castore.objectstore.io import ObjectMeta
from nixcas.castore.sweep import Deletion, StoredObject

__all__ = ["ObjectStoreBacked", "Presence", "key_range"]


class ObjectStoreBacked:
    """What services over an :class:`ObjectStore` share: the existence cache and the refresh rule.

    Object stores cannot refresh an object's age in place, so a writer relies
    on an existing object only if it was written within ``refresh_after``
    (:meth:`_fresh`) and writes an older one again; a garbage collection must
    therefore keep at least that much (:attr:`min_grace_ns`).
    """

    def __init__(self, store: ObjectStore, refresh_after: float) -> None:
        self.store = store
        self.presence = Presence(store)
        self.refresh_after_ns = int(refresh_after * 1e9)

    @property
    def min_grace_ns(self) -> int:
        """The shortest GC grace period that is safe for this store: twice ``refresh_after``.

        A writer relies on objects up to ``refresh_after`` old and checks, before
        it publishes, that none it relied on has grown older than 1.5 times that
        (:meth:`_still_safe`); a collection with this grace period deletes
        nothing younger than twice that.
        """
        return 2 * self.refresh_after_ns

    def _fresh(self, meta: ObjectMeta | None) -> bool:
        """``meta`` is an object a writer may rely on without writing it again."""
        return meta is not None and meta.mtime_ns >= time.time_ns() - self.refresh_after_ns

    def _still_safe(self, meta: ObjectMeta) -> bool:
        """An object relied on when it was fresh is still far from any collection's cutoff (before publishing)."""
        return meta.mtime_ns >= time.time_ns() - self.refresh_after_ns * 3 // 2

    async def _delete_old(
        self, objects: Sequence[StoredObject], cutoff_ns: int, key_of: Callable[[B3Digest], str]
    ) -> Deletion:
        """Delete the objects (at ``key_of(digest)``) still older than ``cutoff_ns`` when looked at again (``HEAD``).

        Object stores have no conditional delete: a rewrite landing between the
        ``HEAD`` and the ``DELETE`` is lost (see ``refresh_after``).  Objects
        already gone are in neither list.
        """
        done = Deletion()

        async def one(obj: StoredObject) -> None:
            key = key_of(obj.digest)
            meta = await self.store.head(key)
            if meta is not None and meta.mtime_ns >= cutoff_ns:
                done.kept.append(obj)
                return
            self.presence.forget(key)
            if meta is not None:
                await self.store.delete(key)
                done.deleted.append(obj)

        await asyncio.gather(*(one(o) for o in objects))
        return done

    async def _exists(self, key: str) -> bool:
        """For readers (``has``): an object written or seen within ``refresh_after``, or one a ``HEAD`` finds."""
        return await self.presence.exists(key, time.time_ns() - self.refresh_after_ns) is not None


LIST_MIN_KEYS = 8
"""Keys of one key range that make listing the range worth trying instead of one ``HEAD`` each."""

KEYS_PER_WANTED = 125
"""A listing may read this many keys per key asked about (a 1,000-key page must answer 8) before it gives up."""

LISTED_TTL = 600.0
"""Seconds a complete listing of a range answers "absent" for keys not in it (a stale "absent" costs one upload)."""


def key_range(key: str) -> str:
    """The listing range of ``<kind>/b3/<hex…>``: the kind plus the first hex digit (1/16 of the kind's keys)."""
    cut = key.index("/b3/") + 5
    return key[:cut]


def _range_listing(prefix: str) -> tuple[str, str]:
    """(the directory to list, the key to start after) for a key range: listings match whole path segments."""
    parent = prefix[: prefix.rindex("/") + 1]
    return parent, prefix


class Presence:
    """Which keys exist, answered for many keys at once with few requests.

    Answers come from, in order: a bounded cache of keys seen to exist (by
    any request, or written by this process); complete listings of a key
    range made recently (:data:`LISTED_TTL`); a listing of a range made now
    when enough keys fall into it and the range turns out small
    (:data:`LIST_MIN_KEYS`, :data:`KEYS_PER_WANTED` — a range found too big
    is not listed again); and otherwise one ``HEAD`` per key, concurrently.

    "Present" answers carry the object's modification time, so callers can
    tell an object a garbage collection might be about to delete (old) from
    one it cannot (young); see ``refresh_after`` of the blob backend.
    """

    def __init__(self, store: ObjectStore, capacity: int = 1 << 18) -> None:
        self.store = store
        self.capacity = capacity
        self._known: OrderedDict[str, ObjectMeta] = OrderedDict()
        self._listed: dict[str, float] = {}
        self._too_big: set[str] = set()
        self._listing: dict[str, asyncio.Lock] = {}

    def note(self, meta: ObjectMeta) -> None:
        """``meta.key`` exists (written or seen just now)."""
        self._known[meta.key] = meta
        self._known.move_to_end(meta.key)
        while len(self._known) > self.capacity:
            evicted, _ = self._known.popitem(last=False)
            # The range's listing no longer answers for all its keys: forget that it was listed.
            self._listed.pop(key_range(evicted), None)

    def noted(self, key: str, size: int) -> None:
        """This process wrote ``key`` (``size`` bytes) just now."""
        self.note(ObjectMeta(key, size, time.time_ns()))

    def forget(self, key: str) -> None:
        """``key`` was deleted (or found missing)."""
        self._known.pop(key, None)

    def cached(self, key: str) -> ObjectMeta | None:
        return self._known.get(key)

    async def exists(self, key: str, fresh_after_ns: int) -> ObjectMeta | None:
        """Whether ``key`` exists, for a reader: answered from memory only by an object seen since
        ``fresh_after_ns`` (one no collection can have deleted since), otherwise by asking (``HEAD``).

        Unlike :meth:`check`, never answers "absent" from a listing: another
        process may have written the object since.
        """
        meta = self._known.get(key)
        if meta is not None and meta.mtime_ns >= fresh_after_ns:
            return meta
        meta = await self.store.head(key)
        if meta is None:
            self.forget(key)
        else:
            self.note(meta)
        return meta

    async def check(self, keys: Sequence[str]) -> dict[str, ObjectMeta | None]:
        """For each key, its metadata if it exists, else ``None`` — for a writer deciding what to upload.

        A cached "present" may be old (callers look at ``mtime_ns``); an
        "absent" may be stale by up to :data:`LISTED_TTL` (the upload it
        causes is harmless: objects are content-addressed).
        """
        found: dict[str, ObjectMeta | None] = {}
        unknown: dict[str, list[str]] = {}
        for key in keys:
            meta = self._known.get(key)
            if meta is not None:
                self._known.move_to_end(key)
                found[key] = meta
            elif self._listed_recently(key_range(key)):
                found[key] = None
            else:
                unknown.setdefault(key_range(key), []).append(key)
        listable = [r for r, ks in unknown.items() if len(ks) >= LIST_MIN_KEYS and r not in self._too_big]
        listed = await asyncio.gather(*(self._list_range(r, len(unknown[r]) * KEYS_PER_WANTED) for r in listable))
        for prefix, listing in zip(listable, listed, strict=True):
            if isinstance(listing, dict):  # listed by this call: its own answers (the cache may not hold them all)
                for key in unknown.pop(prefix):
                    found[key] = listing.get(key)
            elif listing:  # listed by a concurrent call: what the cache still holds, if the listing still counts
                keys_here = unknown.pop(prefix)
                for key in keys_here:
                    meta = self._known.get(key)
                    if meta is not None or self._listed_recently(prefix):
                        found[key] = meta
                    else:
                        unknown.setdefault(prefix, []).append(key)
        rest = [key for ks in unknown.values() for key in ks]
        heads = await asyncio.gather(*(self.store.head(key) for key in rest))
        for key, meta in zip(rest, heads, strict=True):
            found[key] = meta
            if meta is not None:
                self.note(meta)
        return found

    def _listed_recently(self, prefix: str) -> bool:
        return self._listed.get(prefix, -LISTED_TTL) > time.monotonic() - LISTED_TTL

    async def prime(self, kind: str, wanted: int) -> None:
        """Before asking about ``wanted`` keys of ``kind`` one at a time: list the kind's ranges if that is cheaper.

        A streaming writer asks about its chunks as they are cut, one by
        one; listing the chunk ranges first (when the store is small enough
        for that to cost fewer requests than ``wanted`` ``HEAD``s) answers
        them all from memory.
        """
        ranges = [f"{kind}/b3/{h}" for h in "0123456789abcdef"]
        budget = max(1, wanted * KEYS_PER_WANTED // len(ranges))
        todo = [r for r in ranges if r not in self._too_big and not self._listed_recently(r)]
        await asyncio.gather(*(self._list_range(r, budget) for r in todo))

    async def _list_range(self, prefix: str, budget: int) -> dict[str, ObjectMeta] | bool:
        """List ``prefix`` whole if it holds at most ``budget`` keys: what exists there (also noted in the cache).

        ``False``: the range is too big to list; ``True``: a concurrent call
        listed it just now (one listing per range at a time).
        """
        lock = self._listing.setdefault(prefix, asyncio.Lock())
        async with lock:
            if self._listed_recently(prefix):
                return True
            if prefix in self._too_big:
                return False
            return await self._list_range_now(prefix, budget)

    async def _list_range_now(self, prefix: str, budget: int) -> dict[str, ObjectMeta] | bool:
        # A listing the cache cannot hold saves nothing later: no more than a 16th of it per range.
        budget = min(budget, self.capacity // 16)
        started = time.monotonic()
        listing: dict[str, ObjectMeta] = {}
        parent, after = _range_listing(prefix)
        async for page in self.store.list(parent, after=after):
            for meta in page:
                if not meta.key.startswith(prefix):
                    if self.store.sorted_listings:  # past the range: keys come in order
                        break
                    continue
                listing[meta.key] = meta
            else:
                if len(listing) > budget:
                    self._too_big.add(prefix)
                    return False
                continue
            break
        for meta in listing.values():
            self.note(meta)
        if all(key in self._known for key in listing):  # else the cache cannot answer for the whole range
            self._listed[prefix] = started
        return listing

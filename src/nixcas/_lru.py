"""What the ``lru`` backends share: the ``capacity`` config, and a bounded most-recently-used map of bytes."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import ClassVar, Self, TypeVar
from urllib.parse import SplitResult

from nixcas.errors import ConfigurationError
from nixcas.urls import query_options, require_plain_scheme, shown

__all__ = ["LruBytes", "LruConfig"]

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class LruConfig:
    """``lru://?capacity=N``; composition: ``capacity`` (at least 1)."""

    type_tag: ClassVar[str] = "lru"
    capacity: int

    @classmethod
    def from_url(cls, url: SplitResult) -> Self:
        require_plain_scheme(url)
        if url.netloc or url.path or url.fragment:
            raise ConfigurationError(f"{shown(url)!r}: lru:// takes only ?capacity=N")
        options = query_options(url, {"capacity"})
        if "capacity" not in options:
            raise ConfigurationError(f"{shown(url)!r}: missing capacity (write lru://?capacity=N)")
        try:
            capacity = int(options["capacity"])
        except ValueError:
            raise ConfigurationError(f"{shown(url)!r}: capacity must be an integer") from None
        config = cls(capacity)
        config.validate(repr(shown(url)))
        return config

    def validate(self, where: str) -> None:
        if self.capacity < 1:
            raise ConfigurationError(f"{where}: capacity must be at least 1")


class LruBytes(OrderedDict[K, bytes]):
    """A dict of at most ``capacity`` values kept through :meth:`remember`; the least recent go first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ConfigurationError("lru capacity must be at least 1")
        super().__init__()
        self.capacity = capacity

    def recall(self, key: K) -> bytes | None:
        """The value of ``key`` (now the most recent), or ``None``."""
        raw = self.get(key)
        if raw is not None:
            self.move_to_end(key)
        return raw

    def remember(self, key: K, raw: bytes) -> None:
        """Store ``raw`` as the most recent value; evict the least recent beyond ``capacity``."""
        self[key] = raw
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)

"""The two rules for the ``size`` a parent Directory records for a sub-directory.

A Directory's encoding does not depend on the rule; the rule decides which
number a *parent* records next to a sub-directory's digest, and so the
parent's bytes and digest.  Two rules are deployed:

``tvix``
    ``2 * #entries + Σ child sizes`` — tvix, and snix up to 2025.
``snix``
    ``#files + #symlinks + 2 * #directories + Σ child sizes`` — snix 2026 on.

Both agree on a directory that holds only sub-directories (or nothing), so
only trees with files or symlinks below the top level differ.  A store
records its rule when it is created (the directory service keeps it, see
each backend); stores made before the rule was recorded follow ``tvix``.
"""

from __future__ import annotations

import enum
import os

from nixcas.errors import ConfigurationError

TYPE_CHECKING = False  # not typing's: `castore ls` loads nothing of it
if TYPE_CHECKING:
    from typing import Final

__all__ = [
    "DEFAULT_SIZE_RULE",
    "LEGACY_SIZE_RULE",
    "RULE_KEY",
    "SIZE_RULE_ENV",
    "SIZE_RULE_NAMES",
    "SizeRule",
    "requested_size_rule",
]


class SizeRule(enum.Enum):
    """Which directory size formula a store (or a peer) follows."""

    TVIX = "tvix"
    SNIX = "snix"

    def __str__(self) -> str:
        return self.value

    @property
    def other(self) -> SizeRule:
        """The rule that is not this one."""
        return SizeRule.SNIX if self is SizeRule.TVIX else SizeRule.TVIX

    def size(self, entries: int, directories: int, child_sizes: int) -> int:
        """The size of a Directory with ``entries`` entries, ``directories`` of them sub-directories."""
        if self is SizeRule.TVIX:
            return 2 * entries + child_sizes
        return entries + directories + child_sizes

    @classmethod
    def parse(cls, text: str, where: str) -> SizeRule:
        """``snix`` or ``tvix``; anything else is a :class:`~nixcas.errors.ConfigurationError`."""
        try:
            return cls(text.strip().lower())
        except ValueError:
            raise ConfigurationError(f"{where}: directory size rule must be snix or tvix, not {text[:40]!r}") from None


SIZE_RULE_NAMES: Final = tuple(sorted(rule.value for rule in SizeRule))
"""The rules' names, as options and URLs take them."""
RULE_KEY: Final = "directory_size_rule"
"""Under which key a database's metadata table records the store's rule (SQLite and PostgreSQL)."""

DEFAULT_SIZE_RULE: Final = SizeRule.SNIX
"""The rule of a store created without choosing one."""

LEGACY_SIZE_RULE: Final = SizeRule.TVIX
"""The rule of a store that holds directories but records no rule (made before rules were recorded)."""

SIZE_RULE_ENV: Final = "NIXCAS_DIRECTORY_SIZE_RULE"


def requested_size_rule(value: str | None = None) -> SizeRule | None:
    """``value`` (e.g. ``--directory-size-rule``), else ``$NIXCAS_DIRECTORY_SIZE_RULE``, parsed; ``None`` if neither."""
    if value is None:
        value = os.environ.get(SIZE_RULE_ENV) or None
        if value is None:
            return None
        return SizeRule.parse(value, SIZE_RULE_ENV)
    return SizeRule.parse(value, "--directory-size-rule")

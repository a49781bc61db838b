"""A click group whose subcommands are imported only when one is run (or its help is shown).

Each lazy subcommand is a ``(module, attribute, short help)`` entry.  ``--help``
lists every command with the short help kept here, so showing it imports
nothing; a test checks that each entry's text is its command's own short help.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import click

__all__ = ["LazyCommand", "LazyGroup"]


class LazyCommand(NamedTuple):
    """Where a subcommand lives and what ``--help`` shows for it (its help's first sentence)."""

    module: str
    attribute: str
    short_help: str


class LazyGroup(click.Group):
    """A :class:`click.Group` that imports a lazy subcommand's module on first use."""

    def __init__(self, *args: Any, lazy: Mapping[str, LazyCommand] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy: dict[str, LazyCommand] = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None and cmd_name in self.lazy:
            command = self.load(cmd_name)
        return command

    def load(self, cmd_name: str) -> click.Command:
        """Import the subcommand ``cmd_name`` and keep it (later lookups are plain)."""
        entry = self.lazy[cmd_name]
        command = getattr(importlib.import_module(entry.module), entry.attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{entry.module}.{entry.attribute} is not a click command")
        self.add_command(command, cmd_name)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The commands table: lazy entries from their kept short help, without importing them."""
        rows: list[tuple[str, str]] = []
        limit = formatter.width - 6 - max((len(name) for name in self.list_commands(ctx)), default=0)
        for name in self.list_commands(ctx):
            loaded = self.commands.get(name)
            if loaded is not None:
                if loaded.hidden:
                    continue
                rows.append((name, loaded.get_short_help_str(limit)))
            else:
                rows.append((name, shorten(self.lazy[name].short_help, limit)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def shorten(text: str, limit: int) -> str:
    """``text`` cut at a word boundary to fit ``limit`` columns, as click shortens a command's help."""
    if len(text) <= limit:
        return text
    if limit < len("..."):
        return "..."
    import textwrap

    return textwrap.shorten(text, limit, placeholder="...", break_on_hyphens=False)

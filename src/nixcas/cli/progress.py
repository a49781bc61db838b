"""Progress of a transfer on a terminal: files, bytes, rate and ETA, on stderr (rich is loaded only then)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

__all__ = ["Transfer", "scan", "transfer_progress"]


def scan(roots: Iterable[str | os.PathLike[str]]) -> tuple[int, int]:
    """The regular files under ``roots`` (symlinks not followed) and their total size: what an ingest reads."""
    files = size = 0
    stack = [os.fspath(r) for r in roots]
    while stack:
        path = stack.pop()
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            try:
                with os.scandir(path) as entries:
                    stack.extend(e.path for e in entries)
            except OSError:
                continue
        elif os.path.isfile(path) and not os.path.islink(path):
            files += 1
            size += st.st_size
    return files, size


@dataclass
class Transfer:
    """A running display: :meth:`advance` by bytes read; :meth:`describe` changes its leading text."""

    progress: Progress
    task: TaskID
    files: int

    def advance(self, n: int) -> None:
        self.progress.advance(self.task, n)

    def describe(self, text: str) -> None:
        self.progress.update(self.task, description=text)


@contextmanager
def transfer_progress(verb: str, roots: Iterable[str | os.PathLike[str]], unit: str = "") -> Iterator[Transfer | None]:
    """A files/bytes/rate/ETA display of reading ``roots`` on stderr when it is a terminal, else ``None``.

    ``unit`` (e.g. ``"3 paths, "``) is shown before the file count.
    """
    if not sys.stderr.isatty():
        yield None
        return
    files, size = scan(roots)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    with progress:
        task = progress.add_task(f"{verb} {unit}{files:,} files", total=size)
        yield Transfer(progress, task, files)

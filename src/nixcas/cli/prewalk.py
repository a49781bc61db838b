"""``nixcas import PATH`` and ``castore ingest PATH``: the walk of PATH started before the command line loads.

Loading click, asyncio and the store's services takes longer than walking a
tree of a few thousand files (BENCHMARKS.md).  :func:`start` recognizes the
plain forms of an import of one path,

    nixcas [--store-dir DIR] import [--json] PATH
    nixcas [--store-dir DIR] castore ingest [--json] PATH

and forks the walk of PATH at once (:class:`~nixcas.castore.walkproc.WalkProcess`;
for ``import``, hashing the NAR there with :class:`~nixcas.store.nar.hasher.NarHasher`).
The command then :func:`take`\\ s it for that path; anything else (another form, a
usage error, a path the command names differently, a tar archive) leaves it
untaken, and :func:`stop` ends it.  Whether or not a walk was started, the
command does the same work and prints the same; the walk is only somewhere else.

Set ``NIXCAS_PREWALK=0`` to walk in the importing process itself.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # not typing's: this runs before anything else is loaded
if TYPE_CHECKING:
    from nixcas.castore.walkproc import WalkProcess
    from nixcas.store.nar.hasher import NarHasher

__all__ = ["ENV", "parse", "start", "stop", "take"]

ENV = "NIXCAS_PREWALK"
"""``0``: no walk in a process of its own."""
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.zst", ".tzst")
"""The names ``castore ingest --as auto`` takes for a tar archive (if the path is a file)."""

_started: dict[bytes, WalkProcess] = {}


def parse(argv: list[str]) -> tuple[str, bytes] | None:
    """``("import" or "ingest", PATH)`` if ``argv`` is one of the plain forms; else ``None``.

    The path must be written as the command names it (no ``.`` or empty component, no
    trailing ``/``), exist, and for ``castore ingest`` not be named as a tar archive.
    """
    rest = argv
    if rest and rest[0].startswith("--store-dir"):
        if rest[0] == "--store-dir" and len(rest) > 1:
            rest = rest[2:]
        elif rest[0].startswith("--store-dir="):
            rest = rest[1:]
        else:
            return None
    if rest[:1] == ["import"]:
        command, rest = "import", rest[1:]
    elif rest[:2] == ["castore", "ingest"]:
        command, rest = "ingest", rest[2:]
    else:
        return None
    operands = [arg for arg in rest if arg != "--json"]
    if len(operands) != 1 or operands[0].startswith("-") or len(rest) - len(operands) > 1:
        return None
    if command == "ingest" and operands[0].endswith(TAR_SUFFIXES):
        return None  # perhaps a tar archive: the command decides
    path = os.fsencode(operands[0])
    parts = path.split(b"/")
    if b"." in parts or b"" in parts[1:] or path == b"/" or not os.path.lexists(path):
        return None
    return command, path


def start(argv: list[str]) -> None:
    """Start walking the path to import, if ``argv`` is a plain form (:func:`parse`); call before any thread."""
    if os.environ.get(ENV) == "0":
        return
    parsed = parse(argv)
    if parsed is None:
        return
    from nixcas.castore.walkproc import WalkProcess

    command, path = parsed
    try:  # noqa: SIM105  # contextlib is not loaded yet here
        _started[path] = WalkProcess.start(path, _nar_hasher if command == "import" else None)
    except OSError:
        pass  # no process or memory to spare: the command walks the tree itself


def take(path: str | os.PathLike[str]) -> WalkProcess | None:
    """The walk started for ``path`` (now the caller's to close), if there is one."""
    return _started.pop(os.fsencode(path), None)


def stop() -> None:
    """End the walks nobody took."""
    while _started:
        _started.popitem()[1].close()


def _nar_hasher() -> NarHasher:
    """The observer of the walk, made in the walking process."""
    from nixcas.store.nar.hasher import NarHasher

    return NarHasher()

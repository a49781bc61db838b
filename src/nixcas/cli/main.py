"""``nixcas``: the console-script entry point (the command tree is :data:`nixcas.cli.app.cli`)."""

from __future__ import annotations

import gc
import os
import sys

from nixcas import __version__

TYPE_CHECKING = False  # not typing's: the fast path does not load it
if TYPE_CHECKING:
    from typing import NoReturn

VERSION_LINE = f"nixcas, version {__version__}"
"""What ``nixcas --version`` prints (click's ``version_option`` prints the same)."""

GC_YOUNG_THRESHOLD = 50_000
"""Container allocations between young garbage collections (CPython's default is 700)."""


def tune_gc() -> None:
    """Cyclic garbage collection sized for commands that make many objects (an import, a dump, a server).

    What is loaded so far is frozen, so no later collection walks it again,
    and young collections run after 50,000 allocations instead of 700: an
    import of 20,000 small files spent about a tenth of its CPU in the
    collector.  Reference counting still frees everything at once; only
    garbage in cycles waits a little longer.
    """
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def leave(code: int) -> NoReturn:
    """End the process with ``code`` as ``sys.exit`` would, less the interpreter's finalization.

    The fast path's answer is complete (its threads are daemons): what finalization would still
    do is free the modules and objects it loaded, several ms of a ``dump-path``.  ``atexit``
    functions run and standard output and error are flushed first; if a flush fails,
    ``sys.exit`` reports it as it always does.
    """
    import atexit

    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        sys.exit(code)
    os._exit(code)


def main() -> None:
    """Console-script entry point: every error is one line on stderr, and a failure exits at once."""
    if sys.argv[1:] == ["--version"]:
        # Answered before click (~25 ms of imports here) loads: `nixcas --version` stays under 50 ms.
        sys.stdout.write(VERSION_LINE + "\n")
        sys.exit(0)

    tune_gc()
    if "import" in sys.argv or "ingest" in sys.argv:
        from nixcas.cli import prewalk

        prewalk.start(sys.argv[1:])  # `import PATH`: its walk starts now, in a process of its own

    from nixcas.cli.fast import answer

    code = answer(sys.argv[1:])  # path-info, castore ls/cat on the embedded store: without click or asyncio
    if code is not None:
        leave(code)

    from nixcas.cli.common import exit_process

    try:
        _main()
    except SystemExit as e:
        started = sys.modules.get("nixcas.cli.prewalk")
        if started is not None:
            started.stop()
        exit_process(e.code)


def _main() -> None:
    import click

    from nixcas.cli.app import cli
    from nixcas.cli.common import EXIT_USAGE, fail, tune_malloc

    gc.freeze()  # click and the command tree too

    if "GLIBC_TUNABLES" not in os.environ:
        tune_malloc()
    try:
        code = cli.main(prog_name="nixcas", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:  # bare `nixcas` / `nixcas castore`: show help
        click.echo(e.format_message(), err=True)
        sys.exit(EXIT_USAGE)
    except click.UsageError as e:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        fail(e.format_message() + hint, EXIT_USAGE)
    except click.ClickException as e:
        fail(e.format_message(), e.exit_code)
    except click.Abort:
        fail("interrupted", 130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()

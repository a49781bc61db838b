"""One logging setup for every command: UTC timestamps, level, logger name; text or JSON lines.

The level is ``--log-level`` (or ``NIXCAS_LOG_LEVEL``), else the command's
default (``info`` for servers, ``warning`` for the rest) moved by ``-v``/``-q``.
Every record goes out as one bounded line: its message is cut at
:data:`MAX_MESSAGE` characters, control characters (newlines among them) are
escaped, and every credential of a configured service URL is replaced by
``***`` (:func:`nixcas.urls.redacted`), so a client cannot make a server write
more than a short line per request, nor split one into several.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TextIO

from nixcas.urls import redacted

if TYPE_CHECKING:
    from asyncio import AbstractEventLoop

__all__ = ["LEVELS", "MAX_MESSAGE", "LogOptions", "bounded", "configure", "flush_pending", "serving", "write_directly"]

LEVELS: Final = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_ORDER: Final = (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR)
MAX_MESSAGE: Final = 1000
"""Characters of a log message that are written (the rest is replaced by a note of how many there were)."""
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")
MAX_TRACEBACK: Final = 8000
"""Characters of a traceback a log record carries, at most (the end, where the error is, is kept)."""


@dataclass(frozen=True)
class LogOptions:
    """The global logging options: ``--log-level`` (``None``: the command's default), ``-v`` minus ``-q``, format."""

    level: str | None = None
    verbosity: int = 0
    format: str = "text"

    def level_for(self, default: int) -> int:
        if self.level is not None:
            return LEVELS[self.level]
        index = _ORDER.index(default) - self.verbosity
        return _ORDER[max(0, min(len(_ORDER) - 1, index))]


_options = LogOptions()


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char) or f"\\x{ord(char):02x}"


def bounded(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` on one line (control characters escaped), at most about ``limit`` characters."""
    if len(text) > limit:
        text = f"{text[:limit]}… ({len(text) - limit} more characters)"
    return _CONTROL.sub(_escape, text) if _CONTROL.search(text) else text


def _traceback(text: str) -> str:
    """A traceback for the log: credentials redacted, at most :data:`MAX_TRACEBACK` characters (its end kept)."""
    text = redacted(text)
    return (
        text
        if len(text) <= MAX_TRACEBACK
        else f"… ({len(text) - MAX_TRACEBACK} characters before)\n" + text[-MAX_TRACEBACK:]
    )


_second: tuple[int, str] = (-1, "")


def _timestamp(created: float) -> str:
    """``created`` in UTC to the millisecond (the seconds part formatted once per second)."""
    global _second
    seconds = int(created)
    if _second[0] != seconds:
        _second = (seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)))
    return f"{_second[1]}.{int((created - seconds) * 1000):03d}Z"


class TextFormatter(logging.Formatter):
    """``2026-12-07T14:06:13.123Z INFO nixcas.access: GET /nix-cache-info 200 …`` (a traceback follows, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"{_timestamp(record.created)} {record.levelname} {record.name}: {bounded(redacted(record.getMessage()))}"
        )
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + _traceback(record.exc_text)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``time``, ``level``, ``logger``, ``message``, an access line's fields, ``exception``."""

    def format(self, record: logging.LogRecord) -> str:
        import json

        entry: dict[str, Any] = {
            "time": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": bounded(redacted(record.getMessage())),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = _traceback(record.exc_text)
        return json.dumps(entry, ensure_ascii=False)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The one handler :func:`configure` installs on the root logger (replaced, never duplicated)."""

    def emit(self, record: logging.LogRecord) -> None:
        if _pending:
            flush_pending()  # the lines held for the loop's next iteration go first: lines stay in order
        super().emit(record)

    def flush(self) -> None:
        """Write the held lines too: ``logging.shutdown`` (at exit, and before a failing command's
        ``os._exit``) flushes every handler."""
        flush_pending()
        super().flush()


def configure(options: LogOptions, *, server: bool = False, stream: TextIO | None = None) -> None:
    """Install the handler on the root logger with ``options`` (a server's default level is INFO), writing to
    ``stream`` (standard error by default)."""
    global _options
    flush_pending()
    _options = options
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(handler)
    global _handler
    handler = _handler = _Handler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if options.format == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(options.level_for(logging.INFO if server else logging.WARNING))
    logging.captureWarnings(True)
    # What no line shows is not gathered (the logging HOWTO's "Optimization"): an access line costs a third.
    logging._srcfile = None  # the caller's file and line
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False


_handler: _Handler | None = None
"""The handler :func:`configure` installed."""


def write_directly(
    logger: logging.Logger, level: int, message: str, soon: AbstractEventLoop | None = None
) -> bool:  # fmt: skip
    """Write ``message`` as ``logger``'s text line at ``level`` without a LogRecord, if that is all logging would
    do: text lines, our handler the root's only one, no other handler or filter on the way.  Else ``False``
    (the caller logs as usual).  An access line costs a third of going through :mod:`logging`.

    With ``soon`` (the running event loop) the line, its time taken now, is held and written with the
    others held in the same iteration of that loop, in one write, at the start of its next iteration
    (:func:`flush_pending`); any other line of the handler, and a flush of it (``logging.shutdown`` at the
    process's exit), writes them first.
    """
    handler = _handler
    root = logger.parent
    if (
        handler is None
        or _options.format != "text"
        or logger.handlers
        or logger.filters
        or handler.filters
        or not logger.propagate
        or root is None
        or root.parent is not None
        or root.handlers != [handler]
        or handler.level > level
        or not logger.isEnabledFor(level)
    ):
        return False
    line = f"{_timestamp(time.time())} {logging.getLevelName(level)} {logger.name}: {bounded(redacted(message))}\n"
    if soon is not None:
        if not _pending:
            soon.call_soon(flush_pending)
        _pending.append(line)
        return True
    with handler.lock or contextlib.nullcontext():
        if _pending:
            line = "".join(_pending) + line
            _pending.clear()
        handler.stream.write(line)
        handler.stream.flush()
    return True


_pending: list[str] = []
"""Lines :func:`write_directly` holds until the event loop's next iteration (all for :data:`_handler`)."""


def flush_pending() -> None:
    """Write the lines :func:`write_directly` holds, in one write, in order (nothing when none is held)."""
    handler = _handler
    if not _pending or handler is None:
        return
    with handler.lock or contextlib.nullcontext():
        text = "".join(_pending)
        _pending.clear()
        handler.stream.write(text)
        handler.stream.flush()


def json_lines() -> bool:
    """Whether log lines are JSON (access lines then carry their fields)."""
    return _options.format == "json"


def serving() -> None:
    """Re-apply the global options with a server's defaults (INFO; access lines on)."""
    configure(_options, server=True)

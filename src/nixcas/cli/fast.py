"""The read-only fast path: ``path-info``, ``castore ls``, ``castore cat`` and ``dump-path`` on the embedded store.

These three commands read one record each, which takes a millisecond; what
a user waits for is start-up.  Loading click and asyncio (and protobuf for
``path-info``) costs several times what ``nix-store --query`` takes for the
whole answer, so :func:`answer` serves exactly these forms without them::

    nixcas [--store-dir DIR] path-info [--json] STORE_PATH
    nixcas [--store-dir DIR] castore ls [--json] DIGEST
    nixcas [--store-dir DIR] castore cat DIGEST
    nixcas [--store-dir DIR] dump-path STORE_PATH

on the embedded store (no service URL, no composition in the options or the
environment), whose files exist.  It reads them with :mod:`sqlite3` and
``os.pread`` through the same functions the services use: a PathInfo record
is decoded and validated (:func:`~nixcas.store.pathinfo.model.verified_record`),
a Directory's BLAKE3 is checked and it is validated
(:func:`~nixcas.castore.directory.decode_stored`), and every byte of a blob
kept in a pack file is checked against its BLAKE3
(:mod:`nixcas.castore.blob.packfile`) before anything is written.  The lines
printed are made by the functions the full commands print with
(:mod:`nixcas.cli.render`).

``dump-path`` plans the whole NAR first (every Directory's BLAKE3 checked), then
writes it through the renderer of the full command
(:func:`~nixcas.store.nar.dump.write_planned`, reading through
:class:`~nixcas.castore.blob.wholeread.PackedReads`): every file's bytes are
checked against its BLAKE3 before one of them is written.  If a file cannot be
served that way (not in the store, damaged, a blob of an older layout, too big
to read whole), what was written so far is a prefix of the NAR: the full
command line then runs, leaves out that many bytes (:func:`dump_written`) and
writes the rest, or the error, in its own words.  Standard output must not be
a terminal (the full command refuses one).

Anything else returns ``None`` and the full command line (click) runs: other
options or forms, help, another store, a missing store or record, a blob
that is not in a pack, bad input, any error at all (it is then reported by
the full path, in its words), output click would change (ANSI escapes,
which it strips from a non-terminal) or could not encode.  Nothing is
written before the answer is complete, so falling back never repeats output.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # not typing's: `import typing` is a few ms of a start that needs nothing else of it
if TYPE_CHECKING:
    import sqlite3

    import zstandard

    from nixcas.store.pathinfo.model import PathInfo

__all__ = ["EXIT_BROKEN_PIPE", "answer", "discard_stdout", "dump_written"]

EXIT_BROKEN_PIPE = 141
"""128 + SIGPIPE, what a shell reports for a writer killed by a closed pipe."""

SERVICE_ENV = ("NIXCAS_COMPOSITION", "BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR", "PATH_INFO_SERVICE_ADDR")
"""Environment variables naming other services than the embedded store's: with any of them set, click answers."""

STORE_DIR_OPTION = "--store-dir"


def discard_stdout() -> None:
    """After a broken pipe: standard output goes to ``/dev/null``, so flushing it at exit fails no more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def answer(argv: list[str]) -> int | None:
    """Answer ``nixcas ARGV`` here and return the exit status; ``None``: the full command line must."""
    request = parse(argv)
    if request is None:
        return None
    store_dir, command, operand, as_json = request
    try:
        from nixcas.embedded import store_base

        base = store_base(store_dir)
        if command == "path-info":
            text: str | bytes | None = path_info(base, operand, as_json)
        elif not size_rule_agrees(base):
            return None
        elif command == "dump-path":
            return dump_path(base, operand)
        elif command == "ls":
            text = castore_ls(base, operand, as_json)
        else:
            text = castore_cat(base, operand)
        if text is None:
            return None
    except KeyboardInterrupt:
        sys.stderr.write("nixcas: error: interrupted\n")
        return 130
    except Exception:
        return None
    return write(text)


LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
CHOICE_ENV = {"NIXCAS_LOG_FORMAT": LOG_FORMATS, "NIXCAS_LOG_LEVEL": LOG_LEVELS}
"""Environment variables of the global options, and the values click takes (it refuses others, exit 2);
the directory size rule's are checked apart (their names are loaded only when one is asked for)."""


def parse(argv: list[str]) -> tuple[str | None, str, str, bool] | None:
    """``(store dir option, command, operand, --json)`` of a form this path answers, else ``None``."""
    if any(name in os.environ for name in SERVICE_ENV):
        return None
    for name, choices in CHOICE_ENV.items():
        value = os.environ.get(name)
        if value and (value.lower() if name == "NIXCAS_LOG_LEVEL" else value) not in choices:
            return None  # click's to refuse
    rule = os.environ.get("NIXCAS_DIRECTORY_SIZE_RULE")
    if rule:
        from nixcas.castore.sizerule import SIZE_RULE_NAMES

        if rule not in SIZE_RULE_NAMES:
            return None
    store_dir: str | None = None
    rest = argv
    if rest and rest[0].startswith(STORE_DIR_OPTION):
        first = rest[0]
        if first == STORE_DIR_OPTION and len(rest) > 1:
            store_dir, rest = rest[1], rest[2:]
        elif first.startswith(STORE_DIR_OPTION + "="):
            store_dir, rest = first[len(STORE_DIR_OPTION) + 1 :], rest[1:]
        else:
            return None
    if rest[:1] in (["path-info"], ["dump-path"]):
        command, args, json_ok = rest[0], rest[1:], rest[0] == "path-info"
    elif rest[:2] in (["castore", "ls"], ["castore", "cat"]):
        command, args, json_ok = rest[1], rest[2:], rest[1] == "ls"
    else:
        return None
    if not usable_store_dir(store_dir if store_dir is not None else os.environ.get("NIXCAS_STORE_DIR") or None):
        return None
    as_json = json_ok and "--json" in args
    if as_json:
        if args.count("--json") > 1:
            return None
        args = [a for a in args if a != "--json"]
    if len(args) != 1 or args[0].startswith("-"):
        return None  # another option, no operand or several: click's to parse or refuse
    return store_dir, command, args[0], as_json


def usable_store_dir(value: str | None) -> bool:
    """Whether click takes ``--store-dir VALUE`` (or its variable) as it is, and the fast path can use it.

    Click's ``Path(file_okay=False)`` refuses an existing file and an unreadable
    path; ``~``, an empty value, a dash and a missing directory are left to it too.
    """
    if value is None:
        return True
    if not value or value.startswith(("~", "-")):
        return False
    return os.path.isdir(value) and os.access(value, os.R_OK)


def open_existing(path: str) -> sqlite3.Connection | None:
    """The existing database ``path``, opened to read (never created, its schema never changed), or ``None``."""
    if not os.path.isfile(path):
        return None
    import sqlite3

    escaped = path.replace("%", "%25").replace("?", "%3f").replace("#", "%23")  # a path in a URI
    # Read-only: a WAL database is read from a consistent snapshot, as the services' connections read it;
    # SQLite may leave its (empty) -wal and -shm files behind, which a read-only connection does not remove.
    return sqlite3.connect(f"file:{escaped}?mode=ro", uri=True, isolation_level=None)


def size_rule_agrees(base: str) -> bool:
    """Whether the directory size rule the environment asks for (if any) is the one the store records.

    The full path opens the directory service, which refuses a store that follows
    the other rule (and records the rule of a store that has none): with such a
    request, anything but an exact match is left to it.
    """
    from nixcas.castore.sizerule import RULE_KEY, SIZE_RULE_ENV

    wanted = os.environ.get(SIZE_RULE_ENV)
    if not wanted:
        return True
    from nixcas.embedded import DIRECTORIES_DB

    db = open_existing(os.path.join(base, DIRECTORIES_DB))
    if db is None:
        return False
    try:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (RULE_KEY,)).fetchone()
    finally:
        db.close()
    return row is not None and row[0] == wanted


def path_info(base: str, operand: str, as_json: bool) -> str | None:
    """``path-info``: the record of STORE_PATH in ``DIR/pathinfo.sqlite``, validated, as the full command prints it."""
    from nixcas.cli.render import path_info_lines

    info = lookup(base, operand)
    if info is None:
        return None
    return "".join(line + "\n" for line in path_info_lines(info, as_json))


def lookup(base: str, operand: str) -> PathInfo | None:
    """The PathInfo of STORE_PATH in ``DIR/pathinfo.sqlite``, validated; ``None`` if there is none (or no database)."""
    from nixcas._sqlite import get_data
    from nixcas.embedded import PATHINFO_DB
    from nixcas.store.pathinfo.model import verified_record
    from nixcas.store.store_path import StorePath

    path = StorePath.parse(operand)
    db_path = os.path.join(base, PATHINFO_DB)
    db = open_existing(db_path)
    if db is None:
        return None
    try:
        raw = get_data(db, "pathinfo", path.digest)
    finally:
        db.close()
    if raw is None:
        return None
    info = verified_record(path.digest, raw, f"SqlitePathInfoService({db_path!r})")
    if info.store_path != path:
        return None  # the same hash with another name: not in the store, as the full path says
    return info


_dump_written = 0


def dump_written() -> int:
    """How many bytes of the NAR the fast path wrote before it left ``dump-path`` to the full command line."""
    return _dump_written


DIRECTORY_SCAN_PAGES = 2048
"""The largest ``directories.sqlite`` (in pages: 8 MiB of 4 KiB pages) ``dump-path`` may read whole."""
_ENTRIES_PER_PAGE = 6
"""Entries of a tree (its root's size) for which scanning one more page of the database costs less than reading
its Directories one query each (a scan: ~3 µs a page; a query: ~10 µs, for about 18 entries here)."""


class StoredDirectories:
    """Stored Directory bytes by raw digest from ``directories.sqlite``, each checked against its BLAKE3."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._ahead: dict[bytes, bytes] = {}

    def read_ahead(self, entries: int) -> None:
        """Read every Directory of the database at once (one scan) if a tree of ``entries`` (its root node's size)
        reads a good share of it: cheaper than a query a directory.  Each is still checked when :meth:`get` takes
        it; the others are dropped unread.  At most :data:`DIRECTORY_SCAN_PAGES`."""
        pages = int(self._db.execute("PRAGMA page_count").fetchone()[0])
        if pages <= DIRECTORY_SCAN_PAGES and pages * _ENTRIES_PER_PAGE <= entries:
            for digest, data in self._db.execute("SELECT digest, data FROM directories"):
                self._ahead[bytes(digest)] = bytes(data)

    def prefetch(self, digests: list[bytes]) -> None:
        """Read ``digests`` (the subdirectories of one directory) with one query; :meth:`get` takes them from here."""
        from nixcas._sqlite import select_in

        wanted = [digest for digest in digests if digest not in self._ahead]
        for digest, data in select_in(self._db, "SELECT digest, data FROM directories WHERE digest IN ({})", wanted):
            self._ahead[bytes(digest)] = bytes(data)

    def get(self, digest: bytes, /) -> bytes | None:
        from nixcas._sqlite import get_data
        from nixcas.castore.digest import B3Digest
        from nixcas.castore.directory import check_stored

        raw = self._ahead.pop(digest, None)
        if raw is None:
            raw = get_data(self._db, "directories", digest)
        if raw is not None:
            check_stored(B3Digest(digest), raw)
        return raw


def dump_path(base: str, operand: str) -> int | None:
    """``dump-path``: the NAR of STORE_PATH to standard output, every byte checked before it is written.

    ``None`` (before anything is written, or with :func:`dump_written` bytes written): the full
    command line takes over.
    """
    global _dump_written
    from nixcas._sqlite import READER_MMAP
    from nixcas.castore.blob.packfile import DB_NAME
    from nixcas.castore.blob.wholeread import PackedReads
    from nixcas.castore.nodes import DirectoryNode
    from nixcas.embedded import BLOBS, DIRECTORIES_DB
    from nixcas.store.nar.dump import Output, write_planned
    from nixcas.store.nar.rawplan import plan_steps

    out = sys.stdout
    if out is None or out.isatty():
        return None  # the full command refuses a terminal
    blobs = os.path.join(base, BLOBS)
    if not os.path.isfile(os.path.join(blobs, DB_NAME)):
        return None  # the full path opens (and would create) the blob service
    info = lookup(base, operand)
    if info is None:
        return None
    db = open_existing(os.path.join(base, DIRECTORIES_DB))
    if db is None:
        return None
    db.execute(f"PRAGMA mmap_size={READER_MMAP}")  # its pages read without a syscall each (a tree reads hundreds)
    out.flush()
    output = Output(out.fileno())
    reads = PackedReads(blobs)
    try:  # planned (the files planned so far read meanwhile), then written
        directories = StoredDirectories(db)
        if isinstance(info.node, DirectoryNode):
            directories.read_ahead(info.node.size)
        plan, planning = plan_steps(info.node, directories)
        done = write_planned(output, plan, reads, planning=planning) is None
    except BrokenPipeError:  # the reader went away (`nixcas dump-path … | head`): stop quietly, as `run` does
        discard_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as e:
        if not output.position:
            return None  # (a plan that fails, say): the full path writes or reports it all
        sys.stderr.write(f"nixcas: error: {os_error_line(e)}\n")  # the output failed after some of it was written
        return 1
    except Exception:  # the full path takes over after what was written (nothing, if the plan failed)
        done = False
    finally:
        reads.close()
        db.close()
    if done:
        return 0
    _dump_written = output.position  # (a file it could not read, or an error: the full path reports it)
    return None


def os_error_line(e: OSError) -> str:
    """An :class:`OSError` in one line, as the full command line's ``run`` reports it."""
    return f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)


def castore_ls(base: str, operand: str, as_json: bool) -> str | None:
    """``castore ls``: the Directory DIGEST from ``DIR/directories.sqlite``, hash-checked and validated."""
    from nixcas._sqlite import get_data
    from nixcas.castore.blob.packfile import DB_NAME
    from nixcas.castore.digest import B3Digest
    from nixcas.castore.directory import decode_stored
    from nixcas.cli.render import ls_line
    from nixcas.embedded import BLOBS, DIRECTORIES_DB

    digest = B3Digest.parse(operand)
    if not os.path.isfile(os.path.join(base, BLOBS, DB_NAME)):
        return None  # the full path opens (and would create) the blob service too
    db = open_existing(os.path.join(base, DIRECTORIES_DB))
    if db is None:
        return None
    try:
        raw = get_data(db, "directories", digest)
    finally:
        db.close()
    if raw is None:
        return None
    return "".join(ls_line(name, node, as_json) + "\n" for name, node in decode_stored(digest, raw))


def castore_cat(base: str, operand: str) -> bytes | None:
    """``castore cat``: a blob kept in a pack file of ``DIR/blobs``, every byte checked against its BLAKE3."""
    from nixcas.castore.blob.packfile import DB_NAME, PACKS_DIR, load, pack_name, select_row, verified
    from nixcas.castore.digest import B3Digest
    from nixcas.embedded import BLOBS, DIRECTORIES_DB

    digest = B3Digest.parse(operand)
    if not os.path.isfile(os.path.join(base, DIRECTORIES_DB)):
        return None  # the full path opens (and would create) the directory service too
    blobs = os.path.join(base, BLOBS)
    db = open_existing(os.path.join(blobs, DB_NAME))
    if db is None:
        return None
    try:
        row = select_row(db, digest)
        name = None if row is None else pack_name(db, row[2])
    finally:
        db.close()
    if row is None or name is None:
        return None  # a blob of the object layout (large or older), or none: the blob service reads it

    def pread(pack: int, length: int, offset: int) -> bytes:
        fd = os.open(os.path.join(blobs, PACKS_DIR, f"{name}.pack"), os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    return verified(digest, load(f"blob {digest.hex()}", row, pread, decompressor))


def decompressor() -> zstandard.ZstdDecompressor:
    """For a blob stored compressed (``packed://…?compress=true``): zstandard is loaded only then."""
    import zstandard

    return zstandard.ZstdDecompressor()


def write(answer: str | bytes) -> int | None:
    """Write the whole answer as click would (text through ``sys.stdout``), or ``None`` if click would not.

    ``click.echo`` strips ANSI escapes when standard output is no terminal and
    re-wraps a stream misconfigured as ASCII; text with an escape, text the
    stream cannot encode, or such a stream goes to the full path.
    """
    out = sys.stdout
    if out is None:
        return None
    try:
        if isinstance(answer, str):
            if "\x1b" in answer or codec_name(out.encoding) == "ascii":
                return None
            answer.encode(out.encoding, out.errors or "strict")
            out.write(answer)
            out.flush()
        else:
            out.buffer.write(answer)
            out.buffer.flush()
    except (UnicodeError, LookupError):
        return None
    except BrokenPipeError:  # the reader went away (`nixcas castore cat … | head`): stop quietly, as `run` does
        discard_stdout()
        return EXIT_BROKEN_PIPE
    return 0


def codec_name(encoding: str) -> str:
    """The canonical name of ``encoding`` (``codecs`` is loaded at every start anyway)."""
    import codecs

    return codecs.lookup(encoding).name

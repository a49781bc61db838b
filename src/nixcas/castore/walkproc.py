"""The walk of an import in a process of its own, started before the importer has loaded.

An import has two kinds of work: walking and reading the tree (``lstat``, ``open``,
``read`` and the Python around them for every file, plus hashing the NAR), and
storing it (BLAKE3, pack files, Directories).  In one process they share one
GIL, and the command's own start (loading asyncio, the services, the command
line) comes before either.  :meth:`WalkProcess.start` forks a walker as soon
as the command line is known to be an import, before those modules load: the
child runs :func:`~nixcas.castore.walk.walk` (and an observer, such as the
NAR hasher) with a GIL of its own, while the parent loads and opens the store.

The child copies each batch's small files into one of :data:`SLOTS` slots of a
shared memory mapping, hashes each one there (BLAKE3, of the very bytes it
hands over) and sends the batch's description (one ``marshal``-ed message per
batch) through a pipe; the parent builds the same items the walk yields
in-process, their contents views of the slot and their digests given, and
hands the slot back (one byte through a second pipe) once the batch is stored.
Hashing there matters: a thread that hashes one small file at a time gives up
the GIL for each, and beside a thread running Python it waits up to a switch
interval to get it back (1,200 digests of 13 KB: 8 ms alone, 950 ms beside a
busy thread).  Memory stays bounded: the child waits for a free slot, and a
slot holds at most one batch (:data:`~nixcas.castore.walk.BATCH_BYTES` plus
one small file).

Paths are sent once per directory: a directory is given a number when its
first entry is sent, and its items name it by that number; the number is
forgotten with the directory's own entry, so the tables on both sides hold
only the directories still open (linear in the depth).

The child ignores ``SIGINT`` (the parent stops it) and ends when its work is
done, or when the parent closes its end (a write fails, a read sees the end).
Only this module (and builtin modules) is loaded before the fork; the walk and the data model load
on both sides after it.
"""

from __future__ import annotations

import _thread
import marshal
import mmap
import os
import struct
import sys

TYPE_CHECKING = False  # not typing's: loaded before the fork, on the way to every import
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, Protocol

    from nixcas.castore.ingest import WalkObserver
    from nixcas.castore.treepath import TreePath
    from nixcas.castore.walk import Item

    class ResultObserver(WalkObserver, Protocol):
        """An observer with a result the parent gets (``marshal``-able), closed in any case."""

        def result(self) -> Any: ...

        def close(self) -> None: ...


__all__ = ["SLOTS", "SLOT_BYTES", "WalkProcess"]

SLOTS = 5
"""Batches the child may have handed over and not had back: three uploading, one being read, one being filled."""
SLOT_BYTES = (16 << 20) + (256 << 10)
"""A batch's small files: it ends once it holds :data:`~nixcas.castore.walk.BATCH_BYTES` (16 MiB), and each
is at most :data:`~nixcas.castore.walk.SMALL_BLOB` (256 KiB).  Written out: the walk loads only after the fork."""
PIPE_BYTES = 1 << 20
"""The pipe's capacity asked for: a batch's description in one go."""

_HEADER = struct.Struct("<Q")

# What the child sends: ("batch", slot, records), ("end", observer result) or ("error", kind, message).
# A batch's records, in walk order (ids name directories; -1 is the root's parent):
_FILE = 0  # (_FILE, parent id, name, executable, size, offset in the slot or -1 for a large file, stamp, BLAKE3)
_SYMLINK = 1  # (_SYMLINK, parent id, name, target)
_LEAVE = 2  # (_LEAVE, id, None): the directory is done (its entry)
_ENTER = 3  # (_ENTER, parent id, name, id): a directory, before its first record


class WalkProcess:
    """The parent's end of a walk running in a child process (see the module docstring)."""

    def __init__(self, root: bytes, pid: int, messages: int, releases: int, slots: mmap.mmap) -> None:
        self.root = root
        self._pid = pid
        self._messages = os.fdopen(messages, "rb", buffering=PIPE_BYTES)
        self._releases = releases
        self._slots = slots
        self._view = memoryview(slots)
        self._dirs: dict[int, tuple[TreePath, bytes]] = {}
        self._result: Any = None
        self._status = 0
        self._done = False
        self._lock = _thread.allocate_lock()
        self._reap_lock = _thread.allocate_lock()
        self._reading = False
        self._closed = False

    @classmethod
    def start(cls, root: bytes, observer: Callable[[], ResultObserver] | None = None) -> WalkProcess:
        """Fork a child that walks ``root`` (with the observer ``observer()`` makes there, if any).

        Call before any thread is started: the child is a copy of this process.  The observer is
        made in the child, so the parent never loads it; :meth:`result` is its ``result()``.
        """
        slots = mmap.mmap(-1, SLOTS * SLOT_BYTES, mmap.MAP_SHARED)
        message_r, message_w = os.pipe2(os.O_CLOEXEC)
        release_r, release_w = os.pipe2(os.O_CLOEXEC)
        try:
            import fcntl

            fcntl.fcntl(message_w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:
            pass  # a smaller pipe only means more wake-ups
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError:
            for fd in (message_r, message_w, release_r, release_w):
                os.close(fd)
            slots.close()
            raise
        if pid == 0:  # the child
            code = 1
            try:
                os.close(message_r)
                os.close(release_w)
                _child(root, message_w, release_r, slots, observer)
                code = 0
            finally:
                os._exit(code)
        os.close(message_w)
        os.close(release_r)
        return cls(root, pid, message_r, release_w, slots)

    # -- the parent's side -----------------------------------------------------------------------

    def next_batch(self) -> tuple[int, list[Item]] | None:
        """The next batch (its slot and items), ``None`` at the end; the walk's error, in order (blocking)."""
        from nixcas.castore.nodes import SymlinkNode
        from nixcas.castore.treepath import TreePath
        from nixcas.castore.walk import FileItem, IngestEntry, root_name

        with self._lock:
            if self._closed or self._done:
                return None
            self._reading = True
        try:
            message = self._receive()
        finally:
            with self._lock:
                self._reading = False
                closed = self._closed
                if closed:  # while this waited: nobody wants the batch any more
                    self._close_files()
        if closed:
            return None
        kind = message[0]
        if kind == "end":
            self._result = message[1]
            self._done = True
            self._reap()
            return None
        if kind == "error":
            self._done = True
            self._reap()
            raise _error(message[1], message[2])
        _, slot, records = message
        view = self._view[slot * SLOT_BYTES : (slot + 1) * SLOT_BYTES]
        dirs = self._dirs
        name_of_root = root_name(self.root)  # once a batch: cheap
        items: list[Item] = []
        for record in records:
            tag, parent, name = record[:3]
            if tag == _LEAVE:
                items.append(IngestEntry(dirs.pop(parent)[0], None))
                continue
            if parent < 0:
                path, fs_path = TreePath(None, name_of_root), self.root
            else:
                parent_path, prefix = dirs[parent]
                path, fs_path = TreePath(parent_path, name), prefix + name
            if tag == _FILE:
                _, _, _, executable, size, offset, stamp, digest = record
                data = None if offset < 0 else view[offset : offset + size] if size else b""
                items.append(FileItem(path, fs_path, size, executable, data, stamp, digest))
            elif tag == _ENTER:
                dirs[record[3]] = (path, fs_path.rstrip(b"/") + b"/")
            else:  # a symlink
                items.append(IngestEntry(path, SymlinkNode(record[3])))
        return slot, items

    def _receive(self) -> Any:
        header = self._messages.read(_HEADER.size)
        if len(header) == _HEADER.size:
            (length,) = _HEADER.unpack(header)
            body = self._messages.read(length)
            if len(body) == length:
                return marshal.loads(body)  # noqa: S302  # our own child's, through a pipe of our own
        self._done = True
        status = self._reap()
        how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
        return ("error", "", f"walking {os.fsdecode(self.root)}: the walking process {how}")

    def release(self, slot: int) -> None:
        """Hand ``slot`` back to the child: nothing of its batch is read any more."""
        if self._closed or self._done:
            return
        import contextlib  # (loaded by now; not before the fork)

        with contextlib.suppress(OSError):  # else the child is gone; its end (or error) is read from the other pipe
            os.write(self._releases, bytes((slot,)))

    def result(self) -> Any:
        """What the observer's ``result()`` returned in the child (once :meth:`next_batch` returned ``None``)."""
        if not self._done:
            raise RuntimeError("the walk is not done")
        return self._result

    def close(self) -> None:
        """Stop the child if it still runs, and let go of everything (a batch being read ends at once)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            reading = self._reading
        import contextlib
        import signal

        if not self._done:
            with contextlib.suppress(ProcessLookupError):  # else ended already
                os.kill(self._pid, signal.SIGKILL)
        self._reap()
        with contextlib.suppress(OSError):
            os.close(self._releases)
        if not reading:  # else the reading thread closes the rest when the child's end wakes it
            self._close_files()

    def _close_files(self) -> None:
        self._messages.close()
        try:
            self._view.release()
            self._slots.close()
        except BufferError:
            pass  # a batch still holds views of it: it is unmapped when the last one goes

    def _reap(self) -> int:
        """The child's exit status (negative: the signal that killed it); waits for it once."""
        with self._reap_lock:
            if self._pid == 0:
                return self._status
            _, status = os.waitpid(self._pid, 0)
            self._pid = 0
            self._status = os.waitstatus_to_exitcode(status)
            return self._status


def _error(kind: str, message: str) -> Exception:
    from nixcas.errors import DepthError, IngestError

    if kind == "DepthError":
        return DepthError(message)
    return IngestError(message)


# -- the child's side ------------------------------------------------------------------------------


def _child(
    root: bytes, messages: int, releases: int, slots: mmap.mmap, make_observer: Callable[[], ResultObserver] | None
) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the walk
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    sys.setswitchinterval(0.001)  # the walk and the hashing thread share this GIL (see share_the_gil_finely)

    def send(message: tuple[Any, ...]) -> None:
        body = marshal.dumps(message)
        data = memoryview(_HEADER.pack(len(body)) + body)
        while data:
            data = data[os.write(messages, data) :]

    observer: ResultObserver | None = None
    try:
        from blake3 import blake3 as hash_of

        from nixcas.castore.treepath import TreePath
        from nixcas.castore.walk import FileItem, root_name, walk

        observer = make_observer() if make_observer is not None else None
        view = memoryview(slots)
        free = list(range(SLOTS))
        ids: dict[int, int] = {}  # id() of an open directory's TreePath -> its number
        numbers = iter(range(1 << 62))

        def number(path: TreePath | None, records: list[tuple[Any, ...]]) -> int:
            """The number of the directory ``path`` (-1: none), its undefined ancestors defined first."""
            if path is None:
                return -1
            known = ids.get(id(path))
            if known is not None:
                return known
            chain = []
            while path is not None and id(path) not in ids:
                chain.append(path)
                path = path.parent
            parent = -1 if path is None else ids[id(path)]
            for p in reversed(chain):
                n = next(numbers)
                records.append((_ENTER, parent, p.name, n))
                ids[id(p)] = parent = n
            return parent

        for batch in walk(root, TreePath(None, root_name(root)), observer):
            if not free:
                got = os.read(releases, 1)
                if not got:
                    return  # the parent is gone
                free.append(got[0])
            slot = free.pop()
            base = slot * SLOT_BYTES
            offset = 0
            records: list[tuple[Any, ...]] = []
            for item in batch:
                path = item.path
                assert not isinstance(path, tuple)
                if isinstance(item, FileItem):
                    data = item.data
                    if data is None:
                        at, digest = -1, None
                    else:
                        at, end = offset, offset + len(data)
                        slots[base + at : base + end] = data
                        digest = hash_of(view[base + at : base + end]).digest()  # of the very bytes handed over
                        offset = end
                    parent = number(path.parent, records)
                    records.append((_FILE, parent, path.name, item.executable, item.size, at, item.stamp, digest))
                elif item.node is None:
                    records.append((_LEAVE, number(path, records), None))
                    del ids[id(path)]
                else:
                    parent = number(path.parent, records)
                    records.append((_SYMLINK, parent, path.name, item.node.target))  # type: ignore[union-attr]  # a symlink
            send(("batch", slot, records))
        result = observer.result() if observer is not None else None
        send(("end", result))
    except BrokenPipeError:
        return  # the parent is gone
    except Exception as e:
        from nixcas.errors import DepthError, IngestError

        if isinstance(e, IngestError | DepthError):
            send(("error", type(e).__name__, str(e)))
        else:
            send(("error", "", f"walking {os.fsdecode(root)}: {type(e).__name__}: {e}"))
    finally:
        if observer is not None:
            observer.close()

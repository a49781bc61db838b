"""A read-only FUSE mount of castore nodes: ``/dev/fuse`` answered by our own FUSE session (no libfuse).

``fusermount3`` mounts the filesystem and hands over the FUSE device (as
libfuse does for a mount by a user; it works the same for root).  Requests
are read from the device on the event loop and each is answered by a task of
its own through :class:`~nixcas.castore.fs.fuseproto.FuseSession`, the code
that answers a virtual machine over virtio-fs, calling
:class:`~nixcas.castore.fs.ops.FsCore`.  A reply is written with one
``writev`` of its pieces: the header and views of the chunks that hold a
read's bytes, never joined, copied by the kernel with the GIL released.
:func:`serve` mounts and runs until the filesystem is unmounted or the process
gets SIGINT/SIGTERM.

Semantics follow tvix/snix (reference §8) and are :class:`FsCore`'s: invalid
or unknown names are ``ENOENT``; a directory or blob the store cannot
deliver is ``EIO``; listing the root without ``list_root`` is ``EPERM``;
``readlink`` of a non-symlink is ``EINVAL``; opening a directory is
``EISDIR``; extended attributes are offered only with ``show_xattr`` (else
``ENOSYS``, which the kernel remembers).  Everything is immutable, so the
kernel may cache entries, attributes, listings and file pages for as long as
it likes.  Every failure is logged with the path it concerns.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Sequence

from nixcas.castore.fs.fuseproto import IN_HEADER, MAX_INFLIGHT, MAX_READ, FuseSession, Op
from nixcas.castore.fs.ops import FsCore, signals_while_serving

__all__ = [
    "FUSERMOUNT",
    "READ_AHEAD_KIB",
    "DeviceSession",
    "MountError",
    "MountedDevice",
    "mount_device",
    "serve",
    "unmount",
]

log = logging.getLogger("nixcas.fs")

READ_AHEAD_KIB = 1024
"""The kernel's read-ahead on the mount (its default for FUSE is 128 KiB): 1 MiB reads, 8x fewer requests."""


MALLOC_MMAP_THRESHOLD = 4 << 20
"""In a mount process, glibc's malloc serves blocks up to this size (every chunk and reply buffer) from its heap."""

MALLOC_TRIM_THRESHOLD = 32 << 20
"""... and keeps up to this much freed memory at the heap's top for reuse instead of handing it back."""


def keep_freed_buffers() -> bool:
    """Make glibc's malloc reuse the memory of freed chunk buffers instead of handing it back to the kernel.

    A sequential read allocates and frees buffers of a few hundred KiB (chunks,
    replies) thousands of times per GiB; with glibc's defaults each can be a
    fresh ``mmap`` whose pages fault in and are zeroed again, about a tenth of
    the mount's CPU.  Fixed thresholds (:data:`MALLOC_MMAP_THRESHOLD`,
    :data:`MALLOC_TRIM_THRESHOLD`) keep them in the heap.  A no-op (False)
    without glibc.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD)) and bool(
        mallopt(m_trim_threshold, MALLOC_TRIM_THRESHOLD)
    )


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def set_read_ahead(mountpoint: str, kib: int) -> bool:
    """Set the kernel's read-ahead for the filesystem mounted at ``mountpoint`` (needs root; else False).

    The device is found in ``/proc/self/mountinfo`` (a ``stat`` of the mount
    point would wait for this very process to answer).
    """
    device = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and _unescape_mountinfo(fields[4]) == mountpoint:
                device = fields[2]  # the last one listed is the newest mount
    if device is None:
        return False
    try:
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w", encoding="ascii") as f:
            f.write(str(kib))
    except OSError as e:
        log.debug("cannot set read-ahead of %s (bdi %s): %s", mountpoint, device, e)
        return False
    return True


FUSERMOUNT = "fusermount3"
"""The setuid helper of libfuse 3 that mounts a FUSE filesystem and passes its device back."""

REQUEST_ROOM = MAX_READ + 64 * 1024
"""Room for one request: the kernel refuses a read of the device into less than its largest write
request (``max_write`` plus headers), and this filesystem offers the same ``max_write`` as its reads."""

DEFAULT_OPTIONS = ("ro", "nosuid", "nodev", "default_permissions")
"""Mount options every mount gets: read-only, and permissions checked by the kernel from the modes."""


class MountError(OSError):
    """The filesystem could not be mounted (``fusermount3``'s words)."""


class MountedDevice:
    """The FUSE device of a mount, and ``fusermount3`` waiting to remove the mount once this process is gone.

    The mount is made with ``auto_unmount``: ``fusermount3`` stays, blocked on the socket it passed the
    device over, and unmounts (lazily) when that socket closes: at :meth:`close`, or when this process
    dies, however it dies (``kill -9`` leaves no dead mount behind).
    """

    def __init__(self, fd: int, helper: subprocess.Popen[bytes], channel: socket.socket) -> None:
        self.fd = fd
        self._helper = helper
        self._channel = channel

    def close(self) -> None:
        """Close the device; ``fusermount3`` then removes the mount if it is still there, and exits."""
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self._channel.close()
        try:
            self._helper.wait(HELPER_EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("%s did not exit after the session; left running", FUSERMOUNT)
        if self._helper.stderr is not None:
            self._helper.stderr.close()


HELPER_EXIT_TIMEOUT = 10.0
"""Seconds ``fusermount3`` may take to mount (and to exit once the session is over)."""


def mount_device(mountpoint: str, options: Sequence[str]) -> MountedDevice:
    """Mount a FUSE filesystem at ``mountpoint`` with ``fusermount3`` (``auto_unmount``); the device it hands back."""
    helper = shutil.which(FUSERMOUNT)
    if helper is None:
        raise MountError(errno.ENOENT, f"{FUSERMOUNT} not found (Debian: apt install fuse3)")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with theirs:
            process = subprocess.Popen(
                [FUSERMOUNT, "-o", ",".join([*options, "auto_unmount"]), "--", mountpoint],  # named so in its messages
                executable=helper,
                env={**os.environ, "_FUSE_COMMFD": str(theirs.fileno())},
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        ours.settimeout(HELPER_EXIT_TIMEOUT)
        try:
            _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        except OSError:
            fds = []
        if len(fds) != 1:  # it failed (and exits), or passed something else
            for fd in fds:
                os.close(fd)
            ours.close()  # a helper that did mount now removes the mount and exits
            try:
                _, err = process.communicate(timeout=HELPER_EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                _, err = process.communicate()
            said = err.decode(errors="replace").strip().splitlines()
            raise MountError(errno.EIO, said[-1] if said else f"{FUSERMOUNT} passed no FUSE device")
        ours.settimeout(None)
    except BaseException:
        ours.close()
        raise
    return MountedDevice(fds[0], process, ours)


def unmount(mountpoint: str) -> None:
    """Detach the mount at ``mountpoint`` (lazily: open files keep it until closed); quiet if it is gone."""
    helper = shutil.which(FUSERMOUNT)
    if helper is not None:
        subprocess.run(
            [FUSERMOUNT, "-u", "-z", "-q", "--", mountpoint],
            executable=helper,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )


class DeviceSession:
    """Requests read from a FUSE device, each answered by a task of its own, replies written as they are ready.

    The device is any descriptor that reads one whole request and takes one whole
    reply per call (``/dev/fuse``; a ``SOCK_SEQPACKET`` socket in tests).
    """

    def __init__(self, session: FuseSession, fd: int, *, after_init: Callable[[], None] | None = None) -> None:
        self.session = session
        self.fd = fd
        self.after_init = after_init
        """Called once the kernel has the answer to its INIT request (it then applies its settings)."""
        self.requests = 0
        self.unmounted = False
        """Whether the session ended because the filesystem was unmounted (the device reads ``ENODEV``)."""
        self._room = bytearray(REQUEST_ROOM)
        self._tasks: set[asyncio.Task[None]] = set()
        self._ended: asyncio.Future[None] | None = None
        self._paused = False
        """Whether the device is left unread: :data:`MAX_INFLIGHT` requests are being answered."""

    async def run(self) -> None:
        """Serve until the filesystem is unmounted or :meth:`stop`; requests still being answered are cancelled."""
        loop = asyncio.get_running_loop()
        self._ended = loop.create_future()
        os.set_blocking(self.fd, False)
        loop.add_reader(self.fd, self._readable)
        try:
            await self._ended
        finally:
            loop.remove_reader(self.fd)
            self._paused = False
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self, error: BaseException | None = None) -> None:
        """End :meth:`run` (with ``error`` raised from it, if given)."""
        if self._ended is not None and not self._ended.done():
            if error is None:
                self._ended.set_result(None)
            else:
                self._ended.set_exception(error)

    def _gone(self) -> None:
        self.unmounted = True
        self.stop()

    def _readable(self) -> None:
        """Read the requests waiting on the device, up to :data:`MAX_INFLIGHT` being answered; start answering each.

        At the limit the device is left unread (the kernel holds the rest) until an answer is written.
        """
        room = self._room
        while True:
            if len(self._tasks) >= MAX_INFLIGHT:
                asyncio.get_running_loop().remove_reader(self.fd)
                self._paused = True
                return
            try:
                n = os.readv(self.fd, [room])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno == errno.ENOENT:  # interrupted before it was read: the kernel no longer waits
                    continue
                if e.errno == errno.ENODEV:
                    self._gone()
                else:
                    log.error("reading the FUSE device: %s", e)
                    self.stop(e)
                return
            if n == 0:
                self._gone()
                return
            self.requests += 1
            task = asyncio.ensure_future(self._answer(bytes(room[:n])))
            self._tasks.add(task)
            task.add_done_callback(self._answered)

    def _answered(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:  # a bug: the request has no answer
            log.error("answering a FUSE request failed", exc_info=error)
        if self._paused and self._ended is not None and not self._ended.done():
            self._paused = False
            asyncio.get_running_loop().add_reader(self.fd, self._readable)

    async def _answer(self, request: bytes) -> None:
        reply = await self.session.handle(request, REQUEST_ROOM)
        if reply is None:
            return
        try:
            os.writev(self.fd, reply)
        except OSError as e:
            if e.errno == errno.ENODEV:
                self._gone()
            elif e.errno != errno.ENOENT:  # ENOENT: interrupted meanwhile, the kernel no longer waits for it
                log.error("writing the reply to a FUSE request: %s", e)
            return
        if self.after_init is not None and IN_HEADER.unpack_from(request)[1] == Op.INIT:
            after, self.after_init = self.after_init, None
            after()


async def serve(
    core: FsCore,
    mountpoint: str | os.PathLike[str],
    *,
    allow_other: bool = False,
    fsname: str = "nixcas",
    read_ahead_kib: int = READ_AHEAD_KIB,
    on_mounted: Callable[[], None] | None = None,
) -> None:
    """Mount ``core`` read-only at ``mountpoint`` and serve it until unmounted or SIGINT/SIGTERM.

    SIGUSR1 logs how many inodes and handles the filesystem holds.  When
    allowed (root), the kernel's read-ahead on the mount is raised to
    ``read_ahead_kib``, so sequential reads arrive as 1 MiB requests instead
    of 128 KiB ones.  The mount is removed however this returns (unless it
    is already gone); :class:`MountError` if it cannot be made.
    """
    keep_freed_buffers()
    where = os.path.abspath(mountpoint)
    real = os.path.realpath(where)  # now: once mounted, looking at the mount point needs this very loop
    options = [*DEFAULT_OPTIONS, f"fsname={fsname}", "subtype=nixcas"]
    if allow_other:
        options.append("allow_other")

    def after_init() -> None:
        raised = set_read_ahead(real, read_ahead_kib)
        log.info("kernel read-ahead %s", f"{read_ahead_kib} KiB" if raised else "unchanged")

    mounted = mount_device(where, options)
    device = DeviceSession(FuseSession(core), mounted.fd, after_init=after_init)
    try:
        with signals_while_serving(core, device.stop, log):
            if on_mounted is not None:
                on_mounted()
            await device.run()
    finally:
        log.info("session ended after %d requests holding %s", device.requests, core.stats())
        try:
            await core.close()
        finally:
            if not device.unmounted:
                unmount(where)
            mounted.close()

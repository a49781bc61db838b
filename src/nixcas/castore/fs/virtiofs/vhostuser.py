"""The back-end side of the vhost-user protocol for a virtio-fs device (asyncio).

A front-end (QEMU's ``vhost-user-fs-pci``, cloud-hypervisor's ``--fs``)
connects to our unix socket and sends requests: a 12-byte header
(request, flags, payload size), the payload, and file descriptors as
``SCM_RIGHTS`` (guest memory regions, kick/call eventfds).  It tells us
where guest memory is and where each virtqueue lives in it; the guest then
kicks a queue's eventfd when it made requests available, and we signal the
queue's call eventfd once we put replies on the used ring.

The queues are the ones of virtio-fs: queue 0 is ``hiprio`` (FORGET and
INTERRUPT), the others carry requests; all are served the same way, every
request by :class:`~nixcas.castore.fs.fuseproto.FuseSession`,
concurrently.

A malformed message (bad size, version, unknown request, bad region or
queue) ends the connection with a log line; a bad descriptor chain is
returned to the guest empty and logged.  Neither stops the daemon, and no
access leaves the mapped guest memory.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import functools
import logging
import os
import socket
import struct
from dataclasses import dataclass, field

from nixcas.castore.fs.fuseproto import MAX_INFLIGHT, FuseSession
from nixcas.castore.fs.virtiofs.virtqueue import BadDescriptor, Chain, GuestMemory, Virtqueue

__all__ = ["MAX_QUEUES", "Backend", "Req", "VhostUserError"]

log = logging.getLogger("nixcas.fs.virtiofs")

HEADER = struct.Struct("<III")
"""request, flags, payload size."""
VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
MAX_PAYLOAD = 4096
"""The longest payload we accept (a full memory table is 264 bytes)."""
MAX_FDS = 8
MAX_REGIONS = 8

U64 = struct.Struct("<Q")
STATE = struct.Struct("<II")
"""``vhost_vring_state``: index, num."""
ADDR = struct.Struct("<IIQQQQ")
"""``vhost_vring_addr``: index, flags, descriptor, used, available, log (front-end virtual addresses)."""
REGION = struct.Struct("<QQQQ")
"""``VhostUserMemoryRegion``: guest-physical address, size, front-end virtual address, mmap offset."""

VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
VIRTIO_F_VERSION_1 = 1 << 32
FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VHOST_USER_F_PROTOCOL_FEATURES

PROTOCOL_F_MQ = 1 << 0
PROTOCOL_F_REPLY_ACK = 1 << 3
PROTOCOL_FEATURES = PROTOCOL_F_MQ | PROTOCOL_F_REPLY_ACK

MAX_QUEUES = 16
"""hiprio and up to 15 request queues."""


VRING_NOFD = 0x100
VRING_INDEX = 0xFF


class Req:
    """vhost-user front-end requests."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SET_BACKEND_REQ_FD = 21
    RESET_DEVICE = 34


WITH_REPLY = frozenset({Req.GET_FEATURES, Req.GET_PROTOCOL_FEATURES, Req.GET_VRING_BASE, Req.GET_QUEUE_NUM})


class VhostUserError(Exception):
    """The front-end broke the protocol: the connection ends."""


@dataclass(eq=False)
class Queue:
    """What the front-end told us about one virtqueue, and its running state."""

    index: int
    num: int = 0
    addrs: tuple[int, int, int] | None = None
    """descriptor table, available ring, used ring (front-end virtual addresses)."""
    base: int = 0
    kick: int = -1
    call: int = -1
    err: int = -1
    enabled: bool = False
    ring: Virtqueue | None = None
    """Set while the queue runs (from SET_VRING_KICK to GET_VRING_BASE)."""
    generation: int = 0
    """Bumped when the queue stops: replies to requests from before are dropped."""
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


def _close(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


class Backend:
    """One front-end connection of the vhost-user-fs back-end."""

    def __init__(self, session: FuseSession, sock: socket.socket) -> None:
        self.session = session
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.features = 0
        self.protocol_features = 0
        self.memory: GuestMemory | None = None
        self.queues = [Queue(i) for i in range(MAX_QUEUES)]
        self.requests = 0
        """FUSE requests answered on this connection."""
        self.inflight = 0
        self._waiting: set[Queue] = set()
        self._to_notify: set[Queue] = set()
        """Queues left with chains available when :data:`MAX_INFLIGHT` was reached."""

    # -- socket -----------------------------------------------------------------------

    async def _readable(self) -> None:
        waiter = self.loop.create_future()
        fd = self.sock.fileno()

        def wake() -> None:
            if not waiter.done():
                waiter.set_result(None)

        self.loop.add_reader(fd, wake)
        try:
            await waiter
        finally:
            self.loop.remove_reader(fd)

    async def _recv(self, n: int, fds: list[int]) -> bytes:
        """Exactly ``n`` bytes (b"" at EOF before the first), collecting passed fds in ``fds``."""
        data = bytearray()
        while len(data) < n:
            try:
                chunk, ancillary, flags, _ = self.sock.recvmsg(n - len(data), socket.CMSG_SPACE(MAX_FDS * 4))
            except BlockingIOError:
                await self._readable()
                continue
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    passed = array.array("i")
                    passed.frombytes(payload[: len(payload) - len(payload) % passed.itemsize])
                    fds.extend(passed)
            if flags & socket.MSG_CTRUNC:
                raise VhostUserError(f"more than {MAX_FDS} file descriptors with one message")
            if not chunk:
                if data:
                    raise VhostUserError(f"connection closed inside a message ({len(data)} of {n} bytes)")
                return b""
            data += chunk
        return bytes(data)

    async def receive(self) -> tuple[int, int, bytes, list[int]] | None:
        """The next message: request, flags, payload, fds; ``None`` when the front-end hung up."""
        fds: list[int] = []
        try:
            header = await self._recv(HEADER.size, fds)
            if not header:
                return None
            request, flags, size = HEADER.unpack(header)
            if flags & 0x3 != VERSION:
                raise VhostUserError(f"request {request}: protocol version {flags & 0x3}, not {VERSION}")
            if size > MAX_PAYLOAD:
                raise VhostUserError(f"request {request}: payload of {size} bytes (at most {MAX_PAYLOAD})")
            payload = await self._recv(size, fds) if size else b""
            if len(payload) != size:
                raise VhostUserError(f"request {request}: connection closed before its {size}-byte payload")
        except BaseException:
            for fd in fds:
                _close(fd)
            raise
        return request, flags, payload, fds

    async def _send(self, request: int, payload: bytes) -> None:
        """A reply (a front-end that stops reading stalls its own connection only)."""
        await self.loop.sock_sendall(self.sock, HEADER.pack(request, VERSION | FLAG_REPLY, len(payload)) + payload)

    # -- the connection -------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until the front-end hangs up or breaks the protocol; the socket is closed then."""
        self.sock.setblocking(False)
        try:
            while (message := await self.receive()) is not None:
                request, flags, payload, fds = message
                log.debug("vhost-user request %d, flags %#x, %d bytes, %d fds", request, flags, len(payload), len(fds))
                try:
                    reply = self.handle(request, payload, fds)
                except BaseException:
                    for fd in fds:
                        _close(fd)
                    raise
                if reply is not None:
                    await self._send(request, reply)
                elif flags & FLAG_NEED_REPLY and self.protocol_features & PROTOCOL_F_REPLY_ACK:
                    await self._send(request, U64.pack(0))
        except VhostUserError as e:
            log.error("vhost-user front-end: %s; closing the connection", e)
        except OSError as e:
            log.error("vhost-user connection: %s", e)
        except Exception:
            log.exception("vhost-user connection: unexpected error; closing it")
        finally:
            self.sock.close()
            await self.close()

    async def close(self) -> None:
        """Stop every queue, unmap guest memory, close every fd we hold."""
        tasks = [t for q in self.queues for t in q.tasks]
        for queue in self.queues:
            self._stop(queue)
            _close(queue.call)
            _close(queue.err)
            queue.call = queue.err = -1
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.memory is not None:
            self.memory.close()
            self.memory = None

    # -- messages ----------------------------------------------------------------------------

    @staticmethod
    def _args(request: int, st: struct.Struct, payload: bytes) -> tuple[int, ...]:
        if len(payload) != st.size:
            raise VhostUserError(f"request {request}: payload of {len(payload)} bytes, expected {st.size}")
        return st.unpack(payload)

    def _queue(self, request: int, index: int) -> Queue:
        if index >= MAX_QUEUES:
            raise VhostUserError(f"request {request}: queue {index} (at most {MAX_QUEUES})")
        return self.queues[index]

    def _no_fds(self, request: int, fds: list[int]) -> None:
        if fds:
            raise VhostUserError(f"request {request}: {len(fds)} unexpected file descriptors")

    def handle(self, request: int, payload: bytes, fds: list[int]) -> bytes | None:
        """Act on one message; the payload of its reply, or ``None`` (the fds become ours or are closed)."""
        if request != Req.SET_MEM_TABLE and request not in (Req.SET_VRING_KICK, Req.SET_VRING_CALL, Req.SET_VRING_ERR):
            self._no_fds(request, fds)
        if request == Req.GET_FEATURES:
            return U64.pack(FEATURES)
        if request == Req.SET_FEATURES:
            (features,) = self._args(request, U64, payload)
            if features & ~FEATURES:
                raise VhostUserError(f"features {features:#x} include some not offered ({FEATURES:#x})")
            self.features = features
            return None
        if request == Req.GET_PROTOCOL_FEATURES:
            return U64.pack(PROTOCOL_FEATURES)
        if request == Req.SET_PROTOCOL_FEATURES:
            (features,) = self._args(request, U64, payload)
            self.protocol_features = features & PROTOCOL_FEATURES
            return None
        if request == Req.SET_OWNER:
            return None
        if request in (Req.RESET_OWNER, Req.RESET_DEVICE):
            for queue in self.queues:
                self._stop(queue)
                queue.enabled = False
            self.features = 0
            return None
        if request == Req.GET_QUEUE_NUM:
            return U64.pack(MAX_QUEUES)
        if request == Req.SET_MEM_TABLE:
            self._set_mem_table(payload, fds)
            return None
        if request in (Req.SET_VRING_NUM, Req.SET_VRING_BASE, Req.GET_VRING_BASE, Req.SET_VRING_ENABLE):
            index, num = self._args(request, STATE, payload)
            queue = self._queue(request, index)
            return self._vring_state(request, queue, num)
        if request == Req.SET_VRING_ADDR:
            index, _flags, desc, used, avail, _log = self._args(request, ADDR, payload)
            queue = self._queue(request, index)
            queue.addrs = (desc, avail, used)
            if queue.ring is not None:  # moved while running: look it up again
                self._start(queue)
            return None
        if request in (Req.SET_VRING_KICK, Req.SET_VRING_CALL, Req.SET_VRING_ERR):
            self._set_vring_fd(request, payload, fds)
            return None
        if request == Req.SET_BACKEND_REQ_FD:
            raise VhostUserError("SET_BACKEND_REQ_FD without the BACKEND_REQ protocol feature")
        raise VhostUserError(f"unknown request {request}")

    def _vring_state(self, request: int, queue: Queue, num: int) -> bytes | None:
        if request == Req.SET_VRING_NUM:
            if not 0 < num <= 32768 or num & (num - 1):
                raise VhostUserError(f"queue {queue.index}: size {num} is not a power of two up to 32768")
            queue.num = num
        elif request == Req.SET_VRING_BASE:
            queue.base = num & 0xFFFF
        elif request == Req.GET_VRING_BASE:
            self._stop(queue)
            return STATE.pack(queue.index, queue.base)
        else:
            queue.enabled = bool(num)
            if queue.enabled:
                self._service(queue)
        return None

    def _set_mem_table(self, payload: bytes, fds: list[int]) -> None:
        try:
            if len(payload) < 8:
                raise VhostUserError(f"memory table of {len(payload)} bytes")
            (count,) = struct.unpack_from("<I", payload)
            if not 0 < count <= MAX_REGIONS or len(payload) != 8 + count * REGION.size:
                raise VhostUserError(f"memory table of {count} regions in {len(payload)} bytes")
            table = [REGION.unpack_from(payload, 8 + i * REGION.size) for i in range(count)]
            try:
                memory = GuestMemory.map_fds([(a, b, c, d) for a, b, c, d in table], fds)
            except (ValueError, OSError) as e:
                raise VhostUserError(f"memory table: {e}") from None
        finally:
            for fd in fds:
                _close(fd)
        old, self.memory = self.memory, memory
        try:
            for queue in self.queues:
                if queue.ring is not None:  # running queues now read the new maps
                    self._start(queue)
        finally:
            if old is not None:
                old.close()
        log.info(
            "guest memory: %s",
            ", ".join(f"{size >> 20} MiB at {gpa:#x}" for gpa, size, _, _ in table),
        )

    def _set_vring_fd(self, request: int, payload: bytes, fds: list[int]) -> None:
        try:
            (value,) = self._args(request, U64, payload)
            queue = self._queue(request, value & VRING_INDEX)
            if value & VRING_NOFD:
                if fds:
                    raise VhostUserError(f"request {request}: a file descriptor with the no-fd flag")
                raise VhostUserError(f"queue {queue.index}: polling (no eventfd) is not supported")
            if len(fds) != 1:
                raise VhostUserError(f"request {request}: {len(fds)} file descriptors, expected 1")
        except VhostUserError:
            for fd in fds:
                _close(fd)
            raise
        (fd,) = fds
        if request == Req.SET_VRING_CALL:
            _close(queue.call)
            queue.call = fd
        elif request == Req.SET_VRING_ERR:
            _close(queue.err)
            queue.err = fd
        else:  # a new kick fd for a running queue keeps its requests in flight
            if queue.kick >= 0:
                self.loop.remove_reader(queue.kick)
                _close(queue.kick)
            queue.kick = fd
            if not self.features & VHOST_USER_F_PROTOCOL_FEATURES:
                queue.enabled = True  # without protocol features a ring starts enabled
            self._start(queue)

    # -- queues -------------------------------------------------------------------------------

    def _start(self, queue: Queue) -> None:
        if self.memory is None or queue.addrs is None or queue.num == 0:
            raise VhostUserError(f"queue {queue.index} started before its memory, size and addresses were set")
        base = queue.ring.last_avail if queue.ring is not None else queue.base
        try:
            queue.ring = Virtqueue(self.memory, queue.num, *queue.addrs, last_avail=base)
        except BadDescriptor as e:
            raise VhostUserError(f"queue {queue.index}: {e}") from None
        with contextlib.suppress(ValueError):
            self.loop.remove_reader(queue.kick)
        self.loop.add_reader(queue.kick, self._kicked, queue)
        self._service(queue)

    def _stop(self, queue: Queue) -> None:
        if queue.ring is not None:
            queue.base = queue.ring.last_avail
            queue.ring = None
            queue.generation += 1
        if queue.kick >= 0:
            self.loop.remove_reader(queue.kick)
            _close(queue.kick)
            queue.kick = -1

    def _kicked(self, queue: Queue) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.read(queue.kick, 8)
        self._service(queue)

    def _service(self, queue: Queue) -> None:
        """Take every chain the guest made available on a running, enabled queue."""
        ring = queue.ring
        if ring is None or not queue.enabled:
            return
        returned = False
        while True:
            if self.inflight >= MAX_INFLIGHT:
                self._waiting.add(queue)
                break
            try:
                head = ring.pop()
            except BadDescriptor as e:
                log.error("queue %d: %s; queue stopped", queue.index, e)
                self._stop(queue)
                return
            if head is None:
                break
            try:
                chain = ring.chain(head)
            except BadDescriptor as e:
                log.error("queue %d: bad descriptor chain %d: %s; returned empty", queue.index, head, e)
                if head < ring.size:
                    ring.put_used(head, 0)
                    returned = True
                continue
            task = self.loop.create_task(self._answer(queue, queue.generation, chain))
            queue.tasks.add(task)
            self.inflight += 1
            task.add_done_callback(functools.partial(self._done, queue))
        if returned:
            self._notify(queue)

    def _done(self, queue: Queue, task: asyncio.Task[None]) -> None:
        queue.tasks.discard(task)
        self.inflight -= 1
        if self._waiting:
            waiting, self._waiting = self._waiting, set()
            for q in waiting:
                self._service(q)

    async def _answer(self, queue: Queue, generation: int, chain: Chain) -> None:
        if chain.truncated:
            reply = self.session.too_large(chain.readable, chain.capacity)
        else:
            reply = await self.session.handle(chain.readable, chain.capacity)
        self.requests += 1
        ring = queue.ring
        if ring is None or queue.generation != generation:
            return  # the queue stopped (or restarted) meanwhile: the guest no longer waits for this
        try:
            ring.push(chain, reply or ())
        except BadDescriptor as e:  # the memory table changed under the request
            log.error("queue %d: reply to chain %d: %s", queue.index, chain.head, e)
            ring.put_used(chain.head, 0)
        self._notify(queue)

    def _notify(self, queue: Queue) -> None:
        """Signal the queue's call eventfd once the replies finished in this step of the loop are all on the ring."""
        if not self._to_notify:
            self.loop.call_soon(self._flush_notify)
        self._to_notify.add(queue)

    def _flush_notify(self) -> None:
        queues, self._to_notify = self._to_notify, set()
        for queue in queues:
            ring = queue.ring
            if queue.call < 0 or ring is None or ring.interrupts_suppressed():
                continue  # the driver polls the used ring itself meanwhile
            try:
                os.write(queue.call, U64.pack(1))
            except BlockingIOError:
                pass  # the counter is full: the front-end has a wake-up pending anyway
            except OSError as e:
                log.error("queue %d: cannot signal its call fd: %s", queue.index, e)

"""Guest memory shared over vhost-user and split virtqueues in it (virtio 1.x, little-endian).

:class:`GuestMemory` maps the regions of a ``SET_MEM_TABLE`` and translates
guest-physical addresses (in descriptors) and front-end virtual addresses
(of the rings) to places in those maps; every access is bounds-checked
against one region, so a descriptor pointing anywhere else is an error
(:class:`BadDescriptor`), never a read or write outside guest memory.

:class:`Virtqueue` is one split ring: the descriptor table, the available
ring the driver fills and the used ring the device returns buffers on.
:meth:`Virtqueue.pop` walks a chain (``NEXT`` links, ``INDIRECT`` tables)
into the bytes the driver wrote and the places it lets the device write;
:meth:`Virtqueue.push` writes a reply there and returns the chain.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["BadDescriptor", "Chain", "GuestMemory", "MemoryRegion", "Virtqueue"]

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1

DESC = struct.Struct("<QIHH")
"""One descriptor: guest-physical address, length, flags, next."""

MAX_QUEUE_SIZE = 32768
MAX_REQUEST = 64 << 10
"""The most bytes of a request's driver-written part that are read (a read-only filesystem needs a few hundred;
more is a write, answered from its header alone)."""


class BadDescriptor(Exception):
    """A descriptor chain the driver wrote is malformed or points outside guest memory."""


@dataclass(slots=True)
class MemoryRegion:
    """One region of guest memory: where the guest and the front-end see it, and our map of its fd."""

    guest_phys_addr: int
    size: int
    user_addr: int
    map: mmap.mmap
    offset: int
    """Where the region starts inside ``map`` (the region's ``mmap_offset``)."""


class GuestMemory:
    """The regions of guest memory a front-end shared (``SET_MEM_TABLE``)."""

    def __init__(self, regions: list[MemoryRegion]) -> None:
        self.regions = regions

    @classmethod
    def map_fds(cls, table: list[tuple[int, int, int, int]], fds: list[int]) -> GuestMemory:
        """Map ``(guest_phys_addr, size, user_addr, mmap_offset)`` regions, one fd each (the fds stay open)."""
        if len(table) != len(fds):
            raise ValueError(f"{len(table)} memory regions but {len(fds)} file descriptors")
        regions: list[MemoryRegion] = []
        try:
            for (gpa, size, uva, offset), fd in zip(table, fds, strict=True):
                if size <= 0 or gpa + size > 1 << 64 or uva + size > 1 << 64:
                    raise ValueError(f"bad memory region at {gpa:#x}, {size} bytes")
                length = os.fstat(fd).st_size
                if offset + size > length:
                    raise ValueError(f"memory region at {gpa:#x}: {offset}+{size} bytes past its file ({length})")
                regions.append(MemoryRegion(gpa, size, uva, mmap.mmap(fd, offset + size), offset))
        except BaseException:
            for region in regions:
                region.map.close()
            raise
        return cls(regions)

    def close(self) -> None:
        for region in self.regions:
            region.map.close()
        self.regions = []

    def _find(self, addr: int, n: int, *, physical: bool) -> tuple[mmap.mmap, int]:
        for region in self.regions:
            start = region.guest_phys_addr if physical else region.user_addr
            if start <= addr and addr + n <= start + region.size:
                return region.map, region.offset + addr - start
        kind = "guest-physical" if physical else "front-end"
        raise BadDescriptor(f"{n} bytes at {kind} address {addr:#x} are not inside guest memory")

    def locate(self, gpa: int, n: int) -> tuple[mmap.mmap, int]:
        """The map and offset of ``n`` bytes at guest-physical ``gpa`` (all inside one region)."""
        return self._find(gpa, n, physical=True)

    def locate_user(self, uva: int, n: int) -> tuple[mmap.mmap, int]:
        """The map and offset of ``n`` bytes at the front-end's virtual address ``uva``."""
        return self._find(uva, n, physical=False)

    def read(self, gpa: int, n: int) -> bytes:
        m, off = self.locate(gpa, n)
        return m[off : off + n]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        m, off = self.locate(gpa, len(data))
        m[off : off + len(data)] = data


@dataclass(slots=True)
class Chain:
    """One request popped from a virtqueue."""

    head: int
    readable: bytes
    """What the driver wrote (every device-readable descriptor, in order)."""
    writable: list[tuple[int, int]]
    """Where the device may write: ``(guest_phys_addr, length)`` in order."""
    truncated: bool = False
    """The driver wrote more than :data:`MAX_REQUEST` bytes: ``readable`` holds the first ones."""

    @property
    def capacity(self) -> int:
        return sum(n for _, n in self.writable)


class Virtqueue:
    """One split virtqueue in guest memory (addresses as a ``SET_VRING_ADDR`` gives them)."""

    def __init__(self, memory: GuestMemory, size: int, desc: int, avail: int, used: int, last_avail: int) -> None:
        if not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise BadDescriptor(f"queue size {size} is not a power of two up to {MAX_QUEUE_SIZE}")
        self.memory = memory
        self.size = size
        self._desc = memory.locate_user(desc, 16 * size)
        self._avail = memory.locate_user(avail, 6 + 2 * size)
        self._used = memory.locate_user(used, 6 + 8 * size)
        self.last_avail = last_avail & 0xFFFF
        m, off = self._used
        self.used_idx = struct.unpack_from("<H", m, off + 2)[0]

    def pending(self) -> int:
        """How many chains the driver made available that were not popped yet."""
        m, off = self._avail
        idx: int = struct.unpack_from("<H", m, off + 2)[0]
        return (idx - self.last_avail) & 0xFFFF

    def interrupts_suppressed(self) -> bool:
        """Whether the driver asked not to be notified of used buffers (``VIRTQ_AVAIL_F_NO_INTERRUPT``)."""
        m, off = self._avail
        flags: int = struct.unpack_from("<H", m, off)[0]
        return bool(flags & VIRTQ_AVAIL_F_NO_INTERRUPT)

    def pop(self) -> int | None:
        """The head of the next available chain, or ``None``."""
        if self.pending() == 0:
            return None
        if self.pending() > self.size:
            raise BadDescriptor(f"the driver made {self.pending()} chains available in a queue of {self.size}")
        m, off = self._avail
        head: int = struct.unpack_from("<H", m, off + 4 + 2 * (self.last_avail % self.size))[0]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return head

    def chain(self, head: int) -> Chain:
        """Walk the chain starting at descriptor ``head`` (checked: bounds, loops, nesting)."""
        if head >= self.size:
            raise BadDescriptor(f"chain head {head} outside a queue of {self.size}")
        readable = bytearray()
        writable: list[tuple[int, int]] = []
        table, table_off, table_len = self._desc[0], self._desc[1], self.size
        index, seen, indirect, truncated = head, 0, False, False
        while True:
            seen += 1
            if seen > table_len:
                raise BadDescriptor("descriptor chain loops or is longer than its table")
            addr, length, flags, nxt = DESC.unpack_from(table, table_off + 16 * index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if indirect:
                    raise BadDescriptor("indirect descriptor inside an indirect table")
                if flags & VIRTQ_DESC_F_NEXT or length == 0 or length % 16:
                    raise BadDescriptor(f"indirect table of {length} bytes")
                if length // 16 > MAX_QUEUE_SIZE:
                    raise BadDescriptor(f"indirect table of {length // 16} descriptors")
                table, table_off = self.memory.locate(addr, length)
                table_len, index, seen, indirect = length // 16, 0, 0, True
                continue
            self.memory.locate(addr, length)  # the whole buffer is inside guest memory
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append((addr, length))
            elif writable:
                raise BadDescriptor("a device-readable descriptor after a device-writable one")
            else:
                take = min(length, MAX_REQUEST - len(readable))
                truncated = truncated or take < length
                if take:
                    readable += self.memory.read(addr, take)
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            if nxt >= table_len:
                raise BadDescriptor(f"next descriptor {nxt} outside a table of {table_len}")
            index = nxt
        return Chain(head, bytes(readable), writable, truncated)

    def push(self, chain: Chain, reply: Sequence[bytes | memoryview]) -> int:
        """Write the pieces of ``reply``, in order, into the chain's writable buffers and return it on the used
        ring; bytes written."""
        buffers = iter(chain.writable)
        addr = room = written = 0
        for piece in reply:
            view = memoryview(piece)
            while view:
                if room == 0:
                    step = next(buffers, None)
                    if step is None:
                        self.put_used(chain.head, written)
                        return written
                    addr, room = step
                    continue
                part = view[:room]
                self.memory.write(addr, part)
                addr, room, written = addr + len(part), room - len(part), written + len(part)
                view = view[len(part) :]
        self.put_used(chain.head, written)
        return written

    def put_used(self, head: int, written: int) -> None:
        """Return chain ``head`` with ``written`` bytes on the used ring (the entry first, then the index)."""
        m, off = self._used
        struct.pack_into("<II", m, off + 4 + 8 * (self.used_idx % self.size), head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        struct.pack_into("<H", m, off + 2, self.used_idx)

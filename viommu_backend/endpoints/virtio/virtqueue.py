"""Split virtqueues (virtio 1.x, 2.7): descriptor chains (direct and one level of
indirect table), the available and used rings, and the VIRTIO_F_EVENT_IDX rules.

Device-independent: a device hands :meth:`Virtqueue.process` a function that performs one
request given its descriptor chain as :class:`Segment` s and returns the used length.
Ring and descriptor memory is reached only through the given
:class:`~viommu_backend.endpoints.dma.DmaPort`; the three rings (descriptor table,
available and used ring) through :class:`~viommu_backend.endpoints.dma.DmaWindow` s
kept per queue, so that a request touching them costs no translation while the port's
pinned views stay valid.  A driver that breaks the ring rules
gets :class:`ChainError` (the transport then sets DEVICE_NEEDS_RESET); requests already
completed before the error are still returned in the used ring.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable

from viommu_backend.bitfield import F, Layout
from viommu_backend.endpoints.dma import DmaFault, DmaPort, DmaWindow
from viommu_backend.memory import full_barrier

NO_VECTOR = 0xFFFF

VIRTQ_DESC = Layout("VIRTQ_DESC", 128, (
    F("ADDR", 63, 0), F("LEN", 31, 0, word=1), F("FLAGS", 47, 32, word=1),
    F("NEXT", 63, 48, word=1)))
DESC_FLAGS = Layout("DESC_FLAGS", 16, (F("NEXT", 0), F("WRITE", 1), F("INDIRECT", 2)))
DESC_SIZE = 16
AVAIL_F_NO_INTERRUPT = 1
MAX_INDIRECT_DESCS = 32768

_F_NEXT = DESC_FLAGS["NEXT"].mask
_F_WRITE = DESC_FLAGS["WRITE"].mask
_F_INDIRECT = DESC_FLAGS["INDIRECT"].mask
_DESC = struct.Struct("<QIHH")  # struct virtq_desc: addr, len, flags, next
_U16 = struct.Struct("<H")
_RING_HEADER = struct.Struct("<HH")  # flags, idx (of the available and the used ring)
_USED_ELEM = struct.Struct("<II")  # struct virtq_used_elem: id, len


class ChainError(Exception):
    """The driver broke the ring or descriptor rules: the device needs a reset."""


@dataclass(slots=True)
class Segment:
    addr: int
    length: int
    writable: bool


ChainHandler = Callable[[list[Segment]], int]
"""Performs one request from its chain; returns the used length (bytes written)."""


def need_event(event_idx: int, new: int, old: int) -> bool:
    """vring_need_event: did the used index pass the driver's used_event?"""
    return ((new - event_idx - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


def gather(dma: DmaPort, segs: list[Segment], skip: int, n: int) -> bytes:
    """``n`` bytes of the chain's data starting ``skip`` bytes into ``segs``."""
    out = bytearray()
    for s in segs:
        if skip >= s.length:
            skip -= s.length
            continue
        take = min(s.length - skip, n - len(out))
        out += dma.read(s.addr + skip, take)
        skip = 0
        if len(out) == n:
            break
    return bytes(out)


def ranges(segs: list[Segment], skip: int, n: int) -> list[tuple[int, int]]:
    """The bus-address ranges [(addr, length)] of ``n`` bytes of the chain's data starting
    ``skip`` bytes into ``segs`` (as :func:`gather` would read them); segments that
    continue one another in bus-address space are joined into one range."""
    out: list[tuple[int, int]] = []
    end = -1  # bus address just past the last range
    for s in segs:
        if n <= 0:
            break
        ln = s.length
        if skip >= ln:
            skip -= ln
            continue
        take = ln - skip if ln - skip < n else n
        a = s.addr + skip
        if a == end:
            out[-1] = (out[-1][0], out[-1][1] + take)
        else:
            out.append((a, take))
        end = a + take
        n -= take
        skip = 0
    return out


def scatter(dma: DmaPort, segs: list[Segment], data: bytes | memoryview) -> None:
    """Write ``data`` across ``segs`` in order (as much as fits)."""
    mv, pos = memoryview(data), 0
    for s in segs:
        if pos >= len(mv):
            break
        take = min(s.length, len(mv) - pos)
        dma.write(s.addr, mv[pos:pos + take])
        pos += take


@dataclass
class Virtqueue:
    """Per-queue state of a split virtqueue (registers and ring indices)."""

    index: int
    max_size: int
    size: int = 0
    msix_vector: int = NO_VECTOR
    enabled: bool = False
    desc: int = 0
    driver: int = 0
    device: int = 0
    last_avail: int = 0  # free-running 16-bit
    used_idx: int = 0  # free-running 16-bit
    # (port, desc, driver, device, size, the rings' windows): kept while the first five hold
    _rings: tuple[object, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.reset()

    def rings(self, dma: DmaPort) -> tuple[DmaWindow, DmaWindow, DmaWindow]:
        """Windows on the descriptor table, the available ring (flags, idx, ring[size],
        used_event) and the used ring (flags, idx, ring[size], avail_event)."""
        key = (dma, self.desc, self.driver, self.device, self.size)
        if self._rings[:5] == key:
            return self._rings[5]  # type: ignore[return-value]
        size = self.size
        rings = (DmaWindow(dma, self.desc, DESC_SIZE * size, write=False),
                 DmaWindow(dma, self.driver, 4 + 2 * size + 2, write=False),
                 DmaWindow(dma, self.device, 4 + 8 * size + 2, write=True))
        self._rings = key + (rings,)
        return rings

    def reset(self) -> None:
        self.size = self.max_size
        self.msix_vector = NO_VECTOR
        self.enabled = False
        self.desc = self.driver = self.device = 0
        self.last_avail = self.used_idx = 0
        self._rings = ()

    def process(self, dma: DmaPort, handle: ChainHandler, *, event_idx: bool,
                indirect: bool, interrupt: Callable[[], None],
                report: Callable[[str], None]) -> int:
        """Complete every available chain with ``handle``; returns how many.  Publishes
        the used index and calls ``interrupt`` when the driver wants one (also when a
        :class:`ChainError` or DMA fault follows completed requests); a fault writing the
        used index goes to ``report``.

        The driver and the device each publish an index and then read the other's event
        index (virtio 1.2, 2.7.7 and 2.7.10): the device writes ``avail_event`` before its
        last look at the available index, and the used index before it reads
        ``used_event`` / the avail flags, with a full barrier between -- otherwise a
        request added, or an interrupt asked for, in between is lost."""
        size = self.size
        desc, avail_w, used_w = self.rings(dma)
        old_used = self.used_idx
        done = 0
        try:
            pending = self._pending(avail_w)
            while pending:
                while pending:
                    self._complete_next(avail_w, desc, used_w, dma, handle, indirect)
                    done += 1
                    pending -= 1
                if event_idx:  # avail_event: notify me when you pass this
                    used_w.pack_into(_U16, 4 + 8 * size, self.last_avail)
                    full_barrier()
                pending = self._pending(avail_w)  # requests the driver added meanwhile
        finally:
            if done:  # requests completed before an error are still returned
                self._publish_used(used_w, avail_w, old_used, event_idx, interrupt, report)
        return done

    def _pending(self, avail: DmaWindow) -> int:
        """Chains the driver made available that the device has not taken yet."""
        _flags, avail_idx = avail.unpack_from(_RING_HEADER, 0)
        pending = (avail_idx - self.last_avail) & 0xFFFF
        if pending > self.size:
            raise ChainError(f"avail idx {avail_idx} is {pending} ahead of {self.last_avail}")
        return pending

    def _complete_next(self, avail: DmaWindow, desc: DmaWindow, used: DmaWindow,
                       dma: DmaPort, handle: ChainHandler, indirect: bool) -> None:
        """Take the next available chain, perform it and write its used element."""
        size = self.size
        head = avail.unpack_from(_U16, 4 + 2 * (self.last_avail % size))[0]
        if head >= size:
            raise ChainError(f"avail ring head {head} >= queue size {size}")
        written = handle(self.read_chain(dma, head, indirect=indirect, table=desc))
        used.pack_into(_USED_ELEM, 4 + 8 * (self.used_idx % size), head, written)
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        self.used_idx = (self.used_idx + 1) & 0xFFFF

    def _publish_used(self, used: DmaWindow, avail: DmaWindow, old_used: int,
                      event_idx: bool, interrupt: Callable[[], None],
                      report: Callable[[str], None]) -> None:
        try:
            used.pack_into(_U16, 2, self.used_idx)
        except DmaFault as e:
            report(f"used idx: {e}")
            return
        full_barrier()
        try:
            if event_idx:
                used_event = avail.unpack_from(_U16, 4 + 2 * self.size)[0]
                fire = need_event(used_event, self.used_idx, old_used)
            else:
                fire = not avail.unpack_from(_U16, 0)[0] & AVAIL_F_NO_INTERRUPT
        except DmaFault as e:
            report(f"avail ring (used_event / flags): {e}")
            return
        if fire:
            interrupt()

    def read_chain(self, dma: DmaPort, head: int, *, indirect: bool,
                   table: DmaWindow | None = None) -> list[Segment]:
        """Walk the descriptor chain from ``head`` (following one indirect table, which
        ``indirect`` -- VIRTIO_F_INDIRECT_DESC negotiated -- allows); ``table``: the
        descriptor table's window (default: :meth:`rings`')."""
        desc = table if table is not None else self.rings(dma)[0]
        segs: list[Segment] = []
        append = segs.append
        itable: list[tuple[int, int, int, int]] | None = None  # indirect table, decoded
        tsize, idx, seen = self.size, head, 0
        last_writable = False
        while True:
            if idx >= tsize:
                raise ChainError(f"descriptor index {idx} >= table size {tsize}")
            seen += 1
            if seen > tsize:
                raise ChainError(f"descriptor chain from {head} loops")
            if itable is not None:
                addr, length, flags, nxt = itable[idx]
            else:
                addr, length, flags, nxt = desc.unpack_from(_DESC, idx * DESC_SIZE)
            if flags & _F_INDIRECT:
                if itable is not None:
                    raise ChainError("nested indirect descriptor")
                if not indirect:
                    raise ChainError("indirect descriptor without INDIRECT_DESC")
                if flags & _F_NEXT:
                    raise ChainError("descriptor with both INDIRECT and NEXT")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_INDIRECT_DESCS:
                    raise ChainError(f"indirect table length {length}")
                itable = list(_DESC.iter_unpack(dma.read(addr, length)))  # one access
                tsize, idx, seen = length // DESC_SIZE, 0, 0
                continue
            writable = bool(flags & _F_WRITE)
            if not writable and last_writable:
                raise ChainError("device-readable descriptor after a writable one")
            if length:  # zero-length descriptors carry nothing
                append(Segment(addr, length, writable))
                last_writable = writable
            if not flags & _F_NEXT:
                return segs
            idx = nxt

"""Circular queues in guest memory: the command queue (the SMMU consumes) and the event
and PRI queues (the SMMU produces).

A queue of ``2**log2size`` entries is described by its base address and two pointers
PROD and CONS, each holding an index in bits ``[log2size-1:0]`` and a wrap bit at
``log2size``.  Empty: PROD == CONS; full: same index, different wrap bit.

Output queues have the overflow protocol of the architecture: a record that finds the
queue full is dropped and PROD.OVFLG toggles (once per overflow condition: while
OVFLG != CONS.OVACKFLG the condition stays active and no further toggle happens); the
driver acknowledges by copying OVFLG into CONS.OVACKFLG.

Every access goes through the guest memory object (bounds-checked); a failing access is
reported to the caller, who raises the architected GERROR.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from viommu_backend.smmuv3 import regs

FLAG = 1 << 31  # OVFLG in PROD, OVACKFLG in CONS
_Q_BASE = regs.layout("CMDQ_BASE")  # EVTQ_BASE and PRIQ_BASE have the same ADDR field


class Memory(Protocol):
    """The part of :class:`viommu_backend.memory.GuestMemory` the queues use."""

    def read(self, addr: int, n: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> None: ...


class QueueMemoryError(Exception):
    """A queue access fell outside guest memory (the caller raises the GERROR)."""

    def __init__(self, queue: str, addr: int, size: int) -> None:
        super().__init__(f"{queue}: access {addr:#x}+{size} outside guest memory")
        self.queue = queue
        self.addr = addr
        self.size = size


@dataclass
class Queue:
    """Pointers and geometry of one queue.  ``prod``/``cons`` hold wrap+index only;
    the flag bits (OVFLG / OVACKFLG, CMDQ_CONS.ERR) are kept separately."""

    name: str
    entry_size: int
    max_log2size: int
    base_reg: int = 0  # the raw *_BASE register value
    prod: int = 0
    cons: int = 0
    # (base_reg, (log2size, base, ptr_mask)): the geometry last derived from base_reg
    _geom: tuple[int, tuple[int, int, int]] | None = field(
        default=None, init=False, repr=False, compare=False)

    # -- geometry ------------------------------------------------------------------
    # Derived from base_reg, recomputed when it changes (read on every queue access).
    def _geometry(self) -> tuple[int, int, int]:
        """(log2size, base, ptr_mask) of the current base_reg."""
        g = self._geom
        if g is not None and g[0] == self.base_reg:
            return g[1]
        log2 = min(self.base_reg & 0x1F, self.max_log2size)
        addr = _Q_BASE.get(self.base_reg, "ADDR")
        size = self.entry_size << log2
        geo = (log2, addr & ~(max(size, 32) - 1), (2 << log2) - 1)
        self._geom = (self.base_reg, geo)
        return geo

    @property
    def log2size(self) -> int:
        """LOG2SIZE clamped to the advertised maximum (IDR1.*QS)."""
        return self._geometry()[0]

    @property
    def base(self) -> int:
        """Base address; the architecture aligns it to the queue size (or 32 bytes)."""
        return self._geometry()[1]

    @property
    def size(self) -> int:
        return 1 << self._geometry()[0]

    @property
    def ptr_mask(self) -> int:
        return self._geometry()[2]

    def idx(self, ptr: int) -> int:
        return ptr & (self.size - 1)

    def wrap(self, ptr: int) -> int:
        return (ptr >> self.log2size) & 1

    def empty(self) -> bool:
        return (self.prod & self.ptr_mask) == (self.cons & self.ptr_mask)

    def full(self) -> bool:
        return ((self.prod ^ self.cons) & self.ptr_mask) == self.size

    def count(self) -> int:
        """Entries between CONS and PROD."""
        return (self.prod - self.cons) & self.ptr_mask

    def inc(self, ptr: int) -> int:
        return (ptr + 1) & self.ptr_mask

    def entry_addr(self, ptr: int) -> int:
        log2, base, _ = self._geometry()
        return base + (ptr & ((1 << log2) - 1)) * self.entry_size

    # -- memory ----------------------------------------------------------------------
    def read_entry(self, mem: Memory | None, ptr: int) -> bytes:
        return self.read_entries(mem, ptr, 1)

    def read_entries(self, mem: Memory | None, ptr: int, n: int) -> bytes:
        """``n`` consecutive entries from ``ptr``: one read, or two where the queue wraps.
        Raises :class:`QueueMemoryError` if any of them cannot be read."""
        log2, base, _ = self._geometry()
        first = ptr & ((1 << log2) - 1)
        head = min(n, (1 << log2) - first)
        spans = [(base + first * self.entry_size, head * self.entry_size)]
        if head < n:
            spans.append((base, (n - head) * self.entry_size))
        if mem is None:
            raise QueueMemoryError(self.name, *spans[0])
        try:
            return b"".join(bytes(mem.read(addr, size)) for addr, size in spans)
        except Exception as exc:  # GuestMemoryError or a region without an fd
            raise QueueMemoryError(self.name, *spans[0]) from exc

    def write_entry(self, mem: Memory | None, ptr: int, data: bytes) -> None:
        addr = self.entry_addr(ptr)
        if len(data) != self.entry_size:
            raise ValueError(f"{self.name}: record of {len(data)} bytes, need {self.entry_size}")
        if mem is None:
            raise QueueMemoryError(self.name, addr, self.entry_size)
        try:
            mem.write(addr, data)
        except Exception as exc:
            raise QueueMemoryError(self.name, addr, self.entry_size) from exc


class Produced(enum.Enum):
    WRITTEN = "written"
    OVERFLOW = "overflow"  # queue full: record dropped (OVFLG may have toggled)
    ABORT = "abort"  # the write fell outside guest memory: record dropped
    DISABLED = "disabled"  # queue not enabled: record dropped


@dataclass
class OutputQueue(Queue):
    """EVTQ or PRIQ: the SMMU writes records at PROD."""

    ovflg: int = 0  # PROD.OVFLG
    ovackflg: int = 0  # CONS.OVACKFLG
    overflows: int = 0
    dropped: int = 0
    written: int = 0

    @property
    def prod_reg(self) -> int:
        return (self.prod & self.ptr_mask) | (FLAG if self.ovflg else 0)

    @property
    def cons_reg(self) -> int:
        return (self.cons & self.ptr_mask) | (FLAG if self.ovackflg else 0)

    def write_cons(self, value: int) -> None:
        self.cons = value & 0xFFFFF & self.ptr_mask
        self.ovackflg = 1 if value & FLAG else 0

    def write_prod(self, value: int) -> None:
        """Software writes PROD only while the queue is disabled (initialisation)."""
        self.prod = value & 0xFFFFF & self.ptr_mask
        self.ovflg = 1 if value & FLAG else 0

    @property
    def overflow_active(self) -> bool:
        return self.ovflg != self.ovackflg

    def produce(self, mem: Memory | None, record: bytes) -> Produced:
        if self.full():
            self.dropped += 1
            if not self.overflow_active:
                self.ovflg ^= 1
                self.overflows += 1
            return Produced.OVERFLOW
        try:
            self.write_entry(mem, self.prod, record)
        except QueueMemoryError:
            self.dropped += 1
            return Produced.ABORT
        self.prod = self.inc(self.prod)
        self.written += 1
        return Produced.WRITTEN

    def pending(self) -> bool:
        """Records the driver has not consumed (drives the level interrupt)."""
        return not self.empty()


@dataclass
class CommandQueue(Queue):
    """CMDQ: software writes PROD; the SMMU consumes at CONS.  CONS.ERR holds the
    CERROR code of the command that stopped the queue."""

    err: int = 0

    @property
    def prod_reg(self) -> int:
        return self.prod & 0xFFFFF

    @property
    def cons_reg(self) -> int:
        return (self.cons & self.ptr_mask) | (self.err << 24)

    def write_prod(self, value: int) -> None:
        # keep the bits software wrote (a pointer is read back as written); only
        # wrap+index take part in comparisons.
        self.prod = value & 0xFFFFF

    def write_cons(self, value: int) -> None:
        """Software writes CONS only while CMDQEN=0."""
        self.cons = value & 0xFFFFF & self.ptr_mask
